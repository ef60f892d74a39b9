"""The tunepilot agent: LangChain's `create_agent` loop over the tools in `tools.agent_tools.TOOLS`.

Contract used by the chat CLI, `tunepilot ask` and the Slack bot:

- `build_agent(chat_model, *, checkpointer=None, max_model_calls=12, workdir=None, context_tokens=None)` -> the
  compiled agent. Conversations are threads of its checkpointer (in memory by default;
  pass a `SqliteSaver` to persist them).
- `run_turn(agent, thread_id, text, *, on_step=None, allow_trial=True, confirm=None) -> TurnResult`: one
  user message, streamed; `on_step({"tool", "args", "seconds", "status"})` per tool call;
  `confirm(request) -> bool | None` is asked before a tool that needs consent (`run_trial`);
  None (or no `confirm`) pauses the turn (`stopped="confirm"`) until `resume_turn`.
- `agent_error_message(exc) -> str`: one line for a chat-model or tool fault.

Middleware (issue 13): HumanInTheLoopMiddleware pauses before `run_trial`; the tool-context
middleware runs the tool calls of one model message in order (each sees the setup the
previous produced), answers a repeated identical call with its earlier result, enforces a
per-tool call limit per turn and marks failed results as errors; ToolErrorMiddleware turns
fixable faults into "error:" observations; ModelCallLimitMiddleware bounds a turn (the answer
then lists what the tools found); a model-call wrapper trims the history to the context.

Session state lives in the conversation itself: each tool returns its setup / script as
the ToolMessage *artifact* (the model never sees it, the checkpointer keeps it), and
`tools.agent_tools.session_state(messages)` reads the latest ones back. So a thread's
setup survives restarts with a persistent checkpointer, and two threads never mix.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

from prompts import render
from tools.schemas import TrainingSetup, TunepilotError, format_validation_error

ALLOW_TRIAL_KEY = "tunepilot_allow_trial"
LIMIT_NODE = "ModelCallLimitMiddleware"
ANSWER_CALL_TAG = "tunepilot_answer_call"
DEFAULT_MAX_MODEL_CALLS = 12
DEFAULT_CONTEXT_TOKENS = 32768  # when neither the server nor TUNEPILOT_LLM_CONTEXT says


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
    stopped: Optional[str] = None  # None, or why the turn ended early: "limit", "loop" (repeated calls), "confirm" (waiting for a yes)
    memory: Optional[dict] = None  # the memory estimate (per-GPU GiB, fits, headroom) of `setup`, when a tool made one
    summary: Optional[str] = None  # the engine's ready-to-quote summary of this turn's last setup tool
    pending: Optional[list[dict]] = None  # tool calls waiting for the person's yes (stopped == "confirm")
    answer_source: Optional[str] = None  # "model", or "engine" when the model's reply was replaced (agent/answer.py)

    @property
    def finished(self) -> bool:
        return self.stopped is None

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "setup": self.setup.model_dump(mode="json") if self.setup else None,
            "script_path": self.script_path,
            "tool_calls": self.tool_calls,
            "stopped": self.stopped,
            "memory": self.memory,
            "summary": self.summary,
            "pending_confirmation": self.pending,
            "answer_source": self.answer_source,
        }


def tool_error_observation(exc: Exception, request: Any) -> str | None:
    """Errors the model can fix become an 'error: ...' observation; bugs return None and stop the run."""
    from pydantic import ValidationError

    from tools.agent_tools import without_examples

    if isinstance(exc, ValidationError):
        return "error: " + format_validation_error(exc)
    if isinstance(exc, TunepilotError):
        return f"error: {without_examples(str(exc))}"  # a weak model copies examples into its next call
    return None


class _Batch:
    """The tool calls of one model message: they run in order, each seeing what the earlier ones produced."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.done: dict[str, Any] = {}  # tool_call_id -> ToolMessage (or None when it produced none)


_BATCHES: dict[str, _Batch] = {}
_BATCHES_LOCK = threading.Lock()


def _batch_for(key: str) -> _Batch:
    with _BATCHES_LOCK:
        batch = _BATCHES.get(key)
        if batch is None:
            batch = _BATCHES[key] = _Batch()
            while len(_BATCHES) > 256:  # old messages' batches: nobody waits on them any more
                _BATCHES.pop(next(iter(_BATCHES)))
        return batch


def _turn_messages(messages: list) -> list:
    """The messages of the current user turn (after the last HumanMessage)."""
    for i in range(len(messages) - 1, -1, -1):
        if getattr(messages[i], "type", "") == "human":
            return list(messages[i + 1:])
    return list(messages)


def _person_text(messages: list) -> str:
    """The person's message of the current turn."""
    for m in reversed(messages):
        if getattr(m, "type", "") == "human":
            return _text(m.content)
    return ""


@lru_cache(maxsize=64)
def person_request(text: str):
    """What the person's message states (agent.request.read_request), read once per message."""
    from agent.request import read_request

    return read_request(text)


def _fingerprint(name: str, args: dict, base: str) -> str:
    """Same tool, same arguments, same setup to start from: the same result (the engine is deterministic)."""
    import hashlib
    import json as _json

    text = _json.dumps({"n": name, "a": args or {}, "s": base}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _setup_key(messages: list) -> str:
    from tools.agent_tools import session_state, setup_id_of

    setup = session_state(messages)["setup"]
    return setup_id_of(setup) if setup is not None else "-"


def _context_middleware(workdir: Path, allow_trial: bool, tool_limits: dict[str, int]):
    from langchain.agents.middleware import wrap_tool_call
    from langchain_core.messages import AIMessage, ToolMessage

    from agent.answer import answer_ready, needless_in_batch
    from agent.request import SETUP_TOOLS, correct_args
    from tools.agent_tools import ToolContext, tool_context

    SKIPPABLE = ("lookup_model", "web_search", "run_trial", "make_peft_config", *SETUP_TOOLS)

    def _needless(call, before, turn, seen) -> bool:
        req = person_request(_person_text(seen))
        return answer_ready(turn, req) and needless_in_batch(call, before, turn, req)

    @wrap_tool_call
    def tunepilot_tool_context(request, handler):
        """Order the calls of one message, refuse repeats and over-limit calls, give each call its context; time it."""
        runtime = getattr(request, "runtime", None)
        config = (getattr(runtime, "config", None) or {}) if runtime is not None else {}
        conf = config.get("configurable", {}) if isinstance(config, dict) else {}
        state = request.state
        messages = list(state.get("messages", []) if isinstance(state, dict) else getattr(state, "messages", []))
        call = request.tool_call
        name, call_id = call.get("name", "tool"), call.get("id") or ""
        # the model message that made this call, and the calls before it that still have to run
        owner = next((m for m in reversed(messages) if isinstance(m, AIMessage)
                      and any(tc.get("id") == call_id for tc in m.tool_calls or [])), None)
        answered = {getattr(m, "tool_call_id", None) for m in messages if getattr(m, "type", "") == "tool"}
        earlier: list[str] = []
        if owner is not None:
            for tc in owner.tool_calls:
                if tc.get("id") == call_id:
                    break
                if tc.get("id") not in answered:
                    earlier.append(tc.get("id"))
        batch = _batch_for(f"{conf.get('thread_id', 'default')}:{getattr(owner, 'id', None) or id(owner)}")
        with batch.cond:
            batch.cond.wait_for(lambda: all(e in batch.done for e in earlier), timeout=7200)
            before = [batch.done[e] for e in earlier if batch.done.get(e) is not None]
        seen = messages + before
        result = None
        try:
            turn = _turn_messages(seen)
            args = call.get("args") or {}
            fixes: list[str] = []
            if name in SETUP_TOOLS:  # the person's own figures where the call lost or changed them
                first = not any(isinstance(m, ToolMessage) and m.name in SETUP_TOOLS and m.status != "error" for m in turn)
                args, fixes = correct_args(name, args, person_request(_person_text(seen)), first=first)
                if fixes:
                    request = request.override(tool_call={**call, "args": args})
            fingerprint = _fingerprint(name, args, _setup_key(seen))
            # a call repeats an earlier one when it starts from the same setup, or from the setup that one
            # produced (setting the same fields again gives the same setup: the same result)
            repeat = next((m for m in turn if isinstance(m, ToolMessage) and fingerprint in (
                (m.response_metadata or {}).get("tunepilot_fingerprint"), (m.response_metadata or {}).get("tunepilot_fingerprint_after"))), None)
            used = sum(1 for m in turn if isinstance(m, ToolMessage) and m.name == name)
            limit = tool_limits.get(name, tool_limits.get("*", 0))
            if repeat is not None:
                earlier_failed = repeat.status == "error" or _text(repeat.content).startswith("error:")
                text = (render("repeated_failed_call", tool=name, error=_text(repeat.content)) if earlier_failed
                        else render("repeated_call", tool=name) + "\n" + _text(repeat.content))
                result = ToolMessage(
                    content=text, tool_call_id=call_id, name=name, artifact=repeat.artifact, status=repeat.status,
                    response_metadata={"tunepilot_seconds": 0.0, "tunepilot_repeat": True,
                                       "tunepilot_fingerprint": fingerprint,
                                       "tunepilot_fingerprint_after": (repeat.response_metadata or {}).get("tunepilot_fingerprint_after")})
            elif before and name in SKIPPABLE and _needless(call, before, turn, seen):
                result = ToolMessage(content="skipped: the calls before it in this message already answer the question",
                                     tool_call_id=call_id, name=name,
                                     response_metadata={"tunepilot_seconds": 0.0, "tunepilot_skipped": True})
            elif limit and used >= limit:
                result = ToolMessage(content=render("tool_limit", tool=name, calls=used), tool_call_id=call_id,
                                     name=name, status="error", response_metadata={"tunepilot_seconds": 0.0})
            else:
                ctx = ToolContext(
                    workdir=workdir,
                    thread_id=str(conf.get("thread_id", "default")),
                    allow_trial=bool(allow_trial and conf.get(ALLOW_TRIAL_KEY, True)),
                    messages=seen,
                )
                t0 = time.perf_counter()
                with tool_context(ctx):
                    result = handler(request)
                if isinstance(result, ToolMessage) and fixes:
                    result.content = _with_note(_text(result.content), fixes)
                    result.response_metadata = {**(result.response_metadata or {}), "tunepilot_args": args,
                                                "tunepilot_corrected": fixes}
                if isinstance(result, ToolMessage):
                    result.response_metadata = {**(result.response_metadata or {}), "tunepilot_fingerprint": fingerprint,
                                                "tunepilot_fingerprint_after": _fingerprint(name, args, _setup_key(seen + [result])),
                                                "tunepilot_seconds": round(time.perf_counter() - t0, 3)}
                    if result.status == "error" and isinstance(result.content, str) and not result.content.startswith("error:"):
                        result.content = _argument_error(result.content, name)
                    if isinstance(result.artifact, dict) and result.artifact.get("failed"):
                        result.status = "error"  # a failed trial / unavailable search is never listed as ok
            return result
        finally:
            with batch.cond:
                batch.done[call_id] = result if isinstance(result, ToolMessage) else None
                batch.cond.notify_all()

    return tunepilot_tool_context


def _with_note(content: str, fixes: list[str]) -> str:
    """A tool result with the arguments tunepilot put back from the person's message (a key of its JSON when it is JSON)."""
    import json as _json

    try:
        obj = _json.loads(content)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return _json.dumps({**obj, "from_your_message": fixes}, separators=(", ", ": "), ensure_ascii=False)
    return content + "\nnote: " + "; ".join(fixes)


def _argument_error(text: str, tool: str) -> str:
    """ToolNode's argument-validation message, as one 'error:' line naming each field with its full reason."""
    if "with error:" not in text:  # e.g. a tool name the model made up
        text = " ".join(text.split())
        return "error: " + (text[len("Error: "):] if text.startswith("Error: ") else text)
    body = text.split("with error:", 1)[-1]
    body = body.replace("Please fix the error and try again.", "")
    problems = [" ".join(line.split()) for line in body.splitlines() if line.strip()]
    return f"error: {tool} arguments: {'; '.join(problems) or ' '.join(text.split())}. Fix them and call {tool} again."


def _answer_middleware(extra_rounds: int = 1):
    """Once the tools have answered, the model only writes the answer; a poor answer gives way to the engine's
    (agent/answer.py). And when the model answers a question naming a model and GPUs without asking the engine,
    tunepilot asks it itself (plan_training) so the answer carries the engine's verdict and numbers."""
    import uuid

    from langchain.agents.middleware import ModelResponse, wrap_model_call
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from agent.answer import (answer_prompt, answer_system, answer_ready, engine_answer, engine_results, redundant_call,
                              reply_problems, rounds_after_ready)

    def parts(response) -> list:
        return list(response.result) if isinstance(response, ModelResponse) else [response]

    def rebuilt(response, message):
        if isinstance(response, ModelResponse):
            msgs = list(response.result)
            idx = max(i for i, m in enumerate(msgs) if isinstance(m, AIMessage))
            msgs[idx] = message
            return ModelResponse(result=msgs, structured_response=response.structured_response)
        return message

    def offered(request, name: str) -> bool:
        return any((t.get("name") if isinstance(t, dict) else getattr(t, "name", "")) == name for t in request.tools or [])

    def checked(response, ai, turn, req, reply: str, problems: list[str]):
        meta = dict(ai.response_metadata or {})
        if problems:
            engine = engine_answer(turn, req)
            if engine:
                meta |= {"tunepilot_answer": "engine", "tunepilot_answer_why": problems, "tunepilot_model_text": reply[:4000]}
                return rebuilt(response, AIMessage(content=engine, id=ai.id, response_metadata=meta))
        meta["tunepilot_answer"] = "model"
        return rebuilt(response, AIMessage(content=reply, id=ai.id, response_metadata=meta))

    def answer_now(request, handler, messages, turn, req):
        # tagged: its tokens are not streamed to the person before the reply is checked (_drive skips them)
        model = request.model.with_config(tags=[ANSWER_CALL_TAG])
        response = handler(request.override(model=model, tools=[], tool_choice=None,
                                            system_message=SystemMessage(content=answer_system(req)),
                                            messages=[HumanMessage(content=answer_prompt(turn, req))]))
        ai = next((m for m in reversed(parts(response)) if isinstance(m, AIMessage)), None)
        if ai is None:
            return response
        reply = _text(ai.content).strip()
        asked_tool = ai.tool_calls or "tunepilot_text_tool_calls" in (ai.response_metadata or {})
        problems = ["the model asked for another tool"] if asked_tool else reply_problems(reply, turn, req)
        return checked(response, ai, turn, req, reply, problems)

    @wrap_model_call
    def tunepilot_answer_phase(request, handler):
        """Answer from the tool results once they hold the answer; route to plan_training when the model did not."""
        messages = list(request.messages)
        turn = _turn_messages(messages)
        req = person_request(_person_text(messages))
        ready = bool(request.tools) and answer_ready(turn, req)
        if ready and rounds_after_ready(turn, req) >= extra_rounds:  # its extra round is spent: answer now
            return answer_now(request, handler, messages, turn, req)
        response = handler(request)
        ai = next((m for m in reversed(parts(response)) if isinstance(m, AIMessage)), None)
        if ai is None:
            return response
        if ready:
            if ai.tool_calls:
                keep = [tc for tc in ai.tool_calls if not redundant_call(tc, turn, req)]
                if keep:
                    return rebuilt(response, ai.model_copy(update={"tool_calls": keep}) if len(keep) != len(ai.tool_calls) else ai)
                return answer_now(request, handler, messages, turn, req)  # every call would repeat what the tools said
            reply = _text(ai.content).strip()
            return checked(response, ai, turn, req, reply, reply_problems(reply, turn, req))
        routed_before = any(getattr(m, "type", "") == "tool" and m.name == "plan_training" for m in turn)
        if (not ai.tool_calls and req.model and req.hardware and offered(request, "plan_training")
                and not engine_results(turn) and not routed_before):
            args = {"model": req.model, "hardware": req.hardware}
            if req.seq_len:
                args["seq_len"] = req.seq_len
            if req.examples:
                args["dataset_examples"] = req.examples
            if req.method:
                args["method"] = req.method
            call = {"name": "plan_training", "args": args, "id": f"call_route_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
            meta = {**(ai.response_metadata or {}), "tunepilot_routed": "plan_training",
                    "tunepilot_model_text": _text(ai.content)[:4000]}
            return rebuilt(response, AIMessage(content="", tool_calls=[call], id=ai.id, response_metadata=meta))
        return response

    return tunepilot_answer_phase


LOOP_NODE = "TunepilotLoopGuard"


def _loop_guard():
    """End the turn when the model asks again for calls it already made (three times, or once more after a failure)."""
    from langchain.agents.middleware import after_model
    from langchain_core.messages import AIMessage, ToolMessage

    @after_model(can_jump_to=["end"], name=LOOP_NODE)
    def tunepilot_loop_guard(state, runtime):
        messages = list(state.get("messages", []) if isinstance(state, dict) else getattr(state, "messages", []))
        if not messages or not isinstance(messages[-1], AIMessage) or not messages[-1].tool_calls:
            return None
        last = messages[-1]
        turn = _turn_messages(messages[:-1])
        base = _setup_key(messages[:-1])
        done = [m for m in turn if isinstance(m, ToolMessage)]

        def same_calls(tc) -> list:
            fp = _fingerprint(tc.get("name", ""), tc.get("args") or {}, base)
            return [m for m in done if fp in ((m.response_metadata or {}).get("tunepilot_fingerprint"),
                                              (m.response_metadata or {}).get("tunepilot_fingerprint_after"))]

        def failed(m) -> bool:
            return m.status == "error" or _text(m.content).startswith("error:")

        def looping(tc) -> bool:
            prev = same_calls(tc)
            return len(prev) >= 2 or (len(prev) >= 1 and any(failed(m) for m in prev))

        if not all(looping(tc) for tc in last.tool_calls):
            return None
        errors = [_text(m.content) for tc in last.tool_calls for m in same_calls(tc) if failed(m)]
        summaries = [m.artifact["summary"] for m in turn if isinstance(m, ToolMessage) and isinstance(m.artifact, dict)
                     and m.artifact.get("summary") and m.status != "error"]
        findings = "\n".join(f"- {x}" for x in dict.fromkeys(summaries))
        error = errors[-1].removeprefix("error: ")[:300] if errors else ""
        skipped = [ToolMessage(content="error: not run: the same call was already made in this answer", tool_call_id=tc["id"],
                               name=tc.get("name"), status="error") for tc in last.tool_calls]
        final = AIMessage(content=render("loop_stopped", error=error, findings=findings),
                          response_metadata={"tunepilot_stopped": "loop"})
        return {"jump_to": "end", "messages": [*skipped, final]}

    return tunepilot_loop_guard


def _trial_description(tool_call, state, runtime) -> str:
    """What the person is asked before a trial starts."""
    from tools.agent_tools import find_setup, session_state

    args = tool_call.get("args") or {}
    messages = state.get("messages", []) if isinstance(state, dict) else []
    setup = None
    if args.get("setup_id"):
        found = find_setup(messages, str(args["setup_id"]))
        setup = found[0] if found else None
    setup = setup or session_state(messages)["setup"]
    what = setup.short() if setup is not None else ""
    model = args.get("model") or (setup.model_id if setup is not None else "the model")
    return render("trial_confirm", model=model, setup=what, steps=args.get("steps", 3))


def _trial_gate(request) -> bool:
    """Interrupt for the person's yes only where trials are permitted at all (elsewhere the tool says no itself)."""
    runtime = getattr(request, "runtime", None)
    config = (getattr(runtime, "config", None) or {}) if runtime is not None else {}
    conf = config.get("configurable", {}) if isinstance(config, dict) else {}
    return bool(conf.get(ALLOW_TRIAL_KEY, True))


def _trim_middleware(budget: Callable[[], int]):
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def tunepilot_trim_history(request, handler):
        """Drop the oldest whole turns (and shorten old tool results) so the thread fits the model's context."""
        messages = trim_messages_to(list(request.messages), budget())
        if len(messages) != len(request.messages) or any(a is not b for a, b in zip(messages, request.messages)):
            request = request.override(messages=messages)
        return handler(request)

    return tunepilot_trim_history


def message_tokens(messages) -> int:
    """Approximate tokens of messages: text + tool-call arguments (see agent/prompt_budget.py)."""
    from agent.prompt_budget import approx_tokens

    total = 0
    for m in messages:
        total += approx_tokens(_text(getattr(m, "content", ""))) + 4
        for tc in getattr(m, "tool_calls", None) or []:
            total += approx_tokens(str(tc.get("args"))) + 8
    return total


def trim_messages_to(messages: list, budget: int) -> list:
    """`messages` within `budget` tokens: oldest whole turns dropped first (a note says so), then old tool results cut."""
    from langchain_core.messages import HumanMessage, ToolMessage

    if budget <= 0 or message_tokens(messages) <= budget:
        return messages
    starts = [i for i, m in enumerate(messages) if getattr(m, "type", "") == "human"]
    kept = messages
    dropped = 0
    for start in starts[1:]:
        if message_tokens(kept) <= budget:
            break
        kept = messages[start:]
        dropped = start
    if dropped:
        from tools.agent_tools import session_state

        state = session_state(messages[:dropped])
        note = render("history_trimmed", setup=state["setup"].short() if state["setup"] is not None else "",
                      summary=state.get("summary") or "")
        kept = [HumanMessage(content=note)] + list(kept)
    if message_tokens(kept) > budget:  # one long turn: shorten the older tool results, keep the latest whole
        last_tool = max((i for i, m in enumerate(kept) if isinstance(m, ToolMessage)), default=-1)
        shortened = []
        for i, m in enumerate(kept):
            text = _text(m.content) if isinstance(m, ToolMessage) else ""
            if isinstance(m, ToolMessage) and i != last_tool and len(text) > 400:
                m = m.model_copy(update={"content": text[:400] + " ... (cut to fit the context)"})
            shortened.append(m)
        kept = shortened
    return kept


DEFAULT_TOOL_LIMITS = {"*": 4, "estimate_memory": 6, "run_trial": 1, "plan_training": 3, "web_search": 2}


def build_agent(chat_model, *, checkpointer=None, max_model_calls: int = DEFAULT_MAX_MODEL_CALLS,
                workdir: str | Path | None = None, allow_trial: bool = True, tools: list | None = None,
                context_tokens: int | None = None, tool_limits: dict[str, int] | None = None, answer_phase: bool = True,
                extra_rounds: int | None = None):
    """The compiled tunepilot agent for a LangChain chat model (threads kept by `checkpointer`, in memory by default).

    `run_trial` pauses for the person's yes (HumanInTheLoopMiddleware; `run_turn(confirm=...)`);
    repeated identical calls get their earlier result back; each tool has a per-turn call limit;
    the history is trimmed to `context_tokens` (the server's context, when known). With `answer_phase`
    (the default) the model answers once the tool results hold the answer (`extra_rounds` more tool rounds
    allowed first: 1, or 0 for a local server, where each call costs a minute and the measured extra calls of a
    1.5B model only repeated the plan),
    a reply with numbers no tool produced gives way to the engine's answer, and a question naming a model
    and GPUs that the model answered without a tool is routed to plan_training (agent/answer.py);
    answer_phase=False leaves only the guards (used to test them alone)."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import HumanInTheLoopMiddleware, ModelCallLimitMiddleware, ToolErrorMiddleware
    from langgraph.checkpoint.memory import InMemorySaver

    from agent.prompt_budget import ANSWER_RESERVE_TOKENS, first_prompt_tokens
    from agent.text_tool_calls import text_tool_calls_middleware
    from tools.agent_tools import CONSENT_TOOLS, TOOLS

    if max_model_calls < 1:
        raise TunepilotError(f"max_model_calls must be at least 1, got {max_model_calls}")
    workdir = Path(workdir) if workdir else home_dir() / "work"
    tool_list = list(tools if tools is not None else TOOLS)
    system_prompt = render("system", today=date.today().isoformat())
    context = int(context_tokens or os.environ.get("TUNEPILOT_LLM_CONTEXT") or DEFAULT_CONTEXT_TOKENS)
    if extra_rounds is None:
        from agent.answer import EXTRA_ROUNDS

        settings = getattr(chat_model, "tunepilot_settings", None)
        extra_rounds = 0 if getattr(settings, "local", False) else EXTRA_ROUNDS
    extra = max(0, int(extra_rounds))
    fixed = first_prompt_tokens(system_prompt, tool_list)
    history_budget = max(512, context - fixed - ANSWER_RESERVE_TOKENS)
    consent = {name: {"allowed_decisions": ["approve", "reject"], "description": _trial_description, "when": _trial_gate}
               for name in CONSENT_TOOLS if any(getattr(t, "name", "") == name for t in tool_list)}
    middleware = [
        _context_middleware(workdir, allow_trial, {**DEFAULT_TOOL_LIMITS, **(tool_limits or {})}),
        *([_answer_middleware(extra)] if answer_phase else []),  # tools answered: the model writes the answer; routing fallback
        text_tool_calls_middleware(),  # a tool call the model wrote as text becomes a real one
        ToolErrorMiddleware(on_error=tool_error_observation),
        ModelCallLimitMiddleware(run_limit=max_model_calls, exit_behavior="end"),
        _trim_middleware(lambda: history_budget),
        _loop_guard(),
    ]
    if consent:
        middleware.insert(0, HumanInTheLoopMiddleware(interrupt_on=consent, description_prefix="Confirm"))
    agent = create_agent(
        chat_model,
        tools=tool_list,
        system_prompt=system_prompt,
        middleware=middleware,
        checkpointer=checkpointer if checkpointer is not None else InMemorySaver(),
    )
    agent.tunepilot_settings = {"max_model_calls": max_model_calls, "workdir": workdir, "context_tokens": context,
                                "prompt_tokens": fixed, "history_budget": history_budget}
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


Confirm = Callable[[dict], Optional[bool]]


def _pending_requests(agent, config) -> list[dict]:
    """The tool calls waiting for the person's yes in this thread (HumanInTheLoopMiddleware's interrupt)."""
    snapshot = agent.get_state(config)
    out = []
    for intr in getattr(snapshot, "interrupts", ()) or ():
        value = getattr(intr, "value", None) or {}
        for req in value.get("action_requests", []) if isinstance(value, dict) else []:
            out.append({"tool": req.get("name"), "args": _short_args(req.get("args") or {}),
                        "description": req.get("description", "")})
    return out


def pending_confirmations(agent, thread_id: str) -> list[dict]:
    """What in this thread waits for a person's yes (kept by the checkpointer: it survives a restart)."""
    return _pending_requests(agent, {"configurable": {"thread_id": thread_id, ALLOW_TRIAL_KEY: True}})


def _decisions(requests: list[dict], answers: list[Optional[bool]], reason: str = "", hint: str = "") -> dict:
    decisions = []
    for req, yes in zip(requests, answers):
        if yes:
            decisions.append({"type": "approve"})
        else:
            decisions.append({"type": "reject", "message": render("trial_rejected", reason=reason, hint=hint)})
    return {"decisions": decisions}


def run_turn(agent, thread_id: str, text: str, *, on_step: Callable[[dict], None] | None = None,
             allow_trial: bool = True, on_token: Callable[[str], None] | None = None,
             recursion_limit: int | None = None, confirm: Confirm | None = None,
             decline_reason: str = "", decline_hint: str = "") -> TurnResult:
    """Send one user message to a thread and run the agent to its answer; streams steps (and tokens with on_token).

    A tool that needs consent (`run_trial`) pauses the turn: `confirm(request)` is asked
    ({"tool", "args", "description"}) and True runs it, False refuses it (the model is told
    the person said no). With no `confirm`, or when it returns None, the turn ends with
    `stopped="confirm"` and `pending` set; `resume_turn` continues it later (Slack buttons).
    """
    from langchain_core.messages import HumanMessage

    if not isinstance(text, str) or not text.strip():
        raise TunepilotError("the message is empty: ask a question such as 'Can I fine-tune MODEL on my GPU?'")
    _refuse_waiting(agent, thread_id)
    return _drive(agent, thread_id, {"messages": [HumanMessage(content=text)]}, on_step=on_step, allow_trial=allow_trial,
                  on_token=on_token, recursion_limit=recursion_limit, confirm=confirm,
                  decline_reason=decline_reason, decline_hint=decline_hint)


def _refuse_waiting(agent, thread_id: str) -> None:
    """A new message while a step still waits for a yes (a restart, a new question): that step is refused, not run."""
    from langgraph.types import Command

    # the gate must answer as it did when it paused (True), or the middleware skips the refusal and runs the tool
    config = {"configurable": {"thread_id": thread_id, ALLOW_TRIAL_KEY: True}}
    requests = _pending_requests(agent, config)
    if not requests:
        return
    for _ in agent.stream(Command(resume=_decisions(requests, [False] * len(requests), "the person asked something else")),
                          config, stream_mode="updates", interrupt_before=["model"]):
        pass


def resume_turn(agent, thread_id: str, approved: bool, *, on_step: Callable[[dict], None] | None = None,
                allow_trial: bool = True, on_token: Callable[[str], None] | None = None,
                confirm: Confirm | None = None, decline_reason: str = "", decline_hint: str = "") -> TurnResult:
    """Answer a turn that stopped for the person's yes (`stopped == "confirm"`): run (True) or refuse (False) the tool."""
    from langgraph.types import Command

    config = {"configurable": {"thread_id": thread_id, ALLOW_TRIAL_KEY: bool(allow_trial)}}
    requests = _pending_requests(agent, config)
    if not requests:
        raise TunepilotError("nothing is waiting for a confirmation in this conversation")
    resume = Command(resume=_decisions(requests, [approved] * len(requests), decline_reason, decline_hint))
    return _drive(agent, thread_id, resume, on_step=on_step, allow_trial=allow_trial, on_token=on_token,
                  confirm=confirm, decline_reason=decline_reason, decline_hint=decline_hint)


def _drive(agent, thread_id: str, first_input: Any, *, on_step, allow_trial, on_token, recursion_limit=None,
           confirm: Confirm | None = None, decline_reason: str = "", decline_hint: str = "") -> TurnResult:
    from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
    from langgraph.errors import GraphRecursionError
    from langgraph.types import Command

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
    summaries: list[str] = []
    stopped = None
    waiting: list[dict] = []
    stream_input = first_input
    try:
        while True:
            for mode, chunk in agent.stream(stream_input, config, stream_mode=modes):
                if mode == "messages":
                    msg, meta = chunk
                    if (on_token and isinstance(msg, (AIMessageChunk, AIMessage)) and (meta or {}).get("langgraph_node") == "model"
                            and ANSWER_CALL_TAG not in ((meta or {}).get("tags") or [])):
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
                            meta = msg.response_metadata or {}
                            model_args = None
                            if isinstance(meta.get("tunepilot_args"), dict):  # what ran: the person's figures put back
                                model_args, args = args, _short_args(meta["tunepilot_args"])
                            seconds = meta.get("tunepilot_seconds", time.perf_counter() - t0)
                            failed = msg.status == "error" or _text(msg.content).startswith("error:")
                            step = {"tool": name, "args": args, "seconds": round(float(seconds), 2),
                                    "status": "error" if failed else "skipped" if meta.get("tunepilot_skipped") else "ok"}
                            if meta.get("tunepilot_repeat"):
                                step["repeat"] = True
                            if meta.get("tunepilot_corrected"):
                                step["corrected"] = list(meta["tunepilot_corrected"])
                                step["model_args"] = model_args  # what the model asked for
                            if failed:
                                step["error"] = _text(msg.content)[:300]
                            art = msg.artifact if isinstance(msg.artifact, dict) else {}
                            if art.get("summary") and not failed:
                                summaries.append(art["summary"])
                            steps.append(step)
                            if on_step:
                                on_step(step)
            requests = _pending_requests(agent, config)
            if not requests:
                break
            answers = [confirm(r) if confirm else None for r in requests]
            if any(a is None for a in answers):
                stopped, waiting = "confirm", requests
                break
            stream_input = Command(resume=_decisions(requests, answers, decline_reason, decline_hint))
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
    summary = summaries[-1] if summaries else None
    last_ai = next((m for m in reversed(state["messages"]) if isinstance(m, AIMessage)), None)
    if stopped is None and last_ai is not None and (last_ai.response_metadata or {}).get("tunepilot_stopped") == "loop":
        stopped = "loop"
    if stopped == "limit":
        findings = "\n".join(f"- {s}" for s in dict.fromkeys(summaries))
        answer = render("limit_reached", calls=max_calls, findings=findings)
        if not state["messages"] or not isinstance(state["messages"][-1], AIMessage) or state["messages"][-1].tool_calls:
            # keep the thread ending with an assistant message
            agent.update_state({"configurable": {"thread_id": thread_id}}, {"messages": [AIMessage(content=answer)]}, as_node="model")
    elif stopped == "confirm":
        answer = answer or "\n".join(r.get("description", "") for r in waiting)
    source = ((last_ai.response_metadata or {}).get("tunepilot_answer") if last_ai is not None and answer else None) or (
        "model" if answer and stopped is None else None)
    return TurnResult(answer=answer, answer_source=source, setup=state["setup"], script=state["script"], script_path=state["script_path"],
                      tool_calls=steps, stopped=stopped, memory=state["memory"], summary=summary,
                      pending=waiting or None)


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
