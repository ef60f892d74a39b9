"""Once the tools hold the answer, the model writes it — and only it (agent/answer.py, issue 13 item 7).

All through the real `create_agent` loop and the real engine, with a scripted chat model that behaves
like the local 1.5B model did: it keeps calling tools after the plan, invents numbers, answers in
English to a Korean question, or answers without asking the engine at all.
"""

from __future__ import annotations

import json

from langchain_core.messages import AIMessage, SystemMessage

from agent.core import build_agent, run_turn
from tests._agent_helpers import ScriptedChatModel, conversation, final, tool_call

POLYGLOT = "EleutherAI/polyglot-ko-1.3b"
QUESTION = "Can I fine-tune EleutherAI/polyglot-ko-1.3b on a T4? seq 512"


def summary_of(messages, tool: str) -> str:
    """The engine's summary of `tool` as the model sees it: its last tool result, or the answer call's prompt line."""
    for m in reversed(messages):
        if getattr(m, "type", "") == "tool" and m.name == tool:
            return json.loads(m.content)["summary"]
    return messages[-1].content.split(f"- {tool}: ", 1)[1].split("\n")[0]


def _last_ai(agent, thread="t") -> AIMessage:
    return [m for m in conversation(agent, thread) if isinstance(m, AIMessage)][-1]


def test_a_model_that_keeps_calling_tools_after_the_plan_gets_one_round_then_answers(tmp_path):
    plan = tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False)
    peft = tool_call("make_peft_config")

    def answer(messages):
        assert isinstance(messages[0], SystemMessage) and "Write the answer" in messages[0].content
        assert "- make_peft_config:" not in messages[-1].content and "- plan_training: FITS" in messages[-1].content
        return final("It fits: " + summary_of(messages, "plan_training"))

    # the scripted model would go on calling tools for ever; after the one extra round it is asked only to answer
    model = ScriptedChatModel(script=[plan, peft, answer, peft, peft])
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t", QUESTION)
    assert [s["tool"] for s in result.tool_calls] == ["plan_training", "make_peft_config"]
    assert model.calls == 3 and result.stopped is None
    assert result.answer.startswith("It fits: FITS: EleutherAI/polyglot-ko-1.3b on 1x NVIDIA T4")
    assert _last_ai(agent).response_metadata["tunepilot_answer"] == "model"


def test_a_script_call_with_nothing_new_after_the_plan_is_dropped(tmp_path):
    plan = tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False)
    again = tool_call("write_training_script", setup={"quantization": "4-bit"}, dataset="support_tickets")  # what the 1.5B sent
    model = ScriptedChatModel(script=[plan, again, lambda m: final("It fits: " + summary_of(m, "plan_training"))])
    result = run_turn(build_agent(model, workdir=tmp_path), "t", QUESTION)
    assert [s["tool"] for s in result.tool_calls] == ["plan_training"] and model.calls == 3
    assert result.answer.startswith("It fits: FITS")


def test_an_extra_round_that_only_repeats_goes_straight_to_the_answer(tmp_path):
    plan = tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False)
    model = ScriptedChatModel(script=[plan, tool_call("lookup_model", model=POLYGLOT), lambda m: final("It fits, see above.")])
    result = run_turn(build_agent(model, workdir=tmp_path), "t", QUESTION)
    assert [s["tool"] for s in result.tool_calls] == ["plan_training"]  # the lookup was dropped: nothing it could add
    assert result.answer == "It fits, see above." and model.calls == 3


def test_invented_numbers_give_way_to_the_engines_answer(tmp_path):
    plan = tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False)
    model = ScriptedChatModel(script=[plan, final("Yes, it fits in 7.3 GiB and trains in 42 minutes.")])
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t", QUESTION)
    meta = _last_ai(agent).response_metadata
    assert meta["tunepilot_answer"] == "engine" and "7.3" in meta["tunepilot_answer_why"][0]
    # the invented figures (not digits of the script's temporary path)
    assert "7.3 GiB" not in result.answer and "42 minutes" not in result.answer
    plan_out = json.loads([m for m in conversation(agent, "t") if getattr(m, "name", "") == "plan_training"][-1].content)
    assert result.answer.startswith(plan_out["summary"])
    assert "Next: `python train.py`" in result.answer


def test_a_korean_question_answered_in_english_gets_the_engines_korean_answer(tmp_path):
    plan = tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False)
    model = ScriptedChatModel(script=[plan, lambda m: final("It fits on the T4. Run python train.py")])
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t", "EleutherAI/polyglot-ko-1.3b를 T4 한 장에서 파인튜닝할 수 있어? 시퀀스 512")
    assert result.answer.startswith("결론: EleutherAI/polyglot-ko-1.3b은(는) NVIDIA T4 한 장에서 학습할 수 있습니다")
    assert "GPU당 메모리" in result.answer and "`python train.py`" in result.answer
    assert _last_ai(agent).response_metadata["tunepilot_answer_why"] == ["not written in Korean"]


def test_a_model_that_answers_without_the_engine_is_routed_to_plan_training(tmp_path):
    model = ScriptedChatModel(script=[
        final("Sure! You will need about 12 GB and 3 hours."),  # no tool: its own numbers
        lambda m: final("Here is the plan: " + summary_of(m, "plan_training")),
    ])
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t", "Can I fine-tune polyglot-ko-1.3b on one T4 with ~5k examples of 512 tokens each?")
    step = result.tool_calls[0]
    assert step["tool"] == "plan_training" and step["status"] == "ok"
    assert step["args"] == {"model": POLYGLOT, "hardware": "NVIDIA T4", "seq_len": 512, "dataset_examples": 5000}
    assert result.answer.startswith("Here is the plan: FITS") and "12 GB" not in result.answer
    routed = [m for m in conversation(agent, "t") if isinstance(m, AIMessage) and m.tool_calls][0]
    assert routed.response_metadata["tunepilot_routed"] == "plan_training"
    assert "12 GB" in routed.response_metadata["tunepilot_model_text"]  # kept for the record, never shown


def test_a_question_without_a_model_or_gpu_is_not_routed(tmp_path):
    model = ScriptedChatModel(script=[final("LoRA trains small adapter matrices; QLoRA also keeps the base in 4 bit.")])
    result = run_turn(build_agent(model, workdir=tmp_path), "t", "What is the difference between LoRA and QLoRA?")
    assert result.tool_calls == [] and result.answer.startswith("LoRA trains")


def test_the_call_carries_the_persons_figures_and_says_so(tmp_path):
    plan = tool_call("plan_training", model="polyglot-ko-1.3b", hardware="local", seq_len=2048, method="auto", exact=False)
    model = ScriptedChatModel(script=[plan, lambda m: final("Fits: " + summary_of(m, "plan_training")[:40])])
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t", "QLoRA of polyglot-ko-1.3b on a T4 with 1k tokens per example: will it fit?")
    step = result.tool_calls[0]
    assert step["args"]["hardware"] == "NVIDIA T4" and step["args"]["seq_len"] == 1024 and step["args"]["method"] == "qlora"
    assert len(step["corrected"]) == 3
    out = json.loads([m for m in conversation(agent, "t") if getattr(m, "name", "") == "plan_training"][-1].content)
    assert out["setup"]["seq_len"] == 1024 and out["setup"]["method"] == "qlora" and len(out["from_your_message"]) == 3


def test_the_oom_rescue_answer_is_ready_after_one_estimate(tmp_path):
    est = tool_call("estimate_memory", model="Llama-3.1-8B", hardware="A10G", fast=True)
    model = ScriptedChatModel(script=[est, lambda m: final(summary_of(m, "estimate_memory"))])
    result = run_turn(build_agent(model, workdir=tmp_path), "t",
                      "My LoRA run of Llama-3.1-8B dies with CUDA out of memory on an A10G: seq 4096, batch 4, r=64. What should I change?")
    assert [s["tool"] for s in result.tool_calls] == ["estimate_memory"] and model.calls == 2
    assert result.answer.startswith("DOES NOT FIT") and "Smallest change that fits: micro-batch 4 -> " in result.answer


def test_a_local_server_answers_right_after_the_plan(tmp_path):
    from agent.llm import make_chat_model
    from tests._agent_helpers import OpenAIStub, stub_tool_call

    plan = stub_tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False)
    with OpenAIStub([plan, "It fits on the T4: see the engine's summary.", stub_tool_call("make_peft_config")]) as stub:
        agent = build_agent(make_chat_model("openai:stub-model", base_url=stub.base_url), workdir=tmp_path)
        result = run_turn(agent, "t", QUESTION)
        bodies = [r["body"] for r in stub.requests]
    assert [s["tool"] for s in result.tool_calls] == ["plan_training"] and len(bodies) == 2
    assert bodies[0]["tools"] and not bodies[1].get("tools")  # the second call is the answer call: no tools
    assert result.answer == "It fits on the T4: see the engine's summary."


def test_a_script_written_first_carries_the_verdict_and_the_answer_follows(tmp_path):
    script = tool_call("write_training_script", model="mistral-7b", hardware="A100 80GB", seq_len=4096,
                       setup={"method": "lora", "target_modules": ["all-linear"]})  # what the 1.5B model sent (q12)

    def answer(messages):
        assert "Write the answer" in messages[0].content, "the script's verdict answers the question: no more tools"
        return final("It fits: " + summary_of(messages, "write_training_script"))

    model = ScriptedChatModel(script=[script, answer])
    result = run_turn(build_agent(model, workdir=tmp_path, extra_rounds=0), "t",
                      "Write me a training script for Mistral-7B with LoRA on one A100 80GB, seq 4096.")
    assert [s["status"] for s in result.tool_calls] == ["ok"] and model.calls == 2
    assert result.setup.target_modules == "all-linear" and result.script_path.endswith("train.py")
    assert result.answer.startswith("It fits: FITS: mistralai/Mistral-7B-v0.1 on 1x NVIDIA A100")


def test_a_message_that_calls_every_tool_runs_what_answers_and_skips_the_rest(tmp_path):
    # the 1.5B model's real spray (bench q1, after-3): every tool in one message, twice
    names = ["plan_training", "estimate_memory", "write_training_script", "make_peft_config", "lookup_model", "run_trial",
             "plan_training", "estimate_memory"]
    args = {"plan_training": {"model": POLYGLOT, "hardware": "T4", "seq_len": 512, "exact": False},
            "estimate_memory": {"fast": True}, "lookup_model": {"model": POLYGLOT}, "run_trial": {"steps": 1}}
    spray = AIMessage(content="", tool_calls=[{"name": n, "args": args.get(n, {}), "id": f"s{i}", "type": "tool_call"}
                                              for i, n in enumerate(names)])
    model = ScriptedChatModel(script=[spray, lambda m: final("It fits: " + summary_of(m, "plan_training"))])
    result = run_turn(build_agent(model, workdir=tmp_path, extra_rounds=0), "t", QUESTION, allow_trial=False)
    made = sorted((s["tool"], s["status"]) for s in result.tool_calls)
    # the second plan and estimate are the first ones again: answered by the repeat guard, not run
    assert made == sorted([("plan_training", "ok"), ("estimate_memory", "ok"), ("write_training_script", "ok"),
                           ("make_peft_config", "skipped"), ("lookup_model", "skipped"), ("run_trial", "skipped"),
                           ("plan_training", "ok"), ("estimate_memory", "ok")]), made
    assert sum(bool(s.get("repeat")) for s in result.tool_calls) == 2
    assert result.pending is None and result.answer.startswith("It fits: FITS")  # no trial asked, none offered
