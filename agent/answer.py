"""When the engine has answered, the model writes the answer — and only the answer (issue 13, item 7).

A weak model routes well enough, then loops: plan → script → trial → estimate, again, with the answer
already in hand. So once this turn's tool results hold what the person asked for (`answer_ready`:
a plan, or an estimate with its verdict and — when it does not fit — the smallest change that fits;
the script when one was asked for; a trial attempt when one was asked for), the next model call is
made with no tools bound and one line saying to answer from the results. The reply is then checked
(`reply_problems`): no text, a tool call written as text, numbers no tool produced, a verdict that
contradicts the engine's, or the wrong language. A reply with a problem is replaced by the engine's
own answer (`engine_answer`, English or Korean), and the turn says so.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from agent.core import _text
from agent.grounding import ungrounded_numbers, verdict
from agent.request import Request

VERDICT_TOOLS = ("plan_training", "estimate_memory")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def _ok(m) -> bool:
    return (getattr(m, "type", "") == "tool" and m.status != "error" and not _text(m.content).startswith("error:")
            and not (getattr(m, "response_metadata", None) or {}).get("tunepilot_skipped"))


def _payload(m) -> dict:
    text = _text(m.content)
    start = text.find("{")
    if start < 0:
        return {}
    try:
        obj, _end = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def engine_results(turn: list) -> list[tuple[str, dict, dict]]:
    """(tool name, its JSON result, its artifact) of each successful engine call of this turn, in order."""
    out = []
    for m in turn:
        if _ok(m) and (m.name or "") in ("plan_training", "estimate_memory", "write_training_script", "run_trial", "make_peft_config"):
            out.append((m.name, _payload(m), m.artifact if isinstance(m.artifact, dict) else {}))
    return out


def _fits(result: dict) -> Optional[bool]:
    if isinstance(result.get("fits"), bool):
        return result["fits"]
    memory = result.get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("fits"), bool):
        return memory["fits"]
    return None


def _verdicts(results: list) -> list:
    """The results that carry a fit verdict: plans, estimates, and a script written with its estimate."""
    return [(n, r, a) for n, r, a in results
            if n in VERDICT_TOOLS or (n == "write_training_script" and isinstance(r.get("fits"), bool))]


def answer_ready(turn: list, req: Request) -> bool:
    """Do this turn's tool results answer what the person asked (see the module docstring)?"""
    results = engine_results(turn)
    verdicts = [(n, r) for n, r, _a in _verdicts(results)]
    if not verdicts:
        return False
    tried_trial = any((m.name or "") == "run_trial" for m in turn if getattr(m, "type", "") == "tool")
    if req.wants_trial and not tried_trial:
        return False
    name, last = verdicts[-1]
    fits = _fits(last)
    if req.wants_script and fits and not any(a.get("script_path") or r.get("script") or r.get("path") for _n, r, a in results):
        return False
    if name == "estimate_memory" and fits is False and not last.get("smallest_fix") and len(verdicts) < 3:
        return False  # an OOM rescue: the model may still try a change the engine did not
    if len(req.methods) > 1 and name == "estimate_memory" and len(verdicts) < len(req.methods):
        return False  # a comparison: one estimate per option
    return True


# tool rounds a model may still make once the results answer the question (a what-if, the script); a local
# server gets none (build_agent): there every call costs a minute, and all five extra rounds the 1.5B model
# made in bench/agent_eval.py only asked for the script the plan had already written
EXTRA_ROUNDS = 1


def rounds_after_ready(turn: list, req: Request) -> int:
    """How many tool-calling model messages this turn made after its results already answered the question."""
    count = 0
    for i, m in enumerate(turn):
        if getattr(m, "type", "") == "ai" and getattr(m, "tool_calls", None) and answer_ready(turn[:i], req):
            count += 1
    return count


def redundant_call(call: dict, turn: list, req: Request) -> bool:
    """A tool call that cannot change an answer this turn's results already give (answer_ready is true)."""
    name, args = call.get("name") or "", call.get("args") or {}
    results = engine_results(turn)
    if name in ("lookup_model", "web_search"):
        return True
    if name == "run_trial":
        return not req.wants_trial or any((m.name or "") == "run_trial" for m in turn if getattr(m, "type", "") == "tool")
    if name == "make_peft_config":
        return any(n == "make_peft_config" for n, _r, _a in results)
    if name == "write_training_script":
        written = [a for n, r, a in results if a.get("script_path")]
        if not written:
            return False
        dataset = args.get("dataset")
        if dataset:
            from tools.agent_tools import check_dataset

            try:
                dataset = check_dataset(str(dataset))
            except Exception:  # noqa: BLE001 - not a file nor a Hub id: the script would keep its placeholder
                dataset = None
        return not args.get("force") and not (dataset and dataset not in {(a.get("setup") or {}).get("dataset") for a in written})
    return False


def needless_in_batch(call: dict, batch_before: list, turn: list, req: Request) -> bool:
    """A call of one model message, after earlier calls of that message already answered the question, that only a
    model spraying every tool makes (the 1.5B model called all seven tools twice in one message): a look-up or web
    search, a trial nobody asked for, a PEFT config nobody asked for, or the second call of a tool in the message."""
    name = call.get("name") or ""
    if name in ("lookup_model", "web_search"):
        return True
    if name == "run_trial":
        return not req.wants_trial
    if name == "make_peft_config":
        return not re.search(r"(?i)peft|lora ?config|target modules|which (?:modules|layers)", req.text)
    return any(getattr(m, "name", "") == name for m in batch_before)


def answer_system(req: Request) -> str:
    """The system prompt of the answer call: no tools, only the writing job."""
    lang = "Korean (한국어)" if req.language == "ko" else "English" if req.language == "en" else "the person's language"
    return ("You are tunepilot, a fine-tuning engineer. Write the answer to the person's question from the engine results "
            f"below, in {lang}, as plain text (no JSON, no code block, no tool call). Start with the verdict (it fits / it does "
            "not fit), then the setup and the memory per GPU with its headroom. Give hours or tokens/s only where a result "
            "states them. When it fits, end with the command to run; when it does not, end with the smallest change the "
            "results give. Copy every number "
            "exactly as the results write it; add no other number, date or time. Keep it under 150 words.")


# notes about the model's own arguments, not about the person's training: kept out of the answer
_INTERNAL_NOTE = re.compile(r"setup_id|left out setup knobs|from the person's message|ignored unknown knob|price_per_gpu_hour")


def _assumptions(result: dict) -> list[str]:
    return [str(a) for a in result.get("assumptions") or [] if not _INTERNAL_NOTE.search(str(a))][:4]


def answer_prompt(turn: list, req: Request) -> str:
    """The person's question and this turn's engine results, compactly: what the answer call reads."""
    lines = [f"Question: {req.text.strip()}", "", "Engine results:"]
    for name, result, art in engine_results(turn):
        summary = result.get("summary") or art.get("summary")
        if summary:
            lines.append(f"- {name}: {summary}")
        fix = result.get("smallest_fix")
        if isinstance(fix, dict) and not (summary and "Smallest change" in summary):
            lines.append(f"- smallest change that fits: {'; '.join(fix.get('changes') or [])}: {fix.get('per_gpu_total_gib')} GiB per GPU")
        if _assumptions(result):
            lines.append("- assumptions: " + "; ".join(_assumptions(result)))
        if name == "write_training_script" and result.get("launch_command"):
            lines.append(f"- next command: {result['launch_command']} (script {result.get('path')})")
        if name == "run_trial" and result.get("verdict"):
            lines.append(f"- trial: {result['verdict']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# checking the model's answer
# ------------------------------------------------------------------------------------------

_CALL_TEXT = re.compile(r'(?s)"(?:name|tool|function)"\s*:\s*"[a-z_]+"\s*,\s*"(?:arguments|parameters|args)"|<tool_call>|\[tool_call\]')


def reply_problems(reply: str, turn: list, req: Request) -> list[str]:
    """Why this reply must not reach the person as the answer (empty list: it may)."""
    text = (reply or "").strip()
    if len(text) < 8:
        return ["the model wrote no answer"]
    if _CALL_TEXT.search(text):
        return ["the model wrote a tool call instead of an answer"]
    problems = []
    tool_texts = [_text(m.content) for m in turn if getattr(m, "type", "") == "tool"]
    bad = ungrounded_numbers(text, req.text, tool_texts)
    if bad:
        problems.append(f"numbers no tool produced: {', '.join(bad[:5])}")
    results = [r for _n, r, _a in _verdicts(engine_results(turn))]
    fits = _fits(results[-1]) if results else None
    v = verdict(text)
    if fits is not None and v["any"] and ((fits and v["negative"] and not v["positive"]) or (not fits and v["positive"] and not v["negative"])):
        problems.append("its verdict contradicts the engine's")
    if req.language == "ko" and len(_HANGUL.findall(text)) < 10:
        problems.append("not written in Korean")
    return problems


# ------------------------------------------------------------------------------------------
# the engine's own answer
# ------------------------------------------------------------------------------------------


def _hours(h: Any) -> Optional[str]:
    if not isinstance(h, (int, float)):
        return None
    return f"{h:.2f}" if h < 10 else f"{h:.1f}"


def engine_answer(turn: list, req: Request) -> str:
    """The answer written from this turn's tool results alone: verdict, setup, memory, time, fix, next command."""
    results = engine_results(turn)
    verdicts = _verdicts(results)
    if not verdicts:
        return ""
    _name, last, art = verdicts[-1]
    script = next((a.get("script_path") or r.get("script") or r.get("path") for _n, r, a in reversed(results)
                   if a.get("script_path") or r.get("script") or r.get("path")), None)
    launch = next((r.get("launch_command") or a.get("launch_command") for _n, r, a in reversed(results)
                   if r.get("launch_command") or a.get("launch_command")), None)
    if req.language == "ko":
        return _korean(last, script, launch, verdicts)
    lines = [last.get("summary") or art.get("summary") or ""]
    if _assumptions(last):
        lines.append("Assumptions: " + "; ".join(_assumptions(last)) + ".")
    if launch:
        lines.append(f"Next: `{launch}`" + (f" (script: {script})" if script else "") + "; ask me for a trial run first if you like.")
    elif _fits(last) is False and not last.get("smallest_fix"):
        lines.append("Next: ask me for a setup that fits (plan_training), or give more GPUs.")
    return "\n".join(x for x in lines if x)


def _korean(last: dict, script: Optional[str], launch: Optional[str], verdicts) -> str:
    setup = last.get("setup") if isinstance(last.get("setup"), dict) else {}
    memory = last.get("memory") if isinstance(last.get("memory"), dict) else {}
    time = last.get("time") if isinstance(last.get("time"), dict) else {}
    fits = _fits(last)
    model = setup.get("model") or "모델"
    gpu = memory.get("gpu") or setup.get("gpu") or "GPU"
    n = setup.get("num_gpus") or 1
    where = f"{gpu} {n}장" if n > 1 else f"{gpu} 한 장"
    head = {True: f"결론: {model}은(는) {where}에서 학습할 수 있습니다 (메모리에 들어갑니다).",
            False: f"결론: 지금 설정으로는 {model}이(가) {where}의 메모리에 들어가지 않습니다.",
            None: f"결론: {model}의 메모리 추정입니다 (GPU가 주어지지 않아 판정은 없습니다)."}[fits]
    lines = [head]
    method = {"full": "전체 파인튜닝", "lora": "LoRA", "qlora": "QLoRA (4비트)", "dora": "DoRA"}.get(str(setup.get("method")), setup.get("method"))
    if method:
        extra = f", 랭크 r={setup['r']}" if setup.get("r") else ""
        lines.append(f"- 방법: {method}{extra}, 배치 {setup.get('micro_batch', 1)}×{setup.get('grad_accum', 1)}, 시퀀스 길이 {setup.get('seq_len')}")
    total = memory.get("per_gpu_total_gib")
    if total is not None:
        cap = memory.get("gpu_memory_gib")
        room = memory.get("headroom_gib")
        lines.append(f"- GPU당 메모리: {total} GiB (GPU 메모리 {cap} GiB 중, 여유 {room} GiB)")
        parts = memory.get("breakdown_gib") if isinstance(memory.get("breakdown_gib"), dict) else {}
        names = {"weights": "가중치", "activations": "활성값", "optimizer_state": "옵티마이저 상태", "gradients": "그래디언트",
                 "logits_loss": "로짓/손실", "allocator_overhead": "할당자 여유분", "temporaries": "임시 버퍼", "adapters": "어댑터"}
        if parts:
            lines.append("- 내역: " + ", ".join(f"{names.get(k, k)} {v} GiB" for k, v in list(parts.items())[:4]))
    hours = _hours(time.get("hours_per_epoch"))
    if hours:
        lines.append(f"- 예상 시간: 에폭당 약 {hours}시간")
    fix = last.get("smallest_fix") if isinstance(last.get("smallest_fix"), dict) else None
    if fix:
        lines.append(f"- 들어가게 하는 가장 작은 변경: {'; '.join(fix.get('changes') or [])} → GPU당 {fix.get('per_gpu_total_gib')} GiB")
    if launch:
        lines.append(f"- 다음 명령: `{launch}`" + (f" (스크립트: {script})" if script else "") + " — 원하시면 먼저 시험 실행을 해 드립니다.")
    return "\n".join(lines)
