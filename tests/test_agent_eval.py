"""The agent benchmark's scoring (bench/agent_eval.py): numbers, verdicts, request, language, endings.

The benchmark itself needs a real chat server (minutes per question); these check its
judgement on answers and recorded exchanges, including a real run against a loopback stub.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import agent_eval as ae  # noqa: E402

from tests._agent_helpers import OpenAIStub, stub_tool_call  # noqa: E402

Q1 = ae.QUESTIONS[0]


def texts(claims):
    return [c["text"] for c in claims]


def test_numbers_skip_the_question_model_ids_gpus_list_markers_and_years():
    answer = ("Yes, it fits. With QLoRA (r=16), Llama-3.1-8B needs **14.2 GiB** of the RTX 4090's 23.99 GiB "
              "(41% headroom).\n1. Use bf16 and paged_adamw_8bit with ZeRO-3 off.\n2) One epoch of 20,000 tickets "
              "takes ~3.5 h.\n### Step 3: run train.py (tunepilot 2026)")
    assert texts(ae.claimed_numbers(answer, Q1.text)) == ["16", "14.2", "23.99", "41", "3.5"]
    assert ae.claimed_numbers("Qwen2.5-14B on 2x A100 80GB", "Qwen2.5-14B on 2x A100 80GB") == []
    big = ae.claimed_numbers("about 1.2M tokens/h and 8,192 tokens", "")
    assert [(c["value"], c["scale"]) for c in big] == [(1.2e6, 1e6), (8192.0, 1)]


def test_grounding_at_the_answers_precision_with_units():
    tools = ae.tool_numbers(['{"peak_gib": 14.23, "headroom_frac": 0.407, "hours": 3.46, "gpu_gib": 23.99}'])
    claims = {c["text"]: c for c in ae.claimed_numbers("14.2 GiB, 14 GB, 41% headroom, 3.5 h, 15.3 GB, 24 GiB, 99.9 GiB", "")}
    ok = {t for t, c in claims.items() if ae.grounded(c, tools)}
    assert ok == {"14.2", "14", "41", "3.5", "15.3", "24"}  # 15.3 GB = 14.23 GiB; 99.9 invented


def test_ids_whose_digits_read_as_infinity_are_no_tool_numbers():
    # a tool call id such as "...-2e345..." is a float overflow; it must not break (or ground) any claim
    tools = ae.tool_numbers(['{"id": "call-2e345-ab", "peak_gib": 7.25}'])
    assert tools == [7.25]
    claims = ae.claimed_numbers("It needs 7.3 GiB on 1 GPU.", "")
    assert [c["text"] for c in claims if ae.grounded(c, tools)] == ["7.3"]


def test_verdict_language_and_request_kept():
    assert ae.verdict("It does not fit on one card.")["negative"]
    assert ae.verdict("네, T4에서 가능합니다")["positive"] and not ae.verdict("Here is a config.")["any"]
    assert ae.hangul_ratio("네, T4에서 가능합니다 (polyglot-ko-1.3b)") > 0.3 and ae.hangul_ratio("It fits.") == 0
    q5 = next(q for q in ae.QUESTIONS if q.qid.startswith("q5"))
    good = [{"tool": "plan_training", "args": {"model": "EleutherAI/polyglot-ko-1.3b", "gpu": "T4"}}]
    assert ae.request_kept(q5, good)["kept"]
    wrong = good + [{"tool": "estimate_memory", "args": {"model": "EleutherAI/polyglot-ko-1.3b", "gpu": "RTX 4090"}}]
    assert ae.request_kept(q5, wrong)["problems"] == ["a call names hardware 'rtx-4090'"]
    q6 = ae.QUESTIONS[5]
    kept = ae.request_kept(q6, [{"tool": "plan_training", "args": {"model": "meta-llama/Llama-3.1-70B", "gpu": "RTX 3090",
                                                                   "setup": {"method": "qlora"}}}])
    assert kept["problems"] == ["no tool call asks for 2 GPUs"]
    kept = ae.request_kept(Q1, [{"tool": "plan_training", "args": {"model": "llama-3.1-8b", "gpu": "RTX 4090", "seq_len": 2048}}])
    assert kept["problems"] == ["no tool call uses seq_len 1000-1024 (got [2048])"]


def _exchange(request_messages, reply: dict) -> dict:
    message = {"role": "assistant", "content": reply.get("content")}
    if reply.get("tool_calls"):
        message["tool_calls"] = [{"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                                 for i, (n, a) in enumerate(reply["tool_calls"])]
    return {"path": "/v1/chat/completions", "request": {"messages": request_messages}, "status": 200,
            "content_type": "application/json", "aborted": False,
            "response": json.dumps({"choices": [{"message": message}], "usage": {"prompt_tokens": 812}})}


def test_score_an_answer_with_engine_numbers_and_an_unconfirmed_trial():
    plan = {"fits": True, "peak_gib": 14.23}
    msgs = [{"role": "user", "content": Q1.text},
            {"role": "assistant", "tool_calls": [{"id": "c0", "function": {"name": "run_trial"}}]},
            {"role": "tool", "tool_call_id": "c0", "content": "error: trial failed: cannot download the weights"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "plan_training"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps(plan)}]
    out = {"answer": "Yes, it fits: 14.2 GiB peak.", "tool_calls": [
        {"tool": "run_trial", "args": {}, "status": "error"},
        {"tool": "plan_training", "args": {"model": "meta-llama/Llama-3.1-8B", "gpu": "RTX 4090", "seq_len": 1024}, "status": "ok"}]}
    r = ae.score(Q1, out=out, stdout="", stderr="", rc=0, killed=False, wall=3.0,
                 exchanges=[_exchange(msgs[:1], {"tool_calls": [("run_trial", {})]}), _exchange(msgs, {"content": out["answer"]})],
                 upstream=None)
    assert r["ended"] == "ok" and r["numbers"] == {"claimed": ["14.2"], "ungrounded": []}
    assert r["trials_run_unconfirmed"] == 1 and r["engine_fits"] is True and r["prompt_tokens_first"] == 812
    assert r["answered"]  # the table reports the trial separately
    refused = ae.score(Q1, out={**out, "answer": "Yes, 14.2 GiB."}, stdout="", stderr="", rc=0, killed=False, wall=1.0,
                       exchanges=[_exchange([*msgs[:2], {"role": "tool", "tool_call_id": "c0", "content":
                                                         "trial runs are not permitted for this user"}], {"content": "x"})],
                       upstream=None)
    assert refused["trials_run_unconfirmed"] == 0


def test_the_answer_calls_engine_results_count_as_tool_output():
    prompt = f"Question: {Q1.text}\n\nEngine results:\n- plan_training: FITS ... Memory: 18.7 GiB per GPU; Time: 1.79 h per epoch"
    out = {"answer": "It fits: 18.7 GiB per GPU, 1.79 h per epoch, 77 GiB spare.", "tool_calls": [
        {"tool": "plan_training", "args": {"model": "meta-llama/Llama-3.1-8B", "hardware": "RTX 4090", "seq_len": 1024}, "status": "ok"}]}
    exchanges = [_exchange([{"role": "user", "content": Q1.text}], {"tool_calls": [("plan_training", {})]}),
                 _exchange([{"role": "system", "content": "Write the answer"}, {"role": "user", "content": prompt}],
                           {"content": out["answer"]})]
    r = ae.score(Q1, out=out, stdout="", stderr="", rc=0, killed=False, wall=1.0, exchanges=exchanges, upstream=None)
    assert r["numbers"] == {"claimed": ["18.7", "1.79", "77"], "ungrounded": ["77"]}


def test_score_timeouts_limits_and_loops():
    base = dict(stdout="", stderr="", rc=0, wall=1.0, exchanges=[], upstream=None)
    assert ae.score(Q1, out=None, killed=True, **{**base, "rc": -15})["ended"] == "timeout"
    assert ae.score(Q1, out=None, killed=False, **{**base, "rc": 2, "stderr": "error: the chat model did not answer in time"})["ended"] == "timeout"
    limit = {"answer": "I stopped after 12 model calls without reaching an answer", "tool_calls": []}
    assert ae.score(Q1, out=limit, killed=False, **base)["ended"] == "limit"
    same = {"tool": "estimate_memory", "args": {"model": "x"}, "status": "ok"}
    loop = ae.score(Q1, out={"answer": "done", "tool_calls": [same] * 3}, killed=False, **base)
    assert loop["ended"] == "loop" and loop["max_identical_calls"] == 3 and not loop["answered"]


@pytest.mark.parametrize("qid", ["q5"])
def test_the_benchmark_runs_tunepilot_ask_against_a_stub_server(qid, tmp_path):
    """End to end: bench/agent_eval.py runs `tunepilot ask --json` through its proxy and scores it. The stub model
    looks the model up, then answers without the engine, with a number of its own: tunepilot routes the question
    to plan_training, and the answer call's invented number gives way to the engine's Korean answer."""
    def answer(body):
        last = body["messages"][-1]["content"]
        return "네, T4에서 가능합니다. 추정치: " + str(last)[:40] + " 그리고 99.9 GiB가 필요합니다."

    with OpenAIStub([stub_tool_call("lookup_model", model="EleutherAI/polyglot-ko-1.3b"), answer]) as stub:
        out = tmp_path / "r.json"
        assert ae.main(["--base-url", stub.base_url, "--model", "stub-model", "--questions", qid, "--out", str(out), "--timeout", "120"]) == 0
        bodies = [x["body"] for x in stub.requests]
    r = json.loads(out.read_text())["results"][0]
    assert r["tools"] == ["lookup_model", "plan_training"] and r["ended"] == "ok" and r["model_calls"] == 3
    assert bodies[-1]["max_completion_tokens"] == 768  # a local server: one reply is capped
    assert r["answer"].startswith("결론:")  # the engine's own answer, in the person's language
    assert "99.9" not in r["answer"] and r["numbers"]["ungrounded"] == [] and r["numbers"]["claimed"]
    assert r["request"]["kept"] and r["language_ok"] and r["verdict"]["any"] and r["answered"]
    assert (tmp_path / "r.exchanges" / "q5-ko-t4.json").exists()
