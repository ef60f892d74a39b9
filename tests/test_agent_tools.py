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

EXPECTED = ["lookup_model", "parse_hardware", "estimate_memory", "plan_training", "make_peft_config",
            "write_training_script", "run_trial", "web_search"]


def test_tools_are_one_explicit_list_in_order():
    assert [t.name for t in agent_tools.TOOLS] == EXPECTED


@pytest.mark.parametrize("tool", agent_tools.TOOLS, ids=lambda t: t.name)
def test_every_tool_is_described_for_the_model(tool):
    assert tool.name in EXPECTED
    assert len(tool.description) >= 40 and "\n" not in tool.description, tool.description
    schema = tool.args_schema.model_json_schema()
    props = schema["properties"]
    assert props, f"{tool.name} takes no arguments"
    for name, prop in props.items():
        assert len(prop.get("description", "")) >= 15, f"{tool.name}.{name} has no useful description"
    # what the model receives: the OpenAI tool format carries the same descriptions
    from langchain_core.utils.function_calling import convert_to_openai_tool

    fn = convert_to_openai_tool(tool)["function"]
    assert fn["name"] == tool.name and set(fn["parameters"]["properties"]) == set(props)
    assert tool.response_format == "content_and_artifact"


def test_every_prompt_renders_and_a_missing_variable_raises():
    values = {"today": "2026-11-22", "estimate": "{}", "calls": 12, "query": "x", "reason": ""}
    names = prompts.names()
    assert {"system", "trial_not_allowed", "limit_reached", "web_results", "llm_not_configured"} <= set(names)
    for name in names:
        text = prompts.render(name, **values)
        assert len(text) > 40 and "{{" not in text and "{%" not in text
    system = prompts.render("system", today="2026-11-22")
    for rule in ("Korean", "Never silently change", "untrusted", "tunepilot script setup.yaml -o train.py", "2026-11-22"):
        assert rule in system
    with pytest.raises(jinja2.UndefinedError):
        prompts.render("system")
    with pytest.raises(FileNotFoundError, match="no prompt named"):
        prompts.render("nope")


# --------------------------------------------------------------------------------------
# tools called directly: compact JSON, errors raised for the middleware
# --------------------------------------------------------------------------------------


def _invoke(name: str, **args):
    tool = next(t for t in agent_tools.TOOLS if t.name == name)
    msg = tool.invoke({"type": "tool_call", "name": name, "args": args, "id": "c1"})
    return msg


def test_parse_hardware_is_compact_json_with_bf16_verdict():
    msg = _invoke("parse_hardware", hardware="2x A100 80GB")
    data = json.loads(msg.content)
    assert data["num_gpus"] == 2 and data["bf16"] is True and "A100" in data["gpu"]
    t4 = json.loads(_invoke("parse_hardware", hardware="T4").content)
    assert t4["bf16"] is False and t4["precision"].startswith("fp16")
    assert t4["memory_gib_per_gpu"] == round(t4["memory_gib_per_gpu"], 1)
    assert msg.artifact["hardware"]["num_gpus"] == 2


def test_user_errors_raise_tunepilot_errors_naming_the_field(tmp_path):
    with pytest.raises(TunepilotError, match="GPU"):
        _invoke("parse_hardware", hardware="RTX 9999 Hyper")
    ctx = agent_tools.ToolContext(workdir=tmp_path)
    with agent_tools.tool_context(ctx), pytest.raises(TunepilotError, match="^model: there is no setup"):
        agent_tools.resolve_setup(agent_tools.SetupArgs())


def test_resolve_setup_applies_changes_and_hardware_precision(tmp_path):
    from langchain_core.messages import ToolMessage

    last = TrainingSetup(model_id="meta-llama/Llama-3.1-8B", method="lora", r=16, max_length=2048, gpu="NVIDIA RTX 4090")
    history = [ToolMessage(content="{}", tool_call_id="x", name="plan_training", artifact={"setup": last.model_dump(mode="json")})]
    ctx = agent_tools.ToolContext(workdir=tmp_path, messages=history)
    setup, spec, hw, notes = agent_tools.resolve_setup(agent_tools.SetupArgs(seq_len=8192, method="qlora"), ctx)
    assert spec.model_id == "meta-llama/Llama-3.1-8B" and hw is not None and "4090" in hw.gpu.name
    assert (setup.max_length, setup.method, setup.load_in_4bit, setup.r, setup.bf16) == (8192, "qlora", True, 16, True)
    assert notes == []
    # a T4 has no bf16: fp16 is forced and said
    setup, _, hw, notes = agent_tools.resolve_setup(agent_tools.SetupArgs(gpu="T4"), ctx)
    assert (setup.bf16, setup.fp16, setup.dtype) == (False, True, "fp16") and "no bf16" in notes[0]
    # back on an Ampere GPU, bf16 returns; a 1-GPU change drops the sharding of a multi-GPU setup
    t4 = [ToolMessage(content="{}", tool_call_id="y", artifact={"setup": setup.model_dump(mode="json")})]
    ctx4 = agent_tools.ToolContext(workdir=tmp_path, messages=t4)
    setup2, *_ = agent_tools.resolve_setup(agent_tools.SetupArgs(gpu="A100 80GB"), ctx4)
    assert (setup2.bf16, setup2.fp16) == (True, False)
    z = TrainingSetup(model_id="meta-llama/Llama-3.1-8B", num_gpus=2, zero_stage=2, gpu="A100 80GB")
    ctxz = agent_tools.ToolContext(workdir=tmp_path, messages=[ToolMessage(content="{}", tool_call_id="z", artifact={"setup": z.model_dump(mode="json")})])
    one, _, hw1, notes = agent_tools.resolve_setup(agent_tools.SetupArgs(gpu="RTX 4090"), ctxz)
    assert (one.num_gpus, one.zero_stage, hw1.num_gpus) == (1, 0, 1) and "sharding" in notes[0]
    # an inconsistent change is a pydantic error naming the field
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="offload"):
        agent_tools.resolve_setup(agent_tools.SetupArgs(offload="optimizer"), ctx)


def test_session_state_reads_the_latest_artifacts():
    from langchain_core.messages import AIMessage, ToolMessage

    a = TrainingSetup(model_id="m/a")
    b = TrainingSetup(model_id="m/b", method="qlora", load_in_4bit=True)
    msgs = [
        ToolMessage(content="{}", tool_call_id="1", artifact={"setup": a.model_dump(mode="json"), "script": "print(1)", "script_path": "/x/train.py"}),
        AIMessage(content="ok"),
        ToolMessage(content="{}", tool_call_id="2", artifact={"setup": b.model_dump(mode="json")}),
        ToolMessage(content="error: x", tool_call_id="3", status="error"),
    ]
    state = agent_tools.session_state(msgs)
    assert state["setup"] == b and state["script"] == "print(1)" and state["script_path"] == "/x/train.py"
    assert state["memory"] is None  # the latest setup came without an estimate
    assert agent_tools.session_state([]) == {"setup": None, "script": None, "script_path": None, "memory": None,
                                             "files": {}, "launch_command": None}


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
    assert msg.content.startswith("web search unavailable") and msg.artifact == {"web_search": "unavailable"}


@pytest.mark.network
def test_web_search_live_results_are_data():
    rows = web_search("Hugging Face transformers", max_results=3, timeout=10)
    assert rows and all(set(r) == {"title", "url", "snippet", "source"} and r["source"] == "web" for r in rows)
