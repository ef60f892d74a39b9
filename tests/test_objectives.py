"""Preference and RL objectives (issue 15): the setup's objective knobs, their validation, and the generated
DPO / KTO / reward / GRPO scripts, rendered, compiled and run on CPU on a tiny real Llama and tiny datasets
written here (each real run pays ~10 s of trl imports in a subprocess).
"""

from __future__ import annotations

import json
import math
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from tools.schemas import LOSS_TYPES, TrainingSetup, format_validation_error
from tools.script import ScriptError, render_script, write_script
from tools.trial import run_trial

from _script_helpers import (
    run_env, shared_assets, write_preference_dataset, write_prompt_dataset, write_unpaired_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
TRL = Path(__import__("trl").__file__).parent


def setup(**kw) -> TrainingSetup:
    base = dict(model_id="tiny-llama", max_length=64, per_device_train_batch_size=2, dtype="fp32", bf16=False,
                optim="adamw_torch", learning_rate=1e-3, warmup_steps=0)
    if kw.get("objective") == "grpo":
        base["max_completion_length"] = 32
    base.update(kw)
    return TrainingSetup(**base)


def invalid(**kw) -> str:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        TrainingSetup(model_id="m", **kw)
    return format_validation_error(e.value)


# ---- schema ------------------------------------------------------------------------------


def test_knob_names_are_trls_own():
    """Every objective knob that trl has is a field of trl 1.16's config class under the same name."""
    from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig

    fields = {c: set(c.__dataclass_fields__) for c in (DPOConfig, KTOConfig, RewardConfig, GRPOConfig)}
    for name in ("precompute_ref_log_probs", "loss_type", "beta", "max_length"):
        assert name in fields[DPOConfig] and name in fields[KTOConfig]
    for name in ("num_generations", "max_completion_length", "generation_batch_size", "use_vllm", "vllm_mode",
                 "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "beta", "loss_type"):
        assert name in fields[GRPOConfig], name
        assert name in TrainingSetup.model_fields
    assert GRPOConfig.__dataclass_fields__["vllm_gpu_memory_utilization"].default == TrainingSetup.model_fields["vllm_gpu_memory_utilization"].default
    assert GRPOConfig.__dataclass_fields__["num_generations"].default == TrainingSetup.model_fields["num_generations"].default
    assert GRPOConfig.__dataclass_fields__["loss_type"].default == LOSS_TYPES["grpo"][0]
    assert KTOConfig.__dataclass_fields__["loss_type"].default == LOSS_TYPES["kto"][0]
    assert DPOConfig.__dataclass_fields__["loss_type"].default_factory() == [LOSS_TYPES["dpo"][0]]
    # every DPO loss we accept is one trl's DPOConfig help lists
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert all(f"'{name}'" in help_text for name in LOSS_TYPES["dpo"])


def test_reference_mode_follows_trl():
    assert setup(objective="dpo").reference_mode == "peft_base"  # LoRA: adapter disabled
    assert setup(objective="dpo", method="full").reference_mode == "copy"
    assert setup(objective="dpo", ref_model="copy").reference_mode == "copy"
    assert setup(objective="kto", precompute_ref_log_probs=True).reference_mode == "precomputed"
    assert setup(objective="grpo", per_device_train_batch_size=8).reference_mode == "none"  # beta 0
    assert setup(objective="grpo", per_device_train_batch_size=8, beta=0.04, method="full").reference_mode == "copy"
    assert setup(objective="sft").reference_mode == "none"
    reward = setup(objective="reward")
    assert (reward.task, reward.num_labels, reward.reference_mode) == ("sequence-classification", 1, "none")


@pytest.mark.parametrize("kw, field", [
    (dict(objective="dpo", method="full", ref_model="peft_base"), "ref_model"),
    (dict(objective="grpo", precompute_ref_log_probs=True, per_device_train_batch_size=8), "precompute_ref_log_probs"),
    (dict(objective="dpo", precompute_ref_log_probs=True, ref_model="copy"), "precompute_ref_log_probs"),
    (dict(objective="kto", loss_type="sigmoid", per_device_train_batch_size=2), "loss_type"),
    (dict(objective="grpo", loss_type=["dapo", "grpo"], per_device_train_batch_size=8), "loss_type"),
    (dict(objective="sft", beta=0.1), "beta"),
    (dict(objective="dpo", use_vllm=True), "use_vllm"),
    (dict(objective="grpo", max_length=512, max_completion_length=512, per_device_train_batch_size=8), "max_completion_length"),
    (dict(objective="grpo", max_length=1024, max_prompt_length=800, per_device_train_batch_size=8), "max_prompt_length"),
    (dict(objective="grpo", per_device_train_batch_size=4, generation_batch_size=6), "generation_batch_size"),
    (dict(objective="grpo", per_device_train_batch_size=8, use_vllm=True, vllm_tensor_parallel_size=2), "vllm_tensor_parallel_size"),
    (dict(objective="kto", per_device_train_batch_size=1), "per_device_train_batch_size"),
    (dict(objective="dpo", max_length=512, max_prompt_length=512), "max_prompt_length"),
    (dict(objective="sdpo"), "objective"),
])
def test_bad_objective_knobs_name_the_field(kw, field):
    msg = invalid(**kw)
    assert msg.startswith("invalid setup: ") and f"{field}:" in msg, msg


def test_grpo_generation_batch_holds_whole_groups():
    st = setup(objective="grpo", per_device_train_batch_size=1, num_generations=8)
    assert st.generation_batch_size == 8  # normalised: one whole group, trained over 8 steps
    assert setup(objective="grpo", per_device_train_batch_size=4, gradient_accumulation_steps=2).generation_batch_size is None
    with pytest.raises(Exception, match="num_generations"):
        setup(objective="grpo", per_device_train_batch_size=4, generation_batch_size=12, num_generations=8)


def test_switching_objective_resets_the_knobs_it_does_not_have():
    dpo = setup(objective="dpo", beta=0.3, precompute_ref_log_probs=True)
    assert dpo.for_objective("sft").objective == "sft"
    assert dpo.for_objective("sft").beta is None
    grpo = setup(objective="dpo", max_length=1024).for_objective("grpo")
    assert grpo.effective_beta == 0.0 and grpo.effective_loss_type == "dapo"
    assert setup(objective="reward").for_objective("dpo").task == "causal-lm"
    yaml_round_trip = TrainingSetup.model_validate(setup(objective="grpo", per_device_train_batch_size=8).model_dump())
    assert yaml_round_trip.for_objective("reward").num_labels == 1


# ---- rendering ---------------------------------------------------------------------------


RENDER_CASES = {
    "dpo-lora": dict(objective="dpo"),
    "dpo-full-copy": dict(objective="dpo", method="full"),
    "dpo-lora-copy": dict(objective="dpo", ref_model="copy"),
    "dpo-precomputed": dict(objective="dpo", precompute_ref_log_probs=True, loss_type=["sigmoid", "sft"]),
    "dpo-qlora-zero3": dict(objective="dpo", method="qlora", load_in_4bit=True, bf16=True, num_gpus=2, zero_stage=3),
    "kto": dict(objective="kto"),
    "reward-lora": dict(objective="reward"),
    "reward-full-fsdp": dict(objective="reward", method="full", num_gpus=4, fsdp="full_shard"),
    "grpo": dict(objective="grpo", per_device_train_batch_size=8, max_completion_length=32),
    "grpo-vllm-colocate": dict(objective="grpo", per_device_train_batch_size=8, max_completion_length=32, use_vllm=True,
                               beta=0.04, method="full", num_gpus=2, zero_stage=2),
    "grpo-vllm-server": dict(objective="grpo", per_device_train_batch_size=4, max_completion_length=32, use_vllm=True,
                             vllm_mode="server", vllm_server_gpus=2, num_gpus=2),
}
TRAINER = {"dpo": "DPOTrainer", "kto": "KTOTrainer", "reward": "RewardTrainer", "grpo": "GRPOTrainer"}


@pytest.mark.parametrize("name", sorted(RENDER_CASES))
def test_every_objective_renders_a_script_that_compiles(tmp_path, name):
    st = setup(**RENDER_CASES[name])
    rendered = write_script(st, tmp_path / "train.py")
    py_compile.compile(str(tmp_path / "train.py"), doraise=True)
    src = rendered.train_py
    assert f"from trl import {TRAINER[st.objective].replace('Trainer', 'Config')}, {TRAINER[st.objective]}" in src
    assert "SFTTrainer" not in src
    assert "--trial-steps" in src and "worst_case_rows" in src
    if st.objective in ("dpo", "kto"):
        assert f"precompute_ref_log_probs={st.precompute_ref_log_probs}" in src
        assert f"beta={st.effective_beta!r}" in src
        assert ("ref = load_base(model_path)" in src) == (st.reference_mode == "copy")
    if st.objective == "grpo":
        assert f"NUM_GENERATIONS = {st.num_generations}" in src and "def reward_fn(" in src
        assert f"use_vllm=USE_VLLM" in src and f"USE_VLLM = {st.use_vllm}" in src
        if st.use_vllm:
            assert f'vllm_mode="{st.vllm_mode}"' in src
            assert f"vllm_gpu_memory_utilization={st.vllm_gpu_memory_utilization}" in src
        if st.vllm_mode == "server" and st.use_vllm:
            assert "CUDA_VISIBLE_DEVICES=2,3 trl vllm-serve" in src and "CUDA_VISIBLE_DEVICES=0,1 accelerate launch" in src
            assert any("vllm-serve" in n for n in rendered.notes)
    if st.objective == "reward":
        assert "AutoModelForSequenceClassification.from_pretrained" in src and "num_labels=1" in src
        assert "AutoModelForCausalLM" not in src
        if st.is_peft:
            assert 'task_type="SEQ_CLS"' in src
    if st.num_gpus > 1:
        assert "accelerate_config.yaml" in rendered.files
    if st.zero_stage:
        assert json.loads(rendered.files["ds_config.json"])["zero_optimization"]["stage"] == st.zero_stage


def test_generated_configs_build_trls_config_objects(tmp_path):
    """The make_config of every objective's script builds the real trl config (what trl would reject, fails here)."""
    import importlib.util

    for name in ("dpo-precomputed", "kto", "reward-lora", "grpo", "grpo-vllm-colocate"):
        st = setup(**{**RENDER_CASES[name], "num_gpus": 1, "zero_stage": 0})
        path = write_script(st, tmp_path / name / "train.py") and tmp_path / name / "train.py"
        spec = importlib.util.spec_from_file_location(f"train_{name.replace('-', '_')}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.make_config(str(tmp_path / name / "out"), max_steps=2, trial=True)
        assert config.max_steps == 2
        if st.objective == "grpo":
            assert config.num_generations == st.num_generations
            assert config.generation_kwargs == {("min_tokens" if st.use_vllm else "min_new_tokens"): st.max_completion_length}
            assert config.generation_batch_size == st.grpo_generation_batch
            assert config.beta == st.effective_beta and config.use_vllm == st.use_vllm
        elif st.objective != "reward":
            assert config.precompute_ref_log_probs == st.precompute_ref_log_probs
            assert config.beta == st.effective_beta


def test_script_refuses_what_trl_cannot_do():
    with pytest.raises(ScriptError, match="method"):
        render_script(setup(objective="dpo", method="prompt-tuning"))


def test_script_cli_objective_flag(tmp_path):
    sft = setup()
    path = sft.save(tmp_path / "setup.yaml")
    env = run_env(tmp_path)
    res = subprocess.run([sys.executable, "-m", "agent.cli", "script", str(path), "-o", str(tmp_path / "out" / "train.py"),
                          "--objective", "dpo", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "DPOTrainer(" in (tmp_path / "out" / "train.py").read_text()
    bad = subprocess.run([sys.executable, "-m", "agent.cli", "script", str(path), "--objective", "ppo"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--objective" in bad.stderr and "Traceback" not in bad.stderr


# ---- real runs on CPU ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    model_dir, _, _ = shared_assets(tmp_path_factory)
    base = tmp_path_factory.mktemp("objective_data")
    return {
        "model": model_dir,
        "pairs": write_preference_dataset(base / "pairs.jsonl"),
        "unpaired": write_unpaired_dataset(base / "unpaired.jsonl"),
        "prompts": write_prompt_dataset(base / "prompts.jsonl"),
    }


def _run(args, cwd, env, timeout=300):
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _trial(st: TrainingSetup, tmp_path, assets, data: str):
    """run_trial (what `tunepilot trial` runs): the script's trial mode, 2 steps, its report read back."""
    report = run_trial(st, steps=2, timeout=300, workdir=tmp_path / "w", model_path=str(assets["model"]),
                       dataset=str(assets[data]))
    assert report.ok, (report.error_message, Path(report.log_path).read_text()[-3000:])
    raw = json.loads((tmp_path / "w" / "trial_report.json").read_text())  # the script's own report parses
    assert raw["objective"] == st.objective and raw["steps"] == 2
    assert len(report.loss_per_step) == 2 and all(math.isfinite(x) for x in report.loss_per_step)
    assert report.tokens_per_second and report.tokens_per_second > 0
    assert report.device == "cpu" and report.comparison["note"]
    return raw


GRPO_TINY = dict(objective="grpo", max_length=24, max_completion_length=8, num_generations=2, per_device_train_batch_size=2)


def test_dpo_script_trials_on_cpu(tmp_path, assets):
    """DPO with LoRA (reference = the base with the adapter disabled): 2 steps on worst-case pairs from the test's data."""
    raw = _trial(setup(objective="dpo"), tmp_path, assets, "pairs")
    assert raw["reference"] == "peft_base" and raw["max_length"] == 64


def test_grpo_script_trials_on_cpu(tmp_path, assets):
    """GRPO without vLLM: model.generate completions of full length, the example reward, 2 steps."""
    raw = _trial(setup(**GRPO_TINY), tmp_path, assets, "prompts")
    assert raw["num_generations"] == 2 and raw["max_completion_length"] == 8 and raw["use_vllm"] is False
    assert len(raw["reward_per_step"]) == 2 and raw["generated_tokens_per_second"] > 0


@pytest.mark.slow
def test_dpo_and_grpo_scripts_train_as_a_user_would(tmp_path, assets):
    """`python train.py --dataset ... --max-steps 2` on the test's data: trains and saves the adapter."""
    for name, st, data in (("dpo", setup(objective="dpo"), "pairs"), ("grpo", setup(**GRPO_TINY), "prompts")):
        work = tmp_path / name
        write_script(st, work / "train.py")
        res = _run(["train.py", "--model", str(assets["model"]), "--dataset", str(assets[data]), "--max-steps", "2",
                    "--output-dir", str(work / "out")], work, run_env(tmp_path))
        assert (work / "out" / "final" / "adapter_config.json").is_file(), res.stdout[-2000:]
        assert "train_loss" in res.stdout + res.stderr


@pytest.mark.slow
def test_dpo_full_with_reference_copy_trials_on_cpu(tmp_path, assets):
    raw = _trial(setup(objective="dpo", method="full"), tmp_path, assets, "pairs")
    assert raw["reference"] == "copy"


@pytest.mark.slow
def test_kto_and_reward_scripts_trial_on_cpu(tmp_path, assets):
    _trial(setup(objective="kto"), tmp_path / "kto", assets, "unpaired")
    _trial(setup(objective="reward"), tmp_path / "reward", assets, "pairs")


def test_missing_column_is_a_data_error_naming_it(tmp_path, assets):
    st = setup(objective="dpo")
    report = run_trial(st, steps=1, timeout=300, workdir=tmp_path / "w", model_path=str(assets["model"]),
                       dataset=str(assets["prompts"]))
    assert not report.ok and report.error_kind == "data_error"
    assert "'chosen'" in report.error_message and "'rejected'" in report.error_message


def test_agent_plan_tool_keeps_the_objective(tmp_path, monkeypatch):
    """The agent's plan_training takes the objective in its `setup` object ("I want to DPO my SFT model")."""
    monkeypatch.chdir(tmp_path)
    from tools.agent_tools import plan_training_tool

    _, art = plan_training_tool(model="meta-llama/Llama-3.1-8B", hardware="A100 80GB", seq_len=1024,
                                setup={"objective": "grpo", "num_generations": 4, "use_vllm": True})
    best = TrainingSetup.model_validate(art["setup"])
    assert (best.objective, best.num_generations, best.use_vllm) == ("grpo", 4, True)
    with pytest.raises(Exception, match="plan_training searches r"):
        plan_training_tool(model="meta-llama/Llama-3.1-8B", hardware="A100 80GB", setup={"objective": "dpo", "r": 8})
