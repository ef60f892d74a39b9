"""The segments of a simulated training step, and the phase of the step each one reports.

The tracker (`tools.memory.tracker`) keeps a peak per segment; the step (`tools.memory.step`) moves
it from phase to phase; extrapolation (`tools.memory.extrapolate`) extends each segment in depth and
reports the phase of the largest. No torch here.
"""

from __future__ import annotations

# phase -> segment, where they differ: the head and the loss belong to the forward segment
SEGMENT_OF_PHASE = {"forward-head": "forward", "setup": "setup",
                    # objectives (issue 15): the reference forward of DPO/KTO runs inside the policy's forward;
                    # GRPO's generation and its no-grad scoring forwards come before the training forward
                    "reference": "forward", "generate-reference": "generate"}
# backward-tail: after the gradient has left the first block (embedding backward, or nothing). Kept apart
# from the blocks' backward so that each segment's peak moment is the same kind of moment at every
# depth (a 1-block model otherwise peaks in the embedding backward, a 2-block one at the start of
# backward, and the linear extrapolation of that segment mixes the two).
TRAIN_SEGMENTS = ("forward", "backward-loss", "backward", "backward-tail", "optimizer", "generate")
PHASE_OF_SEGMENT = {"forward": "forward", "backward-loss": "backward", "backward": "backward", "backward-tail": "backward",
                    "optimizer": "optimizer", "generate": "generation"}

# the categories a sharded (FSDP/ZeRO) step adds to a peak's breakdown: what FSDP allocates inside its
# all-gather (gathered parameters of the units in flight) and its reduce-scatter (gradient buffers)
SHARDED_CATEGORIES = ("fsdp_all_gather", "fsdp_reduce_scatter")
