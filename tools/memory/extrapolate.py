"""Depth: how many blocks a model has, which depths to simulate, and the linear extension to full depth.

A block stack repeats with a period (1 for most models; the sliding/full attention pattern of
Gemma-2/3 and friends, the MoE step of decoder_sparse_step models), after an optional dense prefix
(first_k_dense_replace). k1 = prefix + period and k2 = prefix + 2*period blocks are simulated, and
every category of every segment is extended linearly to the full depth (`combine`); the step peak
is the largest segment at full depth. No torch here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tools.memory.build import DEPTH_KEYS, layer_types
from tools.memory.segments import PHASE_OF_SEGMENT, SHARDED_CATEGORIES
from tools.schemas import ModelSpec, StepMemory

if TYPE_CHECKING:
    from tools.memory.step import RunResult


def num_layers(model: ModelSpec) -> int:
    """The full depth: the first depth key the config sets."""
    cfg = model.config
    for k in DEPTH_KEYS:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return model.num_hidden_layers


def min_period(seq: list) -> int:
    """The shortest p such that seq repeats with period p."""
    for p in range(1, len(seq) + 1):
        if all(seq[i] == seq[i % p] for i in range(len(seq))):
            return p
    return len(seq)


def layer_period(model: ModelSpec) -> tuple[int, int]:
    """(dense prefix, period) of the block stack: simulate prefix+period and prefix+2*period blocks."""
    cfg = model.config
    prefix, period = 0, 1
    if isinstance(cfg.get("first_k_dense_replace"), int):
        prefix = cfg["first_k_dense_replace"]
    per_block = layer_types(model)
    if per_block:
        period = min_period(per_block[prefix:] or per_block)
    elif isinstance(cfg.get("sliding_window_pattern"), int) and cfg["sliding_window_pattern"] > 1:
        period = cfg["sliding_window_pattern"]
    step = cfg.get("decoder_sparse_step")
    if isinstance(step, int) and step > 1:
        period = period * step // math.gcd(period, step)
    mlp_only = cfg.get("mlp_only_layers")
    if isinstance(mlp_only, list) and mlp_only:
        # irregular dense layers: simulate everything (rare; usually an empty list)
        prefix = num_layers(model)
    return prefix, period


# trl's activation offloading keeps the last 5 saved tensors on the device (its forward stash): below that
# depth every block's activations are still in the window and the per-block slope is not yet the real one
OFFLOAD_STASH_BLOCKS = 6


def depths_to_simulate(model: ModelSpec, extrapolate: bool = True, *, min_blocks: int = 1) -> tuple[int, list[int]]:
    """(full depth, the depths to simulate): [prefix+n*period, prefix+(n+1)*period] with the smallest n that has at
    least `min_blocks` blocks (1 by default), or [full] when that is not shallower.

    A sharded step (FSDP/ZeRO, tools.memory.distributed) asks for 3 blocks: from three units on its
    backward peak is the same kind of moment at every depth (the same units in flight, FSDP's prefetch
    of the next unit, one more block of sharded gradients per block); shallower, the slope is off."""
    total = num_layers(model)
    prefix, period = layer_period(model)
    n = max(1, -(-min_blocks // period))
    k1, k2 = prefix + n * period, prefix + (n + 1) * period
    return total, ([k1, k2] if extrapolate and k2 < total else [total])


def combine(runs: list[RunResult], depths: list[int], total: int, *, gathered_per_block: bool = False) -> StepMemory:
    """Extend each segment's breakdown linearly in depth; the step peak is the largest segment at full depth.

    Peaks are tracked per segment because the segment holding the peak can change with depth
    (a 2-block model peaks at the logits, an 80-block one at the optimizer step).

    gathered_per_block: the sharding keeps every unit's gathered parameters after its forward (FSDP
    shard_grad_op, DeepSpeed ZeRO-1/2: reshard_after_forward False), so `fsdp_all_gather` holds one more
    block per block and is extended like any other category; under full_shard it is the units in flight.
    Every segment's extended breakdown is kept (`segment_breakdowns`): the estimator re-chooses the peak
    where it models an engine on top of the simulated step (DeepSpeed's gradients).
    """
    a = runs[0]
    notes = list(dict.fromkeys(n for r in runs for n in r.notes))
    if len(runs) == 1:
        segs = a.segments
        ext = lambda x, y: x  # noqa: E731
        b = a
        per_layer = None
    else:
        b = runs[1]
        k1, k2 = depths
        steps = (total - k1) / (k2 - k1)  # periods to add beyond k1

        def ext(x: int, y: int) -> int:
            return max(0, round(x + (y - x) * steps))

        # FSDP's gathered parameters (under full_shard) and reduce-scatter buffers belong to the units in
        # flight, not to the depth: they take the deeper run's value instead of a slope
        in_flight = tuple(c for c in SHARDED_CATEGORIES if not (gathered_per_block and c == "fsdp_all_gather"))
        segs = {
            seg: {c: (b.segments[seg].get(c, 0) if c in in_flight else ext(a.segments[seg][c], b.segments[seg].get(c, 0)))
                  for c in a.segments[seg]}
            for seg in a.segments if seg in b.segments
        }
    best = max(segs, key=lambda seg: sum(segs[seg].values()))
    breakdown = segs[best]
    if len(runs) == 2:
        per_layer = round((sum(b.segments[best].values()) - sum(a.segments[best].values())) / (depths[1] - depths[0]))
    eval_peak = None if a.eval_peak_bytes is None else ext(a.eval_peak_bytes, b.eval_peak_bytes)
    op_trace = None
    if a.op_counts is not None and (len(runs) == 1 or b.op_counts is not None):
        from tools.memory.timing import extrapolate as extend_trace, trace_to_list

        counts = a.op_counts if len(runs) == 1 else extend_trace(a.op_counts, b.op_counts, depths[0], depths[1], total)
        op_trace = trace_to_list(counts)
    over = over_exp = None
    if a.allocator and b.allocator:
        # what the caching allocator holds beyond the live bytes: the rounding of live blocks grows with
        # every block's tensors (extended linearly). The cached free blocks are set by the step's largest
        # transients (logits, gathered units) and grow a little per block where each leaves its own (full
        # fine-tuning of SmolLM2: ~7 MiB per block), but from depth to depth they jump (which cached block a
        # request splits changes): the deeper run's, plus its growth capped at a quarter of the live bytes'
        # growth per block. A growth beyond that cap is (at least partly) a one-block jump — a segment made at
        # the deeper depth that the shallower one found in its cache — not a per-block trend: its extension
        # is then bounded by the deeper run's cached bytes. Checked against full-depth replays
        # (tests/test_allocator.py; Llama-2-70B FSDP-QLoRA, issue 11's closing note: extending the capped
        # jump over 76 blocks read 7.3 GiB where the 80-block replay holds 2.3)
        def overhead(key: str) -> int:
            ra, rb = a.allocator, b.allocator
            waste = ext(ra["allocated"] - ra["requested"], rb["allocated"] - rb["requested"])
            ca, cb = ra[key] - ra["allocated"], rb[key] - rb["allocated"]
            if len(runs) == 1:
                return max(0, waste + ca)
            cap = max(0, rb["requested"] - ra["requested"]) // 4
            growth = min(max(0, cb - ca), cap)
            extended = round(growth * (total - depths[1]) / (depths[1] - depths[0]))
            if cb - ca > cap:
                extended = min(extended, max(0, cb))
            return max(0, waste + cb + extended)

        over, over_exp = overhead("reserved"), overhead("reserved_expandable")
    return StepMemory(
        tier="simulated",
        num_parameters=ext(a.num_parameters, b.num_parameters),
        trainable_parameters=ext(a.trainable_parameters, b.trainable_parameters),
        weights_bytes=ext(a.weights_bytes, b.weights_bytes),
        adapter_bytes=ext(a.adapter_bytes, b.adapter_bytes),
        gradient_bytes=ext(a.gradient_bytes, b.gradient_bytes),
        optimizer_bytes=ext(a.optimizer_bytes, b.optimizer_bytes),
        peak_bytes=sum(breakdown.values()), peak_breakdown=breakdown, peak_phase=PHASE_OF_SEGMENT[best],
        segment_breakdowns={seg: dict(bd) for seg, bd in segs.items()},
        eval_peak_bytes=eval_peak,
        largest_layer_param_bytes=max(a.largest_layer_param_bytes, b.largest_layer_param_bytes),
        per_layer_bytes=per_layer, layers_simulated=list(depths), notes=notes, op_trace=op_trace,
        allocator_overhead_bytes=over, allocator_overhead_expandable_bytes=over_exp,
        world_size=a.world_size, rank=a.rank,
        offloaded_bytes={k: ext(v, b.offloaded_bytes.get(k, 0)) for k, v in a.offloaded_bytes.items()},
        offload_host_bytes=ext(a.host_peak_bytes, b.host_peak_bytes),
        offload_traffic_bytes=ext(a.host_traffic_bytes, b.host_traffic_bytes),
    )
