"""Throughput / time / cost: the flat-factor fallback (FLOPs per token, utilisation factors, scaling,
calibration) and what both time models share (time, GPU-hours, cost, bad inputs). The op-roofline
model itself: tests/test_timing.py."""

from __future__ import annotations

import json
import os

import pytest

from tools import throughput as tp
from tools.gpus import parse_hardware
from tools.schemas import ModelSpec, TrainingSetup, TunepilotError
from tools.throughput import estimate_throughput, flat_estimate_throughput, flops_per_token

# Shapes and exact parameter count of meta-llama/Llama-2-7b-hf (config.json; 6,738,415,616 params).
LLAMA2_7B = ModelSpec(
    model_id="meta-llama/Llama-2-7b-hf", architecture="LlamaForCausalLM", model_type="llama",
    num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
    intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False, num_parameters=6_738_415_616,
    source="catalog",
)
# mistralai/Mixtral-8x7B-v0.1: 8 experts, 2 active, 46.7B total parameters.
MIXTRAL = ModelSpec(
    model_id="mistralai/Mixtral-8x7B-v0.1", architecture="MixtralForCausalLM", model_type="mixtral",
    num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False, num_parameters=46_702_792_704,
    num_experts=8, num_experts_per_tok=2, source="catalog",
)
# N: every parameter that takes part in a matmul (all but the input embedding)
N_7B = 6_738_415_616 - 32000 * 4096


def setup(**kw) -> TrainingSetup:
    base = dict(model_id=LLAMA2_7B.model_id, method="lora", per_device_train_batch_size=4, max_length=2048,
                gradient_checkpointing=False)
    base.update(kw)
    return TrainingSetup(**base)


# --------------------------------------------------------------------------------------
# FLOPs per token
# --------------------------------------------------------------------------------------


def test_full_fine_tuning_is_about_6n_and_lora_about_4n():
    full = flops_per_token(LLAMA2_7B, setup(method="full"))
    lora = flops_per_token(LLAMA2_7B, setup(method="lora"))
    assert full > lora
    # at s=2048 attention adds a few percent on top of the 6N / 4N matmuls
    assert 6 * N_7B < full < 6 * N_7B * 1.06
    assert 4 * N_7B < lora < 4 * N_7B * 1.08
    assert lora / full == pytest.approx(2 / 3, abs=0.03)


def test_gradient_checkpointing_adds_about_a_third_for_full_ft():
    plain = flops_per_token(LLAMA2_7B, setup(method="full"))
    ckpt = flops_per_token(LLAMA2_7B, setup(method="full", gradient_checkpointing=True))
    assert 1.30 < ckpt / plain < 1.34


def test_attention_term_grows_with_sequence_length():
    short = flops_per_token(LLAMA2_7B, setup(max_length=512))
    long = flops_per_token(LLAMA2_7B, setup(max_length=32768))
    # 2·L·s·H·head_dim forward, x3 for fwd+bwd (LoRA: no extra for the frozen weights)
    expected = 3 * 2 * 32 * (32768 - 512) * 32 * 128
    assert long - short == pytest.approx(expected, rel=1e-6)


def test_more_lora_targets_and_rank_cost_more():
    qv = flops_per_token(LLAMA2_7B, setup(target_modules=["q_proj", "v_proj"], r=8))
    all_linear = flops_per_token(LLAMA2_7B, setup(target_modules="all-linear", r=8))
    big_r = flops_per_token(LLAMA2_7B, setup(target_modules="all-linear", r=256))
    assert qv < all_linear < big_r


def test_moe_counts_only_active_experts():
    f = flops_per_token(MIXTRAL, setup(model_id=MIXTRAL.model_id, method="full"))
    active = MIXTRAL.num_parameters - 32000 * 4096 - 32 * 6 * 3 * 4096 * 14336  # 6 idle experts per layer
    assert 6 * active < f < 6 * active * 1.06
    assert f < 6 * (MIXTRAL.num_parameters - 32000 * 4096) / 3


# --------------------------------------------------------------------------------------
# tokens/s, scaling, time and cost
# --------------------------------------------------------------------------------------


def test_two_gpus_scale_by_the_stated_efficiency():
    one = flat_estimate_throughput(LLAMA2_7B, setup(method="full"), parse_hardware("A100 80GB"))
    two = flat_estimate_throughput(LLAMA2_7B, setup(method="full", num_gpus=2), parse_hardware("2x A100 80GB"))
    assert two.tokens_per_second == pytest.approx(2 * one.tokens_per_second * tp.SCALING_EFFICIENCY["ddp"], rel=1e-9)
    z3 = flat_estimate_throughput(LLAMA2_7B, setup(method="full", num_gpus=2, zero_stage=3), parse_hardware("2x A100 80GB"))
    assert z3.tokens_per_second < two.tokens_per_second


def test_tokens_per_second_is_peak_times_utilisation_over_flops():
    hw = parse_hardware("H100")
    e = flat_estimate_throughput(LLAMA2_7B, setup(), hw)
    assert e.tokens_per_second == pytest.approx(989.4e12 * e.mfu / e.flops_per_token)
    assert 0.05 < e.mfu < 0.6
    # a 7B LoRA step on one H100 lands in the few-thousand tokens/s range
    assert 2000 < e.tokens_per_second < 20000


def test_time_gpu_hours_and_cost_are_consistent():
    e = estimate_throughput(LLAMA2_7B, setup(num_gpus=4, num_train_epochs=3), parse_hardware("4x A100 80GB"),
                            dataset_tokens=50_000_000, price_per_gpu_hour=1.8)
    assert e.time_per_epoch_hours * 3600 * e.tokens_per_second == pytest.approx(50_000_000)
    assert e.total_hours == pytest.approx(3 * e.time_per_epoch_hours)
    assert e.gpu_hours == pytest.approx(4 * e.total_hours)
    assert e.cost == pytest.approx(1.8 * e.gpu_hours)


def test_without_dataset_tokens_there_is_no_time():
    e = estimate_throughput(LLAMA2_7B, setup(), parse_hardware("4090"), price_per_gpu_hour=0.5)
    assert e.total_hours is None and e.cost is None and any("dataset_tokens" in n for n in e.notes)


def test_qlora_offload_and_slow_gpus_are_slower():
    hw = parse_hardware("A100 80GB")
    lora = flat_estimate_throughput(LLAMA2_7B, setup(), hw).tokens_per_second
    qlora = flat_estimate_throughput(LLAMA2_7B, setup(method="qlora", load_in_4bit=True), hw).tokens_per_second
    full = flat_estimate_throughput(LLAMA2_7B, setup(method="full"), hw).tokens_per_second
    full_offload = flat_estimate_throughput(LLAMA2_7B, setup(method="full", zero_stage=2, offload="optimizer"), hw).tokens_per_second
    assert qlora < lora
    assert full_offload == pytest.approx(full * tp.OFFLOAD_FACTOR["optimizer"])
    assert flat_estimate_throughput(LLAMA2_7B, setup(), parse_hardware("T4")).tokens_per_second < lora / 5


def test_parameter_offload_costs_what_crosses_pcie():
    """ZeRO-3 'all' offload streams the weights every micro-batch: 4-bit weights move ~4x fewer bytes than bf16."""
    hw = parse_hardware("2x RTX 4090")
    common = dict(num_gpus=2, zero_stage=3, offload="all", per_device_train_batch_size=1, gradient_checkpointing=True)
    q = dict(method="qlora", load_in_4bit=True)
    lora = flat_estimate_throughput(LLAMA2_7B, setup(**common), hw)
    lora_resident = flat_estimate_throughput(LLAMA2_7B, setup(**{**common, "offload": "none"}), hw)
    qlora = flat_estimate_throughput(LLAMA2_7B, setup(**q, **common), hw)
    qlora_resident = flat_estimate_throughput(LLAMA2_7B, setup(**q, **{**common, "offload": "none"}), hw)
    lora_cost = lora.tokens_per_second / lora_resident.tokens_per_second
    qlora_cost = qlora.tokens_per_second / qlora_resident.tokens_per_second
    assert lora_cost < tp.PEFT_OPTIMIZER_OFFLOAD_FACTOR  # streaming bf16 weights costs more than the optimizer part
    assert qlora_cost > lora_cost  # 4-bit weights move ~4x fewer bytes
    assert any("over PCIe" in n for n in lora.notes)
    # the slow-down shrinks as each micro-batch carries more compute for the same traffic
    bigger = flat_estimate_throughput(LLAMA2_7B, setup(**{**common, "per_device_train_batch_size": 8}), hw)
    assert bigger.tokens_per_second > lora.tokens_per_second


def test_bf16_on_a_gpu_without_it_uses_the_fp16_rate_and_says_so():
    e = flat_estimate_throughput(LLAMA2_7B, setup(bf16=True), parse_hardware("T4"))
    assert any("no bf16" in n and "fp16" in n for n in e.notes)
    fp16 = flat_estimate_throughput(LLAMA2_7B, setup(bf16=False, fp16=True), parse_hardware("T4"))
    assert e.tokens_per_second == pytest.approx(fp16.tokens_per_second)


def test_notes_state_the_assumptions():
    e = flat_estimate_throughput(LLAMA2_7B, setup(method="full", num_gpus=2, zero_stage=3), parse_hardware("2x H100"))
    text = " ".join(e.notes)
    assert "FLOPs/token" in text and "utilisation" in text and "zero3" in text and "989.4" in text


@pytest.mark.parametrize("kw,field", [(dict(dataset_tokens=0), "dataset_tokens"), (dict(dataset_tokens=-5), "dataset_tokens"),
                                      (dict(price_per_gpu_hour=-1.0), "price_per_gpu_hour")])
def test_bad_inputs_name_the_field(kw, field):
    with pytest.raises(TunepilotError, match=field):
        estimate_throughput(LLAMA2_7B, setup(), parse_hardware("4090"), **kw)


# --------------------------------------------------------------------------------------
# calibration from trial runs
# --------------------------------------------------------------------------------------


def _write_calibration(records: list[dict]) -> None:
    path = os.path.join(os.environ["TUNEPILOT_HOME"], "calibration.jsonl")  # conftest isolates TUNEPILOT_HOME
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write("not json\n")  # a damaged line is skipped, not fatal


def test_calibration_file_scales_the_utilisation():
    hw = parse_hardware("RTX 4090")
    raw = flat_estimate_throughput(LLAMA2_7B, setup(), hw)
    _write_calibration([
        # the trial runner records the GPU name as the driver reports it
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "lora", "tokens_per_second": 500, "predicted_tokens_per_second": 1000},
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "lora", "tokens_per_second": 600, "predicted_tokens_per_second": 1000},
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "lora", "tokens_per_second": 900, "predicted_tokens_per_second": 1000},
        # other GPUs and methods do not count
        {"gpu": "NVIDIA A100-SXM4-80GB", "method": "lora", "tokens_per_second": 100, "predicted_tokens_per_second": 1000},
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "full", "tokens_per_second": 100, "predicted_tokens_per_second": 1000},
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "lora"},  # incomplete record: ignored
        # a failed trial (OOM) measured no steady rate: ignored
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "lora", "ok": False, "tokens_per_second": 1, "predicted_tokens_per_second": 1000},
    ])
    cal = flat_estimate_throughput(LLAMA2_7B, setup(), hw)
    assert cal.mfu == pytest.approx(raw.mfu * 0.6)  # median of 0.5, 0.6, 0.9
    assert cal.tokens_per_second == pytest.approx(raw.tokens_per_second * 0.6)
    assert any("calibrated x0.60" in n and "3 trial run" in n for n in cal.notes)
    # the raw model stays available (the trial runner records that as its prediction)
    assert flat_estimate_throughput(LLAMA2_7B, setup(), hw, calibrate=False).mfu == pytest.approx(raw.mfu)
    # a different GPU is not affected by the 4090's records
    a100 = parse_hardware("A100 80GB")
    _ = flat_estimate_throughput(LLAMA2_7B, setup(method="full"), a100)
    assert not any("calibrated" in n for n in _.notes)


def test_no_calibration_file_means_no_calibration():
    e = estimate_throughput(LLAMA2_7B, setup(), parse_hardware("RTX 4090"))
    assert not any("calibrated" in n for n in e.notes)
