"""The Slack bot end to end: signed Slack events into the real Bolt app, the real agent
(`agent.core`) driven by a scripted chat model, the real `slack_sdk.WebClient` talking to a
stub Slack Web API on 127.0.0.1 (tests/_slack_helpers.py), conversations in a real SQLite file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from _agent_helpers import OpenAIStub, ScriptedChatModel, final, tool_call
from _slack_helpers import (
    signed_action,
    BOT_ID,
    BOT_USER_ID,
    SIGNING_SECRET,
    SlackStub,
    event_body,
    mention,
    message,
    new_ts,
    sign,
    signed_event,
)
from agent.slack_bot import (
    CONFIRM_APPROVE,
    CONFIRM_REJECT,
    TRIAL_REFUSED_NOTE,
    close,
    create_app,
    markdown_to_mrkdwn,
    parse_trial_users,
    render_reply,
    setup_fields,
    split_sections,
    wait_idle,
)
from tools.schemas import TunepilotError

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# fixtures and small helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def stub():
    s = SlackStub()
    yield s
    s.close()


@pytest.fixture
def make_app(stub, tmp_path):
    apps = []

    def _make(model, *, trial_users=(), db=None, workers=4):
        app = create_app(
            bot_token="xoxb-test", signing_secret=SIGNING_SECRET, chat_model=model,
            checkpointer_path=db or tmp_path / "slack.sqlite", trial_users=set(trial_users),
            slack_api_url=stub.api_url, executor_workers=workers, workdir=tmp_path / "work",
        )
        apps.append(app)
        return app

    yield _make
    for app in apps:
        close(app)


def humans(messages) -> list[str]:
    return [m.content for m in messages if getattr(m, "type", "") == "human"]


def last_human(messages) -> str:
    return humans(messages)[-1]


def model_of(fn) -> ScriptedChatModel:
    """A scripted chat model whose every reply comes from fn(messages)."""
    return ScriptedChatModel(script=[fn], repeat_last=True)


def echo(messages):
    return final(f"**Echo** {last_human(messages)} (turns so far: {len(humans(messages))})")


def send(app, event, *, secret=SIGNING_SECRET):
    resp = app.dispatch(signed_event(event, secret=secret))
    return resp


def run(app, *events, timeout=30.0):
    for ev in events:
        assert send(app, ev).status == 200
    assert wait_idle(app, timeout), "the bot's background turns did not finish"


def reply_text(call) -> str:
    return call.params.get("text", "")


def blocks_text(call) -> str:
    return json.dumps(call.params.get("blocks") or [])


# --------------------------------------------------------------------------------------
# (a) a mention: reaction at once, threaded reply rendered for Slack
# --------------------------------------------------------------------------------------


def test_mention_gets_reaction_and_threaded_reply(stub, make_app):
    model = model_of(echo)
    app = make_app(model)
    ev = mention("can I tune llama on a 4090?")
    run(app, ev)

    eyes = [c for c in stub.of("reactions.add") if c.params["name"] == "eyes"]
    assert eyes and eyes[0].params["timestamp"] == ev["ts"] and eyes[0].params["channel"] == ev["channel"]
    replies = stub.replies()
    assert len(replies) == 1
    r = replies[0]
    assert r.params["channel"] == ev["channel"] and r.params["thread_ts"] == ev["ts"]
    # the bot's own mention is stripped before the agent sees the text
    assert model.seen and last_human(model.seen[0]) == "can I tune llama on a 4090?"
    # Markdown **bold** became Slack *bold*, in the text and in the answer's section block
    assert reply_text(r).startswith("*Echo* can I tune llama on a 4090?")
    blocks = r.params["blocks"]
    assert blocks[0]["type"] == "section" and blocks[0]["text"]["text"].startswith("*Echo*")
    assert blocks[-1]["type"] == "context"
    # the :eyes: acknowledgement is swapped for a check mark when the answer is out
    assert any(c.params["name"] == "white_check_mark" for c in stub.of("reactions.add"))


# --------------------------------------------------------------------------------------
# (b) plan_training then write_training_script: setup fields and train.py uploaded to the thread
# --------------------------------------------------------------------------------------


def test_plan_and_script_upload_to_thread(stub, make_app):
    script = [
        tool_call("plan_training", model="Qwen/Qwen2.5-0.5B", hardware="RTX 4090", seq_len=512, method="lora", exact=False),
        tool_call("write_training_script"),
        final("**Plan:** LoRA on one RTX 4090.\n\n| setting | value |\n|---|---|\n| r | 16 |\n\nThe script is attached."),
    ]
    model = ScriptedChatModel(script=script)
    app = make_app(model)
    ev = mention("plan Qwen2.5-0.5B on a 4090 and write the script")
    run(app, ev, timeout=120)

    # train.py first (the memory chart follows it: tests/test_ui_agent.py)
    assert [c.method for c in stub.calls if c.method.startswith("files") or c.method == "upload"][:3] == [
        "files.getUploadURLExternal", "upload", "files.completeUploadExternal"]
    get_url = stub.of("files.getUploadURLExternal")[0]
    assert get_url.params["filename"] == "train.py"
    done = stub.of("files.completeUploadExternal")[0]
    assert done.params["channel_id"] == ev["channel"] and done.params["thread_ts"] == ev["ts"]
    content = stub.of("upload")[0].body.decode("utf-8")
    assert int(get_url.params["length"]) == len(content.encode("utf-8"))
    compile(content, "train.py", "exec")
    assert "Qwen/Qwen2.5-0.5B" in content

    r = stub.replies()[0]
    assert r.params["thread_ts"] == ev["ts"]
    blocks = r.params["blocks"]
    fields = next(b for b in blocks if b.get("fields"))["fields"]
    shown = "\n".join(f["text"] for f in fields)
    for label in ("Method", "LoRA r", "Batch × accum", "Seq len", "Checkpointing", "Optimizer", "GPUs"):
        assert f"*{label}" in shown
    assert "512" in shown and "RTX 4090" in shown
    # the Markdown table became a code block, the context names the next command
    assert "```" in blocks[0]["text"]["text"] and "|---|" not in blocks[0]["text"]["text"]
    assert "train.py" in blocks[-1]["elements"][0]["text"]


def test_upload_refused_keeps_the_answer_and_says_why(stub, make_app):
    stub.errors["files.getUploadURLExternal"] = "missing_scope"
    model = ScriptedChatModel(script=[
        tool_call("write_training_script", model="Qwen/Qwen2.5-0.5B", gpu="RTX 4090"),
        final("Here is your script."),
    ])
    app = make_app(model)
    ev = mention("script please")
    run(app, ev, timeout=60)
    texts = [reply_text(c) for c in stub.replies()]
    assert texts[0].startswith("Here is your script.\n\ntunepilot engine: FITS: Qwen/Qwen2.5-0.5B on 1x NVIDIA RTX 4090")
    assert len(texts) == 2 and "missing_scope" in texts[1] and "files:write" in texts[1] and "train.py" in texts[1]
    assert not stub.of("upload")


# --------------------------------------------------------------------------------------
# (c) thread memory, follow-ups without a mention, and a restart on the same SQLite file
# --------------------------------------------------------------------------------------


def test_thread_memory_survives_restart(stub, make_app, tmp_path):
    db = tmp_path / "threads.sqlite"
    model = model_of(echo)
    app = make_app(model, db=db)
    first = mention("first question ALPHA-7")
    run(app, first)
    run(app, mention("and with 8k context?", thread_ts=first["ts"]))
    # a teammate's follow-up in the bot's thread needs no mention
    run(app, message("what about two GPUs?", thread_ts=first["ts"]))
    assert humans(model.seen[-1]) == ["first question ALPHA-7", "and with 8k context?", "what about two GPUs?"]
    # a thread the bot is not in is not its business
    other = new_ts()
    run(app, message("unrelated chatter", thread_ts=other))
    assert len(model.seen) == 3
    assert all(c.params["thread_ts"] == first["ts"] for c in stub.replies())

    close(app)
    model2 = model_of(echo)
    app2 = make_app(model2, db=db)
    run(app2, message("still there after the restart?", thread_ts=first["ts"]))
    assert humans(model2.seen[0]) == ["first question ALPHA-7", "and with 8k context?", "what about two GPUs?",
                                      "still there after the restart?"]
    assert reply_text(stub.replies()[-1]).endswith("(turns so far: 4)")


# --------------------------------------------------------------------------------------
# (d) direct messages
# --------------------------------------------------------------------------------------


def test_direct_message(stub, make_app):
    model = model_of(echo)
    app = make_app(model)
    dm = message("hi, QLoRA or LoRA for Mistral-7B on 24 GB?", channel="D0DM0001", channel_type="im")
    run(app, dm)
    r = stub.replies("D0DM0001")
    assert len(r) == 1 and r[0].params["thread_ts"] == dm["ts"]
    assert "QLoRA or LoRA" in reply_text(r[0])


# --------------------------------------------------------------------------------------
# (e) bad signatures are refused
# --------------------------------------------------------------------------------------


def test_bad_signature_is_refused(stub, make_app):
    model = model_of(echo)
    app = make_app(model)
    before = len(stub.calls)
    resp = send(app, mention("sneaky"), secret="not-the-secret")
    assert resp.status == 401
    # a stale (replayed) timestamp is refused too
    raw = json.dumps(event_body(mention("replayed")))
    from slack_bolt import BoltRequest

    old = sign(raw, timestamp=int(time.time()) - 3600)
    assert app.dispatch(BoltRequest(body=raw, headers={k: [v] for k, v in old.items()})).status == 401
    assert wait_idle(app, 5)
    assert stub.calls[before:] == [] and model.calls == 0


# --------------------------------------------------------------------------------------
# (f) who may start a trial run
# --------------------------------------------------------------------------------------


def _trial_model():
    def step(messages):
        last = messages[-1]
        if getattr(last, "type", "") == "tool":
            return final(f"trial tool said: {last.content}")
        return tool_call("run_trial", model="Qwen/Qwen2.5-0.5B", hardware="RTX 4090", seq_len=512, steps=1)

    return model_of(step)


@pytest.fixture
def trial_tripwire(monkeypatch):
    """Any subprocess the trial would start fails loudly instead of running."""
    started = []

    class Tripwire(TunepilotError):
        pass

    def popen(*args, **kwargs):
        started.append(args)
        raise Tripwire("tripwire: a trial subprocess was about to start")

    monkeypatch.setattr(subprocess, "Popen", popen)
    return started


def press(app, action_id, *, thread_ts, user, timeout=60):
    assert app.dispatch(signed_action(action_id, value=thread_ts, user=user)).status == 200
    assert wait_idle(app, timeout)


def test_trial_refused_for_users_not_allow_listed(stub, make_app, trial_tripwire):
    model = _trial_model()
    app = make_app(model, trial_users={"U0BOSS01"})
    run(app, mention("please trial-run it", user="U0ALICE1"), timeout=60)
    assert trial_tripwire == []  # no subprocess
    r = stub.replies()[-1]
    assert "not permitted" in reply_text(r)  # the tool's observation, quoted by the model
    assert any(b.get("text", {}).get("text") == TRIAL_REFUSED_NOTE for b in r.params["blocks"])
    assert "actions" not in blocks_text(r)  # nobody is asked to confirm what they may not start


def test_an_allow_listed_user_is_asked_first_and_the_button_starts_the_trial(stub, make_app, trial_tripwire):
    model = _trial_model()
    app = make_app(model, trial_users={"U0BOSS01"})
    ev = mention("please trial-run it", user="U0BOSS01")
    run(app, ev, timeout=60)
    assert trial_tripwire == []  # asked, not started
    ask = stub.replies()[-1]
    actions = next(b for b in ask.params["blocks"] if b["type"] == "actions")["elements"]
    assert [a["action_id"] for a in actions] == [CONFIRM_APPROVE, CONFIRM_REJECT]
    assert all(a["value"] == ev["ts"] for a in actions)
    assert "Run a 1-step trial of Qwen/Qwen2.5-0.5B" in reply_text(ask) and "yes" in reply_text(ask)
    # someone who is not allow-listed presses Run: refused, still waiting
    press(app, CONFIRM_APPROVE, thread_ts=ev["ts"], user="U0ALICE1")
    assert trial_tripwire == [] and TRIAL_REFUSED_NOTE in reply_text(stub.replies()[-1])
    # the allow-listed person presses Run: the trial starts (here: as far as its subprocess)
    press(app, CONFIRM_APPROVE, thread_ts=ev["ts"], user="U0BOSS01")
    assert len(trial_tripwire) == 1
    r = stub.replies()[-1]
    assert "tripwire" in reply_text(r) and "not permitted" not in reply_text(r)


def test_a_no_in_the_thread_skips_the_trial(stub, make_app, trial_tripwire):
    model = _trial_model()
    app = make_app(model, trial_users={"U0BOSS01"})
    ev = mention("please trial-run it", user="U0BOSS01")
    run(app, ev, timeout=60)
    run(app, message("no", user="U0BOSS01", thread_ts=ev["ts"]), timeout=60)
    assert trial_tripwire == []
    assert "did not confirm the trial run" in reply_text(stub.replies()[-1])
    # nothing waits any more: a late button press says so
    press(app, CONFIRM_APPROVE, thread_ts=ev["ts"], user="U0BOSS01")
    assert trial_tripwire == [] and "Nothing is waiting" in reply_text(stub.replies()[-1])


def test_a_waiting_trial_survives_a_restart_and_a_yes_in_the_thread_starts_it(stub, make_app, tmp_path, trial_tripwire):
    db = tmp_path / "restart.sqlite"
    app = make_app(_trial_model(), trial_users={"U0BOSS01"}, db=db)
    ev = mention("please trial-run it", user="U0BOSS01")
    run(app, ev, timeout=60)
    assert "Run it" in blocks_text(stub.replies()[-1]) and trial_tripwire == []
    close(app)  # the bot restarts; the question waits in SQLite
    app2 = make_app(_trial_model(), trial_users={"U0BOSS01"}, db=db)
    run(app2, message("yes", user="U0BOSS01", thread_ts=ev["ts"]), timeout=60)
    assert len(trial_tripwire) == 1


# --------------------------------------------------------------------------------------
# (g) what the bot ignores
# --------------------------------------------------------------------------------------


def test_ignores_itself_other_bots_edits_and_joins(stub, make_app):
    model = model_of(echo)
    app = make_app(model)
    known = mention("start a thread")
    run(app, known)
    posted = len(stub.replies())
    t = known["ts"]
    run(
        app,
        message("my own reply", user=BOT_USER_ID, thread_ts=t),
        message("my own reply via bot id", thread_ts=t, bot_id=BOT_ID),
        message("another bot", thread_ts=t, bot_id="B0OTHER01"),
        message("bot message", thread_ts=t, subtype="bot_message", user=None, bot_id="B0OTHER01"),
        message("", thread_ts=t, subtype="message_changed", user=None,
                message={"type": "message", "user": "U0ALICE1", "text": "edited", "ts": t}),
        message("", thread_ts=t, subtype="message_deleted", user=None),
        message("<@U0ALICE1> has joined the channel", subtype="channel_join"),
        message("a DM from a bot", channel="D0DM0002", channel_type="im", bot_id="B0OTHER01"),
        message("top-level chatter without a mention"),
    )
    assert len(stub.replies()) == posted
    assert len(model.seen) == 1


# --------------------------------------------------------------------------------------
# (h) concurrency: threads run in parallel, one thread's turns never interleave
# --------------------------------------------------------------------------------------


def test_parallel_threads_and_serialised_thread(stub, make_app):
    nap = 1.5
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def slow(messages):
        t0 = time.monotonic()
        time.sleep(nap)
        with lock:
            spans.append((humans(messages)[0], t0, time.monotonic()))
        return echo(messages)

    app = make_app(model_of(slow), workers=4)
    a, b = mention("thread A"), mention("thread B", channel="C0CHAN02")
    t0 = time.monotonic()
    acks = []
    for ev in (a, b):
        t = time.monotonic()
        assert send(app, ev).status == 200
        acks.append(time.monotonic() - t)
    assert max(acks) < nap / 2, f"Slack got its HTTP answer only after {max(acks):.2f}s: the turn blocked the ack"
    assert wait_idle(app, 30)
    elapsed = time.monotonic() - t0
    assert {c.params["thread_ts"] for c in stub.replies()} == {a["ts"], b["ts"]}
    assert elapsed < 2 * nap, f"two threads took {elapsed:.1f}s: they ran one after the other"

    # two messages in one thread at once: the second turn starts after the first has finished
    spans.clear()
    run(app, mention("again 1", thread_ts=a["ts"]), mention("again 2", thread_ts=a["ts"]))
    (_, s1, e1), (_, s2, e2) = sorted(spans, key=lambda s: s[1])
    assert s2 >= e1
    last = stub.replies(a["channel"])[-1]
    assert "(turns so far: 3)" in reply_text(last)


# --------------------------------------------------------------------------------------
# (i) failures become a short reply in the thread
# --------------------------------------------------------------------------------------


def test_failure_becomes_a_short_reply(stub, make_app):
    def broken(messages):
        raise RuntimeError("the model exploded\nwith a second line")

    app = make_app(model_of(broken))
    ev = mention("hello?")
    run(app, ev)
    r = stub.replies()[-1]
    assert r.params["thread_ts"] == ev["ts"]
    text = reply_text(r)
    assert text.startswith("Sorry, something went wrong: ") and "the model exploded" in text
    assert "\n" not in text and "Traceback" not in text
    assert any(c.params["name"] == "x" for c in stub.of("reactions.add"))


# --------------------------------------------------------------------------------------
# (j) Slack rate limits are retried
# --------------------------------------------------------------------------------------


def test_rate_limited_post_is_retried(stub, make_app):
    app = make_app(model_of(echo))
    stub.rate_limits["chat.postMessage"] = 1
    ev = mention("under a rate limit")
    run(app, ev)
    posts = [c for c in stub.calls if c.method == "chat.postMessage"]
    assert [c.status for c in posts] == [429, 200]
    assert posts[1].at - posts[0].at >= 0.9  # honoured Retry-After: 1
    assert posts[1].params["thread_ts"] == ev["ts"]


# --------------------------------------------------------------------------------------
# rendering (pure functions)
# --------------------------------------------------------------------------------------


def test_markdown_to_mrkdwn():
    md = (
        "## Verdict\n"
        "**Fits** on one GPU, *barely*. See [the docs](https://hf.co/docs) & `a<b`.\n"
        "- uses `**kwargs` in code\n\n"
        "| component | GiB |\n|:---|---:|\n| weights | 15.0 |\n| **total** | 21.3 |\n\n"
        "```python\nx = 2 ** 3  # **not bold**\n```"
    )
    out = markdown_to_mrkdwn(md)
    lines = out.splitlines()
    assert lines[0] == "*Verdict*"
    assert lines[1] == "*Fits* on one GPU, _barely_. See <https://hf.co/docs|the docs> &amp; `a<b`."
    assert lines[2] == "• uses `**kwargs` in code"
    table = out.split("```")[1].strip().splitlines()
    assert table == ["component  GiB", "weights    15.0", "total      21.3"]
    assert "x = 2 ** 3  # **not bold**" in out  # code is untouched
    assert "python" not in out  # the fence's language tag would show as text in Slack


def test_split_sections_keeps_code_blocks_closed():
    long = "intro\n```\n" + "\n".join(f"line {i} " + "x" * 60 for i in range(200)) + "\n```\nend"
    chunks = split_sections(long, limit=1000)
    assert len(chunks) > 5
    for c in chunks:
        assert len(c) <= 1000
        assert c.count("```") % 2 == 0


def test_render_reply_limits_blocks_and_notes_refused_trial():
    from agent.core import TurnResult

    huge = "\n\n".join("paragraph %d " % i + "y" * 2000 for i in range(80))
    text, blocks = render_reply(TurnResult(answer=huge), trial_refused=True)
    assert len(blocks) <= 50
    assert all(len(b["text"]["text"]) <= 3000 for b in blocks if b["type"] == "section")
    assert any(TRIAL_REFUSED_NOTE == b.get("text", {}).get("text") for b in blocks)
    assert len(text) <= 4000


def test_setup_fields_show_the_setup_and_its_memory():
    from tools.schemas import TrainingSetup

    setup = TrainingSetup(model_id="meta-llama/Llama-3.1-8B", method="qlora", load_in_4bit=True, r=64, lora_alpha=128,
                          per_device_train_batch_size=2, gradient_accumulation_steps=8, max_length=4096,
                          optim="paged_adamw_8bit", num_gpus=2, zero_stage=2, gpu="NVIDIA A10G")
    memory = {"per_gpu_total_gib": 21.3, "gpu_memory_gib": 22.0, "fits": True, "headroom_gib": 0.7}
    fields = {f["text"].split("\n")[0]: f["text"].split("\n", 1)[1] for f in setup_fields(setup, memory)}
    assert fields["*Method*"] == "qlora"
    assert fields["*LoRA r / alpha*"] == "64 / 128"
    assert fields["*Batch × accum*"] == "2 × 8 (effective 32)"
    assert fields["*Seq len*"] == "4096"
    assert fields["*Optimizer*"] == "`paged_adamw_8bit`, bf16"
    assert fields["*GPUs*"] == "2 × NVIDIA A10G, ZeRO-2"
    assert fields["*Memory*"] == "21.3 GiB of 22 GiB per GPU, fits :white_check_mark: (0.7 GiB headroom)"
    assert "*Memory*" not in {f["text"].split("\n")[0] for f in setup_fields(setup)}
    assert len(setup_fields(setup, memory)) <= 10  # Slack's limit for a section's fields


def test_parse_trial_users():
    assert parse_trial_users("U01ABCDEF, W02XYZ123 ,") == {"U01ABCDEF", "W02XYZ123"}
    assert parse_trial_users(None) == set()
    with pytest.raises(TunepilotError, match="alice"):
        parse_trial_users("U01ABCDEF,alice")


# --------------------------------------------------------------------------------------
# the command: missing configuration, and HTTP mode end to end in a real process
# --------------------------------------------------------------------------------------


def _cli(*args, env_extra=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_") and k not in ("TUNEPILOT_LLM", "OPENAI_API_KEY")}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "agent.cli", "slack", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "env_extra, args, needle",
    [
        ({}, [], "SLACK_BOT_TOKEN"),
        ({"SLACK_BOT_TOKEN": "xoxb-1"}, [], "SLACK_APP_TOKEN"),
        ({"SLACK_BOT_TOKEN": "xoxb-1"}, ["--http", "--port", "3999"], "SLACK_SIGNING_SECRET"),
        ({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"}, [], "no chat model configured"),
    ],
)
def test_cli_missing_configuration(env_extra, args, needle):
    p = _cli(*args, env_extra=env_extra)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_socket_mode_refused_app_token_is_one_line(stub, tmp_path, monkeypatch):
    """Socket Mode with an app token Slack refuses: a clear SlackConfigError, not a traceback."""
    from agent.slack_bot import SlackConfigError
    from agent.slack_bot import run as run_bot

    stub.errors["apps.connections.open"] = "invalid_auth"
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test")
    monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-refused")
    with OpenAIStub(["unused"]) as llm:
        with pytest.raises(SlackConfigError, match=r"SLACK_APP_TOKEN \(invalid_auth\)"):
            run_bot(llm="openai:stub-model", base_url=llm.base_url, slack_api_url=stub.api_url, db=tmp_path / "s.sqlite")
    assert stub.of("apps.connections.open")  # it really asked Slack for a Socket Mode URL


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_http_mode_end_to_end(stub, tmp_path):
    """`tunepilot slack --http`: a real process, a signed POST, an OpenAI-compatible stub LLM, the stub Slack API."""
    port = _free_port()
    with OpenAIStub(["**Hello** from the stub model"]) as llm:
        env = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SIGNING_SECRET,
               "TUNEPILOT_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
        env.update({k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")})
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "slack", "--http", "--port", str(port), "--db", str(tmp_path / "s.sqlite"),
             "--llm", "openai:stub-model", "--base-url", llm.base_url, "--slack-api-url", stub.api_url],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            ev = mention("hello over HTTP")
            raw = json.dumps(event_body(ev)).encode()
            deadline = time.monotonic() + 45
            status = None
            while time.monotonic() < deadline and proc.poll() is None:
                headers = sign(raw.decode())
                try:
                    req = urllib.request.Request(f"http://127.0.0.1:{port}/slack/events", data=raw, headers=headers, method="POST")
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        status = resp.status
                    break
                except (ConnectionError, OSError):
                    time.sleep(0.3)
            assert status == 200, proc.stdout.read() if proc.poll() is not None else "server did not come up"
            assert stub.wait_for(lambda s: s.replies(), timeout=30)
            r = stub.replies()[0]
            assert r.params["thread_ts"] == ev["ts"] and reply_text(r).startswith("*Hello* from the stub model")
            assert llm.requests  # the agent really asked the OpenAI-compatible server
            # a forged request over HTTP gets 401
            bad = sign(raw.decode(), secret="wrong")
            req = urllib.request.Request(f"http://127.0.0.1:{port}/slack/events", data=raw, headers=bad, method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 401
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
