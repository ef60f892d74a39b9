"""Choosing the agent's chat model: any LangChain provider, or an OpenAI-compatible server.

`make_chat_model("provider:model")` goes through `langchain.chat_models.init_chat_model`;
`openai:` specs (and any spec with a base URL) build `langchain_openai.ChatOpenAI`, which
also serves local OpenAI-compatible servers: vLLM, Ollama, llama.cpp, LM Studio. With no
model configured, `LLMNotConfiguredError` says how to configure one and which commands
need none. Provider faults (missing key, server down) become one-line `TunepilotError`s
through `llm_error_message`.
"""

from __future__ import annotations

import os

from tools.schemas import TunepilotError

ENV_SPEC = "TUNEPILOT_LLM"
LOCAL_DUMMY_KEY = "not-needed"


class LLMNotConfiguredError(TunepilotError):
    """No chat model was configured (no --llm, no TUNEPILOT_LLM)."""


class LLMConnectionError(TunepilotError):
    """The chat model could not be reached or refused the credentials."""


def not_configured_message(reason: str = "") -> str:
    """The one message that says how to configure a chat model (and what works without one)."""
    from prompts import render

    return render("llm_not_configured", reason=reason)


def _split(spec: str) -> tuple[str, str]:
    provider, sep, name = spec.partition(":")
    if not sep:
        return "", spec
    return provider.strip().lower(), name.strip()


def make_chat_model(spec: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                    timeout: float = 60, max_retries: int = 2):
    """A LangChain chat model from 'provider:model' (or $TUNEPILOT_LLM); base_url for OpenAI-compatible servers."""
    spec = (spec or os.environ.get(ENV_SPEC) or "").strip()
    if not spec:
        raise LLMNotConfiguredError(not_configured_message())
    provider, name = _split(spec)
    if not name:
        raise LLMNotConfiguredError(not_configured_message(f"--llm {spec!r} names no model; write provider:model"))
    base_url = base_url or (os.environ.get("OPENAI_BASE_URL") if provider in ("openai", "") else None)
    if provider == "openai" or (provider == "" and base_url):
        return _openai(name, base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
    if base_url:
        raise TunepilotError(f"--base-url works with OpenAI-compatible servers only: use --llm openai:{name} --base-url {base_url}")
    try:
        from langchain.chat_models import init_chat_model
    except ImportError:
        raise TunepilotError("the agent needs langchain: pip install 'tunepilot[agent]'") from None
    kwargs = {"timeout": timeout, "max_retries": max_retries}
    if api_key:
        kwargs["api_key"] = api_key
    try:
        return init_chat_model(spec, **kwargs)
    except ImportError as e:
        pkg = getattr(e, "name", None) or "its integration package"
        hint = f" (for Ollama use --llm openai:{name} --base-url http://localhost:11434/v1)" if provider == "ollama" else ""
        raise TunepilotError(f"--llm {spec!r}: provider {provider or '?'!r} needs {pkg}: pip install it{hint}") from None
    except ValueError as e:
        raise TunepilotError(f"--llm {spec!r}: {str(e).splitlines()[0]} (write provider:model, e.g. openai:gpt-4o-mini)") from None
    except Exception as e:  # noqa: BLE001 - e.g. a provider SDK refusing a missing key at construction
        raise LLMConnectionError(llm_error_message(e, spec=spec)) from None


def _openai(name: str, *, base_url: str | None, api_key: str | None, timeout: float, max_retries: int):
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if not key:
        if not base_url:
            raise LLMNotConfiguredError(not_configured_message(f"openai:{name} needs OPENAI_API_KEY, or --base-url for a local server"))
        key = LOCAL_DUMMY_KEY  # local servers (Ollama, vLLM, llama.cpp) ignore the key
    try:
        from langchain_openai import ChatOpenAI
    except ImportError:
        raise TunepilotError("OpenAI-compatible models need langchain-openai: pip install 'tunepilot[agent]'") from None
    return ChatOpenAI(model=name, base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)


def llm_error_message(exc: BaseException, *, spec: str | None = None) -> str:
    """One line for a chat-model fault (unreachable server, bad key, rate limit, timeout); '' if it is not one."""
    names = {c.__name__ for c in type(exc).__mro__}
    module = type(exc).__module__ or ""
    who = f" ({spec})" if spec else ""
    text = " ".join(str(exc).split())[:200]
    if "APITimeoutError" in names or "ReadTimeout" in names:
        return f"the chat model{who} did not answer in time: check that the server is up and not overloaded"
    if "APIConnectionError" in names or (module.startswith("httpx") and "ConnectError" in names):
        return f"cannot reach the chat model server{who}: is it running and is --base-url / OPENAI_BASE_URL right? ({text})"
    if "AuthenticationError" in names or "PermissionDeniedError" in names:
        return f"the chat model{who} refused the credentials: check OPENAI_API_KEY (or the provider's key variable) ({text})"
    if "RateLimitError" in names:
        return f"the chat model{who} is rate-limited or out of quota: wait, or use another --llm ({text})"
    if "NotFoundError" in names and module.startswith("openai"):
        return f"the chat model server{who} does not know this model: check the model name in --llm ({text})"
    if "APIStatusError" in names or "APIError" in names or "BadRequestError" in names:
        return f"the chat model{who} returned an error: {text}"
    if module.startswith("openai") and ("credentials" in text.lower() or "api_key" in text.lower()):
        return f"no API key for the chat model{who}: set OPENAI_API_KEY, or use --base-url for a local server"
    return ""
