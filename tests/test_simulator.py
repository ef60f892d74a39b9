"""tools.simulator against real CPU training steps of tiny real transformers/peft models."""

from __future__ import annotations

import pytest

from tests._simulator_helpers import real_step, setup, tiny_spec
from tools.schemas import STEP_CATEGORIES, TunepilotError
from tools.simulator import simulate


def _check_shape(mem):
    assert mem.tier == "simulated"
    assert set(mem.peak_breakdown) == set(STEP_CATEGORIES)
    assert sum(mem.peak_breakdown.values()) == mem.peak_bytes
    assert mem.peak_phase in ("forward", "backward", "optimizer")


# full + adamw (foreach), LoRA + fused adamw, full + sgd, LoRA + bnb 8-bit; checkpointing on and off
REAL_CASES = [
    dict(method="full", optim="adamw_torch", gradient_checkpointing=False),
    dict(method="lora", optim="adamw_torch_fused", gradient_checkpointing=True),
    dict(method="full", optim="sgd", gradient_checkpointing=True, dtype="fp32", bf16=False),
    dict(method="lora", optim="adamw_bnb_8bit", gradient_checkpointing=False, r=64),
]


@pytest.mark.parametrize("kw", REAL_CASES, ids=lambda kw: f"{kw['method']}-{kw['optim']}-ckpt{int(kw['gradient_checkpointing'])}")
def test_simulated_step_matches_real_cpu_step(kw):
    spec = tiny_spec()
    st = setup(**kw)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    _check_shape(sim)
    # resident state: exact, byte for byte
    assert sim.weights_bytes + sim.adapter_bytes == real["param_and_buffer_bytes"]
    assert sim.gradient_bytes == real["trainable_bytes"] == real["gradient_bytes"]
    assert sim.optimizer_bytes == real["optimizer_bytes"]
    assert sim.trainable_parameters == real["trainable_parameters"]
    if kw["method"] == "lora":
        assert sim.adapter_bytes == real["trainable_bytes"]
        assert sim.weights_bytes == real["param_and_buffer_bytes"] - real["trainable_bytes"]
    # the whole step peak (activations, logits, temporaries on top) agrees with the real step
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)


TINY_QWEN2_TIED = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True,
)


@pytest.mark.parametrize("kw", [dict(method="full", optim="adamw_torch", gradient_checkpointing=False),
                                dict(method="lora", optim="adamw_torch_fused")], ids=["full", "lora"])
def test_tied_embeddings_counted_once(kw):
    """A tied LM head shares the embedding matrix: one tensor, counted once (as in the real model)."""
    spec = tiny_spec(TINY_QWEN2_TIED)
    st = setup(**kw)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    assert sim.num_parameters == real["num_parameters"]
    assert sim.weights_bytes + sim.adapter_bytes == real["param_and_buffer_bytes"]
    assert sim.gradient_bytes == real["gradient_bytes"]
    assert sim.optimizer_bytes == real["optimizer_bytes"]
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)
    if kw["method"] == "full":  # extrapolated over depth too: the shared matrix is not a per-block quantity
        deep = tiny_spec(TINY_QWEN2_TIED, num_hidden_layers=4)
        assert simulate(deep, st).num_parameters == simulate(deep, st, extrapolate=False).num_parameters


TINY_BERT = dict(model_type="bert", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=8192, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
BERT_SETUP = dict(task="sequence-classification", method="full", dtype="fp32", bf16=False, attn_implementation="eager",
                  gradient_checkpointing=False, optim="adamw_torch_fused", max_length=128)


def test_bert_sequence_classification_matches_real_cpu_step():
    """Encoder, eager attention (s^2 probabilities + their dropout masks), pooler and classifier head."""
    spec = tiny_spec(TINY_BERT)
    st = setup(**BERT_SETUP)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    assert sim.num_parameters == real["num_parameters"]
    assert sim.weights_bytes == real["param_and_buffer_bytes"]
    assert sim.optimizer_bytes == real["optimizer_bytes"]
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)


@pytest.mark.parametrize("ga", [1, 2])
def test_bert_extrapolation_equals_full_simulation(ga):
    """The embedding backward is its own segment: a 1-block model's backward peak is not the deep model's kind of moment."""
    spec = tiny_spec(TINY_BERT, num_hidden_layers=6)
    st = setup(**BERT_SETUP, per_device_train_batch_size=1, gradient_accumulation_steps=ga)
    ext = simulate(spec, st)
    full = simulate(spec, st, extrapolate=False)
    assert ext.layers_simulated == [1, 2]
    assert ext.peak_bytes == pytest.approx(full.peak_bytes, rel=0.01)
    assert ext.peak_breakdown["activations"] == pytest.approx(full.peak_breakdown["activations"], rel=0.01)


def test_extrapolation_equals_full_simulation():
    spec = tiny_spec(num_hidden_layers=4)
    for kw in (dict(gradient_checkpointing=True), dict(gradient_checkpointing=False, method="full", optim="adamw_torch")):
        st = setup(**kw)
        ext = simulate(spec, st)
        full = simulate(spec, st, extrapolate=False)
        assert ext.layers_simulated == [1, 2] and full.layers_simulated == [4]
        assert ext.per_layer_bytes > 0
        assert ext.peak_bytes == pytest.approx(full.peak_bytes, rel=0.01)
        for cat in STEP_CATEGORIES:
            assert ext.peak_breakdown[cat] == pytest.approx(full.peak_breakdown[cat], rel=0.01, abs=4096)
        assert ext.num_parameters == full.num_parameters
        assert ext.optimizer_bytes == full.optimizer_bytes


def test_checkpointing_lowers_activation_peak():
    spec = tiny_spec(num_hidden_layers=4)
    on = simulate(spec, setup(gradient_checkpointing=True), extrapolate=False)
    off = simulate(spec, setup(gradient_checkpointing=False), extrapolate=False)
    assert on.peak_breakdown["activations"] * 2 < off.peak_breakdown["activations"]
    assert on.peak_bytes < off.peak_bytes


def test_eager_attention_grows_with_seq_squared():
    spec = tiny_spec(num_hidden_layers=1)
    extra = {}
    for s in (512, 1024):
        kw = dict(gradient_checkpointing=False, max_length=s, per_device_train_batch_size=1, lora_dropout=0.0)
        eager = simulate(spec, setup(attn_implementation="eager", **kw), extrapolate=False)
        sdpa = simulate(spec, setup(attn_implementation="sdpa", **kw), extrapolate=False)
        extra[s] = eager.peak_bytes - sdpa.peak_bytes
        # eager keeps at least the bf16 attention probabilities of every head: heads * s^2 * 2 bytes
        assert extra[s] >= 4 * s * s * 2
    assert extra[1024] / extra[512] == pytest.approx(4.0, rel=0.2)  # quadratic, not linear


def test_qlora_weights_are_half_a_byte_per_param():
    spec = tiny_spec(hidden_size=128, intermediate_size=512, num_hidden_layers=1)
    st = setup(method="qlora", load_in_4bit=True, optim="paged_adamw_8bit")
    q = simulate(spec, st, extrapolate=False)
    plain = simulate(spec, setup(method="lora", optim="paged_adamw_8bit"), extrapolate=False)
    _check_shape(q)
    # linear weights of the block: q,k,v,o + gate,up,down
    h, i, kv = 128, 512, 2 * 32
    linear = h * h * 2 + h * kv * 2 + 3 * h * i
    other_bf16 = plain.weights_bytes - 2 * linear  # embeddings, head, norms stay in bf16
    four_bit = q.weights_bytes - other_bf16
    per_param = four_bit / linear
    # 0.5 byte packed + 1 byte uint8 absmax per 64 (double quant) + fp32 nested absmax per 256 blocks + code tables
    assert 0.5 + 1 / 64 <= per_param < 0.5 + 1 / 64 + 0.01
    assert q.num_parameters == plain.num_parameters
    assert any("4-bit" in n for n in q.notes)


def test_llm_int8_weights_are_one_byte_per_param():
    spec = tiny_spec(hidden_size=128, intermediate_size=512, num_hidden_layers=1)
    q8 = simulate(spec, setup(method="lora", load_in_8bit=True), extrapolate=False)
    plain = simulate(spec, setup(method="lora"), extrapolate=False)
    _check_shape(q8)
    h, i, kv = 128, 512, 2 * 32
    linear = h * h * 2 + h * kv * 2 + 3 * h * i
    rows = h + kv + kv + h + i + i + h  # q, k, v, o, gate, up, down output rows: one fp32 scale each
    other_bf16 = plain.weights_bytes - 2 * linear
    assert q8.weights_bytes - other_bf16 == linear + 4 * rows
    assert q8.adapter_bytes == plain.adapter_bytes // 2  # trl casts adapters of a quantized model to bf16


def test_8bit_adam_state_is_a_quarter_of_fp32_adam():
    spec = tiny_spec(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=512)
    kw = dict(method="full", dtype="fp32", bf16=False, gradient_checkpointing=True)
    a8 = simulate(spec, setup(optim="adamw_bnb_8bit", **kw), extrapolate=False)
    a32 = simulate(spec, setup(optim="adamw_torch", **kw), extrapolate=False)
    n = a8.trainable_parameters
    assert a32.optimizer_bytes / n == pytest.approx(8.0, abs=0.01)
    # 2 x uint8 + fp32 absmax per 256 elements; norm weights (< 4096 elements) keep fp32 states
    assert 2.0 < a8.optimizer_bytes / n < 2.2


@pytest.mark.parametrize("kw", [dict(method="ia3"), dict(method="prompt-tuning"),
                                dict(method="prefix-tuning", gradient_checkpointing=False),
                                dict(method="lora", task="sequence-classification", r=4)], ids=lambda kw: f"{kw['method']}-{kw.get('task', 'causal-lm')}")
def test_peft_methods_and_tasks_run(kw):
    spec = tiny_spec()
    mem = simulate(spec, setup(**kw), extrapolate=False)
    _check_shape(mem)
    share = 10 if kw["method"] != "lora" else 2  # prompt/IA3 vectors are tiny; LoRA r=16 on a 64-wide toy is not
    assert 0 < mem.adapter_bytes < mem.weights_bytes / share
    assert 0 < mem.trainable_parameters < mem.num_parameters / share
    # fp32 adapters, two fp32 Adam moments (+ a 4-byte step counter per tensor for fused AdamW)
    assert 2 * mem.adapter_bytes <= mem.optimizer_bytes <= 2 * mem.adapter_bytes + 4 * 32


def test_moe_model_runs():
    cfg = dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=256, num_experts=4, num_experts_per_tok=2)
    spec = tiny_spec(cfg)
    ext = simulate(spec, setup(method="full", optim="adamw_torch_fused"))
    _check_shape(ext)
    assert ext.layers_simulated == [1, 2]
    assert any("MoE experts" in n for n in ext.notes)
    # full FT in bf16: AdamW moments in the parameter dtype (bf16), 2 x the weights (+ step counters)
    assert ext.optimizer_bytes == pytest.approx(2 * ext.weights_bytes, rel=1e-3)


def test_eval_peak_reported_only_when_evaluating():
    spec = tiny_spec()
    assert simulate(spec, setup(), extrapolate=False).eval_peak_bytes is None
    mem = simulate(spec, setup(eval_strategy="epoch", prediction_loss_only=False), extrapolate=False)
    assert mem.weights_bytes + mem.adapter_bytes + mem.optimizer_bytes < mem.eval_peak_bytes < mem.peak_bytes


def test_unsupported_setups_raise_one_clear_error():
    spec = tiny_spec()
    with pytest.raises(TunepilotError, match="optim"):
        simulate(spec, setup(optim="adamw_torch_8bit"))
    with pytest.raises(TunepilotError, match="method"):
        simulate(spec, setup(method="ia3", load_in_8bit=True))
    with pytest.raises(TunepilotError, match="gradient_checkpointing"):
        simulate(spec, setup(method="prefix-tuning", gradient_checkpointing=True))
    with pytest.raises(TunepilotError, match="model.config"):
        simulate(spec.model_copy(update={"config": {}}), setup())


def test_cache_returns_equal_result_fast():
    spec = tiny_spec()
    st = setup(optim="sgd")
    first = simulate(spec, st, extrapolate=False)
    again = simulate(spec, st.model_copy(update={"learning_rate": 1e-5, "output_dir": "x"}), extrapolate=False)
    assert again.peak_breakdown == first.peak_breakdown
    assert any("cache" in n for n in again.notes) and again.seconds < 0.1  # served from the cache, not re-run
    other = simulate(spec, st.model_copy(update={"lora_dropout": 0.0}), extrapolate=False)
    assert not any("cache" in n for n in other.notes)
    assert other.peak_bytes < first.peak_bytes  # no dropped copy of the LoRA input


def test_cache_key_keeps_fields_that_change_memory():
    """lora_dropout 0 (peft's Identity: no mask, no dropped copy) vs 0.1, and weight decay under foreach SGD."""
    spec = tiny_spec()
    kw = dict(gradient_checkpointing=False, optim="sgd")
    d0 = simulate(spec, setup(lora_dropout=0.0, **kw), extrapolate=False)
    d1 = simulate(spec, setup(lora_dropout=0.1, **kw), extrapolate=False)
    assert not any("cache" in n for n in d1.notes)
    assert d1.peak_breakdown["activations"] > d0.peak_breakdown["activations"]
    st = setup(method="full", dtype="fp32", bf16=False, max_length=8, per_device_train_batch_size=1, **kw)
    no_wd = simulate(spec, st, extrapolate=False)
    wd = simulate(spec, st.model_copy(update={"weight_decay": 0.01}), extrapolate=False)
    assert not any("cache" in n for n in wd.notes)
    # foreach SGD adds the decay out of place: one more copy of the decayed gradients at the step
    assert wd.peak_bytes > no_wd.peak_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(method="lora", optim="adamw_torch_fused"),
                                dict(method="full", optim="adamw_torch", gradient_checkpointing=False)],
                         ids=["lora-fused-ckpt", "full-foreach-nockpt"])
def test_simulated_peak_matches_cuda_max_memory_allocated(kw):
    """On a real GPU: the raw simulated peak vs torch.cuda.max_memory_allocated of the same step."""
    cfg = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
    spec = tiny_spec(cfg)
    st = setup(max_length=1024, **kw)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st, device="cuda")
    assert sim.gradient_bytes == real["gradient_bytes"]
    assert sim.optimizer_bytes == pytest.approx(real["optimizer_bytes"], rel=1e-3)
    # CUDA-only extras (cuBLAS workspace, attention kernels' logsumexp, 512-byte rounding) are small here
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.10)
