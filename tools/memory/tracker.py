"""The storage counter: every live storage a step produces, with per-segment peaks and snapshots.

`make_tracker()` returns `MemoryTracker`, the `FakeTensorMode` of a dry run, tracking:
it sees the outputs of every op, records each new storage with its size (`_Rec`), and learns
its death through a weakref finalizer, so it knows the live total after every op. Peaks are kept
per segment of the step (forward, loss backward, block backward, backward after the first block
i.e. the embedding backward, optimizer, eval) because the segment that holds the peak can change
with depth, and each segment's peak must be the same kind of moment at depth k and k+period for the
linear extrapolation to hold (`tools.memory.extrapolate`; the segments: `tools.memory.segments`).
`make_tracker(fake=False)` returns `RealMemoryTracker`, a plain dispatch mode that counts the
storages of a REAL step the same way (the tests compare the two). Both share `TrackingMixin`, whose `add` / `_free` are the one place a
storage's birth and death are seen. `log_events()` turns on an event log there, off by default and
free when off (`live` is then a plain dict), opened by the storages alive when it starts: the
allocation order as (1, key, nbytes, tag) per birth
and (0, key, 0, "") per death; a record replaced in `live` (FSDP's in-place storage resizes, a
storage moved to host RAM) logs the death of the old size and the birth of the new one.
`tools.memory.allocator.replay` serves that order the way PyTorch's caching allocator would, on the
CUDA stream each tag allocates on.

The tracker's own op cache (`_op_key`, `_record`, `_replay`) answers repeated ops in front of
FakeTensorMode's cache; `TUNEPILOT_SIM_FASTPATH=0` switches it off.

This module imports torch at import time; `tools.memory` imports it only when a dry run needs it.
"""

from __future__ import annotations

import os
import sys
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tools.memory.segments import SEGMENT_OF_PHASE


class _Rec:
    """One live storage: its size and the phase (tag) it was allocated in."""

    __slots__ = ("nbytes", "tag", "__weakref__")

    def __init__(self, nbytes: int, tag: str):
        self.nbytes = nbytes
        self.tag = tag


class _EventLog(dict):
    """The tracker's `live` map once `log_events()` is on: every change is appended to `events`."""

    def __init__(self, live: dict):
        super().__init__(live)
        # what is alive when logging starts is allocated first, in the order it was born
        self.events: list[tuple] = [(1, key, rec.nbytes, rec.tag) for key, rec in live.items() if rec.nbytes]

    def __setitem__(self, key, rec) -> None:
        old = self.get(key)
        if old is not rec:
            if old is not None and old.nbytes:
                self.events.append((0, key, 0, ""))
            if rec.nbytes:
                self.events.append((1, key, rec.nbytes, rec.tag))
        super().__setitem__(key, rec)

    def __delitem__(self, key) -> None:
        old = self[key]
        if old.nbytes:
            self.events.append((0, key, 0, ""))
        super().__delitem__(key)


# --------------------------------------------------------------------------------------
# The tracking modes
# --------------------------------------------------------------------------------------

_PRIM_DEVICE = torch.ops.prim.device.default

_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default
_FAKE_DISPATCH = FakeTensorMode.__torch_dispatch__
try:  # ops FakeTensorMode.dispatch answers before its cache: never run those directly
    from torch._subclasses.fake_tensor import _DISPATCH_HANDLE_DIRECTLY, _DISPATCH_META_HANDLERS

    _SPECIAL = set(_DISPATCH_HANDLE_DIRECTLY) | set(_DISPATCH_META_HANDLERS)
    _DIRECT_OK = hasattr(FakeTensorMode, "_validate_cache_key") and hasattr(FakeTensorMode, "_dispatch_impl")
except ImportError:  # another torch: keep FakeTensorMode's own path for new ops
    _SPECIAL, _DIRECT_OK = set(), False


class TrackingMixin:
    """Counts every live storage an op produces; keeps, per segment of the step, the peak and what was alive then.

    Segments: forward (incl. head and loss), backward-loss (until the gradient reaches the
    logits), backward (the blocks), optimizer (clipping + step), eval. The step peak is the max.
    """

    def _init_tracking(self):
        self._nested = 0
        self.live: dict[int, _Rec] = {}
        self.current = 0
        self.seg_peak: dict[str, int] = {}
        self.seg_snap: dict[str, list[_Rec]] = {}
        self._stale: str | None = None
        self._phase = "setup"
        self.in_block = 0
        # optional op observer, off by default: callable(func, args, kwargs, out, tag) called for every
        # top-level op, also one answered from the op cache (tools.memory.timing.OpTrace records its cost)
        self.op_observer = None
        # host (CPU) storages of the step, e.g. trl's activation offloading copies: counted apart from the
        # device total (`host_alloc` > 0 while such copies are made; `is_host` tells a storage's side)
        self.host_alloc = 0
        self.host_live: dict[int, _Rec] = {}
        self.host_current = 0
        self.host_peak = 0
        self.host_total = 0

    def log_events(self) -> list[tuple]:
        """Record every storage birth and death from now on (the order the caching-allocator model replays);
        the storages alive now open the log as births, in the order they were born."""
        if not isinstance(self.live, _EventLog):
            self.live = _EventLog(self.live)
        return self.live.events

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self.finish()
        self._phase = value
        self._enter(SEGMENT_OF_PHASE.get(value, value))

    def _enter(self, seg: str) -> None:
        if self.current > self.seg_peak.get(seg, -1):
            self.seg_peak[seg] = self.current
            self.take_snapshot(seg)

    @property
    def segment(self) -> str:
        return SEGMENT_OF_PHASE.get(self._phase, self._phase)

    @property
    def peak(self) -> int:
        return max(self.seg_peak.values(), default=self.current)

    def tag(self) -> str:
        if self._phase == "backward" and self.in_block > 0:
            return "recompute"
        return self._phase

    def add(self, t) -> None:
        t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP2 shard): its local tensor holds the memory
        st = t.untyped_storage()
        key = id(st)
        if key in self.live or key in self.host_live:
            return
        if self.host_alloc:
            rec = _Rec(st.nbytes(), "host")
            self.host_live[key] = rec
            self.host_current += rec.nbytes
            self.host_peak = max(self.host_peak, self.host_current)
            self.host_total += rec.nbytes
            weakref.finalize(st, self._free, key, rec)
            return
        rec = _Rec(st.nbytes(), self.tag())
        self.live[key] = rec
        self.current += rec.nbytes
        weakref.finalize(st, self._free, key, rec)
        seg = self.segment
        if self.current > self.seg_peak.get(seg, -1):
            self.seg_peak[seg] = self.current
            self._stale = seg

    def _free(self, key: int, rec: _Rec) -> None:
        if self._stale is not None:
            self.take_snapshot(self._stale)
        if self.live.get(key) is rec:
            del self.live[key]
            self.current -= rec.nbytes
        elif self.host_live.get(key) is rec:
            del self.host_live[key]
            self.host_current -= rec.nbytes

    def is_host(self, t) -> bool:
        return id(t.untyped_storage()) in self.host_live

    def take_snapshot(self, seg: str) -> None:
        self.seg_snap[seg] = list(self.live.values())
        self._stale = None

    def reset_peak(self) -> None:
        """Forget earlier peaks; the current segment starts from what is alive now."""
        self.finish()
        self.seg_peak.clear()
        self.seg_snap.clear()
        self._enter(self.segment)

    def finish(self) -> None:
        if self._stale is not None:
            self.take_snapshot(self._stale)

    def rec_of(self, t) -> _Rec | None:
        t = getattr(t, "_local_tensor", t)
        return self.live.get(id(t.untyped_storage()))

    def _track(self, out) -> None:
        if isinstance(out, torch.Tensor):
            self.add(out)
            return
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)

class MemoryTracker(TrackingMixin, FakeTensorMode):
    """The fake-tensor mode itself, tracking. One mode rather than a TorchDispatchMode stacked on
    FakeTensorMode: every op (and the thousands of device queries autograd makes) crosses one
    Python layer instead of two. Only the outputs of top-level ops are tracked, not those of
    decompositions FakeTensorMode runs inside one (the same ops a stacked mode would see)."""

    def __init__(self):
        FakeTensorMode.__init__(self, allow_non_fake_inputs=True)
        self._init_tracking()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE:  # autograd asks thousands of times: answer as FakeTensorMode's handler does
            t = args[0] if len(args) == 1 else None
            if isinstance(t, FakeTensor) and not t.fake_mode.in_kernel_invocation:
                return t.fake_device
            return _FAKE_DISPATCH(self, func, types, args, kwargs or {})
        key = None
        if not self._nested and _FAST_PATH:
            key = _op_key(func, args, kwargs)
            if key is not None:
                entry = _OP_CACHE.get(key)
                if entry is not None:
                    out = _replay(self, entry, args)
                    self._track(out)
                    if self.op_observer is not None:
                        self.op_observer(func, args, kwargs, out, self.tag())
                    return out
        # an op not seen yet: when FakeTensorMode would cache it, run its kernel directly, without
        # building FakeTensorMode's cache key and entry (this cache replaces them)
        direct = False
        if key is not None and _DIRECT_OK and func not in _SPECIAL:
            try:
                self._validate_cache_key(func, args, kwargs or {})
                direct = True
            except Exception:  # noqa: BLE001 - _BypassDispatchCache: FakeTensorMode's full path
                direct = False
        cacheable = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses
        self._nested += 1
        try:
            if direct:
                out = self._dispatch_impl(func, types, args, kwargs or {})
            else:
                out = _FAKE_DISPATCH(self, func, types, args, kwargs or {})
        finally:
            self._nested -= 1
        if self._nested:
            return out
        if key is not None and (direct or func is _UNSAFE_VIEW or getattr(func, "namespace", None) == "bitsandbytes"
                                or cacheable != FakeTensorMode.cache_hits + FakeTensorMode.cache_misses):
            entry = _record(out, args, kwargs)
            if entry is not None:
                if len(_OP_CACHE) >= _OP_CACHE_MAX:
                    _OP_CACHE.clear()
                _OP_CACHE[key] = entry
        self._track(out)
        if self.op_observer is not None:
            self.op_observer(func, args, kwargs, out, self.tag())
        return out

class RealMemoryTracker(TrackingMixin, TorchDispatchMode):
    def __init__(self):
        TorchDispatchMode.__init__(self)
        self._init_tracking()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dt = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before it is imported
        if dt is not None and dt.DTensor in types:
            # a DTensor op (FSDP2): let DTensor run it, so that the ops on its local tensors (which
            # hold the memory) come back through this mode; its own storage is a wrapper's, not memory
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func is not _PRIM_DEVICE and not _fake_output(out):
            self._track(out)
            if self.op_observer is not None:
                self.op_observer(func, args, kwargs, out, self.tag())
        return out


def _fake_output(out) -> bool:
    """DTensor's sharding propagation runs ops on fake tensors inside a real step: metadata, not memory."""
    if isinstance(out, (list, tuple)):
        return bool(out) and isinstance(out[0], FakeTensor)
    return isinstance(out, FakeTensor)


def make_tracker(fake: bool = True):
    """The memory tracker: the FakeTensorMode of a dry run (fake=True), or a plain dispatch mode that
    counts the storages of a real step the same way (fake=False; the tests compare the two)."""
    return MemoryTracker() if fake else RealMemoryTracker()


# --------------------------------------------------------------------------------------
# The op cache
# --------------------------------------------------------------------------------------

# The tracker's own op cache, in front of FakeTensorMode's. FakeTensorMode answers a repeated op
# (same op, same input shapes/strides/dtypes) from its cache, but builds that cache key and the
# output through ~0.4 ms of Python per op, and a 70B LoRA dry run dispatches ~2,500 such ops.
# Here an op that FakeTensorMode itself found cacheable (a hit or a cached miss; plus
# aten._unsafe_view, which it never caches, and bitsandbytes' ops, which it never caches as
# non-builtin ops: their outputs follow from their arguments' metadata) is remembered under a cheaper key: per tensor input
# (shape, stride, storage offset, dtype, requires_grad, device), other inputs by type and value.
# A replay makes the output on `meta` exactly as FakeTensorMode's cache does: a fresh storage of
# the same size, a view of the same input's storage, or the in-place input itself. Inputs with a
# known constant value, real (non-fake) tensors and unhashable arguments always take the full path.
# tests/test_simulator.py checks that both paths give identical results; TUNEPILOT_SIM_FASTPATH=0
# switches this off.
_FAST_PATH = os.environ.get("TUNEPILOT_SIM_FASTPATH", "1") != "0"
_OP_CACHE: dict[tuple, tuple] = {}
_OP_CACHE_MAX = 50_000
_SCALARS = (int, float, bool, str, type(None))
_HASHABLE_TORCH = (torch.dtype, torch.device, torch.layout, torch.memory_format)


class _NoKey(Exception):
    pass


def _arg_key(x):
    if isinstance(x, FakeTensor):
        if x.constant is not None:
            raise _NoKey
        return (x.shape, x.stride(), x.storage_offset(), x.dtype, x.requires_grad, x.fake_device)
    if isinstance(x, _SCALARS):
        return (type(x), x)
    if isinstance(x, (list, tuple)):
        return (type(x), tuple(_arg_key(y) for y in x))
    if isinstance(x, _HASHABLE_TORCH):
        return x
    raise _NoKey


def _op_key(func, args, kwargs):
    try:
        k = (func, tuple(_arg_key(a) for a in args))
        if kwargs:
            k += tuple((n, _arg_key(v)) for n, v in sorted(kwargs.items()))
        return k
    except _NoKey:
        return None


def _record(out, args, kwargs=None):
    """How to make `out` again from inputs of the same metadata, or None if this op is not replayable."""
    if out is None:
        return ("none", ())  # an op that only mutates values (foreach/in-place updates): nothing to make
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not outs or not all(isinstance(o, FakeTensor) for o in outs):
        return None
    if kwargs:
        # `out=` (e.g. torch.mm(a, b, out=tile)): the output is the keyword tensor itself, which a replay
        # from the positional inputs would make as a fresh storage: leave such ops to FakeTensorMode
        kw_stores = {id(v.untyped_storage()) for v in tree_flatten(kwargs)[0] if isinstance(v, FakeTensor)}
        if any(id(o.untyped_storage()) in kw_stores for o in outs):
            return None
    tensor_args = [(i, a) for i, a in enumerate(args) if isinstance(a, FakeTensor)]
    infos = []
    for o in outs:
        if o.constant is not None:
            return None
        meta = (tuple(o.shape), o.stride(), o.storage_offset(), o.dtype, o.requires_grad, o.fake_device)
        st = o.untyped_storage()
        inplace = next((i for i, a in tensor_args if a is o), None)
        if inplace is not None:
            infos.append(("inplace", inplace))
            continue
        view = next((i for i, a in tensor_args if a.untyped_storage() is st), None)
        if view is not None:
            infos.append(("view", view, meta))
            continue
        if o.storage_offset() != 0 or st.nbytes() != _min_storage_bytes(o):
            return None  # a fresh output that is a window of a larger buffer: leave it to FakeTensorMode
        infos.append(("new", meta))
    seq_type = (list if isinstance(out, list) else tuple) if isinstance(out, (tuple, list)) else None
    return (seq_type, tuple(infos))


def _min_storage_bytes(t) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _replay(mode, entry, args):
    seq_type, infos = entry
    if seq_type == "none":
        return None
    outs = []
    for info in infos:
        if info[0] == "inplace":
            outs.append(args[info[1]])
            continue
        shape, stride, offset, dtype, requires_grad, device = info[-1]
        empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta", requires_grad=requires_grad)
        if info[0] == "view":
            empty.set_(args[info[1]].untyped_storage(), offset, shape, stride)
        outs.append(FakeTensor(mode, empty, device))
    return seq_type(outs) if seq_type is not None else outs[0]
