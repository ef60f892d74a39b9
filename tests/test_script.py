"""The training-script generator: every method renders a script that compiles, multi-GPU setups get
accelerate/DeepSpeed/FSDP configs that parse, and generated scripts really train a tiny Llama on CPU.

Real runs (each pays ~10 s of imports in a subprocess): a full fine-tune in trial mode with an
evaluation step on chat data, and a LoRA script run exactly as a user would (train, save, merge).
"""

from __future__ import annotations

import ast
import json
import math
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _script_helpers import run_env, shared_assets
from tools.schemas import TrainingSetup
from tools.script import ScriptError, render_script, write_script

ROOT = Path(__file__).resolve().parents[1]
BANNED = ("evaluation_strategy", "no_cuda", "overwrite_output_dir", "warmup_ratio", "torch_dtype=", "logging_dir")

SINGLE_GPU = {
    "full": dict(method="full"),
    "lora": dict(method="lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "qlora": dict(method="qlora", load_in_4bit=True, optim="paged_adamw_8bit", merge_adapter=True),
    "lora-8bit": dict(method="lora", load_in_8bit=True, optim="adamw_bnb_8bit"),
    "dora": dict(method="dora"),
    "rslora": dict(method="lora", use_rslora=True, r=64, lora_alpha=16),
    "ia3": dict(method="ia3", target_modules=["k_proj", "v_proj", "down_proj"]),
    "prompt-tuning": dict(method="prompt-tuning", num_virtual_tokens=8),
    "prefix-tuning": dict(method="prefix-tuning"),
    "p-tuning": dict(method="p-tuning", eval_strategy="steps", eval_steps=50),
}
MULTI_GPU = {
    "zero3-offload": dict(method="full", num_gpus=2, zero_stage=3, offload="all"),
    "zero2": dict(method="full", num_gpus=4, zero_stage=2),
    "fsdp": dict(method="lora", num_gpus=2, fsdp="full_shard"),
    "ddp-2nodes": dict(method="lora", num_gpus=4, num_nodes=2),
}


def setup_for(**kw) -> TrainingSetup:
    return TrainingSetup(model_id="meta-llama/Llama-3.1-8B", **kw)


def sft_keywords(source: str) -> dict[str, str]:
    """Keyword names and source of the SFTConfig(...) call in a generated script."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SFTConfig":
            return {k.arg: ast.unparse(k.value) for k in node.keywords}
    raise AssertionError("no SFTConfig(...) call in the script")


def imported_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("name", sorted(SINGLE_GPU) + sorted(MULTI_GPU))
def test_every_setup_renders_a_script_that_compiles(tmp_path, name):
    setup = setup_for(**(SINGLE_GPU.get(name) or MULTI_GPU[name]))
    rendered = write_script(setup, tmp_path / "train.py")
    py_compile.compile(str(tmp_path / "train.py"), doraise=True)
    src = rendered.train_py
    assert not any(b in src for b in BANNED), [b for b in BANNED if b in src]
    kw = sft_keywords(src)
    # the knobs come from this setup, with transformers-5 names
    assert kw["max_length"] == "MAX_LENGTH" and f"MAX_LENGTH = {setup.max_length}" in src
    assert ast.literal_eval(kw["optim"]) == setup.optim
    assert kw["activation_checkpointing"] in ("True", "False")
    assert kw["bf16"] == str(setup.bf16) and kw["fp16"] == str(setup.fp16)
    assert "use_cpu" in kw and "eval_strategy" in kw and "save_total_limit" in kw
    # the header states the launch command and the setup it came from
    doc = ast.get_docstring(ast.parse(src))
    assert rendered.launch_command in doc
    assert yaml.safe_load("\n".join(line[4:] for line in doc.split("Setup (tunepilot TrainingSetup, YAML):\n")[1].splitlines())) == setup.model_dump(mode="json")
    # only what it uses: no bitsandbytes config without quantization
    quantized = setup.load_in_4bit or setup.load_in_8bit
    assert ("transformers.BitsAndBytesConfig" in imported_names(src)) == quantized
    assert ("prepare_model_for_kbit_training" in src) == quantized
    # and nothing imported goes unused
    tree = ast.parse(src)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    bound = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names if a.name != "annotations"}
    assert bound <= used, bound - used


def test_knob_lines_carry_comments():
    src = render_script(setup_for(**SINGLE_GPU["qlora"])).train_py
    block = src[src.index("    return SFTConfig(") : src.index("# ---- trial mode")]
    knob_lines = [ln for ln in block.splitlines() if ln.startswith("        ") and "=" in ln]
    assert len(knob_lines) >= 25
    assert all("  # " in ln for ln in knob_lines), [ln for ln in knob_lines if "  # " not in ln]
    bnb = src[src.index("BitsAndBytesConfig(") : src.index("model = AutoModelForCausalLM")]
    assert all("  # " in ln for ln in bnb.splitlines()[1:-2] if ln.strip())


def test_generated_peft_config_builds_the_real_peft_objects():
    """The adapter block of the script, executed with peft, gives the configs the setup asked for."""
    import peft

    def build(setup):
        src = render_script(setup).train_py
        tree = ast.parse(src)
        stmt = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "peft_config")
        ns = {**vars(peft), "model": None}
        exec(compile(ast.Module([stmt], []), "<peft_config>", "exec"), ns)
        return ns["peft_config"]

    lora = build(setup_for(**SINGLE_GPU["rslora"]))
    assert isinstance(lora, peft.LoraConfig) and lora.r == 64 and lora.lora_alpha == 16 and lora.use_rslora
    dora = build(setup_for(method="dora", target_modules=["q_proj", "o_proj"]))
    assert dora.use_dora and set(dora.target_modules) == {"q_proj", "o_proj"}
    ia3 = build(setup_for(**SINGLE_GPU["ia3"]))
    assert isinstance(ia3, peft.IA3Config) and set(ia3.feedforward_modules) == {"down_proj"}
    pt = build(setup_for(**SINGLE_GPU["prompt-tuning"]))
    assert isinstance(pt, peft.PromptTuningConfig) and pt.num_virtual_tokens == 8


def test_zero3_offload_writes_deepspeed_and_accelerate_configs(tmp_path):
    setup = setup_for(**MULTI_GPU["zero3-offload"])
    rendered = write_script(setup, tmp_path / "train.py")
    assert rendered.launch_command == "accelerate launch --config_file accelerate_config.yaml train.py"
    acc = yaml.safe_load((tmp_path / "accelerate_config.yaml").read_text())
    ds = json.loads((tmp_path / "ds_config.json").read_text())
    assert acc["distributed_type"] == "DEEPSPEED" and acc["num_processes"] == 2
    assert acc["deepspeed_config"]["deepspeed_config_file"] == "ds_config.json"
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "deepspeed" in sft_keywords(rendered.train_py)


def test_zero2_has_no_parameter_offload(tmp_path):
    rendered = render_script(setup_for(**MULTI_GPU["zero2"]))
    ds = json.loads(rendered.files["ds_config.json"])
    assert ds["zero_optimization"]["stage"] == 2 and "offload_param" not in ds["zero_optimization"]
    assert yaml.safe_load(rendered.files["accelerate_config.yaml"])["num_processes"] == 4


def test_fsdp_config_shards_and_checkpoints_in_fsdp():
    rendered = render_script(setup_for(**MULTI_GPU["fsdp"]))
    assert set(rendered.files) == {"accelerate_config.yaml"}
    acc = yaml.safe_load(rendered.files["accelerate_config.yaml"])
    assert acc["distributed_type"] == "FSDP" and acc["num_processes"] == 2
    assert acc["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert acc["fsdp_config"]["fsdp_activation_checkpointing"] is True
    # FSDP recomputes activations itself; the Trainer must not do it twice
    assert sft_keywords(rendered.train_py)["activation_checkpointing"] == "False"


def test_multi_node_config_names_the_machines():
    acc = yaml.safe_load(render_script(setup_for(**MULTI_GPU["ddp-2nodes"])).files["accelerate_config.yaml"])
    assert acc["distributed_type"] == "MULTI_GPU" and acc["num_machines"] == 2 and acc["num_processes"] == 4
    assert "main_process_ip" in acc


def test_single_gpu_has_no_extra_files():
    rendered = render_script(setup_for(method="lora"))
    assert rendered.files == {} and rendered.launch_command == "python train.py"


def test_bad_requests_name_the_field():
    with pytest.raises(ScriptError, match="task"):
        render_script(setup_for(task="seq2seq"))
    with pytest.raises(ScriptError, match="merge_adapter"):
        render_script(setup_for(method="prompt-tuning", merge_adapter=True))


def test_dataset_options_reach_the_script():
    src = render_script(setup_for(dataset="org/tickets"), text_field="body").train_py
    assert 'DATASET = "org/tickets"' in src and 'TEXT_FIELD = "body"' in src and "CHAT = False" in src
    src = render_script(setup_for(), dataset="data/chats.jsonl", chat=True).train_py
    assert 'DATASET = "data/chats.jsonl"' in src and "CHAT = True" in src
    # chat formatting wins over a text column passed along with it (callers forward the setup's defaults)
    src = render_script(setup_for(use_chat_template=True), text_field="text", chat=True).train_py
    assert "CHAT = True" in src


def test_script_cli_writes_the_files(tmp_path):
    setup_path = setup_for(**MULTI_GPU["zero3-offload"]).save(tmp_path / "setup.yaml")
    out = tmp_path / "run" / "train.py"
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "script", str(setup_path), "-o", str(out), "--dataset", "org/data", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["script"] == str(out) and out.is_file()
    assert sorted(Path(p).name for p in info["files"]) == ["accelerate_config.yaml", "ds_config.json"]
    assert info["launch_command"].startswith("accelerate launch")
    assert 'DATASET = "org/data"' in out.read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "agent.cli", "script", str(setup_path), "--text-field", "x", "--chat"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not both" in bad.stderr


def test_script_cli_drops_lora_dropout_for_moe_experts(tmp_path):
    """A catalog MoE model with all-linear LoRA: peft refuses dropout on fused experts, so the script gets 0."""
    setup_path = TrainingSetup(model_id="mistralai/Mixtral-8x7B-v0.1", method="lora", lora_dropout=0.05).save(tmp_path / "s.yaml")
    out = tmp_path / "train.py"
    res = subprocess.run([sys.executable, "-m", "agent.cli", "script", str(setup_path), "-o", str(out), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=run_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "lora_dropout=0.0," in out.read_text()
    assert any("ParamWrapper" in n for n in json.loads(res.stdout)["notes"])


def test_script_cli_uses_eager_where_transformers_has_no_sdpa(tmp_path):
    setup_path = TrainingSetup(model_id="google/gemma-2-2b", method="lora").save(tmp_path / "s.yaml")
    out = tmp_path / "train.py"
    res = subprocess.run([sys.executable, "-m", "agent.cli", "script", str(setup_path), "-o", str(out), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=run_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert '"eager"' in out.read_text() and '"sdpa"' not in out.read_text()
    assert any("no sdpa attention for gemma2" in n for n in json.loads(res.stdout)["notes"])


# ---- real runs on CPU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def _run(args, cwd, env, timeout=240):
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return res


def test_full_finetune_trial_mode_runs_with_eval_step(tmp_path, assets):
    """Full fine-tuning, fp32 on CPU, chat data, eval every 50 steps: trial mode writes a complete report."""
    model_dir, _, chat = assets
    setup = TrainingSetup(model_id="tiny", method="full", dtype="fp32", bf16=False, max_length=48,
                          per_device_train_batch_size=2, optim="adamw_torch", eval_strategy="steps", eval_steps=50,
                          use_chat_template=True)
    write_script(setup, tmp_path / "train.py")
    res = _run(["train.py", "--model", str(model_dir), "--dataset", str(chat), "--trial-steps", "2", "--trial-report", "r.json"],
               tmp_path, run_env(tmp_path))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"], (report, res.stdout[-2000:], res.stderr[-2000:])
    assert res.returncode == 0
    assert report["device"] == "cpu" and report["max_memory_allocated_gib"] is None
    assert report["cpu_peak_rss_gib"] > 0.05
    assert len(report["loss_per_step"]) == 2 and all(math.isfinite(x) for x in report["loss_per_step"])
    assert math.isfinite(report["eval_loss"])
    assert report["tokens_per_second"] > 0 and report["micro_batch"] == 2 and report["max_length"] == 48


def test_lora_script_runs_unchanged_as_a_user_would(tmp_path, assets):
    """`python train.py --model ... --dataset ... --max-steps 2`: checkpoints, the final adapter and the merged model."""
    model_dir, text, _ = assets
    setup = TrainingSetup(model_id="tiny", method="lora", r=4, lora_alpha=8, max_length=32, save_steps=1,
                          save_total_limit=1, merge_adapter=True, logging_steps=1)
    write_script(setup, tmp_path / "train.py")
    env = run_env(tmp_path)
    res = _run(["train.py", "--model", str(model_dir), "--dataset", str(text), "--max-steps", "2", "--output-dir", "out"],
               tmp_path, env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "final" / "adapter_config.json").is_file()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4
    assert (out / "merged" / "config.json").is_file()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # save_total_limit=1 kept only the last


# --------------------------------------------------------------------------------------
# loss paths and memory levers (issue 12)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["trl_fused", "hf", "liger", "cce"])
def test_each_loss_path_writes_its_trainer_flags_and_dependency(tmp_path, impl):
    st = setup_for(loss_impl=impl, use_liger_kernel=impl == "liger", activation_offloading=True)
    r = render_script(st)
    (tmp_path / "train.py").write_text(r.train_py)
    py_compile.compile(str(tmp_path / "train.py"), doraise=True)
    kw = sft_keywords(r.train_py)
    assert kw["activation_offloading"] == "torch.cuda.is_available()"
    needs = next(line for line in r.train_py.splitlines() if line.strip().startswith("pip install"))
    names = imported_names(r.train_py)
    assert f"LOSS_IMPL = {impl!r}" in r.train_py.replace('"', "'")
    if impl == "trl_fused":
        assert "TRAINER = SFTTrainer" in r.train_py and "liger" not in needs and "cut-cross-entropy" not in needs
    else:
        assert "TRAINER = ModelLossTrainer" in r.train_py
    if impl == "liger":
        assert "liger-kernel" in needs.split() and kw["use_liger_kernel"] == "True"
        assert "liger_kernel.transformers.monkey_patch._apply_liger_kernel_to_instance" in names
        assert any("liger-kernel" in n for n in r.notes)
    if impl == "cce":
        assert "cut-cross-entropy" in needs.split() and "cut_cross_entropy.linear_cross_entropy" in names
        assert "use_liger_kernel" not in kw
    if impl == "hf":
        assert "use_liger_kernel" not in kw and "liger" not in needs


def test_hf_loss_trial_runs_and_reports_its_loss_path(tmp_path, assets):
    """loss_impl=hf: the script trains through transformers' own loss (ModelLossTrainer) and says so in the report."""
    model_dir, text, _ = assets
    setup = TrainingSetup(model_id="tiny", method="lora", r=4, lora_alpha=8, max_length=32, loss_impl="hf",
                          activation_offloading=True)
    write_script(setup, tmp_path / "train.py")
    res = _run(["train.py", "--model", str(model_dir), "--dataset", str(text), "--trial-steps", "2", "--trial-report", "r.json"],
               tmp_path, run_env(tmp_path))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"], (report, res.stderr[-2000:])
    assert report["loss_impl"] == "hf"
    assert len(report["loss_per_step"]) == 2 and all(math.isfinite(x) for x in report["loss_per_step"])
