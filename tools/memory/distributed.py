"""The distributed part of the dry run: the model sharded over a fake process group, as accelerate does.

`fake_mesh(world_size)` starts (once per process and world size) torch's fake process group
(`torch.testing._internal.distributed.fake_pg`: collectives allocate their outputs and move no data)
and returns a CPU DeviceMesh built outside fake mode (the default mesh creation makes a
data-dependent call fake tensors refuse). `shard_fsdp2(model, setup, mesh)` then wraps the
(materialised, quantized, peft-wrapped) model exactly as accelerate's `fsdp2_prepare_model` does
for the `accelerate_config.yaml` tunepilot writes:

- trainable parameters upcast to fp32 under mixed precision (accelerate: "FSDP upcast of low
  precision parameters to fp32"), except on a 4-bit base (accelerate skips the upcast when the
  model has Params4bit; trl's bf16 adapters stay bf16);
- `fully_shard` per module whose class is in the model's `_no_split_modules` (bottom-up), the input
  embedding as its own unit (untied), the tail [final norm, output head] as one unit with
  `reshard_after_forward=False`, and the root with torch's default;
- `reshard_after_forward=True` for full_shard and False for shard_grad_op;
- `MixedPrecisionPolicy(param_dtype, reduce_dtype, output_dtype)` = the mixed-precision dtype (bf16
  or fp16), or the default policy without mixed precision;
- `CPUOffloadPolicy(pin_memory=False)` for offload (pinning needs an accelerator; the bytes are the same).

`FsdpLedger` is what the storage counter needs on top: FSDP2 frees and re-allocates its all-gather
buffers with `untyped_storage().resize_()` (no new storage, so a counter of new storages alone would
miss them), allocations made inside the all-gather / reduce-scatter code are tagged
`fsdp_all_gather` / `fsdp_reduce_scatter`, and under CPU offload the sharded parameters, sharded
gradients, optimizer states and the optimizer step live in host RAM: their bytes move to the
ledger's host count and leave the device count. The same ledger runs in the real multi-process
(gloo) steps the tests compare against, so simulated and real are counted alike.

Which rank: FSDP2 shards every parameter on dim 0 with `torch.chunk` semantics, so rank 0 holds the
largest (or an equal) chunk of every parameter and the padded all-gather buffers are the same on
every rank: rank 0 is a worst rank, and the fake group runs rank 0.
"""

from __future__ import annotations

import contextlib
import weakref

_MESHES: dict[int, object] = {}

TAG_ALL_GATHER = "fsdp_all_gather"
TAG_REDUCE_SCATTER = "fsdp_reduce_scatter"
SHARDED_CATEGORIES = (TAG_ALL_GATHER, TAG_REDUCE_SCATTER)


def fake_mesh(world_size: int):
    """A 1-D CPU DeviceMesh of `world_size` ranks over torch's fake process group (this process is rank 0)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    mesh = _MESHES.get(world_size)
    if mesh is not None and dist.is_initialized() and dist.get_world_size() == world_size:
        return mesh
    if dist.is_initialized():
        dist.destroy_process_group()
        _MESHES.clear()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        mesh = init_device_mesh("cpu", (world_size,))
    _MESHES[world_size] = mesh
    return mesh


def _local(t):
    """The local shard of a DTensor, or the tensor itself."""
    return getattr(t, "_local_tensor", t)


def _final_norm(model):
    """The last norm among the base model's direct children (accelerate's `_find_final_norm`)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    if base is None or not hasattr(base, "named_children"):
        return None
    norm = None
    for _, module in base.named_children():
        if "Norm" in type(module).__name__:
            norm = module
    return norm


def _bottom_up(model) -> list:
    """Every submodule, children before parents (accelerate's get_module_children_bottom_up)."""
    out, stack = [], [model]
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(m.children())
    return out[::-1]


def mixed_precision_policy(setup):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if setup.bf16 or setup.fp16:
        dt = torch.bfloat16 if setup.bf16 else torch.float16
        return MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=dt, output_dtype=dt)
    return MixedPrecisionPolicy()


def shard_fsdp2(pm, base, setup, mesh, *, reshard_after_forward: bool | None = None) -> list[str]:
    """Wrap `pm` (the model the Trainer trains: peft model or base) with FSDP2 as accelerate does; notes."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    if reshard_after_forward is None:
        reshard_after_forward = setup.fsdp != "shard_grad_op"
    quantized = setup.load_in_4bit or setup.load_in_8bit
    notes: list[str] = []
    if (setup.bf16 or setup.fp16) and not quantized:
        n = 0
        for p in pm.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.to(torch.float32)
                n += 1
        if n:
            notes.append(f"FSDP mixed precision: {n} trainable parameters upcast to fp32 master weights (as accelerate does)")
    offload = setup.offload != "none"
    kw = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mixed_precision_policy(setup),
        "offload_policy": CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy(),
    }
    names = set(getattr(base, "_no_split_modules", None) or [])
    units = 0
    for module in _bottom_up(pm)[:-1]:
        if type(module).__name__ in names and not isinstance(module, FSDPModule):
            fully_shard(module, **kw)
            units += 1
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    try:
        head = base.get_output_embeddings()
    except Exception:  # noqa: BLE001
        head = None
    tied = emb is not None and head is not None and getattr(emb, "weight", None) is getattr(head, "weight", 0)
    if not tied and emb is not None and not isinstance(emb, FSDPModule):
        fully_shard(emb, **kw)
        units += 1
    norm = _final_norm(base)
    tail = [m for m in ((norm, emb, head) if tied else (norm, head)) if m is not None and not isinstance(m, FSDPModule)]
    if tail:
        fully_shard(tail, **{**kw, "reshard_after_forward": False})
        units += 1
    root_kw = {k: v for k, v in kw.items() if k != "reshard_after_forward"}
    fully_shard(pm, **root_kw)
    notes.append(
        f"FSDP2 {setup.fsdp if setup.fsdp != 'none' else 'full_shard'} over {mesh.size()} ranks (fake process group, rank 0 simulated): "
        f"{units} units ({', '.join(sorted(names)) or 'no _no_split_modules'} blocks, embedding, tail) + root, "
        f"reshard_after_forward={reshard_after_forward}, mixed precision {setup.compute_dtype if (setup.bf16 or setup.fp16) else 'none'}"
        + (", CPUOffloadPolicy" if offload else "")
    )
    return notes


def warm_up(pm) -> None:
    """One unshard + reshard of every FSDP unit before the measured step: FSDP2 builds its unsharded
    parameters and all-gather buffers on the first all-gather and re-allocates them in place after,
    so the measured step (the fake run's first forward) runs the steady-state path a real second step runs."""
    from torch.distributed.fsdp import FSDPModule

    for m in pm.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
            m.reshard()


class FsdpLedger:
    """What the storage counter needs to follow FSDP2 (see the module docstring); a context manager.

    host: move offloaded storages (sharded params, sharded grads, optimizer state and everything the
    optimizer step allocates) out of the device count into `host_current` / `host_peak`.
    """

    def __init__(self, tracker, *, host: bool = False):
        self.tracker = tracker
        self.host = host
        self.host_current = 0
        self.host_peak = 0
        self._host_ids: set[int] = set()
        self.host_by_kind: dict[str, int] = {}
        self._saved: list = []
        self._tag_override: str | None = None
        self.host_phase = False  # allocations now go to the host (CPU optimizer step under offload)

    # -- the counter's bookkeeping --------------------------------------------------------
    def _bump(self) -> None:
        tr = self.tracker
        seg = tr.segment
        if tr.current > tr.seg_peak.get(seg, -1):
            tr.seg_peak[seg] = tr.current
            tr._stale = seg

    def _swap(self, t, rec, nbytes: int, tag: str):
        """Replace a live record by a new one of `nbytes` (records are immutable: peak snapshots keep
        the old one with the size it had then); the storage's death frees the new one."""
        tr = self.tracker
        st = t.untyped_storage()
        key = id(st)
        new = type(rec)(nbytes, tag)
        tr.live[key] = new
        tr.current += nbytes - rec.nbytes
        weakref.finalize(st, tr._free, key, new)
        return new

    def resize(self, t, nbytes: int, tag: str | None = None) -> None:
        """A storage FSDP resized in place: the counter follows the new size (a re-allocation takes `tag`)."""
        tr = self.tracker
        rec = tr.rec_of(t)
        if rec is None:
            if nbytes:
                with self.tagged(tag or self._tag_override):
                    tr.add(t)
            return
        if id(rec) in self._host_ids:
            return
        if nbytes < rec.nbytes and tr._stale is not None:
            tr.take_snapshot(tr._stale)  # the peak was just before this free
        self._swap(t, rec, nbytes, (tag if nbytes else None) or rec.tag)
        self._bump()

    def to_host(self, t, kind: str = "other") -> None:
        """Count this storage in host RAM instead of the device."""
        tr = self.tracker
        t = _local(t)
        rec = tr.rec_of(t)
        if rec is None:
            tr.add(t)
            rec = tr.rec_of(t)
            if rec is None:
                return
        if id(rec) in self._host_ids:
            return
        if tr._stale is not None:
            tr.take_snapshot(tr._stale)
        n = rec.nbytes
        new = self._swap(t, rec, 0, rec.tag)
        self._host_ids.add(id(new))
        self.host_current += n
        self.host_by_kind[kind] = self.host_by_kind.get(kind, 0) + n
        self.host_peak = max(self.host_peak, self.host_current)
        weakref.finalize(t.untyped_storage(), self._host_free, n, kind)

    def _host_free(self, n: int, kind: str) -> None:
        self.host_current -= n
        self.host_by_kind[kind] = self.host_by_kind.get(kind, 0) - n

    @property
    def host_resident(self) -> int:
        return self.host_current

    # -- patches --------------------------------------------------------------------------
    def _tag(self, orig):
        def tag():
            return self._tag_override or orig()
        return tag

    @contextlib.contextmanager
    def tagged(self, tag: str):
        prev = self._tag_override
        self._tag_override = tag
        try:
            yield
        finally:
            self._tag_override = prev

    def __enter__(self):
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

        ledger = self
        tr = self.tracker
        orig_tag = tr.tag
        tr.tag = self._tag(orig_tag)
        self._saved.append((tr, "tag", None))

        def alloc_storage(tensor):
            size = tensor.numel() * tensor.itemsize
            st = tensor.untyped_storage()
            if st.size() != size:
                st.resize_(size)
                ledger.resize(tensor, size, TAG_ALL_GATHER)

        def free_storage(tensor):
            st = tensor.untyped_storage()
            if st.size() != 0:
                st.resize_(0)
                ledger.resize(tensor, 0)

        def wrap(fn, tag):
            def inner(*a, **k):
                with ledger.tagged(tag):
                    return fn(*a, **k)
            return inner

        patches = [
            (_fsdp_param, "alloc_storage", alloc_storage),
            (_fsdp_param, "free_storage", free_storage),
            (_fsdp_param_group, "alloc_storage", alloc_storage),
            (_fsdp_param_group, "foreach_all_gather", wrap(_fsdp_param_group.foreach_all_gather, TAG_ALL_GATHER)),
            (_fsdp_param_group, "foreach_all_gather_copy_out",
             wrap(_fsdp_param_group.foreach_all_gather_copy_out, TAG_ALL_GATHER)),
            (_fsdp_param_group, "foreach_reduce", wrap(_fsdp_param_group.foreach_reduce, TAG_REDUCE_SCATTER)),
        ]
        # DTensor's sharding propagation runs each new op once on fake arguments made in the active
        # fake mode (ours): metadata, not memory, so the counter must not see it
        from torch.distributed.tensor import _sharding_prop

        prop = _sharding_prop.ShardingPropagator
        orig_prop = prop._propagate_tensor_meta_non_cached

        def propagate(sp, *a, **k):
            nested = hasattr(tr, "_nested")
            if nested:
                tr._nested += 1
            try:
                return orig_prop(sp, *a, **k)
            finally:
                if nested:
                    tr._nested -= 1

        patches.append((prop, "_propagate_tensor_meta_non_cached", propagate))
        if self.host:
            orig_post = _fsdp_param_group.FSDPParamGroup.post_backward

            def post_backward(group, *a, **k):
                out = orig_post(group, *a, **k)
                for fp in group.fsdp_params:
                    g = fp.sharded_param.grad
                    if g is not None:
                        ledger.to_host(g, "gradients")
                return out

            patches.append((_fsdp_param_group.FSDPParamGroup, "post_backward", post_backward))
        for obj, name, new in patches:
            self._saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)
        return self

    def __exit__(self, *exc):
        for obj, name, old in reversed(self._saved):
            if name == "tag" and old is None:
                try:
                    del obj.tag
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)
        self._saved.clear()
        return False

    def params_to_host(self, model) -> None:
        """Under offload: the sharded parameters live in host RAM."""
        for p in model.parameters():
            self.to_host(p, "parameters")

    def optimizer_to_host(self, optimizer) -> None:
        import torch

        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    self.to_host(v, "optimizer_state")
