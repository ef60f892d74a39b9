"""The memory engine: the memory of one real training step, counted on fake tensors (tier 'simulated').

`simulate(model, setup)` builds the real Hugging Face model from its config.json on the `meta`
device, wraps it with the real peft adapter the generated script will use, materialises it
under PyTorch's `FakeTensorMode` (shapes and dtypes, no memory) and runs two real training
steps: forward on input_ids [per_device_train_batch_size, max_length] with labels (HF's loss
path: logits upcast to fp32, cross-entropy), backward, gradient clipping, optimizer.step(),
zero_grad(set_to_none=True). The tracking mode sees the outputs of every op, records each new
storage with its size, and learns its death through a weakref finalizer, so it knows the live
total after every op. Step 1 only creates the optimizer state; the peak of the SECOND, complete
step (steady state) is reported, kept per segment of the step. Depth is extrapolated: k and
k+period blocks are simulated and every category is extended linearly to the full depth
(`extrapolate=False` simulates the full depth). Nothing here adds CUDA context, allocator
rounding or ZeRO/FSDP sharding: that is `tools.estimator`'s job.

One module per part (each module's docstring says what it models and where it copies CUDA):

- `tools.memory.runner` — `simulate()` itself: validation, the in-process result cache, the two
  depths (the shallower one in a forked child where that is safe);
- `tools.memory.step` — one simulated training step at one depth (`run`): build and prepare the
  model, the optimizer, the state step, forward/loss/backward/optimizer step, classification of the
  peak snapshot into categories, eval; optimizer construction, inputs, dropout/mask policies, MoE;
- `tools.memory.build` — the real transformers model on meta (config, depth overrides, attention
  fallback), peft import and wrap, materialisation under the fake mode, re-tying, head and blocks;
- `tools.memory.quant` — bitsandbytes 4-bit / 8-bit stand-ins that run on fake tensors;
- `tools.memory.tracker` — the storage counter (`make_tracker`: the tracking FakeTensorMode, or a
  mode that counts a real step the same way) and its op cache;
- `tools.memory.extrapolate` — layer period, which depths to simulate, the linear extension.

This package imports neither torch nor transformers when imported (`tunepilot estimate --fast`,
the planner's analytic tier and `tunepilot --help` stay light): `simulate`, `clear_cache` and
`make_tracker` load their modules on first use.
"""

from __future__ import annotations

import importlib

from tools.schemas import TunepilotError


class SimulationError(TunepilotError):
    """A setup the simulator cannot run (unsupported combination or a model transformers cannot build)."""


# public name -> the module that defines it (imported on first access: no torch at package import)
_LAZY = {
    "simulate": "tools.memory.runner",
    "clear_cache": "tools.memory.runner",
    "make_tracker": "tools.memory.tracker",
}

__all__ = ["SimulationError", *_LAZY]


def __getattr__(name: str):
    modname = _LAZY.get(name)
    if modname is None:
        raise AttributeError(f"module 'tools.memory' has no attribute {name!r}")
    return getattr(importlib.import_module(modname), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
