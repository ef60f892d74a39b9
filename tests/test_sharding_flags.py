"""The sharding flags of `estimate` and `plan` (--fsdp [mode], --fsdp-version, --no-mixed-precision)
and what the script generator writes for them (FSDP1 config, concrete DeepSpeed buffer sizes)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tools.schemas import TrainingSetup

LLAMA8 = "meta-llama/Llama-3.1-8B"


def _cli(*args):
    from agent.cli import app

    return CliRunner().invoke(app, list(args))


def _estimate(*args) -> dict:
    r = _cli("estimate", LLAMA8, "--fast", "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_bare_fsdp_still_means_full_shard_and_a_mode_can_be_given():
    bare = _estimate("--num-gpus", "2", "--fsdp")
    before_flag = _estimate("--fsdp", "--num-gpus", "2")
    grad_op = _estimate("--num-gpus", "2", "--fsdp", "shard_grad_op")
    assert "fsdp_full_shard" in bare["setup_summary"] and "fsdp_full_shard" in before_flag["setup_summary"]
    assert "fsdp_shard_grad_op" in grad_op["setup_summary"]
    assert bare["rank"] == 0 and grad_op["rank"] == 0
    # shard_grad_op keeps the gathered weights through backward: never less per GPU than full_shard
    assert grad_op["peak_allocated_gib"] >= bare["peak_allocated_gib"]


def test_bad_sharding_flags_are_one_clear_line():
    r = _cli("estimate", LLAMA8, "--fast", "--num-gpus", "2", "--fsdp", "--fsdp-version", "3")
    assert r.exit_code == 2 and "--fsdp-version: 3" in r.output
    r = _cli("estimate", LLAMA8, "--fast", "--no-mixed-precision", "--bf16")
    assert r.exit_code == 2 and "--no-mixed-precision" in r.output
    assert "Traceback" not in r.output


def test_no_mixed_precision_drops_the_fp32_master_copy():
    mixed = _estimate("--method", "full", "--num-gpus", "2", "--fsdp")
    pure = _estimate("--method", "full", "--num-gpus", "2", "--fsdp", "--no-mixed-precision")
    # bf16 weights and bf16 AdamW moments, no fp32 master: the optimizer states shrink
    assert pure["breakdown"]["optimizer_state"] < mixed["breakdown"]["optimizer_state"]


def test_qlora_under_fsdp_stores_4bit_weights_shardably():
    est = _estimate("--method", "qlora", "--num-gpus", "2", "--fsdp")
    assert any("bnb_4bit_quant_storage" in p for p in est["provenance"])


def test_plan_fsdp_mode_restricts_the_engines():
    r = _cli("plan", LLAMA8, "--gpu", "2x 4090", "--fast", "--fsdp", "shard_grad_op", "--method", "lora", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["candidates"] and all(c["setup"]["fsdp"] == "shard_grad_op" for c in plan["candidates"])


def test_script_writes_fsdp1_and_concrete_deepspeed_buffers():
    from tools.script import render_script

    base = dict(model_id=LLAMA8, method="lora", num_gpus=2)
    acc = yaml.safe_load(render_script(TrainingSetup(**base, fsdp="shard_grad_op", fsdp_version=1)).files["accelerate_config.yaml"])
    assert acc["fsdp_config"]["fsdp_version"] == 1
    assert acc["fsdp_config"]["fsdp_sharding_strategy"] == "SHARD_GRAD_OP" and acc["fsdp_config"]["fsdp_use_orig_params"] is True
    acc2 = yaml.safe_load(render_script(TrainingSetup(**base, fsdp="full_shard")).files["accelerate_config.yaml"])
    assert acc2["fsdp_config"]["fsdp_version"] == 2 and acc2["fsdp_config"]["fsdp_reshard_after_forward"] is True
    z2 = json.loads(render_script(TrainingSetup(**base, zero_stage=2)).files["ds_config.json"])["zero_optimization"]
    assert z2["allgather_bucket_size"] == 500_000_000 and z2["reduce_bucket_size"] == "auto"
    z3 = json.loads(render_script(TrainingSetup(**base, zero_stage=3)).files["ds_config.json"])["zero_optimization"]
    assert z3["stage3_max_live_parameters"] == 1_000_000_000 and z3["stage3_prefetch_bucket_size"] == "auto"


def test_fsdp1_keeps_its_root_parameters_gathered_from_forward_to_backward():
    """FSDP1 (TRANSFORMER_BASED_WRAP): the input embedding, final norm and head are the root's one
    FlatParameter, which FSDP1 does not free after forward; FSDP2 (accelerate) shards the embedding as
    its own unit that reshards after forward, and its tail [norm, head] reshards after its own backward.
    FSDP1 frees the root only in the final backward callback: through the backward peak it holds the
    gathered embedding and head (bf16 under mixed precision) that FSDP2 no longer holds."""
    from tools.memory import simulate
    from tools.models import lookup_model

    m = lookup_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0", hub=False)  # untied embedding and head
    base = dict(model_id=m.model_id, method="lora", max_length=2048, per_device_train_batch_size=2,
                num_gpus=2, fsdp="full_shard")
    v1 = simulate(m, TrainingSetup(**base, fsdp_version=1))
    v2 = simulate(m, TrainingSetup(**base, fsdp_version=2))
    emb = m.vocab_size * m.hidden_size * 2
    assert any("root parameters [embedding, norm, head]" in n for n in v1.notes)
    assert not any("root parameters" in n for n in v2.notes)
    assert v1.peak_phase == v2.peak_phase == "backward"
    gap = v1.peak_breakdown["fsdp_all_gather"] - v2.peak_breakdown["fsdp_all_gather"]
    assert gap == pytest.approx(2 * emb, rel=0.05)


def test_compile_and_reentrant_checkpointing_flags_change_the_time_not_the_memory():
    base = _estimate("--method", "lora", "--gpu", "4090")
    compiled = _estimate("--method", "lora", "--gpu", "4090", "--torch-compile")
    qv = ("--method", "lora", "--target-modules", "q_proj,v_proj", "--gpu", "4090")
    reentrant = _estimate(*qv, "--reentrant-checkpointing")
    assert compiled["tokens_per_second"] > base["tokens_per_second"]  # fused elementwise chains: fewer bytes moved
    # the whole block recomputed (non-reentrant skips the block's last matmul, whose output nothing saves)
    assert reentrant["tokens_per_second"] < _estimate(*qv)["tokens_per_second"]
    assert compiled["peak_allocated_gib"] == base["peak_allocated_gib"]
