"""Choosing the agent's chat model: any LangChain provider, or an OpenAI-compatible server.

`make_chat_model("provider:model")` goes through `langchain.chat_models.init_chat_model`;
`openai:` specs (and any spec with a base URL) build `langchain_openai.ChatOpenAI`, which
also serves local OpenAI-compatible servers: vLLM, Ollama, llama.cpp, LM Studio. With no
model configured, `LLMNotConfiguredError` says how to configure one and which commands
need none. Provider faults (missing key, server down) become one-line `TunepilotError`s
through `llm_error_message`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

from tools.schemas import TunepilotError

ENV_SPEC = "TUNEPILOT_LLM"
ENV_TIMEOUT = "TUNEPILOT_LLM_TIMEOUT"
ENV_RETRIES = "TUNEPILOT_LLM_RETRIES"
ENV_TEMPERATURE = "TUNEPILOT_LLM_TEMPERATURE"
ENV_CONTEXT = "TUNEPILOT_LLM_CONTEXT"
ENV_MAX_TOKENS = "TUNEPILOT_LLM_MAX_TOKENS"
LOCAL_DUMMY_KEY = "not-needed"
# A local server on a CPU or a small GPU can take minutes to read a long prompt, and resending
# the prompt to a server that is still busy with it only doubles the wait: long read timeout, no resend.
LOCAL_TIMEOUT_S = 900.0
LOCAL_RETRIES = 0
REMOTE_TIMEOUT_S = 120.0
REMOTE_RETRIES = 2
CONNECT_TIMEOUT_S = 10.0
DEFAULT_TEMPERATURE = 0.1
# A reply is a tool call or an answer of a few paragraphs; a small local model that starts an
# essay at ~5 tokens/s would otherwise hold the turn for minutes (0 = no cap)
LOCAL_MAX_TOKENS = 768
# OpenAI reasoning models accept only their default temperature
_NO_TEMPERATURE_PREFIXES = ("o1", "o3", "o4", "gpt-5")


@dataclass(frozen=True)
class LLMSettings:
    """How tunepilot talks to the chat model: read timeout, resends, temperature."""

    timeout: float
    max_retries: int
    temperature: Optional[float]
    local: bool
    max_tokens: Optional[int] = None  # cap on one reply's tokens (local servers: LOCAL_MAX_TOKENS)

    def describe(self) -> str:
        where = "local server" if self.local else "remote API"
        temp = "server default" if self.temperature is None else f"{self.temperature:g}"
        cap = f", at most {self.max_tokens} tokens a reply" if self.max_tokens else ""
        return f"{where}: timeout {self.timeout:g} s, {self.max_retries} retries, temperature {temp}{cap}"


def is_local_url(url: str | None) -> bool:
    """True for a loopback / private-network / .local base URL (a server on this machine or the LAN)."""
    if not url:
        return False
    host = (urllib.parse.urlsplit(url if "://" in url else f"http://{url}").hostname or "").lower()
    if host in ("localhost", "host.docker.internal") or host.endswith((".local", ".localhost", ".internal", ".lan")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


def _env_number(name: str, kind, value):
    if value is not None:
        return value
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise TunepilotError(f"{name}={raw!r} is not a number: set it like {name}={kind(1)}") from None


def llm_settings(*, base_url: str | None = None, timeout: float | None = None, max_retries: int | None = None,
                 temperature: float | None = None, model_name: str = "") -> LLMSettings:
    """Flags win over TUNEPILOT_LLM_TIMEOUT / _RETRIES / _TEMPERATURE; defaults depend on whether the server is local."""
    local = is_local_url(base_url)
    timeout = _env_number(ENV_TIMEOUT, float, timeout)
    max_retries = _env_number(ENV_RETRIES, int, max_retries)
    temperature = _env_number(ENV_TEMPERATURE, float, temperature)
    if timeout is not None and timeout <= 0:
        raise TunepilotError(f"--llm-timeout / {ENV_TIMEOUT}: give seconds > 0, got {timeout:g}")
    if max_retries is not None and max_retries < 0:
        raise TunepilotError(f"--llm-retries / {ENV_RETRIES}: give 0 or more, got {max_retries}")
    if temperature is not None and not 0 <= temperature <= 2:
        raise TunepilotError(f"--temperature / {ENV_TEMPERATURE}: give a value from 0 to 2, got {temperature:g}")
    if temperature is None and not model_name.lower().startswith(_NO_TEMPERATURE_PREFIXES):
        temperature = DEFAULT_TEMPERATURE
    max_tokens = _env_number(ENV_MAX_TOKENS, int, None)
    if max_tokens is not None and max_tokens < 0:
        raise TunepilotError(f"{ENV_MAX_TOKENS}: give 0 (no cap) or more tokens, got {max_tokens}")
    if max_tokens is None:
        max_tokens = LOCAL_MAX_TOKENS if local else 0
    return LLMSettings(
        timeout=float(timeout if timeout is not None else (LOCAL_TIMEOUT_S if local else REMOTE_TIMEOUT_S)),
        max_retries=int(max_retries if max_retries is not None else (LOCAL_RETRIES if local else REMOTE_RETRIES)),
        temperature=temperature,
        local=local,
        max_tokens=max_tokens or None,
    )


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
                    timeout: float | None = None, max_retries: int | None = None, temperature: float | None = None):
    """A LangChain chat model from 'provider:model' (or $TUNEPILOT_LLM); base_url for OpenAI-compatible servers.

    timeout / max_retries / temperature default from TUNEPILOT_LLM_TIMEOUT / _RETRIES / _TEMPERATURE,
    then from whether the server is local (see `llm_settings`). The model carries
    `tunepilot_settings` and `tunepilot_base_url` for the context probe."""
    spec = (spec or os.environ.get(ENV_SPEC) or "").strip()
    if not spec:
        raise LLMNotConfiguredError(not_configured_message())
    provider, name = _split(spec)
    if not name:
        raise LLMNotConfiguredError(not_configured_message(f"--llm {spec!r} names no model; write provider:model"))
    base_url = base_url or (os.environ.get("OPENAI_BASE_URL") if provider in ("openai", "") else None)
    settings = llm_settings(base_url=base_url, timeout=timeout, max_retries=max_retries, temperature=temperature, model_name=name)
    if provider == "openai" or (provider == "" and base_url):
        model = _openai(name, base_url=base_url, api_key=api_key, settings=settings)
        _tag(model, settings, base_url, name)
        return model
    if base_url:
        raise TunepilotError(f"--base-url works with OpenAI-compatible servers only: use --llm openai:{name} --base-url {base_url}")
    try:
        from langchain.chat_models import init_chat_model
    except ImportError:
        raise TunepilotError("the agent needs langchain: pip install 'tunepilot[agent]'") from None
    kwargs = {"timeout": settings.timeout, "max_retries": settings.max_retries}
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    if api_key:
        kwargs["api_key"] = api_key
    try:
        model = init_chat_model(spec, **kwargs)
    except ImportError as e:
        pkg = getattr(e, "name", None) or "its integration package"
        hint = f" (for Ollama use --llm openai:{name} --base-url http://localhost:11434/v1)" if provider == "ollama" else ""
        raise TunepilotError(f"--llm {spec!r}: provider {provider or '?'!r} needs {pkg}: pip install it{hint}") from None
    except ValueError as e:
        raise TunepilotError(f"--llm {spec!r}: {str(e).splitlines()[0]} (write provider:model, e.g. openai:MODEL)") from None
    except Exception as e:  # noqa: BLE001 - e.g. a provider SDK refusing a missing key at construction
        raise LLMConnectionError(llm_error_message(e, spec=spec)) from None
    _tag(model, settings, None, name)
    return model


def _tag(model, settings: LLMSettings, base_url: str | None, name: str) -> None:
    for key, value in (("tunepilot_settings", settings), ("tunepilot_base_url", base_url), ("tunepilot_model_name", name)):
        try:
            object.__setattr__(model, key, value)
        except Exception:  # noqa: BLE001 - a model class that refuses extra attributes: no probe, defaults apply
            pass


def _openai(name: str, *, base_url: str | None, api_key: str | None, settings: LLMSettings):
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if not key:
        if not base_url:
            raise LLMNotConfiguredError(not_configured_message(f"openai:{name} needs OPENAI_API_KEY, or --base-url for a local server"))
        key = LOCAL_DUMMY_KEY  # local servers (Ollama, vLLM, llama.cpp) ignore the key
    try:
        import httpx
        from langchain_openai import ChatOpenAI
    except ImportError:
        raise TunepilotError("OpenAI-compatible models need langchain-openai: pip install 'tunepilot[agent]'") from None
    # a short connect timeout (a server that is down fails fast), a long read timeout (a slow model still answers)
    timeout = httpx.Timeout(settings.timeout, connect=min(CONNECT_TIMEOUT_S, settings.timeout))
    kwargs = {"model": name, "base_url": base_url, "api_key": key, "timeout": timeout, "max_retries": settings.max_retries}
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    if settings.max_tokens:
        kwargs["max_tokens"] = settings.max_tokens
    return ChatOpenAI(**kwargs)


# --------------------------------------------------------------------------------------
# The server's context window
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerContext:
    """The context window an OpenAI-compatible server reported, and where it said so."""

    tokens: int
    source: str  # e.g. "llama.cpp /props n_ctx"


def _get_json(url: str, *, data: dict | None = None, timeout: float = 3.0):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's own server URL
        return json.loads(resp.read().decode("utf-8") or "null")


def _root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def probe_context(base_url: str | None, model: str = "", *, timeout: float = 3.0) -> ServerContext | None:
    """Ask the server how long its context is: llama.cpp `GET /props` (and `/slots`), Ollama `POST /api/show`,
    vLLM `GET /v1/models` (max_model_len). None when it does not say (or for hosted APIs)."""
    if not base_url or not is_local_url(base_url) and not os.environ.get("TUNEPILOT_PROBE_CONTEXT"):
        return None
    root, v1 = _root(base_url), base_url.rstrip("/")
    probes = []

    def llamacpp_props():
        data = _get_json(f"{root}/props", timeout=timeout)
        n = (data.get("default_generation_settings") or {}).get("n_ctx") or data.get("n_ctx")
        return n, "llama.cpp /props n_ctx"

    def llamacpp_slots():
        data = _get_json(f"{root}/slots", timeout=timeout)
        n = data[0].get("n_ctx") if isinstance(data, list) and data and isinstance(data[0], dict) else None
        return n, "llama.cpp /slots n_ctx"

    def ollama_show():
        data = _get_json(f"{root}/api/show", data={"model": model, "name": model}, timeout=timeout)
        params = str(data.get("parameters") or "")
        for line in params.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "num_ctx" and parts[1].isdigit():
                return int(parts[1]), "Ollama /api/show num_ctx"
        # without num_ctx Ollama runs a default context far below the model's own length
        default = os.environ.get("OLLAMA_CONTEXT_LENGTH")
        if default and default.isdigit():
            return int(default), "OLLAMA_CONTEXT_LENGTH"
        info = data.get("model_info") or {}
        trained = next((v for k, v in info.items() if k.endswith("context_length")), None)
        return (4096 if trained else None), "Ollama default num_ctx (model trained for %s)" % trained

    def vllm_models():
        data = _get_json(f"{v1}/models", timeout=timeout)
        for row in data.get("data", []) if isinstance(data, dict) else []:
            if isinstance(row, dict) and row.get("max_model_len") and (not model or row.get("id") == model or len(data["data"]) == 1):
                return row["max_model_len"], "vLLM /v1/models max_model_len"
        return None, ""

    probes = [llamacpp_props, llamacpp_slots, ollama_show, vllm_models]
    for probe in probes:
        try:
            n, source = probe()
        except (urllib.error.URLError, OSError, ValueError, AttributeError, TypeError, KeyError):
            continue
        if isinstance(n, (int, float)) and n > 0:
            return ServerContext(int(n), source)
    return None


def check_context(chat_model, prompt_tokens: int) -> ServerContext | None:
    """The server's context (when it tells); a clear TunepilotError when even the first prompt does not fit."""
    from prompts import render

    from agent.prompt_budget import ANSWER_RESERVE_TOKENS

    env = os.environ.get(ENV_CONTEXT, "").strip()
    if env:
        if not env.isdigit():
            raise TunepilotError(f"{ENV_CONTEXT}={env!r}: give the server's context in tokens, e.g. {ENV_CONTEXT}=16384")
        ctx = ServerContext(int(env), ENV_CONTEXT)
    else:
        ctx = probe_context(getattr(chat_model, "tunepilot_base_url", None), getattr(chat_model, "tunepilot_model_name", "") or "")
    if ctx is not None and ctx.tokens < prompt_tokens + ANSWER_RESERVE_TOKENS:
        need = prompt_tokens + ANSWER_RESERVE_TOKENS
        suggest = max(8192, 1 << (need * 2 - 1).bit_length())
        raise TunepilotError(render("context_too_small", n_ctx=ctx.tokens, source=ctx.source, needed=need, suggest=suggest))
    return ctx


def is_context_overflow(exc: BaseException) -> bool:
    """True for a server's 'prompt is longer than the context' refusal (OpenAI, vLLM, llama.cpp, Ollama wordings)."""
    text = str(exc).lower()
    names = {c.__name__ for c in type(exc).__mro__}
    if not ({"BadRequestError", "APIStatusError", "APIError", "UnprocessableEntityError"} & names):
        return False
    return any(k in text for k in ("context length", "context_length", "context window", "maximum context", "n_ctx",
                                   "exceeds the available context", "exceed_context", "too many tokens", "prompt is too long",
                                   "input is too long", "max_model_len"))


def llm_error_message(exc: BaseException, *, spec: str | None = None) -> str:
    """One line for a chat-model fault (unreachable server, bad key, rate limit, timeout); '' if it is not one."""
    names = {c.__name__ for c in type(exc).__mro__}
    module = type(exc).__module__ or ""
    who = f" ({spec})" if spec else ""
    text = " ".join(str(exc).split())[:200]
    if "APITimeoutError" in names or "ReadTimeout" in names:
        return (f"the chat model{who} did not answer in time: a local model on a CPU can need minutes for a long prompt; "
                f"raise --llm-timeout (or {ENV_TIMEOUT}, seconds), or check that the server is up and not busy")
    if is_context_overflow(exc):
        from prompts import render

        return render("context_overflow", n_ctx=None, what_to_do="type /reset in chat (or start a new Slack thread) to begin a new conversation")
    if "APIConnectionError" in names or (module.startswith("httpx") and "ConnectError" in names):
        return f"cannot reach the chat model server{who}: is it running and is --base-url / OPENAI_BASE_URL right? ({text})"
    if "AuthenticationError" in names or "PermissionDeniedError" in names:
        return f"the chat model{who} refused the credentials: check OPENAI_API_KEY (or the provider's key variable) ({text})"
    if "RateLimitError" in names:
        return f"the chat model{who} is rate-limited or out of quota: wait, or use another --llm ({text})"
    if "NotFoundError" in names and module.startswith("openai"):
        return f"the chat model server{who} does not know this model: check the model name in --llm ({text})"
    status = getattr(exc, "status_code", None)
    if status in (502, 503, 504) and ("APIStatusError" in names or "InternalServerError" in names):
        return (f"the chat model server{who} (or a proxy in front of it) answered HTTP {status}: it is not ready or "
                "overloaded; is the model still loading? Try again in a moment")
    if "APIStatusError" in names or "APIError" in names or "BadRequestError" in names:
        return f"the chat model{who} returned an error: {text}"
    if module.startswith("openai") and ("credentials" in text.lower() or "api_key" in text.lower()):
        return f"no API key for the chat model{who}: set OPENAI_API_KEY, or use --base-url for a local server"
    return ""
