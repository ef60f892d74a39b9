"""tools/planner.py and `tunepilot plan`: real catalog models, real GPU catalog, real engine tiers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tools.gpus import gpu_catalog, parse_hardware
from tools.models import lookup_model
from tools.planner import PlanError, plan
from tools.schemas import PlanGoals, TrainingSetup

ROOT = Path(__file__).resolve().parent.parent
LLAMA8 = "meta-llama/Llama-3.1-8B"
LLAMA70 = "meta-llama/Llama-3.1-70B"

_PLANS: dict = {}


def _plan(model_id: str, hw: str, **goals):
    """Plans are deterministic: compute each (model, hardware, goals) once per test session."""
    key = (model_id, hw, tuple(sorted(goals.items())))
    if key not in _PLANS:
        goals.setdefault("confirm", False)
        _PLANS[key] = plan(lookup_model(model_id, hub=False), parse_hardware(hw), PlanGoals(**goals))
    return _PLANS[key]


def _usable(p_hw: str, margin: float = 0.10) -> float:
    return parse_hardware(p_hw).gpu.memory_gib * (1 - margin)


def test_llama8b_on_one_4090_is_a_peft_plan_that_fits_with_margin():
    p = _plan(LLAMA8, "RTX 4090", seq_len=2048, dataset_examples=20_000)
    assert p.fits and p.best is not None
    best = p.best.setup
    assert best.method in ("lora", "qlora")
    assert p.best.estimate.device_total_gib <= _usable("RTX 4090")
    assert best.max_length == 2048 and best.gpu == "NVIDIA RTX 4090" and best.num_gpus == 1 and best.bf16
    for c in p.candidates:
        assert c.fits and c.estimate.device_total_gib <= _usable("RTX 4090")
        s = c.setup
        assert s.per_device_train_batch_size * s.gradient_accumulation_steps * s.num_gpus == 16
        assert s.per_device_train_batch_size & (s.per_device_train_batch_size - 1) == 0
        assert c.throughput.total_hours and c.throughput.total_hours > 0
    # full fine-tuning of 8B cannot fit 24 GB: the advice says so with a number
    full = [a for a in p.advice if a.startswith("Full fine-tuning does not fit")]
    assert full and "GiB" in full[0] and "AdamW" in full[0]
    assert p.advice[0].startswith("Recommended: ")


def test_llama8b_on_a100_80gb_considers_full_fine_tuning_and_explains_it():
    p = _plan(LLAMA8, "A100 80GB", seq_len=2048, dataset_tokens=50_000_000)
    assert p.fits
    full = [a for a in p.advice if a.startswith("Full fine-tuning")]
    assert len(full) == 1 and "GiB" in full[0]
    full_cands = [c for c in p.candidates if c.setup.method == "full"]
    if "does not fit" in full[0]:
        assert not full_cands
    else:  # it fits: the best full fine-tuning setup is in the list, explained against the winner
        assert full_cands and full_cands[0].fits
        assert full_cands[0].estimate.device_total_gib <= _usable("A100 80GB")
    # every method family that fits is represented in the list
    assert {c.setup.method for c in p.candidates} >= {"lora", "qlora"}


def test_a_short_list_keeps_the_best_of_each_method_family():
    wide = _plan(LLAMA8, "A100 80GB", seq_len=2048, dataset_tokens=50_000_000, top=10)
    fitting_methods = {c.setup.method for c in wide.candidates}
    short = _plan(LLAMA8, "A100 80GB", seq_len=2048, dataset_tokens=50_000_000, top=len(fitting_methods))
    assert len(short.candidates) == len(fitting_methods)
    assert {c.setup.method for c in short.candidates} == fitting_methods
    assert short.best.setup == wide.best.setup
    hours = [c.throughput.total_hours for c in wide.candidates]
    assert wide.best.throughput.total_hours <= min(hours) * 1.05 + 1e-9  # balanced: within 5% of the fastest


def test_quality_mode_trades_time_for_quality():
    times, methods = {}, {}
    order = {"qlora": 0, "lora": 1, "full": 2}
    for q in ("speed", "balanced", "quality"):
        p = _plan(LLAMA8, "A100 80GB", seq_len=2048, dataset_tokens=50_000_000, quality=q)
        times[q] = p.best.throughput.total_hours
        methods[q] = (order[p.best.setup.method], p.best.setup.r if p.best.setup.method != "full" else 999)
        all_fit = [c for c in p.candidates]
        assert all(c.fits for c in all_fit)
    assert times["speed"] <= times["balanced"] <= times["quality"] <= times["speed"] * 1.15 + 1e-9
    assert methods["quality"] >= methods["speed"]


def test_llama70b_on_one_4090_does_not_fit_and_lists_the_smallest_changes():
    p = _plan(LLAMA70, "RTX 4090", seq_len=2048)
    assert not p.fits and p.best is None
    assert p.candidates and all(not c.fits for c in p.candidates)
    text = "\n".join(p.advice)
    assert p.advice[0].startswith("Nothing fits")
    assert "Shorter sequences" in text and "More GPUs" in text and "A GPU with more memory" in text
    # the bigger GPU offered really is bigger, and its estimate fits its usable memory
    line = next(a for a in p.advice if a.startswith("- A GPU with more memory"))
    bigger = [g for g in gpu_catalog() if g.name in line]
    assert bigger and bigger[0].memory_gib > 24
    # the leanest QLoRA is reported with the 4-bit weights dominating
    assert any(a.startswith("QLoRA does not fit") for a in p.advice)


def test_forced_method_is_not_switched_but_qlora_is_described():
    p = _plan(LLAMA70, "RTX 4090", seq_len=2048, method="lora")
    assert not p.fits
    assert {c.setup.method for c in p.candidates} == {"lora"}
    line = next(a for a in p.advice if a.startswith("- QLoRA (you asked for lora)"))
    assert "GiB" in line


def test_llama70b_on_two_4090s_is_a_sharded_plan():
    p = _plan(LLAMA70, "2x RTX 4090", seq_len=2048)
    assert p.fits, p.advice
    best = p.best.setup
    assert best.num_gpus == 2
    assert best.sharding in ("zero3", "fsdp_full_shard")
    assert best.method in ("qlora", "lora")
    if best.method == "qlora":
        assert best.bnb_4bit_quant_storage == "bf16"  # FSDP/ZeRO-3 shard float storage only
    if best.offload != "none":  # offload is the last resort: the advice says what it costs and what fails without it
        assert "offload" in p.advice[0] and "Without offload" in p.advice[0]


def test_gpu_without_bf16_plans_fp16():
    p = _plan("Qwen/Qwen2.5-0.5B", "T4", seq_len=1024)
    assert p.fits
    for c in p.candidates:
        s = c.setup
        assert s.fp16 and not s.bf16
        if s.method == "qlora":
            assert s.bnb_4bit_compute_dtype == "fp16"
        if s.method == "full":
            assert s.dtype == "fp32"  # fp16 AMP needs fp32 master weights
        assert s.attn_implementation == "sdpa"  # flash-attention 2 needs compute capability >= 8.0
    assert any("no bf16" in a for a in p.advice)


def test_nonsense_goals_are_clear_errors():
    with pytest.raises(ValidationError):
        PlanGoals(seq_len=0)
    with pytest.raises(ValidationError):
        PlanGoals(dataset_tokens=-5)
    m = lookup_model(LLAMA8, hub=False)
    with pytest.raises(PlanError, match="effective_batch: 15 .* 2 GPUs"):
        plan(m, parse_hardware("2x RTX 4090"), PlanGoals(effective_batch=15, confirm=False))
    with pytest.raises(PlanError, match="seq_len"):
        plan(m, parse_hardware("RTX 4090"), PlanGoals(seq_len=4, confirm=False))


def test_simulator_confirms_the_top_candidates():
    p = plan(lookup_model("Qwen/Qwen2.5-0.5B", hub=False), parse_hardware("RTX 4090"),
             PlanGoals(seq_len=1024, confirm=True, top=3))
    assert p.fits
    assert p.best.estimate.tier == "simulated"
    assert p.best.estimate.device_total_gib <= _usable("RTX 4090")
    assert any("confirmed the top" in a for a in p.advice)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli(*args):
    from agent.cli import app

    return CliRunner().invoke(app, ["plan", *args])


def test_cli_plan_writes_a_setup_that_loads(tmp_path):
    out = tmp_path / "setup.yaml"
    r = _cli(LLAMA8, "--gpu", "4090", "--fast", "--dataset-examples", "20000", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "Recommended" in r.output and "tunepilot script" in r.output
    setup = TrainingSetup.load(out)
    assert setup.model_id == LLAMA8 and setup.method in ("lora", "qlora")
    p = _plan(LLAMA8, "RTX 4090", seq_len=2048, dataset_examples=20_000)
    assert setup == p.best.setup


def test_cli_plan_json_shape(tmp_path):
    out = tmp_path / "setup.json"
    r = _cli(LLAMA8, "--gpu", "4090", "--fast", "--json", "--top", "3", "-o", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"candidates", "best", "fits", "advice"} <= set(data)
    assert data["fits"] is True and 1 <= len(data["candidates"]) <= 3
    assert {"setup", "estimate", "throughput", "fits"} <= set(data["candidates"][0])
    assert TrainingSetup.load(out).model_dump() == data["best"]["setup"]


def test_cli_nothing_fits_exits_zero_and_writes_nothing(tmp_path):
    out = tmp_path / "setup.yaml"
    r = _cli(LLAMA70, "--gpu", "4090", "--fast", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "Nothing fits" in r.output and "not written" in r.output
    assert not out.exists()
    r = _cli(LLAMA70, "--gpu", "4090", "--fast", "--json")
    assert json.loads(r.stdout)["fits"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        ([LLAMA8, "--gpu", "4090", "--seq-len", "0"], "seq_len"),
        ([LLAMA8, "--gpu", "4090", "--dataset-tokens", "-5"], "dataset_tokens"),
        ([LLAMA8, "--gpu", "4090", "--method", "prefix"], "method"),
        ([LLAMA8, "--gpu", "NoSuchGPU 9000"], "NoSuchGPU"),
        ([LLAMA8], "--gpu"),
        ([LLAMA8, "--gpu", "4090", "--local"], "not both"),
    ],
)
def test_cli_plan_errors_are_one_line(args, message):
    r = _cli(*args)
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output


def test_cli_plan_error_in_a_real_process_has_no_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "agent.cli", "plan", LLAMA8, "--gpu", "4090", "--seq-len", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "seq_len" in r.stderr and "Traceback" not in r.stderr


def test_cli_plan_local_without_a_gpu_is_one_clear_line():
    from tools.gpus import NoGPUError, detect_hardware

    try:
        detect_hardware()
    except NoGPUError:
        pass
    else:
        pytest.skip("this machine has a GPU")
    r = _cli(LLAMA8, "--local")
    assert r.exit_code == 2
    assert "no GPU" in r.output and "--gpu" in r.output


def _first_int(pattern: str, text: str) -> int:
    import re

    return int(re.search(pattern, text).group(1))


def test_the_suggested_changes_really_fit_when_planned():
    # 8B QLoRA at 16k tokens on a 12 GB card: too long; the plan names a sequence length and a GPU that fit
    p = _plan(LLAMA8, "RTX 4070", seq_len=16384, method="qlora")
    assert not p.fits
    seq_line = next(a for a in p.advice if a.startswith("- Shorter sequences"))
    seq = _first_int(r"--seq-len (\d+) fits", seq_line)
    assert 256 <= seq < 16384
    assert _plan(LLAMA8, "RTX 4070", seq_len=seq, method="qlora").fits
    assert not _plan(LLAMA8, "RTX 4070", seq_len=seq * 2, method="qlora").fits  # it is the longest power-of-two halving that fits
    gpu_line = next(a for a in p.advice if a.startswith("- A GPU with more memory"))
    gpu = next(g for g in sorted(gpu_catalog(), key=lambda g: -len(g.name)) if g.name in gpu_line)
    assert _plan(LLAMA8, gpu.name, seq_len=16384, method="qlora").fits
    smaller = [g for g in gpu_catalog() if 11.99 < g.memory_gib < gpu.memory_gib]
    for g in smaller:  # it is the smallest catalog GPU that fits
        assert not _plan(LLAMA8, g.name, seq_len=16384, method="qlora", top=1).fits, g.name
    # 70B on one 4090: the suggested number of 4090s fits when planned
    p70 = _plan(LLAMA70, "RTX 4090", seq_len=2048)
    more = next(a for a in p70.advice if a.startswith("- More GPUs"))
    n = _first_int(r"(\d+)x NVIDIA", more)
    assert n >= 2 and _plan(LLAMA70, f"{n}x RTX 4090", seq_len=2048).fits


def test_a_busy_local_gpu_is_called_out():
    hw = parse_hardware("RTX 4090").model_copy(update={"free_memory_gib": [2.0], "detected": True})
    p = plan(lookup_model("Qwen/Qwen2.5-0.5B", hub=False), hw, PlanGoals(confirm=False, top=1))
    assert p.fits
    assert any(a.startswith("Right now a GPU has only 2.0 GiB free") for a in p.advice)


def test_moe_lora_candidates_use_no_dropout():
    """peft refuses dropout on fused MoE experts (all-linear wraps them): every adapter candidate has 0."""
    p = _plan("mistralai/Mixtral-8x7B-v0.1", "8x H100", seq_len=1024, dataset_examples=1_000, method="lora", confirm=False)
    adapters = [c.setup for c in p.candidates if c.setup.method in ("lora", "qlora", "dora")]
    assert adapters, [c.setup.short() for c in p.candidates]
    for st in adapters:
        if st.target_modules == "all-linear":
            assert st.lora_dropout == 0.0


def test_models_without_sdpa_are_planned_with_eager_attention():
    p = _plan("bigscience/bloom-560m", "T4", seq_len=512, dataset_examples=1_000, confirm=False)
    assert p.candidates and all(c.setup.attn_implementation == "eager" for c in p.candidates)


# --------------------------------------------------------------------------------------
# memory levers and long context (issue 12)
# --------------------------------------------------------------------------------------


def test_long_context_plan_finds_the_cheapest_lever_combination_and_explains_it():
    """Llama-3.1-8B at 32k tokens on one 4090: QLoRA + checkpointing + trl's activation offloading fits."""
    p = _plan(LLAMA8, "RTX 4090", seq_len=32768)
    assert p.fits
    s = p.best.setup
    assert s.method == "qlora" and s.max_length == 32768 and s.per_device_train_batch_size == 1
    assert s.loss_impl == "trl_fused" and s.activation_offloading
    assert p.best.estimate.device_total_gib <= _usable("RTX 4090")
    assert 0 < p.best.estimate.host_breakdown["activation_offload"] <= 0.6 * 64  # within trl's pinned-RAM guard of an assumed 64 GiB host
    loss = next(a for a in p.advice if a.startswith("Loss: "))
    assert "fused cross-entropy" in loss and "hf" in loss and "liger" in loss and "needs liger-kernel" in loss
    off = next(a for a in p.advice if a.startswith("Activation offloading"))
    assert "does not fit" in off and "pinned host RAM" in off
    # every candidate keeps to what the script installs by default: no Liger / CCE dependency
    assert all(c.setup.loss_impl == "trl_fused" and not c.setup.use_liger_kernel for c in p.candidates)


def test_long_context_that_fits_nowhere_says_which_context_does():
    p = _plan(LLAMA8, "16GB", seq_len=131072)
    assert not p.fits
    shorter = next(a for a in p.advice if a.startswith("- Shorter sequences"))
    assert "--seq-len" in shorter and "GiB per GPU" in shorter


def test_fused_loss_lets_a_larger_micro_batch_fit_at_2k():
    p = _plan(LLAMA8, "RTX 4090", seq_len=2048)
    loss = next(a for a in p.advice if a.startswith("Loss: "))
    assert "lets micro-batch" in loss and "GiB vs transformers' full-logits loss" in loss
