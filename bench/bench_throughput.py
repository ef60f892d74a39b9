"""Accuracy of tunepilot's training time against published, measured throughputs.

Reads bench/throughput_measurements.csv: each row a fully stated setup from a published benchmark
table (source URL and where in it; `extra` holds further TrainingSetup fields as key=value;...,
`gpu_overrides` catalog fields the measured GPU differs in, e.g. a lower memory bandwidth), the
measured tokens/s across all GPUs and how it was derived from the source's figure. For every row it
prints the tokens/s of

- the new model: the op-roofline time of the simulated step (`tools.throughput.estimate_throughput`
  with the dry run's StepMemory; per-op FLOPs and bytes, tools/memory/timing.py), uncalibrated;
- the new model's analytic tier (`--fast`, the planner's search): the same roofline over op records
  written down from the model's shapes (tools/memory/timing_analytic.py);
- today's model: the flat factors (`tools.throughput.flat_estimate_throughput`, the function that was
  `estimate_throughput` on main before the op-roofline model), uncalibrated;

and their errors, per row and overall (median of |error|), per split (`dev` rows were looked at while
the model was written, `heldout` rows only after; no factor is fitted to any row) and per source
table. A row's `implied` column is the fraction of the GPUs' dense peak the measured rate would need
at the FLOPs the step executes (as traced, with recompute): a rate above the GPU's matmul ceiling
(MAMF, tools/memory/timing.py) is physically implausible for a whole training step, and such rows are
flagged `!` and also reported in a median without them.

    .venv/bin/python bench/bench_throughput.py                 # all rows (~2 min)
    .venv/bin/python bench/bench_throughput.py --only torchtune  # rows whose id contains a string
    .venv/bin/python bench/bench_throughput.py --host-overhead   # measure eager PyTorch's host time per op here
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_accuracy  # noqa: E402
from bench_accuracy import model_for, setup_for  # noqa: E402

# Model shapes this benchmark needs beyond bench_accuracy's: Qwen-72B (v1 remote code) as a Qwen2 config
# of identical shapes (Qwen1.5-72B: 80 blocks, hidden 8192, 64 heads, MLP 24576 per branch, vocab 152064)
bench_accuracy.INLINE.setdefault("qwen-72b", {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 24576,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 152064,
    "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
})

ROWS = ROOT / "bench" / "throughput_measurements.csv"


def load_rows(path: Path = ROWS) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def hardware_for(row: dict):
    from tools.gpus import parse_hardware

    hw = parse_hardware(f"{row['num_gpus']}x {row['gpu']}")
    gpu = hw.gpu
    if row.get("gpu_overrides"):
        upd = {}
        for item in row["gpu_overrides"].split(";"):
            k, v = item.split("=", 1)
            upd[k] = float(v)
        gpu = gpu.model_copy(update=upd)
    return hw.model_copy(update={"gpu": gpu, "num_nodes": int(row.get("num_nodes") or 1)})


def row_setup(row: dict, model_id: str):
    s = setup_for(row, model_id)
    nodes = int(row.get("num_nodes") or 1)
    return s.model_copy(update={"num_nodes": nodes}) if nodes != s.num_nodes else s


def pct(pred: float, meas: float) -> float:
    return (pred - meas) / meas * 100.0


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):5.1f}%" if xs else "   n/a"


def host_overhead() -> None:
    """Host time per op of eager PyTorch on this CPU: a tiny Llama whose kernels take ~nothing."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg)
    x = torch.randint(0, 64, (1, 8))

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, f, t, a=(), k=None):
            Count.n += 1
            return f(*a, **(k or {}))

    def fwd():
        return m(input_ids=x, labels=x).loss

    for _ in range(3):
        fwd().backward()
    with Count():
        loss = fwd()
    nf, Count.n = Count.n, 0
    with Count():
        loss.backward()
    nb = Count.n
    n = 20
    t = time.perf_counter()
    for _ in range(n):
        fwd()
    tf = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        fwd().backward()
    tb = (time.perf_counter() - t) / n - tf
    print(f"host time per op (tiny Llama, 1 thread): forward {nf} ops, {tf / nf * 1e6:.1f} us/op; "
          f"backward {nb} ops, {tb / nb * 1e6:.1f} us/op")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], help="rows whose id contains this (repeatable)")
    ap.add_argument("--host-overhead", action="store_true", help="measure eager PyTorch's host time per op on this CPU and exit")
    args = ap.parse_args(argv)
    if args.host_overhead:
        host_overhead()
        return 0
    warnings.filterwarnings("ignore")
    from tools.memory import simulate
    from tools.memory.timing import gpu_rates
    from tools.throughput import _peak_tflops, estimate_throughput, flat_estimate_throughput

    rows = [r for r in load_rows() if not args.only or any(o in r["id"] for o in args.only)]
    print(f"{'id':34} {'gpu':>16} {'method':>6} {'split':>7} {'measured':>9} {'new':>9} {'err':>6} "
          f"{'fast':>9} {'err':>6} {'today':>9} {'err':>6} {'implied':>8}  time")
    res = []
    for row in rows:
        t0 = time.perf_counter()
        model = model_for(row["config"])
        setup = row_setup(row, model.model_id)
        hw = hardware_for(row)
        step = simulate(model, setup)
        new = estimate_throughput(model, setup, hw, step=step, calibrate=False)
        old = flat_estimate_throughput(model, setup, hw, calibrate=False)
        fast = estimate_throughput(model, setup, hw, calibrate=False)
        meas = float(row["measured_tokens_per_second"])
        peak = _peak_tflops(setup, hw, [])[0] * 1e12
        implied = meas * new.flops_per_token / (setup.num_gpus * peak)
        ceiling = gpu_rates(hw.gpu).matmul_eff
        flag = "!" if implied > ceiling else " "
        e_new, e_old = pct(new.tokens_per_second, meas), pct(old.tokens_per_second, meas)
        e_fast = pct(fast.tokens_per_second, meas)
        res.append((row, e_new, e_old, flag == "!", e_fast))
        label = f"{setup.num_gpus}x {hw.gpu.name.replace('NVIDIA ', '')}" if setup.num_gpus > 1 else hw.gpu.name.replace("NVIDIA ", "")
        print(f"{row['id']:34} {label[:16]:>16} {setup.method:>6} {row['split']:>7} {meas:9.0f} {new.tokens_per_second:9.0f} "
              f"{e_new:+5.0f}% {fast.tokens_per_second:9.0f} {e_fast:+5.0f}% {old.tokens_per_second:9.0f} {e_old:+5.0f}% "
              f"{implied:7.0%}{flag} {time.perf_counter() - t0:5.1f}s")
    if not res:
        print("no rows")
        return 1

    def line(name: str, sel) -> None:
        xs = [r for r in res if sel(r)]
        if xs:
            print(f"  {name:50} n={len(xs):2}  new {med([abs(r[1]) for r in xs])}  fast {med([abs(r[4]) for r in xs])}"
                  f"  today {med([abs(r[2]) for r in xs])}")

    print("\nmedian |error| (tokens/s)")
    line("all rows", lambda r: True)
    line("rows not flagged implausible", lambda r: not r[3])
    for split in ("dev", "heldout"):
        line(f"split {split}", lambda r, s=split: r[0]["split"] == s)
    tables = defaultdict(int)
    for r in res:
        tables[r[0]["table"]] += 1
    for t in tables:
        line(f"table: {t}", lambda r, t=t: r[0]["table"] == t)
    for m in ("full", "lora", "qlora"):
        line(f"method {m}", lambda r, m=m: r[0]["method"] == m)
    line("multi-GPU", lambda r: int(r[0]["num_gpus"]) > 1)
    within = sum(1 for r in res if abs(r[1]) <= 20)
    print(f"\nwithin 20%: new {within}/{len(res)} rows, fast {sum(1 for r in res if abs(r[4]) <= 20)}/{len(res)}, "
          f"today's {sum(1 for r in res if abs(r[2]) <= 20)}/{len(res)}")
    gpus = sorted({r[0]["gpu"] for r in res})
    print(f"{len(res)} rows, {len(tables)} source tables, {len(gpus)} GPU kinds ({', '.join(gpus)})")
    flagged = [r[0]["id"] for r in res if r[3]]
    if flagged:
        print(f"implausible (measured rate needs more than the GPU's matmul ceiling): {', '.join(flagged)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
