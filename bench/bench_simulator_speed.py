"""How fast is the dry-run simulator? Cold (fresh process, imports included) and warm (same process).

Run from the repository root:

    .venv/bin/python bench/bench_simulator_speed.py            # all cases
    .venv/bin/python bench/bench_simulator_speed.py --case 70b-qlora

Cold = a subprocess that imports tools.memory and simulates once (what `tunepilot estimate`
pays; the CLI itself adds ~0.5 s, see `bench/bench_estimate_speed.py`). Warm = later simulations in
the same process with the result cache cleared: "repeat" re-runs the same setup (every op shape seen
before), "new" runs a sequence length never simulated in this process (every activation shape new:
what the planner pays per confirmed candidate), "new, 1 core" the same with the two depths run one
after the other (TUNEPILOT_SIM_PARALLEL=0) instead of side by side in a forked child. A repeated
identical call is a result-cache hit and costs ~0 s.
The configs below are the public config.json values of Llama-2-70B and Llama-3.1-8B.
Targets on the 2-core dev machine: cold <= 10 s, warm <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA2_70B = dict(
    model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, torch_dtype="float16",
)
LLAMA31_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
LLAMA2_7B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, torch_dtype="float16",
)
CONFIGS = {"llama2-70b": LLAMA2_70B, "llama3.1-8b": LLAMA31_8B, "llama2-7b": LLAMA2_7B}

QLORA = dict(method="qlora", load_in_4bit=True, r=64, lora_alpha=16, optim="paged_adamw_8bit")
CASES = {
    # name: (config, setup fields)
    "70b-qlora": ("llama2-70b", dict(QLORA, max_length=2048)),
    "70b-lora": ("llama2-70b", dict(method="lora", r=16, max_length=2048)),
    "70b-full": ("llama2-70b", dict(method="full", optim="adamw_torch_fused", max_length=2048)),
    "8b-lora": ("llama3.1-8b", dict(method="lora", r=16, max_length=2048)),
    "8b-qlora": ("llama3.1-8b", dict(QLORA, max_length=2048)),
    "8b-full": ("llama3.1-8b", dict(method="full", optim="adamw_torch_fused", max_length=2048)),
    "8b-lora-int8": ("llama3.1-8b", dict(method="lora", r=16, load_in_8bit=True, max_length=2048)),
    "7b-qlora-s512": ("llama2-7b", dict(QLORA, max_length=512)),
}


def spec_for(name: str):
    from tools.schemas import ModelSpec

    c = CONFIGS[name]
    return ModelSpec(
        model_id=name, architecture="LlamaForCausalLM", model_type="llama", num_hidden_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["hidden_size"] // c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"], tie_word_embeddings=False,
        num_parameters=0, source="bench", config=c,
    )


def setup_for(fields: dict):
    from tools.schemas import TrainingSetup

    base = dict(model_id="bench", per_device_train_batch_size=1, gradient_checkpointing=True, bf16=True, dtype="bf16")
    base.update(fields)
    return TrainingSetup(**base)


def one(case: str, **changes) -> dict:
    """Simulate one case (with optional setup changes) in this process; returns the headline figures."""
    from tools.memory import simulate

    cfg, fields = CASES[case]
    t = time.perf_counter()
    mem = simulate(spec_for(cfg), setup_for({**fields, **changes}))
    return {
        "case": case, "seconds": round(time.perf_counter() - t, 2), "peak_gib": round(mem.peak_bytes / 2**30, 2),
        "resident_gib": round((mem.weights_bytes + mem.adapter_bytes + mem.optimizer_bytes) / 2**30, 2),
        "breakdown_gib": {k: round(v / 2**30, 2) for k, v in mem.peak_breakdown.items()},
        "phase": mem.peak_phase, "layers_simulated": mem.layers_simulated,
    }


def cold(case: str) -> float:
    """Wall time of a fresh interpreter that imports the simulator and simulates `case`."""
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--inner", case], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return round(time.perf_counter() - t, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to run (default: all)")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    ap.add_argument("--no-cold", action="store_true", help="skip the cold subprocess timings")
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(one(args.inner)))
        return
    cases = args.case or list(CASES)
    t = time.perf_counter()
    import tools.memory.tracker  # noqa: F401  - warm the imports (torch) once for the in-process timings
    import transformers  # noqa: F401
    print(f"imports (torch, transformers): {time.perf_counter() - t:.1f} s")
    import tools.memory.runner as sim_mod

    for n, case in enumerate(cases):
        cold_s = None if args.no_cold else cold(case)
        first = one(case)  # first in-process call: model classes, peft, bnb, fake-tensor caches warm up
        sim_mod.clear_cache()
        warm = one(case)  # same setup again, result cache cleared: every op shape seen before
        cfg, fields = CASES[case]
        seq = fields.get("max_length", 2048)
        new = one(case, max_length=seq - 8 * (2 * n + 1))  # a sequence length no case uses: all shapes new
        sim_mod._PARALLEL = False
        try:
            serial = one(case, max_length=seq - 8 * (2 * n + 2))
        finally:
            sim_mod._PARALLEL = True
        print(f"{case:14s} cold {cold_s if cold_s is not None else '-':>6} s | first in-process {first['seconds']:5.2f} s | "
              f"warm: repeat {warm['seconds']:5.2f} s, new {new['seconds']:5.2f} s, new 1 core {serial['seconds']:5.2f} s | "
              f"peak {warm['peak_gib']:7.2f} GiB (resident {warm['resident_gib']} GiB, peak in {warm['phase']}) {warm['breakdown_gib']}")

if __name__ == "__main__":
    main()
