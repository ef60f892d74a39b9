"""tools/peft_config.py: configs that load into real peft/transformers, names from the module tree."""

from __future__ import annotations

import pytest

from tools.models import hf_config, spec_from_config
from tools.peft_config import PeftConfigError, PeftConfigResult, attention_modules, linear_modules, peft_config
from tools.schemas import TrainingSetup

TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
TINY_GPT2 = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 3,
    "n_head": 4, "vocab_size": 256, "n_positions": 128, "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def llama():
    return spec_from_config(dict(TINY_LLAMA), "tiny/llama", "test")


@pytest.fixture(scope="module")
def gpt2():
    return spec_from_config(dict(TINY_GPT2), "tiny/gpt2", "test")


def _real_model(spec, task="causal-lm", num_labels=2):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = hf_config(spec)
    if task == "sequence-classification":
        cfg.num_labels = num_labels
        cfg.pad_token_id = 0
        return transformers.AutoModelForSequenceClassification.from_config(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _wrap(spec, result: PeftConfigResult, task="causal-lm", num_labels=2):
    import peft

    model = _real_model(spec, task, num_labels)
    pm = peft.get_peft_model(model, peft.LoraConfig(**result.lora_config))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return pm, trainable


def test_module_names_come_from_the_llama_tree(llama):
    assert linear_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert attention_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_gpt2_conv1d_names_and_unambiguous_attention_targets(gpt2):
    # GPT-2 uses Conv1D, and 'c_proj' exists both in attention and in the MLP
    assert linear_modules(gpt2) == ["c_attn", "c_proj", "c_fc"]
    names = attention_modules(gpt2)
    assert names == ["c_attn", "attn.c_proj"]
    setup = TrainingSetup(model_id=gpt2.model_id, target_modules=names, r=8, lora_alpha=16)
    result = peft_config(gpt2, setup)
    pm, trainable = _wrap(gpt2, result)
    wrapped = {n for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and all(".attn." in n for n in wrapped)
    assert not any(".mlp." in n for n in wrapped)
    assert trainable == result.trainable_parameters


@pytest.mark.parametrize("targets", ["all-linear", "attention"])
def test_lora_config_wraps_a_real_llama_and_counts_match(llama, targets):
    tm = "all-linear" if targets == "all-linear" else attention_modules(llama)
    setup = TrainingSetup(model_id=llama.model_id, method="lora", r=8, lora_alpha=16, target_modules=tm)
    result = peft_config(llama, setup)
    pm, trainable = _wrap(llama, result)
    assert trainable == result.trainable_parameters
    assert result.total_parameters == sum(p.numel() for p in pm.parameters())
    wrapped = {n.rsplit(".", 1)[-1] for n, m in pm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert wrapped == set(result.target_modules)
    assert "lm_head" not in result.target_modules


def test_dora_counts_magnitude_vectors(llama):
    plain = peft_config(llama, TrainingSetup(model_id=llama.model_id, r=8, lora_alpha=8))
    dora = peft_config(llama, TrainingSetup(model_id=llama.model_id, r=8, lora_alpha=8, use_dora=True))
    _, trainable = _wrap(llama, dora)
    assert trainable == dora.trainable_parameters > plain.trainable_parameters
    assert any("DoRA" in g for g in dora.guidance)


def test_sequence_classification_counts_the_head(llama):
    setup = TrainingSetup(model_id=llama.model_id, task="sequence-classification", num_labels=3, r=8, lora_alpha=16)
    result = peft_config(llama, setup)
    assert result.lora_config["task_type"] == "SEQ_CLS"
    _, trainable = _wrap(llama, result, task="sequence-classification", num_labels=3)
    assert trainable == result.trainable_parameters


def test_qlora_bnb_config_constructs_and_python_execs(llama):
    import torch
    import transformers
    import peft

    setup = TrainingSetup(
        model_id=llama.model_id, method="qlora", load_in_4bit=True, r=16, lora_alpha=32,
        bnb_4bit_quant_storage="bf16", num_gpus=2, fsdp="full_shard",
    )
    result = peft_config(llama, setup)
    bnb = transformers.BitsAndBytesConfig(**result.bnb_config)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb.bnb_4bit_quant_storage == torch.bfloat16
    namespace: dict = {}
    exec(compile(result.python, "<generated>", "exec"), namespace)
    assert isinstance(namespace["bnb_config"], transformers.BitsAndBytesConfig)
    assert isinstance(namespace["lora_config"], peft.LoraConfig)
    assert namespace["lora_config"].r == 16
    assert set(namespace["lora_config"].target_modules) == set(result.target_modules)
    assert namespace["bnb_config"].bnb_4bit_quant_storage == torch.bfloat16
    assert any("30%" in g for g in result.guidance)


def test_fp16_gpu_and_fsdp_storage_guidance(llama):
    setup = TrainingSetup(
        model_id=llama.model_id, method="qlora", load_in_4bit=True, bf16=False, fp16=True, dtype="fp16",
        bnb_4bit_compute_dtype="fp16", num_gpus=2, zero_stage=3,
    )
    result = peft_config(llama, setup)
    assert result.bnb_config["bnb_4bit_compute_dtype"] == "float16"
    # ZeRO-3 cannot shard uint8-stored 4-bit weights: the guidance says what to set
    assert any(g.startswith("bnb_4bit_quant_storage") and "fp16" in g for g in result.guidance)


def test_rank_alignment_and_alpha_guidance(llama):
    odd = peft_config(llama, TrainingSetup(model_id=llama.model_id, r=12, lora_alpha=24))
    assert any("r=12 is neither" in g and "r=16" in g for g in odd.guidance)
    aligned = peft_config(llama, TrainingSetup(model_id=llama.model_id, r=64, lora_alpha=16, use_rslora=True))
    assert any("power of two" in g for g in aligned.guidance)
    assert any("sqrt(r) = 2.00" in g for g in aligned.guidance)


def test_full_fine_tuning_has_no_adapter(llama):
    result = peft_config(llama, TrainingSetup(model_id=llama.model_id, method="full"))
    assert result.lora_config is None and result.bnb_config is None
    assert result.trainable_parameters == llama.num_parameters
    compile(result.python, "<generated>", "exec")


def test_unknown_target_module_names_the_field(llama):
    with pytest.raises(PeftConfigError, match="target_modules: c_attn not found.*q_proj"):
        peft_config(llama, TrainingSetup(model_id=llama.model_id, target_modules=["c_attn"]))


def test_unsupported_method_is_a_clear_error(llama):
    with pytest.raises(PeftConfigError, match="method: 'ia3'"):
        peft_config(llama, TrainingSetup(model_id=llama.model_id, method="ia3"))


def test_full_depth_count_extrapolates_exactly():
    # 1- and 2-layer meta models give the full-depth count: check against peft on a 5-layer real model
    spec = spec_from_config(dict(TINY_LLAMA, num_hidden_layers=5), "tiny/llama5", "test")
    result = peft_config(spec, TrainingSetup(model_id=spec.model_id, r=4, lora_alpha=8))
    _, trainable = _wrap(spec, result)
    assert trainable == result.trainable_parameters


@pytest.mark.gpu
def test_qlora_configs_load_a_real_4bit_model_on_cuda(llama, tmp_path):
    import peft
    import torch
    import transformers

    setup = TrainingSetup(model_id=llama.model_id, method="qlora", load_in_4bit=True, r=8, lora_alpha=16)
    result = peft_config(llama, setup)
    _real_model(llama).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.BitsAndBytesConfig(**result.bnb_config), device_map={"": 0}
    )
    model = peft.prepare_model_for_kbit_training(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(**result.lora_config))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == result.trainable_parameters
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    pm(input_ids=ids, labels=ids).loss.backward()


# --- LoRA on fused MoE experts: peft's ParamWrapper refuses dropout ---------------------------------

TINY_MIXTRAL = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def mixtral():
    return spec_from_config(dict(TINY_MIXTRAL), "tiny/mixtral", "test")


def test_moe_all_linear_lora_gets_zero_dropout_because_real_peft_refuses_it(mixtral, llama):
    import peft
    import transformers

    from tools.peft_config import adapts_fused_experts, supported_lora_dropout

    st = TrainingSetup(model_id="tiny/mixtral", method="lora", lora_dropout=0.05)
    assert adapts_fused_experts(mixtral, st)
    # the rule mirrors the real library: all-linear wraps the fused experts, and then dropout is refused
    cfg = hf_config(mixtral)
    with pytest.raises(ValueError, match="dropout"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg),
                            peft.LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM"))
    fixed, note = supported_lora_dropout(mixtral, st)
    assert fixed.lora_dropout == 0.0 and "ParamWrapper" in note
    peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg),
                        peft.LoraConfig(r=8, target_modules="all-linear", lora_dropout=fixed.lora_dropout, task_type="CAUSAL_LM"))
    # attention-only adapters and dense models keep their dropout
    attn_only = st.model_copy(update={"target_modules": ["q_proj", "v_proj"]})
    assert supported_lora_dropout(mixtral, attn_only) == (attn_only, None)
    dense = TrainingSetup(model_id="tiny/llama", method="lora", lora_dropout=0.05)
    assert supported_lora_dropout(llama, dense) == (dense, None)


def test_moe_estimate_is_simulated_with_zero_dropout_and_says_so(mixtral):
    from tools.estimator import estimate

    est = estimate(mixtral, TrainingSetup(model_id="tiny/mixtral", method="lora", lora_dropout=0.05, max_length=64))
    assert est.tier == "simulated"
    assert any("lora_dropout 0.05 will be refused by peft" in n for n in est.provenance)


def test_attention_kernels_transformers_refuses_are_replaced_by_eager():
    """Gemma-2 has no sdpa and BLOOM neither sdpa nor flash-attention in transformers: they load only as eager."""
    import transformers

    from tools.estimator import estimate
    from tools.models import lookup_model
    from tools.peft_config import attention_support, supported_attention

    bloom, gemma2, llama = (lookup_model(m, hub=False) for m in
                            ("bigscience/bloom-560m", "google/gemma-2-2b", "meta-llama/Llama-3.1-8B"))
    assert attention_support("bloom") == (False, False)
    assert attention_support("gemma2") == (False, True)
    assert attention_support("llama") == (True, True)
    # the rule is transformers' own: loading with the refused kernel raises
    cfg = transformers.AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=4, vocab_size=64)
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    st = TrainingSetup(model_id="x", method="lora", max_length=128)
    fixed, note = supported_attention(gemma2, st)
    assert fixed.attn_implementation == "eager" and "flash_attention_2" in note
    assert supported_attention(gemma2, st.model_copy(update={"attn_implementation": "flash_attention_2"}))[1] is None
    assert supported_attention(llama, st) == (st, None)
    est = estimate(bloom, st.model_copy(update={"model_id": bloom.model_id}))
    assert est.tier == "simulated" and any("no sdpa attention for bloom" in n for n in est.provenance)
