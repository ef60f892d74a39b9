"""Agent benchmark: twelve ordinary questions through `tunepilot ask --json` against any OpenAI-compatible server.

    python bench/agent_eval.py --base-url http://127.0.0.1:8765/v1 --model qwen2.5-coder-1.5b \
        --timeout 420 --out results.json [--questions q1,q5] [--record-dir DIR] [--ask-args "--llm-timeout 600"]

Each question runs as `python -m agent.cli ask --json QUESTION` (the command a person runs,
with tunepilot's own model settings and no --allow-trial), in a fresh $TUNEPILOT_HOME, through a
loopback recording proxy (bench/llm_proxy.py) that keeps every request and response, so the
score is computed from what really went over the wire:

- tools: the tools called, in order (from the --json tool_calls, else from the model's replies);
- grounded: every number in the answer appears in a tool output (numbers of the question
  itself, model ids such as 8B or 3.1, GPU names, list markers and years are not claims);
  a number matches a tool number rounded to the answer's precision (GB/GiB, %, k/M accepted);
- verdict: the answer says whether it fits (English or Korean), not against the engine's
  last `fits`;
- kept: the model, GPU (and count), method and sequence length the user asked for appear in
  the tool arguments, and no call names another model or GPU;
- language: Hangul share of the answer's letters (Korean questions need >= 0.3, English ~0);
- ended: "ok", "timeout" (the per-question --timeout, or the chat model's own), "limit" (the
  model-call limit), "loop" (the same call with the same arguments 3+ times), "asks-yes" (the
  turn paused for the person's yes to a trial), "error";
- unconfirmed trial: a `run_trial` that ran although nobody said yes (the benchmark never does);
- wall seconds, model calls, prompt tokens (first request, by the server's own tokenizer via
  llama-server's /apply-template + /tokenize, else usage.prompt_tokens), max prompt tokens.

"answered" = ended ok, a tool was called, a verdict, at least one engine number and no
ungrounded one, the request kept, the right language. Prints a markdown table and writes JSON.
It is a benchmark, not CI: minutes per question on a small local model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from llm_proxy import RecordingProxy, prompt_tokens, response_message  # noqa: E402


@dataclass
class Question:
    qid: str
    journey: str
    text: str
    lang: str  # "en" | "ko"
    model: str  # substring every tool's model argument must contain (lower case)
    gpu: str  # substring of the hardware argument (lower case)
    num_gpus: int = 1
    method: list[str] = field(default_factory=list)  # methods the user asked about (any of them in the args)
    seq_len: Optional[tuple[int, int]] = None  # accepted range


QUESTIONS = [
    Question("q1-4090-fits", "1 first fine-tune on a gaming GPU",
             "I have one RTX 4090. Can I fine-tune Llama-3.1-8B on ~20k support tickets (about 1k tokens each)? How long will it take?",
             "en", "llama-3.1-8b", "4090", seq_len=(1000, 1024)),
    Question("q2-14b-full-2xa100", "2 will it fit",
             "Full fine-tuning of Qwen2.5-14B on 2x A100 80GB: will it fit? ZeRO-2, ZeRO-3 or FSDP?",
             "en", "qwen2.5-14b", "a100", num_gpus=2, method=["full"]),
    Question("q3-oom-a10g", "3 OOM rescue",
             "My LoRA run of Llama-3.1-8B dies with CUDA out of memory at step 200 on an A10G: seq 4096, batch 4, r=64. What should I change?",
             "en", "llama-3.1-8b", "a10g", method=["lora"], seq_len=(4096, 4096)),
    Question("q4-lora-vs-qlora", "4 choosing between methods",
             "LoRA or QLoRA for Mistral-7B on an RTX 4090 (24 GB), and which r?",
             "en", "mistral-7b", "4090", method=["lora", "qlora"]),
    Question("q5-ko-t4", "6 Korean small model",
             "EleutherAI/polyglot-ko-1.3b를 T4 한 장에서 파인튜닝할 수 있어? 메모리는 얼마나 필요해?",
             "ko", "polyglot-ko-1.3b", "t4"),
    Question("q6-70b-2x3090-script", "9 two cheap cards, multi-GPU script",
             "Llama-3.1-70B QLoRA on 2x RTX 3090 with FSDP: will it fit, and do I need CPU offload? Write the training script.",
             "en", "llama-3.1-70b", "3090", num_gpus=2, method=["qlora"]),
    # six more, written after the first six had been worked on, to look for failure modes the first six do not show
    Question("q7-dpo-2x4090", "preference tuning on two consumer cards",
             "Can I do DPO on Qwen2.5-7B with 2x RTX 4090? How much memory per GPU?",
             "en", "qwen2.5-7b", "4090", num_gpus=2),
    Question("q8-full-3060", "2 will it fit, small card",
             "Will full fine-tuning of Llama-3.2-1B fit on a 12 GB RTX 3060 with 2048-token sequences?",
             "en", "llama-3.2-1b", "3060", method=["full"], seq_len=(2048, 2048)),
    Question("q9-70b-8xh100-time", "time and cost on a big node",
             "How long does LoRA on Llama-3.1-70B take on 8x H100 SXM for 100k examples of 2048 tokens, at $2.50 per GPU-hour?",
             "en", "llama-3.1-70b", "h100", num_gpus=8, method=["lora"], seq_len=(2048, 2048)),
    Question("q10-ko-qlora-2x4090", "6 Korean, two cards",
             "Qwen2.5-7B를 RTX 4090 두 장으로 QLoRA 학습하면 GPU당 메모리가 얼마나 들어?",
             "ko", "qwen2.5-7b", "4090", num_gpus=2, method=["qlora"]),
    Question("q11-oom-gemma-l4", "3 OOM rescue, full fine-tuning",
             "I get CUDA OOM fine-tuning gemma-2-9b on an L4: full fine-tuning, batch 8, seq 2048. What do I change?",
             "en", "gemma-2-9b", "l4", method=["full"], seq_len=(2048, 2048)),
    Question("q12-script-mistral-a100", "8 just give me the script",
             "Write me a training script for Mistral-7B with LoRA on one A100 80GB, seq 4096.",
             "en", "mistral-7b", "a100", method=["lora"], seq_len=(4096, 4096)),
]


# ------------------------------------------------------------------------------------------
# numbers
# ------------------------------------------------------------------------------------------

from agent.grounding import claimed_numbers, grounded, question_numbers, tool_numbers  # noqa: E402,F401


# ------------------------------------------------------------------------------------------
# verdict, language, request
# ------------------------------------------------------------------------------------------

from agent.grounding import hangul_ratio, verdict  # noqa: E402,F401


def _flat(obj: Any, key: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _flat(v, str(k).lower())
        return out
    if isinstance(obj, list):
        return [kv for v in obj for kv in _flat(v, key)]
    return [(key, obj)]


def _norm(s: Any) -> str:
    return re.sub(r"[\s_]+", "-", str(s).lower())


def request_kept(q: Question, calls: list[dict]) -> dict:
    """Did the tool arguments keep what the person asked for? {"kept": bool, "problems": [...]}."""
    problems: list[str] = []
    pairs = [kv for c in calls for kv in _flat(c.get("args") or {})]
    models = [_norm(v) for k, v in pairs if "model" in k and isinstance(v, str)]
    hws = [_norm(v) for k, v in pairs if k in ("gpu", "hardware", "gpus") and isinstance(v, str)]
    if not any(q.model in m for m in models):
        problems.append(f"no tool call names {q.model}")
    problems += [f"a call names model {m!r}" for m in sorted(set(models)) if q.model not in m]
    if not any(q.gpu in h for h in hws):
        problems.append(f"no tool call names the {q.gpu.upper()}")
    problems += [f"a call names hardware {h!r}" for h in sorted(set(hws)) if q.gpu not in h and h not in ("local",)]
    if q.num_gpus > 1:
        counts = [v for k, v in pairs if k == "num_gpus" and isinstance(v, int)]
        counted = any(re.search(rf"(^|\D){q.num_gpus}\s*-?[x×*]", h) or re.search(rf"[x×*]\s*{q.num_gpus}(\D|$)", h) for h in hws)
        if not (counted or q.num_gpus in counts):
            problems.append(f"no tool call asks for {q.num_gpus} GPUs")
    if q.method:
        methods = {_norm(v) for k, v in pairs if "method" in k and isinstance(v, str)}
        if not methods & set(q.method):
            problems.append(f"no tool call uses method {'/'.join(q.method)} (got {sorted(methods) or 'none'})")
    if q.seq_len:
        lo, hi = q.seq_len
        seqs = [v for k, v in pairs if ("seq" in k or "max_length" in k) and isinstance(v, int)]
        if not any(lo <= s <= hi for s in seqs):
            problems.append(f"no tool call uses seq_len {lo if lo == hi else f'{lo}-{hi}'} (got {sorted(set(seqs)) or 'none'})")
    return {"kept": not problems, "problems": problems}


# ------------------------------------------------------------------------------------------
# one question
# ------------------------------------------------------------------------------------------

_CONSENT = re.compile(r"(?i)not permitted|not allowed|needs? (?:the user's |your )?(?:yes|consent|permission|confirmation)|--allow-trial|declined|consent|confirm")
_TIMEOUT = re.compile(r"(?i)did not answer in time|timed out|read timeout")  # the final error, not a progress hint


def _request_messages(ex: dict) -> list[dict]:
    body = ex.get("request")
    return body.get("messages", []) if isinstance(body, dict) else []


def run_question(q: Question, *, proxy: RecordingProxy, upstream: str, model: str, timeout: float,
                 ask_args: list[str], python: str, repo: Path = ROOT) -> tuple[dict, list[dict]]:
    home = tempfile.mkdtemp(prefix=f"agent-eval-{q.qid}-")
    env = {**os.environ, "TUNEPILOT_HOME": home, "OPENAI_BASE_URL": proxy.base_url, "OPENAI_API_KEY": "local",
           "TUNEPILOT_LLM": f"openai:{model}", "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TUNEPILOT_DEBUG", None)
    cmd = [python, "-m", "agent.cli", "ask", "--json", *ask_args, q.text]
    proxy.take()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    killed = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    time.sleep(1.0)  # let the proxy file the exchange the kill aborted
    exchanges = [e for e in proxy.take() if str(e.get("path", "")).rstrip("/").endswith("chat/completions")]
    try:
        out = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        out = None
    result = score(q, out=out, stdout=stdout, stderr=stderr, rc=proc.returncode, killed=killed, wall=wall,
                   exchanges=exchanges, upstream=upstream) | {"command": cmd[1:], "home": home, "ask_json": out,
                                                             "killed": killed, "stderr": (stderr or "")[-4000:]}
    return result, exchanges


def score(q: Question, *, out: Optional[dict], stdout: str, stderr: str, rc: Optional[int], killed: bool, wall: float,
          exchanges: list[dict], upstream: Optional[str]) -> dict:
    """Score one question from the ask --json output and the recorded exchanges."""
    replies = [response_message(e) for e in exchanges]
    # tool calls: the CLI's own list when it finished, else the model's replies
    if out and isinstance(out.get("tool_calls"), list):
        calls = [{"tool": c.get("tool"), "args": c.get("args") or {}, "status": c.get("status"), "error": c.get("error")}
                 for c in out["tool_calls"]]
    else:
        calls = []
        for r in replies:
            for tc in r.get("tool_calls") or []:
                try:
                    args = json.loads(tc.get("arguments") or "{}")
                except ValueError:
                    args = {"_raw": tc.get("arguments")}
                calls.append({"tool": tc.get("name"), "args": args, "status": None, "error": None})
    # every tool output the model was shown, plus the CLI's engine fields
    outputs: dict[str, str] = {}
    names: dict[str, str] = {}
    for e in exchanges:
        for m in _request_messages(e):
            if m.get("role") == "assistant":
                for tc in m.get("tool_calls") or []:
                    names[tc.get("id", "")] = (tc.get("function") or {}).get("name", "")
            if m.get("role") == "tool":
                c = m.get("content")
                outputs[m.get("tool_call_id") or str(len(outputs))] = c if isinstance(c, str) else json.dumps(c)
    tool_texts = list(outputs.values())
    # the answer call (agent/answer.py) is shown the engine's results as one prompt, not as tool messages
    for e in exchanges:
        for m in _request_messages(e):
            c = m.get("content")
            if m.get("role") == "user" and isinstance(c, str) and c.startswith("Question: ") and "\nEngine results:\n" in c:
                tool_texts.append(c.split("\nEngine results:\n", 1)[1])
    if out:
        for k in ("memory", "setup", "summary", "plan", "estimate"):
            if out.get(k) is not None:
                tool_texts.append(json.dumps(out[k]))
    answer = (out or {}).get("answer") or ""
    # what the person sees: the model's words, plus the engine's summary block when the CLI adds one
    summary = (out or {}).get("summary") if isinstance((out or {}).get("summary"), str) else ""
    visible = answer if not summary or summary.strip() in answer else f"{answer}\n\n{summary}"
    tnums = tool_numbers(tool_texts)
    claims = claimed_numbers(visible, q.text)
    ungrounded = [c["text"] for c in claims if not grounded(c, tnums)]
    # how it ended
    max_repeat = 0
    seen: dict[str, int] = {}
    for c in calls:
        key = json.dumps([c["tool"], c["args"]], sort_keys=True, default=str)
        seen[key] = seen.get(key, 0) + 1
        max_repeat = max(max_repeat, seen[key])
    stopped = (out or {}).get("stopped")
    limit_text = re.compile(r"(?i)stopped after \d+ model calls")
    hung_up = any(e.get("aborted") and not e.get("error") for e in exchanges)  # the client gave up waiting
    if killed or _TIMEOUT.search(stderr or "") or (hung_up and not out):
        ended = "timeout"
    elif stopped == "limit" or limit_text.search(answer):
        ended = "limit"
    elif stopped == "loop":  # the agent's repeat guard ended the turn with what the tools found
        ended = "loop"
    elif stopped == "confirm":  # paused for the person's yes to a trial: consent works, the answer is not final
        ended = "asks-yes"
    elif max_repeat >= 3:
        ended = "loop"
    elif rc not in (0, None) or out is None:
        ended = "error"
    else:
        ended = "ok"
    if ended in ("limit", "timeout") and max_repeat >= 3:
        ended += "+loop"
    # trials nobody confirmed
    trials = []
    for tid, text in outputs.items():
        if names.get(tid) == "run_trial":
            trials.append(text)
    trials += [(c.get("error") or "ok") for c in calls if c["tool"] == "run_trial" and not outputs]
    trials_run = [t for t in trials if not _CONSENT.search(t or "")]
    # engine verdict: the last "fits" any tool reported
    fits = re.findall(r'"fits"\s*:\s*(true|false)', "\n".join(tool_texts))
    engine_fits = (fits[-1] == "true") if fits else None
    v = verdict(visible)
    contradicts = engine_fits is not None and v["any"] and (
        (engine_fits and v["negative"] and not v["positive"]) or (not engine_fits and v["positive"] and not v["negative"]))
    ratio = hangul_ratio(answer)
    lang_ok = ratio >= 0.3 if q.lang == "ko" else ratio < 0.05
    kept = request_kept(q, calls)
    first_body = exchanges[0]["request"] if exchanges and isinstance(exchanges[0].get("request"), dict) else None
    usage_prompt = [((r.get("usage") or {}).get("prompt_tokens")) for r in replies]
    first_tokens = (prompt_tokens(upstream, first_body) if (upstream and first_body) else None) or (usage_prompt[0] if usage_prompt else None)
    shown = (bool(calls) and v["any"] and not contradicts and bool(claims) and not ungrounded and kept["kept"] and lang_ok)
    answered = ended == "ok" and shown
    return {
        "answered": answered, "engine_answer_shown": shown, "ended": ended, "rc": rc, "wall_s": round(wall, 1),
        "tools": [c["tool"] for c in calls], "tool_status": [c.get("status") for c in calls],
        "model_calls": len(exchanges), "aborted_calls": sum(1 for e in exchanges if e.get("aborted")),
        "prompt_tokens_first": first_tokens, "prompt_tokens_max": max([p for p in usage_prompt if p] or [0]) or None,
        "usage_prompt_tokens": usage_prompt,
        "numbers": {"claimed": [c["text"] for c in claims], "ungrounded": ungrounded},
        "verdict": v, "engine_fits": engine_fits, "contradicts": contradicts,
        "request": kept, "hangul_ratio": ratio, "language_ok": lang_ok,
        "max_identical_calls": max_repeat, "trials_run_unconfirmed": len(trials_run), "trials": [t[:200] for t in trials],
        "answer": answer, "summary": summary or None, "stderr_tail": (stderr or "")[-600:],
        "text_tool_calls": sum(1 for r in replies if not r.get("tool_calls") and re.search(r'"name"\s*:', r.get("content") or "")),
    }


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    head = ("| question | ended | answered | engine verdict+numbers shown | tools | numbers ok/claimed | verdict | request kept | lang | "
            "unconfirmed trials | model calls | prompt tok (first/max) | wall s |")
    rows = [head, "|" + "---|" * 13]
    for r in results:
        n = r["numbers"]
        ok = len(n["claimed"]) - len(n["ungrounded"])
        runs: list[list] = []
        for t in r["tools"]:
            if runs and runs[-1][0] == t:
                runs[-1][1] += 1
            else:
                runs.append([t, 1])
        tools = ", ".join(t if n == 1 else f"{t} x{n}" for t, n in runs) or "-"
        if len(tools) > 70:
            tools = tools[:67] + "..."
        verdict_cell = ("contradicts" if r["contradicts"] else "yes") if r["verdict"]["any"] else "no"
        kept = "yes" if r["request"]["kept"] else "no: " + "; ".join(r["request"]["problems"])[:80]
        if not r["tools"]:
            kept = "- (no tool called)"
        lang = f"{r['hangul_ratio']:.2f} {'ok' if r['language_ok'] else 'WRONG'}" if r["answer"] else "- (no answer)"
        rows.append(f"| {r['qid']} | {r['ended']} | {'**yes**' if r['answered'] else 'no'} | "
                    f"{'yes' if r.get('engine_answer_shown') else 'no'} | {tools} | {ok}/{len(n['claimed'])} | "
                    f"{verdict_cell} | {kept} | {lang} | "
                    f"{r['trials_run_unconfirmed']} | {r['model_calls']} | {r['prompt_tokens_first'] or '-'}/{r['prompt_tokens_max'] or '-'} | {r['wall_s']} |")
    total = len(results)
    summary = (f"\nanswered with the engine's verdict and numbers: {sum(r['answered'] for r in results)}/{total} "
               f"(shown, however the turn ended: {sum(bool(r.get('engine_answer_shown')) for r in results)}/{total}); "
               f"timeouts: {sum(r['ended'].startswith('timeout') for r in results)}; "
               f"limit/loops: {sum(('limit' in r['ended'] or 'loop' in r['ended']) for r in results)}; "
               f"unconfirmed trials: {sum(r['trials_run_unconfirmed'] for r in results)}; "
               f"errors: {sum(r['ended'] == 'error' for r in results)}; "
               f"wall: {sum(r['wall_s'] for r in results):.0f} s")
    return "\n".join(rows) + summary


def rescore(path: Path, record_dir: Optional[Path], upstream: str) -> int:
    data = json.loads(path.read_text())
    record_dir = record_dir or path.with_suffix(".exchanges")
    by_id = {q.qid: q for q in QUESTIONS}
    for i, r in enumerate(data["results"]):
        q = by_id[r["qid"]]
        ex_file = record_dir / f"{q.qid}.json"
        exchanges = json.loads(ex_file.read_text())["exchanges"] if ex_file.exists() else []
        out = r.get("ask_json")
        if out is None and r.get("answer"):  # runs before ask_json was kept: the answer, calls from the exchanges
            out = {"answer": r["answer"], "summary": r.get("summary"), "tool_calls": None}
        stderr = r.get("stderr", r.get("stderr_tail", ""))
        killed = r.get("killed", r["wall_s"] >= data.get("timeout_s", 1e9) - 1)
        new = score(q, out=out, stdout="", stderr=stderr, rc=r.get("rc"), killed=killed, wall=r["wall_s"],
                    exchanges=exchanges, upstream=upstream)
        keep = {k: r[k] for k in ("qid", "journey", "question", "command", "home") if k in r}
        data["results"][i] = keep | new | {"ask_json": r.get("ask_json"), "killed": killed, "stderr": stderr}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    print(table(data["results"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8765/v1"))
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="model name on the server (the spec is openai:MODEL)")
    ap.add_argument("--timeout", type=float, default=420, help="wall-clock limit per question, seconds")
    ap.add_argument("--questions", default="", help="comma-separated ids or prefixes (q1,q5); default all")
    ap.add_argument("--out", default="agent_eval_results.json")
    ap.add_argument("--ask-args", default="", help="extra `tunepilot ask` arguments, e.g. '--llm-timeout 600'")
    ap.add_argument("--record-dir", default="", help="where each question's HTTP exchanges go, as QID.json (default: OUT without .json + .exchanges/)")
    ap.add_argument("--repo", default=str(ROOT), help="the tunepilot checkout whose `ask` to run (default: this one), e.g. a snapshot of main")
    ap.add_argument("--rescore", default="", help="score a results JSON again from its saved ask output and exchanges "
                    "(--record-dir, default next to it) and rewrite it: for a scorer fix, no model calls")
    ap.add_argument("--table", default="", help="only print the table of a results JSON written before (no server needed)")
    ap.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before/after)")
    args = ap.parse_args(argv)
    if args.rescore:
        return rescore(Path(args.rescore), Path(args.record_dir) if args.record_dir else None, args.base_url)
    if args.table:
        data = json.loads(Path(args.table).read_text())
        print(f"{data.get('label') or args.table} ({data.get('model')}, {data.get('date')}, timeout {data.get('timeout_s')} s)\n")
        print(table(data["results"]))
        return 0
    wanted = [w.strip() for w in args.questions.split(",") if w.strip()]
    qs = [q for q in QUESTIONS if not wanted or any(q.qid == w or q.qid.startswith(w + "-") for w in wanted)]
    if not qs:
        print(f"error: --questions {args.questions!r} matches none of {', '.join(q.qid for q in QUESTIONS)}", file=sys.stderr)
        return 2
    repo = Path(args.repo).resolve()
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    record_dir = Path(args.record_dir) if args.record_dir else Path(args.out).with_suffix(".exchanges")
    with RecordingProxy(args.base_url) as proxy:
        for q in qs:
            print(f"[{time.strftime('%H:%M:%S')}] {q.qid}: {q.text}", file=sys.stderr, flush=True)
            r, exchanges = run_question(q, proxy=proxy, upstream=args.base_url, model=args.model, timeout=args.timeout,
                                        ask_args=args.ask_args.split(), python=sys.executable, repo=repo)
            r = {"qid": q.qid, "journey": q.journey, "question": q.text} | r
            results.append(r)
            record_dir.mkdir(parents=True, exist_ok=True)
            (record_dir / f"{q.qid}.json").write_text(json.dumps(
                {"question": q.text, "model": args.model, "base_url": args.base_url, "commit": commit,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "exchanges": exchanges}, indent=1, ensure_ascii=False))
            print(f"    -> {r['ended']}, answered={r['answered']}, tools={r['tools']}, {r['wall_s']} s", file=sys.stderr, flush=True)
            data = {"label": args.label, "commit": commit, "base_url": args.base_url, "model": args.model,
                    "timeout_s": args.timeout, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
            Path(args.out).write_text(json.dumps(data, indent=2, ensure_ascii=False))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
