"""Measure real trial runs on this machine's GPU and append them to bench/measurements_trials.csv.

Run on a GPU machine from the repository root:

    .venv/bin/python bench/measure_trials.py                      # default models and setups
    .venv/bin/python bench/measure_trials.py --models Qwen/Qwen2.5-0.5B --steps 5
    .venv/bin/python bench/measure_trials.py --quick              # tiny 2-layer Llama only (smoke test, CPU ok)

No Hub access is needed: each catalog model is rebuilt from its stored config.json with random
weights (memory and speed depend on shapes, not on weight values) and saved to --workdir with a
tiny offline tokenizer; the trial's worst-case batches are random token ids at the full max_length.
Every trial goes through `tools.trial.run_trial` (the generated train.py in trial mode, in a
subprocess), so each row is also appended to $TUNEPILOT_HOME/calibration.jsonl.
Columns: when, model, setup, GPU, measured allocated / reserved / device total (GiB),
estimated ones, tokens/s measured and predicted, ok / error kind.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tools.schemas import TrainingSetup  # noqa: E402

COLUMNS = [
    "timestamp", "model_id", "setup", "method", "max_length", "micro_batch", "grad_accum", "gradient_checkpointing",
    "optim", "gpu", "device", "measured_allocated_gib", "measured_reserved_gib", "measured_device_total_gib",
    "estimated_allocated_gib", "estimated_reserved_gib", "estimated_device_total_gib", "estimate_tier",
    "tokens_per_second", "predicted_tokens_per_second", "ok", "error_kind", "wall_seconds",
]
DEFAULT_MODELS = ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B"]


def setups_for(model_id: str) -> list[TrainingSetup]:
    """A small grid: LoRA with and without checkpointing, QLoRA, and full fine-tuning."""
    base = dict(model_id=model_id, max_length=1024, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    return [
        TrainingSetup(**base, method="lora", gradient_checkpointing=True),
        TrainingSetup(**base, method="lora", gradient_checkpointing=False),
        TrainingSetup(**base, method="qlora", load_in_4bit=True, optim="paged_adamw_8bit"),
        TrainingSetup(**{**base, "per_device_train_batch_size": 2}, method="full", optim="adamw_torch_fused"),
    ]


def build_random_model(model_id: str, workdir: Path) -> Path:
    """Save the catalog architecture with random bf16 weights and a tiny tokenizer; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from _script_helpers import build_tokenizer
    from tools.models import hf_config, lookup_model

    out = workdir / model_id.replace("/", "--")
    if (out / "config.json").is_file():
        return out
    spec = lookup_model(model_id, hub=False)
    model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="Catalog model ids to measure.")
    parser.add_argument("--steps", type=int, default=3, help="Trial steps per setup.")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds per trial.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunepilot-bench"), help="Random-weight models and trial dirs.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "measurements_trials.csv", help="CSV to append to.")
    parser.add_argument("--quick", action="store_true", help="Only the tiny 2-layer Llama (smoke test).")
    args = parser.parse_args()

    from tools.trial import run_trial

    args.workdir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Path, TrainingSetup]] = []
    if args.quick:
        from _script_helpers import build_tiny_model

        tiny = args.workdir / "tiny-llama"
        if not (tiny / "config.json").is_file():
            build_tiny_model(tiny)
        jobs.append(("tiny-llama", tiny, TrainingSetup(model_id="tiny-llama", max_length=256, per_device_train_batch_size=4)))
    else:
        for model_id in args.models:
            path = build_random_model(model_id, args.workdir)
            jobs += [(model_id, path, s) for s in setups_for(model_id)]

    new_file = not args.out.is_file()
    with args.out.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        for i, (model_id, path, setup) in enumerate(jobs):
            t0 = time.perf_counter()
            r = run_trial(setup, steps=args.steps, timeout=args.timeout, model_path=str(path),
                          workdir=args.workdir / f"trial-{i}")
            est = r.estimated or {}
            row = {
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model_id": model_id,
                "setup": setup.short(), "method": setup.method, "max_length": setup.max_length,
                "micro_batch": setup.per_device_train_batch_size, "grad_accum": setup.gradient_accumulation_steps,
                "gradient_checkpointing": setup.gradient_checkpointing, "optim": setup.optim,
                "gpu": r.gpu_name or "", "device": r.device or "",
                "measured_allocated_gib": r.max_memory_allocated_gib, "measured_reserved_gib": r.max_memory_reserved_gib,
                "measured_device_total_gib": r.device_total_gib,
                "estimated_allocated_gib": est.get("peak_allocated_gib"), "estimated_reserved_gib": est.get("peak_reserved_gib"),
                "estimated_device_total_gib": est.get("device_total_gib"), "estimate_tier": est.get("tier"),
                "tokens_per_second": r.tokens_per_second, "predicted_tokens_per_second": r.predicted_tokens_per_second,
                "ok": r.ok, "error_kind": r.error_kind or "", "wall_seconds": round(time.perf_counter() - t0, 1),
            }
            writer.writerow(row)
            f.flush()
            alloc = r.max_memory_allocated_gib if r.device == "cuda" else r.cpu_peak_rss_gib
            print(f"{model_id:28s} {setup.short():70s} ok={r.ok!s:5s} alloc={alloc} est={est.get('peak_allocated_gib')} "
                  f"tok/s={r.tokens_per_second} {r.error_kind or ''}", flush=True)
    print(f"appended {len(jobs)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
