"""An out-of-memory rescue: the smallest change to a setup that makes it fit (journey 3 of SCENARIOS).

`smallest_fix(model, setup, hardware)` tries single changes in the order a person would accept them —
the ones that keep what is trained and how (checkpointing, a smaller micro-batch with the same
effective batch, 8-bit optimizer states, SDPA attention, sharding over the GPUs they have), then the
ones that change the method (QLoRA), the adapter (a smaller r), the offload, and last the data (a
shorter sequence) — each timed by the analytic tier. The first that fits wins; when none fits alone,
they are combined in the same order until it fits. The winner is confirmed by the same tier as the
estimate it rescues (`fast=False`: the dry run), so the number quoted is the engine's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tools.schemas import HardwareSpec, MemoryEstimate, ModelSpec, TrainingSetup, TunepilotError


@dataclass
class Fix:
    """A change that makes a setup fit: what changed (one line each), the new setup and its estimate."""

    changes: list[str]
    setup: TrainingSetup
    estimate: MemoryEstimate
    tried: int = 0
    notes: list[str] = field(default_factory=list)


def _variant(setup: TrainingSetup, update: dict) -> Optional[TrainingSetup]:
    try:
        return TrainingSetup.model_validate(setup.model_dump() | update)
    except (ValueError, TunepilotError):
        return None


def _candidates(setup: TrainingSetup) -> list[tuple[str, dict]]:
    """(what changes, field update) in the order a person would accept them."""
    out: list[tuple[str, dict]] = []
    micro, accum = setup.per_device_train_batch_size, setup.gradient_accumulation_steps
    if not setup.gradient_checkpointing:
        out.append(("gradient checkpointing on (recompute activations in backward, ~1/3 more compute)",
                    {"gradient_checkpointing": True}))
    m = micro // 2
    while m >= 1:
        out.append((f"micro-batch {micro} -> {m} with gradient accumulation {accum} -> {accum * micro // m} "
                    "(same effective batch)", {"per_device_train_batch_size": m, "gradient_accumulation_steps": accum * micro // m}))
        m //= 2
    if "8bit" not in setup.optim and setup.optim not in ("sgd", "adafactor"):
        out.append(("optimizer paged_adamw_8bit (8-bit optimizer states)", {"optim": "paged_adamw_8bit"}))
    if setup.attn_implementation == "eager":
        out.append(("attention sdpa (no seq x seq attention matrix)", {"attn_implementation": "sdpa"}))
    if setup.num_gpus > 1 and setup.fsdp != "full_shard" and setup.zero_stage < 3:
        out.append(("FSDP full_shard over the GPUs (weights, gradients and optimizer states sharded)",
                    {"fsdp": "full_shard", "zero_stage": 0}))
    if setup.method in ("lora", "dora") and not setup.load_in_4bit:
        out.append(("QLoRA: base weights in 4 bit", {"method": "qlora", "load_in_4bit": True}))
    if setup.method in ("lora", "dora", "qlora") and (setup.r or 0) > 16:
        out.append((f"LoRA rank {setup.r} -> 16", {"r": 16, "lora_alpha": min(setup.lora_alpha or 32, 32)}))
    if setup.offload == "none":
        if setup.zero_stage or setup.fsdp != "none":
            out.append(("optimizer states offloaded to host RAM (slower)", {"offload": "optimizer"}))
        else:
            out.append(("FSDP full_shard with the optimizer states offloaded to host RAM (slower)",
                        {"offload": "optimizer", "fsdp": "full_shard", "zero_stage": 0}))
    if setup.method == "full":
        out.append(("LoRA instead of full fine-tuning (no gradients or optimizer states for the base weights)",
                    {"method": "lora"}))
    seq = setup.max_length // 2
    while seq >= 512:
        out.append((f"sequence length {setup.max_length} -> {seq} (check your data's length first)", {"max_length": seq}))
        seq //= 2
    return out


def smallest_fix(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec, *, fast: bool = False,
                 max_changes: int = 4, max_confirmations: int = 3) -> Optional[Fix]:
    """The least disruptive change (or few changes) that makes `setup` fit `hardware`; None when nothing tried fits.

    Candidates are screened by the analytic tier; one that passes is confirmed by the tier of the estimate it
    rescues (`fast=False`: the dry run), and only a confirmed fit is returned (at most `max_confirmations`
    dry runs: a screened fit the dry run refutes is skipped and the search goes on)."""
    from tools.estimator import estimate

    def quick(s: TrainingSetup) -> MemoryEstimate:
        return estimate(model, s, hardware, fast=True, advice=False)

    state = {"tried": 0, "confirmed": 0}

    def confirmed(labels: list[str], s: TrainingSetup) -> Optional[Fix]:
        if fast:
            return Fix(changes=labels, setup=s, estimate=quick(s), tried=state["tried"])
        if state["confirmed"] >= max_confirmations:
            return None
        state["confirmed"] += 1
        final = estimate(model, s, hardware, fast=False, advice=False)
        return Fix(changes=labels, setup=s, estimate=final, tried=state["tried"]) if final.fits else None

    candidates = _candidates(setup)
    for label, update in candidates:  # one change
        variant = _variant(setup, update)
        if variant is None:
            continue
        state["tried"] += 1
        if quick(variant).fits:
            fix = confirmed([label], variant)
            if fix is not None:
                return fix
    # changes combined, in the same order, each kept only when it saves memory
    current, labels = setup, []
    best = quick(setup).device_total_gib
    micro_done = seq_done = False
    for label, update in candidates:
        if "per_device_train_batch_size" in update:
            if micro_done or setup.per_device_train_batch_size == 1:
                continue
            accum = setup.gradient_accumulation_steps * setup.per_device_train_batch_size
            update = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": accum}
            label = (f"micro-batch {setup.per_device_train_batch_size} -> 1 with gradient accumulation "
                     f"{setup.gradient_accumulation_steps} -> {accum} (same effective batch)")
            micro_done = True
        if "max_length" in update:
            if seq_done:
                continue
            seq_done = True
        variant = _variant(current, update)
        if variant is None:
            continue
        state["tried"] += 1
        est = quick(variant)
        if est.device_total_gib < best - 0.05:
            current, best = variant, est.device_total_gib
            labels = labels + [label]
            if est.fits:
                fix = confirmed(labels, current)
                if fix is not None:
                    return fix
        if len(labels) >= max_changes:
            break
    return None
