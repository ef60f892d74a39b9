"""The analytic tier: parameter counts against real peft models, closed-form quantization bytes,
no torch import, sub-millisecond speed, and agreement with the dry-run simulator on a grid."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.analytic import analytic_step_memory, block_linears
from tools.schemas import BYTES_PER_GIB, ModelSpec, TrainingSetup, TunepilotError

ROOT = Path(__file__).resolve().parents[1]

# small but not degenerate: GQA, untied head, vocab large enough for the loss path to matter
LLAMA = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=688,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
    tie_word_embeddings=False, max_position_embeddings=4096,
)
MISTRAL = dict(
    model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=128, intermediate_size=448,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=3000,
    tie_word_embeddings=False, max_position_embeddings=4096,
)

# an encoder: LayerNorm, ungated GELU MLP, eager attention with attention-probs dropout, pooler + classifier
BERT = dict(
    model_type="bert", architectures=["BertForMaskedLM"], hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
    num_attention_heads=4, vocab_size=4096, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
)

# MoE with fused experts: all-linear LoRA reaches them through peft's ParamWrapper (no dropout)
MIXTRAL = dict(
    model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=128, intermediate_size=256,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, num_local_experts=4,
    num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=4096,
)


def spec(cfg: dict) -> ModelSpec:
    """ModelSpec with the exact parameter count (meta instantiation of the real transformers class)."""
    from tools.models import spec_from_config

    return spec_from_config(dict(cfg), f"tiny-{cfg['model_type']}", "test")


def make_setup(**kw) -> TrainingSetup:
    base = dict(model_id="tiny", max_length=128, per_device_train_batch_size=2)
    base.update(kw)
    if base.get("method") == "qlora":
        base["load_in_4bit"] = True
    return TrainingSetup(**base)


@pytest.fixture(scope="module")
def llama() -> ModelSpec:
    return spec(LLAMA)


# --------------------------------------------------------------------------------------
# counts and closed forms
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets,use_dora", [("all-linear", False), (["q_proj", "v_proj"], True), (["down_proj"], False)])
def test_trainable_parameters_match_real_peft(llama, targets, use_dora):
    import peft
    import torch
    import transformers

    from tools.models import hf_config

    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(hf_config(llama))
    pm = peft.get_peft_model(m, peft.LoraConfig(r=8, target_modules=targets, use_dora=use_dora, task_type="CAUSAL_LM"))
    real = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    st = make_setup(method="dora" if use_dora else "lora", r=8, target_modules=targets)
    a = analytic_step_memory(llama, st)
    assert a.trainable_parameters == real
    assert a.num_parameters == llama.num_parameters + real


def test_full_weights_are_exact_bytes(llama):
    a = analytic_step_memory(llama, make_setup(method="full", dtype="bf16"))
    assert a.weights_bytes == 2 * llama.num_parameters
    assert a.gradient_bytes == 2 * llama.num_parameters
    assert a.optimizer_bytes == 4 * llama.num_parameters  # AdamW: 2 states in the parameters' dtype
    assert a.adapter_bytes == 0


def test_4bit_weight_bytes_closed_form(llama):
    st = make_setup(method="qlora", bnb_4bit_use_double_quant=False)
    a = analytic_step_memory(llama, st)
    lin = sum(x.fan_in * x.fan_out for x in block_linears(llama)) * llama.num_hidden_layers
    other = llama.num_parameters - lin  # embeddings, head, norms stay bf16
    n_layers = len(block_linears(llama)) * llama.num_hidden_layers
    expected = lin // 2 + 4 * lin // 64 + n_layers * 64 + 2 * other  # packed + fp32 absmax per 64 + nf4 code
    assert a.weights_bytes == pytest.approx(expected, rel=1e-6)
    dq = analytic_step_memory(llama, make_setup(method="qlora"))
    assert dq.weights_bytes < a.weights_bytes  # double quant saves ~0.37 bit/param
    assert (a.weights_bytes - dq.weights_bytes) / lin == pytest.approx(3 / 64 - 4 / 64 / 256, abs=0.01)


def test_8bit_optimizer_state_is_about_2_bytes_per_param(llama):
    a = analytic_step_memory(llama, make_setup(method="full", optim="adamw_bnb_8bit"))
    assert a.optimizer_bytes / a.trainable_parameters == pytest.approx(2 * (1 + 4 / 256), rel=1e-3)


def test_checkpointing_and_eager_move_activations_the_right_way(llama):
    base = analytic_step_memory(llama, make_setup(method="lora", gradient_checkpointing=False, max_length=512))
    ckpt = analytic_step_memory(llama, make_setup(method="lora", gradient_checkpointing=True, max_length=512))
    eager = analytic_step_memory(llama, make_setup(method="lora", gradient_checkpointing=False, max_length=512,
                                                   attn_implementation="eager"))
    assert ckpt.peak_bytes < base.peak_bytes < eager.peak_bytes
    # eager's s^2 scores: fp32 softmax + bf16 probabilities per head and layer
    s2 = 2 * llama.num_attention_heads * 512 * 512 * 6 * llama.num_hidden_layers
    assert eager.peak_bytes - base.peak_bytes == pytest.approx(s2 + 2 * 2 * llama.hidden_size * 2 * 512 * llama.num_hidden_layers, rel=0.25)


def test_bad_target_modules_name_the_field(llama):
    with pytest.raises(TunepilotError, match="target_modules"):
        analytic_step_memory(llama, make_setup(method="lora", target_modules=["not_a_layer"]))


def test_no_torch_import_and_sub_millisecond():
    code = (
        "import sys, time, json\n"
        "from tools.schemas import ModelSpec, TrainingSetup\n"
        "from tools.analytic import analytic_step_memory\n"
        "m = ModelSpec(model_id='x', architecture='LlamaForCausalLM', model_type='llama', num_hidden_layers=80,"
        " hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128, intermediate_size=28672,"
        " vocab_size=32000, tie_word_embeddings=False, num_parameters=68976648192, source='test')\n"
        "s = TrainingSetup(model_id='x', method='qlora', load_in_4bit=True)\n"
        "analytic_step_memory(m, s)\n"
        "best = 1e9\n"
        "for _ in range(5):\n"
        "    t = time.perf_counter()\n"
        "    for _ in range(100): analytic_step_memory(m, s)\n"
        "    best = min(best, (time.perf_counter() - t) / 100 * 1000)\n"
        "print(json.dumps({'ms': best, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] is False
    assert res["ms"] < 1.0


def test_70b_qlora_is_in_the_published_range():
    # Llama-2-70B QLoRA: 4-bit weights ~35-37 GiB resident (QLoRA paper: 70B fits a 48 GB GPU)
    m = ModelSpec(model_id="x", architecture="LlamaForCausalLM", model_type="llama", num_hidden_layers=80,
                  hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                  intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False,
                  num_parameters=68976648192, source="test")
    a = analytic_step_memory(m, make_setup(method="qlora", max_length=512, per_device_train_batch_size=1))
    assert 33 < a.weights_bytes / BYTES_PER_GIB < 38
    assert a.peak_bytes / BYTES_PER_GIB < 46


# --------------------------------------------------------------------------------------
# agreement with the simulator (the point of the analytic tier)
# --------------------------------------------------------------------------------------

GRID = [
    ("llama", dict(method="full", gradient_checkpointing=False, max_length=256, gradient_accumulation_steps=2)),
    ("llama", dict(method="lora", gradient_checkpointing=False, max_length=256)),
    ("llama", dict(method="lora", gradient_checkpointing=True, r=64, per_device_train_batch_size=1)),
    ("llama", dict(method="qlora", gradient_checkpointing=True, max_length=256)),
    ("llama", dict(method="qlora", gradient_checkpointing=False, optim="paged_adamw_8bit")),
    ("llama", dict(method="dora", gradient_checkpointing=False, per_device_train_batch_size=1)),
    ("mistral", dict(method="full", optim="adamw_torch", max_length=64, per_device_train_batch_size=4)),
    ("mistral", dict(method="lora", lora_dropout=0.0, target_modules=["q_proj", "v_proj"], attn_implementation="eager",
                     gradient_checkpointing=False, max_length=256)),
    ("bert", dict(task="sequence-classification", method="full", dtype="fp32", bf16=False, attn_implementation="eager",
                  gradient_checkpointing=False, max_length=256, per_device_train_batch_size=4)),
    # trl's padding-free packing: one row of b*s tokens and transformers' block-diagonal mask
    ("llama", dict(method="lora", packing=True, gradient_checkpointing=False, max_length=256, per_device_train_batch_size=4)),
    ("llama", dict(method="lora", packing=True, gradient_checkpointing=True, max_length=512, per_device_train_batch_size=4)),
    ("mixtral", dict(method="lora", lora_dropout=0.0, gradient_checkpointing=True)),
    ("mixtral", dict(method="lora", lora_dropout=0.0, gradient_checkpointing=False)),
    # QLoRA on fused experts: bnb converts nn.Linear only, the 3-D experts stay dense in the load dtype
    ("mixtral", dict(method="qlora", lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    # loss paths (issue 12): transformers' full logits, Liger's chunks, CCE; Liger's layer kernels; trl's offloading
    ("llama", dict(method="lora", loss_impl="hf", gradient_checkpointing=False, max_length=256)),
    ("llama", dict(method="full", loss_impl="liger", max_length=256)),
    ("llama", dict(method="lora", loss_impl="cce", gradient_checkpointing=False, max_length=256)),
    ("llama", dict(method="lora", use_liger_kernel=True, gradient_checkpointing=False, max_length=256)),
    ("llama", dict(method="lora", activation_offloading=True, gradient_checkpointing=False, max_length=512)),
    ("llama", dict(method="qlora", activation_offloading=True, max_length=512)),
]


@pytest.mark.parametrize("name,kw", GRID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRID)])
def test_analytic_within_10pct_of_simulator(name, kw):
    simulator = pytest.importorskip("tools.memory")
    m = spec({"llama": LLAMA, "mistral": MISTRAL, "bert": BERT, "mixtral": MIXTRAL}[name])
    st = make_setup(**kw)
    sim = simulator.simulate(m, st)
    ana = analytic_step_memory(m, st)
    if name == "bert":  # the spec counts BertForMaskedLM (MLM transform); seq-cls has pooler + classifier instead
        assert ana.trainable_parameters == pytest.approx(sim.trainable_parameters, rel=2e-3)
    else:
        assert ana.trainable_parameters == sim.trainable_parameters
    assert ana.weights_bytes == pytest.approx(sim.weights_bytes, rel=0.02)
    assert ana.optimizer_bytes == pytest.approx(sim.optimizer_bytes, rel=0.05)
    err = (ana.peak_bytes - sim.peak_bytes) / sim.peak_bytes
    assert abs(err) <= 0.10, f"analytic {ana.peak_bytes} vs simulated {sim.peak_bytes} ({100 * err:+.1f}%)"


def test_dropout_masks_are_one_byte_in_both_tiers(llama):
    """LoRA dropout costs the same in both tiers: a 1-byte mask (CUDA's fused kernel) per adapter input element."""
    simulator = pytest.importorskip("tools.memory")
    delta = {}
    for tier in ("simulated", "analytic"):
        peaks = []
        for d in (0.0, 0.1):
            st = make_setup(method="lora", gradient_checkpointing=False, lora_dropout=d, max_length=256)
            mem = simulator.simulate(llama, st) if tier == "simulated" else analytic_step_memory(llama, st)
            peaks.append(mem.peak_breakdown["activations"])
        delta[tier] = peaks[1] - peaks[0]
    assert delta["analytic"] == delta["simulated"] > 0
    # the mask itself: 1 byte per element of every adapter's input, in every block but the first
    # (whose input, the frozen embeddings, needs no gradient: no mask kept for q/k/v)
    tokens, h, inter, L = 2 * 256, LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["num_hidden_layers"]
    per_block = 6 * h + inter  # q,k,v,o,gate,up read h-wide inputs, down reads the intermediate
    masks = tokens * (per_block * L - 3 * h)
    # under bf16 autocast lora_A saves its bf16 cast of the input with or without dropout: only the masks differ
    assert delta["analytic"] == masks


def test_qlora_with_fp32_embeddings_keeps_an_fp32_residual_stream(llama):
    """4-bit base with fp32 embeddings/norms (peft's prepare_model_for_kbit_training, trl 2024): fp32 layer inputs."""
    simulator = pytest.importorskip("tools.memory")
    st = make_setup(method="qlora", dtype="fp32", gradient_checkpointing=True, max_length=1024, per_device_train_batch_size=4)
    sim = simulator.simulate(llama, st)
    ana = analytic_step_memory(llama, st)
    assert ana.peak_bytes == pytest.approx(sim.peak_bytes, rel=0.05)


# --------------------------------------------------------------------------------------
# module names of every catalog family (the analytic tier must speak each family's names)
# --------------------------------------------------------------------------------------

def _catalog_families() -> list[ModelSpec]:
    from tools.models import catalog

    seen: dict[str, ModelSpec] = {}
    for m in catalog():
        seen.setdefault(m.model_type, m)
    return list(seen.values())


CATALOG_FAMILIES = _catalog_families()


def _block0(net):
    import torch
    from transformers.pytorch_utils import Conv1D

    block = next(mod for name, mod in net.named_modules() if name.endswith(("layers.0", "h.0")))
    real = {}
    for name, mod in block.named_modules():
        if isinstance(mod, Conv1D):  # GPT-2: weight is [in, out]
            real[name] = (mod.weight.shape[0], mod.weight.shape[1], mod.bias is not None)
        elif isinstance(mod, torch.nn.Linear):
            real[name] = (mod.in_features, mod.out_features, mod.bias is not None)
    return block, real


@pytest.mark.parametrize("model", CATALOG_FAMILIES, ids=[m.model_type for m in CATALOG_FAMILIES])
def test_block_linears_are_the_real_module_tree_and_targets_count_like_peft(model):
    """Names, shapes and biases the analytic tier uses equal the real transformers block (built on meta from
    the catalog entry), and every one of its layer names, given as an explicit target_modules, gets
    exactly the adapters real peft puts on that block."""
    import warnings

    import peft

    from tools.analytic import _counts, _is_peft_linear
    from tools.peft_config import _build_meta

    _, real = _block0(_build_meta(model, 1))
    mine = {lin.path: (lin.fan_in, lin.fan_out, lin.bias) for lin in block_linears(model) if _is_peft_linear(lin)
            and lin.role != "router"}
    assert mine == real
    names = sorted({lin.name for lin in block_linears(model) if _is_peft_linear(lin)})
    for target in ["all-linear", *([n] for n in names)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(_build_meta(model, 1), peft.LoraConfig(r=4, target_modules=target, task_type="CAUSAL_LM"))
        block, _ = _block0(pm)
        per_block = sum(p.numel() for n, p in block.named_parameters() if p.requires_grad)
        st = make_setup(method="lora", r=4, target_modules=target)
        assert _counts(model, st).adapter_per_block == per_block, target


@pytest.mark.parametrize("model_id,target", [
    ("EleutherAI/polyglot-ko-1.3b", "query_key_value"), ("bigscience/bloom-560m", "dense_4h_to_h"),
    ("tiiuae/falcon-7b", "query_key_value"), ("openai-community/gpt2", "c_attn"), ("microsoft/phi-2", "fc1"),
    ("facebook/opt-1.3b", "out_proj"), ("microsoft/Phi-3-mini-4k-instruct", "qkv_proj"),
])
def test_fast_and_sharded_estimates_take_each_familys_names(model_id, target):
    """The reported bug: an explicit family name failed under --fast and in every ZeRO/FSDP estimate."""
    from tools.estimator import estimate
    from tools.models import lookup_model

    m = lookup_model(model_id, hub=False)
    lora = make_setup(model_id=model_id, method="lora", target_modules=[target])
    est = estimate(m, lora, fast=True)
    assert est.tier == "analytic" and est.trainable_parameters > 0
    zero3 = estimate(m, lora.model_copy(update={"num_gpus": 2, "zero_stage": 3}), fast=True)
    assert zero3.peak_allocated_gib < est.peak_allocated_gib
    assert estimate(m, lora.model_copy(update={"num_gpus": 2, "fsdp": "full_shard"}), fast=True).trainable_parameters \
        == est.trainable_parameters
    if target in ("query_key_value", "c_attn", "qkv_proj"):  # fused q/k/v: Llama's name is the wrong one here
        with pytest.raises(TunepilotError, match=f"q_proj not found.*{target}"):
            estimate(m, lora.model_copy(update={"target_modules": ["q_proj"]}), fast=True)


@pytest.mark.parametrize("model", [m for m in CATALOG_FAMILIES if m.model_type not in ("qwen3_moe", "phi3", "stablelm", "olmo2")],
                         ids=lambda m: m.model_type)
def test_ia3_defaults_are_peft_defaults(model):
    """peft's default IA3 targets differ per family (k/v/down, q/v/down, query_key_value/dense_4h_to_h, ...)."""
    import warnings

    import peft

    from tools.analytic import _counts
    from tools.peft_config import _build_meta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_build_meta(model, 1), peft.IA3Config(task_type="CAUSAL_LM"))
    block, _ = _block0(pm)
    assert _counts(model, make_setup(method="ia3")).adapter_per_block == sum(p.numel() for p in block.parameters() if p.requires_grad)
