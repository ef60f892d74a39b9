"""DeepSpeed ZeRO-3's gathered parameters (tools.memory.zero3): the PartitionedParameterCoordinator's rules
replayed on hand-built traces whose answers are counted by hand, on a tiny Llama's step trace, and in the estimate."""

from __future__ import annotations

import json

import pytest

from tools.memory.zero3 import (BACKWARD, FORWARD, CoordinatorConfig, Param, Submodule, gathered_by_segment, replay,
                                step_trace)
from tools.schemas import TrainingSetup

H, L, V, INTER = 256, 4, 2048, 768
CFG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
    "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V,
    "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
BIG = 10 ** 12


@pytest.fixture(scope="module")
def tiny():
    from tools.models import spec_from_config

    return spec_from_config(dict(CFG), "tiny-llama-4", "test")


def _sub(name, numel):
    return Submodule(name, (Param(name, numel, 2 * numel),))


def _abc_trace():
    a, b, c = _sub("A", 100), _sub("B", 100), _sub("C", 100)
    return [(a, FORWARD), (b, FORWARD), (c, FORWARD), (c, BACKWARD), (b, BACKWARD), (a, BACKWARD)]


def _cfg(prefetch=0, live=BIG, reuse=0, persist=0):
    return CoordinatorConfig(prefetch, live, reuse, persist)


def test_without_prefetch_or_reuse_only_the_running_submodule_is_gathered():
    assert [m.gathered_numel for m in replay(_abc_trace(), _cfg())] == [100] * 6


def test_prefetch_bucket_gathers_ahead_and_max_live_bounds_it():
    # bucket 150: at A, B is prefetched (0 < 150), then C (100 < 150): 300 gathered while A runs
    assert replay(_abc_trace(), _cfg(prefetch=150))[0].gathered_numel == 300
    # max_live 150: the budget is min(150 - 100 available, 150) = 50: B only
    assert replay(_abc_trace(), _cfg(prefetch=150, live=150))[0].gathered_numel == 200
    # max_live 100: nothing beyond the running submodule
    assert max(m.gathered_numel for m in replay(_abc_trace(), _cfg(prefetch=150, live=100))) == 100


def test_reuse_distance_keeps_the_last_submodule_through_the_forward_backward_turn():
    # reuse 150: after C's forward the next use of C (its backward) is the very next step: C stays gathered;
    # after B's forward, C forward + C backward (200 elements) pass before B is used again: B is released
    moments = replay(_abc_trace(), _cfg(reuse=150))
    assert [m.gathered_numel for m in moments] == [100, 100, 100, 100, 100, 100]
    assert [m.fetched_numel for m in moments] == [100, 100, 100, 0, 100, 100]  # the turn needs no all-gather
    assert [m.fetched_numel for m in replay(_abc_trace(), _cfg(reuse=0))] == [100] * 6
    # with a larger reuse distance every forward parameter is kept until its backward
    wide = replay(_abc_trace(), _cfg(reuse=10 ** 6))
    assert [m.gathered_numel for m in wide] == [100, 200, 300, 300, 200, 100]


def test_persistent_parameters_stay_gathered_and_are_never_counted_in_flight():
    a, n = _sub("A", 100), _sub("norm", 10)
    trace = [(a, FORWARD), (n, FORWARD), (n, BACKWARD), (a, BACKWARD)]
    moments = replay(trace, _cfg(persist=50))
    assert all(m.persistent_bytes == 20 for m in moments)
    assert [m.gathered_numel for m in moments] == [100, 0, 0, 100]


def test_tiny_llama_trace_has_the_recompute_and_the_persistent_norms(tiny):
    st = TrainingSetup(model_id=tiny.model_id, method="full", num_gpus=2, zero_stage=3, gradient_checkpointing=True)
    trace = step_trace(tiny, st)
    per_block = 2 + 7  # two norms, q k v o gate up down
    # forward (embedding, blocks, norm, head) + backward of the tail + (recompute + backward) per block + embedding
    assert len(trace) == (1 + L * per_block + 2) + 2 + 2 * L * per_block + 1
    gathered, best = gathered_by_segment(tiny, st)
    # auto persistence threshold 10 h = 2560 elements: every norm (256 elements) stays gathered, in bf16
    assert gathered["optimizer"] == (2 * L + 1) * H * 2
    # reuse distance 1e9 > the whole model: nothing is released before its last use, so at the turn of the step
    # (the LM head's backward) every block is still gathered
    assert best["backward-loss"].total_bytes == pytest.approx(2 * tiny.num_parameters, rel=0.01)
    # the LM head's last use is its backward: released there, everything else stays until its own backward
    assert gathered["backward"] == 2 * tiny.num_parameters - 2 * V * H
    # a small stage3_max_live_parameters bounds what is gathered: the prefetch starts only below it and stops
    # after the parameter that crosses it, and the running submodule may add its own: max_live + 2 x the largest
    live = 200_000
    near = TrainingSetup(model_id=tiny.model_id, method="full", num_gpus=2, zero_stage=3, gradient_checkpointing=True,
                         zero_max_reuse_distance=1, zero_prefetch_bucket_size=1, zero_max_live_parameters=live)
    from tools.memory.zero3 import coordinator_config

    moments = replay(step_trace(tiny, near), coordinator_config(near, H))
    assert max(m.gathered_numel for m in moments) <= live + 2 * V * H
    assert max(m.total_bytes for m in moments) < 0.6 * gathered["backward"]


def test_estimate_replaces_fsdp_all_gather_by_deepspeed_gathered_parameters(tiny):
    from tools.estimator import estimate

    kw = dict(model_id=tiny.model_id, method="lora", num_gpus=2, zero_stage=3, max_length=64,
              per_device_train_batch_size=1)
    est = estimate(tiny, TrainingSetup(**kw), advice=False)
    assert "fsdp_all_gather" not in est.breakdown and est.breakdown["zero_gathered_params"] > 0
    assert any("PartitionedParameterCoordinator" in p for p in est.provenance)
    # everything persistent: every parameter stays gathered in bf16 on each GPU, in every segment (bytes of the
    # estimator's own per-GPU breakdown, before rounding to GiB)
    from tools.analytic import _counts
    from tools.estimator import _simulated_shard, step_memory

    st = TrainingSetup(**kw, zero_param_persistence_threshold=10 ** 9)
    step, _ = step_memory(tiny, st)
    bd, _, notes = _simulated_shard(step, st, tiny)
    lora_params = _counts(tiny, st).adapters
    assert lora_params > 0 and "fsdp_all_gather" not in bd
    assert bd["zero_gathered_params"] == 2 * (tiny.num_parameters + lora_params)
    # the prefetch is counted among the gathered parameters, not again in the buckets (2 reduce buckets of h^2)
    assert bd["zero_buckets"] == 2 * H * H * 2


def test_ds_config_values_round_trip(tmp_path, tiny):
    from tools.dsconfig import setup_fields

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 3e8,
                                                   "stage3_max_reuse_distance": 0,
                                                   "stage3_param_persistence_threshold": 1e5}}))
    fields, _ = setup_fields(p)
    assert fields["zero_max_live_parameters"] == 300_000_000
    assert fields["zero_max_reuse_distance"] == 0
    assert fields["zero_param_persistence_threshold"] == 100_000
    from tools.script import _ds_config

    st = TrainingSetup(model_id=tiny.model_id, num_gpus=2, **fields)
    z = json.loads(_ds_config(st))["zero_optimization"]
    assert (z["stage3_max_live_parameters"], z["stage3_max_reuse_distance"], z["stage3_param_persistence_threshold"]) == \
        (300_000_000, 0, 100_000)
    assert json.loads(_ds_config(TrainingSetup(model_id=tiny.model_id, num_gpus=2, zero_stage=3)))[
        "zero_optimization"]["stage3_param_persistence_threshold"] == "auto"
