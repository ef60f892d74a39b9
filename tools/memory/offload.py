"""trl's activation offloading (`SFTConfig.activation_offloading=True`), run for real on this CPU.

`SFTTrainer.training_step` runs forward and backward inside
`trl.models.activation_offloading.get_act_offloading_ctx_manager(model)`: a `saved_tensors_hooks`
whose pack hook copies every saved activation of at least 1 KiB (not parameters, not the LM head's,
once per storage) to pinned host memory and keeps the device tensor only in a forward stash of the
last 5 (the copy stream's overlap window); its unpack hook streams each one back to the device in
backward, keeping the copies of the current and previous autograd node. With gradient checkpointing
the saved tensors it sees are the checkpointed blocks' inputs (torch saves them through the outer
hooks), so the per-layer residual stream moves to the host.

`offloading(model)` runs trl's own class (use_streams=True, as trl does; CPU stream stubs stand in
for CUDA streams) with the few shims a CPU needs to behave like a GPU here:

- the accelerator is "cpu" and memory is not pinned (pinning needs CUDA; the host bytes are equal);
- the host copies trl makes (`torch.empty(_like)(..., pin_memory=..., device="cpu")`) are counted as
  host storage by the tracker (`tracker.host_alloc`), not device storage;
- in unpack, `tensor.to(accelerator)` of a host copy makes a new device tensor (on the CPU it would
  return the same tensor);
- fake tensors have no data pointers: a storage's pointer is its identity (trl keys deduplication
  and its parameter filter on `data_ptr()`); `record_stream` is a no-op (CPU tensors have none).

The tracker then reports the device-side peak (what stays on the GPU) and the host peak (pinned RAM).
"""

from __future__ import annotations

import contextlib

import torch


class _HostToDevice(torch.overrides.TorchFunctionMode):
    """Inside trl's unpack: `host_copy.to(device)` brings a NEW device tensor back (as on a GPU)."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) and self.tracker.is_host(args[0]):
            return args[0].clone()
        return func(*args, **kwargs)


@contextlib.contextmanager
def _host_allocations(tracker):
    """Count trl's pinned host buffers (empty/empty_like with a pin_memory argument) as host storage."""
    empty, empty_like = torch.empty, torch.empty_like

    def wrap(fn):
        def alloc(*args, **kwargs):
            if "pin_memory" not in kwargs:
                return fn(*args, **kwargs)
            tracker.host_alloc += 1
            try:
                return fn(*args, **kwargs)
            finally:
                tracker.host_alloc -= 1
        return alloc

    torch.empty, torch.empty_like = wrap(empty), wrap(empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@contextlib.contextmanager
def _cpu_as_accelerator():
    """trl asks torch for the current accelerator; on this CPU build there is none: answer 'cpu'."""
    acc = torch.accelerator.current_accelerator
    torch.accelerator.current_accelerator = lambda *a, **k: torch.device("cpu")
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None  # trl empties the cache when bitsandbytes is loaded
    for name in ("synchronize", "wait_event", "wait_stream"):  # torch.cpu.Stream is a stub: give it the no-ops trl calls
        if not hasattr(torch.cpu.Stream, name):
            setattr(torch.cpu.Stream, name, lambda self, *a, **k: None)
    try:
        yield
    finally:
        torch.accelerator.current_accelerator = acc


@contextlib.contextmanager
def _storage_identity_pointers():
    """Fake storages report data_ptr() 0: give each its identity instead (real storages keep theirs)."""
    orig = torch.UntypedStorage.data_ptr
    record = torch.Tensor.record_stream

    def data_ptr(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = orig(self)
        return p if p else id(self)

    torch.UntypedStorage.data_ptr = data_ptr
    torch.Tensor.record_stream = lambda self, stream: None
    try:
        yield
    finally:
        torch.UntypedStorage.data_ptr = orig
        torch.Tensor.record_stream = record


@contextlib.contextmanager
def offloading(model, tracker):
    """Run the enclosed forward+backward inside trl's real activation-offloading hooks, host copies counted apart."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    with contextlib.ExitStack() as stack:
        stack.enter_context(_cpu_as_accelerator())
        stack.enter_context(_storage_identity_pointers())
        # not pinned: pinning needs CUDA (the bytes are the same; trl's pinned-RAM check has nothing to check here)
        ctx = get_act_offloading_ctx_manager(model=model, use_pin_memory=False, warn_if_no_head=False)
        if tracker is None:  # an untracked step (a real step's warm-up): trl's hooks as they are
            stack.enter_context(ctx)
            yield ctx
            return
        pack, unpack = ctx.pack_hook, ctx.unpack_hook

        def pack_hook(t):
            with _host_allocations(tracker):
                return pack(t)

        def unpack_hook(i):
            with _HostToDevice(tracker):
                return unpack(i)

        ctx.pack_hook, ctx.unpack_hook = pack_hook, unpack_hook
        stack.enter_context(ctx)
        yield ctx
