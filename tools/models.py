"""Model knowledge: what a model is (its config.json) and exactly how many parameters it has.

`lookup_model` resolves a reference in this order:

1. a local path: a config.json file, or a model directory that contains one;
2. the bundled catalog (`tools/model_catalog.json`): real config.json values of popular
   open causal LMs with their exact parameter counts, stored so no torch import is needed;
3. the Hugging Face cache (no network);
4. the Hub: one plain HTTP GET of config.json (with `HF_TOKEN` for gated repos), a short
   connect timeout and no retries, so an unreachable Hub fails in well under a second.

Exact counts come from instantiating the real transformers class on the meta device
(`spec_from_config`); when transformers does not know the architecture, a stated formula
is used instead and `num_parameters_method` says so.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from tools.schemas import ModelSpec, TunepilotError

CATALOG_PATH = Path(__file__).with_name("model_catalog.json")
DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TRUE = {"1", "true", "yes", "on"}


class ModelNotFoundError(TunepilotError):
    """The model reference could not be resolved (not a path, not in the catalog, not on the Hub)."""


# --------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _catalog_entries() -> tuple[ModelSpec, ...]:
    data = json.loads(CATALOG_PATH.read_text(encoding="utf-8"))
    return tuple(ModelSpec.model_validate(entry) for entry in data["models"])


def catalog() -> list[ModelSpec]:
    """Every model in the bundled catalog (real config.json values and exact parameter counts)."""
    return [m.model_copy(deep=True) for m in _catalog_entries()]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def search_catalog(query: str) -> list[ModelSpec]:
    """Catalog models whose id, model_type or architecture contain every word of the query.

    Matching ignores case and punctuation, so "qwen2.5 7b" finds Qwen/Qwen2.5-7B and
    Qwen/Qwen2.5-7B-Instruct; an empty query returns the whole catalog.
    """
    words = [_norm(w) for w in (query or "").split() if _norm(w)]
    out = []
    for m in _catalog_entries():
        hay = _norm(f"{m.model_id} {m.model_type} {m.architecture}")
        if all(w in hay for w in words):
            out.append(m.model_copy(deep=True))
    return out


def _catalog_match(ref: str) -> ModelSpec | None:
    key = ref.strip().lower()
    entries = _catalog_entries()
    for m in entries:
        if m.model_id.lower() == key:
            return m.model_copy(deep=True)
    if "/" not in key:
        hits = [m for m in entries if m.model_id.lower().split("/", 1)[-1] == key]
        if len(hits) == 1:
            return hits[0].model_copy(deep=True)
        if len(hits) > 1:
            ids = ", ".join(m.model_id for m in hits)
            raise ModelNotFoundError(f"model {ref!r} is ambiguous: it could be {ids}; give the full Hub id")
        return _base_model_match(key, entries)
    return None


_VERSION_SUFFIX = re.compile(r"^(?:v\d+(?:\.\d+)*|hf|base)?$")
_TUNED = re.compile(r"(?i)instruct|chat|\bit\b|-it$|coder|math|vision|\bvl\b")


def _base_model_match(key: str, entries) -> ModelSpec | None:
    """A name as people write it ("mistral-7b", "llama 3.1 8b") -> the one base model it names, else None.

    Punctuation and case are ignored; what may follow the name is only a version / "hf" / "base" suffix
    ("Mistral-7B" -> mistralai/Mistral-7B-v0.1), never a tuned variant (Instruct, Chat, Coder)."""
    want = _norm(key)
    if len(want) < 4 or not any(c.isdigit() for c in want):
        return None
    exact = [m for m in entries if _norm(m.model_id.split("/", 1)[-1]) == want]
    if len(exact) == 1:
        return exact[0].model_copy(deep=True)
    base = []
    for m in entries:
        short = m.model_id.split("/", 1)[-1]
        if _TUNED.search(short):
            continue
        parts = re.split(r"[-_]", short)
        for i in range(1, len(parts) + 1):  # the name up to some dash, then only a version suffix
            if _norm("-".join(parts[:i])) == want and all(_VERSION_SUFFIX.match(p.lower()) for p in parts[i:]):
                base.append(m)
                break
    return base[0].model_copy(deep=True) if len(base) == 1 else None


def suggest(ref: str, n: int = 3) -> list[str]:
    """Up to n catalog ids closest to `ref` (for "did you mean")."""
    ids = [m.model_id for m in _catalog_entries()]
    key = ref.strip().lower()
    full = {i.lower(): i for i in ids}
    short = {i.lower().split("/", 1)[-1]: i for i in ids}
    candidates = list(full) + list(short)
    picked: list[str] = []
    for cand in difflib.get_close_matches(key.split("/", 1)[-1] if "/" not in key else key, candidates, n=n * 3, cutoff=0.4):
        real = full.get(cand) or short[cand]
        if real not in picked:
            picked.append(real)
    if len(picked) < n:  # fall back to shared words ("llama 8b" -> Llama 8B models)
        words = [_norm(w) for w in re.split(r"[\s/_\-.]+", key) if _norm(w)]
        scored = sorted(ids, key=lambda i: -sum(w in _norm(i) for w in words))
        for i in scored:
            if len(picked) >= n or not words or not any(w in _norm(i) for w in words):
                break
            if i not in picked:
                picked.append(i)
    return picked[:n]


def _did_you_mean(ref: str) -> str:
    close = suggest(ref)
    return f"did you mean: {', '.join(close)}?" if close else "run `tunepilot models` to list the catalog"


# --------------------------------------------------------------------------------------
# Building a ModelSpec from a config.json
# --------------------------------------------------------------------------------------


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _text_part(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config: `text_config` for multimodal configs (gemma3), else itself."""
    text = config.get("text_config")
    if isinstance(text, dict) and text:
        return text
    return config


def _dtype_name(config: dict[str, Any]) -> str:
    dt = _first(config, "torch_dtype", "dtype") or _first(_text_part(config), "torch_dtype", "dtype")
    return str(dt).replace("torch.", "") if dt else "float32"


def _to_pretrained_config(config: dict[str, Any], **overrides: Any):
    """A transformers config for the language model described by `config` (lazy import)."""
    from transformers import AutoConfig

    text = dict(_text_part(config))
    model_type = text.get("model_type") or config.get("model_type")
    if text is not config and not text.get("model_type"):
        model_type = f"{config.get('model_type')}_text"
    if not model_type:
        raise TunepilotError("config.json has no 'model_type': it is not a transformers model config")
    text.pop("model_type", None)
    for k in ("transformers_version", "_name_or_path", "auto_map"):
        text.pop(k, None)
    if "torch_dtype" in text and "dtype" not in text:
        text["dtype"] = text.pop("torch_dtype")
    text.update(overrides)
    n = text.get("num_hidden_layers")
    for key in ("layer_types",):  # per-layer lists must follow a depth override
        if n is not None and isinstance(text.get(key), list) and len(text[key]) != n:
            text[key] = (text[key] * (n // max(len(text[key]), 1) + 1))[:n]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # legacy-value notices are not the user's business
    try:
        return AutoConfig.for_model(model_type, **text)
    except Exception as e:  # transformers raises ValueError or huggingface_hub StrictDataclass*Error
        if isinstance(e, ValueError) and "Unrecognized model" in str(e):
            raise _UnknownArchitecture(model_type) from None
        detail = " ".join(str(e).split())
        raise TunepilotError(f"config.json (model_type {model_type!r}) is invalid: {detail[:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


class _UnknownArchitecture(Exception):
    pass


def hf_config(spec: ModelSpec, **overrides: Any):
    """The transformers PretrainedConfig of a model (its language model for multimodal configs).

    Keyword overrides replace config values, e.g. `hf_config(spec, num_hidden_layers=2)` for a
    shallow copy of the same architecture; per-layer lists (layer_types) follow the new depth.
    """
    if not spec.config:
        raise TunepilotError(f"model {spec.model_id!r} carries no config; look it up with lookup_model first")
    try:
        return _to_pretrained_config(spec.config, **overrides)
    except _UnknownArchitecture as e:
        raise TunepilotError(
            f"transformers {_transformers_version()} does not know model_type {e.args[0]!r} of {spec.model_id!r}; "
            "upgrade transformers or pick a supported model"
        ) from None


def _transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # pragma: no cover - metadata missing
        return "(unknown version)"


@contextmanager
def _skip_torch_init():
    """No-op torch.nn.init while building on meta: random init of meta tensors is pure overhead
    (most of the build time). transformers' own init_weights still runs, so weight tying is untouched."""
    import torch.nn.init as init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def _meta_count(cfg) -> tuple[int, bool, str]:
    """(parameters, tied, class name) of the real transformers model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"), _skip_torch_init():
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        hf_logging.set_verbosity(verbosity)
    n = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    return n, tied, type(model).__name__


def formula_parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a Llama-style decoder from its config (the fallback when transformers lacks the class).

    Formula: embeddings V*h; per layer: attention h*(n_q*d) + 2*h*(n_kv*d) + (n_q*d)*h (no biases),
    gated MLP 3*h*i (times the experts plus an h*E router for MoE), two RMSNorm weights 2*h;
    final norm h; an untied LM head V*h.
    """
    f = _fields(config)
    h, L, V = f["hidden_size"], f["num_hidden_layers"], f["vocab_size"]
    nq, nkv, d = f["num_attention_heads"], f["num_key_value_heads"], f["head_dim"]
    attn = h * nq * d + 2 * h * nkv * d + nq * d * h
    experts = f["num_experts"]
    mlp = 3 * h * f["intermediate_size"] * max(experts, 1) + (h * experts if experts else 0)
    total = V * h + L * (attn + mlp + 2 * h) + h
    if not f["tie_word_embeddings"]:
        total += V * h
    return total


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec shape fields read straight from a raw config dict, across families' key names."""
    t = _text_part(config)
    model_type = str(t.get("model_type") or config.get("model_type") or "")
    hidden = _first(t, "hidden_size", "n_embd", "d_model", "dim")
    layers = _first(t, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first(t, "num_attention_heads", "n_head", "num_heads", "n_heads")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads)) if v is None]
    if missing:
        raise TunepilotError(f"config.json lacks {', '.join(missing)}: cannot tell the model's shape")
    if model_type == "falcon" and t.get("multi_query", True) and not t.get("new_decoder_architecture", False):
        kv = 1
    else:
        kv = _first(t, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num", default=heads)
    head_dim = _first(t, "head_dim", "kv_channels", default=hidden // heads)
    experts = int(_first(t, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", default=0) or 0)
    if experts:
        inter = _first(t, "moe_intermediate_size", "intermediate_size", "ffn_dim", default=4 * hidden)
    else:
        inter = _first(t, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", default=4 * hidden)
    tie = config.get("tie_word_embeddings", t.get("tie_word_embeddings", True))
    archs = config.get("architectures") or []
    return {
        "architecture": archs[0] if archs else "",
        "model_type": model_type,
        "num_hidden_layers": int(layers),
        "hidden_size": int(hidden),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv),
        "head_dim": int(head_dim),
        "intermediate_size": int(inter),
        "vocab_size": int(_first(t, "vocab_size", "padded_vocab_size", default=0)),
        "tie_word_embeddings": bool(tie),
        "max_position_embeddings": _first(t, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
        "num_experts": experts,
        "num_experts_per_tok": int(_first(t, "num_experts_per_tok", "moe_top_k", "top_k", default=0) or 0) if experts else 0,
        "torch_dtype": _dtype_name(config),
    }


def spec_from_config(config: dict, model_id: str, source: str) -> ModelSpec:
    """A ModelSpec from a raw config.json dict, with the exact parameter count.

    The count comes from instantiating the real transformers class on the meta device (no
    memory used; imports torch). When transformers does not know the architecture, a
    Llama-style formula is used and `num_parameters_method` is "formula".
    """
    if not isinstance(config, dict):
        raise TunepilotError(f"config for {model_id!r} must be a JSON object, got {type(config).__name__}")
    fields = _fields(config)
    try:
        cfg = _to_pretrained_config(config)
    except _UnknownArchitecture:
        cfg = None
    if cfg is not None:
        try:
            n, tied, cls_name = _meta_count(cfg)
        except Exception:  # a config transformers parses but cannot build: use the stated formula
            cfg = None
    if cfg is not None:
        fields["tie_word_embeddings"] = tied
        # the instantiated config knows the defaults config.json left out
        if getattr(cfg, "max_position_embeddings", None) is not None and fields["max_position_embeddings"] is None:
            fields["max_position_embeddings"] = cfg.max_position_embeddings
        if not fields["architecture"]:
            fields["architecture"] = cls_name
        method = "meta-instantiation"
    else:
        n, method = formula_parameter_count(config), "formula"
        if not fields["architecture"]:
            fields["architecture"] = "unknown"
    return ModelSpec(
        model_id=model_id, num_parameters=int(n), num_parameters_method=method,
        source=source, config=config, **fields,
    )


# --------------------------------------------------------------------------------------
# Resolution: local path -> catalog -> HF cache -> Hub
# --------------------------------------------------------------------------------------


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", ".")) or ref.endswith(".json") or "\\" in ref or ref.count("/") > 1


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelNotFoundError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); give a transformers config.json") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path} must hold a JSON object (a transformers config.json)")
    return data


def _local(ref: str) -> ModelSpec | None:
    path = Path(ref).expanduser()
    if not path.exists():
        if _looks_like_path(ref):
            raise ModelNotFoundError(f"no such file or directory: {ref} (give a config.json file or a model directory)")
        return None
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(f"directory {path} has no config.json; point at a model directory or a config.json file")
    else:
        cfg_path = path
    config = _read_config_file(cfg_path)
    # a model directory (or its config.json) is named by the directory, which from_pretrained loads
    model_dir = path if path.is_dir() else path.parent if path.name == "config.json" else path
    return spec_from_config(config, str(model_dir.resolve()), source=f"local:{cfg_path.resolve()}")


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _from_cache(repo: str) -> ModelSpec | None:
    cache_dir = _hub_cache_dir()
    if not (cache_dir / f"models--{repo.replace('/', '--')}").is_dir():
        return None  # nothing cached: skip importing huggingface_hub
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - core dependency
        return None
    try:
        found = try_to_load_from_cache(repo, "config.json", cache_dir=str(cache_dir))
    except Exception:  # malformed ids and unreadable caches mean "not cached"
        return None
    if not isinstance(found, str):
        return None
    return spec_from_config(_read_config_file(Path(found)), repo, source="hf-cache")


def _save_to_cache(repo: str, body: bytes, commit: str | None) -> None:
    """Store a fetched config.json in the standard HF cache layout (best effort)."""
    try:
        commit = commit if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else hashlib.sha1(body).hexdigest()
        root = _hub_cache_dir() / f"models--{repo.replace('/', '--')}"
        blob = root / "blobs" / hashlib.sha256(body).hexdigest()
        snap = root / "snapshots" / commit / "config.json"
        blob.parent.mkdir(parents=True, exist_ok=True)
        snap.parent.mkdir(parents=True, exist_ok=True)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        blob.write_bytes(body)
        if snap.exists() or snap.is_symlink():
            snap.unlink()
        try:
            snap.symlink_to(os.path.relpath(blob, snap.parent))
        except OSError:
            snap.write_bytes(body)
        (root / "refs" / "main").write_text(commit)
    except OSError:
        pass


def _http_get(url: str, headers: dict[str, str], timeout: float, connect_timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One GET with a short connect timeout and no retries (follows up to 5 redirects)."""
    import http.client
    import ssl
    import urllib.request
    from urllib.parse import urljoin, urlsplit

    if urllib.request.getproxies() and not urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
        return _http_get_via_proxy(url, headers, timeout)
    for _ in range(6):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OSError(f"bad URL {url!r}")
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=connect_timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(timeout)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path or "/", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        if resp.status in (301, 302, 303, 307, 308) and hdrs.get("location"):
            new = urljoin(url, hdrs["location"])
            if urlsplit(new).hostname != parts.hostname:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}  # no token to CDNs
            url = new
            continue
        return resp.status, hdrs, body
    raise OSError("too many redirects")


def _http_get_via_proxy(url: str, headers: dict[str, str], timeout: float) -> tuple[int, dict[str, str], bytes]:
    """The same GET through the proxy named by HTTPS_PROXY/HTTP_PROXY/ALL_PROXY (urllib honours NO_PROXY)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers=headers)
    # a private opener: urllib.request.urlopen caches a global opener with the proxies of its
    # first call, which would then route every later urlopen in the process (slack_sdk's too)
    opener = urllib.request.build_opener()
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    except urllib.error.URLError as e:
        reason = e.reason if isinstance(e.reason, OSError) else OSError(str(e.reason))
        raise reason from None


def _hub(repo: str, timeout: float) -> ModelSpec:
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    url = f"{endpoint}/{repo}/resolve/main/config.json"
    headers = {"User-Agent": "tunepilot", "Accept": "application/json"}
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        # one attempt and a connect timeout well under a second: an unreachable Hub fails fast
        code, hdrs, body = _http_get(url, headers, timeout=timeout, connect_timeout=min(timeout, 0.7))
    except (OSError, _http_exceptions()) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ModelNotFoundError(
            f"{repo!r} is not in the catalog and the Hugging Face Hub is unreachable ({endpoint}: {reason}); "
            f"give a local path to a config.json or model directory, a catalog name ({_did_you_mean(repo)}), "
            f"or pre-download it into the HF cache with `huggingface-cli download {repo} config.json`"
        ) from None
    err = hdrs.get("x-error-code", "")
    if code == 404 or err in ("RepoNotFound", "EntryNotFound", "RevisionNotFound"):
        raise ModelNotFoundError(
            f"no such repo on the Hub: {repo!r} (or it is private: set HF_TOKEN); {_did_you_mean(repo)}"
        )
    if code in (401, 403):
        how = "HF_TOKEN was refused: check it" if token else "set HF_TOKEN"
        raise ModelNotFoundError(f"{repo!r} is gated on the Hub: {how} and accept the licence at {endpoint}/{repo}")
    if code != 200:
        raise ModelNotFoundError(f"the Hub answered HTTP {code} for {url}; try again later or give a local config.json")
    try:
        config = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelNotFoundError(f"the Hub's config.json for {repo!r} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"the Hub's config.json for {repo!r} is not a JSON object")
    _save_to_cache(repo, body, hdrs.get("x-repo-commit"))
    return spec_from_config(config, repo, source="hub")


def _http_exceptions() -> type[Exception]:
    import http.client

    return http.client.HTTPException


def lookup_model(ref: str, *, hub: bool = True, timeout: float = 3.0) -> ModelSpec:
    """Resolve a model reference to a ModelSpec with its exact parameter count.

    `ref` may be a local config.json or model directory, a catalog id (case-insensitive; the
    part after the slash works when unambiguous, e.g. "Llama-3.1-8B"), or any Hub id, whose
    config.json is read from the HF cache or downloaded (HF_TOKEN for gated repos; set
    HF_HUB_OFFLINE=1 or hub=False to stay offline). Raises ModelNotFoundError with
    "did you mean" suggestions.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelNotFoundError("model: give a Hub id (e.g. 'meta-llama/Llama-3.1-8B'), a catalog name or a local path")
    ref = ref.strip()
    local = _local(ref)
    if local is not None:
        return local
    found = _catalog_match(ref)
    if found is not None:
        return found
    if not _REPO_ID.match(ref):
        raise ModelNotFoundError(f"unknown model {ref!r}: not a local path, not in the catalog; {_did_you_mean(ref)}")
    cached = _from_cache(ref)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or not hub:
        why = "HF_HUB_OFFLINE=1 is set" if hub else "Hub look-ups are off"
        raise ModelNotFoundError(
            f"{ref!r} is not in the catalog or the HF cache and {why}; give a local config.json or model directory, "
            f"a catalog name ({_did_you_mean(ref)}), or pre-download it with `huggingface-cli download {ref} config.json`"
        )
    return _hub(ref, timeout)
