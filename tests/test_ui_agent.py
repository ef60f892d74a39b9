"""Pictures in the conversational front ends (issue 16): `/plot` in `tunepilot chat` writes the
current setup's chart and prints its path; the Slack bot uploads that chart (a real PNG, through
slack_sdk's files_upload_v2) into the thread with its answer. Real agent loop with a scripted chat
model, real slack_sdk client against the loopback Slack stub.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from _agent_helpers import ScriptedChatModel, final, tool_call  # noqa: E402
from _slack_helpers import SIGNING_SECRET, SlackStub, mention, signed_event  # noqa: E402
from agent.slack_bot import close, create_app, wait_idle  # noqa: E402

QWEN = "Qwen/Qwen2.5-0.5B"
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_chat_plot_writes_the_current_setups_chart(tmp_path):
    from langchain_core.messages import AIMessage, ToolMessage
    from rich.console import Console

    from agent.chat import ChatSession
    from tools.schemas import TrainingSetup

    out = StringIO()
    session = ChatSession(llm="openai:stub-model", base_url="http://127.0.0.1:9/v1", console=Console(file=out, width=200))
    assert session.command("/plot")
    assert "nothing to plot yet" in out.getvalue()
    setup = TrainingSetup(model_id=QWEN, method="lora", gpu="NVIDIA RTX 4090", per_device_train_batch_size=4)
    session.agent.update_state({"configurable": {"thread_id": session.thread_id}}, {"messages": [
        AIMessage(content="", tool_calls=[{"name": "estimate_memory", "args": {}, "id": "c1", "type": "tool_call"}]),
        ToolMessage(content="{}", tool_call_id="c1", name="estimate_memory",
                    artifact={"setup": setup.model_dump(mode="json"), "memory": {"tier": "analytic"}}),
    ]}, as_node="tools")
    target = tmp_path / "mem.svg"
    assert session.command(f"/plot {target}")
    assert str(target.resolve()) in out.getvalue()
    text = target.read_text(encoding="utf-8")
    assert 'id="seg-weights"' in text and 'id="line-capacity"' in text  # checked against the GPU of the setup
    assert session.command("/plot notes.txt")
    assert ".png or .svg" in out.getvalue()
    assert session.command("/help") and "/plot [FILE]" in out.getvalue()


def test_slack_answer_with_a_plan_uploads_the_memory_chart_into_the_thread(tmp_path):
    stub = SlackStub()
    script = [
        tool_call("plan_training", model=QWEN, hardware="RTX 4090", seq_len=512, method="lora", exact=False),
        final("**Plan:** LoRA on one RTX 4090."),
    ]
    app = create_app(bot_token="xoxb-test", signing_secret=SIGNING_SECRET, chat_model=ScriptedChatModel(script=script),
                     checkpointer_path=tmp_path / "slack.sqlite", trial_users=set(), slack_api_url=stub.api_url,
                     executor_workers=2, workdir=tmp_path / "work")
    try:
        ev = mention("plan Qwen2.5-0.5B on a 4090")
        assert app.dispatch(signed_event(ev)).status == 200
        assert wait_idle(app, 120)
        # the answer is posted first, then the chart, both in the thread
        replies = stub.replies()
        assert replies and replies[0].params["thread_ts"] == ev["ts"]
        urls = [c for c in stub.of("files.getUploadURLExternal") if c.params["filename"] == "memory.png"]
        assert len(urls) == 1
        done = [c for c in stub.of("files.completeUploadExternal")
                if any(f.get("title", "").startswith("Memory per GPU") for f in c.params.get("files") or [])]
        assert len(done) == 1
        assert done[0].params["channel_id"] == ev["channel"] and done[0].params["thread_ts"] == ev["ts"]
        assert stub.calls.index(done[0]) > stub.calls.index(replies[0])
        # the uploaded bytes are the PNG chart, with the size the CLI's pictures have
        pngs = [c.body for c in stub.of("upload") if c.body[:8] == PNG]
        assert len(pngs) == 1 and int(urls[0].params["length"]) == len(pngs[0])
        from tools import plots

        assert _png_size(pngs[0]) == (plots.FIGSIZE[0] * plots.DPI, plots.FIGSIZE[1] * plots.DPI)
    finally:
        close(app)
        stub.close()


def test_slack_answer_without_an_estimate_uploads_no_chart(tmp_path):
    stub = SlackStub()
    app = create_app(bot_token="xoxb-test", signing_secret=SIGNING_SECRET,
                     chat_model=ScriptedChatModel(script=[final("Hello! Ask me about fine-tuning.")]),
                     checkpointer_path=tmp_path / "slack.sqlite", trial_users=set(), slack_api_url=stub.api_url,
                     executor_workers=2, workdir=tmp_path / "work")
    try:
        assert app.dispatch(signed_event(mention("hi"))).status == 200
        assert wait_idle(app, 60)
        assert stub.replies() and not stub.of("files.getUploadURLExternal")
    finally:
        close(app)
        stub.close()
