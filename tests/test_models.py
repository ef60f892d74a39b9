"""Model knowledge: catalog counts, lookup order, fail-fast Hub, and the `models` / `model` CLI.

Network behaviour is tested against real HTTP servers on 127.0.0.1 (HF_ENDPOINT), never the
internet; parameter counts against real transformers classes built on the meta device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools.models import (
    ModelNotFoundError,
    catalog,
    hf_config,
    lookup_model,
    search_catalog,
    spec_from_config,
)
from tools.schemas import TunepilotError

ROOT = Path(__file__).resolve().parents[1]

# Independently published totals (model cards / Hub safetensors metadata / papers).
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "openai-community/gpt2": 124_439_808,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
}

REQUIRED = [
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B", "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.3-70B-Instruct", "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen1.5-7B", "Qwen/Qwen2-7B",
    "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-72B", "Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B",
    "google/gemma-2b", "google/gemma-7b", "google/gemma-2-9b", "google/gemma-2-27b", "google/gemma-3-1b-pt",
    "microsoft/phi-2", "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct", "microsoft/phi-4",
    "tiiuae/falcon-7b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-1.7B", "openai-community/gpt2", "facebook/opt-1.3b", "EleutherAI/pythia-1b",
    "bigscience/bloom-560m", "deepseek-ai/deepseek-llm-7b-base", "01-ai/Yi-6B", "stabilityai/stablelm-2-1_6b",
    "allenai/OLMo-2-1124-7B", "EleutherAI/polyglot-ko-1.3b", "EleutherAI/polyglot-ko-5.8b",
    "EleutherAI/polyglot-ko-12.8b", "upstage/SOLAR-10.7B-v1.0",
]

SHAPE_FIELDS = ("architecture", "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "num_experts", "num_experts_per_tok", "torch_dtype")


def tiny_llama_config(**kw) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    cfg.update(kw)
    return cfg


def llama_formula(h=64, i=160, L=3, nq=4, nkv=2, V=128, tied=False) -> int:
    d = h // nq
    per_layer = h * nq * d + 2 * h * nkv * d + nq * d * h + 3 * h * i + 2 * h
    return V * h + L * per_layer + h + (0 if tied else V * h)


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """A private HF cache and no inherited Hub settings."""
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path


class StubHub:
    """A real HTTP server on 127.0.0.1 that answers like the Hub's /resolve/main/config.json."""

    def __init__(self, files: dict[str, bytes], status: int = 200, error_code: str | None = None,
                 redirects: dict[str, str] | None = None):
        self.files, self.status, self.error_code = files, status, error_code
        self.redirects = redirects or {}
        self.requests: list[tuple[str, str | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                stub.requests.append((self.path, self.headers.get("Authorization")))
                if self.path in stub.redirects:
                    self.send_response(307)
                    self.send_header("Location", stub.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = stub.files.get(self.path)
                status = stub.status if body is not None or stub.status != 200 else 404
                self.send_response(status)
                if stub.error_code:
                    self.send_header("X-Error-Code", stub.error_code)
                if status == 200:
                    self.send_header("X-Repo-Commit", "a" * 40)
                payload = body if status == 200 else b'{"error": "stub"}'
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------


def test_catalog_holds_the_required_models_with_sources():
    models = catalog()
    ids = [m.model_id for m in models]
    assert len(models) >= 45
    assert len(set(i.lower() for i in ids)) == len(ids), "duplicate ids"
    missing = [r for r in REQUIRED if r not in ids]
    assert not missing
    for m in models:
        assert m.source == "catalog"
        assert m.source_note == f"huggingface.co/{m.model_id}/blob/main/config.json"
        assert m.config.get("model_type") == m.model_type
        assert m.num_parameters_method == "meta-instantiation"


@pytest.mark.parametrize("model_id,count", sorted(PUBLISHED.items()))
def test_stored_counts_match_published_counts(model_id, count):
    assert lookup_model(model_id, hub=False).num_parameters == count


def test_every_catalog_entry_instantiates_on_meta_and_matches_its_stored_count():
    """Recount every entry with its real transformers class at full depth on the meta device
    (one build each, ~10 s on an idle 2-core machine) and re-derive every shape field."""
    mismatches = []
    for stored in catalog():
        fresh = spec_from_config(stored.config, stored.model_id, source="catalog")
        if fresh.num_parameters != stored.num_parameters:
            mismatches.append((stored.model_id, stored.num_parameters, fresh.num_parameters))
        for f in SHAPE_FIELDS:
            if getattr(fresh, f) != getattr(stored, f):
                mismatches.append((stored.model_id, f, getattr(stored, f), getattr(fresh, f)))
    assert not mismatches, mismatches


@pytest.mark.parametrize("model_id", ["google/gemma-2-9b", "google/gemma-3-1b-pt", "openai-community/gpt2",
                                      "Qwen/Qwen3-30B-A3B", "tiiuae/falcon-7b"])
def test_shallow_hf_config_extrapolates_to_the_full_count(model_id):
    """hf_config(spec, num_hidden_layers=k) is the same architecture at depth k (what the simulator
    builds): 1 and 2 layers extrapolated linearly give exactly the full-depth count."""
    from tools.models import _meta_count

    spec = lookup_model(model_id, hub=False)
    c1, c2 = (_meta_count(hf_config(spec, num_hidden_layers=k))[0] for k in (1, 2))
    assert c1 + (spec.num_hidden_layers - 1) * (c2 - c1) == spec.num_parameters


def test_catalog_shapes_across_families():
    by_id = {m.model_id: m for m in catalog()}
    falcon = by_id["tiiuae/falcon-7b"]
    assert (falcon.num_attention_heads, falcon.num_key_value_heads, falcon.head_dim) == (71, 1, 64)  # multi_query
    gpt2 = by_id["openai-community/gpt2"]
    assert (gpt2.num_hidden_layers, gpt2.hidden_size, gpt2.intermediate_size, gpt2.tie_word_embeddings) == (12, 768, 3072, True)
    moe = by_id["Qwen/Qwen3-30B-A3B"]
    assert (moe.num_experts, moe.num_experts_per_tok, moe.intermediate_size, moe.is_moe) == (128, 8, 768, True)
    assert by_id["mistralai/Mixtral-8x7B-v0.1"].num_experts == 8
    assert by_id["google/gemma-2b"].tie_word_embeddings is True  # class default, absent from config.json
    assert by_id["meta-llama/Llama-3.2-1B"].head_dim == 64
    assert by_id["bigscience/bloom-560m"].max_position_embeddings is None  # ALiBi: no position table
    assert by_id["openai-community/gpt2"].torch_dtype == "float32"


def test_catalog_lookups_do_not_import_torch():
    code = ("import sys; from tools.models import lookup_model, search_catalog; "
            "s = lookup_model('Llama-3.1-8B'); search_catalog('qwen'); "
            "print(s.num_parameters, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["8030261248", "False", "False"], out.stderr


def test_lookup_is_case_insensitive_and_accepts_the_short_name():
    assert lookup_model("META-LLAMA/llama-3.1-8b").model_id == "meta-llama/Llama-3.1-8B"
    assert lookup_model("Llama-3.1-8B").model_id == "meta-llama/Llama-3.1-8B"
    assert lookup_model("qwen3-30b-a3b").model_id == "Qwen/Qwen3-30B-A3B"


def test_search_catalog_matches_every_word_ignoring_punctuation():
    assert [m.model_id for m in search_catalog("qwen2.5 7b")] == ["Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"]
    assert [m.model_id for m in search_catalog("moe")] == ["Qwen/Qwen3-30B-A3B"]
    assert len(search_catalog("")) == len(catalog())
    assert search_catalog("no-such-family-xyz") == []


def test_unknown_name_gets_did_you_mean():
    with pytest.raises(ModelNotFoundError) as e:
        lookup_model("Llama-3.1-8")
    assert "did you mean" in str(e.value) and "meta-llama/Llama-3.1-8B" in str(e.value)
    assert isinstance(e.value, TunepilotError)


# --------------------------------------------------------------------------------------
# Local paths and spec_from_config
# --------------------------------------------------------------------------------------


def test_local_config_file_and_directory(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(tiny_llama_config()))
    by_dir = lookup_model(str(model_dir))
    by_file = lookup_model(str(model_dir / "config.json"))
    assert by_dir.num_parameters == by_file.num_parameters == llama_formula()
    assert by_dir.model_id == by_file.model_id == str(model_dir.resolve())
    assert by_dir.source == f"local:{(model_dir / 'config.json').resolve()}"
    assert (by_dir.num_hidden_layers, by_dir.num_key_value_heads, by_dir.head_dim) == (3, 2, 16)
    assert by_dir.num_parameters_method == "meta-instantiation"


def test_local_path_errors_are_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        lookup_model(str(tmp_path))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="not valid JSON"):
        lookup_model(str(bad))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        lookup_model(str(tmp_path / "missing" / "config.json"))


def test_gpt2_style_keys_and_tied_head():
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
           "n_positions": 64, "vocab_size": 100}
    spec = spec_from_config(cfg, "tiny-gpt2", source="local:x")
    h, V, P, L = 32, 100, 64, 2
    per_layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * 4 * h + 4 * h) + (4 * h * h + h)
    assert spec.num_parameters == V * h + P * h + L * per_layer + 2 * h  # tied LM head counted once
    assert (spec.num_hidden_layers, spec.hidden_size, spec.intermediate_size, spec.tie_word_embeddings) == (2, 32, 128, True)


def test_unknown_architecture_falls_back_to_the_stated_formula():
    cfg = tiny_llama_config(model_type="mysterylm", architectures=["MysteryLMForCausalLM"])
    spec = spec_from_config(cfg, "acme/mystery", source="hub")
    assert spec.num_parameters_method == "formula"
    assert spec.num_parameters == llama_formula()  # same as the real Llama class with these shapes
    with pytest.raises(TunepilotError, match="does not know model_type 'mysterylm'"):
        hf_config(spec)


def test_multimodal_gemma3_uses_its_text_config():
    text = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 300,
            "sliding_window": 16}
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 64}, "torch_dtype": "bfloat16"}
    spec = spec_from_config(cfg, "acme/gemma3-mm", source="local:x")
    assert (spec.hidden_size, spec.num_hidden_layers, spec.head_dim, spec.vocab_size) == (64, 2, 32, 300)
    tc = hf_config(spec)
    assert type(tc).__name__ == "Gemma3TextConfig"
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tc)
    assert spec.num_parameters == sum(p.numel() for p in model.parameters())


def test_hf_config_overrides_depth_and_keeps_per_layer_lists_consistent():
    by_id = {m.model_id: m for m in catalog()}
    g2 = hf_config(by_id["google/gemma-2-9b"], num_hidden_layers=2)
    assert g2.num_hidden_layers == 2 and len(g2.layer_types) == 2
    gpt2 = hf_config(by_id["openai-community/gpt2"], num_hidden_layers=3)
    assert gpt2.n_layer == 3
    full = hf_config(by_id["meta-llama/Llama-3.1-8B"])
    assert (full.num_hidden_layers, full.num_key_value_heads, full.vocab_size) == (32, 8, 128256)


# --------------------------------------------------------------------------------------
# HF cache and the Hub (loopback stubs only)
# --------------------------------------------------------------------------------------


def test_offline_env_fails_fast_with_what_to_do(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as e:
        lookup_model("meta-llama/Llama-3.1-8b-instrukt")
    assert time.perf_counter() - t < 1.0
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "local" in msg and "meta-llama/Llama-3.1-8B-Instruct" in msg


def test_unreachable_hub_fails_in_under_a_second(hub_env, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as e:
        lookup_model("acme/llama-7b-custom")
    assert time.perf_counter() - t < 1.0
    msg = str(e.value)
    assert "unreachable" in msg and "local path" in msg and "did you mean" in msg and "huggingface-cli download" in msg


def test_hub_download_sends_token_and_fills_the_cache(hub_env, monkeypatch):
    body = json.dumps(tiny_llama_config()).encode()
    with StubHub({"/acme/tiny-llama/resolve/main/config.json": body}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        spec = lookup_model("acme/tiny-llama")
    assert spec.source == "hub" and spec.model_id == "acme/tiny-llama"
    assert spec.num_parameters == llama_formula()
    assert hub.requests == [("/acme/tiny-llama/resolve/main/config.json", "Bearer hf_test_token")]
    # the fetched file landed in the standard cache layout: found offline, no server needed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = lookup_model("acme/tiny-llama")
    assert cached.source == "hf-cache" and cached.num_parameters == spec.num_parameters


def test_hub_follows_a_relative_redirect_for_renamed_repos(hub_env, monkeypatch):
    body = json.dumps(tiny_llama_config()).encode()
    new = "/acme/new-name/resolve/main/config.json"
    with StubHub({new: body}, redirects={"/acme/old-name/resolve/main/config.json": new}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        spec = lookup_model("acme/old-name")
    assert spec.num_parameters == llama_formula()
    assert [p for p, _ in hub.requests] == ["/acme/old-name/resolve/main/config.json", new]


def test_hub_through_an_http_proxy(hub_env, monkeypatch):
    """With HTTP_PROXY set the request goes to the proxy (absolute URL), token included."""
    body = json.dumps(tiny_llama_config()).encode()
    target = "http://hub.example.invalid/acme/via-proxy/resolve/main/config.json"
    with StubHub({target: body}) as proxy:
        monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("HF_TOKEN", "hf_proxy_token")
        spec = lookup_model("acme/via-proxy")
    assert spec.num_parameters == llama_formula()
    assert proxy.requests == [(target, "Bearer hf_proxy_token")]


def test_hub_401_says_gated_and_what_to_do(hub_env, monkeypatch):
    with StubHub({}, status=401, error_code="GatedRepo") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelNotFoundError) as e:
            lookup_model("acme/gated-model")
    assert "gated" in str(e.value) and "HF_TOKEN" in str(e.value) and "licence" in str(e.value)


def test_hub_404_says_no_such_repo_with_suggestions(hub_env, monkeypatch):
    with StubHub({}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelNotFoundError) as e:
            lookup_model("Qwen/Qwen2.5-7B-Instrukt")
    assert "no such repo" in str(e.value) and "Qwen/Qwen2.5-7B-Instruct" in str(e.value)


def test_hub_false_never_touches_the_network(hub_env, monkeypatch):
    with StubHub({"/acme/x/resolve/main/config.json": b"{}"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelNotFoundError, match="Hub look-ups are off"):
            lookup_model("acme/x", hub=False)
    assert hub.requests == []


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli(*args, env_extra=None, importtime=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "agent.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_model_json_has_exact_count_and_never_imports_torch():
    out = _cli("model", "meta-llama/Llama-3.1-8B", "--json", importtime=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["num_parameters"] == 8_030_261_248
    assert data["config"]["rope_scaling"]["rope_type"] == "llama3"
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "typer" in imported  # importtime output really was captured
    assert "torch" not in imported and "transformers" not in imported


def test_cli_models_lists_the_catalog():
    out = _cli("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) >= 40 and all("config" not in r for r in rows)
    assert {"model_id", "num_parameters", "num_key_value_heads"} <= set(rows[0])
    table = _cli("models", "qwen3")
    assert table.returncode == 0 and "Qwen/Qwen3-30B-A3B" in table.stdout and "128x8" in table.stdout
    assert "Llama" not in table.stdout


def test_cli_bad_model_is_one_line_exit_2():
    out = _cli("model", "llama-3.1-8x")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean" in lines[0]


@pytest.mark.parametrize("name, model_id", [
    ("mistral-7b", "mistralai/Mistral-7B-v0.1"),  # the one base model; v0.1 is only a version
    ("Mistral-7B", "mistralai/Mistral-7B-v0.1"),
    ("llama 3.1 8b", "meta-llama/Llama-3.1-8B"),
    ("llama-2-7b", "meta-llama/Llama-2-7b-hf"),
    ("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1"),
])
def test_names_as_people_write_them_resolve_to_the_base_model(name, model_id):
    assert lookup_model(name, hub=False).model_id == model_id


def test_a_name_that_is_only_a_prefix_of_tuned_models_is_not_guessed():
    with pytest.raises(TunepilotError, match="did you mean"):
        lookup_model("llama-3-8b", hub=False)  # not in the catalog; Llama-3.1-8B is another model
    with pytest.raises(TunepilotError):
        lookup_model("qwen", hub=False)
