"""Slack front end: the tunepilot agent in Slack threads (slack_bolt).

One Slack thread is one conversation of the same agent the CLI uses
(`agent.core.build_agent` + `run_turn`), remembered in a SQLite checkpointer so a
restart loses nothing. The bot answers mentions in channels, follow-ups in threads it
already answers, and direct messages; it reacts with :eyes: at once, replies in the
thread (mrkdwn + blocks: the answer, the setup, the next command) and uploads a
generated `train.py` to the thread. Turns run in a thread pool (never blocking Bolt's
ack); two messages in one thread are serialised. Only allow-listed users may start a
trial run on the host. Every failure becomes a short reply in the thread.

`create_app(...)` builds the Bolt app (tests feed it signed events); `run(...)` is
`tunepilot slack` (Socket Mode by default, HTTP with `http=True`).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tools.schemas import TunepilotError

log = logging.getLogger("tunepilot.slack")

TRIAL_USERS_ENV = "TUNEPILOT_SLACK_TRIAL_USERS"
SECTION_LIMIT = 2900  # Slack caps a section's text at 3000 characters
MAX_ANSWER_SECTIONS = 40  # Slack caps a message at 50 blocks
FALLBACK_TEXT_LIMIT = 3500
TRIAL_REFUSED_NOTE = (
    ":lock: Trial runs on the shared GPU host are limited to allow-listed people "
    f"(`{TRIAL_USERS_ENV}`), so this answer uses the estimate instead. "
    "Ask an allow-listed teammate, or run the script yourself."
)


CONFIRM_APPROVE = "tunepilot_confirm_yes"
CONFIRM_REJECT = "tunepilot_confirm_no"
_YES = {"yes", "y", "ok", "go", "run it", "yes please", "네", "예", "응", "좋아요"}
_NO = {"no", "n", "nope", "cancel", "don't", "아니요", "아니", "취소"}


# answers whose setup gets its memory chart uploaded with them (tools.plots.setup_chart)
CHART_TOOLS = ("plan_training", "estimate_memory")


class SlackConfigError(TunepilotError):
    """The Slack bot cannot start: a missing token, a rejected token, an unreachable API."""


# --------------------------------------------------------------------------------------
# Configuration helpers
# --------------------------------------------------------------------------------------


def default_db_path() -> Path:
    """Where the Slack conversations are kept: $TUNEPILOT_HOME/slack.sqlite (default ~/.cache/tunepilot)."""
    home = os.environ.get("TUNEPILOT_HOME") or str(Path.home() / ".cache" / "tunepilot")
    return Path(home) / "slack.sqlite"


def parse_trial_users(text: str | None) -> set[str]:
    """Slack user ids from a comma- or space-separated list ('U01ABC,U02DEF')."""
    if not text:
        return set()
    ids = {part.strip() for part in re.split(r"[,\s]+", text) if part.strip()}
    bad = sorted(i for i in ids if not re.fullmatch(r"[UW][A-Z0-9]{2,}", i))
    if bad:
        raise SlackConfigError(
            f"trial users: {', '.join(bad)} do not look like Slack user ids (e.g. U01ABCDEF); "
            "copy them from a profile's 'Copy member ID'"
        )
    return ids


# --------------------------------------------------------------------------------------
# Rendering for Slack (pure functions)
# --------------------------------------------------------------------------------------

_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _inline(text: str) -> str:
    """Markdown inline syntax of one line (outside code spans) to Slack mrkdwn."""
    text = _escape(text)
    text = re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", r"<\2|\1>", text)
    text = re.sub(r"\*\*(.+?)\*\*", "\x01\\1\x01", text)
    text = re.sub(r"__(.+?)__", "\x01\\1\x01", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)([^*\n]+?)(?<!\s)\*(?![\w*])", r"_\1_", text)
    text = re.sub(r"~~(.+?)~~", r"~\1~", text)
    return text.replace("\x01", "*")


def _convert_line(line: str) -> str:
    m = re.match(r"^(\s*)#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
        return f"*{_convert_spans(m.group(2)).replace('*', '')}*"
    m = re.match(r"^(\s*)[-*+]\s+(.*)$", line)
    if m:
        return f"{m.group(1)}• {_convert_spans(m.group(2))}"
    return _convert_spans(line)


def _convert_spans(line: str) -> str:
    parts = re.split(r"(`[^`]*`)", line)
    return "".join(p if p.startswith("`") and p.endswith("`") and len(p) > 1 else _inline(p) for p in parts)


def _table_block(rows: list[str]) -> list[str]:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows if not _TABLE_SEP.match(r)]
    ncol = max(len(r) for r in cells)
    cells = [r + [""] * (ncol - len(r)) for r in cells]
    cells = [[c.replace("**", "").replace("`", "") for c in r] for r in cells]
    widths = [max(len(r[i]) for r in cells) for i in range(ncol)]
    out = ["```"]
    for r in cells:
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    out.append("```")
    return out


def markdown_to_mrkdwn(text: str) -> str:
    """Convert the agent's Markdown to Slack mrkdwn: **bold** → *bold*, headings → bold lines,
    [t](url) → <url|t>, bullets → •, tables → aligned code blocks; code is left as it is."""
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    i = 0
    in_code = False
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            out.append("```")  # Slack shows a language tag as text: drop it
            in_code = not in_code
            i += 1
            continue
        if in_code:
            out.append(line)
            i += 1
            continue
        if line.strip().startswith("|") and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1]):
            j = i
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            out.extend(_table_block(lines[i:j]))
            i = j
            continue
        out.append(_convert_line(line))
        i += 1
    if in_code:
        out.append("```")
    return "\n".join(out).strip()


def split_sections(mrkdwn: str, limit: int = SECTION_LIMIT) -> list[str]:
    """Split mrkdwn into chunks under Slack's section limit, at line ends, never breaking a code block open."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    in_code = False
    for line in mrkdwn.split("\n"):
        while len(line) > limit:  # a single huge line
            head, line = line[: limit - 10], line[limit - 10:]
            chunks.append(head)
        if size + len(line) + 1 > limit - 4 and cur:
            if in_code:
                cur.append("```")
            chunks.append("\n".join(cur))
            cur, size = (["```"], 4) if in_code else ([], 0)
        cur.append(line)
        size += len(line) + 1
        if line.strip().startswith("```"):
            in_code = not in_code
    if cur and any(c.strip() for c in cur):
        chunks.append("\n".join(cur))
    return chunks or [""]


def memory_line(memory: dict | None) -> str | None:
    """'21.3 GiB of 24.0 GiB per GPU, fits (2.7 GiB headroom)' from the agent's memory view, or None."""
    if not isinstance(memory, dict) or memory.get("per_gpu_total_gib") is None:
        return None
    line = f"{memory['per_gpu_total_gib']:g} GiB"
    if memory.get("gpu_memory_gib"):
        line += f" of {memory['gpu_memory_gib']:g} GiB"
    line += " per GPU"
    if memory.get("fits") is True:
        line += ", fits :white_check_mark:"
    elif memory.get("fits") is False:
        line += ", does not fit :x:"
    if memory.get("headroom_gib") is not None:
        line += f" ({memory['headroom_gib']:g} GiB headroom)"
    return line


def setup_fields(setup: Any, memory: dict | None = None) -> list[dict]:
    """The setup as a Slack section's fields: method, r, batch×accum, seq len, checkpointing, optimizer, GPUs, memory."""
    method = setup.method
    if setup.load_in_4bit and method != "qlora":
        method += " (4-bit)"
    elif setup.load_in_8bit:
        method += " (8-bit)"
    eff = setup.per_device_train_batch_size * setup.gradient_accumulation_steps * setup.num_gpus
    gpus = f"{setup.num_gpus} × {setup.gpu}" if setup.gpu else f"{setup.num_gpus} GPU" + ("s" if setup.num_gpus > 1 else "")
    if setup.zero_stage:
        gpus += f", ZeRO-{setup.zero_stage}"
    if setup.fsdp != "none":
        gpus += f", FSDP {setup.fsdp}"
    if setup.offload != "none":
        gpus += f", offload {setup.offload}"
    precision = "bf16" if setup.bf16 else "fp16" if setup.fp16 else "fp32"
    items = [
        ("Model", f"`{setup.model_id}`"),
        ("Method", method),
    ]
    if setup.method in ("lora", "qlora", "dora"):
        items.append(("LoRA r / alpha", f"{setup.r} / {setup.lora_alpha}"))
    items += [
        ("Batch × accum", f"{setup.per_device_train_batch_size} × {setup.gradient_accumulation_steps} (effective {eff})"),
        ("Seq len", str(setup.max_length)),
        ("Checkpointing", "on" if setup.gradient_checkpointing else "off"),
        ("Optimizer", f"`{setup.optim}`, {precision}"),
        ("GPUs", gpus),
    ]
    mem = memory_line(memory)
    if mem:
        items.append(("Memory", mem))
    return [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in items][:10]


def _tools_used(result: Any) -> list[str]:
    return [c.get("tool", "") for c in (getattr(result, "tool_calls", None) or [])]


def next_command(result: Any, *, script_uploaded: bool) -> str:
    """One line telling the person what to do next, for the reply's context block."""
    if script_uploaded:
        launch = "python train.py"
        try:  # the exact launch command of this setup (accelerate/DeepSpeed for several GPUs)
            from tools.script import render_script

            launch = render_script(result.setup).launch_command or launch
        except Exception:  # noqa: BLE001 - the hint is optional; the plain command is right for one GPU
            pass
        return f"Next: download `train.py` above and run `{launch}` (or reply here to change the setup)."
    if getattr(result, "setup", None) is not None:
        return "Next: reply “write the training script” in this thread, or run `tunepilot script setup.yaml -o train.py`."
    return "Reply in this thread to follow up; I remember the conversation."


def render_reply(result: Any, *, trial_refused: bool = False, script_uploaded: bool = False) -> tuple[str, list[dict]]:
    """A turn's result as Slack (fallback text, blocks): the answer, the setup fields, the next command."""
    answer = markdown_to_mrkdwn(getattr(result, "answer", "") or "") or "_(no answer)_"
    sections = split_sections(answer)
    truncated = len(sections) > MAX_ANSWER_SECTIONS
    sections = sections[:MAX_ANSWER_SECTIONS]
    blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": s}} for s in sections if s.strip()]
    if truncated:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": "_(answer truncated: Slack allows 50 blocks per message)_"}]})
    if trial_refused:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": TRIAL_REFUSED_NOTE}})
    from agent.chat import engine_block

    block = engine_block(result)
    if block:
        # the engine's own verdict and numbers (or a warning that none backs the answer), whatever the model wrote above
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(block)[:2900]}]})
    setup = getattr(result, "setup", None)
    if setup is not None and _tools_used(result):
        blocks.append({"type": "divider"})
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "*Setup*"}, "fields": setup_fields(setup, getattr(result, "memory", None))})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": next_command(result, script_uploaded=script_uploaded)}]})
    text = answer + (f"\n\n{TRIAL_REFUSED_NOTE}" if trial_refused else "")
    if block:
        text += f"\n\n{block}"
    if len(text) > FALLBACK_TEXT_LIMIT:
        text = text[: FALLBACK_TEXT_LIMIT - 1] + "…"
    return text, blocks


def confirm_blocks(pending: list[dict], thread_ts: str) -> tuple[str, list[dict]]:
    """The question before a trial runs: what would run, and Run / Don't run buttons (allow-listed people only)."""
    what = "\n".join(f"• {p.get('description') or p.get('tool')}" for p in pending) or "• a trial run"
    text = f":raised_hand: This needs your yes before it runs on the bot's host:\n{what}"
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _escape(text)}},
        {"type": "actions", "block_id": "tunepilot_confirm", "elements": [
            {"type": "button", "action_id": CONFIRM_APPROVE, "style": "primary", "value": thread_ts,
             "text": {"type": "plain_text", "text": "Run it"}},
            {"type": "button", "action_id": CONFIRM_REJECT, "value": thread_ts,
             "text": {"type": "plain_text", "text": "Don't run"}},
        ]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "Or reply “yes” / “no” in this thread. Only allow-listed people can start it."}]},
    ]
    return text + "\n(reply yes or no)", blocks


def error_reply(exc: BaseException) -> str:
    """'Sorry, something went wrong: <one line>' for any failure of a turn."""
    if type(exc).__name__ == "SlackApiError" and getattr(exc, "response", None) is not None:
        return f"Sorry, something went wrong: Slack refused a call ({exc.response.get('error', 'error')})"
    try:
        from agent.core import agent_error_message

        msg = agent_error_message(exc)
    except Exception:  # noqa: BLE001 - never fail while reporting a failure
        msg = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TunepilotError) else str(exc)
    line = next((ln.strip() for ln in str(msg).splitlines() if ln.strip()), type(exc).__name__)
    if len(line) > 300:
        line = line[:299] + "…"
    return f"Sorry, something went wrong: {line}"


# --------------------------------------------------------------------------------------
# The bot: event filtering, per-thread serialisation, the turn itself
# --------------------------------------------------------------------------------------

_IGNORED = "ignored"


class _TrackedExecutor(ThreadPoolExecutor):
    """A thread pool that reports each submitted future, so `wait_idle` can wait for Bolt's listeners too."""

    def __init__(self, *args, on_submit=None, **kw):
        super().__init__(*args, **kw)
        self._on_submit = on_submit

    def submit(self, fn, /, *args, **kwargs):
        fut = super().submit(fn, *args, **kwargs)
        if self._on_submit is not None:
            self._on_submit(fut)
        return fut


class SlackBot:
    """State behind one Bolt app: the agent, the Slack client, the worker pool and the thread locks."""

    def __init__(self, *, client, agent, checkpointer, conn, bot_user_id: str, bot_id: str | None,
                 trial_users: set[str], executor_workers: int = 4):
        self.client = client
        self.agent = agent
        self.checkpointer = checkpointer
        self.conn = conn
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.trial_users = set(trial_users)
        self.executor = _TrackedExecutor(max_workers=executor_workers, thread_name_prefix="tunepilot-turn",
                                         on_submit=self._track)
        # Bolt runs listeners in this pool after acking (process_before_response=False)
        self.listener_executor = _TrackedExecutor(max_workers=5, thread_name_prefix="tunepilot-bolt",
                                                  on_submit=self._track)
        self._guard = threading.Lock()
        self._thread_locks: dict[str, threading.Lock] = {}
        self._active_threads: set[str] = set()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._pending: set[Future] = set()

    # -- filtering -------------------------------------------------------------------

    def strip_mention(self, text: str) -> str:
        """The message text without the bot's own mention(s)."""
        text = re.sub(rf"<@{re.escape(self.bot_user_id)}(\|[^>]*)?>", " ", text or "")
        return re.sub(r"[ \t]+", " ", text).strip()

    def _from_a_bot(self, event: dict) -> bool:
        return bool(event.get("bot_id")) or event.get("user") in (None, "", self.bot_user_id) \
            or event.get("subtype") is not None

    def _known_thread(self, thread_id: str) -> bool:
        with self._guard:
            if thread_id in self._active_threads:
                return True
        try:
            return self.checkpointer.get_tuple({"configurable": {"thread_id": thread_id}}) is not None
        except Exception:  # noqa: BLE001 - an unreadable store means "not ours"
            log.exception("checkpointer lookup failed for %s", thread_id)
            return False

    def _first_time(self, channel: str, ts: str) -> bool:
        key = (channel, ts)
        with self._guard:
            if key in self._seen:
                return False
            self._seen[key] = None
            while len(self._seen) > 2000:
                self._seen.popitem(last=False)
            return True

    def on_mention(self, event: dict) -> str | Future:
        """An app_mention event: answer it in its thread."""
        if self._from_a_bot(event):
            return _IGNORED
        return self._accept(event)

    def on_message(self, event: dict) -> str | Future:
        """A message event: DMs always; channel messages only as follow-ups in threads the bot is in."""
        if self._from_a_bot(event):
            return _IGNORED
        if event.get("channel_type") == "im":
            return self._accept(event)
        thread_ts = event.get("thread_ts")
        if not thread_ts or thread_ts == event.get("ts"):
            return _IGNORED  # a new top-level channel message: only mentions start a conversation
        if f"<@{self.bot_user_id}" in (event.get("text") or ""):
            return _IGNORED  # the app_mention event answers it
        if not self._known_thread(f"{event['channel']}:{thread_ts}"):
            return _IGNORED
        return self._accept(event)

    def _accept(self, event: dict) -> str | Future:
        channel, ts = event["channel"], event["ts"]
        if not self._first_time(channel, ts):
            return _IGNORED  # Slack retried, or both app_mention and message arrived
        thread_ts = event.get("thread_ts") or ts
        thread_id = f"{channel}:{thread_ts}"
        with self._guard:
            self._active_threads.add(thread_id)
        self._react(channel, ts, "eyes")
        return self.executor.submit(self._turn, channel=channel, thread_ts=thread_ts, ts=ts,
                                    user=event.get("user", ""), text=self.strip_mention(event.get("text", "")))

    def _track(self, fut: Future) -> None:
        with self._guard:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._guard:
            self._pending.discard(fut)

    # -- the turn --------------------------------------------------------------------

    def _lock_for(self, thread_id: str) -> threading.Lock:
        with self._guard:
            return self._thread_locks.setdefault(thread_id, threading.Lock())

    def _react(self, channel: str, ts: str, name: str, *, remove: bool = False) -> None:
        try:
            if remove:
                self.client.reactions_remove(channel=channel, timestamp=ts, name=name)
            else:
                self.client.reactions_add(channel=channel, timestamp=ts, name=name)
        except Exception as e:  # noqa: BLE001 - a missing reaction must not lose the answer
            log.warning("reaction %s on %s failed: %s", name, ts, e)

    def _turn(self, *, channel: str, thread_ts: str, ts: str, user: str, text: str) -> None:
        thread_id = f"{channel}:{thread_ts}"
        with self._lock_for(thread_id):
            word = text.strip().strip(".!").lower()
            if (word in _YES or word in _NO) and self._is_awaiting(thread_id):
                self._answer_confirmation(channel=channel, thread_ts=thread_ts, user=user, approved=word in _YES, ts=ts)
                return
            self._run(channel=channel, thread_ts=thread_ts, ts=ts, user=user, text=text or "hello")

    def on_confirm(self, *, channel: str, thread_ts: str, user: str, approved: bool) -> Future:
        """A Run / Don't run button press: answered in the worker pool, serialised with the thread's turns."""
        def work() -> None:
            with self._lock_for(f"{channel}:{thread_ts}"):
                self._answer_confirmation(channel=channel, thread_ts=thread_ts, user=user, approved=approved, ts=None)

        return self.executor.submit(work)

    def _is_awaiting(self, thread_id: str) -> bool:
        """A step of this thread waits for a yes (asked of the checkpointer, so a restart keeps it)."""
        from agent.core import pending_confirmations

        try:
            return bool(pending_confirmations(self.agent, thread_id))
        except Exception:  # noqa: BLE001 - an unreadable store: nothing to confirm
            log.exception("could not read the pending confirmations of %s", thread_id)
            return False

    def _answer_confirmation(self, *, channel: str, thread_ts: str, user: str, approved: bool, ts: str | None) -> None:
        thread_id = f"{channel}:{thread_ts}"
        if not self._is_awaiting(thread_id):
            self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text="Nothing is waiting for a yes in this thread.")
            return
        if approved and user not in self.trial_users:
            self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=f"<@{user}> {TRIAL_REFUSED_NOTE}")
            return
        self._run(channel=channel, thread_ts=thread_ts, ts=ts, user=user, text=None, approved=approved)

    def _run(self, *, channel: str, thread_ts: str, ts: str | None, user: str, text: str | None,
             approved: bool | None = None) -> None:
        """One turn (text) or the continuation of a paused one (approved), and its reply in the thread."""
        thread_id = f"{channel}:{thread_ts}"
        allowed = user in self.trial_users
        started = time.monotonic()
        try:
            from agent.core import resume_turn, run_turn

            if text is not None:  # a new question instead of yes / no: run_turn refuses a waiting step
                result = run_turn(self.agent, thread_id, text, allow_trial=allowed)
            else:
                result = resume_turn(self.agent, thread_id, bool(approved), allow_trial=True,
                                     decline_reason="the person pressed Don't run" if not approved else "")
            if result.stopped == "confirm":
                reply_text, blocks = confirm_blocks(result.pending or [], thread_ts)
                self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=reply_text, blocks=blocks)
                if ts:
                    self._react(channel, ts, "eyes", remove=True)
                    self._react(channel, ts, "raised_hand")
                return
            used = _tools_used(result)
            script = getattr(result, "script", None)
            if script is None and getattr(result, "script_path", None) and "write_training_script" in used:
                script = Path(result.script_path).read_text(encoding="utf-8")
            upload = bool(script) and any(t in used for t in ("write_training_script", "plan_training"))
            trial_refused = "run_trial" in used and not allowed and text is not None
            reply_text, blocks = render_reply(result, trial_refused=trial_refused, script_uploaded=upload)
            self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=reply_text, blocks=blocks)
            if upload:
                self._upload_script(channel, thread_ts, script, getattr(result, "script_path", None))
            if getattr(result, "setup", None) is not None and any(t in used for t in CHART_TOOLS):
                self._upload_chart(channel, thread_ts, result)
            log.info("answered %s in %.1fs (tools: %s)", thread_id, time.monotonic() - started, ", ".join(used) or "none")
            if ts:
                self._react(channel, ts, "eyes", remove=True)
                self._react(channel, ts, "white_check_mark")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply, never silence
            log.exception("turn failed in %s", thread_id)
            try:
                self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=error_reply(exc))
            except Exception:  # noqa: BLE001
                log.exception("could not post the error reply in %s", thread_id)
            if ts:
                self._react(channel, ts, "eyes", remove=True)
                self._react(channel, ts, "x")

    def _upload_chart(self, channel: str, thread_ts: str, result: Any) -> None:
        """The memory chart of the answer's setup (tools.plots), as a PNG in the thread; a failure is only logged."""
        import tempfile

        from tools.plots import setup_chart

        try:
            with tempfile.TemporaryDirectory(prefix="tunepilot-chart-") as tmp:
                png = setup_chart(result.setup, Path(tmp) / "memory.png", memory=getattr(result, "memory", None))
                self.client.files_upload_v2(
                    channel=channel, thread_ts=thread_ts, file=png.read_bytes(), filename="memory.png",
                    title=f"Memory per GPU: {result.setup.short()}", initial_comment="What fills the GPU for this setup:",
                )
        except Exception as e:  # noqa: BLE001 - no matplotlib, no files:write scope...: the answer stands without it
            log.warning("memory chart for %s not uploaded: %s", thread_ts, e)

    def _upload_script(self, channel: str, thread_ts: str, script: str, script_path: str | None) -> None:
        from slack_sdk.errors import SlackApiError

        try:
            self.client.files_upload_v2(
                channel=channel, thread_ts=thread_ts, content=script, filename="train.py",
                title="train.py", initial_comment="The training script for this setup:",
            )
        except SlackApiError as e:  # e.g. missing_scope: say so in the thread, keep the answer
            where = f" It is saved on the bot's host at `{script_path}`." if script_path else ""
            self.client.chat_postMessage(
                channel=channel, thread_ts=thread_ts,
                text=f"I could not upload train.py (Slack said `{e.response.get('error', 'error')}`; "
                     f"does the app have the files:write scope?).{where}",
            )

    # -- lifecycle -------------------------------------------------------------------

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every accepted turn has finished; False when the timeout passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._guard:
                pending = list(self._pending)
            if not pending:
                return True
            for f in pending:
                try:
                    f.result(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - _turn handles its own errors; timeouts loop
                    pass
        with self._guard:
            return not self._pending

    def close(self) -> None:
        """Finish running turns, stop the pool and close the SQLite file."""
        self.listener_executor.shutdown(wait=True)
        self.executor.shutdown(wait=True)
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------------------
# The Bolt app
# --------------------------------------------------------------------------------------


def _web_client(bot_token: str, slack_api_url: str | None):
    from slack_sdk import WebClient
    from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

    kw: dict[str, Any] = {"token": bot_token}
    if slack_api_url:
        kw["base_url"] = slack_api_url if slack_api_url.endswith("/") else slack_api_url + "/"
    client = WebClient(**kw)
    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=3))
    return client


def _auth_test(client) -> dict:
    from slack_sdk.errors import SlackApiError

    try:
        auth = client.auth_test()
    except SlackApiError as e:
        raise SlackConfigError(
            f"Slack rejected SLACK_BOT_TOKEN ({e.response.get('error', 'error')}): "
            "copy the Bot User OAuth Token (xoxb-...) from the app's OAuth & Permissions page"
        ) from None
    except Exception as e:  # noqa: BLE001 - network failures, bad URLs
        raise SlackConfigError(f"cannot reach the Slack API at {client.base_url}: {e}") from None
    if not auth.get("user_id"):
        raise SlackConfigError("auth.test returned no bot user id: is SLACK_BOT_TOKEN a bot token (xoxb-...)?")
    return auth.data if hasattr(auth, "data") else dict(auth)


class _DropTokenUnusedWarning(logging.Filter):
    """Bolt warns that $SLACK_BOT_TOKEN is unused when a client is given: it is the client's token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


def create_app(*, bot_token: str, signing_secret: str | None = None, chat_model, checkpointer_path,
               trial_users: set[str], slack_api_url: str | None = None, executor_workers: int = 4,
               workdir: str | Path | None = None, max_model_calls: int = 12):
    """Build the Bolt app: mentions, DMs and thread follow-ups answered by the tunepilot agent.

    The returned App carries `app.tunepilot_bot` (a SlackBot); use `wait_idle(app)` and
    `close(app)` to wait for background turns and to release the SQLite file.
    """
    from langgraph.checkpoint.sqlite import SqliteSaver
    from slack_bolt import App

    from agent.core import build_agent

    client = _web_client(bot_token, slack_api_url)
    auth = _auth_test(client)

    path = Path(checkpointer_path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False)
        checkpointer = SqliteSaver(conn)
        checkpointer.setup()
    except (OSError, sqlite3.Error) as e:
        raise SlackConfigError(f"--db {path}: cannot open the conversation store: {e}") from None

    from datetime import date

    from agent.llm import check_context
    from agent.prompt_budget import first_prompt_tokens
    from prompts import render
    from tools.agent_tools import TOOLS

    server = check_context(chat_model, first_prompt_tokens(render("system", today=date.today().isoformat()), TOOLS))
    kw: dict[str, Any] = {"checkpointer": checkpointer, "max_model_calls": max_model_calls,
                          "context_tokens": server.tokens if server else None}
    if workdir is not None:
        kw["workdir"] = workdir
    agent = build_agent(chat_model, **kw)
    from agent.chat import small_context_note

    note = small_context_note(agent, server)
    if note:
        log.warning("%s", note)

    bot = SlackBot(client=client, agent=agent, checkpointer=checkpointer, conn=conn,
                   bot_user_id=auth["user_id"], bot_id=auth.get("bot_id"),
                   trial_users=trial_users, executor_workers=executor_workers)

    bolt_log = logging.getLogger("tunepilot.slack.bolt")
    if not any(isinstance(f, _DropTokenUnusedWarning) for f in bolt_log.filters):
        bolt_log.addFilter(_DropTokenUnusedWarning())
    app = App(
        client=client,
        signing_secret=signing_secret if signing_secret is not None else os.environ.get("SLACK_SIGNING_SECRET", ""),
        process_before_response=False,  # ack at once; the listener and the turn run in background pools
        listener_executor=bot.listener_executor,
        logger=bolt_log,
    )

    @app.event("app_mention")
    def _app_mention(event: dict) -> None:
        bot.on_mention(event)

    @app.event("message")
    def _message(event: dict) -> None:
        bot.on_message(event)

    def _confirmation(approved: bool):
        def handler(ack, body: dict) -> None:
            ack()
            action = (body.get("actions") or [{}])[0]
            channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
            thread_ts = action.get("value") or (body.get("container") or {}).get("thread_ts")
            user = (body.get("user") or {}).get("id", "")
            if channel and thread_ts:
                bot.on_confirm(channel=channel, thread_ts=thread_ts, user=user, approved=approved)

        return handler

    app.action(CONFIRM_APPROVE)(_confirmation(True))
    app.action(CONFIRM_REJECT)(_confirmation(False))

    app.tunepilot_bot = bot  # type: ignore[attr-defined]
    return app


def wait_idle(app, timeout: float = 30.0) -> bool:
    """Wait until the app's background turns are done (tests, graceful shutdown)."""
    return app.tunepilot_bot.wait_idle(timeout)


def close(app) -> None:
    """Stop the app's worker pool and close its conversation store."""
    app.tunepilot_bot.close()


def run(*, http: bool = False, port: int = 3000, db: str | Path | None = None, trial_users: str | None = None,
        llm: str | None = None, base_url: str | None = None, slack_api_url: str | None = None,
        llm_options: dict | None = None) -> None:
    """`tunepilot slack`: connect the bot (Socket Mode, or HTTP on `port`) and serve until interrupted."""
    bot_token = os.environ.get("SLACK_BOT_TOKEN", "").strip()
    if not bot_token:
        raise SlackConfigError("SLACK_BOT_TOKEN is not set: export the app's Bot User OAuth Token (xoxb-...); see docs/slack_manifest.yaml")
    signing_secret = os.environ.get("SLACK_SIGNING_SECRET", "").strip() or None
    app_token = os.environ.get("SLACK_APP_TOKEN", "").strip()
    if http and not signing_secret:
        raise SlackConfigError("SLACK_SIGNING_SECRET is not set: HTTP mode verifies every request with it (Basic Information > Signing Secret)")
    if not http and not app_token:
        raise SlackConfigError("SLACK_APP_TOKEN is not set: Socket Mode needs an app-level token (xapp-...) with connections:write, or use --http --port N")
    users = parse_trial_users(trial_users if trial_users is not None else os.environ.get(TRIAL_USERS_ENV))

    from agent.llm import make_chat_model

    chat_model = make_chat_model(llm, base_url=base_url, **(llm_options or {}))
    db_path = Path(db) if db else default_db_path()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("httpx", "httpx2", "openai"):  # one line per LLM request otherwise
            logging.getLogger(noisy).setLevel(logging.WARNING)
    app = create_app(bot_token=bot_token, signing_secret=signing_secret, chat_model=chat_model,
                     checkpointer_path=db_path, trial_users=users, slack_api_url=slack_api_url)
    bot = app.tunepilot_bot
    log.info("connected as <@%s>; conversations in %s; trial users: %s", bot.bot_user_id, db_path,
             ", ".join(sorted(users)) or "nobody")
    try:
        if http:
            log.info("HTTP mode: Slack events at http://0.0.0.0:%d/slack/events", port)
            app.start(port=port)
        else:
            from slack_bolt.adapter.socket_mode import SocketModeHandler

            from slack_sdk.errors import SlackApiError

            log.info("Socket Mode: connecting")
            try:
                SocketModeHandler(app, app_token).start()
            except SlackApiError as e:
                raise SlackConfigError(
                    f"Slack refused SLACK_APP_TOKEN ({e.response.get('error', 'error')}): generate an app-level token "
                    "(xapp-...) with connections:write under Basic Information > App-Level Tokens, and enable Socket Mode"
                ) from None
    finally:
        close(app)
