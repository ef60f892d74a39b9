"""Memory of the preference / RL objectives (issue 15): the dry run of a DPO step (separate reference copy,
PEFT base as its own reference, precomputed reference) and of a GRPO step without vLLM equals a REAL CPU step
of trl 1.16's trainer code path on a tiny model, counted by the same storage counter. Both run trl's fused
head on its CPU path (the dry run's estimates take its CUDA path: tools.memory.kernels.trl_cuda_path).

The tiny model is wide enough (4.6M parameters) that the reference copy, the optimizer state and the
activations are each well above the 2% tolerance, so a missing or doubled component fails the test.
"""

from __future__ import annotations

import pytest

from tools.memory.extrapolate import combine
from tools.memory.objectives import run as run_objective
from tools.schemas import TrainingSetup

from _objective_helpers import real_dpo_step, real_grpo_step
from _simulator_helpers import tiny_spec

WIDE = dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)


def simulate_cpu_path(spec, st):
    """The dry run of the full depth with trl's fused head on its CPU path, as the real CPU step runs it."""
    depth = spec.config["num_hidden_layers"]
    return combine([run_objective(spec, st, depth, cuda_path=False)], [depth], depth)


def setup(**kw) -> TrainingSetup:
    base = dict(model_id="tiny", max_length=32, per_device_train_batch_size=1, dtype="fp32", bf16=False,
                optim="adamw_torch", lora_dropout=0.0)
    base.update(kw)
    return TrainingSetup(**base)


DPO_CASES = {
    "lora-peft-base": dict(objective="dpo", method="lora"),
    "full-copy": dict(objective="dpo", method="full"),
    "lora-copy": dict(objective="dpo", method="lora", ref_model="copy", gradient_checkpointing=False),
    "lora-precomputed": dict(objective="dpo", method="lora", precompute_ref_log_probs=True),
}


@pytest.mark.parametrize("name", sorted(DPO_CASES))
def test_dpo_step_matches_a_real_dpotrainer_step(name, tmp_path):
    st = setup(**DPO_CASES[name])
    spec = tiny_spec(WIDE)
    sim = simulate_cpu_path(spec, st)
    real = real_dpo_step(spec, st, tmp_path)
    assert sim.trainable_parameters == real["trainable_parameters"]
    # the reference copy: exactly the frozen model's bytes (and nothing without one)
    assert sim.peak_breakdown["reference_model"] == real["reference_bytes"]
    assert (real["reference_bytes"] > 0) == (st.reference_mode == "copy")
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.02), (sim.peak_breakdown, real)
    # and what the step adds on top of the resident state (activations, the reference forward, the fused head)
    sim_transient = sim.peak_bytes - sum(sim.peak_breakdown[k] for k in ("weights", "adapters", "optimizer_state", "reference_model"))
    real_transient = real["peak_bytes"] - real["resident_bytes"]
    assert sim_transient == pytest.approx(real_transient, rel=0.03)


GRPO_CASES = {
    "lora-beta0": dict(objective="grpo", method="lora"),
    "lora-beta-peft-base": dict(objective="grpo", method="lora", beta=0.04),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GRPO_CASES))
def test_grpo_step_matches_a_real_grpotrainer_step(name, tmp_path):
    """Generation with model.generate (KV cache of prompt + completion), scoring, training: the whole step and generation alone."""
    st = setup(max_length=48, max_completion_length=32, num_generations=4, per_device_train_batch_size=8, **GRPO_CASES[name])
    spec = tiny_spec(WIDE)
    sim = simulate_cpu_path(spec, st)
    real = real_grpo_step(spec, st, tmp_path)
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.02), (sim.peak_phase, sim.peak_breakdown, real)
    segments = run_objective(spec, st, spec.config["num_hidden_layers"], cuda_path=False).segments
    gen = segments["generate"]
    resident = sum(gen[k] for k in ("weights", "adapters", "optimizer_state", "reference_model"))
    # generation alone (prefill, KV cache, sampling): what it adds on top of the resident state, within 3%
    assert sum(gen.values()) - resident == pytest.approx(real["generation_peak_bytes"] - real["resident_bytes"], rel=0.03)


def test_cuda_path_projects_only_the_completion_tokens():
    """On the GPU path the fused head copies and projects only the labelled positions: a longer prompt (fewer
    completion tokens in the same max_length) needs less head memory; the CPU path scores every position."""
    spec = tiny_spec(WIDE)
    short_prompt = setup(objective="dpo", max_prompt_length=4)
    long_prompt = setup(objective="dpo", max_prompt_length=28)
    gpu = [combine([run_objective(spec, st, 2)], [2], 2).peak_bytes for st in (short_prompt, long_prompt)]
    cpu = [simulate_cpu_path(spec, st).peak_bytes for st in (short_prompt, long_prompt)]
    assert gpu[1] < gpu[0]
    assert cpu[0] == cpu[1]
