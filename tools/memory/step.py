"""One simulated training step at one depth: `run(model, setup, depth) -> RunResult`.

The step is a sequence of small functions, so that a variant can replace one part:

1. `build` — the real transformers model on meta, the peft wrap, the output head (`tools.memory.build`);
2. `prepare` — inside the tracking fake mode: materialise, re-tie, MoE routing, the bitsandbytes
   stand-ins (`quantize`), train mode; the trainable parameters and counts (`count_parameters`);
   the tracker's segment boundaries (`instrument`). A distributed wrapper goes between `prepare`
   and `make_step_optimizer`;
3. `make_step_optimizer` — the optimizer the Trainer builds (`make_optimizer`), its real bnb
   quantile maps made fake once;
4. `state_step` — step 1 only creates the optimizer state (zero gradients + one optimizer.step(),
   which allocates exactly what a first real step leaves behind);
5. `train_step` — step 2, the steady state: `forward_loss` (forward and loss: the one part a
   loss-path or objective variant replaces), backward, fp16 unscale, clipping, optimizer step;
6. `measure` — the live storages at each segment's peak, split into categories;
7. `eval_step` — when setup.eval_strategy != 'no': one no-grad forward, its own peak.

Categories of the live storages at a peak (identity — params, grads, optimizer states — wins over
the phase an allocation happened in):

- weights / adapters: storages of frozen parameters and buffers (incl. 4-bit packed weights and
  their absmax/constants) / of trainable peft parameters (in full fine-tuning, trainable
  parameters are "weights");
- gradients: storages that are some parameter's `.grad` at the end of the step;
- optimizer_state: tensors in `optimizer.state`;
- activations: anything else produced during the forward (saved for backward) or during the
  gradient-checkpointing recompute inside backward;
- logits_loss: what the output head and the loss produce in forward (logits, fp32 upcast,
  log-softmax) and the loss backward produces before the gradient reaches the logits;
- temporaries: everything else (backward and optimizer transients, e.g. foreach AdamW buffers).

CUDA behaviour rather than CPU's, where they differ: `adamw_torch` runs torch AdamW with
foreach=True (the CUDA default), `adamw_torch_fused` with fused=True; params are grouped as
HF Trainer does (decay / no-decay). Mixed precision runs under `torch.autocast("cpu", dtype)`
(the HF Trainer uses CUDA autocast; the two op lists differ in a few fp32 ops). CPU SDPA
dispatches to a flash kernel (no s^2 matrix), so `flash_attention_2` is simulated as `sdpa`;
dropout runs CUDA's fused kernel (bool mask) instead of CPU's composite (mask in the input dtype);
`eager` materialises the s^2 scores. QLoRA uses `tools.memory.quant.Fake4bitLinear`, which calls
bitsandbytes' own `matmul_4bit` (transient dequantised weight in forward and backward); 8-bit
(LLM.int8) bases use `Fake8bitLinear` and `bnb.matmul`; trl's SFTTrainer casts the adapters of
a quantized model to bf16, and so does the simulator. bitsandbytes 8-bit/32-bit/
paged optimizers are the real ones (built outside fake mode, stepped inside); paged state is
counted as resident. MoE experts run transformers' default grouped_mm path, whose shapes do not
depend on the routing; an eager experts loop (data dependent) is replaced by one with a
perfectly balanced load. transformers keeps the [b,1,s,s] causal mask on fake tensors ("tracing")
where it skips it on real ones; the simulator restores the real-tensor decision (full-length rows,
one sequence per row, no padding: the trial run's worst case).

torch and transformers are imported inside the functions (no torch at import).
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

from tools.memory import SimulationError
from tools.memory.build import TORCH_DTYPES, blocks, build_model, head_module, materialise, retie, wrap_peft
from tools.memory.segments import SHARDED_CATEGORIES, TRAIN_SEGMENTS
from tools.schemas import STEP_CATEGORIES, ModelSpec, TrainingSetup

_FP16_LOSS_SCALE = 65536.0  # torch.amp.GradScaler's initial scale
_BNB_OPTIMS = {
    # name: (bnb class name, optim_bits, is_paged)
    "adamw_bnb_8bit": ("AdamW", 8, False),
    "adamw_8bit": ("AdamW", 8, False),
    "paged_adamw_8bit": ("AdamW", 8, True),
    "paged_adamw_32bit": ("AdamW", 32, True),
    "lion_8bit": ("Lion", 8, False),
    "lion_32bit": ("Lion", 32, False),
    "paged_lion_8bit": ("Lion", 8, True),
    "paged_lion_32bit": ("Lion", 32, True),
}


# The op trace of step 2 (its time: tools.memory.timing); TUNEPILOT_SIM_TIMING=0 switches it off.
_TRACE_OPS = os.environ.get("TUNEPILOT_SIM_TIMING", "1") != "0"


@dataclass
class RunResult:
    """What one dry run at one depth measured (combined over depths by tools.memory.extrapolate)."""

    segments: dict[str, dict[str, int]]  # segment of the step -> breakdown at that segment's peak
    num_parameters: int
    trainable_parameters: int
    weights_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    eval_peak_bytes: int | None
    largest_layer_param_bytes: int
    notes: list[str] = field(default_factory=list)
    op_counts: dict | None = None  # tools.memory.timing cost record of each op of the traced step -> count
    allocator: dict | None = None  # the caching-allocator replay of this run's allocation order (allocator.summary)
    world_size: int = 1  # >1: the bytes are one rank's of a sharded step (tools.memory.distributed)
    rank: int | None = None
    offloaded_bytes: dict[str, int] = field(default_factory=dict)  # per rank, in host RAM (CPU offload)
    host_peak_bytes: int = 0  # activation offloading: peak of the host copies
    host_traffic_bytes: int = 0  # activation offloading: bytes copied to the host in the measured step


@dataclass
class Prepared:
    """The model of one dry run on its way to being stepped (filled by build, then prepare)."""

    pm: Any  # what the Trainer steps: the peft model, or the transformers model in full fine-tuning
    base: Any  # the transformers model (under the peft wrapper)
    head: Any  # the output head (peft's trained copy when the head is in modules_to_save), or None
    is_peft: bool
    vocab: int
    notes: list[str] = field(default_factory=list)
    params: list = field(default_factory=list)  # the trainable parameters, in module order
    frozen_store: set[int] = field(default_factory=set)  # ids of the storages of frozen params/buffers
    num_parameters: int = 0
    trainable_parameters: int = 0
    largest_layer_param_bytes: int = 0
    sharded: bool = False  # wrapped by tools.memory.distributed (FSDP/ZeRO over a fake process group)


@dataclass
class ForwardOutput:
    """What `forward_loss` returns: the loss, the logits (None if the model returns none), and the
    model output itself, kept until the backward starts (it holds both, and e.g. a seq2seq encoder state)."""

    loss: Any
    logits: Any
    output: Any = None


# --------------------------------------------------------------------------------------
# One simulated run at one depth
# --------------------------------------------------------------------------------------


def run(model: ModelSpec, setup: TrainingSetup, depth: int, *, forward: Callable[..., ForwardOutput] | None = None,
        cuda_loss: bool = True) -> RunResult:
    """Build `model` with `depth` blocks for `setup`, run two training steps (and eval) on fake tensors, measure.

    `forward` replaces the loss path's forward (`tools.memory.loss.forward_for(setup)`, same signature
    as `forward_loss`) for an objective variant. `cuda_loss=False` runs trl's fused head on its CPU
    path instead of its CUDA one (tests compare both with real CPU steps).
    Preference and RL objectives (dpo, kto, reward, grpo) run `tools.memory.objectives.run`.

    fsdp_version 1: the real FSDP1 wraps the model (tools.memory.distributed.shard_fsdp1); should it fail
    under fake tensors, the step runs again on the FSDP2 units that model it, and the notes say why.
    """
    from tools.memory import distributed

    plan = distributed.plan_for(setup)
    if plan is None or plan.engine != "fsdp1" or distributed.fsdp1_runs(setup) is not None or setup.objective != "sft":
        return _run_step(model, setup, depth, forward=forward, cuda_loss=cuda_loss)
    try:
        return _run_step(model, setup, depth, forward=forward, cuda_loss=cuda_loss)
    except Exception as e:  # noqa: BLE001 - any failure of FSDP1 under fake tensors: the FSDP2-units model
        from tools.schemas import TunepilotError

        if isinstance(e, TunepilotError):
            raise
        with distributed.fsdp1_modelled(f"the real FSDP1 failed under fake tensors: {type(e).__name__}: {str(e)[:160]}"):
            return _run_step(model, setup, depth, forward=forward, cuda_loss=cuda_loss)


def _run_step(model: ModelSpec, setup: TrainingSetup, depth: int, *, forward: Callable[..., ForwardOutput] | None = None,
         cuda_loss: bool = True) -> RunResult:
    if setup.objective != "sft" and forward is None:
        from tools.memory import objectives

        return objectives.run(model, setup, depth, cuda_path=cuda_loss)
    import torch

    from tools.memory import loss as loss_paths
    from tools.memory.tracker import make_tracker

    from tools.memory import distributed

    plan = distributed.plan_for(setup)  # None: one unsharded replica
    mesh = distributed.fake_mesh(plan.world_size) if plan else None  # (built outside the fake mode)
    prep = build(model, setup, depth)
    compute = getattr(torch, TORCH_DTYPES[setup.compute_dtype])
    # accelerate gives DeepSpeed no native AMP (Accelerator: native_amp only when distributed_type is not
    # DEEPSPEED): its engine trains the 16-bit module itself, so no autocast there (the 16-bit weights are
    # the sharded step's mixed-precision policy)
    autocast = (setup.bf16 or setup.fp16) and not setup.zero_stage
    tracker = make_tracker()  # the FakeTensorMode, counting storages
    trace = None
    if _TRACE_OPS:
        from tools.memory.timing import OpTrace

        # the cost of every op of step 2 (tools.memory.timing); torch.compile fuses pointwise chains
        trace = tracker.op_observer = OpTrace(fuse=bool(getattr(setup, "torch_compile", False)))
    ledger = distributed.FsdpLedger(tracker, host=plan.offload) if plan else None
    # flash-attention runs packed rows as variable-length sequences (no mask); sdpa/eager get the block mask
    packed_mask = setup.padding_free and setup.attn_implementation != "flash_attention_2"
    with TrainingMaskPolicy(packed_mask), CudaLikeDropout(), CudaGroupedMm(), tracker, ledger or nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(prep, setup, tracker)
        if plan:
            prep.notes.extend(distributed.shard(prep, setup, mesh, plan, ledger))
        liger_layers = loss_paths.prepare_liger_layers(prep.pm, setup)
        optimizer = make_step_optimizer(prep, setup, tracker)
        amp = torch.autocast("cpu", dtype=compute) if autocast else nullcontext()
        # the allocation order from here on, replayed through the caching-allocator model: the prepared
        # (and sharded) model's storages open it; how the dry run built them is not how a run loads them
        events = tracker.log_events()
        state_step(prep, optimizer, setup, tracker,
                   before_reset=(lambda: ledger.optimizer_to_host(optimizer)) if plan and plan.offload else None)
        if trace is not None:
            trace.active = True
        # the loss path (and Liger's RoPE, trl's activation offloading) stays patched through forward AND backward
        with loss_paths.step_context(prep.pm, setup, cuda=cuda_loss):
            # kept referenced until the run ends, as the single-function run kept them (fp16 only; see train_step)
            leftovers = train_step(prep, optimizer, setup, tracker, amp,  # noqa: F841
                                   forward=forward or loss_paths.forward_for(setup))
        if trace is not None:
            trace.active = False
        host_peak, host_traffic = tracker.host_peak, tracker.host_total
        measured = measure(prep, optimizer, tracker)
        eval_peak = eval_step(prep, optimizer, setup, tracker, amp) if setup.eval_strategy != "no" else None
    prep.notes.extend(_kernel_notes(setup))
    if setup.task == "causal-lm":
        prep.notes.append(loss_paths.LOSS_NOTES[setup.loss_impl] + ("" if cuda_loss or setup.loss_impl != "trl_fused" else " (CPU path)"))
    if liger_layers:
        prep.notes.append(f"Liger kernels (stand-ins): {', '.join(liger_layers)}, RoPE")
    if setup.activation_offloading:
        prep.notes.append("activation offloading: trl's own hooks (streams, 5-tensor forward stash, LM head kept) on this CPU; "
                          "host copies counted as host RAM, not GPU memory")
    from tools.memory.allocator import summary

    extra = {}
    if plan:
        extra = {"world_size": plan.world_size, "rank": 0, "offloaded_bytes": ledger.offloaded() if plan.offload else {}}
    return RunResult(
        **measured, num_parameters=prep.num_parameters, trainable_parameters=prep.trainable_parameters,
        eval_peak_bytes=eval_peak, largest_layer_param_bytes=prep.largest_layer_param_bytes, notes=prep.notes,
        op_counts=None if trace is None else trace.result(),
        allocator=summary(events),
        **extra,
        host_peak_bytes=host_peak, host_traffic_bytes=host_traffic,
    )


def build(model: ModelSpec, setup: TrainingSetup, depth: int) -> Prepared:
    """The real model with `depth` blocks and its peft wrapper, on meta (outside the fake mode)."""
    m = build_model(model, setup, depth)
    pm = wrap_peft(m, setup)
    head = head_module(m)
    if head is not None and hasattr(head, "modules_to_save"):
        head = head.modules_to_save["default"] if "default" in head.modules_to_save else head
    if setup.method == "full":
        for p in pm.parameters():
            p.requires_grad_(True)
    vocab = int(getattr(m.config, "vocab_size", 0) or model.vocab_size)
    return Prepared(pm=pm, base=m, head=head, is_peft=pm is not m, vocab=vocab)


def prepare(prep: Prepared, setup: TrainingSetup, tracker) -> None:
    """Inside the tracking mode: fake storages, quantization, train mode, counts and segment hooks."""
    pm, base = prep.pm, prep.base
    materialise(pm, tracker)
    # to_empty converts each module's parameters separately, so a tied output head (embeddings
    # shared with lm_head) comes back as two tensors: re-tie exactly as from_pretrained does
    retie(base)
    if patch_moe(base):
        prep.notes.append("MoE experts routed with a perfectly balanced load (tokens*top_k/num_experts per expert), eager experts loop")
    elif getattr(base.config, "_experts_implementation", None) not in (None, "eager") and any(
            getattr(getattr(x, "gate_up_proj", None), "ndim", 0) == 3 for x in base.modules()):
        prep.notes.append(f"MoE experts run transformers' {base.config._experts_implementation} path (its memory does not depend on the routing)")
    if setup.load_in_4bit or setup.load_in_8bit:
        quantize(prep, setup)
    if prep.is_peft and setup.gradient_checkpointing:
        pm.enable_input_require_grads()
    pm.train()
    count_parameters(prep, setup)
    instrument(prep, tracker)


def quantize(prep: Prepared, setup: TrainingSetup) -> None:
    """Swap the base linear layers for the bitsandbytes stand-ins, as transformers' load_in_4bit/8bit does."""
    import torch

    from tools.memory.quant import import_bitsandbytes, quantize_linears_4bit, quantize_linears_8bit

    import_bitsandbytes()
    pm, head = prep.pm, prep.head
    # transformers quantizes every linear layer except the output head; adapters come later
    skip = {id(x) for x in pm.modules() if any(p.requires_grad for p in x.parameters(recurse=False))}
    if head is not None:
        skip.update(id(x) for x in head.modules())
    for x in pm.modules():
        if type(x).__name__ == "ModulesToSaveWrapper":
            skip.update(id(y) for y in x.modules())
    if setup.load_in_4bit:
        nq = quantize_linears_4bit(
            pm, skip=skip, quant_type=setup.bnb_4bit_quant_type, double_quant=setup.bnb_4bit_use_double_quant,
            compute_dtype=getattr(torch, TORCH_DTYPES[setup.bnb_4bit_compute_dtype]),
            quant_storage=setup.bnb_4bit_quant_storage,
        )
        kind = f"4-bit {setup.bnb_4bit_quant_type} stand-ins (bnb.matmul_4bit)"
    else:
        nq = quantize_linears_8bit(pm, skip=skip)
        kind = "LLM.int8 stand-ins (bnb.matmul, outlier threshold 0: outlier columns not counted)"
    # trl's SFTTrainer casts the adapters of a quantized model to bf16 (except DoRA magnitudes)
    for name, p in pm.named_parameters():
        if p.requires_grad and "lora_magnitude_vector" not in name:
            p.data = p.data.to(torch.bfloat16)
    prep.notes.append(f"{nq} linear layers as bitsandbytes {kind}; adapters in bf16 as trl does")


def count_parameters(prep: Prepared, setup: TrainingSetup) -> None:
    """The trainable parameters, the frozen storages, the logical parameter counts, the largest block."""
    from tools.memory.quant import Fake4bitLinear, Fake8bitLinear

    pm = prep.pm
    params = [p for p in pm.parameters() if p.requires_grad]
    if not params:
        raise SimulationError(f"method: {setup.method} leaves no trainable parameter for this model")
    prep.params = params
    prep.frozen_store = {id(x.untyped_storage()) for x in list(pm.parameters()) + list(pm.buffers()) if not x.requires_grad}
    num_parameters = 0
    seen_params: set[int] = set()  # a tied parameter belongs to two modules: count it once
    for mod in pm.modules():
        if isinstance(mod, (Fake4bitLinear, Fake8bitLinear)):
            num_parameters += mod.logical_numel
            continue
        for p in mod.parameters(recurse=False):
            if id(p) not in seen_params:
                seen_params.add(id(p))
                num_parameters += p.numel()
    prep.num_parameters = num_parameters
    prep.trainable_parameters = sum(p.numel() for p in params)
    largest = 0
    for blk in blocks(prep.base):
        largest = max(largest, sum(x.untyped_storage().nbytes() for x in list(blk.parameters()) + list(blk.buffers())))
    prep.largest_layer_param_bytes = largest


def instrument(prep: Prepared, tracker) -> None:
    """The tracker's segment boundaries: recompute inside checkpointed blocks, the head, the first block's gradient."""
    import torch

    stack = blocks(prep.base)
    _mark_recompute(stack, tracker)
    if prep.head is not None:
        def _head_pre(*_):
            if tracker.phase == "forward":
                tracker.phase = "forward-head"
        prep.head.register_forward_pre_hook(_head_pre)
    if stack:
        def _first_block_pre(_mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if tracker.phase == "forward" and isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda g: setattr(tracker, "phase", "backward-tail"))

        stack[0].register_forward_pre_hook(_first_block_pre, with_kwargs=True)


def make_step_optimizer(prep: Prepared, setup: TrainingSetup, tracker):
    """The Trainer's optimizer over the trainable parameters (bitsandbytes' real quantile maps made fake once)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    optimizer = make_optimizer(prep.pm, setup, prep.params)
    qmaps = getattr(optimizer, "name2qmap", None)
    if isinstance(qmaps, dict):
        # bitsandbytes' quantile maps are real tensors shared by every parameter's state: make them
        # fake once, instead of FakeTensorMode converting them in each per-parameter update
        for k, v in list(qmaps.items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
                qmaps[k] = tracker.from_tensor(v)
    return optimizer


def state_step(prep: Prepared, optimizer, setup: TrainingSetup, tracker, *, before_reset: Callable[[], None] | None = None) -> None:
    """Step 1 only creates the optimizer state: zero gradients and one optimizer.step() allocate
    exactly what a first real step leaves behind, at a fraction of the cost. Ends with the tracker
    in the forward phase, its peaks reset."""
    import torch

    params = prep.params
    tracker.phase = "optimizer"
    for p in params:
        # (FSDP1 with use_orig_params: a parameter with no element on this rank never gets a gradient, so no state)
        if p.numel():
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # state tensors no op produced (bitsandbytes' quantile maps, made fake above and shared by every
    # parameter's state; on a GPU they are moved there once): count them
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and tracker.rec_of(v) is None:
                tracker.add(v)
    if setup.gradient_accumulation_steps > 1:
        # a later micro-batch of an accumulation window: gradients of the earlier ones already exist
        for p in params:
            p.grad = torch.zeros_like(p)
    if before_reset is not None:
        before_reset()
    tracker.phase = "forward"
    tracker.reset_peak()


def forward_loss(pm, setup: TrainingSetup, batch: dict, amp) -> ForwardOutput:
    """Forward and loss of one micro-batch as the Trainer runs them (HF's loss path inside the model)."""
    with amp:
        out = pm(**batch)
    return ForwardOutput(loss=out.loss, logits=getattr(out, "logits", None), output=out)


def train_step(prep: Prepared, optimizer, setup: TrainingSetup, tracker, amp, *,
               forward: Callable[..., ForwardOutput] = forward_loss):
    """Step 2, the steady state: forward, loss, backward, (fp16 unscale), clipping, optimizer step.

    Returns what the step leaves referenced until the end of the run (fp16: GradScaler's found_inf /
    inv_scale and the per-dtype gradient lists, as the single-function run kept them; None otherwise).
    """
    import torch

    params = prep.params
    fwd = forward(prep.pm, setup, inputs(setup, setup.per_device_train_batch_size, setup.max_length, prep.vocab), amp)
    loss = fwd.loss / setup.gradient_accumulation_steps
    if setup.fp16:
        loss = loss * _FP16_LOSS_SCALE  # GradScaler.scale(loss): the Trainer's fp16 path
    tracker.phase = "backward-loss"
    if fwd.logits is not None and fwd.logits.requires_grad:
        fwd.logits.register_hook(lambda g: setattr(tracker, "phase", "backward"))
    else:
        tracker.phase = "backward"
    del fwd
    loss.backward()
    del loss
    tracker.phase = "optimizer"
    leftovers = None
    if setup.fp16:
        # GradScaler.unscale_ (before clipping): the in-place foreach check-and-unscale per dtype group;
        # scaler.step's found_inf.item() needs real values and allocates nothing, so it is skipped
        found_inf, inv_scale = torch.zeros(1), torch.full((1,), 1.0 / _FP16_LOSS_SCALE)
        groups: dict = {}
        for p in params:
            if p.grad is not None:
                groups.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in groups.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        leftovers = (found_inf, inv_scale, groups)
    if setup.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, setup.max_grad_norm, foreach=True)  # CUDA default: foreach
    optimizer.step()
    tracker.finish()
    return leftovers


def measure(prep: Prepared, optimizer, tracker, *, extra: dict[str, list] | None = None) -> dict[str, Any]:
    """Each training segment's peak snapshot split into categories, and the resident totals (RunResult fields).

    `extra` names further resident tensors by category (e.g. an objective's frozen reference model);
    storages the KV cache of generation holds are tagged 'kv_cache' by the objective's step."""
    import torch

    pm, params = prep.pm, prep.params
    seg_snaps = {seg: tracker.seg_snap[seg] for seg in TRAIN_SEGMENTS if seg in tracker.seg_snap}

    # identities at the end of step 2
    def recs(tensors) -> dict[int, Any]:
        out = {}
        for t in tensors:
            r = tracker.rec_of(t)
            if r is not None:
                out[id(r)] = r
        return out

    # a sharded step's own parameters are the shards (prep.params); ZeRO-1/2 end the step with the gathered
    # 16-bit parameters registered on the modules, which stay FSDP's gathered buffers below
    weight_recs = recs(list(pm.parameters()) + list(pm.buffers()) + (list(params) if prep.sharded else []))
    adapter_ids = set()
    if prep.is_peft:
        adapter_ids = set(recs(params))
    grad_recs = recs([p.grad for p in params if p.grad is not None])
    state_tensors = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    state_recs = recs(state_tensors)
    frozen_ids = {id(r) for k, r in tracker.live.items() if k in prep.frozen_store}
    sharded = prep.sharded
    extra_of = {rid: cat for cat, tensors in (extra or {}).items() for rid in recs(tensors)}

    def classify(snapshot) -> dict[str, int]:
        breakdown = dict.fromkeys(STEP_CATEGORIES, 0)
        if sharded:
            breakdown.update(dict.fromkeys(SHARDED_CATEGORIES, 0))
        for r in snapshot:
            rid = id(r)
            if rid in extra_of:
                cat = extra_of[rid]
            elif r.tag == "kv_cache":
                cat = "kv_cache"
            elif sharded and r.tag.split("@", 1)[0] == "fsdp_all_gather":
                cat = "fsdp_all_gather"
            elif rid in adapter_ids:
                cat = "adapters"
            elif rid in weight_recs or rid in frozen_ids:
                cat = "weights"
            elif rid in grad_recs:
                cat = "gradients"
            elif rid in state_recs:
                cat = "optimizer_state"
            elif r.tag in ("forward", "recompute", "setup"):
                cat = "activations"
            elif r.tag in ("forward-head", "backward-loss"):
                cat = "logits_loss"
            elif r.tag.split("@", 1)[0] in SHARDED_CATEGORIES:
                # FSDP's all-gather / reduce-scatter buffers (tools.memory.distributed); "@stream" names
                # the CUDA stream they are allocated on (the allocator replay's pools), not a category
                cat = r.tag.split("@", 1)[0]
            else:
                cat = "temporaries"
            breakdown[cat] += r.nbytes
        return breakdown

    return {
        "segments": {seg: classify(snap) for seg, snap in seg_snaps.items()},
        "weights_bytes": sum(r.nbytes for rid, r in weight_recs.items() if rid not in adapter_ids),
        "adapter_bytes": sum(r.nbytes for rid, r in weight_recs.items() if rid in adapter_ids),
        "gradient_bytes": sum(r.nbytes for r in grad_recs.values()),
        "optimizer_bytes": sum(r.nbytes for r in state_recs.values()),
    }


def eval_step(prep: Prepared, optimizer, setup: TrainingSetup, tracker, amp) -> int:
    """The peak of one eval forward (no grad) after the training step."""
    import torch

    pm = prep.pm
    optimizer.zero_grad(set_to_none=True)
    pm.eval()
    tracker.phase = "eval"
    tracker.reset_peak()
    with torch.no_grad(), amp:
        out = pm(**inputs(setup, setup.per_device_eval_batch_size, setup.max_length, prep.vocab))
        kept = None if setup.prediction_loss_only else out.logits
        del out
    tracker.finish()
    peak = tracker.peak
    del kept
    if not setup.prediction_loss_only:
        prep.notes.append("eval peak keeps one batch's logits; the Trainer also gathers every eval batch's logits "
                          "on the GPU unless eval_accumulation_steps is set (not counted)")
    return peak


def _kernel_notes(setup: TrainingSetup) -> list[str]:
    """Where the dry run's kernels stand in for CUDA's."""
    notes = []
    if setup.attn_implementation == "flash_attention_2":
        notes.append("flash_attention_2 simulated as CPU SDPA's flash kernel (no s^2 score matrix)")
    if setup.optim.startswith("paged_"):
        notes.append(f"{setup.optim}: paged optimizer state counted as resident GPU memory (it is unified memory, evicted only under pressure)")
    if setup.fp16:
        notes.append("fp16: GradScaler's scaled loss and in-place unscale of the gradients simulated")
    if (setup.bf16 or setup.fp16) and setup.zero_stage:
        notes.append(f"DeepSpeed {setup.compute_dtype}: the engine trains the {setup.compute_dtype} module without autocast "
                     "(accelerate enables native AMP for every backend but DeepSpeed)")
    elif setup.bf16 or setup.fp16:
        notes.append(f"mixed precision simulated with torch.autocast('cpu', {setup.compute_dtype}); the Trainer uses CUDA autocast (same policy for matmuls)")
    return notes


# --------------------------------------------------------------------------------------
# Optimizer, inputs, kernel policies, MoE routing
# --------------------------------------------------------------------------------------


def decay_groups(model, params: list, weight_decay: float = 0.0):
    """HF Trainer's two parameter groups: weight decay for everything but biases and norms."""
    import re

    from torch import nn

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    no_decay_ids = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.LayerNorm) or any(re.search(pat, full.lower()) for pat in patterns):
                no_decay_ids.add(id(p))
    decay = [p for p in params if id(p) not in no_decay_ids]
    no_decay = [p for p in params if id(p) in no_decay_ids]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def make_optimizer(model, setup: TrainingSetup, params: list):
    import torch

    groups = decay_groups(model, params, setup.weight_decay)
    lr = setup.learning_rate
    name = setup.optim
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, foreach=True)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, foreach=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name in _BNB_OPTIMS:
        from tools.memory.quant import import_bitsandbytes

        bnb = import_bitsandbytes()

        cls_name, bits, paged = _BNB_OPTIMS[name]
        cls = getattr(bnb.optim, cls_name)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), warnings.catch_warnings():  # bnb builds its qmap with .tolist()
            warnings.simplefilter("ignore")
            return cls(groups, lr=lr, optim_bits=bits, is_paged=paged)
    raise SimulationError(f"optim: {name} is not simulated; use adamw_torch_fused, adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, sgd or adafactor")


def _mark_recompute(blocks: list, tracker) -> None:
    """Count allocations made while a checkpointed block re-runs its forward in backward as activations.

    transformers calls `block._gradient_checkpointing_func(partial(forward, ...), *args)`; the
    recompute calls that partial again from inside backward (and may stop it early by raising), so
    the wrapper keeps a depth counter with try/finally.
    """
    for blk in blocks:
        ckpt = getattr(blk, "_gradient_checkpointing_func", None)
        if ckpt is None:
            continue

        def wrapped(fn, *args, _ckpt=ckpt, **kwargs):
            def counted(*a, **k):
                tracker.in_block += 1
                try:
                    return fn(*a, **k)
                finally:
                    tracker.in_block -= 1

            return _ckpt(counted, *args, **kwargs)

        blk._gradient_checkpointing_func = wrapped


def _balanced_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Eager MoE experts forward with a perfectly balanced, data-independent routing (fake tensors)."""
    import torch
    from torch import nn

    num_tokens = hidden_states.shape[0]
    top_k = top_k_index.shape[-1]
    per_expert = max(1, math.ceil(num_tokens * top_k / self.num_experts))
    final = torch.zeros_like(hidden_states)
    device = hidden_states.device
    for e in range(self.num_experts):
        token_idx = (torch.arange(per_expert, device=device) + e * per_expert) % num_tokens
        top_k_pos = torch.zeros(per_expert, dtype=torch.long, device=device)
        current = hidden_states[token_idx]
        gate_up = nn.functional.linear(current, self.gate_up_proj[e])
        if getattr(self, "has_gate", True):
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
        else:
            h = self.act_fn(gate_up)
        h = nn.functional.linear(h, self.down_proj[e])
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def patch_moe(base) -> int:
    import types

    n = 0
    for m in base.modules():
        gu, dp = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if gu is None or dp is None or not hasattr(m, "num_experts"):
            continue
        if getattr(gu, "ndim", 0) != 3:
            continue
        impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
        if impl not in (None, "eager"):
            continue  # grouped_mm / batched_mm: shapes do not depend on the routing, run them as they are
        if getattr(m, "is_transposed", False) or getattr(m, "has_bias", False) or not getattr(m, "is_concatenated", True):
            raise SimulationError(f"model: the experts layout of {type(m).__name__} is not simulated yet; use --fast")
        m.forward = types.MethodType(_balanced_experts_forward, m)
        n += 1
    return n


class CudaLikeDropout:
    """Dropout as CUDA runs it: the fused native_dropout kernel keeps a 1-byte bool mask for backward.

    On CPU, torch.nn.functional.dropout takes a composite path whose saved mask has the input's
    dtype (2 bytes in bf16): that would overcount every LoRA dropout by a byte per element.
    """

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        self._orig = orig = F.dropout

        def dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - torch's own signature
            if not training or p == 0.0 or p == 1.0 or not input.is_floating_point():
                return orig(input, p, training, inplace)
            return torch.native_dropout(input, p, True)[0]

        F.dropout = dropout
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.dropout = self._orig
        return False


class CudaGroupedMm:
    """`torch._grouped_mm` on fp16/fp32 experts, as CUDA runs it: the shapes of the bf16 kernel.

    transformers 5's default `grouped_mm` experts path calls `torch.nn.functional.grouped_mm` on CUDA
    (SM80+) for every dtype (`transformers.integrations.moe._can_use_grouped_mm` checks the dtype only
    under torch.compile). The CUDA op accepts fp32, bf16 and fp16 (ATen `GroupedMMUtils.h`,
    `_grouped_mm_validate_inputs`): bf16 takes the grouped GEMM kernel, fp16/fp32 `_grouped_mm_fallback`,
    one `mm_out` per group into the same output (`create_grouped_gemm_output_tensor`, mat_a's dtype) and
    nothing else. torch's meta kernel (`_meta_grouped_mm_common`, what fake tensors run) still accepts
    bf16 only, so an fp16 Mixtral could not be simulated. Under this context the meta kernel returns
    that same output (`_create_grouped_mm_output_tensor`) for fp16/fp32 operands; bf16 and the scaled
    FP8 op keep torch's own checks.
    """

    def __enter__(self):
        import torch
        from torch import _meta_registrations as meta

        self._meta = meta
        self._orig = orig = getattr(meta, "_meta_grouped_mm_common", None)
        if orig is None or not hasattr(meta, "_create_grouped_mm_output_tensor"):
            return self
        other = (torch.float16, torch.float32)

        def common(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None,
                   use_fast_accum=False):
            if scale_a is None and scale_b is None and mat_a.dtype in other and mat_b.dtype in other:
                torch._check(mat_a.dim() in (2, 3) and mat_b.dim() in (2, 3),
                             lambda: "Multiplicands must be 2D or 3D")
                if mat_a.dim() == 3 or mat_b.dim() == 3:
                    torch._check(mat_a.size(-1) == mat_b.size(-2),
                                 lambda: "contraction dimension of mat_a and mat_b must match")
                torch._check((offs is not None) == (mat_a.dim() == 2 or mat_b.dim() == 2),
                             lambda: "offsets are needed exactly when an operand is 2D")
                torch._check(bias is None, lambda: "Bias not supported yet")
                torch._check((out_dtype or mat_a.dtype) == mat_a.dtype,
                             lambda: "Grouped gemm output dtype must match `mat_a` dtype")
                return meta._create_grouped_mm_output_tensor(mat_a, mat_b, offs, mat_a.dtype)
            return orig(mat_a, mat_b, scale_a, scale_b, offs=offs, bias=bias, scale_result=scale_result,
                        out_dtype=out_dtype, use_fast_accum=use_fast_accum)

        meta._meta_grouped_mm_common = common
        return self

    def __exit__(self, *exc):
        if self._orig is not None:
            self._meta._meta_grouped_mm_common = self._orig
        return False


class TrainingMaskPolicy:
    """Let transformers decide the attention mask exactly as it does on real tensors.

    transformers refuses to skip the materialised [b,1,s,s] mask when the position ids or the query
    offset are fake tensors ("tracing"); on a GPU, a full-length training batch with one sequence
    per row and no padding skips it (SDPA's is_causal, which also enables GQA without repeating
    k/v). Training always starts at offset 0. With `packed`, the rows hold several sequences
    (position_ids restart) and transformers builds its block-diagonal mask, as on a GPU.
    """

    def __init__(self, packed: bool = False):
        self.packed = packed

    def __enter__(self):
        import torch
        from transformers import masking_utils

        self._mod = masking_utils
        self._orig = orig = masking_utils._ignore_causal_mask_sdpa

        def patched(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs):
            if isinstance(q_offset, torch.Tensor):
                q_offset = 0
            if isinstance(kv_offset, torch.Tensor):
                kv_offset = 0
            return orig(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs)

        masking_utils._ignore_causal_mask_sdpa = patched
        self._orig_packed = masking_utils.find_packed_sequence_indices
        if self.packed:
            # several sequences per row: transformers' own computation without its data-dependent
            # "is there only one?" check (there are several: position_ids restart)
            def packed_indices(position_ids):
                first = position_ids[:, :1] - 1
                return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

            masking_utils.find_packed_sequence_indices = packed_indices
        else:
            # one sequence per row (position_ids 0..s-1): transformers returns None here on real tensors
            masking_utils.find_packed_sequence_indices = lambda position_ids: None
        return self

    def __exit__(self, *exc):
        self._mod._ignore_causal_mask_sdpa = self._orig
        self._mod.find_packed_sequence_indices = self._orig_packed
        return False


def inputs(setup: TrainingSetup, batch: int, seq: int, vocab: int):
    """One batch as the Trainer feeds it: [batch, seq] rows, or with packing trl's padding-free form.

    Packing: trl's collator flattens the batch into a single row of batch*seq tokens whose position_ids
    restart at every packed example, and passes no attention mask (the worst case: every row full).
    """
    import torch

    if setup.padding_free:
        ids = torch.randint(0, max(2, vocab), (1, batch * seq))
        pos = torch.arange(seq).repeat(batch).unsqueeze(0)
        return {"input_ids": ids, "labels": ids, "position_ids": pos, "use_cache": False}
    ids = torch.randint(0, max(2, vocab), (batch, seq))
    kw = {"input_ids": ids}
    if setup.task == "sequence-classification":
        kw["labels"] = torch.zeros(batch, dtype=torch.long)
    else:
        kw["labels"] = ids
    kw["use_cache"] = False
    return kw
