"""`tunepilot ask` and `tunepilot chat` end to end: real subprocesses, the real openai client, a loopback stub.

The chat test runs the REPL in a pseudo-terminal (pty.fork), as a person would: prompt_toolkit
line editing, a question, a tool step, /setup, /save, a failing model call, Ctrl-C, /quit.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._agent_helpers import OpenAIStub, closed_port, stub_tool_call

ROOT = Path(__file__).resolve().parent.parent
POLYGLOT = "EleutherAI/polyglot-ko-1.3b"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]|\r")


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TUNEPILOT_LLM", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(TUNEPILOT_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS="160", **extra)
    return env


def _cli(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=_env(home),
                          capture_output=True, text=True, timeout=timeout)


def _engine_line(body: dict, name: str) -> str:
    """One result line of the answer call (agent/answer.py): no tools, the question and the engine's results."""
    msg = body["messages"][-1]
    assert not body.get("tools") and msg["role"] == "user" and msg["content"].startswith("Question: "), msg
    lines = [x for x in msg["content"].splitlines() if x.startswith(f"- {name}: ")]
    assert lines, msg["content"]
    return lines[-1][len(f"- {name}: "):]


def _per_gpu(summary: str) -> float:
    return float(re.search(r"Memory: ([\d.]+) GiB per GPU", summary).group(1))


# --------------------------------------------------------------------------------------
# ask
# --------------------------------------------------------------------------------------


def test_ask_json_round_trips_a_plan_tool_call(tmp_path):
    def answer(body):
        plan = _engine_line(body, "plan_training")
        return f"It fits: {_per_gpu(plan)} GiB per GPU, in fp16." if ", fp16," in plan else "?"

    replies = [stub_tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False), answer]
    with OpenAIStub(replies) as stub:
        r = _cli("ask", "Can I fine-tune polyglot-ko-1.3b on a T4?", "--json", "--llm", "openai:stub-model",
                 "--base-url", stub.base_url, home=tmp_path)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert len(stub.requests) == 2
        first, second = (q["body"] for q in stub.requests)
        assert first["model"] == "stub-model" and not first.get("stream") and first["temperature"] == 0.1
        assert {t["function"]["name"] for t in first["tools"]} >= {"plan_training", "write_training_script", "web_search"}
        assert first["messages"][0]["role"] == "system" and first["messages"][1]["content"].startswith("Can I fine-tune")
        # the second request is the answer call: the question and the engine's result, no tools (a local server)
        plan = _engine_line(second, "plan_training")
        assert plan.startswith("FITS") and second["messages"][0]["content"].startswith("You are tunepilot")
    assert out["answer"] == answer(second) and out["answer_source"] == "model"
    assert out["setup"]["model_id"] == POLYGLOT and out["setup"]["fp16"] is True
    assert [c["tool"] for c in out["tool_calls"]] == ["plan_training"] and out["tool_calls"][0]["status"] == "ok"
    # issue 13: the turn's state is reported, not hidden
    assert out["stopped"] is None and out["summary"] == plan
    assert out["memory"]["per_gpu_total_gib"] == _per_gpu(plan) and out["memory"]["fits"] is True


def test_ask_streams_sse_answers_and_prints_the_engines_numbers_under_a_poor_answer(tmp_path):
    with OpenAIStub([stub_tool_call("plan_training", model=POLYGLOT, hardware="T4", seq_len=512, exact=False),
                     "Sure, that should be fine!"]) as stub:
        r = _cli("ask", "can polyglot-ko-1.3b train on a T4?", "--llm", "openai:stub-model", "--base-url", stub.base_url, home=tmp_path)
        assert r.returncode == 0, r.stderr
        assert [q["body"].get("stream") for q in stub.requests] == [True, True]
        plan = _engine_line(stub.requests[1]["body"], "plan_training")
    answer, block = r.stdout.strip().split("\n\n")
    assert answer == "Sure, that should be fine!"
    # the model said nothing useful; the engine's verdict and numbers are printed under its words
    assert block == f"tunepilot engine: {plan}" and str(_per_gpu(plan)) in block
    assert "plan_training" in r.stderr and "ok" in r.stderr  # the step, on stderr


def test_ask_json_reports_a_stopped_turn_and_exits_non_zero(tmp_path):
    # a model that repeats the same call forever: the loop guard ends the turn on the third one
    loop = [stub_tool_call("lookup_model", model=f"{POLYGLOT}") for _ in range(3)]
    with OpenAIStub(loop) as stub:
        r = _cli("ask", "loop", "--json", "--llm", "openai:stub-model", "--base-url", stub.base_url, home=tmp_path)
        assert len(stub.requests) == 3
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = json.loads(r.stdout)
    assert out["stopped"] == "loop" and out["answer"].startswith("I stopped: the model kept repeating the same tool call")
    assert "memory" in out and out["memory"] is None
    steps = out["tool_calls"]
    assert [s["status"] for s in steps] == ["ok", "ok", "error"] and steps[1].get("repeat")


def test_ask_never_starts_a_trial_without_allow_trial(tmp_path):
    replies = [stub_tool_call("run_trial", model="Qwen/Qwen2.5-0.5B", hardware="RTX 4090", seq_len=512, steps=1),
               lambda body: "trial: " + body["messages"][-1]["content"]]
    with OpenAIStub(replies) as stub:
        r = _cli("ask", "trial-run Qwen2.5-0.5B", "--json", "--llm", "openai:stub-model", "--base-url", stub.base_url, home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "did not confirm the trial run (tunepilot ask was run without --allow-trial)" in out["answer"]
    assert "--allow-trial" in out["answer"] and out["tool_calls"][0]["status"] == "error"
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").rglob("trial_report.json"))


def test_ask_without_a_model_or_with_an_unreachable_one_says_so_in_one_line(tmp_path):
    r = _cli("ask", "hi", home=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--llm openai:gpt-4o-mini" in r.stderr and "tunepilot plan" in r.stderr and r.stdout == ""
    r = _cli("chat", home=tmp_path)
    assert r.returncode == 2 and "TUNEPILOT_LLM" in r.stderr and "Traceback" not in r.stderr
    r = _cli("ask", "hi", "--llm", "openai:gpt-4o-mini", home=tmp_path)  # no OPENAI_API_KEY
    assert r.returncode == 2 and "needs OPENAI_API_KEY" in r.stderr and "Traceback" not in r.stderr
    r = _cli("ask", "hi", "--llm", "openai:m", "--base-url", f"http://127.0.0.1:{closed_port()}/v1", home=tmp_path)
    assert r.returncode == 2 and "cannot reach the chat model server" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------
# chat in a pseudo-terminal
# --------------------------------------------------------------------------------------


class Terminal:
    """A child process on a pty: read what it shows, type into it (answers cursor-position queries)."""

    def __init__(self, argv: list[str], env: dict):
        pid, fd = pty.fork()
        if pid == 0:  # child
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, *argv], env)
        self.pid, self.fd = pid, fd
        import fcntl
        import struct
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.raw = ""
        self.seen = 0  # how much of the screen text expect() has consumed

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536).decode("utf-8", "replace")
        except OSError:
            return False
        if "\x1b[6n" in data:  # prompt_toolkit asks where the cursor is
            os.write(self.fd, b"\x1b[1;1R")
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text[self.seen:])
            if m:
                self.seen += m.end()
                return m.group(0)
            if time.monotonic() > deadline:
                raise AssertionError(f"did not see {pattern!r}; screen:\n{self.text[-3000:]}")
            self._read(0.2)

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"chat did not exit; screen:\n{self.text[-2000:]}")


def test_chat_in_a_terminal_tool_step_save_errors_cancel_and_resume(tmp_path):
    def answer(body):
        launch, path = re.match(r"(.+) \(script (.+)\)$", _engine_line(body, "next command")).groups()
        return f"Script ready at {path}; run {launch}"

    replies = [
        stub_tool_call("write_training_script", model=POLYGLOT, gpu="T4", seq_len=512),
        answer,
        {"status": 401, "error": "Incorrect API key provided"},
        "slow answer",  # cancelled with Ctrl-C while the stub waits
        "still here",
        stub_tool_call("run_trial", steps=1),
        lambda body: "no trial: " + body["messages"][-1]["content"][:40],
    ]
    home = tmp_path / "home"
    with OpenAIStub(replies) as stub:
        term = Terminal(["-m", "agent.cli", "chat", "--llm", "openai:stub-model", "--base-url", stub.base_url],
                        _env(home, TERM="xterm"))
        try:
            term.expect(r"tunepilot chat.*new conversation (chat-[0-9a-f]+)")
            term.expect(r"you›")
            term.type("write a training script for polyglot-ko-1.3b on my T4")
            term.expect(r"→ write_training_script\(.*gpu=T4.*\) [0-9.]+s ok")
            term.expect(r"Script ready at \S+train\.py; run python train\.py")
            term.expect(r"precision\s+fp16")  # the setup table after the turn
            term.expect(r"you›")
            term.type("/setup")
            term.expect(r"model_id: EleutherAI/polyglot-ko-1\.3b")
            term.expect(r"fp16: true")
            out = tmp_path / "saved" / "train.py"
            term.type(f"/save {out}")
            term.expect(r"saved .*train\.py \(\d+ lines\)")
            term.type("a question the server refuses")
            term.expect(r"error: the chat model .*refused the credentials")
            term.expect(r"you›")
            stub.delay = 300.0  # a very slow model; released by stub.stop()
            sent = len(stub.requests)
            term.type("a slow question")
            # Ctrl-C only once the request is in flight (not while the line is still being read): on a
            # loaded machine the line can take seconds to reach the server, so a fixed sleep races it
            assert stub.wait_for_requests(sent + 1, timeout=60), term.text[-2000:]
            t_cancel = time.monotonic()
            os.write(term.fd, b"\x03")  # Ctrl-C
            term.expect(r"cancelled", timeout=60)
            assert time.monotonic() - t_cancel < 60, "Ctrl-C did not wait for the slow model's reply"
            term.expect(r"you›")
            stub.delay = 0.0
            term.type("are you still there?")
            term.expect(r"still here")
            # consent: a trial asks first; "n" (or just Enter) means it does not run
            term.type("trial-run it please")
            term.expect(r"Run a 1-step trial of EleutherAI/polyglot-ko-1\.3b .*on this machine\?")
            term.expect(r"run it\? \[y/N\]")
            term.type("n")
            term.expect(r"not run")
            term.expect(r"→ run_trial\(.*\) [0-9.]+s error")
            term.expect(r"no trial: User rejected")
            term.type("/quit")
            assert term.wait() == 0
        finally:
            try:
                os.kill(term.pid, signal.SIGKILL)
                os.waitpid(term.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        compile(out.read_text(encoding="utf-8"), str(out), "exec")
        assert "polyglot-ko-1.3b" in out.read_text(encoding="utf-8")
        # every request after the refused and the cancelled one still carried the whole thread
        last = stub.requests[-1]["body"]["messages"]
        users = [m["content"] for m in last if m["role"] == "user"]
        assert users[0].startswith("write a training script") and users[-1] == "trial-run it please"
    assert (home / "chat.sqlite").is_file() and (home / "chat_history").is_file()
    thread = (home / "chat_thread").read_text().strip()

    # --resume with piped input (no terminal): the setup of the last conversation is still there
    with OpenAIStub(["unused"]) as stub:
        p = subprocess.run([sys.executable, "-m", "agent.cli", "chat", "--resume", "--llm", "openai:stub-model",
                            "--base-url", stub.base_url], cwd=ROOT, env=_env(home), input="/setup\n/help\n/nope\n/model openai:other-model\n/quit\n",
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"resumed conversation {thread}" in p.stdout
    assert "model_id: EleutherAI/polyglot-ko-1.3b" in p.stdout and "/save PATH" in p.stdout
    assert "unknown command /nope" in p.stdout
    assert "now using openai:other-model (same conversation)" in p.stdout


def test_chat_save_renders_from_the_setup_when_no_script_was_written(tmp_path):
    from io import StringIO

    from langchain_core.messages import AIMessage, ToolMessage
    from rich.console import Console

    from agent.chat import ChatSession
    from tools.schemas import TrainingSetup

    setup = TrainingSetup(model_id=POLYGLOT, num_gpus=2, zero_stage=2, gpu="NVIDIA A100 SXM 80GB")
    out = StringIO()
    session = ChatSession(llm="openai:stub-model", base_url="http://127.0.0.1:9/v1", console=Console(file=out, width=200))
    # the thread holds a setup from a plan, but no script yet
    session.agent.update_state({"configurable": {"thread_id": session.thread_id}}, {"messages": [
        AIMessage(content="", tool_calls=[{"name": "plan_training", "args": {}, "id": "c1", "type": "tool_call"}]),
        ToolMessage(content="{}", tool_call_id="c1", name="plan_training", artifact={"setup": setup.model_dump(mode="json")}),
    ]}, as_node="tools")
    assert session.command("/setup")
    assert "zero_stage: 2" in out.getvalue()
    target = tmp_path / "run" / "train.py"
    assert session.command(f"/save {target}")
    text = out.getvalue()
    compile(target.read_text(encoding="utf-8"), str(target), "exec")
    extra = sorted(p.name for p in target.parent.iterdir() if p.name != "train.py")
    assert extra, "a 2-GPU ZeRO-2 setup needs its accelerate/DeepSpeed config files beside the script"
    assert all(name in text for name in extra) and "accelerate launch" in text
    assert session.command("/reset") and session.command("/setup")
    assert "no setup yet" in out.getvalue()
    assert session.command("/quit") is False


def test_a_slow_model_gets_one_still_waiting_line_per_silence():
    import threading

    from agent.chat import SilenceNotice

    lines: list[str] = []
    got = threading.Event()
    with SilenceNotice(lambda line: (lines.append(line), got.set()), after=0.3) as notice:
        assert got.wait(10)
        time.sleep(1.0)  # still silent: no second line for the same silence
        assert len(lines) == 1 and lines[0].startswith("(still waiting for the model after") and "--llm-timeout" in lines[0]
        got.clear()
        notice.poke()  # a token arrived; a new silence is told again
        assert got.wait(10) and len(lines) == 2
        notice.hold()  # the person is answering a y/N question: nothing to say
        time.sleep(1.0)
        assert len(lines) == 2
