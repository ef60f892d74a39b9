"""Regenerate tools/model_catalog.json: real config.json values of popular open causal LMs
plus their exact parameter counts (real transformers classes instantiated on the meta device).

    .venv/bin/python bench/build_model_catalog.py          # rewrite the catalog
    .venv/bin/python bench/build_model_catalog.py --check  # recount, fail on any difference

Each config below is the model repo's config.json on the Hugging Face Hub (bookkeeping keys
such as `_name_or_path` and `transformers_version` left out); `source` names the file. To add
a model, paste its config.json here and rerun; tests/test_models.py then checks every entry
instantiates and matches its stored count, and pins independently published counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------
# Shared key sets (each family's config.json keys, as the repos publish them)
# --------------------------------------------------------------------------------------

LLAMA2 = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 4096, "model_type": "llama", "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "use_cache": True, "vocab_size": 32000,
}
LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 8192, "model_type": "llama", "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}
LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA31 = {**LLAMA3, "max_position_embeddings": 131072, "mlp_bias": False, "rope_scaling": LLAMA31_ROPE}
LLAMA32 = {**LLAMA31, "rope_scaling": {**LLAMA31_ROPE, "factor": 32.0}, "tie_word_embeddings": True,
           "intermediate_size": 8192}
INSTRUCT_EOS = [128001, 128008, 128009]

QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "initializer_range": 0.02, "model_type": "qwen2",
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False,
}
QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 40960, "model_type": "qwen3", "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
GEMMA = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "initializer_range": 0.02,
    "max_position_embeddings": 8192, "model_type": "gemma", "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 256000,
}
GEMMA2 = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02, "max_position_embeddings": 8192,
    "model_type": "gemma2", "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "sliding_window_size": 4096, "torch_dtype": "float32",
    "use_cache": True, "vocab_size": 256000,
}
PHI3 = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
    "intermediate_size": 8192, "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "pad_token_id": 32000,
    "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064,
}
PHI35_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]
PHI35_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]
NEOX = {
    "architectures": ["GPTNeoXForCausalLM"], "hidden_act": "gelu", "initializer_range": 0.02,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox", "rotary_emb_base": 10000,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True,
}
POLYGLOT = {**NEOX, "bos_token_id": 0, "eos_token_id": 2, "rotary_pct": 0.5, "vocab_size": 30080}


def _l(**kw):
    return kw


MODELS: list[tuple[str, dict]] = [
    # ---- Meta Llama 2 / 3 / 3.1 / 3.2 / 3.3
    ("meta-llama/Llama-2-7b-hf", {**LLAMA2, **_l(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32)}),
    ("meta-llama/Llama-2-13b-hf", {**LLAMA2, **_l(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=40, num_key_value_heads=40)}),
    ("meta-llama/Llama-2-70b-hf", {**LLAMA2, **_l(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80, num_key_value_heads=8)}),
    ("meta-llama/Meta-Llama-3-8B", {**LLAMA3, **_l(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8)}),
    ("meta-llama/Meta-Llama-3-70B", {**LLAMA3, **_l(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.1-8B", {**LLAMA31, **_l(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.1-8B-Instruct", {**LLAMA31, **_l(eos_token_id=INSTRUCT_EOS, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.1-70B", {**LLAMA31, **_l(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.2-1B", {**LLAMA32, **_l(head_dim=64, hidden_size=2048, num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.2-1B-Instruct", {**LLAMA32, **_l(eos_token_id=INSTRUCT_EOS, head_dim=64, hidden_size=2048, num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.2-3B", {**LLAMA32, **_l(head_dim=128, hidden_size=3072, num_attention_heads=24, num_hidden_layers=28, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.2-3B-Instruct", {**LLAMA32, **_l(eos_token_id=INSTRUCT_EOS, head_dim=128, hidden_size=3072, num_attention_heads=24, num_hidden_layers=28, num_key_value_heads=8)}),
    ("meta-llama/Llama-3.3-70B-Instruct", {**LLAMA31, **_l(eos_token_id=INSTRUCT_EOS, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_hidden_layers=80, num_key_value_heads=8)}),
    # ---- Mistral
    ("mistralai/Mistral-7B-v0.1", {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000}),
    ("mistralai/Mistral-7B-Instruct-v0.3", {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32768}),
    ("mistralai/Mistral-Nemo-Base-2407", {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 1024000, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 131072}),
    ("mistralai/Mixtral-8x7B-v0.1", {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000}),
    # ---- Qwen 1.5 / 2 / 2.5 / 3
    ("Qwen/Qwen1.5-7B", {**QWEN2, **_l(hidden_size=4096, intermediate_size=11008, max_position_embeddings=32768, max_window_layers=28, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32, sliding_window=32768, vocab_size=151936)}),
    ("Qwen/Qwen2-7B", {**QWEN2, **_l(hidden_size=3584, intermediate_size=18944, max_position_embeddings=131072, max_window_layers=28, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4, sliding_window=131072, vocab_size=152064)}),
    ("Qwen/Qwen2.5-0.5B", {**QWEN2, **_l(hidden_size=896, intermediate_size=4864, max_position_embeddings=32768, max_window_layers=24, num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2, sliding_window=32768, tie_word_embeddings=True, vocab_size=151936)}),
    ("Qwen/Qwen2.5-1.5B", {**QWEN2, **_l(hidden_size=1536, intermediate_size=8960, max_position_embeddings=131072, max_window_layers=28, num_attention_heads=12, num_hidden_layers=28, num_key_value_heads=2, sliding_window=131072, tie_word_embeddings=True, vocab_size=151936)}),
    ("Qwen/Qwen2.5-3B", {**QWEN2, **_l(hidden_size=2048, intermediate_size=11008, max_position_embeddings=32768, max_window_layers=36, num_attention_heads=16, num_hidden_layers=36, num_key_value_heads=2, sliding_window=32768, tie_word_embeddings=True, vocab_size=151936)}),
    ("Qwen/Qwen2.5-7B", {**QWEN2, **_l(hidden_size=3584, intermediate_size=18944, max_position_embeddings=131072, max_window_layers=28, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4, sliding_window=131072, vocab_size=152064)}),
    ("Qwen/Qwen2.5-7B-Instruct", {**QWEN2, **_l(eos_token_id=151645, hidden_size=3584, intermediate_size=18944, max_position_embeddings=32768, max_window_layers=28, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4, sliding_window=131072, vocab_size=152064)}),
    ("Qwen/Qwen2.5-14B", {**QWEN2, **_l(hidden_size=5120, intermediate_size=13824, max_position_embeddings=131072, max_window_layers=48, num_attention_heads=40, num_hidden_layers=48, num_key_value_heads=8, rms_norm_eps=1e-05, sliding_window=131072, vocab_size=152064)}),
    ("Qwen/Qwen2.5-32B", {**QWEN2, **_l(hidden_size=5120, intermediate_size=27648, max_position_embeddings=131072, max_window_layers=64, num_attention_heads=40, num_hidden_layers=64, num_key_value_heads=8, rms_norm_eps=1e-05, sliding_window=131072, vocab_size=152064)}),
    ("Qwen/Qwen2.5-72B", {**QWEN2, **_l(hidden_size=8192, intermediate_size=29568, max_position_embeddings=131072, max_window_layers=80, num_attention_heads=64, num_hidden_layers=80, num_key_value_heads=8, rms_norm_eps=1e-05, sliding_window=131072, vocab_size=152064)}),
    ("Qwen/Qwen3-0.6B", {**QWEN3, **_l(hidden_size=1024, intermediate_size=3072, max_window_layers=28, num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, tie_word_embeddings=True)}),
    ("Qwen/Qwen3-1.7B", {**QWEN3, **_l(hidden_size=2048, intermediate_size=6144, max_window_layers=28, num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, tie_word_embeddings=True)}),
    ("Qwen/Qwen3-4B", {**QWEN3, **_l(hidden_size=2560, intermediate_size=9728, max_window_layers=36, num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8, tie_word_embeddings=True)}),
    ("Qwen/Qwen3-8B", {**QWEN3, **_l(hidden_size=4096, intermediate_size=12288, max_window_layers=36, num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8, tie_word_embeddings=False)}),
    ("Qwen/Qwen3-14B", {**QWEN3, **_l(hidden_size=5120, intermediate_size=17408, max_window_layers=40, num_attention_heads=40, num_hidden_layers=40, num_key_value_heads=8, tie_word_embeddings=False)}),
    ("Qwen/Qwen3-30B-A3B", {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936}),
    # ---- Google Gemma 1 / 2 / 3
    ("google/gemma-2b", {**GEMMA, **_l(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_hidden_layers=18, num_key_value_heads=1)}),
    ("google/gemma-7b", {**GEMMA, **_l(hidden_size=3072, intermediate_size=24576, num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=16)}),
    ("google/gemma-2-2b", {**GEMMA2, **_l(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_hidden_layers=26, num_key_value_heads=4)}),
    ("google/gemma-2-9b", {**GEMMA2, **_l(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_hidden_layers=42, num_key_value_heads=8)}),
    ("google/gemma-2-27b", {**GEMMA2, **_l(head_dim=128, hidden_size=4608, intermediate_size=36864, num_attention_heads=32, num_hidden_layers=46, num_key_value_heads=16, query_pre_attn_scalar=144)}),
    ("google/gemma-3-1b-pt", {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262144}),
    # ---- Microsoft Phi
    ("microsoft/phi-2", {
        "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0,
        "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560, "initializer_range": 0.02,
        "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "phi",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 51200}),
    ("microsoft/Phi-3-mini-4k-instruct", {**PHI3, **_l(max_position_embeddings=4096, rope_scaling=None, sliding_window=2047)}),
    ("microsoft/Phi-3.5-mini-instruct", {**PHI3, **_l(max_position_embeddings=131072, rope_scaling={"long_factor": PHI35_LONG, "short_factor": PHI35_SHORT, "type": "longrope"}, sliding_window=262144)}),
    ("microsoft/phi-4", {
        "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100265, "hidden_act": "silu", "hidden_size": 5120,
        "initializer_range": 0.02, "intermediate_size": 17920, "max_position_embeddings": 16384, "model_type": "phi3",
        "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 10,
        "original_max_position_embeddings": 16384, "pad_token_id": 100349, "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 250000, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 100352}),
    # ---- Others
    ("tiiuae/falcon-7b", {
        "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
        "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
        "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
        "parallel_attn": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 65024}),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", {**LLAMA2, **_l(hidden_size=2048, intermediate_size=5632, max_position_embeddings=2048, num_attention_heads=32, num_hidden_layers=22, num_key_value_heads=4, rope_theta=10000.0, torch_dtype="bfloat16")}),
    ("HuggingFaceTB/SmolLM2-135M", {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152}),
    ("HuggingFaceTB/SmolLM2-1.7B", {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 32, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 130000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152}),
    ("openai-community/gpt2", {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
        "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257}),
    ("facebook/opt-1.3b", {
        "_remove_final_layer_norm": False, "activation_dropout": 0.0, "activation_function": "relu",
        "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True,
        "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 8192, "hidden_size": 2048, "init_std": 0.02, "layerdrop": 0.0,
        "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 32, "num_hidden_layers": 24,
        "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "use_cache": True, "vocab_size": 50272,
        "word_embed_proj_dim": 2048}),
    ("EleutherAI/pythia-1b", {**NEOX, **_l(bos_token_id=0, eos_token_id=0, hidden_size=2048, intermediate_size=8192, num_attention_heads=8, num_hidden_layers=16, rotary_pct=0.25, vocab_size=50304)}),
    ("bigscience/bloom-560m", {
        "apply_residual_connection_post_layernorm": False, "architectures": ["BloomForCausalLM"],
        "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 1024, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True, "model_type": "bloom", "n_head": 16,
        "n_inner": None, "n_layer": 24, "offset_alibi": 100, "pad_token_id": 3, "pretraining_tp": 1,
        "skip_bias_add": True, "skip_bias_add_qkv": False, "slow_but_exact": False, "unk_token_id": 0,
        "use_cache": True, "vocab_size": 250880}),
    ("deepseek-ai/deepseek-llm-7b-base", {**LLAMA2, **_l(bos_token_id=100000, eos_token_id=100001, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=30, num_key_value_heads=32, rms_norm_eps=1e-06, rope_theta=10000.0, torch_dtype="bfloat16", vocab_size=102400)}),
    ("01-ai/Yi-6B", {**LLAMA2, **_l(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=4, pad_token_id=0, rope_theta=5000000.0, torch_dtype="bfloat16", vocab_size=64000)}),
    ("stabilityai/stablelm-2-1_6b", {
        "architectures": ["StableLmForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 100257,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "layer_norm_eps": 1e-05, "max_position_embeddings": 4096,
        "model_type": "stablelm", "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 32,
        "partial_rotary_factor": 0.25, "qk_layernorm": False, "rope_scaling": None, "rope_theta": 10000,
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": False,
        "use_qkv_bias": True, "vocab_size": 100352}),
    ("allenai/OLMo-2-1124-7B", {
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": 100352}),
    ("EleutherAI/polyglot-ko-1.3b", {**POLYGLOT, **_l(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_hidden_layers=24)}),
    ("EleutherAI/polyglot-ko-5.8b", {**POLYGLOT, **_l(hidden_size=4096, intermediate_size=16384, num_attention_heads=16, num_hidden_layers=28)}),
    ("EleutherAI/polyglot-ko-12.8b", {**POLYGLOT, **_l(hidden_size=5120, intermediate_size=20480, num_attention_heads=40, num_hidden_layers=40)}),
    ("upstage/SOLAR-10.7B-v1.0", {**LLAMA2, **_l(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=48, num_key_value_heads=8, rope_theta=10000.0, use_cache=False)}),
    ("beomi/Llama-3-Open-Ko-8B", {**LLAMA3, **_l(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8)}),
]


def build() -> dict:
    """Every catalog entry as a ModelSpec dict, counted by meta instantiation."""
    from importlib.metadata import version

    from tools.models import spec_from_config

    out = []
    for model_id, config in MODELS:
        config = dict(sorted(config.items()))
        spec = spec_from_config(config, model_id, source="catalog")
        spec.source_note = f"huggingface.co/{model_id}/blob/main/config.json"
        out.append(spec.model_dump(mode="json"))
    return {
        "about": "Real config.json values of popular open causal LMs; num_parameters counted by instantiating "
                 "the transformers class on the meta device. Regenerate with bench/build_model_catalog.py.",
        "transformers_version": version("transformers"),
        "models": out,
    }


def main(argv: list[str]) -> int:
    from tools.models import CATALOG_PATH

    t = time.perf_counter()
    data = build()
    secs = time.perf_counter() - t
    if "--check" in argv:
        old = {m["model_id"]: m["num_parameters"] for m in json.loads(CATALOG_PATH.read_text())["models"]}
        bad = [(m["model_id"], old.get(m["model_id"]), m["num_parameters"]) for m in data["models"]
               if old.get(m["model_id"]) != m["num_parameters"]]
        for row in bad:
            print("MISMATCH", *row)
        print(f"{len(data['models'])} models recounted in {secs:.1f} s; {len(bad)} mismatches")
        return 1 if bad else 0
    CATALOG_PATH.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for m in data["models"]:
        print(f"{m['model_id']:45s} {m['num_parameters']:>16,d} {m['architecture']}")
    print(f"wrote {len(data['models'])} models to {CATALOG_PATH} in {secs:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
