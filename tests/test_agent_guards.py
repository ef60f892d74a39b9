"""Issue 13's guard rails, through the real `create_agent` loop and the real engine:
consent before a trial, the repeat guard, per-tool limits, a limit that still summarises,
parallel tool calls that keep the plan, and a history trimmed to the model's context.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from agent.core import build_agent, resume_turn, run_turn, trim_messages_to
from tests._agent_helpers import ScriptedChatModel, final, tool_call, tool_outputs

POLYGLOT = "EleutherAI/polyglot-ko-1.3b"
QWEN = "Qwen/Qwen2.5-0.5B"  # small enough for a CPU trial


@pytest.fixture
def trial_tripwire(monkeypatch):
    """Records every subprocess a trial would start, and stops it there."""
    from tools.schemas import TunepilotError

    started = []

    class Tripwire(TunepilotError):
        pass

    def popen(*args, **kwargs):
        started.append(args)
        raise Tripwire("tripwire: a trial subprocess was about to start")

    monkeypatch.setattr(subprocess, "Popen", popen)
    return started


def _trial_script():
    return [tool_call("run_trial", model=QWEN, hardware="RTX 4090", seq_len=512, steps=1),
            lambda m: final("after the trial step: " + m[-1].content[:200])]


# --------------------------------------------------------------------------------------
# consent
# --------------------------------------------------------------------------------------


def test_a_trial_without_a_yes_does_not_start(tmp_path, trial_tripwire):
    asked = []
    model = ScriptedChatModel(script=_trial_script())
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t", "trial it", confirm=lambda request: asked.append(request) or False)
    assert trial_tripwire == []  # no subprocess
    assert len(asked) == 1 and asked[0]["tool"] == "run_trial"
    assert asked[0]["description"].startswith(f"Run a 1-step trial of {QWEN}") and "on this machine" in asked[0]["description"]
    # the model is told the person said no, and answers from there
    assert "did not confirm the trial run" in result.answer and result.stopped is None
    assert result.tool_calls[0]["tool"] == "run_trial" and result.tool_calls[0]["status"] == "error"


def test_a_yes_starts_the_trial(tmp_path, trial_tripwire):
    model = ScriptedChatModel(script=_trial_script())
    agent = build_agent(model, workdir=tmp_path)
    run_turn(agent, "t", "trial it", confirm=lambda request: True)
    assert len(trial_tripwire) == 1  # the gate opened: the trial got as far as starting its subprocess


def test_with_nobody_to_ask_the_turn_waits_and_resumes_later(tmp_path, trial_tripwire):
    model = ScriptedChatModel(script=_trial_script() + _trial_script()[:1])
    agent = build_agent(model, workdir=tmp_path)
    waiting = run_turn(agent, "t", "trial it")
    assert waiting.stopped == "confirm" and waiting.pending[0]["tool"] == "run_trial" and trial_tripwire == []
    assert waiting.to_json()["pending_confirmation"] == waiting.pending
    done = resume_turn(agent, "t", False)
    assert done.stopped is None and "did not confirm" in done.answer and trial_tripwire == []
    # a new question while a trial waits refuses it: it never starts behind the person's back
    again = run_turn(agent, "t2", "trial it")
    assert again.stopped == "confirm"
    model.script.append(final("LoRA is a low-rank adapter."))
    other = run_turn(agent, "t2", "never mind: what is LoRA?")
    assert other.answer == "LoRA is a low-rank adapter." and trial_tripwire == []
    refused = [m for m in model.seen[-1] if isinstance(m, ToolMessage) and m.name == "run_trial"]
    assert refused and "did not confirm" in refused[-1].content


# --------------------------------------------------------------------------------------
# loops and limits
# --------------------------------------------------------------------------------------


def test_a_repeated_identical_call_gets_the_earlier_result_back(tmp_path, monkeypatch):
    import tools.estimator as estimator

    runs = []
    real = estimator.estimate

    # counts the engine's top-level estimates (its advice makes nested ones with advice=False)
    def counted(*a, **k):
        if "advice" not in k:
            runs.append(1)
        return real(*a, **k)

    monkeypatch.setattr(estimator, "estimate", counted)
    same = tool_call("estimate_memory", model=POLYGLOT, hardware="T4", seq_len=512, fast=True)
    model = ScriptedChatModel(script=[same, same, lambda m: final(m[-1].content[:120])])
    agent = build_agent(model, workdir=tmp_path, answer_phase=False)
    result = run_turn(agent, "t", "how much memory?")
    assert len(runs) == 1, "the engine ran once; the repeat was answered from the first result"
    assert [s.get("repeat", False) for s in result.tool_calls] == [False, True]
    assert result.answer.startswith("note: estimate_memory was already called with these same arguments")
    first, second = tool_outputs(model.seen[-1], "estimate_memory")[:2]
    assert second.split("\n", 1)[1] == json.dumps(first)
    # a new question may ask the same again: the guard is per turn
    model.script += [same, final("again")]
    run_turn(agent, "t", "and once more, fresh?")
    assert len(runs) == 2


def test_a_model_that_keeps_repeating_a_call_is_stopped_with_the_findings(tmp_path):
    same = tool_call("estimate_memory", model=POLYGLOT, hardware="T4", seq_len=512, fast=True)
    model = ScriptedChatModel(script=[same], repeat_last=True)
    result = run_turn(build_agent(model, workdir=tmp_path, answer_phase=False), "t", "how much memory?")
    assert result.stopped == "loop" and model.calls == 3, "the third identical call ends the turn"
    assert result.answer.startswith("I stopped: the model kept repeating the same tool call. What the tools found:")
    assert result.summary and result.summary in result.answer
    assert [s["status"] for s in result.tool_calls] == ["ok", "ok", "error"]  # the third was not run


def test_a_repeated_failing_call_ends_the_turn_at_once(tmp_path):
    bad = tool_call("estimate_memory", model=POLYGLOT, hardware="1/1 NVIDIA RTX 9999", seq_len=512, fast=True)
    model = ScriptedChatModel(script=[bad], repeat_last=True)
    result = run_turn(build_agent(model, workdir=tmp_path), "t", "how much memory?")
    assert result.stopped == "loop" and model.calls == 2
    assert "which failed with: unknown GPU" in result.answer and "tunepilot plan MODEL --gpu GPU" in result.answer
    assert [s["status"] for s in result.tool_calls] == ["error", "error"]


def test_a_changed_setup_is_not_a_repeat(tmp_path):
    est = tool_call("estimate_memory", fast=True)
    model = ScriptedChatModel(script=[
        tool_call("estimate_memory", model=POLYGLOT, hardware="T4", seq_len=512, fast=True), est,
        tool_call("estimate_memory", fast=True, setup={"r": 64}), est, est, final("ok"),
    ])
    result = run_turn(build_agent(model, workdir=tmp_path, tool_limits={"estimate_memory": 9}, answer_phase=False), "t", "compare")
    # the 2nd call has other arguments; the 4th has the 2nd's, but after a new setup (r=64), so it runs; the 5th repeats it
    assert [s.get("repeat", False) for s in result.tool_calls] == [False, False, False, False, True]
    assert result.stopped is None and result.answer == "ok"


def test_per_tool_limit_per_turn_then_the_answer_still_has_the_findings(tmp_path):
    def vary(messages):
        n = len([m for m in messages if isinstance(m, ToolMessage)])
        return tool_call("estimate_memory", model=POLYGLOT, hardware="T4", seq_len=256 + 64 * n, fast=True)

    model = ScriptedChatModel(script=[vary], repeat_last=True)
    agent = build_agent(model, workdir=tmp_path, max_model_calls=6, tool_limits={"estimate_memory": 3}, answer_phase=False)
    result = run_turn(agent, "t", "keep estimating")
    statuses = [s["status"] for s in result.tool_calls]
    assert statuses[:3] == ["ok"] * 3 and set(statuses[3:]) == {"error"}
    assert "the limit; it did not run" in result.tool_calls[3]["error"]
    # the model-call limit ended the turn, and the answer summarises what the tools found
    assert result.stopped == "limit"
    assert result.answer.startswith("I stopped after 6 model calls") and "What the tools found:" in result.answer
    outputs = tool_outputs(model.seen[-1], "estimate_memory")[:3]
    for out in outputs:
        assert out["summary"] in result.answer and str(out["memory"]["per_gpu_total_gib"]) in result.answer


# --------------------------------------------------------------------------------------
# parallel tool calls keep the plan
# --------------------------------------------------------------------------------------


def test_parallel_plan_and_script_calls_write_the_recommended_plan(tmp_path):
    parallel = AIMessage(content="", tool_calls=[
        {"name": "plan_training", "args": {"model": POLYGLOT, "hardware": "T4", "seq_len": 512, "exact": False},
         "id": "p1", "type": "tool_call"},
        {"name": "write_training_script", "args": {}, "id": "p2", "type": "tool_call"},
        {"name": "estimate_memory", "args": {"fast": True}, "id": "p3", "type": "tool_call"},
    ])
    model = ScriptedChatModel(script=[parallel, final("done")])
    steps: list[dict] = []
    result = run_turn(build_agent(model, workdir=tmp_path), "t", "plan it and write the script", on_step=steps.append)
    assert [s["status"] for s in steps] == ["ok", "ok", "ok"], steps
    plan, script, estimate = (tool_outputs(model.seen[-1], n)[-1] for n in ("plan_training", "write_training_script", "estimate_memory"))
    # the script is the plan that was recommended, not the defaults (micro-batch 1 x accumulation 1)
    assert script["setup_id"] == plan["setup_id"] == estimate["setup_id"]
    assert plan["setup"]["effective_batch"] == 16 and result.setup.effective_batch_size == 16
    assert result.setup.per_device_train_batch_size == plan["setup"]["micro_batch"]
    assert "fp16" in script["summary"] and script["fits"] is True


def test_a_setup_id_from_an_earlier_plan_is_accepted(tmp_path):
    def script_first_plan(messages):
        first = tool_outputs(messages, "plan_training")[0]
        return tool_call("write_training_script", setup_id=first["setup_id"])

    model = ScriptedChatModel(script=[
        tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False),
        tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=256, exact=False),
        script_first_plan, final("ok"),
    ])
    result = run_turn(build_agent(model, workdir=tmp_path, answer_phase=False), "t", "two plans, script the first")
    assert result.setup.max_length == 512


# --------------------------------------------------------------------------------------
# a long thread is trimmed to the model's context
# --------------------------------------------------------------------------------------


def test_long_threads_are_trimmed_to_the_context_before_they_overflow(tmp_path):
    model = ScriptedChatModel(script=[lambda m: final(f"answer {len(m)}")], repeat_last=True)
    agent = build_agent(model, workdir=tmp_path, context_tokens=4096)
    budget = agent.tunepilot_settings["history_budget"]
    assert 512 <= budget < 4096 - agent.tunepilot_settings["prompt_tokens"]
    for i in range(12):
        run_turn(agent, "t", f"question {i}: " + "words " * 250)
    sent = model.seen[-1][1:]  # without the system prompt
    from agent.core import message_tokens

    assert message_tokens(sent) <= budget
    assert isinstance(sent[0], HumanMessage) and sent[0].content.startswith("(Earlier messages of this conversation were removed")
    assert sent[-1].content.startswith("question 11:")
    # the checkpointer still has the whole thread: only what is sent is trimmed
    full = agent.get_state({"configurable": {"thread_id": "t"}}).values["messages"]
    assert len(full) == 24


def test_trimming_keeps_tool_calls_paired_and_the_setup_in_the_note():
    from tools.schemas import TrainingSetup

    setup = TrainingSetup(model_id=POLYGLOT, r=8)
    msgs = [HumanMessage(content="plan " + "x " * 600),
            AIMessage(content="", tool_calls=[{"name": "plan_training", "args": {}, "id": "a", "type": "tool_call"}]),
            ToolMessage(content="{...}" * 200, tool_call_id="a", name="plan_training", artifact={"setup": setup.model_dump(mode="json")}),
            AIMessage(content="planned"), HumanMessage(content="and now?")]
    kept = trim_messages_to(msgs, 300)
    assert kept[0].content.startswith("(Earlier messages") and setup.short() in kept[0].content
    assert kept[-1].content == "and now?" and not any(isinstance(m, ToolMessage) for m in kept)
    assert trim_messages_to(msgs, 100_000) is msgs


def test_figures_no_tool_produced_are_flagged_under_the_answer():
    from agent.chat import engine_block
    from agent.core import TurnResult
    from agent.slack_bot import render_reply

    guess = TurnResult(answer="You will need about 30 GB and 4 hours (batch_size: 16, fp16: true).")
    note = engine_block(guess)
    assert note.startswith("tunepilot engine: no tool ran for this answer, so its figures are the model's own")
    text, blocks = render_reply(guess)
    assert note in text and any(note in json.dumps(b) for b in blocks)
    assert engine_block(TurnResult(answer="LoRA trains small adapters beside frozen weights.")) is None
    backed = TurnResult(answer="It fits in 8.8 GiB.", summary="FITS: m on 1x g. Memory: 8.8 GiB per GPU.",
                        tool_calls=[{"tool": "plan_training", "status": "ok"}])
    assert engine_block(backed) == "tunepilot engine: FITS: m on 1x g. Memory: 8.8 GiB per GPU."
