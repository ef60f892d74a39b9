"""The real `create_agent` loop, driven by a scripted chat model through the real engine.

The scripted model's final answers are built from the ToolMessages it received, so a test
can check that every number in the answer is one a tool produced.
"""

from __future__ import annotations

import json
import re

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from agent.core import agent_error_message, build_agent, run_turn
from tests._agent_helpers import ScriptedChatModel, conversation, final, result_line, tool_call, tool_outputs

pytest.importorskip("tools.planner")

LLAMA = "meta-llama/Llama-3.1-8B"
POLYGLOT = "EleutherAI/polyglot-ko-1.3b"


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)?", text))


def _run(model, text, *, thread="t1", agent=None, **kw):
    steps: list[dict] = []
    agent = agent or build_agent(model, **kw)
    result = run_turn(agent, thread, text, on_step=steps.append)
    return agent, result, steps


def test_english_4090_plan_then_script_quotes_only_tool_numbers(tmp_path, monkeypatch):
    from tools.gpus import parse_hardware
    from tools.models import lookup_model
    from tools.planner import plan
    from tools.schemas import PlanGoals

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tickets.jsonl").write_text('{"text": "my printer is on fire"}\n')

    def answer(messages):
        # the answer call reads the question and the engine results, with no tools bound
        prompt = messages[-1].content
        assert isinstance(messages[-1], HumanMessage) and prompt.startswith("Question: I have one RTX 4090")
        plan = result_line(prompt, "plan_training")
        launch = result_line(prompt, "next command").split(" (script")[0]
        assert plan.startswith("FITS") and result_line(prompt, "write_training_script").startswith("FITS")
        return final(f"Yes. {plan} Run: {launch}")

    model = ScriptedChatModel(script=[
        tool_call("plan_training", model=LLAMA, hardware="RTX 4090", seq_len=1024, dataset_examples=20000, exact=False),
        tool_call("write_training_script", dataset="tickets.jsonl"),
        answer,
    ])
    question = "I have one RTX 4090. Can I fine-tune Llama-3.1-8B on ~20k support tickets (about 1k tokens each)? How long?"
    agent = build_agent(model, workdir=tmp_path / "work")
    _, result, steps = _run(model, question, agent=agent)
    answer_call = model.seen[-1]  # its own system prompt: the writing job, no tool list
    assert isinstance(answer_call[0], SystemMessage) and "engine results" in answer_call[0].content
    assert "plan_training" not in answer_call[0].content and len(answer_call) == 2

    # the loop really ran: system prompt first, the question, then tool results fed back
    first = model.seen[0]
    assert isinstance(first[0], SystemMessage) and "tunepilot" in first[0].content
    assert isinstance(first[1], HumanMessage) and first[1].content == question
    assert [s["tool"] for s in steps] == ["plan_training", "write_training_script"]
    assert all(s["status"] == "ok" and s["seconds"] >= 0 for s in steps), steps
    assert steps[0]["args"] == {"model": LLAMA, "hardware": "RTX 4090", "seq_len": 1024, "dataset_examples": 20000, "exact": False}

    # the setup the plan tool recorded is the planner's best, for this GPU
    goals = PlanGoals(seq_len=1024, dataset_examples=20000, confirm=False)
    direct = plan(lookup_model(LLAMA), parse_hardware("RTX 4090"), goals)
    assert direct.fits and result.setup is not None
    assert result.setup.method == direct.best.setup.method and result.setup.max_length == 1024
    assert result.setup.dataset == "tickets.jsonl" and "4090" in (result.setup.gpu or "")

    # the numbers in the tool output are the engine's, rounded to 1 decimal GiB
    p = tool_outputs(conversation(agent), "plan_training")[-1]
    assert p["memory"]["per_gpu_total_gib"] == round(direct.best.estimate.device_total_gib, 1)
    assert p["setup"]["seq_len"] == 1024 and p["fits"] is True
    # the one call already wrote a script; the second only added the dataset
    assert p["script"].endswith("train.py")

    # every number in the answer comes from a tool output
    tool_text = " ".join(m.content for m in conversation(agent) if isinstance(m, ToolMessage))
    assert _numbers(result.answer) - {"1"} <= _numbers(tool_text) | _numbers(question)
    assert str(p["memory"]["per_gpu_total_gib"]) in result.answer

    # the script was written into the thread's work dir and compiles; its result carries the verdict
    assert result.script_path and result.script_path.startswith(str(tmp_path / "work"))
    with open(result.script_path, encoding="utf-8") as f:
        assert f.read() == result.script
    compile(result.script, "train.py", "exec")
    s = tool_outputs(conversation(agent), "write_training_script")[-1]
    assert s["path"] == result.script_path and s["launch_command"] in result.answer
    assert s["fits"] is True and s["memory"]["per_gpu_total_gib"] == p["memory"]["per_gpu_total_gib"]
    assert "def " not in json.dumps(s)  # the script text stays out of the model's context
    # the turn's engine summary is the script's (what the CLI prints under the answer)
    assert result.summary == s["summary"] and result.summary.startswith("FITS")


def test_korean_polyglot_on_t4_plans_fp16(tmp_path):
    def answer(messages):
        plan = result_line(messages[-1].content, "plan_training")
        per_gpu = re.search(r"Memory: ([\d.]+) GiB per GPU", plan).group(1)
        precision = "fp16" if ", fp16," in plan else "bf16"
        return final(f"네, T4에서 가능합니다. {plan} GPU당 {per_gpu} GiB를 "
                     f"사용하고, T4는 bf16을 지원하지 않아 {precision}로 학습합니다. "
                     "다음 명령: python train.py")

    model = ScriptedChatModel(script=[tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=1024, exact=False),
                                      tool_call("make_peft_config"), answer])
    agent = build_agent(model, workdir=tmp_path)
    _, result, steps = _run(model, "EleutherAI/polyglot-ko-1.3b를 T4에서 파인튜닝할 수 있어?", agent=agent)
    assert steps[0]["args"]["hardware"] == "T4" and steps[0]["args"]["model"] == POLYGLOT
    # the peft config follows the planned setup (no arguments: the thread's setup), in fp16
    peft = tool_outputs(conversation(agent), "make_peft_config")[-1]
    assert steps[1]["status"] == "ok" and steps[1]["args"] == {}
    assert peft["lora_config"]["r"] == result.setup.r and peft["trainable_parameters"] > 0
    assert "python" not in peft  # the source stays in the artifact
    art = [m for m in conversation(agent) if isinstance(m, ToolMessage) and m.name == "make_peft_config"][-1].artifact
    compile(art["python"], "peft_config.py", "exec")
    setup = result.setup
    assert setup is not None and setup.model_id == POLYGLOT
    assert setup.fp16 is True and setup.bf16 is False  # a T4 has no bf16
    p = tool_outputs(conversation(agent), "plan_training")[-1]
    assert p["setup"]["precision"] == "fp16" and p["memory"]["fits"] is True
    assert "fp16" in result.answer and str(p["memory"]["per_gpu_total_gib"]) in result.answer
    assert "T4에서" in result.answer


def test_follow_up_estimate_starts_from_the_threads_setup(tmp_path):
    pytest.importorskip("tools.estimator")

    def answer(messages):
        e = tool_outputs(messages, "estimate_memory")[-1]
        return final(f"With 2k context: {e['memory']['per_gpu_total_gib']} GiB per GPU.")

    model = ScriptedChatModel(script=[
        tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=1024, exact=False), final("planned"),
        tool_call("estimate_memory", seq_len=2048, fast=True), answer,
    ])
    agent, first, _ = _run(model, "plan polyglot-ko-1.3b on a T4", workdir=tmp_path)
    _, second, steps = _run(model, "and with 2k context?", agent=agent)
    assert steps[0]["args"] == {"seq_len": 2048, "fast": True}
    assert second.setup.max_length == 2048
    # only the sequence length changed
    assert second.setup.model_dump(exclude={"max_length"}) == first.setup.model_dump(exclude={"max_length"})
    # another thread does not see this setup
    other = ScriptedChatModel(script=[tool_call("estimate_memory", seq_len=2048), lambda m: final(tool_outputs(m)[-1])])
    _, r, steps = _run(other, "and with 2k context?", thread="t2", agent=build_agent(other, workdir=tmp_path))
    assert steps[0]["status"] == "error" and r.answer.startswith("error: model: there is no setup")


def test_tool_errors_come_back_as_observations_and_the_model_recovers(tmp_path):
    def recover(messages):
        last = messages[-1]
        assert isinstance(last, ToolMessage) and last.status == "error"
        assert last.content.startswith("error:") and "GPU" in last.content
        return tool_call("estimate_memory", model=LLAMA, hardware="RTX 4090", fast=True)

    model = ScriptedChatModel(script=[
        tool_call("make_peft_config", model=LLAMA, r=0),  # bad argument: TrainingSetup's own validation
        tool_call("plan_everything", model=LLAMA),  # a tool the model made up
        tool_call("estimate_memory", model=LLAMA, setup={"offload": "all", "zero_stage": 0}, fast=True),  # an inconsistent setup
        tool_call("estimate_memory", model=LLAMA, hardware="RTX 9999 Hyper", fast=True),
        recover,
        lambda m: final("fixed: " + m[-5].content[:60]),
    ])
    _, result, steps = _run(model, "plan for my 9999, with offload and ZeRO stage 0", workdir=tmp_path)
    assert [s["status"] for s in steps] == ["error", "error", "error", "error", "ok"]
    assert steps[1]["error"].startswith("error: plan_everything is not a valid tool") and "plan_training" in steps[1]["error"]
    assert steps[0]["error"] == "error: invalid setup: r: Input should be greater than or equal to 1"
    # the reason of a refusal reaches the model in full
    assert steps[2]["error"] == "error: invalid setup: offload: CPU offload needs zero_stage 1-3 or fsdp"
    assert result.answer.startswith("fixed: error: invalid setup: offload:")


def test_a_bug_in_a_tool_stops_the_turn_but_not_the_thread(tmp_path):
    class Args(BaseModel):
        x: int = Field(description="A number that makes this tool crash.")

    def broken(x: int) -> str:
        """A tool with a bug."""
        raise RuntimeError("bug in tool")

    tool = StructuredTool.from_function(broken, name="broken", description="A tool with a bug.", args_schema=Args)
    model = ScriptedChatModel(script=[tool_call("broken", x=1), final("recovered")])
    agent = build_agent(model, tools=[tool], workdir=tmp_path)
    with pytest.raises(RuntimeError, match="bug in tool") as e:
        run_turn(agent, "t", "crash please")
    # at the edge it is one line naming the tool
    assert agent_error_message(e.value).startswith("the agent failed in tool broken: RuntimeError: bug in tool (a bug")
    # the open tool call was answered, so the next turn is valid and works
    assert run_turn(agent, "t", "again").answer == "recovered"
    last = model.seen[-1]
    assert any(isinstance(m, ToolMessage) and m.content == "error: failed" for m in last)


def test_a_runaway_model_ends_with_a_clear_message_and_the_session_goes_on(tmp_path):
    def loop_until_told(messages):
        human = [m for m in messages if isinstance(m, HumanMessage)][-1]
        n = len([m for m in messages if isinstance(m, ToolMessage)])
        return final("done") if human.content == "stop" else tool_call("lookup_model", model=f"{POLYGLOT}-{n}")

    model = ScriptedChatModel(script=[loop_until_told], repeat_last=True)
    agent = build_agent(model, max_model_calls=4, workdir=tmp_path, tool_limits={"lookup_model": 99})
    result = run_turn(agent, "t", "loop forever")
    assert result.stopped == "limit" and result.answer.startswith("I stopped after 4 model calls")
    assert model.calls == 4 and len(result.tool_calls) == 4
    assert run_turn(agent, "t", "stop").answer == "done"
    # the graph's recursion limit is the backstop: same clear ending, and the thread stays usable
    result = run_turn(agent, "t2", "loop forever", recursion_limit=5)
    assert result.stopped == "limit" and result.answer.startswith("I stopped after")
    assert run_turn(agent, "t2", "stop").answer == "done"
    # what the model saw is a valid transcript: every tool call answered (OpenAI rejects it otherwise)
    seen = model.seen[-1]
    called = [tc["id"] for m in seen if isinstance(m, AIMessage) for tc in m.tool_calls]
    answered = [m.tool_call_id for m in seen if isinstance(m, ToolMessage)]
    assert called and sorted(called) == sorted(answered)


def test_trial_is_refused_with_an_estimate_when_not_allowed(tmp_path):
    pytest.importorskip("tools.estimator")
    model = ScriptedChatModel(script=[
        tool_call("run_trial", model=POLYGLOT, hardware="T4", seq_len=512),
        lambda m: final(m[-1].content),
    ])
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t", "trial it", allow_trial=False)
    assert result.answer.startswith("trial runs are not permitted for this user; here is the estimate instead")
    assert "per_gpu_total_gib" in result.answer
    assert result.tool_calls[0]["status"] == "error"  # no trial ran: never listed as ok
    assert result.pending is None and result.stopped is None  # nobody is asked: the answer is no


def test_unknown_model_falls_back_to_web_search_and_says_it_is_offline(tmp_path, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    monkeypatch.setenv("DDGS_PROXY", f"http://127.0.0.1:{s.getsockname()[1]}")  # closed: offline
    s.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def after_lookup(messages):
        assert messages[-1].content.startswith("error:") and "web_search" in messages[-1].content
        return tool_call("web_search", query="newco/brand-new-7b config.json hidden_size")

    def answer(messages):
        return final("I could not find newco/brand-new-7b: " + messages[-1].content.split(":")[0])

    model = ScriptedChatModel(script=[tool_call("lookup_model", model="newco/brand-new-7b"), after_lookup, answer])
    _, result, steps = _run(model, "Fine-tune newco/brand-new-7b on a 4090?", workdir=tmp_path)
    assert [(s["tool"], s["status"]) for s in steps] == [("lookup_model", "error"), ("web_search", "error")]
    assert result.answer == "I could not find newco/brand-new-7b: error"


def test_oom_rescue_estimates_the_users_config_then_the_smallest_change(tmp_path):
    pytest.importorskip("tools.estimator")
    mistral = "mistralai/Mistral-7B-v0.1"

    def answer(messages):
        lines = [x for x in messages[-1].content.splitlines() if x.startswith("- estimate_memory: ")]
        assert len(lines) == 2 and lines[0].startswith("- estimate_memory: DOES NOT FIT")
        return final("Your setup: " + lines[0].split(": ", 1)[1] + " With gradient checkpointing and micro-batch 1 x 4: "
                     + lines[1].split(": ", 1)[1])

    model = ScriptedChatModel(script=[
        tool_call("estimate_memory", model=mistral, hardware="A10G", seq_len=4096, fast=True,
                  setup={"method": "lora", "r": 64, "per_device_train_batch_size": 4, "gradient_checkpointing": False}),
        tool_call("estimate_memory", fast=True, setup={"gradient_checkpointing": True, "per_device_train_batch_size": 1,
                                                       "gradient_accumulation_steps": 4}),
        answer,
    ])
    agent = build_agent(model, workdir=tmp_path)
    _, result, steps = _run(model, "My run dies with CUDA out of memory at step 200, seq 4096, batch 4, LoRA r=64, no gradient checkpointing, on an A10G. Mistral-7B.",
                            agent=agent)
    assert [s["status"] for s in steps] == ["ok", "ok"]
    before, after = tool_outputs(conversation(agent), "estimate_memory")[-2:]
    assert before["memory"]["fits"] is False and before["memory"]["dominant"] in ("activations", "logits_loss")
    assert after["memory"]["per_gpu_total_gib"] < before["memory"]["per_gpu_total_gib"]
    # what the user asked for is kept: model, method, rank, sequence length, effective batch
    s = result.setup
    assert (s.model_id, s.method, s.r, s.max_length, s.effective_batch_size) == (mistral, "lora", 64, 4096, 4)
    assert s.gradient_checkpointing and s.per_device_train_batch_size == 1
    assert before["setup"]["effective_batch"] == after["setup"]["effective_batch"] == 4
    assert str(before["memory"]["per_gpu_total_gib"]) in result.answer and str(after["memory"]["per_gpu_total_gib"]) in result.answer


@pytest.mark.gpu
def test_trial_through_the_agent_on_a_gpu(tmp_path, monkeypatch):
    """plan-free path: script for a tiny local model, then a 2-step trial run on this machine's GPU."""
    from tests._script_helpers import build_tiny_model, run_env, write_text_dataset

    for key, value in run_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    model_dir = build_tiny_model(tmp_path / "model")
    data = write_text_dataset(tmp_path / "data.jsonl")
    model = ScriptedChatModel(script=[
        tool_call("write_training_script", model=str(model_dir), dataset=str(data), seq_len=64, hardware="local"),
        tool_call("run_trial", steps=2, timeout=300),
        lambda m: final(m[-1].content),
    ])
    agent = build_agent(model, workdir=tmp_path / "work")
    steps: list[dict] = []
    result = run_turn(agent, "t", "write it and trial it", on_step=steps.append, confirm=lambda request: True)
    assert [s["status"] for s in steps] == ["ok", "ok"], steps
    report = json.loads(result.answer)
    assert report["ok"] is True and report["device"] != "cpu" and report["summary"].startswith("TRIAL OK")
