"""Planner speed: a full search for a 70B model (analytic prune + simulator confirmation of the top few).

Run from the repository root:

    .venv/bin/python bench/bench_planner_speed.py            # Llama-3.1-70B on 2x RTX 4090 and 1x H100
    .venv/bin/python bench/bench_planner_speed.py --fast     # analytic only

Prints, per case: setups searched, seconds (wall and this process's CPU) for the analytic
search alone and for the whole plan (search + simulator confirmation), and the winner. Import time (torch/transformers, paid
once per process) is reported separately and not counted. Target: <= 5 s per full plan.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [
    ("meta-llama/Llama-3.1-70B", "2x RTX 4090"),
    ("meta-llama/Llama-3.1-70B", "H100 80GB"),
    ("meta-llama/Llama-3.1-70B", "8x A100 80GB"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="skip the simulator confirmation")
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import bitsandbytes  # noqa: F401  (the simulator's QLoRA stand-in and 8-bit optimizers)
    import peft  # noqa: F401

    import tools.memory.tracker  # noqa: F401  (torch)
    from tools.gpus import parse_hardware
    from tools.models import lookup_model
    from tools.peft_config import attention_modules
    from tools.planner import plan
    from tools.schemas import PlanGoals

    attention_modules(lookup_model(CASES[0][0], hub=False))  # module-tree cache, once per model
    print(f"imports (torch, transformers, peft, bitsandbytes) + module tree: {time.perf_counter() - t0:.1f} s (once per process, not counted below)")

    worst = worst_cpu = 0.0
    for model_id, hw in CASES:
        model, hardware = lookup_model(model_id, hub=False), parse_hardware(hw)
        goals = PlanGoals(seq_len=args.seq_len, dataset_tokens=10_000_000, confirm=False)
        t, c = time.perf_counter(), time.process_time()
        p_fast = plan(model, hardware, goals)
        t_fast, c_fast = time.perf_counter() - t, time.process_time() - c
        searched = next((a for a in p_fast.advice if a.startswith("Searched")), "")
        if args.fast:
            t_full, c_full, p = t_fast, c_fast, p_fast
        else:
            t, c = time.perf_counter(), time.process_time()
            p = plan(model, hardware, goals.model_copy(update={"confirm": True}))
            t_full, c_full = time.perf_counter() - t, time.process_time() - c
        worst = max(worst, t_full)
        worst_cpu = max(worst_cpu, c_full)
        best = p.best.setup.short() if p.best else "nothing fits"
        tier = p.best.estimate.tier if p.best else "-"
        print(f"{model_id} on {hw}: {searched.split(' with the analytic')[0]}; analytic search {t_fast:.2f} s "
              f"(cpu {c_fast:.2f} s); full plan {t_full:.2f} s (cpu {c_full:.2f} s) -> {best} [{tier}]")
    print(f"slowest full plan: {worst:.2f} s wall, {worst_cpu:.2f} s cpu (target <= 5 s; wall > cpu when other "
          "processes share the cores)")


if __name__ == "__main__":
    main()
