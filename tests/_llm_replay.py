"""Replaying recorded real-model HTTP exchanges (tests/recordings/*.json) from a loopback stub server.

A recording (made by `bench/record_llm.py`) holds the real request and response bodies of
every `/v1/chat/completions` call of one conversation. `ReplayServer(recording)` answers the
n-th request with the n-th recorded response, byte for byte when the request asks for the
same mode (plain JSON or SSE stream) as the recording, else converted (JSON <-> SSE chunks),
so replays keep working when the client switches to streaming.

It checks every request it gets (`.problems` lists what did not match):
- the tools the recorded reply calls are offered in the request's `tools` (by name; the schema
  text may change freely);
- after a recorded reply with tool calls, the next request carries the assistant message with
  those calls (same names) and a tool result for each of them: the client parsed the real
  reply and the agent loop answered it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

RECORDINGS = Path(__file__).resolve().parent / "recordings"


def load(name: str) -> dict:
    return json.loads((RECORDINGS / f"{name}.json").read_text())


def recorded_reply(exchange: dict) -> dict:
    """{"content", "tool_calls": [{"id", "name", "arguments"}], "finish_reason", "raw"} of a recorded response."""
    text = exchange["response"]
    if "text/event-stream" not in (exchange.get("content_type") or ""):
        obj = json.loads(text)
        choice = obj["choices"][0]
        msg = choice.get("message") or {}
        return {"content": msg.get("content"), "finish_reason": choice.get("finish_reason"), "raw": obj,
                "tool_calls": [{"id": tc.get("id"), "name": tc["function"]["name"], "arguments": tc["function"].get("arguments") or ""}
                               for tc in msg.get("tool_calls") or []]}
    content, calls, finish, last = [], {}, None, None
    for line in text.splitlines():
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        last = obj
        for ch in obj.get("choices") or []:
            finish = ch.get("finish_reason") or finish
            delta = ch.get("delta") or {}
            content.append(delta.get("content") or "")
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc.get("index", 0), {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.get("id") or slot["id"]
                slot["name"] += (tc.get("function") or {}).get("name") or ""
                slot["arguments"] += (tc.get("function") or {}).get("arguments") or ""
    return {"content": "".join(content) or None, "finish_reason": finish, "tool_calls": [calls[i] for i in sorted(calls)],
            "raw": {"model": (last or {}).get("model"), "id": (last or {}).get("id"), "usage": (last or {}).get("usage")}}


def _as_json(reply: dict) -> bytes:
    if "choices" in reply["raw"]:
        return json.dumps(reply["raw"]).encode()
    message: dict[str, Any] = {"role": "assistant", "content": reply["content"]}
    if reply["tool_calls"]:
        message["tool_calls"] = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for c in reply["tool_calls"]]
    return json.dumps({"id": reply["raw"].get("id") or "chatcmpl-replay", "object": "chat.completion", "created": int(time.time()),
                       "model": reply["raw"].get("model") or "replay", "usage": reply["raw"].get("usage"),
                       "choices": [{"index": 0, "message": message, "finish_reason": reply["finish_reason"]}]}).encode()


def _as_sse(reply: dict) -> bytes:
    base = {"id": reply["raw"].get("id") or "chatcmpl-replay", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": reply["raw"].get("model") or "replay"}

    def chunk(delta: dict, finish: Optional[str] = None) -> bytes:
        return b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    text = reply["content"] or ""
    for i in range(0, len(text), 24):
        out.append(chunk({"content": text[i:i + 24]}))
    for i, c in enumerate(reply["tool_calls"]):
        out.append(chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": ""}}]}))
        for j in range(0, len(c["arguments"]), 24):
            out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": c["arguments"][j:j + 24]}}]}))
    out.append(chunk({}, reply["finish_reason"] or ("tool_calls" if reply["tool_calls"] else "stop")))
    return b"".join(out) + b"data: [DONE]\n\n"


class ReplayServer:
    """Serve one recording's responses in order on 127.0.0.1; see the module docstring."""

    def __init__(self, recording: dict):
        self.exchanges = [e for e in recording["exchanges"] if str(e.get("path", "")).rstrip("/").endswith("chat/completions")]
        self.replies = [recorded_reply(e) for e in self.exchanges]
        self.requests: list[dict] = []
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    def __enter__(self) -> "ReplayServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with server._lock:
                    i = len(server.requests)
                    server.requests.append(body)
                    server._check(i, body)
                if i >= len(server.replies):
                    server.problems.append(f"request {i + 1}: the recording has only {len(server.replies)} replies")
                    self._send(500, "application/json", json.dumps({"error": {"message": "replay exhausted"}}).encode())
                    return
                reply, exchange = server.replies[i], server.exchanges[i]
                recorded_stream = "text/event-stream" in (exchange.get("content_type") or "")
                if bool(body.get("stream")) == recorded_stream:
                    data = exchange["response"].encode()
                    ctype = exchange.get("content_type") or "application/json"
                else:
                    data, ctype = (_as_sse(reply), "text/event-stream") if body.get("stream") else (_as_json(reply), "application/json")
                self._send(exchange.get("status") or 200, ctype, data)

            def _send(self, status: int, ctype: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _check(self, i: int, body: dict) -> None:
        offered = {(t.get("function") or {}).get("name") or t.get("name") for t in body.get("tools") or []}
        if i < len(self.replies):
            wanted = {c["name"] for c in self.replies[i]["tool_calls"]}
            missing = wanted - offered
            if missing:
                self.problems.append(f"request {i + 1}: the recorded reply calls {sorted(missing)}, not among the offered tools {sorted(offered)}")
        if i == 0 or i > len(self.replies):
            return
        prev = self.replies[i - 1]
        messages = body.get("messages") or []
        if not prev["tool_calls"]:
            return
        last = messages[-1] if messages else {}
        if not body.get("tools") and str(last.get("content") or "").startswith("Question: "):
            # the answer call (agent/answer.py): the results come as prompt lines, one per successful call
            results = str(last["content"]).split("\nEngine results:\n", 1)[-1]
            lost = [c["name"] for c in prev["tool_calls"] if f"- {c['name']}: " not in results]
            if lost:
                self.problems.append(f"request {i + 1}: the answer call's prompt has no result of {lost}")
            return
        sent = [m for m in messages if m.get("role") == "assistant" and m.get("tool_calls")]
        names = [(tc.get("function") or {}).get("name") for tc in (sent[-1]["tool_calls"] if sent else [])]
        if names != [c["name"] for c in prev["tool_calls"]]:
            self.problems.append(f"request {i + 1}: expected the assistant's calls {[c['name'] for c in prev['tool_calls']]} "
                                 f"to be sent back, got {names}")
            return
        ids = {tc.get("id") for tc in sent[-1]["tool_calls"]}
        answered = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
        if not ids <= answered:
            self.problems.append(f"request {i + 1}: no tool result for calls {sorted(ids - answered)}")
