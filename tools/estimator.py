"""Per-GPU memory estimate of a training setup: one replica's step memory, sharded, plus CUDA terms.

`estimate(model, setup, hardware)` takes the StepMemory of one model replica from the dry-run
simulator (tier 'simulated', the default) or the closed-form analytic tier (`fast=True`, or as a
fallback when the simulator does not support a setup), then:

1. shards it per GPU: DDP replicates everything; ZeRO-1 splits optimizer states, ZeRO-2 also
   gradients, ZeRO-3 also weights (plus all-gather buffers of ~2 blocks); FSDP full_shard ~
   ZeRO-3, shard_grad_op ~ ZeRO-2. Under ZeRO/FSDP mixed precision the optimizer keeps fp32
   master weights and fp32 moments (DeepSpeed; accelerate upcasts FSDP params), unlike plain
   HF bf16 training where weights and AdamW moments stay in the load dtype;
2. moves offloaded states to host RAM (`offload='optimizer'`: optimizer states and master
   weights; `'all'`: parameters too);
3. adds the CUDA-only terms from `tools/calibration.json`, each named in the breakdown:
   cuBLAS workspaces (-> peak allocated), caching-allocator rounding and fragmentation
   (-> peak reserved), CUDA context and NCCL buffers (-> device total, what nvidia-smi shows);
4. checks the result against the GPU and explains what dominates and what cuts it most.

Both tiers already count dropout masks as CUDA keeps them (1 byte per element, the fused
native_dropout kernel): no kernel correction is applied on top of a step.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

from tools import progress
from tools.schemas import (
    BYTES_PER_GIB,
    HardwareSpec,
    MemoryEstimate,
    ModelSpec,
    StepMemory,
    TrainingSetup,
    TunepilotError,
    Uncertainty,
)

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")
MIB = 1024**2
_ADAM_LIKE = {"adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "adagrad", "rmsprop", "lion_32bit", "paged_lion_32bit"}
_LABELS = {
    "weights": "base weights",
    "adapters": "adapter weights",
    "gradients": "gradients",
    "optimizer_state": "optimizer states",
    "activations": "activations",
    "logits_loss": "logits and loss",
    "temporaries": "step temporaries",
    "zero_buffers": "ZeRO/FSDP buffers",
    "fsdp_all_gather": "FSDP all-gathered parameters",
    "fsdp_reduce_scatter": "FSDP reduce-scatter buffers",
    "zero_buckets": "DeepSpeed buckets",
    "zero_param_partition": "DeepSpeed 16-bit partitions",
    "zero1_full_gradients": "ZeRO-1 full gradients",
    "zero_grad_partition": "DeepSpeed gradient partition",
    "zero_gathered_params": "DeepSpeed ZeRO-3 gathered parameters",
    "cublas_workspace": "cuBLAS workspaces",
    "allocator_overhead": "allocator overhead",
    "cuda_context": "CUDA context",
    "nccl_buffers": "NCCL buffers",
    "reference_model": "reference model (frozen copy)",
    "kv_cache": "KV cache of generation",
    "vllm_reserved": "vLLM (colocated) reserved memory",
}


@lru_cache(maxsize=1)
def calibration() -> dict:
    """The CUDA-only constants with their sources (tools/calibration.json)."""
    return json.loads(CALIBRATION_PATH.read_text(encoding="utf-8"))


def _const(name: str) -> dict:
    return calibration()["constants"][name]


def step_memory(model: ModelSpec, setup: TrainingSetup, *, fast: bool = False) -> tuple[StepMemory, list[str]]:
    """StepMemory of one replica from the simulator, or the analytic tier when fast or unsupported."""
    notes: list[str] = []
    from tools.peft_config import loadable_setup

    import sys

    # (--fast must not import torch/transformers, which the attention check asks)
    cold = not fast and "tools.memory.runner" not in sys.modules
    with progress.status("loading torch, transformers and peft") if cold else nullcontext():
        setup, fixes = loadable_setup(model, setup, attention=not fast)
    notes += fixes
    if not fast:
        try:
            with progress.status("loading torch, transformers and peft") if cold else nullcontext():
                from tools.memory import SimulationError, simulate  # imports torch on first use
        except ImportError as e:  # no torch / transformers in this environment
            notes.append(f"simulator unavailable ({e.__class__.__name__}: {e}); analytic tier used")
        else:
            try:
                return simulate(model, setup), notes
            except SimulationError as e:
                notes.append(f"simulator does not support this setup ({e}); analytic tier used")
    from tools.analytic import analytic_step_memory

    return analytic_step_memory(model, setup), notes


def _check(setup: TrainingSetup, hardware: HardwareSpec | None, notes: list[str]) -> None:
    if hardware is not None and hardware.num_gpus != setup.num_gpus:
        notes.append(
            f"hardware has {hardware.num_gpus} GPU(s) but setup.num_gpus={setup.num_gpus}: the setup's count is used"
        )


def _deepspeed_peak(step: StepMemory, setup: TrainingSetup, model: ModelSpec, notes: list[str]) -> tuple[dict[str, float], bool]:
    """The per-GPU peak breakdown of a DeepSpeed setup from the simulated step's segments, and whether ZeRO-3's
    gathering was modelled: DeepSpeed's gradients (tools.memory.distributed.deepspeed_gradients) and ZeRO-3's
    per-submodule gathered parameters (tools.memory.zero3) in place of FSDP2's, then the largest segment."""
    from tools.memory.distributed import deepspeed_gradients
    from tools.memory.segments import PHASE_OF_SEGMENT

    gathered_modelled = False
    segs = {seg: dict(b) for seg, b in step.segment_breakdowns.items()}
    if setup.offload == "none":
        # DeepSpeed's gradients instead of FSDP2's in every segment of the simulated step
        segs = {seg: deepspeed_gradients(setup, seg, b, step.trainable_parameters) for seg, b in segs.items()}
        notes.append(f"DeepSpeed ZeRO-{setup.zero_stage} gradients: a 16-bit partition through the step, fp32 only inside the optimizer step"
                     + (" (one sub_group_size at a time)" if setup.zero_stage == 3 else ""))
    if setup.zero_stage == 3:
        # DeepSpeed's per-submodule gathering instead of FSDP2's per-block units (tools.memory.zero3)
        from tools.memory.zero3 import coordinator_config, gathered_by_segment

        gathered, moments = gathered_by_segment(model, setup)
        for seg, b in segs.items():
            if seg in gathered:
                b.pop("fsdp_all_gather", None)
                b["zero_gathered_params"] = gathered[seg]
        gathered_modelled = True
        cfg = coordinator_config(setup, model.hidden_size)
        where = ", ".join(f"{seg} {gathered[seg] / BYTES_PER_GIB:.2f} GiB" + (f" (at {moments[seg].module})" if seg in moments else "")
                          for seg in ("forward", "backward-loss", "backward", "backward-tail", "optimizer") if seg in gathered)
        notes.append("DeepSpeed ZeRO-3 gathered parameters (zero_gathered_params, in place of FSDP2's per-block all-gather): "
                     "the PartitionedParameterCoordinator's per-submodule fetch / prefetch / release replayed over the step's "
                     f"module trace{' with gradient checkpointing recompute' if setup.gradient_checkpointing else ''} "
                     f"(stage3_prefetch_bucket_size {cfg.prefetch_bucket_size:.3g}, stage3_max_live_parameters {cfg.max_live_parameters:.3g}, "
                     f"stage3_max_reuse_distance {cfg.max_reuse_distance:.3g}, stage3_param_persistence_threshold "
                     f"{cfg.param_persistence_threshold:.3g}{' (auto = 10 hidden)' if not setup.zero_param_persistence_threshold else ''}); "
                     f"most gathered per segment: {where}")
    best = max(segs, key=lambda seg: sum(segs[seg].values()))
    notes.append(f"DeepSpeed ZeRO-{setup.zero_stage}: per-GPU peak in {PHASE_OF_SEGMENT.get(best, best)}")
    return {k: float(v) for k, v in segs[best].items()}, gathered_modelled


def _simulated_shard(step: StepMemory, setup: TrainingSetup, model: ModelSpec) -> tuple[dict[str, float], float, list[str]]:
    """A step the dry run already sharded (tools.memory.distributed): its bytes are one rank's.

    Only DeepSpeed's own buffers (named components from the ds_config.json values) and the host side
    of CPU offload are added here."""
    from tools.memory.distributed import deepspeed_buffers

    n = setup.num_gpus
    bd = {k: float(v) for k, v in step.peak_breakdown.items()}
    notes = [f"per-GPU step simulated sharded over {step.world_size} ranks (fake process group); rank {step.rank} reported: "
             "every parameter is split on dim 0 with rank 0 holding the largest chunk, and the padded all-gather "
             "buffers are equal on all ranks, so rank 0 is the worst rank"]
    if setup.fsdp != "none" and setup.fsdp_version == 1:
        # which FSDP1 ran: the real FullyShardedDataParallel (opt-in) or the FSDP2 units that model it, and why
        notes.extend([n for n in step.notes if n.startswith("FSDP1 (")][:1])  # (one per simulated depth: the same)
    gathered_modelled = False
    if setup.zero_stage and step.segment_breakdowns and (setup.offload == "none" or setup.zero_stage == 3):
        bd, gathered_modelled = _deepspeed_peak(step, setup, model, notes)
    if setup.zero_stage:
        extra = deepspeed_buffers(setup, model.hidden_size, step.trainable_parameters,
                                  comm_factor=float(_const("zero_comm_buffer_factor")["value"]),
                                  prefetch_in_gathered=gathered_modelled)
        if setup.offload == "all":
            extra.pop("zero_param_partition", None)  # offload_param: the 16-bit partitions live on the host
        for k, v in extra.items():
            bd[k] = bd.get(k, 0.0) + v
        if extra:
            from tools.memory.distributed import zero_bucket_sizes

            rb, pb = zero_bucket_sizes(setup, model.hidden_size)
            buckets = (f"reduce_bucket_size {rb:.3g}" + (" (auto = hidden^2)" if not setup.zero_reduce_bucket_size else "")
                       + (f", stage3_prefetch_bucket_size {pb:.3g}" + (" (auto = 0.9 hidden^2)" if not setup.zero_prefetch_bucket_size else "")
                          if setup.zero_stage == 3 else ""))
            notes.append(f"DeepSpeed buffers from ds_config.json ({buckets}, overlap_comm): "
                         + ", ".join(f"{k} {v / BYTES_PER_GIB:.2f} GiB" for k, v in extra.items()))
        if setup.offload != "none":
            notes.append(f"DeepSpeed CPU Adam runs the optimizer on the host (optim={setup.optim} is not used on GPU)")
    host = 0.0
    if setup.offload != "none":
        per_node = max(1, n // max(setup.num_nodes, 1))
        host = float(sum(step.offloaded_bytes.values())) * per_node
        host += float(_const("pinned_host_buffer_gib")["value"]) * BYTES_PER_GIB * per_node
        parts = ", ".join(f"{k} {v / BYTES_PER_GIB:.2f} GiB" for k, v in step.offloaded_bytes.items() if v)
        notes.append(f"CPU offload simulated: per rank in host RAM {parts or 'nothing'}; the GPU keeps the units being computed")
    return bd, host, notes


def _shard(step: StepMemory, setup: TrainingSetup, model: ModelSpec) -> tuple[dict[str, float], float, list[str]]:
    """Per-GPU bytes by component (allocated, before CUDA terms), host bytes, notes."""
    if step.rank is not None:
        return _simulated_shard(step, setup, model)
    n = setup.num_gpus
    bd = {k: float(v) for k, v in step.peak_breakdown.items()}
    notes: list[str] = []
    stage = setup.zero_stage
    if setup.fsdp == "full_shard":
        stage = 3
    elif setup.fsdp == "shard_grad_op":
        stage = 2
    host = 0.0
    if stage == 0:
        if n > 1:
            notes.append(f"DDP over {n} GPUs: every GPU holds a full replica (weights, gradients, optimizer states)")
        return bd, host, notes

    from tools.analytic import legacy_rope_cache_bytes

    # buffers are never sharded nor offloaded: early-2024 transformers' per-layer rotary tables stay whole on every GPU
    rope = float(legacy_rope_cache_bytes(model, setup))
    engine = "FSDP" if setup.fsdp != "none" else "DeepSpeed ZeRO"
    trainable = step.trainable_parameters
    mixed = setup.bf16 or setup.fp16
    master = float(_const("mixed_precision_master_bytes")["value"]) * trainable if mixed else 0.0
    opt = bd.get("optimizer_state", 0.0)
    if mixed and setup.optim in _ADAM_LIKE and step.optimizer_bytes:
        # fp32 moments instead of moments in the parameters' dtype
        per_param = step.optimizer_bytes / max(trainable, 1)
        states = max(1, round(per_param / (4 if per_param >= 8 else 2)))
        opt_full = 4.0 * states * trainable
    else:
        opt_full = float(step.optimizer_bytes)
    if setup.offload != "none" and setup.zero_stage:
        notes.append(f"DeepSpeed CPU Adam runs the optimizer on the host (optim={setup.optim} is not used on GPU)")
    opt_full += master
    if mixed:
        notes.append(f"{engine} mixed precision: fp32 master weights ({master / BYTES_PER_GIB:.2f} GiB) and fp32 optimizer moments, sharded")
    # optimizer states (+ masters): sharded from stage 1
    if opt or master:
        bd["optimizer_state"] = opt_full / n
    if stage >= 2:
        bd["gradients"] = bd.get("gradients", 0.0) / n
    if stage >= 3:
        gathered = float(_const("zero3_prefetch_layers")["value"]) * step.largest_layer_param_bytes
        bd["weights"] = max(0.0, bd.get("weights", 0.0) - rope) / n + rope
        if bd.get("reference_model"):
            bd["reference_model"] = bd["reference_model"] / n  # trl prepares the reference with the same ZeRO-3 / FSDP sharding
            notes.append(f"the frozen reference copy is sharded like the policy: / {n}")
        bd["adapters"] = bd.get("adapters", 0.0) / n
        bd["zero_buffers"] = gathered
        notes.append(f"stage-3 sharding: weights / {n} + {_const('zero3_prefetch_layers')['value']} gathered blocks ({gathered / BYTES_PER_GIB:.2f} GiB)")
    elif setup.fsdp == "none":
        from tools.memory.distributed import zero_bucket_sizes

        c = 2 if mixed else 4
        bd["zero_buffers"] = float(_const("zero_comm_buffer_factor")["value"]) * zero_bucket_sizes(setup, model.hidden_size)[0] * c
    if step.peak_phase == "optimizer" and bd.get("temporaries"):
        bd["temporaries"] = bd["temporaries"] / n
    if setup.offload in ("optimizer", "all"):
        per_node = max(1, n // max(setup.num_nodes, 1))
        host += bd.get("optimizer_state", 0.0) * per_node
        # the host keeps fp32 gradients for its CPU optimizer step
        host += 4.0 * trainable / n * per_node
        bd["optimizer_state"] = 0.0
        notes.append("offload=optimizer: optimizer states and fp32 master weights live in host RAM")
    if setup.offload == "all" or (setup.fsdp != "none" and setup.offload != "none"):
        # FSDP's CPU offload moves parameters and gradients together with the optimizer
        per_node = max(1, n // max(setup.num_nodes, 1))
        host += (bd.get("weights", 0.0) - rope + bd.get("adapters", 0.0) + bd.get("gradients", 0.0)) * per_node
        bd["weights"], bd["adapters"] = rope, 0.0
        if setup.fsdp != "none":
            bd["gradients"] = 0.0
        notes.append("offload=all: parameters on the host too; the GPU holds only the blocks being computed")
    if setup.offload != "none":
        host += float(_const("pinned_host_buffer_gib")["value"]) * BYTES_PER_GIB * max(1, n // max(setup.num_nodes, 1))
    return bd, host, notes


def _uncertainty_pct(tier: str, setup: TrainingSetup, model: ModelSpec) -> float:
    t = calibration()["tier_uncertainty_pct"]
    pct = float(t[tier])
    if setup.load_in_4bit or setup.load_in_8bit:
        pct += float(t["qlora_extra"])
    if model.is_moe:
        pct += float(t["moe_extra"])
    if setup.zero_stage or setup.fsdp != "none":
        pct += float(t["sharded_extra"])
    return pct


def estimate(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec | None = None, *, fast: bool = False,
             safety_margin: float = 0.0, advice: bool = True, step: StepMemory | None = None,
             reshard_moments: bool = True, host_ram_gib: float | None = None, dataset_tokens: int | None = None,
             dataset_examples: int | None = None, host_offload: dict[str, int] | None = None) -> MemoryEstimate:
    """Per-GPU memory of training `model` with `setup`: peak allocated / reserved / nvidia-smi total, breakdown, fits on `hardware`, and advice.

    fast=True uses the closed-form analytic tier (instant, ~10%); otherwise the exact dry run of the
    real training step (a few seconds). safety_margin is the fraction of GPU memory kept free for `fits`.
    `step` injects a precomputed StepMemory of this setup. Under ZeRO/FSDP every analytic moment of the
    step is sharded too and the largest kept (reshard_moments=False shards only the step's own peak).
    Host RAM per node (tools/memory/host.py) is checked against `host_ram_gib` (or the hardware's);
    `dataset_tokens`/`dataset_examples` size the dataset's page cache; `host_offload` gives the per-rank
    bytes by part that the sharded step keeps on the host (computed from `step` when None).
    """
    if not 0.0 <= safety_margin < 1.0:
        raise TunepilotError(f"safety_margin: {safety_margin} must be in [0, 1)")
    provenance: list[str] = []
    _check(setup, hardware, provenance)
    if step is None:
        step, notes = step_memory(model, setup, fast=fast)
        provenance += notes
    cal = calibration()
    provenance.insert(0, f"tier: {step.tier} ({'closed-form analytic' if step.tier == 'analytic' else 'fake-tensor dry run of the real training step'})")
    provenance.append(f"calibration: tools/calibration.json version {cal['version']}")

    bd, host, notes = _shard(step, setup, model)
    provenance += notes
    if (setup.zero_stage or setup.fsdp != "none") and reshard_moments and step.rank is None:
        # sharding and offload shrink some components only, so another moment of the step may
        # become the per-GPU peak: shard every analytic moment too and keep the largest
        from tools.analytic import analytic_step_memory

        alts: dict = {}
        analytic_step_memory(model, setup, moments=alts)
        for name, (phase, abd) in alts.items():
            alt_step = step.model_copy(update={"peak_breakdown": abd, "peak_phase": phase})
            abd2, ahost, _ = _shard(alt_step, setup, model)
            if sum(abd2.values()) > sum(bd.values()):
                bd, host = abd2, max(host, ahost)
                provenance.append(f"after sharding the per-GPU peak is the {name.replace('_', ' ')} moment (analytic)")
    gib = float(BYTES_PER_GIB)
    if setup.activation_offloading and step.offload_host_bytes:
        # trl's activation offloading: the saved activations wait in pinned host RAM (host_breakdown 'activation_offload')
        provenance.append(f"activation offloading: {step.offload_host_bytes / gib:.2f} GiB pinned host RAM per GPU, "
                          f"{step.offload_traffic_bytes / gib:.2f} GiB over PCIe each way per micro-batch")
    # allocated: + cuBLAS workspaces (through torch's allocator)
    cw = _const("cublas_workspace_mib")
    bd["cublas_workspace"] = float(cw["value"] * cw["count"] * MIB)
    allocated = sum(bd.values())
    # reserved: + allocator rounding and fragmentation
    bd["allocator_overhead"], alloc_note = _allocator_overhead(step, setup, allocated)
    provenance.append(alloc_note)
    reserved = allocated + bd["allocator_overhead"]
    # device total: + CUDA context (+ NCCL)
    ctx = _const("cuda_context_gib")
    bd["cuda_context"] = float(ctx["value"]) * gib
    if setup.num_gpus > 1:
        bd["nccl_buffers"], nccl_note = _nccl_bytes(setup, hardware)
    total = reserved + bd["cuda_context"] + bd.get("nccl_buffers", 0.0)
    total += _vllm_reserved(model, setup, hardware, bd, provenance)
    for name in ("cublas_workspace_mib", "cuda_context_gib"):
        c = _const(name)
        provenance.append(f"{name} = {c['value']} ({c['unit']}); source: {c['source']}")
    if setup.num_gpus > 1:
        provenance.append(nccl_note)

    pct = _uncertainty_pct(step.tier, setup, model)
    ctx_abs = (float(ctx["high"]) - float(ctx["value"])) * gib
    unc = Uncertainty(
        low_gib=round(max(0.0, total * (1 - pct / 100) - (float(ctx["value"]) - float(ctx["low"])) * gib) / gib, 3),
        high_gib=round((total * (1 + pct / 100) + ctx_abs) / gib, 3),
        pct=pct,
    )
    breakdown = {k: round(v / gib, 3) for k, v in bd.items() if v > 0 or k in ("weights", "activations")}
    dominant = max((k for k in bd if k not in ("cuda_context", "allocator_overhead", "cublas_workspace", "nccl_buffers", "vllm_reserved")),
                   key=lambda k: bd[k], default="weights")
    est = MemoryEstimate(
        model_id=model.model_id,
        setup_summary=setup.short(),
        tier=step.tier,
        num_parameters=step.num_parameters,
        trainable_parameters=step.trainable_parameters,
        peak_allocated_gib=round(allocated / gib, 3),
        peak_reserved_gib=round(reserved / gib, 3),
        device_total_gib=round(total / gib, 3),
        rank=step.rank if step.rank is not None else (0 if (setup.zero_stage or setup.fsdp != "none") and setup.num_gpus > 1 else None),
        breakdown=breakdown,
        uncertainty=unc,
        dominant=dominant,
        provenance=provenance,
        loss_impl=setup.loss_impl if setup.task == "causal-lm" else None,
    )
    if hardware is not None:
        mem = hardware.gpu.memory_gib
        est.gpu, est.gpu_memory_gib = hardware.gpu.name, mem
        est.headroom_gib = round(mem - total / gib, 3)
        est.fits = total / gib + safety_margin * mem <= mem
        if any("vLLM will not start" in n for n in provenance):
            est.fits = False  # colocated vLLM cannot hold its own weights and KV cache in its fraction
        _add_time(est, model, setup, hardware, step)
    if host_offload is None and step.rank is not None and setup.offload != "none":
        host_offload = dict(step.offloaded_bytes)  # the sharded dry run counted them (tools.memory.distributed)
    _host_ram(est, model, setup, step, host_ram_gib if host_ram_gib is not None else (hardware.host_ram_gib if hardware else None),
              dataset_tokens, dataset_examples, host_offload)
    if advice:
        est.advice = _advice(model, setup, bd, dominant, total)
    return est


def _nccl_bytes(setup: TrainingSetup, hardware: HardwareSpec | None) -> tuple[float, str]:
    """NCCL's own device buffers per GPU (one communicator) and the provenance line: the NVLink figure
    measured with PyTorch (2 ranks / more) unless the GPU is known to talk over PCIe (fewer channels)."""
    gib = float(BYTES_PER_GIB)
    if hardware is not None and not hardware.gpu.nvlink_gbs:
        c = _const("nccl_buffers_gib")
        return float(c["value"]) * gib, f"nccl_buffers_gib = {c['value']} ({hardware.gpu.name}: PCIe, 2 channels); source: {c['source']}"
    c = _const("nccl_buffers_nvlink_mib")
    mib = c["two_ranks"] if setup.num_gpus == 2 else c["more_ranks"]
    where = hardware.gpu.name + ": NVLink" if hardware is not None else "GPU not given: the NVLink figure"
    return float(mib) * MIB, f"nccl_buffers = {mib} MiB ({where}, {setup.num_gpus} ranks); source: {c['source']}"


def _allocator_overhead(step: StepMemory, setup: TrainingSetup, allocated: float) -> tuple[float, str]:
    """Reserved minus allocated, with the provenance line saying how: PyTorch's caching allocator replayed over
    the simulated allocation order where the flat factor is weakest (a sharded step: FSDP's all-gather and
    reduce-scatter streams keep freed blocks from being reused), else the calibrated flat factor.

    TUNEPILOT_ALLOCATOR=replay uses the replay wherever a simulated step has one, =flat never."""
    import os

    frag = _const("allocator_fragmentation")
    seg = _const("allocator_segments_mib")
    flat = allocated * float(frag["value"]) + float(seg["value"]) * MIB
    sharded = bool(setup.zero_stage or setup.fsdp != "none")
    mode = os.environ.get("TUNEPILOT_ALLOCATOR", "auto")
    replayed = step.allocator_overhead_bytes
    if replayed is None:
        why = "no allocation order: analytic tier"
    elif mode == "flat":
        why = "TUNEPILOT_ALLOCATOR=flat"
    elif sharded and getattr(step, "world_size", 1) != setup.num_gpus:
        why = "the step was not simulated sharded"
    elif mode == "auto" and not sharded:
        why = "one GPU, one stream: the calibrated factor"
    else:
        return float(replayed), ("allocator_overhead: PyTorch's caching allocator replayed over the simulated allocation "
                                 "order (tools/memory/allocator.py: 512 B rounding, 2/20 MiB segments, best-fit splitting, "
                                 f"per-stream pools): {replayed / MIB:.0f} MiB reserved beyond the live bytes")
    return flat, (f"allocator_overhead: flat {frag['value']} x allocated + {seg['value']} MiB ({why}); "
                  f"source: {frag['source']}")


def vllm_floor_fraction(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec) -> float:
    """The smallest vllm_gpu_memory_utilization vLLM can start with: its bf16 weights, the KV cache of one generation
    batch at full length, and ~1.5 GiB of activations and CUDA graphs, as a fraction of the GPU."""
    from tools.analytic import kv_cache_bytes

    tp = max(1, setup.vllm_tensor_parallel_size)
    weights = 2.0 * model.num_parameters / tp
    kv = kv_cache_bytes(model, setup.model_copy(update={"dtype": "bf16"}), max(1, setup.grpo_generation_batch // setup.num_gpus),
                        setup.prompt_length + setup.max_completion_length) / tp
    return (weights + kv + 1.5 * 2**30) / (hardware.gpu.memory_gib * 2**30)


def _vllm_reserved(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec | None, bd: dict[str, float], provenance: list[str]) -> float:
    """GRPO with colocated vLLM: vllm_gpu_memory_utilization x the GPU's memory is vLLM's (weights + KV cache), on every GPU."""
    if setup.objective != "grpo" or not setup.use_vllm:
        return 0.0
    if setup.vllm_mode == "server":
        provenance.append(f"vLLM server mode: generation runs on {setup.vllm_server_gpus} other GPU(s), not counted here (per training GPU)")
        return 0.0
    if hardware is None:
        provenance.append(f"colocated vLLM takes vllm_gpu_memory_utilization={setup.vllm_gpu_memory_utilization:g} of each GPU's "
                          "memory on top of this estimate (give --gpu to count it)")
        return 0.0
    reserved = setup.vllm_gpu_memory_utilization * hardware.gpu.memory_gib * float(BYTES_PER_GIB)
    bd["vllm_reserved"] = reserved
    floor = vllm_floor_fraction(model, setup, hardware)
    if floor > setup.vllm_gpu_memory_utilization:
        provenance.append(f"vllm_gpu_memory_utilization {setup.vllm_gpu_memory_utilization:g} is below what vLLM needs for its bf16 "
                          f"weights and one generation batch's KV cache (~{floor:.2f} of {hardware.gpu.memory_gib:g} GiB): vLLM will not start")
    provenance.append(f"colocated vLLM: vllm_gpu_memory_utilization {setup.vllm_gpu_memory_utilization:g} x "
                      f"{hardware.gpu.memory_gib:g} GiB = {reserved / BYTES_PER_GIB:.1f} GiB reserved by vLLM (its weights and KV cache)")
    return reserved


def _host_ram(est: MemoryEstimate, model: ModelSpec, setup: TrainingSetup, step: StepMemory, available: float | None,
              dataset_tokens: int | None, dataset_examples: int | None, offload: dict[str, int] | None) -> None:
    """Fill the estimate's host RAM fields (per node) and, when the host's RAM is known, say whether it fits."""
    from tools.memory.host import host_memory

    gib = float(BYTES_PER_GIB)
    hm = host_memory(model, setup, step, offload=offload, dataset_tokens=dataset_tokens, dataset_examples=dataset_examples)
    est.host_ram_gib = round(hm.total_bytes / gib, 3)
    est.host_breakdown = {k: round(v / gib, 3) for k, v in hm.breakdown.items()}
    est.host_phase = hm.phase
    est.host_page_cache_gib = round(hm.page_cache_bytes / gib, 3)
    other = hm.training_bytes if hm.phase == "loading" else hm.loading_bytes
    est.provenance.append(f"host RAM per node: {hm.total_bytes / gib:.1f} GiB at {hm.phase} "
                          f"({'training' if hm.phase == 'loading' else 'loading'}: {other / gib:.1f} GiB), "
                          f"+ {hm.page_cache_bytes / gib:.1f} GiB reclaimable page cache")
    est.provenance += [f"host RAM: {n}" for n in hm.notes]
    if available is not None:
        est.host_ram_available_gib = round(float(available), 3)
        est.host_fits = hm.total_bytes / gib <= available
        if not est.host_fits:
            est.provenance.append(f"host RAM: the run needs {hm.total_bytes / gib:.1f} GiB per node at {hm.phase} but the host "
                                  f"has {available:.1f} GiB: it will be killed (OOM) there")
            if est.fits is not None:
                est.fits = False


def _add_time(est: MemoryEstimate, model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec, step: StepMemory) -> None:
    """Step time and tokens/s on `hardware`: the op-roofline model of the simulated step's op trace
    (tools.memory.timing), or the flat-factor fallback for the analytic tier (tools.throughput)."""
    from tools.throughput import estimate_throughput

    try:
        thr = estimate_throughput(model, setup, hardware, step=step)
    except TunepilotError as e:
        est.time_notes = [f"no time estimate: {e}"]
        return
    est.step_seconds = None if thr.step_seconds is None else round(thr.step_seconds, 6)
    est.tokens_per_second = round(thr.tokens_per_second, 3)
    est.time_breakdown = thr.time_breakdown
    est.time_model = thr.time_model
    est.time_calibrated = thr.calibrated
    est.time_notes = list(thr.notes)


def _variants(setup: TrainingSetup, dominant: str) -> list[tuple[str, dict]]:
    """Changes worth trying for the dominant component, as (description, field overrides)."""
    v: list[tuple[str, dict]] = []
    b, s = setup.per_device_train_batch_size, setup.max_length
    if dominant in ("activations", "logits_loss", "temporaries"):
        if dominant == "logits_loss" and setup.task == "causal-lm" and setup.loss_impl == "hf":
            v.append(("trl's fused cross-entropy (loss_impl=trl_fused, no full logits)", {"loss_impl": "trl_fused"}))
        if not setup.gradient_checkpointing and dominant == "activations":
            v.append(("gradient checkpointing", {"gradient_checkpointing": True}))
        if setup.attn_implementation == "eager":
            v.append(("attn_implementation=sdpa (no s^2 scores)", {"attn_implementation": "sdpa"}))
        if b > 1:
            v.append((f"micro-batch {max(1, b // 2)} with gradient_accumulation_steps x2",
                      {"per_device_train_batch_size": max(1, b // 2), "gradient_accumulation_steps": setup.gradient_accumulation_steps * 2}))
        if s > 256:
            v.append((f"max_length {s // 2}", {"max_length": s // 2}))
    if dominant in ("weights", "zero_buffers"):
        if setup.method == "full":
            v.append(("LoRA instead of full fine-tuning", {"method": "lora"}))
        if setup.method in ("lora", "dora") and setup.dtype != "fp32":
            v.append(("QLoRA (4-bit base weights)", {"method": "qlora", "load_in_4bit": True, "use_dora": False}))
        if setup.dtype == "fp32" and not setup.load_in_4bit:
            v.append(("loading weights in bf16", {"dtype": "bf16"}))
        if setup.num_gpus > 1 and setup.zero_stage < 3 and setup.fsdp == "none":
            v.append(("ZeRO-3 (shard weights)", {"zero_stage": 3}))
    if dominant in ("optimizer_state", "gradients"):
        if setup.method == "full":
            v.append(("LoRA instead of full fine-tuning", {"method": "lora"}))
        if "8bit" not in setup.optim and setup.optim not in ("sgd", "adafactor"):
            v.append(("an 8-bit optimizer (paged_adamw_8bit)", {"optim": "paged_adamw_8bit"}))
        if setup.num_gpus > 1 and setup.zero_stage < 2 and setup.fsdp == "none":
            v.append(("ZeRO-2 (shard gradients and optimizer states)", {"zero_stage": 2}))
    return v


def _advice(model: ModelSpec, setup: TrainingSetup, bd: dict[str, float], dominant: str, total: float) -> str:
    """One line: what dominates and which single change cuts the most (re-estimated with the analytic tier)."""
    gib = float(BYTES_PER_GIB)
    compute = {k: v for k, v in bd.items()}
    share = 100.0 * compute.get(dominant, 0.0) / total if total else 0.0
    head = f"{_LABELS.get(dominant, dominant)} dominate ({share:.0f}%, {compute.get(dominant, 0.0) / gib:.1f} GiB)"
    best_desc, best_cut = "", 0.0
    base = None
    for desc, change in _variants(setup, dominant):
        try:
            alt = setup.model_copy(update=change)
            alt = TrainingSetup.model_validate(alt.model_dump())
            if base is None:
                base = estimate(model, setup, fast=True, advice=False).device_total_gib
            cut = base - estimate(model, alt, fast=True, advice=False).device_total_gib
        except (TunepilotError, ValueError):
            continue
        if cut > best_cut:
            best_desc, best_cut = desc, cut
    if best_desc:
        return f"{head}: {best_desc} cuts ~{best_cut:.1f} GiB"
    return head
