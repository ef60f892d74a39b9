"""Test parts for the agent (also used by the Slack bot's tests).

- `ScriptedChatModel`: a real LangChain chat model that answers from a script, so the real
  `create_agent` loop runs: each entry is an `AIMessage` (with `tool_calls` to call tools) or
  a callable `(messages) -> AIMessage` that can read the ToolMessages it received and quote
  them. `bind_tools` returns the model itself. Every call's messages are kept in `.seen`.
- `OpenAIStub`: a threaded HTTP server on 127.0.0.1 speaking `/v1/chat/completions` (plain
  JSON, or SSE when the request has `"stream": true`) with scripted replies; it records
  every request in `.requests` as {"body", "headers" (lower-case names)}. Use it with the real `openai` client:
  `--llm openai:stub-model --base-url stub.base_url`.
- `tool_call(name, **args)` / `final(text)` build script entries for both.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Optional, Union

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

_ids = itertools.count(1)

Step = Union[AIMessage, Callable[[list[BaseMessage]], AIMessage], str]


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released): connections are refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tool_call(name: str, **args: Any) -> AIMessage:
    """A scripted model reply that calls one tool."""
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call_{next(_ids)}", "type": "tool_call"}])


def final(text: str) -> AIMessage:
    """A scripted model reply that answers."""
    return AIMessage(content=text)


def tool_outputs(messages: Iterable[BaseMessage], name: str | None = None) -> list[Any]:
    """The ToolMessages of a conversation (JSON-decoded where possible), optionally of one tool."""
    out = []
    for m in messages:
        if isinstance(m, ToolMessage) and (name is None or m.name == name):
            try:
                out.append(json.loads(m.content))
            except (TypeError, ValueError):
                out.append(m.content)
    return out


class ScriptedChatModel(BaseChatModel):
    """Replies from `script` in order; raises when the script runs out (a test bug, not a model one)."""

    script: list[Any]
    repeat_last: bool = False  # keep replying with the last entry (a runaway model)
    seen: list[list[BaseMessage]] = []

    _index: int = PrivateAttr(default=0)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools, **kwargs):  # the agent binds its tools; the script already knows them
        return self

    def _next(self, messages: list[BaseMessage]) -> AIMessage:
        if self._index >= len(self.script):
            if not (self.repeat_last and self.script):
                raise AssertionError(f"ScriptedChatModel: script exhausted after {len(self.script)} replies")
            step = self.script[-1]
        else:
            step = self.script[self._index]
        self._index += 1
        if callable(step) and not isinstance(step, BaseMessage):
            step = step(messages)
        if isinstance(step, str):
            step = AIMessage(content=step)
        # a fresh message (and fresh tool-call ids) for every reply
        calls = [{**tc, "id": f"call_{next(_ids)}"} for tc in (step.tool_calls or [])]
        return AIMessage(content=step.content, tool_calls=calls)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        self.seen.append(list(messages))
        return ChatResult(generations=[ChatGeneration(message=self._next(list(messages)))])

    @property
    def calls(self) -> int:
        return self._index


# --------------------------------------------------------------------------------------
# OpenAI-compatible stub server
# --------------------------------------------------------------------------------------

Reply = Union[dict, str, Callable[[dict], Union[dict, str]]]


def stub_tool_call(name: str, **args: Any) -> dict:
    """A stub reply that calls one tool."""
    return {"tool_calls": [{"name": name, "arguments": args}]}


class OpenAIStub:
    """A loopback OpenAI-compatible server with scripted replies.

    Each reply is a str (assistant text), a dict {"content": ..., "tool_calls": [{"name", "arguments"}]},
    {"status": 401, "error": "..."} for an HTTP error, or a callable(request_body) -> one of those.
    After the script runs out, the last reply repeats. `delay` slows every answer (seconds; `stop()`
    ends a wait early). `info` maps other paths to JSON answers (GET or POST), e.g. a llama.cpp
    `{"/props": {"default_generation_settings": {"n_ctx": 2048}}}` for the context probe;
    `/v1/models` rows get `info["/v1/models"]` merged in.
    """

    def __init__(self, replies: list[Reply], *, delay: float = 0.0, model: str = "stub-model", info: dict | None = None):
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.delay = delay
        self.model = model
        self.info = dict(info or {})
        self.probes: list[str] = []  # paths of GET/POST requests other than chat completions
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> "OpenAIStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "OpenAIStub":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                path = self.path.rstrip("/")
                stub.probes.append(path)
                if path.endswith("/models"):
                    row = {"id": stub.model, "object": "model", **stub.info.get("/v1/models", {})}
                    self._json(200, {"object": "list", "data": [row]})
                elif path in stub.info:
                    self._json(200, stub.info[path])
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    path = self.path.rstrip("/")
                    stub.probes.append(path)
                    if path in stub.info:
                        self._json(200, stub.info[path])
                    else:
                        self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with stub._lock:
                    stub.requests.append({"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}})
                    i = len(stub.requests) - 1
                    reply = stub.replies[min(i, len(stub.replies) - 1)]
                if callable(reply):
                    reply = reply(body)
                if isinstance(reply, str):
                    reply = {"content": reply}
                if stub.delay:
                    stub._stopped.wait(stub.delay)
                if "status" in reply:
                    self._json(reply["status"], {"error": {"message": reply.get("error", "error"), "type": "stub_error", "code": reply.get("code")}})
                    return
                if body.get("stream"):
                    self._sse(reply)
                else:
                    self._json(200, stub._completion(reply))

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _sse(self, reply: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in stub._chunks(reply):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="openai-stub", daemon=True)
        self._thread.start()
        return self

    def wait_for_requests(self, n: int, timeout: float = 60.0) -> bool:
        """Block until the stub has received `n` chat requests (so a test acts while one is in flight)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= n:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the stub first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- payloads ---------------------------------------------------------------------
    def _tool_calls(self, reply: dict) -> list[dict]:
        return [
            {"id": tc.get("id") or f"call_{next(_ids)}", "type": "function",
             "function": {"name": tc["name"], "arguments": json.dumps(tc.get("arguments", {}))}}
            for tc in reply.get("tool_calls", [])
        ]

    def _completion(self, reply: dict) -> dict:
        calls = self._tool_calls(reply)
        message: dict[str, Any] = {"role": "assistant", "content": reply.get("content") if not calls else (reply.get("content") or None)}
        if calls:
            message["tool_calls"] = calls
        return {
            "id": f"chatcmpl-{next(_ids)}", "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    def _chunks(self, reply: dict) -> list[dict]:
        cid, created = f"chatcmpl-{next(_ids)}", int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        out = [chunk({"role": "assistant", "content": ""})]
        calls = self._tool_calls(reply)
        if calls:
            for i, c in enumerate(calls):
                out.append(chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                                   "function": {"name": c["function"]["name"], "arguments": ""}}]}))
                args = c["function"]["arguments"]
                for j in range(0, len(args), 16):
                    out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 16]}}]}))
            out.append(chunk({}, "tool_calls"))
        else:
            text = reply.get("content") or ""
            words = text.split(" ")
            for k, w in enumerate(words):
                out.append(chunk({"content": w + (" " if k < len(words) - 1 else "")}))
            out.append(chunk({}, "stop"))
        return out


def conversation(agent, thread: str = "t1") -> list:
    """A thread's messages as the checkpointer holds them (the answer call itself reads only the engine results)."""
    return list(agent.get_state({"configurable": {"thread_id": thread}}).values["messages"])


def result_line(prompt: str, name: str) -> str:
    """One engine result of the answer call's prompt ("- NAME: text" -> text; the last one of that name)."""
    lines = [x for x in prompt.splitlines() if x.startswith(f"- {name}: ")]
    assert lines, f"no '- {name}:' line in the answer prompt:\n{prompt}"
    return lines[-1][len(f"- {name}: "):]
