"""The interactive `tunepilot chat` REPL and the one-shot `tunepilot ask`.

Front end only: the agent (agent/core.py) does the work; this module reads lines, streams
the answer, shows each tool call as one compact step and handles slash commands.
Conversations persist in `$TUNEPILOT_HOME/chat.sqlite` (a LangGraph SqliteSaver) and the
last thread id in `$TUNEPILOT_HOME/chat_thread`, so `--resume` continues it. Line editing
and history use prompt_toolkit on a terminal; piped input falls back to plain `input()`.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.markup import escape

from tools.schemas import TunepilotError

HELP = """\
Ask in plain words (English or Korean), e.g. "Can I fine-tune Llama-3.1-8B on one RTX 4090?"
  /setup        show the current training setup as YAML
  /save PATH    write the generated train.py (renders one from the current setup if needed)
  /plot [FILE]  draw the current setup's memory chart (default memory.png; .png or .svg)
  /model SPEC   switch the chat model, e.g. /model openai:gpt-4o-mini
  /reset        start a new conversation
  /help         this help
  /quit         leave (Ctrl-D works too; Ctrl-C cancels the current answer)"""


def _fmt_value(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def format_step(step: dict) -> str:
    """One line for a tool call: name, key arguments, duration, status."""
    args = ", ".join(f"{k}={_fmt_value(v)}" for k, v in list((step.get("args") or {}).items())[:5])
    mark = "[green]ok[/]" if step.get("status") == "ok" else "[red]error[/]"
    line = f"  [dim]→[/] [cyan]{escape(step['tool'])}[/]([dim]{escape(args)}[/]) {step.get('seconds', 0):.1f}s {mark}"
    if step.get("status") != "ok" and step.get("error"):
        line += f" [dim]{escape(step['error'][:120])}[/]"
    return line


SETUP_TOOLS = ("plan_training", "estimate_memory", "write_training_script", "make_peft_config", "run_trial")


def engine_block(result) -> Optional[str]:
    """The engine's own verdict and numbers for this turn, shown under the model's words (None when no tool made one).

    A weak model may paraphrase badly or not at all; this block is what the person can trust."""
    summary = getattr(result, "summary", None)
    answer = getattr(result, "answer", "") or ""
    if not summary:
        return unbacked_numbers_note(result)
    if summary in answer:
        return None
    return f"tunepilot engine: {summary}"


_FIGURE = re.compile(r"\d+(?:[.,]\d+)?\s*(?:GiB|GB|MB|hours?|h\b|시간|tokens/s|%)", re.IGNORECASE)


def unbacked_numbers_note(result) -> Optional[str]:
    """A warning when an answer quotes memory/time figures but no tunepilot tool ran for it (a model's own guess)."""
    answer = getattr(result, "answer", "") or ""
    if getattr(result, "tool_calls", None) or getattr(result, "stopped", None) or not _FIGURE.search(answer):
        return None
    if getattr(result, "setup", None) is not None:  # a follow-up may quote what the tools said earlier in the thread
        return None
    return ("tunepilot engine: no tool ran for this answer, so its figures are the model's own, not tunepilot's; "
            "ask again naming the model and GPU, or run `tunepilot plan MODEL --gpu GPU`")


def _close_http(model) -> None:
    """Shut down this process's connections to the chat model's server, so a read blocked in a worker
    thread ends at once (closing a pooled socket from another thread does not wake the reader)."""
    import gc
    import socket
    import urllib.parse

    base = getattr(model, "tunepilot_base_url", None) or str(getattr(model, "openai_api_base", "") or "")
    parts = urllib.parse.urlsplit(base) if base else None
    port = (parts.port or (443 if parts.scheme == "https" else 80)) if parts else 443
    for obj in gc.get_objects():
        if not isinstance(obj, socket.socket) or obj.fileno() < 0:
            continue
        try:
            peer = obj.getpeername()
        except OSError:
            continue
        if isinstance(peer, tuple) and (port is None or peer[1] == port):
            try:
                obj.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SilenceNotice:
    """Says, once per silence, that a slow model is still working (a local model can read a prompt for minutes).

    `poke()` on every token or step; `with SilenceNotice(print_line):` around a turn."""

    def __init__(self, emit: Callable[[str], None], after: float = 12.0):
        import threading
        import time

        self._emit, self._after, self._time = emit, after, time.monotonic
        self._last = self._time()
        self._told = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tunepilot-silence", daemon=True)

    def poke(self) -> None:
        self._last, self._told = self._time(), False

    def hold(self) -> None:
        """Nothing to say until the next poke (the person is answering a question, not the model)."""
        self._told = True

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            quiet = self._time() - self._last
            if quiet >= self._after and not self._told:
                self._told = True
                self._emit(f"(still waiting for the model after {quiet:.0f} s: a local model on a CPU can take minutes "
                           "to read the prompt; --llm-timeout / TUNEPILOT_LLM_TIMEOUT sets how long to wait)")

    def __enter__(self) -> "SilenceNotice":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def make_agent(model, *, checkpointer=None, workdir=None, err: Optional[Console] = None):
    """The agent for `model`, sized to the server's context (asked from the server where it tells)."""
    from datetime import date

    from agent.core import build_agent
    from agent.llm import check_context
    from agent.prompt_budget import first_prompt_tokens
    from prompts import render
    from tools.agent_tools import TOOLS

    ctx = check_context(model, first_prompt_tokens(render("system", today=date.today().isoformat()), TOOLS))
    agent = build_agent(model, checkpointer=checkpointer, workdir=workdir, context_tokens=ctx.tokens if ctx else None)
    note = small_context_note(agent, ctx)
    if note and err is not None:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    return agent


def small_context_note(agent, ctx) -> Optional[str]:
    """One line when the server's context leaves little room for the conversation (None when it is fine)."""
    if ctx is None or ctx.tokens >= 8192:
        return None
    left = agent.tunepilot_settings["history_budget"]
    return (f"the chat model's context is {ctx.tokens} tokens ({ctx.source}): about {left} are left for the conversation, "
            "so older turns will be trimmed early; 16384 is comfortable (llama.cpp --ctx-size, Ollama num_ctx, vLLM --max-model-len)")


def setup_table(setup, memory: Optional[dict] = None):
    """A rich table of a setup's knobs and, when known, its memory per GPU."""
    from rich import box
    from rich.table import Table

    from tools.agent_tools import setup_view

    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    view = setup_view(setup)
    for key in ("model", "method", "r", "quantization", "micro_batch", "grad_accum", "effective_batch", "seq_len",
                "precision", "gradient_checkpointing", "optim", "num_gpus", "sharding", "offload", "gpu"):
        if key in view:
            table.add_row(key.replace("_", " "), escape(str(view[key])))
    if memory and memory.get("per_gpu_total_gib") is not None:
        mem = f"{memory['per_gpu_total_gib']} GiB per GPU"
        if memory.get("gpu_memory_gib") is not None:
            mem += f" of {memory['gpu_memory_gib']} GiB"
        if memory.get("headroom_gib") is not None:
            mem += f" (headroom {memory['headroom_gib']} GiB)"
        verdict = {True: "[green]fits[/]", False: "[red]does not fit[/]"}.get(memory.get("fits"), "")
        table.add_row("memory", escape(mem) + (f" {verdict}" if verdict else ""))
    return table


# --------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------


def _home() -> Path:
    from agent.core import home_dir

    home = home_dir()
    home.mkdir(parents=True, exist_ok=True)
    return home


def open_checkpointer(path: Path):
    """A SqliteSaver on `path` (the connection is closed with the process)."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(str(path), check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()
    return saver


def _thread_file() -> Path:
    return _home() / "chat_thread"


def last_thread_id() -> Optional[str]:
    """The thread id of the last chat, if any."""
    p = _thread_file()
    if p.is_file():
        t = p.read_text(encoding="utf-8").strip()
        return t or None
    return None


def _new_thread() -> str:
    tid = f"chat-{uuid.uuid4().hex[:12]}"
    _thread_file().write_text(tid, encoding="utf-8")
    return tid


def quiet_library_warnings() -> None:
    """Keep library deprecation chatter (transformers, torch, peft) off a person's terminal."""
    import warnings

    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


# --------------------------------------------------------------------------------------
# ask
# --------------------------------------------------------------------------------------


def ask_once(question: str, *, llm: Optional[str] = None, base_url: Optional[str] = None, json_out: bool = False,
             out: Optional[Console] = None, err: Optional[Console] = None, allow_trial: bool = False,
             timeout: Optional[float] = None, retries: Optional[int] = None, temperature: Optional[float] = None) -> dict:
    """Answer one question with a fresh in-memory thread; prints the answer (or JSON) and returns TurnResult.to_json().

    A trial (run_trial) runs only with allow_trial (`--allow-trial`): that flag is the person's yes."""
    from agent.core import run_turn
    from agent.llm import make_chat_model

    out = out or Console()
    err = err or Console(stderr=True)
    quiet_library_warnings()
    model = make_chat_model(llm, base_url=base_url, timeout=timeout, max_retries=retries, temperature=temperature)
    agent = make_agent(model, workdir=_home() / "work", err=err)
    streamed: list[str] = []

    notice = SilenceNotice(lambda line: err.print(f"[dim]{escape(line)}[/]", highlight=False))

    def on_token(piece: str) -> None:
        notice.poke()
        streamed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    def on_step(step: dict) -> None:
        notice.poke()
        if not json_out:
            if streamed and not "".join(streamed).endswith("\n"):
                sys.stdout.write("\n")
                streamed.clear()
            err.print(format_step(step), highlight=False)

    def confirm(request: dict) -> bool:
        if not json_out:
            verdict = "yes (--allow-trial)" if allow_trial else "no: pass --allow-trial to allow it"
            err.print(f"[yellow]confirm:[/] {escape(request.get('description', ''))} → {verdict}", highlight=False)
        return allow_trial

    with notice:
        result = run_turn(agent, f"ask-{uuid.uuid4().hex[:8]}", question, on_step=on_step,
                          on_token=None if json_out else on_token, confirm=confirm,
                          decline_reason="" if allow_trial else "tunepilot ask was run without --allow-trial",
                          decline_hint="`tunepilot ask --allow-trial ...`")
    data = result.to_json()
    if json_out:
        sys.stdout.write(json.dumps({"answer": data["answer"], "setup": data["setup"], "tool_calls": data["tool_calls"],
                                     "script_path": data["script_path"], "stopped": data["stopped"],
                                     "memory": data["memory"], "summary": data["summary"], "answer_source": data["answer_source"]},
                                    indent=2, ensure_ascii=False) + "\n")
    else:
        text = "".join(streamed)
        if result.answer and result.answer.strip() not in text:
            # tokens did not arrive as a stream (or the turn was stopped): print the whole answer
            sys.stdout.write(("\n" if text and not text.endswith("\n") else "") + result.answer + "\n")
        elif not text.endswith("\n"):
            sys.stdout.write("\n")
        block = engine_block(result)
        if block:
            sys.stdout.write("\n" + block + "\n")
        sys.stdout.flush()
    return data


# --------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------


class ChatSession:
    """One interactive chat: a model, an agent over a persistent checkpointer, and a thread."""

    def __init__(self, *, llm: Optional[str] = None, base_url: Optional[str] = None, resume: bool = False,
                 console: Optional[Console] = None, allow_trial: bool = True, timeout: Optional[float] = None,
                 retries: Optional[int] = None, temperature: Optional[float] = None):
        from agent.llm import make_chat_model

        self.console = console or Console()
        self.base_url = base_url
        self.llm = llm
        self.allow_trial = allow_trial
        self.llm_options = {"timeout": timeout, "max_retries": retries, "temperature": temperature}
        self._read: Optional[Callable[[], str]] = None
        self._ask_yes: Optional[Callable[[str], str]] = None
        self.model = make_chat_model(llm, base_url=base_url, **self.llm_options)  # raises LLMNotConfiguredError before any prompt
        self.checkpointer = open_checkpointer(_home() / "chat.sqlite")
        self.thread_id = (last_thread_id() if resume else None) or _new_thread()
        self.resumed = resume and self.thread_id == last_thread_id()
        self.agent = self._build()

    def _build(self):
        return make_agent(self.model, checkpointer=self.checkpointer, workdir=_home() / "work", err=self.console)

    # -- slash commands ------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        c = self.console
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            c.print(escape(HELP), highlight=False)
        elif name == "/reset":
            self.thread_id = _new_thread()
            c.print("[dim]new conversation[/]")
        elif name == "/setup":
            self._show_setup()
        elif name == "/save":
            self._save(arg)
        elif name == "/plot":
            self._plot(arg)
        elif name == "/model":
            self._switch_model(arg)
        else:
            c.print(f"[yellow]unknown command {escape(name)}[/]; /help lists them", highlight=False)
        return True

    def _state(self) -> dict:
        from agent.core import thread_state

        return thread_state(self.agent, self.thread_id)

    def _show_setup(self) -> None:
        from rich.syntax import Syntax

        setup = self._state()["setup"]
        if setup is None:
            self.console.print("[dim]no setup yet: ask for a plan first (e.g. 'plan Llama-3.1-8B on a 4090')[/]")
            return
        self.console.print(f"[bold]{escape(setup.short())}[/]", highlight=False)
        self.console.print(Syntax(setup.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))

    def _plot(self, arg: str) -> None:
        """/plot [FILE]: the current setup's memory chart, written to FILE (default memory.png)."""
        from tools.plots import setup_chart

        state = self._state()
        if state["setup"] is None:
            self.console.print("[yellow]nothing to plot yet[/]: ask for a plan or an estimate first")
            return
        path = Path(arg or "memory.png").expanduser()
        try:
            written = setup_chart(state["setup"], path, memory=state.get("memory"))
        except TunepilotError as e:
            self.console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            return
        self.console.print(f"chart of {escape(state['setup'].short())}: {escape(str(written.resolve()))}", highlight=False)

    def _save(self, arg: str) -> None:
        if not arg:
            self.console.print("[yellow]usage: /save PATH[/] (e.g. /save train.py)")
            return
        state = self._state()
        script, files, launch = state["script"], state["files"], state["launch_command"]
        if script is None:
            if state["setup"] is None:
                self.console.print("[yellow]nothing to save yet[/]: ask for a plan or a script first")
                return
            from tools.script import render_script

            try:
                rendered = render_script(state["setup"])
            except TunepilotError as e:
                self.console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
                return
            script, files, launch = rendered.train_py, dict(rendered.files or {}), rendered.launch_command
        path = Path(arg).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(script, encoding="utf-8")
            for name, text in (files or {}).items():  # accelerate / DeepSpeed configs go beside the script
                (path.parent / name).parent.mkdir(parents=True, exist_ok=True)
                (path.parent / name).write_text(text, encoding="utf-8")
        except OSError as e:
            self.console.print(f"[red]error:[/] cannot write {escape(str(path))}: {escape(e.strerror or str(e))}", highlight=False)
            return
        extra = f" and {', '.join(sorted(files))}" if files else ""
        run = (launch or "python train.py").replace("train.py", path.name)
        self.console.print(f"saved {escape(str(path))} ({script.count(chr(10)) + 1} lines){escape(extra)}; "
                           f"run it from {escape(str(path.parent))} with: {escape(run)}", highlight=False)

    def _switch_model(self, spec: str) -> None:
        from agent.llm import make_chat_model

        if not spec:
            self.console.print(f"[dim]model: {escape(self.llm or '$TUNEPILOT_LLM')}[/]; usage: /model provider:model", highlight=False)
            return
        try:
            self.model = make_chat_model(spec, base_url=self.base_url, **self.llm_options)
            self.agent = self._build()
        except TunepilotError as e:
            self.console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            return
        self.llm = spec
        self.console.print(f"[dim]now using {escape(spec)} (same conversation)[/]", highlight=False)

    # -- cancelling a model call ---------------------------------------------------------------
    def _cancel_closes_the_connection(self):
        """Ctrl-C during a turn also closes the chat model's HTTP connection, so a slow local model's
        reply is not awaited (the graph would otherwise wait for the in-flight call to finish)."""
        import contextlib
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return contextlib.nullcontext()
        session = self

        @contextlib.contextmanager
        def guard():
            def on_sigint(signum, frame):
                session._cancelled = True
                _close_http(session.model)
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGINT, on_sigint)
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, previous)

        return guard()

    def _fresh_model_after_cancel(self) -> None:
        if not getattr(self, "_cancelled", False):
            return
        self._cancelled = False
        from agent.llm import make_chat_model

        try:  # the closed client cannot be reused: the same model, a new connection
            self.model = make_chat_model(self.llm, base_url=self.base_url, **self.llm_options)
            self.agent = self._build()
        except TunepilotError as e:
            self.console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)

    # -- one turn --------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        """Send one message; stream the answer; every failure ends in one line and the session goes on."""
        from agent.core import agent_error_message, run_turn

        c = self.console
        streamed: list[str] = []

        notice = SilenceNotice(lambda line: c.print(f"[dim]{escape(line)}[/]", highlight=False) if not streamed else None)

        def on_token(piece: str) -> None:
            notice.poke()
            if not streamed:
                c.print("[bold magenta]tunepilot[/] ", end="")
            streamed.append(piece)
            c.file.write(piece)
            c.file.flush()

        def on_step(step: dict) -> None:
            notice.poke()
            if streamed:
                if not "".join(streamed).endswith("\n"):
                    c.file.write("\n")
                streamed.clear()
            c.print(format_step(step), highlight=False)

        def confirm(request: dict) -> bool:
            notice.hold()
            if streamed:
                if not "".join(streamed).endswith("\n"):
                    c.file.write("\n")
                streamed.clear()
            c.print(f"[yellow]{escape(request.get('description') or 'Run ' + str(request.get('tool')) + '?')}[/]", highlight=False)
            try:
                reply = self.ask_yes_no("run it? [y/N] ")
            except (EOFError, KeyboardInterrupt):
                reply = ""
            yes = reply.strip().lower() in ("y", "yes", "네", "예", "응")
            c.print("[green]starting the trial[/]" if yes else "[dim]not run[/]", highlight=False)
            notice.poke()
            return yes

        try:
            with notice, self._cancel_closes_the_connection():
                result = run_turn(self.agent, self.thread_id, text, on_step=on_step, on_token=on_token, allow_trial=self.allow_trial,
                                  confirm=confirm, decline_reason="the person answered no")
        except KeyboardInterrupt:
            c.print("\n[yellow]cancelled[/]")
            self._fresh_model_after_cancel()
            return
        except Exception as e:  # noqa: BLE001 - the edge: one line, the session survives
            import os

            if os.environ.get("TUNEPILOT_DEBUG"):
                import traceback

                traceback.print_exc()
            c.print(f"\n[red]error:[/] {escape(agent_error_message(e))}" if streamed else f"[red]error:[/] {escape(agent_error_message(e))}", highlight=False)
            return
        shown = "".join(streamed)
        if result.answer and result.answer.strip() not in shown:
            if shown and not shown.endswith("\n"):
                c.file.write("\n")
            c.print("[bold magenta]tunepilot[/] " + escape(result.answer), highlight=False)
        elif shown and not shown.endswith("\n"):
            c.file.write("\n")
            c.file.flush()
        if result.setup is not None and any(s["tool"] in SETUP_TOOLS and s["status"] == "ok" for s in result.tool_calls):
            c.print(setup_table(result.setup, result.memory))
        block = engine_block(result)
        if block:
            c.print(f"[dim]{escape(block)}[/]", highlight=False)

    # -- the loop --------------------------------------------------------------------------
    def _reader(self) -> Callable[[], str]:
        if sys.stdin.isatty() and sys.stdout.isatty():
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory

            session = PromptSession(history=FileHistory(str(_home() / "chat_history")))
            yes_session = PromptSession()
            self._ask_yes = lambda prompt: yes_session.prompt(prompt)
            return lambda: session.prompt("you› ")

        def plain() -> str:
            self.console.print("you› ", end="")
            self.console.file.flush()
            return input()

        return plain

    def ask_yes_no(self, prompt: str) -> str:
        """One answer line for a confirmation (the terminal's line editor, or plain input when piped)."""
        if self._ask_yes is not None:
            return self._ask_yes(prompt)
        self.console.print(prompt, end="")
        self.console.file.flush()
        return input()

    def loop(self) -> None:
        """Read lines until /quit or end of input."""
        c = self.console
        what = "resumed conversation" if self.resumed else "new conversation"
        c.print(f"[bold]tunepilot chat[/] [dim]({what} {self.thread_id}; /help for commands, /quit to leave)[/]", highlight=False)
        read = self._reader()
        while True:
            try:
                line = read()
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt: a fresh line
            except EOFError:
                c.print()
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.turn(line)


def chat_main(*, llm: Optional[str] = None, base_url: Optional[str] = None, resume: bool = False,
              timeout: Optional[float] = None, retries: Optional[int] = None, temperature: Optional[float] = None) -> None:
    """Run the interactive chat until the user leaves."""
    quiet_library_warnings()
    ChatSession(llm=llm, base_url=base_url, resume=resume, timeout=timeout, retries=retries, temperature=temperature).loop()
