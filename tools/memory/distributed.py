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
import os
import weakref
from dataclasses import dataclass

from tools.memory.segments import SHARDED_CATEGORIES

_MESHES: dict[int, object] = {}

TAG_ALL_GATHER, TAG_REDUCE_SCATTER = SHARDED_CATEGORIES
# FSDP2's foreach_all_gather allocates its flat all_gather_input/output under
# `device_handle.stream(all_gather_copy_in_stream)` (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py):
# those blocks come from, and go back to, the copy-in stream's pool of the caching allocator, which the
# default stream never reuses; the replay (tools.memory.allocator.stream_of) reads the stream after '@'
TAG_ALL_GATHER_COPY_IN = TAG_ALL_GATHER + "@all_gather_copy_in"
# foreach_reduce allocates the reduce-scatter input (the padded unsharded gradients, copied in) on the
# current stream and only then enters `device_handle.stream(reduce_scatter_stream)` for the output (the
# sharded gradients) and what follows; plain TAG_REDUCE_SCATTER maps to the reduce-scatter stream
TAG_REDUCE_SCATTER_INPUT = TAG_REDUCE_SCATTER + "@default"
SHARDED_MIN_BLOCKS = 3  # a sharded step is simulated at >= 3 blocks (tools.memory.extrapolate.depths_to_simulate)
_INHERITED = object()
HOST_TAG = "host"  # a storage counted in host RAM (its device record has 0 bytes)


@dataclass(frozen=True)
class ShardPlan:
    """How one dry run shards the model: which engine is mirrored, over how many ranks."""

    engine: str  # "fsdp2", "zero" (DeepSpeed ZeRO, simulated through the partitioning it shares with FSDP2)
    world_size: int
    reshard_after_forward: bool
    offload: bool
    zero_stage: int = 0

    @property
    def label(self) -> str:
        if self.engine == "zero":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return f"{self.engine.upper()} {'full_shard' if self.reshard_after_forward else 'shard_grad_op'}"


def plan_for(setup) -> ShardPlan | None:
    """The sharding a setup's generated accelerate config applies, or None for one unsharded replica.

    FSDP (fsdp_version 2): full_shard = reshard_after_forward True, shard_grad_op = False. DeepSpeed
    ZeRO-3 partitions parameters, gradients and optimizer states like FSDP full_shard, ZeRO-2 keeps the
    gathered (16-bit) parameters through forward and backward like shard_grad_op, ZeRO-1 like ZeRO-2 but
    with full gradients (added by tools.estimator); DeepSpeed's own buckets are named components there.
    """
    if setup.fsdp != "none":
        if setup.num_gpus == 1 and setup.offload == "none":
            return None
        # FSDP1 (FullyShardedDataParallel) refuses to run without an accelerator device, so it cannot
        # run on this CPU build under the fake group: its memory is modelled by the FSDP2 step of the same
        # units (per-unit all-gather of the flat parameter, sharded fp32 state and gradients), labelled
        engine = "fsdp1" if setup.fsdp_version == 1 else "fsdp2"
        return ShardPlan(engine, setup.num_gpus, setup.fsdp == "full_shard", setup.offload != "none")
    if setup.zero_stage:
        if setup.num_gpus == 1 and setup.offload == "none":
            return None
        return ShardPlan("zero", setup.num_gpus, setup.zero_stage == 3, setup.offload != "none", setup.zero_stage)
    return None


def shard(prep, setup, mesh, plan: ShardPlan, ledger) -> list[str]:
    """Wrap the prepared model as the plan says, inside the tracking mode; re-collect the trainable parameters."""
    # DeepSpeed offloads parameters only with offload_param ('all'); FSDP's CPU offload always moves them
    offload_params = plan.offload and (plan.engine != "zero" or setup.offload == "all")
    if plan.engine == "fsdp1" and fsdp1_runs(setup) is None:
        return shard_fsdp1(prep, setup, plan)
    notes = shard_fsdp2(prep.pm, prep.base, setup, mesh, reshard_after_forward=plan.reshard_after_forward,
                        offload_params=offload_params, fsdp1_root=plan.engine == "fsdp1",
                        replicate_frozen=plan.engine == "zero" and plan.zero_stage < 3)
    if plan.engine == "fsdp1":
        notes[-1] = (f"FSDP1 (fsdp_version 1) modelled by the FSDP2 step of the same units ({fsdp1_runs(setup)}); " + notes[-1])
        if setup.gradient_checkpointing and setup.reentrant_checkpointing:
            n = fsdp1_reentrant_input_retention(prep.base, prep.is_peft and setup.method in ("lora", "qlora", "dora"))
            if n:
                notes.append(f"FSDP1 + reentrant checkpointing: {n} frozen block units keep their recomputed input and its "
                             "gradient until the end of backward (the reshard-only hook's AccumulateGrad holds the detached input)")
    if plan.engine == "zero" and plan.zero_stage < 3:
        # ZeRO-1/2 never partition the 16-bit parameters: the model's flat 16-bit groups stay whole on every
        # GPU through backward and the optimizer step (DeepSpeed stage_1_and_2.py `bit16_groups_flat`); the
        # FSDP2 units therefore keep their gathered parameters after backward too
        from torch.distributed.fsdp import FSDPModule

        for m in prep.pm.modules():
            if isinstance(m, FSDPModule):
                m.set_reshard_after_backward(False, recurse=False)
    if plan.engine == "zero":
        notes[-1] = (f"DeepSpeed ZeRO-{plan.zero_stage} simulated through the partitioning it shares with FSDP2 "
                     f"({'full shard' if plan.reshard_after_forward else 'the gathered 16-bit parameters kept through backward and the optimizer step'}): "
                     + notes[-1])
    if offload_params:
        ledger.params_to_host(prep.pm)
    elif plan.offload:  # ZeRO offload_optimizer: the fp32 master partitions live with the optimizer on the host
        for p in prep.pm.parameters():
            if p.requires_grad:
                ledger.to_host(p, "master_weights")
    warm_up(prep.pm)
    prep.params = [p for p in prep.pm.parameters() if p.requires_grad]
    prep.frozen_store = {id(_local(x).untyped_storage()) for x in list(prep.pm.parameters()) + list(prep.pm.buffers())
                         if not x.requires_grad}
    prep.sharded = True
    return notes


# the real FSDP1 (FullyShardedDataParallel) wraps the dry run's model where it runs under the fake group: opt-in
# (TUNEPILOT_FSDP1=real, read at import so spawned gloo ranks see it too). It equals real gloo FSDP1 steps byte for
# byte (tests/test_distributed.py), but the bench's FSDP1 rows are mostly Answer.AI's own loop (use_orig_params
# False, pure bf16), which the FSDP2-units model happens to fit better: on 80 sharded rows 3.4% / 13.9% (modelled)
# against 3.7% / 15.6% (real FSDP1), so the modelled step stays the default
FSDP1_REAL = os.environ.get("TUNEPILOT_FSDP1", "").strip().lower() == "real"


_FSDP1_FAILED: list[str] = []  # why the real FSDP1 is not used for the run in progress (tools.memory.step.run)


@contextlib.contextmanager
def fsdp1_modelled(reason: str):
    """Within: fsdp_version 1 runs on the FSDP2 units that model it, for `reason`."""
    _FSDP1_FAILED.append(reason)
    try:
        yield
    finally:
        _FSDP1_FAILED.pop()


def fsdp1_runs(setup) -> str | None:
    """None when the dry run wraps the model with the real FSDP1; otherwise why the FSDP2-units model stands in."""
    if _FSDP1_FAILED:
        return _FSDP1_FAILED[-1]
    if not FSDP1_REAL:
        return "the real FSDP1 is opt-in: TUNEPILOT_FSDP1=real"
    if setup.offload != "none":
        return "FSDP1's CPUOffload host accounting is not followed by the ledger yet"
    if setup.load_in_4bit and setup.bnb_4bit_quant_storage == "uint8":
        return "4-bit weights stored as uint8 cannot share a FlatParameter with float weights"
    if setup.load_in_8bit:
        return "8-bit weights cannot be flattened by FSDP1"
    if setup.gradient_checkpointing and setup.reentrant_checkpointing:
        return "transformers 4.40's reentrant checkpoint around the FSDP1 unit is emulated on the FSDP2 units"
    return None


def shard_fsdp1(prep, setup, plan) -> list[str]:
    """Wrap the prepared model with torch's FSDP1 as accelerate 1.x does for `fsdp_version: 1` (inside the
    tracking mode; under the fake group in the dry run, under gloo in the tests' real steps).

    TRANSFORMER_BASED_WRAP on the model's `_no_split_modules` blocks, or for a peft model the Trainer's
    peft `fsdp_auto_wrap_policy` (transformers `update_fsdp_plugin_peft`: every trainable leaf its own unit);
    FULL_SHARD / SHARD_GRAD_OP; `MixedPrecision(param_dtype=reduce_dtype=buffer_dtype)` of the compute dtype
    (a 4-bit model with a float quant_storage: that dtype, as `update_fsdp_plugin_peft` sets); use_orig_params,
    limit_all_gathers, BACKWARD_PRE, sync_module_states False; then accelerate's upcast of every trainable
    FlatParameter to fp32 under mixed precision."""
    import functools

    import torch
    from torch.distributed.fsdp import BackwardPrefetch, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    pm, base = prep.pm, prep.base
    names = set(getattr(base, "_no_split_modules", None) or [])
    if prep.is_peft:
        from peft.utils.other import fsdp_auto_wrap_policy

        policy, how = fsdp_auto_wrap_policy(pm), "peft's fsdp_auto_wrap_policy (adapters their own units)"
    else:
        classes = {type(m) for m in pm.modules() if type(m).__name__ in names}
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
        how = "TRANSFORMER_BASED_WRAP"
    mixed = setup.bf16 or setup.fp16
    mp = None
    if mixed:
        name = setup.bnb_4bit_quant_storage if setup.load_in_4bit else ("bf16" if setup.bf16 else "fp16")
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        # (a 4-bit model keeps its buffers' dtypes: the stand-ins' quantisation state is buffers, which
        # bitsandbytes keeps outside the module's buffers, so FSDP never casts it; the model's own buffers
        # are rotary frequencies of a few bytes)
        mp = MixedPrecision(param_dtype=dt, reduce_dtype=dt, buffer_dtype=None if setup.load_in_4bit else dt)
    strategy = ShardingStrategy.FULL_SHARD if plan.reshard_after_forward else ShardingStrategy.SHARD_GRAD_OP
    model = FSDP(pm, sharding_strategy=strategy, auto_wrap_policy=policy, mixed_precision=mp,
                 backward_prefetch=BackwardPrefetch.BACKWARD_PRE, use_orig_params=True, limit_all_gathers=True,
                 device_id=torch.device("cpu"), sync_module_states=False)
    units = len(FSDP.fsdp_modules(model))
    upcast = 0
    if mixed:  # accelerate's "FSDP upcast of low precision parameters to fp32" (FSDP1 path)
        for module in FSDP.fsdp_modules(model):
            if not module._has_params:
                continue
            fp = module._flat_param
            if fp.dtype != torch.float32 and fp.requires_grad:
                fp.data = fp.data.to(torch.float32)
                module._handle._orig_param_dtype = torch.float32
                upcast += 1
    # FSDP's lazy init (a run's first forward does it): the original parameters become views of the (upcast)
    # sharded FlatParameters before the optimizer makes its states
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    _lazy_init(model, model)
    if upcast:  # (a real first step re-points them in its first reshard)
        for module in FSDP.fsdp_modules(model):
            if module._has_params:
                module._handle._use_sharded_views()
    prep.pm = model
    prep.params = [p for p in model.parameters() if p.requires_grad]
    prep.frozen_store = {id(x.untyped_storage()) for x in list(model.parameters()) + list(model.buffers()) if not x.requires_grad}
    prep.sharded = True
    return [f"FSDP1 (FullyShardedDataParallel, the real one) {strategy.name} over {plan.world_size} ranks (fake process group, "
            f"rank 0 simulated): {units} units by {how} on {', '.join(sorted(names)) or 'no _no_split_modules'}, use_orig_params, "
            f"limit_all_gathers, BACKWARD_PRE, mixed precision {name if mixed else 'none'}"
            + (f", {upcast} trainable FlatParameters upcast to fp32 (as accelerate does)" if upcast else "")]


def _fsdp1_unit_frozen(block, peft_policy: bool) -> bool:
    """FSDP1 gives a block one FlatParameter. With peft's `fsdp_auto_wrap_policy` (transformers' Trainer sets it
    for a peft LoRA model: `_fsdp_qlora_plugin_updates`) every leaf module with a trainable weight (lora_A,
    lora_B, ...) is a unit of its own, so the block's FlatParameter is frozen when nothing else in it trains;
    otherwise (the transformer-layer policy alone) when nothing in the block trains."""
    for m in block.modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        own_unit = peft_policy and not list(m.children()) and getattr(m, "weight", None) is not None and m.weight.requires_grad
        if not own_unit:
            return False
    return True


# what the emulation below keeps (the tests switch it off to show the real FSDP1 step holds these bytes)
FSDP1_KEEPS_RECOMPUTED_INPUTS = True


def fsdp1_reentrant_input_retention(base, peft_policy: bool) -> int:
    """FSDP1 + reentrant activation checkpointing: what a frozen unit's recomputed forward leaves alive.

    FSDP1 reshards a FlatParameter that does not require grad from a multi-grad hook on the unit's input
    tensors (torch/distributed/fsdp/_runtime_utils.py `_register_post_backward_reshard_only_hook`, torch
    2.2 to today). In the recompute of reentrant checkpointing those inputs are the detached leaves
    CheckpointFunction.backward makes, and `register_multi_grad_hook` holds each one's AccumulateGrad node
    (`_get_grad_fn_or_grad_acc`), which holds the leaf variable, whose `.grad` is the block's input gradient.
    The hook handle lives in `flat_param._post_backward_hook_state` until `_finalize_params` at the end of
    backward: every frozen block keeps its recomputed input (the checkpointed hidden state's storage) and
    that gradient until backward ends, where they would be freed after its own backward. A real FSDP1 step
    on this CPU (gloo, transformers 4.40 + peft 0.10) holds exactly these tensors (tests/test_distributed.py).

    Emulated on the dry run's units: the function each frozen block hands to its checkpoint is wrapped to keep
    the tensors requiring grad it is called with inside backward (the recompute; transformers 5 checkpoints
    `forward`, so module hooks do not see the recompute), and an end-of-backward callback (FSDP1 queues its
    own) drops them. Returns the number of blocks wrapped."""
    import torch
    from torch.utils import _pytree as pytree

    from tools.memory.build import blocks

    kept: list = []
    queued = [False]

    def release():
        kept.clear()
        queued[0] = False

    def keep(args, kwargs):
        if not FSDP1_KEEPS_RECOMPUTED_INPUTS:
            return
        inputs = [t for t in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not inputs:
            return
        kept.extend(inputs)
        if not queued[0]:
            torch.autograd.Variable._execution_engine.queue_callback(release)
            queued[0] = True

    n = 0
    for blk in blocks(base):
        ckpt = getattr(blk, "_gradient_checkpointing_func", None)
        if ckpt is None:
            continue
        # no block unit is ever prefetched in backward: FSDP1 prefetches a handle only when its
        # `_needs_pre_backward_unshard` is set, which only a forward with grad (here the unit's own recompute)
        # sets (`_runtime_utils._get_handle_to_prefetch`); FSDP2's implicit prefetch of it is skipped (FsdpLedger)
        state = blk._get_fsdp_state() if hasattr(blk, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            group.tunepilot_no_backward_prefetch = True
        if not _fsdp1_unit_frozen(blk, peft_policy):
            continue

        def wrapped(fn, *args, _ckpt=ckpt, **kwargs):
            def recomputed(*a, **k):
                if torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
                    keep(a, k)
                return fn(*a, **k)

            return _ckpt(recomputed, *args, **kwargs)

        blk._gradient_checkpointing_func = wrapped
        n += 1
    return n


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


def shard_fsdp2(pm, base, setup, mesh, *, reshard_after_forward: bool | None = None, offload_params: bool | None = None,
                fsdp1_root: bool = False, replicate_frozen: bool = False) -> list[str]:
    """Wrap `pm` (the model the Trainer trains: peft model or base) with FSDP2 as accelerate does; notes.

    fsdp1_root: the units of FSDP1's TRANSFORMER_BASED_WRAP instead — what no block unit holds (input
    embedding, final norm, head) is the root's one FlatParameter, and FSDP1 does not free the root's
    gathered parameters after forward (torch/distributed/fsdp/_runtime_utils.py `_post_forward_reshard`:
    `not state._is_root`): one tail unit [embedding, norm, head] with reshard_after_forward=False.
    replicate_frozen: frozen parameters stay whole on every rank, unsharded (DeepSpeed ZeRO-1/2 partition
    only what the optimizer steps: stage_1_and_2.py flattens the optimizer's parameter groups)."""
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
    offload = setup.offload != "none" if offload_params is None else offload_params
    kw = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mixed_precision_policy(setup),
        "offload_policy": CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy(),
    }
    if setup.load_in_4bit:
        # accelerate excludes frozen non-float 4-bit weights (bnb_4bit_quant_storage uint8) from sharding:
        # they stay whole on every GPU; a float quant_storage lets FSDP shard them (FSDP-QLoRA)
        from tools.memory.quant import Fake4bitLinear

        ignored = {m.weight for m in pm.modules() if isinstance(m, Fake4bitLinear) and not m.weight.is_floating_point()}
        if ignored:
            kw["ignored_params"] = ignored
            notes.append(f"{len(ignored)} 4-bit weights stored as uint8 are not sharded (accelerate excludes them; "
                         "set bnb_4bit_quant_storage to the compute dtype to shard them)")
    if replicate_frozen:
        frozen = {p for p in pm.parameters() if not p.requires_grad}
        if frozen:
            kw["ignored_params"] = set(kw.get("ignored_params", ())) | frozen
            notes.append(f"{len(frozen)} frozen parameters kept whole on every GPU (ZeRO-1/2 partition only the trained ones)")
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
    if not tied and not fsdp1_root and emb is not None and not isinstance(emb, FSDPModule):
        fully_shard(emb, **kw)
        units += 1
    norm = _final_norm(base)
    tail = [m for m in ((norm, emb, head) if tied or fsdp1_root else (norm, head))
            if m is not None and not isinstance(m, FSDPModule)]
    tail = list({id(m): m for m in tail}.values())
    if tail:
        fully_shard(tail, **{**kw, "reshard_after_forward": False})
        units += 1
    root_kw = {k: v for k, v in kw.items() if k != "reshard_after_forward"}
    fully_shard(pm, **root_kw)
    notes.append(
        f"FSDP2 {setup.fsdp if setup.fsdp != 'none' else 'full_shard'} over {mesh.size()} ranks (fake process group, rank 0 simulated): "
        f"{units} units ({', '.join(sorted(names)) or 'no _no_split_modules'} blocks, "
        + ("FSDP1's root parameters [embedding, norm, head] kept gathered from forward to backward) + root, " if fsdp1_root
           else "embedding, tail) + root, ")
        + 
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
        self.host_by_kind: dict[str, int] = {}
        self.host_peak_by_kind: dict[str, int] = {}
        self._host_cells: dict[int, list] = {}  # storage key -> [kind, bytes] of a storage counted on the host
        self._saved: list = []
        self._tag_override: str | None = None

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
        if rec.tag == HOST_TAG:
            return
        if nbytes < rec.nbytes and tr._stale is not None:
            tr.take_snapshot(tr._stale)  # the peak was just before this free
        self._swap(t, rec, nbytes, (tag if nbytes else None) or rec.tag)
        self._bump()

    def to_host(self, t, kind: str = "other") -> None:
        """Count this storage in host RAM instead of the device, under `kind` (tools.memory.host's parts).

        A storage already on the host is re-labelled (the optimizer states are made during the host's
        optimizer step, and named once the step is over)."""
        tr = self.tracker
        t = _local(t)
        rec = tr.rec_of(t)
        if rec is None:
            tr.add(t)
            rec = tr.rec_of(t)
            if rec is None:
                return
        st = t.untyped_storage()
        if rec.tag == HOST_TAG:
            cell = self._host_cells.get(id(st))
            if cell is not None and cell[0] != kind and kind != "optimizer_step_temporaries":
                self._count(cell[0], -cell[1])
                cell[0] = kind
                self._count(kind, cell[1])
            return
        if tr._stale is not None:
            tr.take_snapshot(tr._stale)
        n = rec.nbytes
        self._swap(t, rec, 0, HOST_TAG)
        cell = [kind, n]
        self._host_cells[id(st)] = cell
        self.host_current += n
        self._count(kind, n)
        self.host_peak = max(self.host_peak, self.host_current)
        weakref.finalize(st, self._host_free, id(st), cell)

    def _count(self, kind: str, n: int) -> None:
        self.host_by_kind[kind] = self.host_by_kind.get(kind, 0) + n
        self.host_peak_by_kind[kind] = max(self.host_peak_by_kind.get(kind, 0), self.host_by_kind[kind])

    def _host_free(self, key: int, cell: list) -> None:
        self.host_current -= cell[1]
        self._count(cell[0], -cell[1])
        if self._host_cells.get(key) is cell:
            del self._host_cells[key]

    def offloaded(self) -> dict[str, int]:
        """Per rank in host RAM, by part: what stays resident, and the peak of the optimizer step's temporaries."""
        out = {k: v for k, v in self.host_by_kind.items() if k != "optimizer_step_temporaries"}
        out["optimizer_step_temporaries"] = self.host_peak_by_kind.get("optimizer_step_temporaries", 0)
        return out

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
            (_fsdp_param_group, "foreach_all_gather",
             wrap(_fsdp_param_group.foreach_all_gather, TAG_ALL_GATHER_COPY_IN)),
            (_fsdp_param_group, "foreach_all_gather_copy_out",
             wrap(_fsdp_param_group.foreach_all_gather_copy_out, TAG_ALL_GATHER)),
            (_fsdp_param_group, "foreach_reduce", wrap(_fsdp_param_group.foreach_reduce, TAG_REDUCE_SCATTER_INPUT)),
        ]
        # FSDP1 (FlatParameter): the padded unsharded flat parameter (`_full_param_padded`) is allocated and
        # freed by resizing its storage (torch.distributed.utils._alloc_storage / _free_storage); the all-gather
        # (FlatParamHandle.unshard) and the reduce-scatter (_runtime_utils._reduce_grad: padded unsharded
        # gradient, its chunks, the sharded output) are tagged like FSDP2's
        from torch.distributed.fsdp import _flat_param, _runtime_utils

        alloc1, free1 = _flat_param._alloc_storage, _flat_param._free_storage

        def alloc_storage1(tensor, size):
            alloc1(tensor, size)
            ledger.resize(tensor, tensor.untyped_storage().nbytes(), ledger._tag_override or TAG_ALL_GATHER)

        def free_storage1(tensor):
            free1(tensor)
            ledger.resize(tensor, 0)

        # FSDP1 tells sharded from unsharded by data pointers (`_same_storage`, `_data_ptr_allocated`, the
        # already-resharded check of `_runtime_utils._catch_all_reshard`); fake tensors have none (all 0, so every
        # check would say "same" / "not allocated"): inside the step they compare storages instead (a fake tensor's
        # data_ptr is its storage's address plus its offset, 0 once its storage is resized to 0)
        from torch._subclasses.fake_tensor import FakeTensor

        same0, allocated0 = _flat_param._same_storage, _flat_param._data_ptr_allocated

        def _fake(t):
            return isinstance(getattr(t, "_local_tensor", t), FakeTensor)

        def same_storage(a, b):
            if not (_fake(a) or _fake(b)):
                return same0(a, b)
            a, b = _local(a), _local(b)
            return a.untyped_storage()._cdata == b.untyped_storage()._cdata

        def data_ptr_allocated(t):
            return t.untyped_storage().nbytes() > 0 if _fake(t) else allocated0(t)

        def fake_data_ptr(t):
            st = t.untyped_storage()
            return st._cdata + t.storage_offset() * t.itemsize if st.nbytes() else 0

        patches += [
            (_flat_param, "_same_storage", same_storage),
            (_flat_param, "_data_ptr_allocated", data_ptr_allocated),
            (FakeTensor, "data_ptr", fake_data_ptr),
            (_flat_param, "_alloc_storage", alloc_storage1),
            (_flat_param, "_free_storage", free_storage1),
            # on a GPU the low-precision shard is made on FSDP1's pre-unshard stream and the padded unsharded flat
            # parameter on its unshard stream (_runtime_utils._unshard): each its own pool in the allocator replay
            (_flat_param.FlatParamHandle, "pre_unshard", wrap(_flat_param.FlatParamHandle.pre_unshard, TAG_ALL_GATHER + "@pre_unshard")),
            (_flat_param.FlatParamHandle, "unshard", wrap(_flat_param.FlatParamHandle.unshard, TAG_ALL_GATHER + "@unshard")),
            (_runtime_utils, "_reduce_grad", wrap(_runtime_utils._reduce_grad, TAG_REDUCE_SCATTER)),
        ]
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives

        orig_copy_in = _fsdp_collectives.foreach_reduce_scatter_copy_in

        def reduce_scatter_copy_in(*a, **k):
            # the input is allocated (current stream) and filled; the rest of foreach_reduce runs in the
            # reduce-scatter stream
            out = orig_copy_in(*a, **k)
            ledger._tag_override = TAG_REDUCE_SCATTER
            return out

        patches.append((_fsdp_collectives, "foreach_reduce_scatter_copy_in", reduce_scatter_copy_in))
        # FSDP1 + reentrant checkpointing never prefetches a frozen unit in backward (fsdp1_reentrant_input_retention)
        orig_prefetch = _fsdp_param_group.FSDPParamGroup._prefetch_unshard

        def prefetch_unshard(target, pass_type):
            if pass_type == "backward" and getattr(target, "tunepilot_no_backward_prefetch", False):
                return None
            return orig_prefetch(target, pass_type)

        patches.append((_fsdp_param_group.FSDPParamGroup, "_prefetch_unshard", staticmethod(prefetch_unshard)))
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
            # the offloaded optimizer step (clipping included) runs on the host: what it allocates is host RAM
            orig_add = tr.add

            def add(t):
                orig_add(t)
                if tr.phase == "optimizer":
                    ledger.to_host(t, "optimizer_step_temporaries")

            tr.add = add
            self._saved.append((tr, "add", None))
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
            # a class attribute is saved as stored (a staticmethod stays one when put back)
            if isinstance(obj, type):
                old = obj.__dict__.get(name, _INHERITED)  # an inherited method is deleted again on exit
            else:
                old = getattr(obj, name)
            self._saved.append((obj, name, old))
            setattr(obj, name, new)
        return self

    def __exit__(self, *exc):
        for obj, name, old in reversed(self._saved):
            if name in ("tag", "add") and old is None:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            elif old is _INHERITED:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._saved.clear()
        return False

    def params_to_host(self, model) -> None:
        """Under offload: the sharded parameters live in host RAM."""
        for p in model.parameters():
            # trainable parameters under FSDP mixed precision are the fp32 master copy
            self.to_host(p, "master_weights" if p.requires_grad else "offloaded_params")

    def optimizer_to_host(self, optimizer) -> None:
        import torch

        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    self.to_host(v, "optimizer_states")
        # the measured step starts now: the peaks of the host parts restart from what is resident
        self.host_peak_by_kind = dict(self.host_by_kind)
        self.host_peak = self.host_current


# --------------------------------------------------------------------------------------
# DeepSpeed's own buffers (what ds_config.json resolves to), added by tools.estimator
# --------------------------------------------------------------------------------------


def zero_bucket_sizes(setup, hidden_size: int) -> tuple[float, float]:
    """(reduce_bucket_size, stage3_prefetch_bucket_size) in elements: the setup's values, or what
    transformers fills in for "auto" (hidden^2, 0.9 hidden^2; integrations/deepspeed.py)."""
    h2 = float(hidden_size) ** 2
    return (float(setup.zero_reduce_bucket_size or h2), float(setup.zero_prefetch_bucket_size or 0.9 * h2))


def deepspeed_buffers(setup, hidden_size: int, trainable: int, *, comm_factor: float = 4.5,
                      prefetch_in_gathered: bool = False) -> dict[str, float]:
    """Bytes per GPU of DeepSpeed's buffers beyond the partitioning the sharded dry run simulates.

    From the values tunepilot's ds_config.json resolves (the setup's zero_reduce_bucket_size /
    zero_prefetch_bucket_size, written into it as numbers, or "auto", which transformers fills from the
    model's hidden size h): reduce_bucket_size = h^2, stage3_prefetch_bucket_size = 0.9 h^2,
    stage3_param_persistence_threshold = 10 h, allgather_bucket_size = 5e8, stage3_max_live_parameters
    = 1e9, overlap_comm and contiguous_gradients on.

    - zero_buckets: ZeRO-1/2 gradient reduction with overlap_comm = comm_factor (4.5, DeepSpeed's
      docs) x reduce_bucket_size elements in the 16-bit dtype; ZeRO-3: two reduce buckets
      (double-buffered with overlap_comm) + the parameter prefetch bucket, 16-bit (without it when
      `prefetch_in_gathered`: tools.memory.zero3 then counts the prefetched parameters among the gathered
      ones, `zero_gathered_params`). The all-gather of
      updated partitions (allgather_bucket_size) writes into the full 16-bit parameter buffer: no
      memory of its own.
    - zero_param_partition: ZeRO-3 under mixed precision keeps a 16-bit partition of every trainable
      parameter beside the fp32 master partition (the simulated fp32 shards): 2 B x trainable / N.
    - zero1_full_gradients: ZeRO-1 does not partition gradients: the full 16-bit gradients stay on
      every GPU (the simulated fp32 gradient shards stand for the fp32 partition the optimizer steps).
    (ZeRO-2/3's gradient partition: `deepspeed_gradients`, per segment of the step.)
    """
    n = max(1, setup.num_gpus)
    mixed = setup.bf16 or setup.fp16
    half = 2 if (mixed or setup.dtype != "fp32") else 4
    reduce_bucket, prefetch_bucket = zero_bucket_sizes(setup, hidden_size)
    out: dict[str, float] = {}
    if setup.zero_stage in (1, 2):
        out["zero_buckets"] = comm_factor * reduce_bucket * half
    elif setup.zero_stage == 3:
        out["zero_buckets"] = (2 * reduce_bucket + (0 if prefetch_in_gathered else prefetch_bucket)) * half
        if mixed:
            out["zero_param_partition"] = 2.0 * trainable / n
    if setup.zero_stage == 1:
        out["zero1_full_gradients"] = float(half) * trainable
    return out


def deepspeed_gradients(setup, segment: str, breakdown: dict[str, int], trainable: int) -> dict[str, int]:
    """One segment of the dry run's step with DeepSpeed's gradients instead of FSDP2's.

    The FSDP2 step keeps sharded fp32 gradients from backward through the optimizer step. DeepSpeed
    ZeRO reduces gradients into a 16-bit partition (ZeRO-2: stage_1_and_2.py `grads_in_partition`;
    ZeRO-3: stage3.py `grad_partitions_flat_buffer`, allocated once and kept) and makes an fp32
    gradient only inside the optimizer step, from a flattened copy (`self.flatten(averaged_gradients)
    .to(fp32)`): ZeRO-1/2 for each parameter group (the whole partition: the Trainer's no-decay group is
    the small one), ZeRO-3 for one sub-group of `sub_group_size` elements at a time
    (`_prepare_fp32_grad_for_sub_group`, released after that sub-group's step; setup.zero_sub_group_size,
    written into ds_config.json). So: `gradients`
    (fp32) are 0 outside the optimizer segment and at most one sub-group in it; `zero_grad_partition`
    is the 16-bit partition, in every segment (ZeRO-2/3; ZeRO-1 keeps full 16-bit gradients, counted
    as `zero1_full_gradients`). Under CPU offload the gradients go to pinned host buffers and the step
    runs on the host: unchanged.
    """
    if not setup.zero_stage or setup.offload != "none":
        return breakdown
    out = dict(breakdown)
    per_rank = trainable / max(1, setup.num_gpus)
    grads = out.get("gradients", 0)
    if segment != "optimizer":
        out["gradients"] = 0
    elif setup.zero_stage == 3 and per_rank > setup.zero_sub_group_size:
        out["gradients"] = round(grads * setup.zero_sub_group_size / per_rank)
    if setup.zero_stage >= 2:
        half = 2 if (setup.bf16 or setup.fp16 or setup.dtype != "fp32") else 4
        out["zero_grad_partition"] = round(half * per_rank)
    return out
