"""Record one real conversation with a chat server for the replay tests (tests/recordings/NAME.json).

    python bench/record_llm.py --base-url http://127.0.0.1:8765/v1 --model qwen2.5-coder-1.5b \
        --name structured-t4 --question "EleutherAI/polyglot-ko-1.3b를 T4에서 파인튜닝할 수 있어?" \
        [--server-note "llama-server b..., template ..."] [--timeout 600] [--ask-args "..."]

It runs `python -m agent.cli ask --json QUESTION` (tunepilot's real agent, this checkout) through
the recording proxy of bench/llm_proxy.py, and writes every /v1/chat/completions request and
response body as they went over the wire, with a note of how they were made (model, server,
date, command, tunepilot commit) and what the model did (tool calls, text). Re-run it to
regenerate a recording; tests/test_llm_replay.py replays them through the real ChatOpenAI
client and the real agent loop.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from agent_eval import ROOT, Question, run_question  # noqa: E402
from llm_proxy import RecordingProxy, response_message  # noqa: E402


def _server_info(base_url: str) -> dict:
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(root + "/props", timeout=10) as r:
            props = json.loads(r.read())
        return {"build_info": props.get("build_info"), "model_path": props.get("model_path"),
                "n_ctx": (props.get("default_generation_settings") or {}).get("n_ctx"),
                "chat_template_head": (props.get("chat_template") or "")[:120]}
    except Exception:  # noqa: BLE001 - not llama-server
        return {}


def _in_process(args, proxy) -> tuple[dict, list[dict]]:
    """The real agent (build_agent + run_turn) with a subset of its tools, through the proxy."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    from agent.core import build_agent, run_turn
    from agent.llm import make_chat_model
    from tools.agent_tools import TOOLS

    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    tools = [t for t in TOOLS if t.name in wanted]
    if len(tools) != len(wanted):
        raise SystemExit(f"error: --tools {args.tools!r}: the agent's tools are {', '.join(t.name for t in TOOLS)}")
    try:
        model = make_chat_model(f"openai:{args.model}", base_url=proxy.base_url, api_key="local",
                                timeout=args.llm_timeout, max_retries=0)
    except TypeError:  # a later make_chat_model without these keywords
        model = make_chat_model(f"openai:{args.model}", base_url=proxy.base_url, api_key="local")
    agent = build_agent(model, tools=tools, workdir=tempfile.mkdtemp(prefix="record-llm-"))
    t0 = time.perf_counter()
    turn = run_turn(agent, "record", args.question)
    time.sleep(0.5)
    exchanges = [e for e in proxy.take() if str(e.get("path", "")).rstrip("/").endswith("chat/completions")]
    return {"ended": turn.stopped or "ok", "tools": [s["tool"] for s in turn.tool_calls], "answer": turn.answer,
            "wall_s": round(time.perf_counter() - t0, 1)}, exchanges


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--name", required=True, help="recording name: tests/recordings/NAME.json")
    ap.add_argument("--question", required=True)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--ask-args", default="")
    ap.add_argument("--server-note", default="", help="how the server was started (template, flags)")
    ap.add_argument("--tools", default="", help="run the agent in this process offering only these tools (comma-separated), "
                    "to keep the prompt small on a slow machine; default: `tunepilot ask` with every tool")
    ap.add_argument("--llm-timeout", type=float, default=1800, help="chat-model read timeout for --tools runs, seconds")
    ap.add_argument("--out-dir", default=str(ROOT / "tests" / "recordings"))
    args = ap.parse_args(argv)
    q = Question(args.name, "recording", args.question, "ko" if any("\uac00" <= ch <= "\ud7a3" for ch in args.question) else "en",
                 model="", gpu="")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with RecordingProxy(args.base_url) as proxy:
        if args.tools:
            result, exchanges = _in_process(args, proxy)
        else:
            result, exchanges = run_question(q, proxy=proxy, upstream=args.base_url, model=args.model, timeout=args.timeout,
                                             ask_args=shlex.split(args.ask_args), python=sys.executable)
    summary = []
    for e in exchanges:
        r = response_message(e)
        summary.append({"tool_calls": [c["name"] for c in r.get("tool_calls") or []],
                        "text": (r.get("content") or "")[:200], "aborted": e.get("aborted", False), "seconds": e.get("seconds")})
    record = {
        "meta": {
            "model": args.model, "server": args.server_note or "llama-server", "server_info": _server_info(args.base_url),
            "base_url": args.base_url, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/record_llm.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "tunepilot_commit": commit, "ended": result["ended"], "tools": result["tools"],
            "offered_tools": args.tools or "all (tunepilot ask)",
        },
        "question": args.question,
        "summary": summary,
        "answer": result["answer"],
        "exchanges": [{k: e.get(k) for k in ("path", "status", "content_type", "request", "response", "seconds", "aborted")}
                      for e in exchanges],
    }
    out = Path(args.out_dir) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({"written": str(out), "ended": result["ended"], "tools": result["tools"], "summary": summary},
                     indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
