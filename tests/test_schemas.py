"""TrainingSetup is the one contract: round-trips, HF names, and validation that names fields."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tools.schemas import (
    METHODS,
    OPTIMS,
    GPUSpec,
    HardwareSpec,
    ModelSpec,
    SetupFileError,
    TrainingSetup,
    format_validation_error,
)


def test_yaml_and_json_round_trip(tmp_path):
    s = TrainingSetup(model_id="meta-llama/Llama-3.1-8B", method="qlora", load_in_4bit=True, r=64,
                      target_modules=["q_proj", "v_proj"], per_device_train_batch_size=2,
                      gradient_accumulation_steps=8, optim="paged_adamw_8bit", num_gpus=2, zero_stage=3)
    for name in ("s.yaml", "s.json"):
        path = s.save(tmp_path / name)
        assert TrainingSetup.load(path) == s
    assert json.loads((tmp_path / "s.json").read_text())["per_device_train_batch_size"] == 2


def test_hf_and_peft_names_are_used():
    fields = TrainingSetup.model_fields
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                 "optim", "bf16", "fp16", "r", "lora_alpha", "lora_dropout", "target_modules",
                 "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "attn_implementation", "eval_strategy"):
        assert name in fields, name
    # every field of every shared model is described (the agent's tool schemas rely on it)
    for model in (TrainingSetup, ModelSpec, GPUSpec, HardwareSpec):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"


def test_max_seq_length_alias():
    assert TrainingSetup(model_id="m", max_seq_length=4096).max_length == 4096


def test_all_field_errors_reported_at_once():
    with pytest.raises(ValidationError) as e:
        TrainingSetup(model_id="m", r=0, optim="adamw_nonsense", per_device_train_batch_size=0, bogus=1)
    msg = format_validation_error(e.value)
    for part in ("r:", "optim:", "per_device_train_batch_size:", "bogus: unknown field", "adamw_torch_fused"):
        assert part in msg, (part, msg)


def test_cross_field_problems_reported_together():
    with pytest.raises(ValidationError) as e:
        TrainingSetup(model_id="m", method="qlora", bf16=True, fp16=True, zero_stage=2, fsdp="full_shard", num_gpus=2)
    msg = format_validation_error(e.value)
    assert "bf16/fp16" in msg and "load_in_4bit" in msg and "zero_stage/fsdp" in msg


def test_qlora_fp32_compute_and_zero_rules():
    with pytest.raises(ValidationError, match="bnb_4bit_compute_dtype"):
        TrainingSetup(model_id="m", method="qlora", load_in_4bit=True, bnb_4bit_compute_dtype="fp32")
    with pytest.raises(ValidationError, match="zero_stage"):
        TrainingSetup(model_id="m", zero_stage=2)  # one GPU, no offload: saves nothing
    # ZeRO on one GPU is legitimate with offload
    s = TrainingSetup(model_id="m", method="full", zero_stage=2, offload="optimizer")
    assert s.sharding == "zero2"


def test_dora_method_implies_use_dora_and_effective_batch():
    s = TrainingSetup(model_id="m", method="dora", per_device_train_batch_size=4, gradient_accumulation_steps=2, num_gpus=2, zero_stage=2)
    assert s.use_dora and s.effective_batch_size == 16
    assert "DoRA" in s.short()


def test_vocabularies_cover_the_documented_values():
    assert {"full", "lora", "qlora", "dora", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning"} == set(METHODS)
    for o in ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adafactor", "sgd", "lion_8bit", "lion_32bit"):
        assert o in OPTIMS


def test_load_reports_bad_files(tmp_path):
    with pytest.raises(SetupFileError, match="not found"):
        TrainingSetup.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_id: m\nr: -3\nwhat: 1\n")
    with pytest.raises(SetupFileError) as e:
        TrainingSetup.load(bad)
    assert "r:" in str(e.value) and "what: unknown field" in str(e.value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SetupFileError, match="mapping"):
        TrainingSetup.load(tmp_path / "list.yaml")
