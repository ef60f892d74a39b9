"""Choosing the chat model: specs, env vars, local servers, and one-line errors for every fault."""

from __future__ import annotations


import pytest

from agent.core import agent_error_message, build_agent, run_turn
from agent.llm import LLMNotConfiguredError, make_chat_model
from tests._agent_helpers import OpenAIStub, closed_port
from tools.schemas import TunepilotError


def test_no_model_configured_says_how_to_configure_one():
    with pytest.raises(LLMNotConfiguredError) as e:
        make_chat_model(None)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("--llm openai:gpt-4o-mini", "OPENAI_API_KEY", "--base-url http://localhost:11434/v1", "TUNEPILOT_LLM", "tunepilot plan"):
        assert needle in msg


def test_openai_without_key_and_without_base_url_is_not_configured():
    with pytest.raises(LLMNotConfiguredError, match="OPENAI_API_KEY"):
        make_chat_model("openai:gpt-4o-mini")


def test_env_spec_and_local_server_get_a_dummy_key(monkeypatch):
    monkeypatch.setenv("TUNEPILOT_LLM", "openai:qwen2.5:7b")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    model = make_chat_model(timeout=7, max_retries=0)
    assert model.model_name == "qwen2.5:7b"  # only the first colon separates the provider
    assert str(model.openai_api_base).startswith("http://127.0.0.1:11434/v1")
    assert model.openai_api_key.get_secret_value() == "not-needed"
    assert model.max_retries == 0


def test_explicit_key_wins_and_spec_without_model_is_rejected(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert make_chat_model("openai:gpt-4o-mini").openai_api_key.get_secret_value() == "sk-from-env"
    assert make_chat_model("openai:gpt-4o-mini", api_key="sk-arg").openai_api_key.get_secret_value() == "sk-arg"
    with pytest.raises(LLMNotConfiguredError, match="names no model"):
        make_chat_model("openai:")


def test_unknown_provider_and_missing_integration_are_one_line():
    with pytest.raises(TunepilotError) as e:
        make_chat_model("ollama:llama3")  # langchain-ollama is not installed here
    assert "--base-url http://localhost:11434/v1" in str(e.value)
    with pytest.raises(TunepilotError) as e:
        make_chat_model("nosuchprovider:model")
    assert "nosuchprovider" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TunepilotError, match="OpenAI-compatible"):
        make_chat_model("anthropic:claude", base_url="http://127.0.0.1:1/v1")


def test_unreachable_server_is_one_clear_line():
    model = make_chat_model("openai:stub-model", base_url=f"http://127.0.0.1:{closed_port()}/v1", timeout=5, max_retries=0)
    agent = build_agent(model)
    with pytest.raises(TunepilotError) as e:
        run_turn(agent, "t", "hello")
    msg = str(e.value)
    assert msg.startswith("cannot reach the chat model server") and "--base-url" in msg
    # the underlying exception maps to the same line
    assert agent_error_message(e.value.__cause__).startswith("cannot reach the chat model server")


def test_refused_key_is_one_clear_line_and_the_thread_goes_on():
    with OpenAIStub([{"status": 401, "error": "Incorrect API key provided"}, "hello again"]) as stub:
        model = make_chat_model("openai:stub-model", base_url=stub.base_url, api_key="sk-wrong", max_retries=0)
        agent = build_agent(model)
        with pytest.raises(TunepilotError, match="refused the credentials"):
            run_turn(agent, "t", "hello")
        assert stub.requests[0]["headers"]["authorization"] == "Bearer sk-wrong"
        assert run_turn(agent, "t", "are you there?").answer == "hello again"
        # the second request carries both user messages: the thread survived the failure
        users = [m["content"] for m in stub.requests[1]["body"]["messages"] if m["role"] == "user"]
        assert users == ["hello", "are you there?"]


def test_unrelated_exceptions_are_not_disguised_as_llm_errors():
    assert agent_error_message(ValueError("boom"), strict=True) == ""
    assert agent_error_message(ValueError("boom")).startswith("the agent failed: ValueError: boom (a bug: please report it")
    assert agent_error_message(TunepilotError("model: unknown")) == "model: unknown"


# --------------------------------------------------------------------------------------
# issue 13: timeouts, resends, temperature, the server's context
# --------------------------------------------------------------------------------------


def test_local_servers_get_a_long_read_timeout_and_no_blind_resend(monkeypatch):
    from agent.llm import is_local_url, llm_settings

    for url in ("http://127.0.0.1:8080/v1", "http://localhost:11434/v1", "http://192.168.1.20:8000/v1",
                "http://10.0.0.5/v1", "http://gpu-box.local:8000/v1", "http://[::1]:8080/v1"):
        assert is_local_url(url), url
    for url in ("https://api.openai.com/v1", "https://example.com/v1", None, ""):
        assert not is_local_url(url), url
    local = make_chat_model("openai:m", base_url="http://127.0.0.1:8080/v1")
    assert (local.request_timeout.read, local.request_timeout.connect, local.max_retries) == (900.0, 10.0, 0)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    remote = make_chat_model("openai:gpt-4o-mini")
    assert (remote.request_timeout.read, remote.max_retries) == (120.0, 2)
    # the environment beats the defaults, a flag beats the environment
    monkeypatch.setenv("TUNEPILOT_LLM_TIMEOUT", "1200")
    monkeypatch.setenv("TUNEPILOT_LLM_RETRIES", "1")
    assert llm_settings(base_url="http://127.0.0.1/v1").timeout == 1200 and llm_settings().max_retries == 1
    assert llm_settings(base_url="http://127.0.0.1/v1", timeout=30, max_retries=0).timeout == 30
    monkeypatch.setenv("TUNEPILOT_LLM_TIMEOUT", "soon")
    with pytest.raises(TunepilotError, match="TUNEPILOT_LLM_TIMEOUT='soon' is not a number"):
        llm_settings()
    monkeypatch.delenv("TUNEPILOT_LLM_TIMEOUT")
    with pytest.raises(TunepilotError, match="--llm-retries"):
        llm_settings(max_retries=-1)


def test_a_low_temperature_is_sent_by_default_and_can_be_changed(monkeypatch):
    from agent.llm import llm_settings

    with OpenAIStub(["one", "two", "three"]) as stub:
        run_turn(build_agent(make_chat_model("openai:stub-model", base_url=stub.base_url)), "t", "hi")
        monkeypatch.setenv("TUNEPILOT_LLM_TEMPERATURE", "0.7")
        run_turn(build_agent(make_chat_model("openai:stub-model", base_url=stub.base_url)), "t", "hi")
        run_turn(build_agent(make_chat_model("openai:stub-model", base_url=stub.base_url, temperature=0)), "t", "hi")
        assert [r["body"].get("temperature") for r in stub.requests] == [0.1, 0.7, 0]
    monkeypatch.delenv("TUNEPILOT_LLM_TEMPERATURE")
    assert llm_settings(model_name="o3-mini").temperature is None  # reasoning models take only their default
    with pytest.raises(TunepilotError, match="from 0 to 2"):
        llm_settings(temperature=3)


def test_a_slow_local_model_times_out_once_with_what_to_raise():
    with OpenAIStub(["too late"], delay=5) as stub:
        model = make_chat_model("openai:stub-model", base_url=stub.base_url, timeout=1)
        with pytest.raises(TunepilotError) as e:
            run_turn(build_agent(model), "t", "hello")
        assert len(stub.requests) == 1, "no blind resend of the prompt to a busy local server"
    assert "did not answer in time" in str(e.value) and "--llm-timeout" in str(e.value)


@pytest.mark.parametrize("info,expected", [
    ({"/props": {"default_generation_settings": {"n_ctx": 2048}}}, (2048, "llama.cpp /props n_ctx")),
    ({"/slots": [{"id": 0, "n_ctx": 3072}]}, (3072, "llama.cpp /slots n_ctx")),
    ({"/api/show": {"parameters": "stop \"<|im_end|>\"\nnum_ctx 16384", "model_info": {"qwen2.context_length": 32768}}},
     (16384, "Ollama /api/show num_ctx")),
    ({"/api/show": {"parameters": "", "model_info": {"llama.context_length": 131072}}}, (4096, None)),
    ({"/v1/models": {"max_model_len": 8192}}, (8192, "vLLM /v1/models max_model_len")),
    ({}, None),
])
def test_the_servers_context_is_asked_where_it_tells(info, expected):
    from agent.llm import probe_context

    with OpenAIStub(["unused"], info=info) as stub:
        ctx = probe_context(stub.base_url, "stub-model")
    if expected is None:
        assert ctx is None
    else:
        assert ctx.tokens == expected[0] and (expected[1] is None or ctx.source == expected[1])


def test_a_server_context_smaller_than_the_first_prompt_is_one_clear_line(monkeypatch, tmp_path):
    from agent.chat import make_agent

    with OpenAIStub(["unused"], info={"/props": {"default_generation_settings": {"n_ctx": 2048}}}) as stub:
        model = make_chat_model("openai:stub-model", base_url=stub.base_url)
        with pytest.raises(TunepilotError) as e:
            make_agent(model, workdir=tmp_path)
        assert stub.requests == []  # refused before a prompt was cut silently
    msg = str(e.value)
    assert msg.startswith("the chat model server's context is 2048 tokens (llama.cpp /props n_ctx)")
    assert "--ctx-size 8192" in msg and "num_ctx 8192" in msg and "--max-model-len 8192" in msg
    # a small context works, with one line saying so
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    with OpenAIStub(["unused"], info={"/props": {"default_generation_settings": {"n_ctx": 4096}}}) as stub:
        make_agent(make_chat_model("openai:stub-model", base_url=stub.base_url), workdir=tmp_path, err=Console(file=out, width=300))
    assert "note: the chat model's context is 4096 tokens (llama.cpp /props n_ctx)" in out.getvalue() and "16384" in out.getvalue()
    # a big enough context sizes the history budget
    with OpenAIStub(["unused"], info={"/props": {"default_generation_settings": {"n_ctx": 16384}}}) as stub:
        agent = make_agent(make_chat_model("openai:stub-model", base_url=stub.base_url), workdir=tmp_path)
    assert agent.tunepilot_settings["context_tokens"] == 16384
    monkeypatch.setenv("TUNEPILOT_LLM_CONTEXT", "12000")  # the person says it: no probe
    with OpenAIStub(["unused"]) as stub:
        agent = make_agent(make_chat_model("openai:stub-model", base_url=stub.base_url), workdir=tmp_path)
        assert stub.probes == []
    assert agent.tunepilot_settings["context_tokens"] == 12000


def test_a_context_overflow_says_to_reset():
    overflow = {"status": 400, "error": "This model's maximum context length is 4096 tokens. However, your messages resulted in 5210 tokens."}
    with OpenAIStub([overflow]) as stub:
        model = make_chat_model("openai:stub-model", base_url=stub.base_url)
        with pytest.raises(TunepilotError) as e:
            run_turn(build_agent(model), "t", "hello")
    msg = str(e.value)
    assert msg.startswith("the conversation no longer fits the chat model's context window") and "/reset" in msg
    assert "--ctx-size" in msg and "\n" not in msg


def test_a_busy_or_loading_server_says_so():
    with OpenAIStub([{"status": 503, "error": "Loading model"}]) as stub:
        model = make_chat_model("openai:stub-model", base_url=stub.base_url)
        with pytest.raises(TunepilotError) as e:
            run_turn(build_agent(model), "t", "hello")
        assert len(stub.requests) == 1  # a local server: no blind resend
    assert str(e.value).startswith("the chat model server (or a proxy in front of it) answered HTTP 503")


def test_a_local_server_caps_each_reply_and_the_cap_can_be_changed(monkeypatch):
    from agent.llm import LOCAL_MAX_TOKENS, llm_settings

    with OpenAIStub(["one", "two", "three"]) as stub:
        run_turn(build_agent(make_chat_model("openai:stub-model", base_url=stub.base_url)), "t", "hi")
        monkeypatch.setenv("TUNEPILOT_LLM_MAX_TOKENS", "2000")
        run_turn(build_agent(make_chat_model("openai:stub-model", base_url=stub.base_url)), "t", "hi")
        monkeypatch.setenv("TUNEPILOT_LLM_MAX_TOKENS", "0")  # no cap
        run_turn(build_agent(make_chat_model("openai:stub-model", base_url=stub.base_url)), "t", "hi")
        sent = [r["body"].get("max_completion_tokens", r["body"].get("max_tokens")) for r in stub.requests]
    assert sent == [LOCAL_MAX_TOKENS, 2000, None]
    monkeypatch.delenv("TUNEPILOT_LLM_MAX_TOKENS")
    assert llm_settings(base_url="https://api.openai.com/v1").max_tokens is None  # a hosted API: its own default
    assert "at most 768 tokens a reply" in llm_settings(base_url="http://127.0.0.1:8080/v1").describe()
    monkeypatch.setenv("TUNEPILOT_LLM_MAX_TOKENS", "-5")
    with pytest.raises(TunepilotError, match="TUNEPILOT_LLM_MAX_TOKENS"):
        llm_settings()
