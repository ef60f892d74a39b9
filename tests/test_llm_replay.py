"""Real local-model conversations, replayed: the real ChatOpenAI client and the real agent loop parse real output.

tests/recordings/*.json are real HTTP exchanges with Qwen2.5-Coder-1.5B-Instruct under
llama.cpp's llama-server (how each was made: its "meta" and tests/recordings/README.md;
regenerate with bench/record_llm.py). A loopback stub serves the recorded responses in order
(tests/_llm_replay.py); tunepilot's agent runs its real tools on them. The tests check that
every recorded reply is parsed into the calls the model made (structured `tool_calls`, tool
calls written as text, plain answers), the tool results go back to the model, and the turn
ends with the model's answer. Tool schema text may change freely (the stub matches tools by
name); a broken parser fails here.
"""

from __future__ import annotations

import json

import pytest

from agent.core import build_agent, run_turn
from agent.llm import make_chat_model
from agent.text_tool_calls import find_text_tool_calls
from tests._llm_replay import RECORDINGS, ReplayServer, load
from tools.agent_tools import TOOLS

NAMES = sorted(p.stem for p in RECORDINGS.glob("*.json"))


def _expected(server: ReplayServer, tool_names: set[str]) -> tuple[list[tuple[str, dict]], str]:
    """The calls the recorded replies make (structured, or written as text) and the final answer text."""
    calls, answer = [], ""
    for reply in server.replies:
        if reply["tool_calls"]:
            calls += [(c["name"], json.loads(c["arguments"] or "{}")) for c in reply["tool_calls"]]
        else:
            found = find_text_tool_calls(reply["content"] or "", tool_names)
            calls += [(c["name"], c["args"]) for c in found.calls]
            answer = found.text if found.found else (reply["content"] or "")
    return calls, answer.strip()


def _offered(rec: dict) -> list[str]:
    """The tool names the recorded conversation offered the model (its first request's `tools`)."""
    return [(t.get("function") or {}).get("name") for t in rec["exchanges"][0]["request"].get("tools") or []]


def _replay(name: str, tmp_path, *, stream: bool = False):
    rec = load(name)
    names = _offered(rec)
    tools = [t for t in TOOLS if t.name in names]
    missing = set(names) - {t.name for t in tools}
    assert not missing, f"{name}: tools {sorted(missing)} no longer exist: regenerate it with bench/record_llm.py (see its meta.command)"
    with ReplayServer(rec) as server:
        model = make_chat_model(f"openai:{rec['meta']['model']}", base_url=server.base_url, api_key="local")
        agent = build_agent(model, workdir=tmp_path, tools=tools)
        tokens: list[str] = []
        result = run_turn(agent, f"replay-{name}", rec["question"], on_token=tokens.append if stream else None)
    offered = {(t.get("function") or {}).get("name") for t in server.requests[0].get("tools") or []}
    return rec, server, result, offered, tokens


def _check(rec: dict, server: ReplayServer, result, offered: set[str]) -> str:
    """The agent made exactly the recorded calls (names and arguments), in order; returns the expected answer."""
    assert server.problems == []
    calls, answer = _expected(server, offered)
    made = [(s["tool"], s.get("model_args", s["args"])) for s in result.tool_calls]  # as the model asked (before corrections)
    wanted = [(n, {k: v for k, v in a.items() if v is not None}) for n, a in calls]
    if rec["meta"]["ended"] == "limit":
        # a real loop: the agent may end it earlier than the recording did (its guards), never differently
        assert len(server.requests) <= len(server.replies)
        assert made and made == wanted[:len(made)]
        assert result.stopped or result.answer
        return ""
    assert len(server.requests) == len(server.replies), "the agent did not consume every recorded reply"
    assert made == wanted
    assert result.stopped is None
    if result.answer_source == "engine":  # the model's reply was not usable: the engine's answer replaced it
        assert result.answer and answer not in result.answer
        return ""
    assert answer and answer in result.answer and result.answer_source == "model"
    return answer


@pytest.mark.parametrize("name", NAMES)
def test_recorded_conversation_replays_through_the_real_client_and_agent(name, tmp_path):
    rec, server, result, offered, _ = _replay(name, tmp_path)
    _check(rec, server, result, offered)


def test_the_recordings_cover_structured_text_and_plain_replies():
    kinds = set()
    for name in NAMES:
        rec = load(name)
        assert rec["meta"]["model"] and rec["meta"]["date"] and rec["meta"]["command"], f"{name}: how it was made is missing"
        server = ReplayServer(rec)
        offered = set(_offered(rec))
        for reply in server.replies:
            if reply["tool_calls"]:
                kinds.add("structured")
            elif find_text_tool_calls(reply["content"] or "", offered).calls:
                kinds.add("text call")
            elif (reply["content"] or "").strip():
                kinds.add("plain")
    assert kinds == {"structured", "text call", "plain"}


@pytest.mark.parametrize("name", NAMES)
def test_recorded_conversation_replays_as_a_stream_too(name, tmp_path):
    """The same real replies served as SSE chunks (the client streams when tokens are shown)."""
    rec, server, result, offered, tokens = _replay(name, tmp_path, stream=True)
    assert server.requests and all(r.get("stream") for r in server.requests)
    answer = _check(rec, server, result, offered)
    if answer and server.requests[-1].get("tools"):  # the answer call's tokens are checked before they are shown
        assert answer.split()[0] in "".join(tokens)


def test_a_real_fenced_json_call_runs_the_tool_and_odd_json_gets_a_clear_line(tmp_path):
    """The model's own chat template: it wrote ```json {"name": "lookup_model", ...}``` as text, then a bare
    call to a tool it was not offered. The first runs as a real call; the second is not run and says so."""
    rec, server, result, offered, _ = _replay("text-call-lookup", tmp_path)
    assert not server.replies[0]["tool_calls"] and server.replies[0]["content"].lstrip().startswith("```json")
    assert server.problems == []
    sent = [m for m in server.requests[1]["messages"] if m.get("role") == "assistant"][-1]
    assert [(tc["function"]["name"], json.loads(tc["function"]["arguments"])) for tc in sent["tool_calls"]] == \
        [("lookup_model", {"model": "Qwen/Qwen2.5-14B"})]
    tool_result = [m for m in server.requests[1]["messages"] if m.get("role") == "tool"][-1]
    assert json.loads(tool_result["content"])["num_parameters"] > 14e9
    assert [s["tool"] for s in result.tool_calls] == ["lookup_model"] and result.tool_calls[0]["status"] == "ok"
    assert "'parse_hardware'" in result.answer and "nothing ran" in result.answer
