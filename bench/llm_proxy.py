"""A recording pass-through proxy for an OpenAI-compatible chat server (a benchmark/recording tool, not CI).

    with RecordingProxy("http://127.0.0.1:8765") as proxy:
        ... point the client at proxy.base_url (".../v1") ...
        proxy.exchanges   # [{"path", "request", "status", "content_type", "response", "seconds", "aborted"}]

Every request is forwarded as is; the response is streamed back as it arrives (SSE included)
and kept, byte for byte (decoded as UTF-8), so it can be replayed later by a stub server.
When the client hangs up before the answer (a client timeout), the upstream connection is
closed too, as it would be without the proxy, so llama-server cancels the request instead of
finishing it for nobody; the exchange is kept with "aborted": true.

`prompt_tokens(upstream, body)` asks llama-server how many tokens a chat request's prompt is
(`/apply-template` + `/tokenize`: the server's own template and tokenizer, no generation).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection", "accept-encoding"}


def _root(url: str) -> str:
    """'http://h:p/v1' -> 'http://h:p' (the proxy forwards paths as the client sends them)."""
    u = urllib.parse.urlsplit(url.rstrip("/"))
    return f"{u.scheme}://{u.netloc}"


class RecordingProxy:
    """Loopback proxy in front of `upstream`; see the module docstring."""

    def __init__(self, upstream: str):
        self.upstream = _root(upstream)
        self.exchanges: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    def __enter__(self) -> "RecordingProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def take(self) -> list[dict]:
        """The exchanges recorded so far, and forget them."""
        with self._lock:
            out, self.exchanges = self.exchanges, []
        return out

    def start(self) -> "RecordingProxy":
        proxy = self
        up = urllib.parse.urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                self._forward(self.rfile.read(length))

            def _forward(self, data: bytes | None) -> None:
                t0 = time.perf_counter()
                conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=3600)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                record: dict[str, Any] = {"path": self.path, "method": self.command, "aborted": False}
                try:
                    record["request"] = json.loads(data) if data else None
                except ValueError:
                    record["request"] = (data or b"").decode("utf-8", "replace")
                hung_up = threading.Event()
                done = threading.Event()

                def watch() -> None:  # the client hanging up aborts the upstream request
                    sock = self.connection
                    while not done.is_set():
                        try:
                            r, _, _ = select.select([sock], [], [], 0.5)
                            if r and sock.recv(1, socket.MSG_PEEK) == b"":
                                hung_up.set()
                                if conn.sock is not None:
                                    conn.sock.shutdown(socket.SHUT_RDWR)
                                return
                        except (OSError, ValueError):
                            return

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                chunks: list[bytes] = []
                try:
                    conn.request(self.command, self.path, body=data, headers=headers)
                    resp = conn.getresponse()
                    ctype = resp.getheader("Content-Type", "")
                    record.update(status=resp.status, content_type=ctype)
                    if "text/event-stream" in ctype:
                        self.send_response(resp.status)
                        self.send_header("Content-Type", ctype)
                        self.send_header("Cache-Control", "no-cache")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        while True:
                            line = resp.readline()
                            if not line:
                                break
                            chunks.append(line)
                            self.wfile.write(line)
                            self.wfile.flush()
                        self.close_connection = True
                    else:
                        body = resp.read()
                        chunks.append(body)
                        self.send_response(resp.status)
                        self.send_header("Content-Type", ctype or "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                except (OSError, http.client.HTTPException) as e:
                    record["aborted"] = True
                    record["error"] = f"{type(e).__name__}: {e}"
                    if not hung_up.is_set():
                        try:
                            self.send_error(502, f"proxy: upstream failed: {e}")
                        except OSError:
                            pass
                finally:
                    done.set()
                    conn.close()
                record["aborted"] = record["aborted"] or hung_up.is_set()
                record["response"] = b"".join(chunks).decode("utf-8", "replace")
                record["seconds"] = round(time.perf_counter() - t0, 2)
                with proxy._lock:
                    proxy.exchanges.append(record)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="llm-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _post(url: str, obj: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def prompt_tokens(upstream: str, body: dict) -> Optional[int]:
    """Tokens of a chat request's prompt (messages + tools through the server's template); None if the server cannot say."""
    root = _root(upstream)
    try:
        prompt = _post(root + "/apply-template", {k: body[k] for k in ("messages", "tools", "tool_choice") if k in body})["prompt"]
        return len(_post(root + "/tokenize", {"content": prompt, "add_special": False, "parse_special": True})["tokens"])
    except Exception:  # noqa: BLE001 - not llama-server (vLLM, Ollama): the usage figures still say it
        return None


def response_message(exchange: dict) -> dict:
    """The assistant message of a recorded chat completion (SSE chunks merged), and its usage/timings."""
    text = exchange.get("response") or ""
    if "text/event-stream" not in (exchange.get("content_type") or ""):
        try:
            obj = json.loads(text)
        except ValueError:
            return {"content": None, "tool_calls": [], "usage": None, "error": text[:300]}
        if "choices" not in obj:
            return {"content": None, "tool_calls": [], "usage": None, "error": json.dumps(obj)[:300]}
        msg = obj["choices"][0].get("message") or {}
        return {"content": msg.get("content"), "tool_calls": [
            {"name": tc["function"]["name"], "arguments": tc["function"].get("arguments")} for tc in msg.get("tool_calls") or []],
            "usage": obj.get("usage"), "timings": obj.get("timings"), "finish_reason": obj["choices"][0].get("finish_reason")}
    content, calls, usage, timings, finish = [], {}, None, None, None
    for line in text.splitlines():
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            continue
        try:
            obj = json.loads(line[6:])
        except ValueError:
            continue
        usage = obj.get("usage") or usage
        timings = obj.get("timings") or timings
        for ch in obj.get("choices") or []:
            finish = ch.get("finish_reason") or finish
            delta = ch.get("delta") or {}
            if delta.get("content"):
                content.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                slot = calls.setdefault(tc.get("index", 0), {"name": "", "arguments": ""})
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
    return {"content": "".join(content) or None, "tool_calls": [calls[i] for i in sorted(calls)], "usage": usage,
            "timings": timings, "finish_reason": finish}
