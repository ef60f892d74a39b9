"""Llama-3.1-8B on one 24 GB and one 80 GB GPU: SFT vs DPO (three reference modes) vs GRPO (colocated vLLM at 0.3,
8 generations of 512 tokens) -- peak per component (simulated dry run) and the largest micro-batch that fits
(analytic tier, confirmed by the simulator at that batch), with published figures where a fully stated setup exists.

    PYTHONPATH=. python bench/bench_objectives.py [--fast] [--gpus "RTX 4090,A100 80GB"]

All rows: LoRA r=16 all-linear, bf16, gradient checkpointing, adamw_torch_fused, sequences of 1024 tokens
(DPO: prompt 512 + answer 512 per chosen/rejected row; GRPO: prompt 512 + completion 512).
"""

from __future__ import annotations

import argparse
import time

from tools.estimator import estimate
from tools.gpus import parse_hardware
from tools.models import lookup_model
from tools.schemas import TrainingSetup

MODEL = "meta-llama/Llama-3.1-8B"
BASE = dict(method="lora", r=16, lora_alpha=32, max_length=1024, gradient_checkpointing=True, optim="adamw_torch_fused")
ROWS = {
    "SFT": dict(),
    "DPO ref copy": dict(objective="dpo", ref_model="copy", max_prompt_length=512),
    "DPO PEFT base": dict(objective="dpo", max_prompt_length=512),
    "DPO precomputed": dict(objective="dpo", precompute_ref_log_probs=True, max_prompt_length=512),
    "GRPO vLLM 0.3": dict(objective="grpo", num_generations=8, max_completion_length=512, use_vllm=True,
                          vllm_gpu_memory_utilization=0.3),
    "GRPO no vLLM": dict(objective="grpo", num_generations=8, max_completion_length=512),
}
# Published measurements with fully stated setups (model, method, lengths, batch, precision, GPU, measured peak).
PUBLISHED: dict[tuple[str, str], str] = {
    # none found with a fully stated setup for Llama-3.1-8B DPO/GRPO (searched trl / LlamaFactory / ms-swift issues);
    # LlamaFactory #3716 reports Llama-3-8B LoRA(q,v) DPO, cutoff 1024, batch 4, fp16 training on an A10 24 GB
    # without a measured peak: consistent with "fits" only.
}


def setup_for(row: str, micro: int) -> TrainingSetup:
    kw = {**BASE, **ROWS[row], "per_device_train_batch_size": micro}
    if kw.get("objective") == "grpo":
        kw["gradient_accumulation_steps"] = max(1, 8 // micro)  # one group of 8 completions per optimizer step
    return TrainingSetup(model_id=MODEL, **kw)


def largest_batch(spec, row: str, hw, limit: int = 64) -> int:
    best, b = 0, 1
    while b <= limit:
        try:
            est = estimate(spec, setup_for(row, b), hw, fast=True, advice=False)
        except Exception:  # noqa: BLE001 - an invalid combination ends the search
            break
        if not est.fits:
            break
        best, b = b, b * 2
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="analytic tier only (no dry run)")
    ap.add_argument("--gpus", default="RTX 4090,A100 80GB")
    args = ap.parse_args()
    spec = lookup_model(MODEL, hub=False)
    comps = ("weights", "adapters", "optimizer_state", "activations", "logits_loss", "temporaries", "reference_model",
             "kv_cache", "vllm_reserved")
    print(f"{MODEL}; " + ", ".join(f"{k}={v}" for k, v in BASE.items()))
    for gpu in [g.strip() for g in args.gpus.split(",")]:
        hw = parse_hardware(gpu)
        print(f"\n## {hw.gpu.name} ({hw.gpu.memory_gib:g} GiB)\n")
        print("| setup | max micro-batch | at batch | tier | device total GiB | " + " | ".join(comps) + " | published |")
        print("|" + "---|" * (len(comps) + 6))
        for row in ROWS:
            t = time.perf_counter()
            mb = largest_batch(spec, row, hw)
            at = max(1, mb)
            est = estimate(spec, setup_for(row, at), hw, fast=args.fast, advice=False)
            fit = "" if est.fits else " (does not fit)"
            cells = " | ".join(f"{est.breakdown.get(k, 0.0):.2f}" for k in comps)
            pub = PUBLISHED.get((row, hw.gpu.name), "-")
            print(f"| {row} | {mb or 'none'} | {at}{fit} | {est.tier} | {est.device_total_gib:.2f} | {cells} | {pub} |  "
                  f"<!-- {time.perf_counter() - t:.1f}s -->")
            notes = [n for n in est.provenance if "vLLM will not start" in n]
            if notes:
                print(f"|  | | | | | {notes[0]} |")


if __name__ == "__main__":
    main()
