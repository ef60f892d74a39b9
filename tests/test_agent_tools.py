"""The agent's tool list, its prompts, web search and the two error tiers."""

from __future__ import annotations

import json
import socket
import threading
import time

import jinja2
import pytest

import prompts
from tools import agent_tools
from tools.schemas import TrainingSetup, TunepilotError
from tools.web_search import WebSearchError, web_search
from tests._agent_helpers import closed_port

EXPECTED = ["plan_training", "estimate_memory", "write_training_script", "run_trial", "make_peft_config",
            "lookup_model", "web_search"]
LLAMA = "meta-llama/Llama-3.1-8B"
POLYGLOT = "EleutherAI/polyglot-ko-1.3b"


def test_tools_are_one_explicit_list_in_order():
    assert [t.name for t in agent_tools.TOOLS] == EXPECTED


@pytest.mark.parametrize("tool", agent_tools.TOOLS, ids=lambda t: t.name)
def test_every_tool_is_small_typed_and_described_for_the_model(tool):
    from langchain_core.utils.function_calling import convert_to_openai_tool

    assert tool.name in EXPECTED
    assert 40 <= len(tool.description) <= 160 and "\n" not in tool.description, tool.description
    fn = convert_to_openai_tool(tool)["function"]
    props = fn["parameters"]["properties"]
    assert fn["name"] == tool.name and props, f"{tool.name} takes no arguments"
    assert len(props) <= 10, f"{tool.name} has {len(props)} arguments: knobs belong in the one `setup` object"
    for name, prop in props.items():
        assert len(prop.get("description", "")) >= 15, f"{tool.name}.{name} has no useful description"
        assert "anyOf" not in prop and prop.get("type") in ("string", "integer", "number", "boolean", "object"), prop
    # the pydantic model that validates the call knows every advertised field
    model = tool.metadata["tunepilot_args"]
    assert set(props) <= set(model.model_fields)
    assert tool.response_format == "content_and_artifact"


def test_first_prompt_fits_the_budget():
    """System prompt + every tool schema, as the server receives them, stay under ~3,000 tokens (chars / 3.5)."""
    from agent.prompt_budget import FIRST_PROMPT_BUDGET_TOKENS, approx_tokens, report

    r = report()
    assert r["first_prompt_tokens"] <= FIRST_PROMPT_BUDGET_TOKENS, r
    assert r["first_prompt_tokens"] == r["system_prompt_tokens"] + r["tool_schema_tokens"]
    assert approx_tokens("x" * 35) == 10 and approx_tokens("x" * 36) == 11
    # the old 25 KB of flat knobs would not pass: the check can fail
    assert approx_tokens("x" * 25_000) > FIRST_PROMPT_BUDGET_TOKENS


def test_schemas_and_prompt_carry_no_concrete_examples_to_copy():
    """A weak model copies examples into its arguments: schemas name no real GPU, model or dataset."""
    import re

    from agent.prompt_budget import tool_schemas

    text = json.dumps(tool_schemas(agent_tools.TOOLS)) + prompts.render("system", today="2026-11-22")
    for example in ("4090", "A100", "H100", "T4", "Llama", "Qwen", "polyglot", "alpaca", "hidden_size num_hidden_layers"):
        assert not re.search(rf"\b{re.escape(example)}\b", text), example


def test_every_prompt_renders_and_a_missing_variable_raises():
    values = {"today": "2026-11-22", "estimate": "{}", "calls": 12, "query": "x", "reason": "", "tool": "plan_training",
              "model": "m", "setup": "", "steps": 3, "summary": "", "findings": "", "hint": "", "n_ctx": 4096,
              "what_to_do": "type /reset", "source": "llama.cpp /props n_ctx", "needed": 3500, "suggest": 8192,
              "error": "unknown GPU"}
    names = prompts.names()
    assert {"system", "trial_not_allowed", "limit_reached", "web_results", "llm_not_configured", "repeated_call",
            "tool_limit", "trial_confirm", "trial_rejected", "history_trimmed", "context_overflow", "context_too_small",
            "loop_stopped", "repeated_failed_call"} <= set(names)
    for name in names:
        text = prompts.render(name, **values)
        assert len(text) > 40 and "{{" not in text and "{%" not in text
    system = prompts.render("system", today="2026-11-22")
    for rule in ("Korean", "Never silently change", "untrusted", "tunepilot script setup.yaml -o train.py", "2026-11-22",
                 "plan_training", "setup_id", "confirm"):
        assert rule in system
    with pytest.raises(jinja2.UndefinedError):
        prompts.render("system")
    with pytest.raises(FileNotFoundError, match="no prompt named"):
        prompts.render("nope")


# --------------------------------------------------------------------------------------
# tools called directly: compact JSON, errors raised for the middleware
# --------------------------------------------------------------------------------------


def _invoke(name: str, ctx=None, **args):
    tool = next(t for t in agent_tools.TOOLS if t.name == name)
    call = {"type": "tool_call", "name": name, "args": args, "id": "c1"}
    if ctx is None:
        return tool.invoke(call)
    with agent_tools.tool_context(ctx):
        return tool.invoke(call)


def _history(setup: TrainingSetup, **artifact):
    from langchain_core.messages import ToolMessage

    return [ToolMessage(content="{}", tool_call_id="x", name="plan_training",
                        artifact={"setup": setup.model_dump(mode="json"), "setup_id": agent_tools.setup_id_of(setup), **artifact})]


def test_plan_training_is_one_call_with_summary_script_and_setup_id(tmp_path):
    ctx = agent_tools.ToolContext(workdir=tmp_path, thread_id="t")
    msg = _invoke("plan_training", ctx, model=POLYGLOT, hardware="T4", seq_len=512, dataset_examples=2000, exact=False)
    data = json.loads(msg.content)
    assert data["fits"] is True and data["setup_id"].startswith("s-")
    # the summary quotes the engine's own numbers, verdict first
    mem, t = data["memory"], data["time"]
    assert data["summary"].startswith("FITS: EleutherAI/polyglot-ko-1.3b on 1x NVIDIA T4")
    for number in (mem["per_gpu_total_gib"], mem["headroom_gib"], t["tokens_per_second"]):
        assert str(number) in data["summary"]
    assert data["setup"]["precision"] == "fp16"  # a T4 has no bf16
    script = tmp_path / "t" / "train.py"
    assert data["script"] == str(script) and script.is_file() and data["launch_command"] == "python train.py"
    compile(script.read_text(), str(script), "exec")
    assert msg.artifact["setup_id"] == data["setup_id"] and msg.artifact["script_path"] == str(script)
    assert len(msg.content) < 3000, "results stay compact (~850 tokens)"


def test_knobs_at_the_top_level_and_old_names_are_accepted(tmp_path):
    ctx = agent_tools.ToolContext(workdir=tmp_path)
    a = json.loads(_invoke("estimate_memory", ctx, model=POLYGLOT, gpu="T4", r=8, per_device_train_batch_size=2, seq_len=256, fast=True).content)
    b = json.loads(_invoke("estimate_memory", ctx, model=POLYGLOT, hardware="T4", setup={"rank": 8, "micro_batch": 2}, seq_len=256, fast=True).content)
    assert a["setup"]["r"] == b["setup"]["r"] == 8 and a["setup"]["micro_batch"] == b["setup"]["micro_batch"] == 2
    assert a["setup_id"] == b["setup_id"] and a["memory"] == b["memory"]
    # a knob nobody knows is left out, and the result says so with the list of real ones
    c = json.loads(_invoke("estimate_memory", ctx, model=POLYGLOT, hardware="T4", setup={"warp_speed": 9, "r": 8}, seq_len=256,
                           fast=True).content)
    assert c["setup"]["r"] == 8 and "warp_speed" not in c["setup"]
    assert any("ignored unknown knob(s) 'warp_speed'" in n and "per_device_train_batch_size" in n for n in c["assumptions"])
    # where there is no result to carry the note, it is still an error naming the knob
    with pytest.raises(TunepilotError, match="unknown knob 'warp_speed'.*per_device_train_batch_size"):
        agent_tools.normalise_knobs({"warp_speed": 9})


def test_user_errors_raise_tunepilot_errors_naming_the_field(tmp_path):
    with pytest.raises(TunepilotError, match="GPU"):
        _invoke("plan_training", model=POLYGLOT, hardware="RTX 9999 Hyper", exact=False)
    ctx = agent_tools.ToolContext(workdir=tmp_path)
    with agent_tools.tool_context(ctx), pytest.raises(TunepilotError, match="^model: there is no setup"):
        agent_tools.resolve_setup(agent_tools.EstimateArgs())


def test_validation_errors_keep_their_full_reason():
    """The reason of a refusal reaches the model: 'offload: CPU offload needs zero_stage 1-3 or fsdp', not ': .'"""
    with pytest.raises(TunepilotError) as e:
        _invoke("estimate_memory", model=POLYGLOT, hardware="T4", setup={"offload": "all", "zero_stage": 0})
    assert str(e.value) == "invalid setup: offload: CPU offload needs zero_stage 1-3 or fsdp"
    with pytest.raises(TunepilotError) as e:
        _invoke("plan_training", model=POLYGLOT, hardware="T4", seq_len="long")
    assert str(e.value).startswith("plan_training arguments: seq_len: Input should be a valid integer")
    with pytest.raises(TunepilotError) as e:  # a missing argument says what to pass
        _invoke("plan_training", model=POLYGLOT)
    assert str(e.value) == ("plan_training arguments: hardware is missing: The user's GPUs as they wrote them "
                            "(count and name), or 'local' to detect this machine's.")


def test_seq_len_beyond_the_models_context_is_refused():
    from tools.models import lookup_model

    limit = lookup_model(POLYGLOT).max_position_embeddings
    for tool, args in (("plan_training", {"hardware": "T4", "exact": False}), ("estimate_memory", {"fast": True})):
        with pytest.raises(TunepilotError, match=f"seq_len {limit * 512} is longer than .*context of {limit} tokens"):
            _invoke(tool, model=POLYGLOT, seq_len=limit * 512, **args)


def test_dataset_arguments_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tickets.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "data").mkdir()
    check = agent_tools.check_dataset
    assert check("tickets.jsonl") == "tickets.jsonl" and check(str(tmp_path / "data")) == str(tmp_path / "data")
    assert check("OWNER/some-dataset_v2") == "OWNER/some-dataset_v2"
    for bad, why in (("hidden_size num_hidden_layers", "neither"), ("qqq", "neither"), ("missing.jsonl", "no such file"),
                     ("./nope/", "no such file"), (POLYGLOT, "is the model"), ("", "empty")):
        with pytest.raises(TunepilotError, match=why):
            check(bad, POLYGLOT)
    ctx = agent_tools.ToolContext(workdir=tmp_path / "w")
    with pytest.raises(TunepilotError, match="'qqq' is neither"):
        _invoke("write_training_script", ctx, model=POLYGLOT, hardware="T4", seq_len=512, dataset="qqq")
    assert not (tmp_path / "w").exists(), "nothing is written for a bad dataset"


def test_script_for_a_setup_that_does_not_fit_is_refused_unless_forced(tmp_path):
    ctx = agent_tools.ToolContext(workdir=tmp_path, thread_id="t")
    big = {"method": "full", "per_device_train_batch_size": 8, "gradient_checkpointing": False}
    with pytest.raises(TunepilotError, match=r"no script written: this setup does not fit: [0-9.]+ GiB per GPU on NVIDIA T4"):
        _invoke("write_training_script", ctx, model=POLYGLOT, hardware="T4", seq_len=2048, setup=big)
    assert not (tmp_path / "t" / "train.py").exists()
    msg = _invoke("write_training_script", ctx, model=POLYGLOT, hardware="T4", seq_len=2048, setup=big, force=True)
    data = json.loads(msg.content)
    assert data["fits"] is False and data["summary"].startswith("DOES NOT FIT (written because the user insisted)")
    assert data["memory"]["per_gpu_total_gib"] > data["memory"]["gpu_memory_gib"]
    ok = json.loads(_invoke("write_training_script", ctx, model=POLYGLOT, hardware="T4", seq_len=512).content)
    assert ok["fits"] is True and ok["summary"].startswith("FITS") and str(ok["memory"]["per_gpu_total_gib"]) in ok["summary"]


def test_setup_id_selects_that_setup(tmp_path):
    a = TrainingSetup(model_id=POLYGLOT, r=8, max_length=256, gpu="NVIDIA T4", bf16=False, fp16=True, dtype="fp16")
    b = TrainingSetup(model_id=POLYGLOT, r=64, max_length=512, gpu="NVIDIA T4", bf16=False, fp16=True, dtype="fp16")
    ctx = agent_tools.ToolContext(workdir=tmp_path, messages=_history(a) + _history(b))
    first = json.loads(_invoke("estimate_memory", ctx, setup_id=agent_tools.setup_id_of(a), fast=True).content)
    latest = json.loads(_invoke("estimate_memory", ctx, fast=True).content)
    assert (first["setup"]["r"], latest["setup"]["r"]) == (8, 64)
    # a made-up id (a weak model passes the tool's name) goes on from the latest setup, and says so
    made_up = json.loads(_invoke("estimate_memory", ctx, setup_id="plan_training", fast=True).content)
    assert made_up["setup"]["r"] == 64 and made_up["assumptions"] == ["setup_id 'plan_training' is unknown here: used the latest setup"]


def test_resolve_setup_applies_changes_and_hardware_precision(tmp_path):
    last = TrainingSetup(model_id=LLAMA, method="lora", r=16, max_length=2048, gpu="NVIDIA RTX 4090")
    ctx = agent_tools.ToolContext(workdir=tmp_path, messages=_history(last))
    E = agent_tools.EstimateArgs
    setup, spec, hw, notes = agent_tools.resolve_setup(E(seq_len=8192, setup={"method": "qlora"}), ctx)
    assert spec.model_id == LLAMA and hw is not None and "4090" in hw.gpu.name
    assert (setup.max_length, setup.method, setup.load_in_4bit, setup.r, setup.bf16) == (8192, "qlora", True, 16, True)
    assert notes == []
    # a T4 has no bf16: fp16 is forced and said
    setup, _, hw, notes = agent_tools.resolve_setup(E(hardware="T4"), ctx)
    assert (setup.bf16, setup.fp16, setup.dtype) == (False, True, "fp16") and "no bf16" in notes[0]
    # back on an Ampere GPU, bf16 returns; a 1-GPU change drops the sharding of a multi-GPU setup
    ctx4 = agent_tools.ToolContext(workdir=tmp_path, messages=_history(setup))
    setup2, *_ = agent_tools.resolve_setup(E(hardware="A100 80GB"), ctx4)
    assert (setup2.bf16, setup2.fp16) == (True, False)
    z = TrainingSetup(model_id=LLAMA, num_gpus=2, zero_stage=2, gpu="A100 80GB")
    one, _, hw1, notes = agent_tools.resolve_setup(E(hardware="RTX 4090"), agent_tools.ToolContext(workdir=tmp_path, messages=_history(z)))
    assert (one.num_gpus, one.zero_stage, hw1.num_gpus) == (1, 0, 1) and "sharding" in notes[0]
    # any TrainingSetup field works by name, validated by TrainingSetup itself
    s3, *_ = agent_tools.resolve_setup(E(setup={"learning_rate": 1e-5, "lora_dropout": 0.0, "precision": "fp32"}), ctx)
    assert (s3.learning_rate, s3.lora_dropout, s3.bf16, s3.fp16) == (1e-5, 0.0, False, False)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="offload"):  # raw here; the tool wrapper words it for the model
        agent_tools.resolve_setup(E(setup={"offload": "optimizer"}), ctx)


def test_trial_of_a_real_size_model_without_a_gpu_is_refused(tmp_path, monkeypatch):
    import subprocess

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.setattr(agent_tools, "_local_gpus", lambda: 0)
    ctx = agent_tools.ToolContext(workdir=tmp_path)
    with pytest.raises(TunepilotError, match=r"no trial: this machine has no GPU.*Llama-3.1-8B \(8.0 B parameters\).*CPU trials are for tiny models"):
        _invoke("run_trial", ctx, model=LLAMA, hardware="RTX 4090", seq_len=512)
    assert started == []


def test_session_state_reads_the_latest_artifacts():
    from langchain_core.messages import AIMessage, ToolMessage

    a = TrainingSetup(model_id="m/a")
    b = TrainingSetup(model_id="m/b", method="qlora", load_in_4bit=True)
    msgs = [
        ToolMessage(content="{}", tool_call_id="1", artifact={"setup": a.model_dump(mode="json"), "script": "print(1)", "script_path": "/x/train.py"}),
        AIMessage(content="ok"),
        ToolMessage(content="{}", tool_call_id="2", artifact={"setup": b.model_dump(mode="json"), "summary": "FITS: m/b"}),
        ToolMessage(content="error: x", tool_call_id="3", status="error"),
    ]
    state = agent_tools.session_state(msgs)
    assert state["setup"] == b and state["script"] == "print(1)" and state["script_path"] == "/x/train.py"
    assert state["memory"] is None and state["summary"] == "FITS: m/b"
    assert agent_tools.session_state([]) == {"setup": None, "script": None, "script_path": None, "memory": None,
                                             "files": {}, "launch_command": None, "summary": None}


# --------------------------------------------------------------------------------------
# web search: real ddgs, made offline through a proxy on loopback
# --------------------------------------------------------------------------------------


def test_web_search_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DDGS_PROXY", f"http://127.0.0.1:{closed_port()}")
    t0 = time.perf_counter()
    with pytest.raises(WebSearchError) as e:
        web_search("Qwen3-4B config.json", timeout=3)
    assert str(e.value).startswith("web search unavailable") and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(WebSearchError, match="query is empty"):
        web_search("  ")


def test_web_search_is_bounded_in_time_on_a_black_holed_network(monkeypatch):
    # a proxy that accepts connections and never answers
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("DDGS_PROXY", f"http://127.0.0.1:{srv.getsockname()[1]}")
    try:
        t0 = time.perf_counter()
        with pytest.raises(WebSearchError, match="web search unavailable"):
            web_search("tunepilot", timeout=1)
        assert time.perf_counter() - t0 < 4
    finally:
        stop.set()
        for c in held:
            c.close()
        srv.close()


def test_web_search_tool_turns_offline_into_an_observation(monkeypatch):
    monkeypatch.setenv("DDGS_PROXY", f"http://127.0.0.1:{closed_port()}")
    msg = _invoke("web_search", query="brand new model config", max_results=3)
    assert msg.content.startswith("error: web search is unavailable")
    assert msg.artifact == {"web_search": "unavailable", "failed": True}  # listed as an error step, never ok


@pytest.mark.network
def test_web_search_live_results_are_data():
    rows = web_search("Hugging Face transformers", max_results=3, timeout=10)
    assert rows and all(set(r) == {"title", "url", "snippet", "source"} and r["source"] == "web" for r in rows)


def test_cli_estimate_and_plan_refuse_a_seq_len_beyond_the_context():
    from typer.testing import CliRunner

    from agent.cli import app

    for argv in (["estimate", POLYGLOT, "--seq-len", "1048576", "--fast"],
                 ["plan", POLYGLOT, "--gpu", "T4", "--seq-len", "1048576", "--fast"]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 2, r.output
        assert "--seq-len 1048576 is longer than EleutherAI/polyglot-ko-1.3b's context of 2,048 tokens" in r.output
        assert "Traceback" not in r.output


def test_errors_reach_the_model_without_examples_to_copy(monkeypatch):
    from agent.core import tool_error_observation
    from tools import gpus

    def no_gpu(**kw):
        raise gpus.NoGPUError("no GPU found on this machine; pass --gpu like 'RTX 4090' or '2x A100 80GB'")

    monkeypatch.setattr(gpus, "detect_hardware", no_gpu)
    with pytest.raises(TunepilotError) as e:
        _invoke("plan_training", model=POLYGLOT, hardware="local", exact=False)
    text = tool_error_observation(e.value, None)
    assert text.startswith("error: hardware 'local': this machine has no GPU; ask the user which GPUs")
    assert "4090" not in text and "A100" not in text
    raw = TunepilotError("hardware is empty: give e.g. 'RTX 4090', '2x A100 80GB' or '24GB'")
    assert tool_error_observation(raw, None) == "error: hardware is empty: give e.g. the user's own value"
    # what the user typed stays: a suggestion built from their own text is not an example
    typo = TunepilotError("unknown GPU 'RTX 4909': did you mean 'RTX 4090'?")
    assert tool_error_observation(typo, None) == "error: unknown GPU 'RTX 4909': did you mean 'RTX 4090'?"


def test_a_gpu_named_inside_a_models_string_is_found(tmp_path):
    data = json.loads(_invoke("estimate_memory", model=POLYGLOT, hardware="1/1 NVIDIA RTX 4090", seq_len=512, fast=True).content)
    assert data["memory"]["gpu"] == "NVIDIA RTX 4090"
    data = json.loads(_invoke("estimate_memory", model=POLYGLOT, hardware="2 GPUs: RTX 3090", seq_len=512, fast=True).content)
    assert data["setup"]["num_gpus"] == 2 and data["memory"]["gpu"] == "NVIDIA RTX 3090"
    with pytest.raises(TunepilotError, match="unknown GPU 'my laptop'"):
        _invoke("estimate_memory", model=POLYGLOT, hardware="my laptop", fast=True)


def test_a_plan_with_a_bad_dataset_still_plans_with_a_placeholder(tmp_path):
    ctx = agent_tools.ToolContext(workdir=tmp_path, thread_id="t")
    data = json.loads(_invoke("plan_training", ctx, model=POLYGLOT, hardware="T4", seq_len=512, dataset="support_tickets",
                              exact=False).content)
    assert data["fits"] is True and data["script"].endswith("train.py")
    assert any("dataset 'support_tickets' is neither" in a and "placeholder" in a for a in data["assumptions"])
