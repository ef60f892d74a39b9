"""The tunepilot agent: LangChain's `create_agent` loop over the tools in `tools.agent_tools.TOOLS`.

Contract used by the chat CLI, `tunepilot ask` and the Slack bot:

- `build_agent(chat_model, *, checkpointer=None, max_model_calls=12, workdir=None)` -> the
  compiled agent. Conversations are threads of its checkpointer (in memory by default;
  pass a `SqliteSaver` to persist them).
- `run_turn(agent, thread_id, text, *, on_step=None, allow_trial=True) -> TurnResult`: one
  user message, streamed; `on_step({"tool", "args", "seconds", "status"})` per tool call.
- `agent_error_message(exc) -> str`: one line for a chat-model or tool fault.

Session state lives in the conversation itself: each tool returns its setup / script as
the ToolMessage *artifact* (the model never sees it, the checkpointer keeps it), and
`tools.agent_tools.session_state(messages)` reads the latest ones back. So a thread's
setup survives restarts with a persistent checkpointer, and two threads never mix.
Per-call context (the work directory, the thread id, whether trial runs are allowed) is
set around every tool call by a middleware (`tools.agent_tools.tool_context`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

from tools.schemas import TrainingSetup, TunepilotError, format_validation_error

ALLOW_TRIAL_KEY = "tunepilot_allow_trial"
LIMIT_NODE = "ModelCallLimitMiddleware"
DEFAULT_MAX_MODEL_CALLS = 12


def home_dir() -> Path:
    """$TUNEPILOT_HOME, default ~/.cache/tunepilot (history, chat database, work files)."""
    return Path(os.environ.get("TUNEPILOT_HOME") or Path.home() / ".cache" / "tunepilot").expanduser()


@dataclass
class TurnResult:
    """What one user turn produced."""

    answer: str
    setup: Optional[TrainingSetup] = None  # the last setup a tool produced in this thread
    script: Optional[str] = None  # the last generated train.py text in this thread
    script_path: Optional[str] = None
    tool_calls: list[dict] = field(default_factory=list)  # this turn's steps, as passed to on_step
    stopped: Optional[str] = None  # None, or why the turn ended early: "limit"
    memory: Optional[dict] = None  # the memory estimate (per-GPU GiB, fits, headroom) of `setup`, when a tool made one

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "setup": self.setup.model_dump(mode="json") if self.setup else None,
            "script_path": self.script_path,
            "tool_calls": self.tool_calls,
            "stopped": self.stopped,
            "memory": self.memory,
        }


def tool_error_observation(exc: Exception, request: Any) -> str | None:
    """Errors the model can fix become an 'error: ...' observation; bugs return None and stop the run."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "error: " + format_validation_error(exc)
    if isinstance(exc, TunepilotError):
        return f"error: {exc}"
    return None


def _context_middleware(workdir: Path, allow_trial: bool):
    from langchain.agents.middleware import wrap_tool_call
    from langchain_core.messages import ToolMessage

    from tools.agent_tools import ToolContext, tool_context

    @wrap_tool_call
    def tunepilot_tool_context(request, handler):
        """Give each tool call its thread's messages, work directory and trial permission; time it."""
        runtime = getattr(request, "runtime", None)
        config = (getattr(runtime, "config", None) or {}) if runtime is not None else {}
        conf = config.get("configurable", {}) if isinstance(config, dict) else {}
        state = request.state
        messages = state.get("messages", []) if isinstance(state, dict) else getattr(state, "messages", [])
        ctx = ToolContext(
            workdir=workdir,
            thread_id=str(conf.get("thread_id", "default")),
            allow_trial=bool(allow_trial and conf.get(ALLOW_TRIAL_KEY, True)),
            messages=messages,
        )
        t0 = time.perf_counter()
        with tool_context(ctx):
            result = handler(request)
        if isinstance(result, ToolMessage):
            result.response_metadata = {**(result.response_metadata or {}), "tunepilot_seconds": round(time.perf_counter() - t0, 3)}
            if result.status == "error" and isinstance(result.content, str) and not result.content.startswith("error:"):
                result.content = _argument_error(result.content, request.tool_call.get("name", "tool"))
        return result

    return tunepilot_tool_context


def _argument_error(text: str, tool: str) -> str:
    """ToolNode's argument-validation message, as one 'error:' line naming each field."""
    if "with error:" not in text:  # e.g. a tool name the model made up
        text = " ".join(text.split())
        return "error: " + (text[len("Error: "):] if text.startswith("Error: ") else text)
    body = text.split("with error:", 1)[-1]
    body = body.replace("Please fix the error and try again.", "")
    problems = [" ".join(line.split()) for line in body.splitlines() if line.strip()]
    return f"error: {tool} arguments: {'; '.join(problems)}. Fix them and call {tool} again."


def build_agent(chat_model, *, checkpointer=None, max_model_calls: int = DEFAULT_MAX_MODEL_CALLS,
                workdir: str | Path | None = None, allow_trial: bool = True, tools: list | None = None):
    """The compiled tunepilot agent for a LangChain chat model (threads kept by `checkpointer`, in memory by default)."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelCallLimitMiddleware, ToolErrorMiddleware
    from langgraph.checkpoint.memory import InMemorySaver

    from prompts import render
    from tools.agent_tools import TOOLS

    if max_model_calls < 1:
        raise TunepilotError(f"max_model_calls must be at least 1, got {max_model_calls}")
    workdir = Path(workdir) if workdir else home_dir() / "work"
    agent = create_agent(
        chat_model,
        tools=list(tools if tools is not None else TOOLS),
        system_prompt=render("system", today=date.today().isoformat()),
        middleware=[
            _context_middleware(workdir, allow_trial),
            ToolErrorMiddleware(on_error=tool_error_observation),
            ModelCallLimitMiddleware(run_limit=max_model_calls, exit_behavior="end"),
        ],
        checkpointer=checkpointer if checkpointer is not None else InMemorySaver(),
    )
    agent.tunepilot_settings = {"max_model_calls": max_model_calls, "workdir": workdir}
    return agent


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(block.get("text", ""))
        return "".join(parts)
    return str(content or "")


def _messages_of(update: Any) -> list:
    if isinstance(update, dict):
        msgs = update.get("messages") or []
        return list(msgs) if isinstance(msgs, (list, tuple)) else [msgs]
    return []


def _short_args(args: dict) -> dict:
    return {k: v for k, v in (args or {}).items() if v is not None}


def thread_state(agent, thread_id: str) -> dict:
    """The last setup / script / script_path of a thread and its messages."""
    from tools.agent_tools import session_state

    snapshot = agent.get_state({"configurable": {"thread_id": thread_id}})
    messages = (snapshot.values or {}).get("messages", []) if snapshot else []
    return {**session_state(messages), "messages": messages}


def repair_thread(agent, thread_id: str, reason: str = "cancelled") -> None:
    """Answer tool calls left open by an interrupted turn, so the thread stays valid for the next one."""
    from langchain_core.messages import AIMessage, ToolMessage

    config = {"configurable": {"thread_id": thread_id}}
    messages = thread_state(agent, thread_id)["messages"]
    answered = {getattr(m, "tool_call_id", None) for m in messages if getattr(m, "type", "") == "tool"}
    last_ai = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    if last_ai is None or not last_ai.tool_calls:
        return
    missing = [tc for tc in last_ai.tool_calls if tc.get("id") not in answered]
    if missing:
        agent.update_state(config, {"messages": [
            ToolMessage(content=f"error: {reason}", tool_call_id=tc["id"], name=tc.get("name"), status="error") for tc in missing
        ]}, as_node="tools")


def run_turn(agent, thread_id: str, text: str, *, on_step: Callable[[dict], None] | None = None,
             allow_trial: bool = True, on_token: Callable[[str], None] | None = None,
             recursion_limit: int | None = None) -> TurnResult:
    """Send one user message to a thread and run the agent to its answer; streams steps (and tokens with on_token)."""
    from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
    from langgraph.errors import GraphRecursionError

    from prompts import render

    if not isinstance(text, str) or not text.strip():
        raise TunepilotError("the message is empty: ask a question such as 'Can I fine-tune Llama-3.1-8B on one RTX 4090?'")
    settings = getattr(agent, "tunepilot_settings", {}) or {}
    max_calls = int(settings.get("max_model_calls", DEFAULT_MAX_MODEL_CALLS))
    config = {
        "configurable": {"thread_id": thread_id, ALLOW_TRIAL_KEY: bool(allow_trial)},
        # every model call and tool step is a few graph steps; this is a backstop to the call limit
        "recursion_limit": recursion_limit or (6 * max_calls + 10),
    }
    modes = ["updates", "messages"] if on_token else ["updates"]
    pending: dict[str, tuple[str, dict, float]] = {}
    steps: list[dict] = []
    stopped = None
    try:
        for mode, chunk in agent.stream({"messages": [HumanMessage(content=text)]}, config, stream_mode=modes):
            if mode == "messages":
                msg, meta = chunk
                if on_token and isinstance(msg, (AIMessageChunk, AIMessage)) and (meta or {}).get("langgraph_node") == "model":
                    piece = _text(msg.content)
                    if piece:
                        on_token(piece)
                continue
            for node, update in (chunk or {}).items():
                if node.startswith(LIMIT_NODE) and _messages_of(update):
                    stopped = "limit"
                for msg in _messages_of(update):
                    if isinstance(msg, AIMessage):
                        for tc in msg.tool_calls or []:
                            pending[tc.get("id") or ""] = (tc["name"], _short_args(tc.get("args")), time.perf_counter())
                    elif isinstance(msg, ToolMessage):
                        name, args, t0 = pending.pop(msg.tool_call_id, (msg.name or "?", {}, time.perf_counter()))
                        seconds = (msg.response_metadata or {}).get("tunepilot_seconds", time.perf_counter() - t0)
                        step = {"tool": name, "args": args, "seconds": round(float(seconds), 2),
                                "status": "error" if msg.status == "error" or _text(msg.content).startswith("error:") else "ok"}
                        if step["status"] == "error":
                            step["error"] = _text(msg.content)[:300]
                        steps.append(step)
                        if on_step:
                            on_step(step)
    except GraphRecursionError:
        stopped = "limit"
        repair_thread(agent, thread_id, "stopped: too many steps")
    except BaseException as e:
        try:
            repair_thread(agent, thread_id, "cancelled" if isinstance(e, KeyboardInterrupt) else "failed")
        except Exception:  # noqa: BLE001 - never hide the original fault behind a repair failure
            pass
        if isinstance(e, (KeyboardInterrupt, TunepilotError)):
            raise
        message = agent_error_message(e, strict=True)
        if message:
            raise TunepilotError(message) from e
        if pending and isinstance(e, Exception):
            try:  # say which tool broke, for the one line at the edge
                e.tunepilot_tool = ", ".join(sorted({name for name, _a, _t in pending.values()}))
            except AttributeError:
                pass
        raise
    state = thread_state(agent, thread_id)
    answer = ""
    for msg in reversed(state["messages"]):
        if isinstance(msg, AIMessage):
            if not msg.tool_calls:
                answer = _text(msg.content).strip()
            break
    if stopped == "limit":
        answer = render("limit_reached", calls=max_calls)
        if not state["messages"] or not isinstance(state["messages"][-1], AIMessage):
            # keep the thread ending with an assistant message
            agent.update_state({"configurable": {"thread_id": thread_id}}, {"messages": [AIMessage(content=answer)]}, as_node="model")
    return TurnResult(answer=answer, setup=state["setup"], script=state["script"], script_path=state["script_path"],
                      tool_calls=steps, stopped=stopped, memory=state["memory"])


def agent_error_message(exc: BaseException, *, strict: bool = False) -> str:
    """One line for a person from an agent fault: chat-model connection/auth errors, TunepilotErrors, anything else."""
    from agent.llm import llm_error_message

    if isinstance(exc, TunepilotError):
        return str(exc)
    message = llm_error_message(exc)
    if message or strict:
        return message
    text = " ".join(str(exc).split())[:200]
    where = f" in tool {exc.tunepilot_tool}" if getattr(exc, "tunepilot_tool", None) else ""
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"the agent failed{where}: {what} (a bug: please report it; TUNEPILOT_DEBUG=1 shows the traceback)"
