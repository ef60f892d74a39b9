"""Tool calls written as text (fenced JSON, [tool_call]/<tool_call> tags, bare JSON) become real tool calls.

The message texts marked REAL are verbatim replies of Qwen2.5-Coder-1.5B-Instruct (GGUF Q4)
under llama.cpp's llama-server (see tests/recordings/README.md for how they were made).
"""

from __future__ import annotations

import json

from langchain_core.messages import AIMessage, ToolMessage

from agent.core import build_agent, run_turn
from agent.text_tool_calls import find_text_tool_calls, recover_tool_calls
from tests._agent_helpers import ScriptedChatModel, final

TOOLS = {"lookup_model", "parse_hardware", "estimate_memory", "plan_training", "make_peft_config",
         "write_training_script", "run_trial", "web_search"}


# REAL: Qwen2.5-Coder-1.5B under llama-server with the model's own chat template (tests/recordings/text-call-lookup.json)
REAL_FENCED = '```json\n{\n  "name": "lookup_model",\n  "arguments": {\n    "model": "Qwen/Qwen2.5-14B"\n  }\n}\n```'
REAL_ODD = ('fits / does not fit\n\n{"name": "parse_hardware", "arguments": {"model": "Qwen/Qwen2.5-14B"}}\n```\n{\n  "type": "string",'
            '\n  "value": "local"\n}\n```')


def test_real_fenced_json_reply_becomes_a_call():
    found = find_text_tool_calls(REAL_FENCED, TOOLS)
    assert found.calls == [{"name": "lookup_model", "args": {"model": "Qwen/Qwen2.5-14B"}}]
    assert found.text == "" and found.problems == []
    msg = recover_tool_calls(AIMessage(content=REAL_FENCED, id="run-1"), TOOLS)
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("lookup_model", {"model": "Qwen/Qwen2.5-14B"})]
    assert msg.id == "run-1" and msg.tool_calls[0]["id"].startswith("call_text_") and msg.content == ""


def test_real_odd_reply_with_a_bare_call_to_a_tool_not_offered():
    offered = {"lookup_model"}
    found = find_text_tool_calls(REAL_ODD, offered)
    assert found.calls == [] and len(found.problems) == 1 and "'parse_hardware'" in found.problems[0]
    assert found.text.startswith("fits / does not fit") and '"value": "local"' in found.text  # the rest is kept
    # were parse_hardware a tool, the same text would run it
    assert find_text_tool_calls(REAL_ODD, offered | {"parse_hardware"}).calls == [
        {"name": "parse_hardware", "args": {"model": "Qwen/Qwen2.5-14B"}}]


def test_fenced_json_call_becomes_a_tool_call():
    text = ('```json\n{"name": "plan_training", "arguments": {"model": "meta-llama/Llama-3.1-8B", "gpu": "RTX 4090", '
            '"seq_len": 1024}}\n```')
    found = find_text_tool_calls(text, TOOLS)
    assert found.calls == [{"name": "plan_training", "args": {"model": "meta-llama/Llama-3.1-8B", "gpu": "RTX 4090", "seq_len": 1024}}]
    assert found.problems == [] and found.text == ""


def test_tags_brackets_and_bare_json_and_string_arguments():
    tagged = '<tool_call>\n{"name": "lookup_model", "arguments": {"model": "Qwen/Qwen2.5-14B"}}\n</tool_call>'
    bracket = 'Let me check.\n[tool_call]\n{"name": "parse_hardware", "arguments": "{\\"hardware\\": \\"T4\\"}"}\n[/tool_call]'
    bare = 'I will estimate it: {"name": "estimate_memory", "parameters": {"model": "mistralai/Mistral-7B-v0.1", "method": "qlora"}}'
    unterminated = '<tool_call>\n{"name": "lookup_model", "arguments": {"model": "EleutherAI/polyglot-ko-1.3b"}}'
    assert find_text_tool_calls(tagged, TOOLS).calls == [{"name": "lookup_model", "args": {"model": "Qwen/Qwen2.5-14B"}}]
    b = find_text_tool_calls(bracket, TOOLS)
    assert b.calls == [{"name": "parse_hardware", "args": {"hardware": "T4"}}] and b.text == "Let me check."
    c = find_text_tool_calls(bare, TOOLS)
    assert c.calls[0]["name"] == "estimate_memory" and c.calls[0]["args"]["method"] == "qlora"
    assert c.text == "I will estimate it:"
    assert find_text_tool_calls(unterminated, TOOLS).calls[0]["args"] == {"model": "EleutherAI/polyglot-ko-1.3b"}


def test_two_calls_in_one_block_and_openai_shape():
    text = ('```json\n[{"name": "lookup_model", "arguments": {"model": "meta-llama/Llama-3.1-70B"}},\n'
            ' {"type": "function", "function": {"name": "parse_hardware", "arguments": {"hardware": "2x RTX 3090"}}}]\n```')
    found = find_text_tool_calls(text, TOOLS)
    assert [c["name"] for c in found.calls] == ["lookup_model", "parse_hardware"]
    assert found.calls[1]["args"] == {"hardware": "2x RTX 3090"}


def test_plain_answers_and_json_that_is_not_a_call_are_left_alone():
    config = 'Here is a config:\n```json\n{"learning_rate": 2e-4, "lora_r": 16, "name_of_run": "x"}\n```'
    prose = "Yes: QLoRA fits in 14.2 GiB on the RTX 4090 (name: plan)."
    code = '```python\nfrom peft import LoraConfig\nconfig = LoraConfig(r=16, lora_alpha=32)\n```'
    for text in (config, prose, code, ""):
        found = find_text_tool_calls(text, TOOLS)
        assert not found.found, text
    msg = AIMessage(content=prose)
    assert recover_tool_calls(msg, TOOLS) is msg


def test_unknown_tool_and_unreadable_call_give_a_clear_line():
    unknown = '```json\n{"name": "train_model", "arguments": {"model": "meta-llama/Llama-3.1-8B"}}\n```'
    broken = '<tool_call>\n{"name": "plan_training", "arguments": {"model": "meta-llama/Llama-3.1-8B", "gpu": }\n</tool_call>'
    out = recover_tool_calls(AIMessage(content=unknown), TOOLS)
    assert not out.tool_calls
    assert "'train_model'" in out.content and "nothing ran" in out.content and "plan_training" in out.content
    out = recover_tool_calls(AIMessage(content=broken), TOOLS)
    assert not out.tool_calls and "plan_training" in out.content and "could not be read" in out.content
    # a call with arguments that are no object
    bad_args = find_text_tool_calls('{"name": "plan_training", "arguments": "model=llama"}', TOOLS)
    assert not bad_args.calls and "not valid JSON" in bad_args.problems[0]


def test_namespaced_name_and_structured_calls_untouched():
    found = find_text_tool_calls('{"name": "functions.lookup_model", "arguments": {"model": "x"}}', TOOLS)
    assert found.calls == [{"name": "lookup_model", "args": {"model": "x"}}]
    real = AIMessage(content="", tool_calls=[{"name": "lookup_model", "args": {"model": "x"}, "id": "c1", "type": "tool_call"}])
    assert recover_tool_calls(real, TOOLS) is real


def test_the_agent_loop_runs_a_fenced_json_call(tmp_path):
    """A scripted model answers with a fenced JSON call: the real agent runs the tool and the model sees its result."""
    def answer(messages):
        tool = [m for m in messages if isinstance(m, ToolMessage)]
        assert tool and tool[-1].name == "lookup_model", "the text call did not run as a tool"
        data = json.loads(tool[-1].content)
        return final(f"Qwen2.5-14B has {data.get('num_parameters_b', data.get('params_b', '?'))} B parameters.")

    model = ScriptedChatModel(script=[
        AIMessage(content='```json\n{"name": "lookup_model", "arguments": {"model": "Qwen/Qwen2.5-14B"}}\n```'),
        answer,
    ])
    agent = build_agent(model, workdir=tmp_path)
    result = run_turn(agent, "t1", "How many parameters has Qwen2.5-14B?")
    assert [s["tool"] for s in result.tool_calls] == ["lookup_model"]
    assert result.tool_calls[0]["status"] == "ok"
    assert result.answer.startswith("Qwen2.5-14B has")


def test_the_agent_loop_says_so_when_a_text_call_names_no_tool(tmp_path):
    model = ScriptedChatModel(script=[AIMessage(content='```json\n{"name": "train_now", "arguments": {}}\n```')])
    result = run_turn(build_agent(model, workdir=tmp_path), "t2", "Train it")
    assert result.tool_calls == []
    assert "train_now" in result.answer and "nothing ran" in result.answer
