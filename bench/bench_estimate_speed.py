"""Speed of `tunepilot estimate`: cold CLI (a fresh process, what a person waits for) and warm in-process.

    .venv/bin/python bench/bench_estimate_speed.py [--model meta-llama/Llama-2-70b-hf] [--repeat 3]
    .venv/bin/python bench/bench_estimate_speed.py --model meta-llama/Llama-3.1-70B --method qlora --num-gpus 2 --fsdp

Targets: simulated tier 70B <= 10 s cold and <= 1 s warm; --fast <= 1 s cold (it must not import torch).
Cold runs disable the simulator's in-process cache by construction (new process each time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cold(args: list[str], repeat: int) -> tuple[float, list[float]]:
    """Median wall time of `python -m agent.cli estimate ARGS` in fresh processes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "agent.cli", "estimate", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"estimate {' '.join(args)} failed: {r.stderr.strip()}")
    return statistics.median(times), times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="meta-llama/Llama-2-70b-hf")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--method", default=None, help="full|lora|qlora|... (default: the CLI's default setup)")
    ap.add_argument("--num-gpus", type=int, default=None, help="GPUs (with --fsdp or --zero: the sharded dry run)")
    ap.add_argument("--fsdp", nargs="?", const="full_shard", default=None, help="FSDP mode (bare: full_shard)")
    ap.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage")
    a = ap.parse_args()
    extra = ["--method", a.method] if a.method else []
    if a.num_gpus:
        extra += ["--num-gpus", str(a.num_gpus)]
    if a.fsdp:
        extra += ["--fsdp", a.fsdp]
    if a.zero is not None:
        extra += ["--zero", str(a.zero)]
    a.model_label = a.model + (" " + " ".join(extra) if extra else "")

    fast_med, fast_all = cold([a.model, *extra, "--fast", "--json"], a.repeat)
    print(f"cold  --fast     {a.model_label}: {fast_med:6.2f} s  (runs {', '.join(f'{t:.2f}' for t in fast_all)})  target <= 1 s")
    sim_med, sim_all = cold([a.model, *extra, "--json"], a.repeat)
    print(f"cold  simulated  {a.model_label}: {sim_med:6.2f} s  (runs {', '.join(f'{t:.2f}' for t in sim_all)})  target <= 10 s")

    import warnings

    warnings.filterwarnings("ignore")
    from tools.estimator import estimate
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup
    from tools import memory

    spec = lookup_model(a.model, hub=False)
    fields = {"method": a.method} if a.method else {}
    if a.method == "qlora":
        fields.update(load_in_4bit=True, bnb_4bit_compute_dtype="bf16")  # as the CLI sets it
    if a.num_gpus:
        fields["num_gpus"] = a.num_gpus
    if a.fsdp:
        fields["fsdp"] = a.fsdp
    if a.zero is not None:
        fields["zero_stage"] = a.zero
    if a.method == "qlora" and (a.fsdp or a.zero == 3):
        fields["bnb_4bit_quant_storage"] = "bf16"  # as the CLI sets it under FSDP / ZeRO-3
    st = TrainingSetup(model_id=spec.model_id, **fields)
    t = time.perf_counter()
    estimate(spec, st)  # imports torch/transformers/peft and runs the dry run once
    first = time.perf_counter() - t
    warm = []
    for i in range(a.repeat):
        memory.clear_cache()  # a warm process, but a new dry run every time
        st_i = st.model_copy(update={"max_length": 2048 + 64 * (i + 1)})
        t = time.perf_counter()
        estimate(spec, st_i)
        warm.append(time.perf_counter() - t)
    print(f"warm  simulated  {a.model}: {statistics.median(warm):6.2f} s  (first call in process {first:.2f} s; "
          f"runs {', '.join(f'{x:.2f}' for x in warm)})  target <= 1 s")
    t = time.perf_counter()
    for _ in range(100):
        estimate(spec, st, fast=True, advice=False)
    print(f"warm  analytic   {a.model}: {(time.perf_counter() - t) / 100 * 1000:6.2f} ms per estimate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
