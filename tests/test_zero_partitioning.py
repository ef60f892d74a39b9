"""What stays gathered under the non-resharding engines (FSDP shard_grad_op, DeepSpeed ZeRO-1/2), and that the
extension of a sharded dry run over depth keeps it: a block's gathered parameters are held per block, not per
unit in flight.

Each extended estimate (3 + 4 simulated blocks) is checked against the dry run of every block."""

from __future__ import annotations

import pytest

from tools.schemas import TrainingSetup

DEPTH = 8
CFG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": DEPTH, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
    "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def tiny():
    from tools.models import spec_from_config

    return spec_from_config(dict(CFG), "tiny-llama-8", "test")


def _both(spec, **kw):
    from tools.memory import simulate

    kw = {"max_length": 256, "per_device_train_batch_size": 2, **kw}
    st = TrainingSetup(model_id=spec.model_id, num_gpus=2, **kw)
    return simulate(spec, st), simulate(spec, st, extrapolate=False)


def test_shard_grad_op_holds_every_blocks_gathered_weights_and_the_extension_keeps_them(tiny):
    ext, full = _both(tiny, method="full", fsdp="shard_grad_op")
    assert ext.layers_simulated == [3, 4] and full.layers_simulated == [DEPTH]
    gathered = full.peak_breakdown["fsdp_all_gather"]
    # reshard_after_forward=False: at the loss every block's bf16 weights are still gathered (plus the tail)
    assert gathered >= 2 * (tiny.num_parameters - 2 * CFG["vocab_size"] * CFG["hidden_size"])
    assert ext.peak_breakdown["fsdp_all_gather"] == pytest.approx(gathered, rel=0.02)
    assert ext.peak_bytes == pytest.approx(full.peak_bytes, rel=0.03)


def test_zero2_keeps_the_16bit_model_whole_through_the_optimizer_step(tiny):
    short = {"max_length": 32, "per_device_train_batch_size": 1}  # the states, not the activations, make the peak
    ext, full = _both(tiny, method="full", zero_stage=2, **short)
    # DeepSpeed ZeRO-1/2 never partition the 16-bit parameters: from the end of backward through the step the
    # whole bf16 model is resident beside the fp32 master shards, gradients and moments
    for est in (full, ext):
        assert est.peak_phase in ("backward", "optimizer") and est.peak_breakdown["optimizer_state"] > 0
        assert est.peak_breakdown["fsdp_all_gather"] >= 2 * tiny.num_parameters * 0.98
    assert ext.peak_bytes == pytest.approx(full.peak_bytes, rel=0.03)
    zero3, _ = _both(tiny, method="full", zero_stage=3, **short)
    assert zero3.peak_breakdown.get("fsdp_all_gather", 0) < 0.5 * ext.peak_breakdown["fsdp_all_gather"]


def test_zero2_lora_keeps_frozen_weights_whole_and_unsharded(tiny):
    zero2, full = _both(tiny, method="lora", zero_stage=2)
    zero3, _ = _both(tiny, method="lora", zero_stage=3)
    # the frozen base is not in the optimizer's groups: whole bf16 on each GPU, no shard beside it
    assert any("frozen parameters kept whole" in n for n in zero2.notes)
    assert zero2.peak_breakdown["weights"] == pytest.approx(2 * tiny.num_parameters, rel=0.02)
    assert full.peak_breakdown["weights"] == pytest.approx(2 * tiny.num_parameters, rel=0.02)
    assert zero3.peak_breakdown["weights"] < 0.6 * zero2.peak_breakdown["weights"]


def test_deepspeed_gradients_are_a_16bit_partition_and_fp32_only_inside_the_step(tiny):
    from tools.estimator import estimate
    from tools.memory.distributed import deepspeed_gradients

    base = dict(model_id=tiny.model_id, method="full", max_length=256, per_device_train_batch_size=2, num_gpus=2)
    z2 = estimate(tiny, TrainingSetup(**base, zero_stage=2), advice=False)
    z1 = estimate(tiny, TrainingSetup(**base, zero_stage=1), advice=False)
    off = estimate(tiny, TrainingSetup(**base, zero_stage=2, offload="optimizer"), advice=False)
    gib = 2**30
    # ZeRO-2: the 16-bit gradient partition (2 B x trainable / ranks); ZeRO-1 keeps full 16-bit gradients instead
    assert z2.breakdown["zero_grad_partition"] * gib == pytest.approx(2 * tiny.num_parameters / 2, abs=0.002 * gib)
    assert "zero_grad_partition" not in z1.breakdown and z1.breakdown["zero1_full_gradients"] > 0
    assert "zero_grad_partition" not in off.breakdown  # offload_optimizer: the partitions are pinned host buffers
    # the FSDP2 step's fp32 gradient shards: none outside the optimizer step, one sub-group of ZeRO-3 inside it
    st3 = TrainingSetup(**{**base, "num_gpus": 8}, zero_stage=3)
    bd = {"gradients": 4 * 4_000_000_000, "weights": 1}
    assert deepspeed_gradients(st3, "backward", bd, 32_000_000_000)["gradients"] == 0
    step = deepspeed_gradients(st3, "optimizer", bd, 32_000_000_000)
    assert step["gradients"] == 4 * 1_000_000_000 and step["zero_grad_partition"] == 2 * 4_000_000_000
    st2 = TrainingSetup(**{**base, "num_gpus": 8}, zero_stage=2)
    assert deepspeed_gradients(st2, "optimizer", bd, 32_000_000_000)["gradients"] == bd["gradients"]


def test_explicit_bucket_sizes_reach_the_estimate_and_the_ds_config(tiny):
    import json

    from tools.estimator import estimate
    from tools.script import render_script

    base = dict(model_id=tiny.model_id, method="lora", max_length=128, per_device_train_batch_size=1, num_gpus=2)
    auto = estimate(tiny, TrainingSetup(**base, zero_stage=3), advice=False)
    own = TrainingSetup(**base, zero_stage=3, zero_reduce_bucket_size=500_000_000, zero_prefetch_bucket_size=50_000_000)
    given = estimate(tiny, own, advice=False)
    # ZeRO-3: two reduce buckets, bf16 ("auto": hidden^2, a few hundred KiB for this model; DeepSpeed's default
    # when no JSON sets it: 5e8); the prefetch bucket (0.9 hidden^2 / 5e7) is what the coordinator replay
    # prefetches, counted in zero_gathered_params (tools.memory.zero3): a larger bucket gathers more ahead
    assert auto.breakdown["zero_buckets"] < 0.001
    assert any("reduce_bucket_size 6.55e+04 (auto = hidden^2)" in p for p in auto.provenance)
    assert given.breakdown["zero_buckets"] * 2**30 == pytest.approx(2 * (2 * 5e8), rel=0.01)
    from tools.memory.zero3 import coordinator_config, replay, step_trace

    def first(st):  # gathered while the embedding runs: itself + what one prefetch launches
        return replay(step_trace(tiny, st), coordinator_config(st, tiny.hidden_size))[0].gathered_numel

    assert first(own) > 2 * first(TrainingSetup(**base, zero_stage=3))
    assert any("stage3_prefetch_bucket_size 5e+07" in p for p in given.provenance)
    assert any("reduce_bucket_size 5e+08" in p for p in given.provenance)
    z3 = json.loads(render_script(own).files["ds_config.json"])["zero_optimization"]
    assert z3["reduce_bucket_size"] == 500_000_000 and z3["stage3_prefetch_bucket_size"] == 50_000_000
