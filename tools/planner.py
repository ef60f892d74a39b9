"""The planner: search the fine-tuning setups of a model on given GPUs, keep those that fit,
rank them by time to train, and explain the winner and every rejected family.

Search space (joint): method (full / LoRA / QLoRA), QLoRA quantization (nf4 with and without
double quant; fp4 is compared in the advice: same memory as nf4, worse quality), LoRA rank
(8..128) and targets ('all-linear' or the attention projections read from the model's real
module tree), micro-batch x gradient accumulation (micro a power of two,
micro x accum x GPUs = goals.effective_batch), gradient checkpointing, optimizer
(adamw_torch_fused, adamw_bnb_8bit, paged_adamw_8bit; adafactor for full fine-tuning),
precision (bf16 where the GPU has it, else fp16; QLoRA's compute dtype follows), attention
kernel (sdpa; flash_attention_2 on compute capability >= 8.0, same memory) and, on several
GPUs, DDP / ZeRO-2 / ZeRO-3 / FSDP full_shard, with CPU offload only when nothing else fits.

Memory is pruned with the analytic tier (`estimate(..., fast=True)`); for every configuration
the largest micro-batch that fits is found by bisection (memory grows with the micro-batch).
The best few are then confirmed by the simulator (`estimate(..., fast=False)`) when
goals.confirm; one that no longer fits is retried with half the micro-batch, else dropped.
Time comes from `tools.throughput.estimate_throughput`: the op-roofline model (tools/memory/timing.py)
over the analytic op records during the search, and over the dry run's op trace for the candidates
the simulator confirms; candidates rank by that time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from tools import progress
from tools.peft_config import attention_support, loadable_setup
from tools.schemas import (
    BYTES_PER_GIB,
    Candidate,
    HardwareSpec,
    MemoryEstimate,
    ModelSpec,
    Plan,
    PlanGoals,
    ThroughputEstimate,
    TrainingSetup,
    TunepilotError,
)

__all__ = ["plan", "PlanError", "RANKS", "QUALITY_TOLERANCE"]

RANKS = (8, 16, 32, 64, 128)
LORA_OPTIMS = ("adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit")
FULL_OPTIMS = ("adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit", "adafactor")
MIN_SEQ_LEN = 256
MAX_CONFIRM = 2  # simulator runs for the top of the list (each ~1-2 s of CPU for a 70B model)
MAX_SIM_CALLS = 5
# trl refuses to pin more than 60% of host RAM for activation offloading; without a known host RAM the
# planner assumes a 64 GiB machine (a common workstation next to a 24-48 GB card)
OFFLOAD_RAM_FRACTION = 0.6
DEFAULT_HOST_RAM_GIB = 64.0
# Time window within which a higher-quality setup beats a faster one (fraction of the fastest).
QUALITY_TOLERANCE = {"speed": 0.0, "balanced": 0.05, "quality": 0.15}
_METHOD_QUALITY = {"full": 2, "lora": 1, "qlora": 0}
_METHOD_NAME = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


class PlanError(TunepilotError):
    """The goals or hardware cannot be planned for; the message names the field."""


@dataclass(frozen=True)
class _Strategy:
    label: str
    zero_stage: int = 0
    fsdp: str = "none"
    offload: str = "none"

    @property
    def sharded_params(self) -> bool:
        return self.zero_stage == 3 or self.fsdp != "none"  # FSDP shards parameters between steps in both modes


_SINGLE = _Strategy("single GPU")
_MULTI = (
    _Strategy("DDP"),
    _Strategy("ZeRO-2", zero_stage=2),
    _Strategy("ZeRO-3", zero_stage=3),
    _Strategy("FSDP full_shard", fsdp="full_shard"),
)
_OFFLOAD = (
    _Strategy("ZeRO-3 + optimizer offload", zero_stage=3, offload="optimizer"),
    _Strategy("ZeRO-3 + full CPU offload", zero_stage=3, offload="all"),
    _Strategy("FSDP full_shard + CPU offload", fsdp="full_shard", offload="all"),
)


@dataclass
class _Option:
    setup: TrainingSetup
    strategy: _Strategy
    est: MemoryEstimate
    fits: bool
    thr: Optional[ThroughputEstimate] = None
    why: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.setup.method

    @property
    def family(self) -> tuple[str, str]:
        return (self.setup.method, self.strategy.label)

    def time(self) -> float:
        """Hours to train when the dataset size is known, else seconds per token (same order)."""
        if self.thr is None:
            return math.inf
        if self.thr.total_hours is not None:
            return self.thr.total_hours
        return 1.0 / max(self.thr.tokens_per_second, 1e-9)


# --------------------------------------------------------------------------------------
# Engine calls
# --------------------------------------------------------------------------------------


# Fields the step memory of one replica does not depend on (sharding is applied by the estimator).
_SHARDING_FIELDS = {"num_gpus", "num_nodes", "zero_stage", "fsdp", "offload", "gpu", "bnb_4bit_quant_storage"}
_STEP_CACHE: dict[tuple, object] = {}


def _estimate(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec, *, fast: bool) -> MemoryEstimate:
    """Per-GPU estimate; the analytic step of one replica is computed once and re-sharded per strategy."""
    from tools.estimator import estimate

    if not fast:
        return estimate(model, setup, hardware, fast=False, advice=True)
    from tools.analytic import analytic_step_memory

    key = (model.model_id, model.num_parameters, model.num_hidden_layers, model.hidden_size, model.vocab_size,
           repr(sorted(setup.model_dump(exclude=_SHARDING_FIELDS).items())))
    step = _STEP_CACHE.get(key)
    if step is None:
        if len(_STEP_CACHE) > 20000:
            _STEP_CACHE.clear()
        step = _STEP_CACHE[key] = analytic_step_memory(model, setup)
    return estimate(model, setup, hardware, fast=True, advice=False, step=step)


def _throughput(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec, goals: PlanGoals, *,
                simulated: bool = False) -> ThroughputEstimate:
    """Time of a candidate: the op-roofline over the analytic op records (the search), or over the dry
    run's op trace (simulated=True: a candidate the simulator confirmed; its step is cached)."""
    from tools.throughput import estimate_throughput

    step = None
    if simulated:
        from tools.estimator import step_memory

        try:
            step = step_memory(model, setup)[0]
        except TunepilotError:
            step = None
    return estimate_throughput(
        model, setup, hardware, dataset_tokens=_dataset_tokens(goals), price_per_gpu_hour=goals.price_per_gpu_hour,
        step=step,
    )


def _dataset_tokens(goals: PlanGoals) -> Optional[int]:
    if goals.dataset_tokens is not None:
        return goals.dataset_tokens
    if goals.dataset_examples is not None:
        # trained tokens: a DPO / reward pair is 2 rows; a GRPO prompt becomes num_generations completions
        rows = {"dpo": 2, "reward": 2, "grpo": int(goals.objective_knobs.get("num_generations", 8))}.get(goals.objective, 1)
        return goals.dataset_examples * goals.seq_len * rows
    return None


def _usable(hardware: HardwareSpec, goals: PlanGoals) -> float:
    return hardware.gpu.memory_gib * (1.0 - goals.safety_margin)


def _fits(est: MemoryEstimate, hardware: HardwareSpec, goals: PlanGoals) -> bool:
    if hardware.host_ram_gib is not None and est.host_ram_gib > hardware.host_ram_gib:
        return False  # CPU offload needs more host RAM than the machine has
    return est.device_total_gib <= _usable(hardware, goals)


# --------------------------------------------------------------------------------------
# Building setups
# --------------------------------------------------------------------------------------


def _pinned_gib(est: MemoryEstimate) -> float:
    """Pinned host RAM of trl's activation offloading in an estimate (its host_breakdown part)."""
    return float((est.host_breakdown or {}).get("activation_offload", 0.0))


def offload_ram_limit_gib(hardware: HardwareSpec) -> float:
    """Pinned host RAM activation offloading may take per node (trl's 60% guard of the host RAM, or of 64 GiB)."""
    return OFFLOAD_RAM_FRACTION * (hardware.host_ram_gib or DEFAULT_HOST_RAM_GIB)


def _cc(hardware: HardwareSpec) -> float:
    try:
        return float(hardware.gpu.compute_capability or 0)
    except ValueError:
        return 0.0


def _make_setup(
    model: ModelSpec, hardware: HardwareSpec, goals: PlanGoals, *, method: str, strategy: _Strategy,
    micro: int, ckpt: bool, optim: str, r: int = 16, targets="all-linear", double_quant: bool = True,
    quant_type: str = "nf4", num_gpus: Optional[int] = None, attn: str = "sdpa", seq_len: Optional[int] = None,
    act_offload: bool = False,
) -> TrainingSetup:
    n = num_gpus or hardware.num_gpus
    bf16 = hardware.gpu.bf16
    half = "bf16" if bf16 else "fp16"
    mixed = goals.mixed_precision
    per_gpu = goals.effective_batch // n
    kw = dict(
        model_id=model.model_id,
        method=method,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(1, per_gpu // micro),
        max_length=seq_len or goals.seq_len,
        gradient_checkpointing=ckpt,
        activation_offloading=act_offload,
        optim=optim,
        bf16=bf16 and mixed,
        fp16=not bf16 and mixed,
        # full fine-tuning with fp16 AMP needs fp32 master weights (GradScaler refuses fp16 grads);
        # without mixed precision: pure bf16 where the GPU has it, else pure fp32
        dtype=(half if (bf16 or method != "full") else "fp32") if mixed else ("bf16" if bf16 else "fp32"),
        attn_implementation=attn,
        num_train_epochs=goals.num_train_epochs,
        learning_rate=1e-5 if method == "full" else 2e-4,
        num_gpus=n,
        num_nodes=min(hardware.num_nodes, n),
        zero_stage=strategy.zero_stage,
        fsdp=strategy.fsdp,
        fsdp_version=goals.fsdp_version,
        offload=strategy.offload,
        gpu=hardware.gpu.name,
    )
    if method != "full":
        kw.update(r=r, lora_alpha=2 * r, target_modules=targets)
    if method == "qlora":
        kw.update(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=half if (mixed or bf16) else "fp16",
            # FSDP / ZeRO-3 shard only float storages: store the packed 4-bit weights as the compute dtype
            bnb_4bit_quant_storage=half if strategy.sharded_params else "uint8",
        )
    if goals.objective != "sft":  # issue 15: the objective and its fixed knobs, never changed by the search
        kw.update(objective=goals.objective, **goals.objective_knobs)
        if goals.objective in ("dpo", "kto"):
            kw["learning_rate"] = 5e-7 if method == "full" else 5e-6
        elif goals.objective == "grpo":
            kw["learning_rate"] = 1e-6 if method == "full" else 1e-5
    # no dropout on fused MoE experts, eager where transformers has no sdpa / flash-attention kernel
    return loadable_setup(model, TrainingSetup(**kw))[0]


def _objective_levers(setup: TrainingSetup, goals: PlanGoals, model: ModelSpec, hardware: HardwareSpec) -> list[TrainingSetup]:
    """Variants of a candidate that save memory without changing its objective, smallest change first (issue 15):
    DPO/KTO precompute the reference log-probs (no reference copy, no reference forward in the step); GRPO generates
    fewer completions at once (a smaller KV cache; whole groups, a multiple of the global batch) or, with colocated
    vLLM, gives vLLM a smaller fraction of the GPU (never below what its weights and KV cache need)."""
    fixed = set(goals.objective_knobs)
    out: list[TrainingSetup] = []
    if setup.objective in ("dpo", "kto") and setup.reference_mode in ("copy", "peft_base") and "precompute_ref_log_probs" not in fixed:
        out.append(setup.model_copy(update={"precompute_ref_log_probs": True, "ref_model": "auto"}))
    if setup.objective == "grpo":
        if setup.use_vllm and setup.vllm_mode == "colocate" and "vllm_gpu_memory_utilization" not in fixed:
            from tools.estimator import vllm_floor_fraction

            floor = vllm_floor_fraction(model, setup, hardware)
            for frac in (0.25, 0.2, 0.15, 0.1):
                if floor <= frac < setup.vllm_gpu_memory_utilization:
                    out.append(setup.model_copy(update={"vllm_gpu_memory_utilization": frac}))
        if not setup.use_vllm and "generation_batch_size" not in fixed:
            global_batch = setup.per_device_train_batch_size * setup.num_gpus
            step = math.lcm(global_batch, setup.num_generations)
            gen = setup.grpo_generation_batch - step
            while gen >= step:
                out.append(setup.model_copy(update={"generation_batch_size": gen}))
                gen -= step
    return [TrainingSetup.model_validate(v.model_dump()) for v in out]



def _micro_sizes(per_gpu: int) -> list[int]:
    sizes, m = [], 1
    while m <= per_gpu:
        if per_gpu % m == 0:
            sizes.append(m)
        m *= 2
    return sizes


@dataclass
class _Config:
    method: str
    strategy: _Strategy
    ckpt: bool
    optim: str
    r: int = 16
    targets: object = "all-linear"
    double_quant: bool = True
    act_offload: bool = False  # trl's activation offloading (a memory lever: host RAM and PCIe time)


def _configs(methods: list[str], strategies: list[_Strategy], attention: Optional[list[str]]) -> list[_Config]:
    out: list[_Config] = []
    target_sets: list[object] = ["all-linear"] + ([attention] if attention else [])
    for strategy in strategies:
        for method in methods:
            if method != "full" and strategy.zero_stage == 2:
                continue  # PEFT states are tiny: ZeRO-2 saves nothing over DDP and is not faster
            if method == "full":
                optims = FULL_OPTIMS
                if strategy.offload != "none":
                    optims = ("adamw_torch",)  # DeepSpeed swaps in its CPU Adam when states live on the host
                for off in (False, True):
                    for ckpt in (False, True):
                        for optim in optims:
                            out.append(_Config(method, strategy, ckpt, optim, act_offload=off))
                continue
            optims = LORA_OPTIMS if strategy.offload == "none" else ("adamw_torch",)
            for off in (False, True):  # activation offloading after the same configs without it (it only costs time)
                for dq in ((True, False) if method == "qlora" else (True,)):
                    for targets in target_sets:
                        for r in RANKS:  # order matters: _search bounds each config by the ones before it
                            for ckpt in (False, True):
                                for optim in optims:
                                    out.append(_Config(method, strategy, ckpt, optim, r, targets, dq, act_offload=off))
    return out


# --------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------


@dataclass
class _Search:
    fitting: list[_Option]
    leanest: dict[str, _Option]  # method -> least memory option seen (fits or not)
    evaluated: list[_Option]
    count: int = 0  # setups estimated
    space: int = 0  # setups covered (configurations x micro-batch sizes x attention kernels)


def _search(
    model: ModelSpec, hardware: HardwareSpec, goals: PlanGoals, methods: list[str], strategies: list[_Strategy],
    *, attention: Optional[list[str]], seq_len: Optional[int] = None, num_gpus: Optional[int] = None,
    configs: Optional[list[_Config]] = None,
) -> _Search:
    """For every configuration, the largest micro-batch that fits (bisection), with its throughput.

    Memory is monotone, which bounds the bisection and prunes whole configurations: a larger r
    never fits a larger micro-batch than a smaller r (and does not fit at all when the smaller
    did not); checkpointing and 8-bit optimizer states never fit a smaller one than no
    checkpointing / fused AdamW. Time is monotone too: when fused AdamW without checkpointing
    already reaches the largest micro-batch, the checkpointed / 8-bit variants are only slower
    or identical, and are skipped.
    """
    n = num_gpus or hardware.num_gpus
    micros = _micro_sizes(goals.effective_batch // n)
    top_idx = len(micros) - 1
    result = _Search([], {}, [])
    flash = _cc(hardware) >= 8.0
    reached: dict[tuple, Optional[int]] = {}  # (group, r, ckpt, optim) -> largest fitting micro index (None: none fits)

    all_configs = configs if configs is not None else _configs(methods, strategies, attention)
    result.space = len(all_configs) * len(micros) * (2 if flash else 1)
    for cfg in all_configs:
        group = (cfg.method, cfg.strategy.label, cfg.double_quant, str(cfg.targets), cfg.act_offload)
        if cfg.act_offload:
            plain = reached.get((group[:-1] + (False,), cfg.r, cfg.ckpt, cfg.optim))
            if plain == top_idx:
                reached[(group, cfg.r, cfg.ckpt, cfg.optim)] = top_idx
                continue  # fits the largest micro-batch without offloading: offloading would only cost PCIe time
        heavy_optim = "adamw_torch_fused" if cfg.optim != "adafactor" else None
        lo, hi = 0, top_idx
        known_fit = -1
        prev_r = [x for x in RANKS if x < cfg.r] if cfg.method != "full" else []
        if prev_r:
            above = reached.get((group, prev_r[-1], cfg.ckpt, cfg.optim), "unknown")
            if above is None:
                reached[(group, cfg.r, cfg.ckpt, cfg.optim)] = None
                continue  # the smaller rank did not fit at micro-batch 1: neither does this one
            if above != "unknown":
                hi = above
        if cfg.ckpt:
            plain = reached.get((group, cfg.r, False, cfg.optim))
            if plain == top_idx:
                reached[(group, cfg.r, True, cfg.optim)] = top_idx
                continue  # fits without checkpointing at the largest micro-batch: recompute only costs time
            if plain is not None:
                known_fit = max(known_fit, plain)
        if heavy_optim and cfg.optim != heavy_optim:
            fused = reached.get((group, cfg.r, cfg.ckpt, heavy_optim))
            if fused == top_idx:
                reached[(group, cfg.r, cfg.ckpt, cfg.optim)] = top_idx
                continue  # fused AdamW already fits the largest micro-batch and is as fast
            if fused is not None:
                known_fit = max(known_fit, fused)
        known_fit = min(known_fit, hi)

        def at(micro: int) -> _Option:
            setup = _make_setup(
                model, hardware, goals, method=cfg.method, strategy=cfg.strategy, micro=micro, ckpt=cfg.ckpt,
                optim=cfg.optim, r=cfg.r, targets=cfg.targets, double_quant=cfg.double_quant, num_gpus=n, seq_len=seq_len,
                act_offload=cfg.act_offload,
            )
            est = _estimate(model, setup, hardware, fast=True)
            result.count += 1
            if setup.objective != "sft" and not _fits(est, hardware, goals):
                for lever in _objective_levers(setup, goals, model, hardware):
                    alt = _estimate(model, lever, hardware, fast=True)
                    result.count += 1
                    if _fits(alt, hardware, goals):
                        setup, est = lever, alt
                        break
            fits = _fits(est, hardware, goals)
            if cfg.act_offload and _pinned_gib(est) > offload_ram_limit_gib(hardware):
                fits = False  # the offloaded activations must fit in pinned host RAM
            opt = _Option(setup, cfg.strategy, est, fits)
            result.evaluated.append(opt)
            lean = result.leanest.get(cfg.method)
            if lean is None or est.device_total_gib < lean.est.device_total_gib:
                result.leanest[cfg.method] = opt
            return opt

        best: Optional[_Option] = None
        try:
            if known_fit < 0:
                first = at(micros[0])
                if not first.fits:
                    reached[(group, cfg.r, cfg.ckpt, cfg.optim)] = None
                    continue
                best, lo = first, 0
            else:
                lo = known_fit
            while lo < hi:  # largest micro-batch that fits (memory grows with it)
                mid = (lo + hi + 1) // 2
                opt = at(micros[mid])
                if opt.fits:
                    best, lo = opt, mid
                else:
                    hi = mid - 1
            if best is None or best.setup.per_device_train_batch_size != micros[lo]:
                best = at(micros[lo])
        except TunepilotError:
            continue  # e.g. targets the analytic tier cannot place: skip this configuration
        reached[(group, cfg.r, cfg.ckpt, cfg.optim)] = lo
        if not best.fits:  # a bound from a neighbour was wrong (non-monotone estimate): trust the estimate
            continue
        best.thr = _throughput(model, best.setup, hardware, goals)
        if flash and attention_support(model.model_type)[1]:
            fa = best.setup.model_copy(update={"attn_implementation": "flash_attention_2"})
            thr = _throughput(model, fa, hardware, goals)
            if thr.tokens_per_second > best.thr.tokens_per_second * 1.001:
                best.setup, best.thr = fa, thr
        result.fitting.append(best)
    return result


def _quality(opt: _Option, mode: str) -> tuple:
    s = opt.setup
    method = _METHOD_QUALITY.get(s.method, 0)
    all_linear = 1 if s.target_modules == "all-linear" or s.method == "full" else 0
    if mode == "quality":
        r = s.r if s.method != "full" else 1024
    else:  # balanced: the common default r=16 over extremes
        r = -abs(math.log2(s.r) - 4) if s.method != "full" else 0
    return (method, all_linear, r)


def _order(options: list[_Option], goals: PlanGoals) -> list[_Option]:
    """Rank fitting options. speed: fastest first. balanced/quality: every option within 5%/15% of
    the fastest time is ranked ahead of the rest by quality (full > LoRA > QLoRA, all-linear over
    attention-only, then r nearest 16 for balanced or the larger r for quality), then by time."""
    if not options:
        return []
    fastest = min(o.time() for o in options)
    tol = QUALITY_TOLERANCE[goals.quality]

    def key(o: _Option):
        in_band = o.time() <= fastest * (1 + tol) + 1e-12
        q = _quality(o, goals.quality)
        if goals.quality == "speed" or not in_band:
            return (0 if in_band else 1, o.time(), tuple(-x for x in q))
        return (0, tuple(-x for x in q), o.time())

    return sorted(options, key=key)


def _config_key(o: _Option) -> tuple:
    s = o.setup
    return (s.method, o.strategy.label, str(s.target_modules), s.gradient_checkpointing, s.activation_offloading)


def _select(ranked: list[_Option], top: int) -> list[_Option]:
    """Best first; the best of each method and of each strategy family kept; then by rank without near-duplicates."""
    chosen: list[_Option] = []
    for key in (lambda o: o.method, lambda o: o.strategy.label):
        seen = {key(o) for o in chosen}
        for o in ranked:
            if key(o) not in seen:
                chosen.append(o)
                seen.add(key(o))
    if ranked and ranked[0] not in chosen:
        chosen.insert(0, ranked[0])
    fastest = min(ranked, key=lambda o: o.time(), default=None)
    if fastest is not None and fastest not in chosen:
        chosen.append(fastest)  # the advice compares the winner with it
    seen_cfg = {_config_key(o) for o in chosen}
    for o in ranked:
        if len(chosen) >= max(top, 1) * 3:
            break
        if o not in chosen and _config_key(o) not in seen_cfg:
            chosen.append(o)
            seen_cfg.add(_config_key(o))
    order = {id(o): i for i, o in enumerate(ranked)}
    chosen.sort(key=lambda o: order[id(o)])
    # keep the per-method bests (and the fastest) within `top` even when strategies crowd the list
    head = chosen[:top]

    def ensure(o: _Option) -> None:
        if o in head:
            return
        if len(head) < top:
            head.append(o)
        else:  # replace the lowest-ranked entry whose method is represented twice (never the winner)
            for i in range(len(head) - 1, 0, -1):
                if head[i].method != o.method and sum(1 for h in head if h.method == head[i].method) > 1 \
                        or head[i].method == o.method and head[i] is not fastest:
                    head[i] = o
                    break
        head.sort(key=lambda x: order[id(x)])

    for o in chosen[top:]:
        if o.method not in {h.method for h in head}:
            ensure(o)
    if fastest is not None and top > 1:
        ensure(fastest)
    return head


# --------------------------------------------------------------------------------------
# Confirmation with the simulator
# --------------------------------------------------------------------------------------


def _confirm(model, hardware, goals, selected: list[_Option], ranked: list[_Option], advice_notes: list[str]) -> list[_Option]:
    """Re-estimate the top candidates with the simulator; the winner is the best confirmed one.

    A candidate the simulator finds over the limit is retried with half the micro-batch (twice
    the accumulation), or dropped at micro-batch 1; the next analytic candidates fill in, within
    MAX_SIM_CALLS simulator runs. Returns [] when no candidate survives.
    """
    confirmed: list[_Option] = []
    pending = list(selected)
    backlog = [o for o in ranked if o not in selected]
    sims = 0
    while sims < MAX_SIM_CALLS and len(confirmed) < min(MAX_CONFIRM, len(selected)) and (pending or backlog):
        opt = pending.pop(0) if pending else backlog.pop(0)
        sims += 1
        progress.note(f"confirming the top {min(MAX_CONFIRM, len(selected))} with the simulator: "
                      f"{len(confirmed) + 1}/{min(MAX_CONFIRM, len(selected))}, {opt.setup.method} "
                      f"b={opt.setup.per_device_train_batch_size}")
        try:
            est = _estimate(model, opt.setup, hardware, fast=False)
        except TunepilotError as e:
            advice_notes.append(f"The simulator could not run {opt.setup.short()} ({e}); its analytic estimate is kept.")
            confirmed.append(opt)
            continue
        except Exception as e:  # noqa: BLE001 - a simulator fault must not lose the plan; it is reported
            advice_notes.append(f"The simulator failed on {opt.setup.short()} ({type(e).__name__}: {e}); "
                                "its analytic estimate is kept (please report this).")
            confirmed.append(opt)
            continue
        if _fits(est, hardware, goals):
            opt.est = est
            opt.thr = _throughput(model, opt.setup, hardware, goals, simulated=True)  # ranked by the traced step's time
            confirmed.append(opt)
            continue
        micro = opt.setup.per_device_train_batch_size
        note = (f"The simulator measures {est.device_total_gib:.1f} GiB per GPU for {opt.setup.short()} "
                f"(analytic {opt.est.device_total_gib:.1f}), over the {_usable(hardware, goals):.1f} usable")
        if micro > 1:
            half = opt.setup.model_copy(update={
                "per_device_train_batch_size": micro // 2,
                "gradient_accumulation_steps": opt.setup.gradient_accumulation_steps * 2,
            })
            analytic = _estimate(model, half, hardware, fast=True)
            pending.insert(0, _Option(half, opt.strategy, analytic, True, _throughput(model, half, hardware, goals)))
            advice_notes.append(note + f"; retried with micro-batch {micro // 2}.")
        else:
            advice_notes.append(note + "; dropped.")
    if not confirmed:
        return []
    ordered = _order(confirmed, goals)
    others = _order([o for o in pending if o not in confirmed], goals)
    return (ordered + others)[: max(goals.top, 1)]


# --------------------------------------------------------------------------------------
# Advice
# --------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x:.1f} GiB"


def _fmt_time(thr: Optional[ThroughputEstimate]) -> str:
    if thr is None:
        return "?"
    parts = [f"{thr.tokens_per_second:,.0f} tokens/s"]
    if thr.time_per_epoch_hours is not None and thr.total_hours is not None and abs(thr.total_hours - thr.time_per_epoch_hours) > 1e-9:
        parts.append(f"{thr.time_per_epoch_hours:.1f} h/epoch")
    if thr.total_hours is not None:
        parts.append(f"{thr.total_hours:.1f} h")
    if thr.cost is not None:
        parts.append(f"${thr.cost:,.2f}" if thr.cost < 100 else f"${thr.cost:,.0f}")
    return ", ".join(parts)


def _hardware_label(hardware: HardwareSpec, num_gpus: Optional[int] = None, gpu=None) -> str:
    gpu = gpu or hardware.gpu
    n = num_gpus or hardware.num_gpus
    return f"{n}x {gpu.name} ({gpu.memory_gib:g} GiB)"


def _rejected_reason(model, hardware, goals, method: str, search: _Search) -> str:
    lean = search.leanest.get(method)
    usable = _usable(hardware, goals)
    if lean is None:
        return f"{_METHOD_NAME[method]}: not evaluated (the analytic tier could not model it for this architecture)."
    b = lean.est.breakdown
    dominant = max(b, key=b.get) if b else "?"
    text = (f"{_METHOD_NAME[method]} does not fit: even the leanest setup ({lean.setup.short()}) needs "
            f"{_gib(lean.est.device_total_gib)} per GPU, over the {_gib(usable)} usable of {hardware.gpu.memory_gib:g} GiB "
            f"(largest part: {dominant} {_gib(b.get(dominant, 0.0))})")
    if method == "full":
        adam = [o for o in search.evaluated if o.setup.method == "full" and o.setup.optim == "adamw_torch_fused"]
        if adam:
            states = min(o.est.breakdown.get("optimizer_state", 0.0) for o in adam)
            weights = min(o.est.breakdown.get("weights", 0.0) for o in adam)
            text += f"; with AdamW the optimizer states alone take {_gib(states)} per GPU on top of {_gib(weights)} of weights"
    return text + "."


def _lost_reason(o: _Option, winner: _Option, goals: PlanGoals) -> str:
    slower = (o.time() / winner.time() - 1) * 100 if winner.time() > 0 else 0.0
    name = _METHOD_NAME.get(o.method, o.method)
    pace = f"is {slower:.0f}% slower than" if slower >= 0.5 else f"is {-slower:.0f}% faster than" if slower <= -0.5 else "is as fast as"
    text = (f"{name} fits ({o.setup.short()}: {_gib(o.est.device_total_gib)} per GPU, {_fmt_time(o.thr)}) "
            f"but {pace} the winner")
    if o.setup.offload != "none":
        text += f"; its CPU offload needs {_gib(o.est.host_ram_gib)} of host RAM (the winner {_gib(winner.est.host_ram_gib)})"
    if slower <= -0.5:
        text += (f"; it ranks lower because the winner is within the time a '{goals.quality}' plan trades for quality "
                 "(full > LoRA > QLoRA, all-linear, rank); use --quality speed to rank by time alone")
    elif o.method == "qlora":
        text += "; 4-bit de-quantisation costs speed, QLoRA only pays off when LoRA does not fit"
    elif o.method == "full" and _METHOD_QUALITY[o.method] > _METHOD_QUALITY.get(winner.method, 0):
        text += f", beyond the {QUALITY_TOLERANCE['quality'] * 100:.0f}% a --quality quality plan would trade for it"
    return text + "."


def _ckpt_reason(winner: _Option, search: _Search) -> str:
    same = [o for o in search.evaluated if not o.setup.gradient_checkpointing and _same_config(o.setup, winner.setup)]
    fit = [o for o in same if o.fits]
    if not fit:
        lean = min(same, key=lambda o: o.est.device_total_gib, default=None)
        if lean is None:
            return "gradient checkpointing is on (recomputes activations in backward)"
        return (f"gradient checkpointing is needed: without it even micro-batch {lean.setup.per_device_train_batch_size} "
                f"needs {_gib(lean.est.device_total_gib)} per GPU")
    best = max(fit, key=lambda o: o.setup.per_device_train_batch_size)
    return (f"gradient checkpointing is on because it allows micro-batch {winner.setup.per_device_train_batch_size}, "
            f"faster overall than micro-batch {best.setup.per_device_train_batch_size} without it")


def _same_config(a: TrainingSetup, b: TrainingSetup) -> bool:
    keys = ("method", "r", "target_modules", "optim", "bnb_4bit_use_double_quant", "zero_stage", "fsdp", "offload", "max_length",
            "activation_offloading")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _winner_reason(winner: _Option, ranked: list[_Option], hardware, goals, search: _Search) -> str:
    fastest = min(ranked, key=lambda o: o.time())
    usable = _usable(hardware, goals)
    b = winner.est.breakdown
    dominant = max(b, key=b.get) if b else "?"
    text = (f"Recommended: {winner.setup.short()} on {_hardware_label(hardware, winner.setup.num_gpus)}: "
            f"{_gib(winner.est.device_total_gib)} per GPU of {_gib(usable)} usable "
            f"({winner.est.headroom_gib if winner.est.headroom_gib is not None else hardware.gpu.memory_gib - winner.est.device_total_gib:.1f} GiB headroom, "
            f"{winner.est.tier}; largest part {dominant} {_gib(b.get(dominant, 0.0))}), {_fmt_time(winner.thr)}. ")
    pct = (winner.time() / fastest.time() - 1) * 100
    if fastest is winner or pct < 0.5:
        text += "It is the fastest setup that fits" if fastest is winner else "It is as fast as any setup that fits"
    else:
        text += (f"It is {pct:.0f}% slower than the fastest ({fastest.setup.short()}) but within the "
                 f"{QUALITY_TOLERANCE[goals.quality] * 100:.0f}% a '{goals.quality}' plan trades for quality "
                 "(full > LoRA > QLoRA, all-linear, rank)")
    if winner.setup.gradient_checkpointing:
        text += "; " + _ckpt_reason(winner, search)
    if winner.strategy.offload != "none":
        text += f"; CPU offload ({winner.strategy.offload}) is a last resort: slow and needs {_gib(winner.est.host_ram_gib)} of host RAM"
        needs = [f"{_METHOD_NAME[m]} {_gib(o.est.device_total_gib)} ({o.setup.short()})"
                 for m, o in sorted(search.leanest.items(), key=lambda kv: kv[1].est.device_total_gib)]
        if needs:
            text += ". Without offload the leanest setups need, per GPU: " + "; ".join(needs)
    return text + "."


def _largest_micro(model, hardware, goals, setup: TrainingSetup) -> Optional[int]:
    """Largest micro-batch (keeping the effective batch) at which `setup` fits, by the analytic tier; None if none."""
    per_gpu = max(1, goals.effective_batch // setup.num_gpus)
    for m in reversed(_micro_sizes(per_gpu)):
        alt = setup.model_copy(update={"per_device_train_batch_size": m, "gradient_accumulation_steps": max(1, per_gpu // m)})
        est = _estimate(model, alt, hardware, fast=True)
        if _fits(est, hardware, goals) and (not alt.activation_offloading or _pinned_gib(est) <= offload_ram_limit_gib(hardware)):
            return m
    return None


def _lever_advice(model, hardware, goals, winner: _Option) -> list[str]:
    """What the memory levers (loss path, activation offloading) do for the winner, in GiB and micro-batches."""
    s = winner.setup
    if s.task != "causal-lm":
        return []
    out: list[str] = []
    try:
        base = _estimate(model, s, hardware, fast=True).device_total_gib
        mine = _largest_micro(model, hardware, goals, s)
        hf = s.model_copy(update={"loss_impl": "hf"})
        hf_gib = _estimate(model, hf, hardware, fast=True).device_total_gib
        hf_micro = _largest_micro(model, hardware, goals, hf)
        text = (f"Loss: trl's fused cross-entropy (SFTTrainer's default, no extra dependency): "
                f"-{hf_gib - base:.1f} GiB vs transformers' full-logits loss (loss_impl=hf, {_gib(hf_gib)})")
        if mine and mine != hf_micro:
            text += f", lets micro-batch {mine} fit" + (f" (hf: {hf_micro})" if hf_micro else " (with hf nothing fits)")
        others = []
        for impl, pkg in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
            alt = _estimate(model, s.model_copy(update={"loss_impl": impl}), hardware, fast=True).device_total_gib
            others.append(f"{impl} {alt - base:+.1f} GiB (needs {pkg}, CUDA only)")
        out.append(text + "; " + ", ".join(others) + ": the plan keeps to what the script installs by default.")
        if s.activation_offloading:
            plain = s.model_copy(update={"activation_offloading": False})
            p_est = _estimate(model, plain, hardware, fast=True)
            w_est = winner.est
            verdict = "fits" if _fits(p_est, hardware, goals) else "does not fit"
            limit = offload_ram_limit_gib(hardware)
            ram = f"{hardware.host_ram_gib:g} GiB host RAM" if hardware.host_ram_gib else f"{DEFAULT_HOST_RAM_GIB:g} GiB host RAM assumed"
            slow = ""
            if winner.thr is not None:
                p_thr = _throughput(model, plain, hardware, goals)
                slow = f", {100 * (1 - winner.thr.tokens_per_second / p_thr.tokens_per_second):.0f}% slower (PCIe)"
            out.append(f"Activation offloading (trl SFTConfig.activation_offloading, no extra dependency): "
                       f"-{p_est.device_total_gib - w_est.device_total_gib:.1f} GiB on the GPU (without it {_gib(p_est.device_total_gib)}: {verdict}), "
                       f"+{_pinned_gib(w_est):.1f} GiB pinned host RAM (limit {limit:.0f} GiB: 60% of {ram}){slow}.")
    except TunepilotError:
        return out
    return out


def _quant_variants_advice(model, hardware, goals, winner: _Option) -> Optional[str]:
    if winner.method != "qlora":
        return None
    s = winner.setup
    notes = []
    try:
        if s.bnb_4bit_use_double_quant:
            no_dq = _estimate(model, s.model_copy(update={"bnb_4bit_use_double_quant": False}), hardware, fast=True)
            notes.append(f"without double quantization it needs {_gib(no_dq.device_total_gib)} "
                         f"(+{no_dq.device_total_gib - winner.est.device_total_gib:.2f} GiB)")
        fp4 = _estimate(model, s.model_copy(update={"bnb_4bit_quant_type": "fp4"}), hardware, fast=True)
        notes.append(f"fp4 takes the same {_gib(fp4.device_total_gib)} as nf4 but fits normally distributed weights worse (QLoRA paper), so nf4 is used")
    except TunepilotError:
        return None
    return "QLoRA quantization: " + "; ".join(notes) + "."


def _host_advice(hardware: HardwareSpec, goals: PlanGoals, winner: _Option) -> str:
    """Host RAM per node of the winner: its peak and parts, the page cache the checkpoint and dataset use."""
    from tools.memory.host import dataset_page_cache_bytes

    e, s = winner.est, winner.setup
    parts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in sorted(e.host_breakdown.items(), key=lambda kv: -kv[1]) if v >= 0.05)
    notes: list[str] = []
    data = dataset_page_cache_bytes(s, goals.dataset_tokens, goals.dataset_examples, notes) / BYTES_PER_GIB
    text = f"Host RAM: {_gib(e.host_ram_gib)} per node at {e.host_phase or 'loading'} ({parts})"
    cache = e.host_page_cache_gib + data
    text += f"; the memory-mapped checkpoint{' and tokenized dataset' if data else ''} add {_gib(cache)} of reclaimable page cache"
    if hardware.host_ram_gib is not None:
        text += (f"; fits the host's {_gib(hardware.host_ram_gib)}" if e.host_ram_gib <= hardware.host_ram_gib
                 else f"; more than the host's {_gib(hardware.host_ram_gib)}")
    return text + "."


def _flash_advice(hardware: HardwareSpec, winner: _Option) -> Optional[str]:
    if winner.setup.attn_implementation == "eager":
        return ("Attention: eager; transformers supports neither sdpa nor (here) flash_attention_2 for this model, "
                "so attention memory grows with seq_len squared.")
    if _cc(hardware) >= 8.0 and winner.setup.attn_implementation == "sdpa":
        return ("Attention: sdpa (PyTorch's built-in flash kernel). flash_attention_2 also runs on this GPU "
                "(compute capability >= 8.0) with the same memory; it needs `pip install flash-attn`.")
    if _cc(hardware) and _cc(hardware) < 8.0:
        return f"Attention: sdpa; flash_attention_2 needs compute capability >= 8.0 and {hardware.gpu.name} has {hardware.gpu.compute_capability}."
    return None


# --------------------------------------------------------------------------------------
# When nothing fits: the smallest changes that would
# --------------------------------------------------------------------------------------


def _lean_configs(methods: list[str], strategies: list[_Strategy], attention: Optional[list[str]] = None) -> list[_Config]:
    """The least-memory corner of the search space per method and strategy: checkpointing, 8-bit
    states (adafactor for full), and r=16 all-linear or r=8 on the attention projections (the
    smallest adapters) - so when none of these fits, nothing in the full search does either."""
    out = []
    for strategy in strategies:
        for method in methods:
            offload = strategy.offload != "none"
            for off in (False, True):  # and with trl's activation offloading (the saved layer inputs on the host)
                if method == "full":
                    out.append(_Config(method, strategy, True, "adamw_torch" if offload else "adafactor", act_offload=off))
                    continue
                optim = "adamw_torch" if offload else "paged_adamw_8bit"
                out.append(_Config(method, strategy, True, optim, 16, "all-linear", True, act_offload=off))
                out.append(_Config(method, strategy, True, optim, RANKS[0], attention or "all-linear", True, act_offload=off))
    return out


def _quick_fit(model, hardware, goals, methods, *, attention=None, num_gpus=None, seq_len=None) -> tuple[Optional[_Option], Optional[_Option]]:
    """(best lean setup that fits or None, least-memory setup seen) for a hypothetical change."""
    n = num_gpus or hardware.num_gpus
    strategies = [_SINGLE] if n == 1 else [_Strategy("FSDP full_shard", fsdp="full_shard"), _Strategy("ZeRO-3", zero_stage=3)]
    hw = hardware.model_copy(update={"num_gpus": n, "num_nodes": min(hardware.num_nodes, n)})
    if goals.effective_batch % n:
        goals = goals.model_copy(update={"effective_batch": n * max(1, goals.effective_batch // n)})
    s = _search(model, hw, goals, methods, strategies, attention=attention, seq_len=seq_len, num_gpus=n,
                configs=_lean_configs(methods, strategies, attention))
    ranked = _order(s.fitting, goals)
    lean = min(s.leanest.values(), key=lambda o: o.est.device_total_gib, default=None)
    return (ranked[0] if ranked else None), lean


def _alternatives(model, hardware: HardwareSpec, goals: PlanGoals, methods: list[str], search: _Search,
                  attention: Optional[list[str]] = None) -> list[str]:
    from tools.gpus import gpu_catalog

    out: list[str] = []
    lean = min(search.leanest.values(), key=lambda o: o.est.device_total_gib, default=None)
    usable = _usable(hardware, goals)
    if lean is not None:
        out.append(f"Nothing fits on {_hardware_label(hardware)}: the leanest setup ({lean.setup.short()}) needs "
                   f"{_gib(lean.est.device_total_gib)} per GPU, over the {_gib(usable)} usable "
                   f"({goals.safety_margin * 100:.0f}% kept free). Smallest changes that would fit:")
    # 1. shorter sequences
    seq = goals.seq_len // 2
    while seq >= MIN_SEQ_LEN:
        hit, _ = _quick_fit(model, hardware, goals, methods, attention=attention, seq_len=seq)
        if hit:
            out.append(f"- Shorter sequences: --seq-len {seq} fits with {hit.setup.short()}: "
                       f"{_gib(hit.est.device_total_gib)} per GPU (analytic).")
            break
        seq //= 2
    else:
        out.append(f"- Shorter sequences: even --seq-len {MIN_SEQ_LEN} does not fit.")
    # 2. QLoRA (or LoRA) when the user excluded it: say what it needs, do not switch silently
    for other in ("qlora", "lora"):
        if other in methods:
            continue
        hit, need = _quick_fit(model, hardware, goals, [other], attention=attention)
        if hit:
            out.append(f"- {_METHOD_NAME[other]} (you asked for {goals.method}): {hit.setup.short()} needs "
                       f"{_gib(hit.est.device_total_gib)} per GPU and fits; rerun with --method {other}.")
        elif need is not None:
            out.append(f"- {_METHOD_NAME[other]} (you asked for {goals.method}) would need {_gib(need.est.device_total_gib)} per GPU: does not fit either.")
        if hit:
            break
    # 3. more GPUs of the same kind (sharded)
    for n_total in (2, 4, 8, 16):
        if n_total <= hardware.num_gpus:
            continue
        hit, _ = _quick_fit(model, hardware, goals, methods, attention=attention, num_gpus=n_total)
        if hit:
            out.append(f"- More GPUs: {_hardware_label(hardware, n_total)} with {hit.strategy.label}: {hit.setup.short()} "
                       f"needs {_gib(hit.est.device_total_gib)} per GPU (analytic).")
            break
    else:
        text = f"- More GPUs: even 16x {hardware.gpu.name} do not fit without CPU offload"
        if lean is not None:
            b = lean.est.breakdown
            per_gpu = {k: b.get(k, 0.0) for k in ("activations", "logits_loss", "temporaries")}
            big = max(per_gpu, key=per_gpu.get)
            if per_gpu[big] > 0.25 * lean.est.device_total_gib:
                text += (f": ZeRO-3/FSDP shard weights and optimizer states, not the {big} "
                         f"({_gib(per_gpu[big])}) of each GPU's own micro-batch")
        out.append(text + ".")
    # 4. a GPU with more memory
    bigger = sorted((g for g in gpu_catalog() if g.memory_gib > hardware.gpu.memory_gib), key=lambda g: g.memory_gib)
    for gpu in bigger:
        hw = hardware.model_copy(update={"gpu": gpu})
        hit, _ = _quick_fit(model, hw, goals, methods, attention=attention)
        if hit:
            out.append(f"- A GPU with more memory: {_hardware_label(hardware, gpu=gpu)}: {hit.setup.short()} needs "
                       f"{_gib(hit.est.device_total_gib)} per GPU of {_gib(_usable(hw, goals))} usable (analytic).")
            break
    else:
        out.append(f"- A GPU with more memory: no single GPU in the catalog holds it at {hardware.num_gpus} GPU(s).")
    return out


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def _check_goals(model: ModelSpec, hardware: HardwareSpec, goals: PlanGoals) -> None:
    if goals.seq_len < 16:
        raise PlanError(f"seq_len: {goals.seq_len} tokens is too short to fine-tune on; use at least 16 (typical: 512-8192)")
    if goals.effective_batch % hardware.num_gpus:
        lo = hardware.num_gpus * max(1, goals.effective_batch // hardware.num_gpus)
        raise PlanError(
            f"effective_batch: {goals.effective_batch} sequences cannot be split evenly over {hardware.num_gpus} GPUs; "
            f"use a multiple of {hardware.num_gpus} such as {lo} or {lo + hardware.num_gpus}"
        )
    if model.num_hidden_layers < 1 or model.num_parameters < 1:
        raise PlanError(f"model {model.model_id}: has no layers or parameters to train")


def _attention_names(model: ModelSpec) -> Optional[list[str]]:
    """Attention projection names from the real module tree (None when transformers cannot build it)."""
    try:
        from tools.peft_config import attention_modules

        return attention_modules(model)
    except TunepilotError:
        return None
    except ImportError:  # torch/transformers not installed: light install
        return None


def plan(model: ModelSpec, hardware: HardwareSpec, goals: PlanGoals) -> Plan:
    """Best fine-tuning setups of this model on this hardware, ranked by time to train, each with its memory estimate and time/cost, plus advice: why the winner, why each rejected method, and (when nothing fits) the smallest changes that would fit.

    Ranking: only setups that fit (device total <= GPU memory x (1 - safety_margin)) are ranked.
    quality='speed' ranks purely by estimated time; 'balanced' lets a setup up to 5% slower than
    the fastest win when it is higher quality (full > LoRA > QLoRA, all-linear over attention-only,
    r nearest 16); 'quality' allows 15% and prefers the larger r.
    """
    _check_goals(model, hardware, goals)
    methods = ["full", "lora", "qlora"] if goals.method == "auto" else [goals.method]
    strategies = [_SINGLE] if hardware.num_gpus == 1 else list(_MULTI)
    offload_strategies = list(_OFFLOAD)
    if goals.fsdp is not None and goals.fsdp != "none" and hardware.num_gpus > 1:
        strategies = [_Strategy(f"FSDP {goals.fsdp}", fsdp=goals.fsdp)]
        offload_strategies = [_Strategy(f"FSDP {goals.fsdp} + CPU offload", fsdp=goals.fsdp, offload="all")]
    with progress.status(f"loading transformers to check {model.model_id}'s attention kernels"):
        attention = _attention_names(model)
    if attention and set(attention) == {"all-linear"}:
        attention = None

    with progress.status(f"searching setups of {model.model_id} with the analytic tier"):
        search = _search(model, hardware, goals, methods, strategies, attention=attention)
    advice: list[str] = []
    if hardware.num_gpus > 1:
        # CPU offload only for the methods that fit no other way
        stuck = [m for m in methods if not any(o.method == m for o in search.fitting)]
        if stuck:
            extra = _search(model, hardware, goals, stuck, offload_strategies, attention=None)
            search.fitting.extend(extra.fitting)
            search.evaluated.extend(extra.evaluated)
            search.count += extra.count
            search.space += extra.space

    ranked = _order(search.fitting, goals)
    hw_label = _hardware_label(hardware)
    if not ranked:
        candidates = []
        for m in methods:
            lean = search.leanest.get(m)
            if lean is not None:
                candidates.append(_candidate(model, hardware, goals, lean, fits=False,
                                             why=f"needs {_gib(lean.est.device_total_gib)} per GPU > {_gib(_usable(hardware, goals))} usable"))
        advice.extend(_alternatives(model, hardware, goals, methods, search, attention))
        for m in methods:
            advice.append(_rejected_reason(model, hardware, goals, m, search))
        return Plan(model_id=model.model_id, hardware=hw_label, candidates=candidates, best=None, fits=False, advice=advice)

    selected = _select(ranked, goals.top)
    sim_notes: list[str] = []
    if goals.confirm:
        with progress.status(f"confirming the top {min(MAX_CONFIRM, len(selected))} with the simulator"):
            selected = _confirm(model, hardware, goals, selected, ranked, sim_notes)
        if not selected:  # the simulator rejects every analytic candidate it had time to run
            advice = [f"Nothing confirmed on {hw_label}: the analytic tier found setups that fit, but the simulator "
                      "measured each of the best over the limit."] + sim_notes
            advice.extend(_alternatives(model, hardware, goals, methods, search, attention)[1:])
            return Plan(model_id=model.model_id, hardware=hw_label, candidates=[], best=None, fits=False, advice=advice)
    winner = selected[0]
    advice.append(_winner_reason(winner, ranked, hardware, goals, search))
    for m in methods:
        if m == winner.method:
            continue
        fit_m = [o for o in selected if o.method == m] or [o for o in ranked if o.method == m]
        if fit_m:
            advice.append(_lost_reason(fit_m[0], winner, goals))
        else:
            advice.append(_rejected_reason(model, hardware, goals, m, search))
    if hardware.num_gpus > 1:
        engine = _engine_reason(model, hardware, goals, winner, ranked)
        if engine:
            advice.append(engine)
        advice.extend(_strategy_advice(selected, ranked, winner))
    advice.extend(_lever_advice(model, hardware, goals, winner))
    extra = _quant_variants_advice(model, hardware, goals, winner)
    if extra:
        advice.append(extra)
    fa = _flash_advice(hardware, winner)
    if fa:
        advice.append(fa)
    advice.append(_host_advice(hardware, goals, winner))
    if not hardware.gpu.bf16:
        advice.append(f"Precision: {hardware.gpu.name} has no bf16, so the plan uses fp16 mixed precision"
                      + (" (QLoRA compute dtype fp16)" if any(o.method == "qlora" for o in selected) else "")
                      + (" and fp32 master weights for full fine-tuning" if any(o.method == "full" for o in selected) else "") + ".")
    if hardware.free_memory_gib and min(hardware.free_memory_gib) < winner.est.device_total_gib:
        advice.append(f"Right now a GPU has only {min(hardware.free_memory_gib):.1f} GiB free (other processes hold the rest); "
                      f"the plan needs {_gib(winner.est.device_total_gib)}: free the GPU before training.")
    if model.max_position_embeddings and goals.seq_len > model.max_position_embeddings:
        advice.append(f"seq_len {goals.seq_len} is longer than the {model.max_position_embeddings} positions {model.model_id} was trained for.")
    advice.extend(sim_notes)
    n_sim = sum(1 for o in selected if o.est.tier == "simulated")
    advice.append(f"Searched {search.space:,} candidate setups by estimating {search.count} with the analytic tier "
                  "(memory is monotone in micro-batch, rank, checkpointing and optimizer, so the rest are bounded)"
                  + (f"; confirmed the top {n_sim} with the simulator" if goals.confirm else " (--fast: not confirmed by the simulator)") + ".")

    candidates = []
    for i, o in enumerate(selected):
        why = "recommended" if i == 0 else _short_why(o, winner)
        candidates.append(_candidate(model, hardware, goals, o, fits=True, why=why))
    return Plan(model_id=model.model_id, hardware=hw_label, candidates=candidates, best=candidates[0], fits=True, advice=advice)


def _short_why(o: _Option, winner: _Option) -> str:
    slower = (o.time() / winner.time() - 1) * 100 if winner.time() else 0.0
    name = _METHOD_NAME.get(o.method, o.method)
    pace = (f"{slower:.0f}% slower than the winner" if slower >= 0.5
            else f"{-slower:.0f}% faster than the winner, ranked lower for quality" if slower <= -0.5
            else "as fast as the winner")
    return f"best {name} / {o.strategy.label}: {pace}"


def _engine(setup: TrainingSetup) -> str:
    if setup.fsdp != "none":
        name = f"FSDP{setup.fsdp_version} {setup.fsdp}"
    elif setup.zero_stage:
        name = f"DeepSpeed ZeRO-{setup.zero_stage}"
    else:
        name = "DDP"
    return name + (f" + {setup.offload} offload" if setup.offload != "none" else "")


_PART = {
    "weights": "the weights", "adapters": "the adapters", "gradients": "the gradients", "optimizer_state": "the optimizer states",
    "fsdp_all_gather": "the gathered weights of the units in flight", "fsdp_reduce_scatter": "the reduce-scatter buffers",
    "zero_buckets": "DeepSpeed's communication buckets", "zero_param_partition": "DeepSpeed's 16-bit parameter partitions",
    "zero1_full_gradients": "ZeRO-1's full gradients", "zero_grad_partition": "DeepSpeed's gradient partitions",
    "zero_gathered_params": "the parameters ZeRO-3 holds gathered",
    "zero_buffers": "the sharding buffers",
    "activations": "the activations", "temporaries": "the step temporaries", "allocator_overhead": "the allocator's reserve",
}


def _engine_reason(model, hardware, goals, winner: _Option, ranked: list[_Option]) -> Optional[str]:
    """Which engine (DDP, ZeRO-n, FSDP) the winner uses and why, against the best other engine for the
    same method: both estimated at the winner's setup with the winner's tier (the simulated sharded
    step when the winner was confirmed), so only the engine differs."""
    mine = _engine(winner.setup)
    rival = next((o for o in ranked if o.method == winner.method and _engine(o.setup) != mine), None)
    if rival is None:
        return f"Engine: {mine}, the only multi-GPU engine that fits {_METHOD_NAME.get(winner.method, winner.method)} here."
    swap = {k: getattr(rival.setup, k) for k in ("zero_stage", "fsdp", "fsdp_version", "offload", "bnb_4bit_quant_storage")}
    try:
        alt = TrainingSetup.model_validate(winner.setup.model_copy(update=swap).model_dump())
        alt_est = _estimate(model, alt, hardware, fast=winner.est.tier != "simulated")
    except (TunepilotError, ValueError):
        return None
    w, r = winner.est.device_total_gib, alt_est.device_total_gib
    other = _engine(alt)
    diffs = {k: alt_est.breakdown.get(k, 0.0) - winner.est.breakdown.get(k, 0.0)
             for k in set(alt_est.breakdown) | set(winner.est.breakdown) if k not in ("cuda_context", "nccl_buffers", "cublas_workspace")}
    tier = "simulated" if winner.est.tier == "simulated" else "analytic"
    if r > w:
        k = max(diffs, key=diffs.get)
        why = (f"{_PART.get(k, k)} take {alt_est.breakdown.get(k, 0.0):.1f} GiB per GPU under {other} "
               f"and {winner.est.breakdown.get(k, 0.0):.1f} GiB under {mine}")
        return (f"Engine: {mine}: {100 * (r - w) / r:.0f}% less per GPU than {other} here ({w:.1f} vs {r:.1f} GiB, {tier}, "
                f"same setup otherwise) because {why}.")
    k = min(diffs, key=diffs.get)
    faster = (rival.time() / winner.time() - 1) * 100 if winner.time() else 0.0
    why = (f"it needs {100 * (w - r) / max(w, 1e-9):.0f}% more per GPU than {other} ({w:.1f} vs {r:.1f} GiB, {tier}: "
           f"{_PART.get(k, k)} {winner.est.breakdown.get(k, 0.0):.1f} vs {alt_est.breakdown.get(k, 0.0):.1f} GiB) but fits")
    pace = f" and the best {other} setup is {faster:.0f}% slower" if faster >= 0.5 else ""
    return f"Engine: {mine}: {why}{pace}."


def _strategy_advice(selected: list[_Option], ranked: list[_Option], winner: _Option) -> list[str]:
    out = []
    seen = {winner.strategy.label}
    for o in ranked:
        if o.strategy.label in seen or o.method != winner.method:
            continue
        seen.add(o.strategy.label)
        slower = (o.time() / winner.time() - 1) * 100
        pace = f"is {slower:.0f}% slower than" if slower >= 0.5 else "is as fast as"
        out.append(f"{o.strategy.label} also fits for {_METHOD_NAME[o.method]} ({_gib(o.est.device_total_gib)} per GPU) "
                   f"and {pace} {winner.strategy.label}.")
    return out


def _candidate(model, hardware, goals, o: _Option, *, fits: bool, why: str) -> Candidate:
    thr = o.thr or _throughput(model, o.setup, hardware, goals)
    return Candidate(setup=o.setup, estimate=o.est, throughput=thr, fits=fits, why=why)
