"""A stub Slack Web API on 127.0.0.1 and signed Slack events, for the Slack bot's tests.

`SlackStub` answers the Web API methods the bot uses (auth.test, chat.postMessage,
reactions.add/remove, files.getUploadURLExternal, the upload URL itself,
files.completeUploadExternal; anything else answers {"ok": true}) and records every
call, so tests drive the real `slack_sdk.WebClient` over real HTTP. `signed_event`
builds an Events API request signed like Slack signs it (v0 HMAC-SHA256).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

BOT_USER_ID = "UBOT0001"
BOT_ID = "BBOT0001"
TEAM_ID = "T0TEAM01"
SIGNING_SECRET = "test-signing-secret"


@dataclass
class Call:
    method: str  # Web API method ('chat.postMessage') or 'upload' for the upload URL
    params: dict
    status: int = 200
    body: bytes = b""
    at: float = field(default_factory=time.monotonic)


class SlackStub:
    """A threaded HTTP server speaking enough of the Slack Web API; records every call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.rate_limits: dict[str, int] = {}  # method -> how many 429s to answer first
        self.errors: dict[str, str] = {}  # method -> Slack error code to answer with ({"ok": false})
        self.uploads: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = urlparse(self.path).path
                if path.startswith("/upload/"):
                    file_id = path.rsplit("/", 1)[-1]
                    stub._record(Call("upload", {"file_id": file_id}, body=raw))
                    with stub._cond:
                        stub.uploads[file_id] = raw
                    self._send(200, f"OK - {len(raw)}".encode(), "text/plain")
                    return
                method = path.rsplit("/", 1)[-1]
                params = stub._parse(raw, self.headers.get("Content-Type", ""))
                params.update({k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()})
                with stub._cond:
                    limited = stub.rate_limits.get(method, 0) > 0
                    if limited:
                        stub.rate_limits[method] -= 1
                if limited:
                    stub._record(Call(method, params, status=429))
                    self._send(429, json.dumps({"ok": False, "error": "ratelimited"}).encode(),
                               "application/json", extra={"Retry-After": "1"})
                    return
                stub._record(Call(method, params))
                if method in stub.errors:
                    answer = {"ok": False, "error": stub.errors[method]}
                else:
                    answer = stub._answer(method, params)
                self._send(200, json.dumps(answer).encode(), "application/json")

            def _send(self, status, body, ctype, extra=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- recording ---------------------------------------------------------------------

    @staticmethod
    def _parse(raw: bytes, ctype: str) -> dict:
        if not raw:
            return {}
        if "json" in ctype:
            return json.loads(raw)
        params = {k: v[0] for k, v in parse_qs(raw.decode("utf-8"), keep_blank_values=True).items()}
        for k in ("blocks", "files", "attachments"):  # the SDK JSON-encodes these form fields
            if isinstance(params.get(k), str):
                try:
                    params[k] = json.loads(params[k])
                except ValueError:
                    pass
        return params

    def _record(self, call: Call) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def _answer(self, method: str, params: dict) -> dict:
        n = next(self._ids)
        if method == "auth.test":
            return {"ok": True, "url": "https://test.slack.com/", "team": "test", "user": "tunepilot",
                    "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": BOT_ID}
        if method == "chat.postMessage":
            ts = f"{2000000000 + n}.000100"
            return {"ok": True, "channel": params.get("channel"), "ts": ts,
                    "message": {"text": params.get("text"), "ts": ts, "bot_id": BOT_ID, "user": BOT_USER_ID}}
        if method == "files.getUploadURLExternal":
            file_id = f"F{n:08d}"
            return {"ok": True, "upload_url": f"http://127.0.0.1:{self.port}/upload/{file_id}", "file_id": file_id}
        if method == "files.completeUploadExternal":
            files = params.get("files") or []
            return {"ok": True, "files": [{"id": f.get("id"), "title": f.get("title"), "name": f.get("title")} for f in files]}
        return {"ok": True}

    def of(self, method: str) -> list[Call]:
        """Calls of one method answered with HTTP 200 (not rate-limited), in order."""
        with self._cond:
            return [c for c in self.calls if c.method == method and c.status == 200]

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        """Wait until predicate(self) is true (re-checked on every recorded call)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def replies(self, channel: str | None = None) -> list[Call]:
        """chat.postMessage calls (optionally in one channel)."""
        return [c for c in self.of("chat.postMessage") if channel is None or c.params.get("channel") == channel]


# -- signed Events API requests ------------------------------------------------------------

_event_ids = itertools.count(1)


def event_body(event: dict) -> dict:
    """The Events API envelope around one event."""
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM_ID,
        "api_app_id": "A0APP001",
        "event": event,
        "type": "event_callback",
        "event_id": f"Ev{next(_event_ids):08d}",
        "event_time": int(time.time()),
        "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True}],
    }


def sign(raw: str, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    """Slack's request-signing headers for a raw body (v0 HMAC-SHA256 of 'v0:ts:body')."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:{raw}".encode(), hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "x-slack-request-timestamp": ts, "x-slack-signature": f"v0={digest}"}


def signed_event(event: dict, *, secret: str = SIGNING_SECRET):
    """A BoltRequest carrying `event`, signed with `secret`."""
    from slack_bolt import BoltRequest

    raw = json.dumps(event_body(event))
    return BoltRequest(body=raw, headers={k: [v] for k, v in sign(raw, secret).items()})


def signed_action(action_id: str, *, value: str, user: str, channel: str = "C0CHAN01", secret: str = SIGNING_SECRET):
    """A BoltRequest for a button press (block_actions, form-encoded `payload=` as Slack sends it), signed."""
    from urllib.parse import urlencode

    from slack_bolt import BoltRequest

    payload = {
        "type": "block_actions", "team": {"id": TEAM_ID}, "user": {"id": user}, "api_app_id": "A0APP001",
        "token": "legacy-verification-token", "trigger_id": "1.2.3", "channel": {"id": channel},
        "container": {"type": "message", "channel_id": channel, "thread_ts": value},
        "actions": [{"type": "button", "action_id": action_id, "block_id": "tunepilot_confirm", "value": value,
                     "action_ts": str(time.time())}],
    }
    raw = urlencode({"payload": json.dumps(payload)})
    headers = sign(raw, secret)
    headers["content-type"] = "application/x-www-form-urlencoded"
    return BoltRequest(body=raw, headers={k: [v] for k, v in headers.items()})


_ts = itertools.count(1)


def new_ts() -> str:
    """A fresh, unique Slack message timestamp."""
    return f"{1700000000 + next(_ts)}.{next(_ts):06d}"


def mention(text: str, *, channel: str = "C0CHAN01", user: str = "U0ALICE1", thread_ts: str | None = None,
            ts: str | None = None) -> dict:
    """An app_mention event ('<@bot> text')."""
    ev = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER_ID}> {text}", "ts": ts or new_ts(),
          "channel": channel, "event_ts": "1"}
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return ev


def message(text: str, *, channel: str = "C0CHAN01", user: str | None = "U0ALICE1", channel_type: str = "channel",
            thread_ts: str | None = None, ts: str | None = None, **extra) -> dict:
    """A message event (channel_type 'im' for a DM)."""
    ev = {"type": "message", "text": text, "ts": ts or new_ts(), "channel": channel,
          "channel_type": channel_type, "event_ts": "1", **extra}
    if user is not None:
        ev["user"] = user
    if thread_ts:
        ev["thread_ts"] = thread_ts
    return ev


def measure_latency(n: int = 20) -> str:
    """Ack and mention→reply latency of the real bot (stub Slack API, scripted model answering at once)."""
    import statistics
    import sys
    import tempfile
    from pathlib import Path

    sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
    from _agent_helpers import ScriptedChatModel, final

    from agent.slack_bot import close, create_app, wait_idle

    stub = SlackStub()
    model = ScriptedChatModel(script=[lambda m: final("ok")], repeat_last=True)
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(bot_token="xoxb-test", signing_secret=SIGNING_SECRET, chat_model=model,
                         checkpointer_path=Path(tmp) / "slack.sqlite", trial_users=set(),
                         slack_api_url=stub.api_url, workdir=Path(tmp) / "work")
        acks, turns = [], []
        for i in range(n):
            before = len(stub.replies())
            t = time.perf_counter()
            app.dispatch(signed_event(mention(f"question {i}")))
            acks.append(time.perf_counter() - t)
            stub.wait_for(lambda s: len(s.replies()) > before, 10)
            turns.append(time.perf_counter() - t)
        wait_idle(app)
        close(app)
    stub.close()
    return (f"ack median {statistics.median(acks) * 1000:.1f} ms (max {max(acks) * 1000:.1f}); "
            f"mention->threaded reply median {statistics.median(turns) * 1000:.0f} ms (max {max(turns) * 1000:.0f}) over {n} mentions")


if __name__ == "__main__":  # .venv/bin/python tests/_slack_helpers.py
    print(measure_latency())
