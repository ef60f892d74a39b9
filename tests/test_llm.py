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
