"""Analytic memory tier: closed-form bytes of one training step, no torch.

`analytic_step_memory(model, setup)` mirrors what the simulator (tools/memory/) sees
when it runs the real Hugging Face training step on fake tensors, one component at a time:

- the linear layers of a block under each family's real module names and shapes (`_FAMILIES`:
  fused query_key_value / c_attn / qkv_proj / gate_up_proj, dense_h_to_4h, fc1/fc2, out_proj, ...),
  so explicit target_modules match exactly what peft wraps (checked over the catalog by a test),
- weights by dtype / bitsandbytes quantization (4-bit packed + absmax + double-quant
  constants; embeddings, LM head and norms stay in the load dtype),
- LoRA / DoRA / IA3 / prompt parameters (peft stores adapters in fp32 by default:
  `autocast_adapter_dtype=True`),
- gradients and optimizer states per optimizer,
- activations: the tensors autograd saves in a decoder block (counted from a real
  transformers Llama block: RMSNorm fp32 upcasts, q/k/v/attention output + logsumexp for
  flash/SDPA, s^2 scores for eager, MLP gate/act/up/down inputs, LoRA's fp32 dropout input),
  or with gradient checkpointing the layer inputs plus one recomputed block,
- the logits and loss path (logits in compute dtype, fp32 upcast, log-softmax and its
  gradient in fp32, as `transformers.loss.ForCausalLMLoss` does),
- the optimizer-step temporaries.

The peak is the largest of a few moments of the step (loss forward, start of backward,
the recomputed block under checkpointing, end of backward, optimizer step).
Pure Python over the pydantic models: it runs in well under a millisecond.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tools.schemas import STEP_CATEGORIES, ModelSpec, StepMemory, TrainingSetup, TunepilotError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TORCH_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Conventions of the libraries the real step runs (numbers stated where they are used).
BNB_4BIT_BLOCK = 64  # bitsandbytes 4-bit blocksize (params per absmax)
BNB_NESTED_BLOCK = 256  # double quant: absmax values per fp32 second-level constant
BNB_OPTIM_BLOCK = 256  # bnb 8-bit optimizers: block-wise fp32 absmax per 256 values
BNB_MIN_8BIT_SIZE = 4096  # bnb optimizers keep tensors smaller than this in 32-bit state
# Dropout masks: CUDA's fused dropout (and the dry run, which runs the same native_dropout kernel)
# keeps a 1-byte bool mask for backward, whatever the input's dtype.
DROPOUT_MASK_BYTES = 1

# Architecture families whose MLP is not gated (fc_in -> act -> fc_out).
# Encoders (BERT family) are ungated GELU MLPs with LayerNorm too.
_ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"}
_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "codegen", "gpt_neo"} | _ENCODERS
_LAYERNORM = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "codegen", "gpt_neo",
              "stablelm"} | _ENCODERS


@dataclass(frozen=True)
class _Family:
    """Where a transformers family keeps the linear layers of one block: paths inside the block (what
    peft's target_modules match, by suffix) and which of them carry a bias.

    A bias is a bool, or (config key, default). `qkv` / `gate_up` name a fused projection (one
    Linear for q, k and v: out = (heads + 2 * kv_heads) * head_dim; one for gate and up: 2 * intermediate).
    Read from the real transformers 5 classes; tests/test_analytic.py builds every catalog family on
    meta and compares these names and shapes with the real module tree.
    """

    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None
    o: str = "self_attn.o_proj"
    gate: str | None = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    gate_up: str | None = None
    down: str = "mlp.down_proj"
    qkv_bias: object = ("attention_bias", False)
    o_bias: object = ("attention_bias", False)
    mlp_bias: object = ("mlp_bias", False)
    ia3: tuple[str, ...] = ()  # peft's default IA3 target_modules for the family (its feed-forward one last)
    ia3_ff: str = ""


_LLAMA = _Family(ia3=("k_proj", "v_proj", "down_proj"), ia3_ff="down_proj")
_QV_DOWN = dict(ia3=("q_proj", "v_proj", "down_proj"), ia3_ff="down_proj")
_NEOX_MLP = dict(gate=None, up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h")
_FAMILIES: dict[str, _Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _Family(ia3=("k_proj", "v_proj", "w2"), ia3_ff="w2"),
    "qwen2": _Family(qkv_bias=True, **_QV_DOWN),
    "qwen2_moe": _Family(qkv_bias=True),
    "qwen3": _Family(**_QV_DOWN),
    "gemma": _Family(**_QV_DOWN),
    "gemma2": _Family(**_QV_DOWN),
    "gemma3_text": _Family(**_QV_DOWN),
    "stablelm": _Family(qkv_bias=("use_qkv_bias", False), o_bias=False),
    "phi3": _Family(q=None, k=None, v=None, qkv="self_attn.qkv_proj", gate=None, up="", gate_up="mlp.gate_up_proj",
                    qkv_bias=False, o_bias=False, mlp_bias=False),
    "phi": _Family(o="self_attn.dense", gate=None, up="mlp.fc1", down="mlp.fc2", qkv_bias=True, o_bias=True, mlp_bias=True,
                   ia3=("q_proj", "v_proj", "fc2"), ia3_ff="fc2"),
    "gpt_neox": _Family(q=None, k=None, v=None, qkv="attention.query_key_value", o="attention.dense", **_NEOX_MLP,
                        qkv_bias=("attention_bias", True), o_bias=("attention_bias", True), mlp_bias=True,
                        ia3=("query_key_value", "dense_4h_to_h"), ia3_ff="dense_4h_to_h"),
    "bloom": _Family(q=None, k=None, v=None, qkv="self_attention.query_key_value", o="self_attention.dense", **_NEOX_MLP,
                     qkv_bias=True, o_bias=True, mlp_bias=True,
                     ia3=("query_key_value", "mlp.dense_4h_to_h"), ia3_ff="mlp.dense_4h_to_h"),
    "falcon": _Family(q=None, k=None, v=None, qkv="self_attention.query_key_value", o="self_attention.dense", **_NEOX_MLP,
                      qkv_bias=("bias", False), o_bias=("bias", False), mlp_bias=("bias", False),
                      ia3=("query_key_value", "dense_4h_to_h"), ia3_ff="dense_4h_to_h"),
    "gpt2": _Family(q=None, k=None, v=None, qkv="attn.c_attn", o="attn.c_proj", gate=None, up="mlp.c_fc", down="mlp.c_proj",
                    qkv_bias=True, o_bias=True, mlp_bias=True, ia3=("c_attn", "mlp.c_proj"), ia3_ff="mlp.c_proj"),
    "gpt_bigcode": _Family(q=None, k=None, v=None, qkv="attn.c_attn", o="attn.c_proj", gate=None, up="mlp.c_fc",
                           down="mlp.c_proj", qkv_bias=True, o_bias=True, mlp_bias=True,
                           ia3=("c_attn", "mlp.c_proj"), ia3_ff="mlp.c_proj"),
    "starcoder2": _Family(gate=None, up="mlp.c_fc", down="mlp.c_proj", qkv_bias=("use_bias", True),
                          o_bias=("use_bias", True), mlp_bias=("use_bias", True)),
    "opt": _Family(o="self_attn.out_proj", gate=None, up="fc1", down="fc2", qkv_bias=("enable_bias", True),
                   o_bias=("enable_bias", True), mlp_bias=("enable_bias", True), ia3=("q_proj", "k_proj", "fc2"), ia3_ff="fc2"),
    "gptj": _Family(q="attn.q_proj", k="attn.k_proj", v="attn.v_proj", o="attn.out_proj", gate=None, up="mlp.fc_in",
                    down="mlp.fc_out", qkv_bias=False, o_bias=False, mlp_bias=True,
                    ia3=("q_proj", "v_proj", "fc_out"), ia3_ff="fc_out"),
    "codegen": _Family(q=None, k=None, v=None, qkv="attn.qkv_proj", o="attn.out_proj", gate=None, up="mlp.fc_in",
                       down="mlp.fc_out", qkv_bias=False, o_bias=False, mlp_bias=True),
    "gpt_neo": _Family(q="attn.attention.q_proj", k="attn.attention.k_proj", v="attn.attention.v_proj",
                       o="attn.attention.out_proj", gate=None, up="mlp.c_fc", down="mlp.c_proj", qkv_bias=False,
                       o_bias=True, mlp_bias=True, ia3=("q_proj", "v_proj", "c_proj"), ia3_ff="c_proj"),
}
_BERT = _Family(q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
                gate=None, up="intermediate.dense", down="output.dense", qkv_bias=True, o_bias=True, mlp_bias=True,
                ia3=("key", "value", "output.dense"), ia3_ff="output.dense")
_FAMILIES.update({t: _BERT for t in _ENCODERS})
_FAMILIES["distilbert"] = _Family(q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin",
                                  gate=None, up="ffn.lin1", down="ffn.lin2", qkv_bias=True, o_bias=True, mlp_bias=True)


def family(model: ModelSpec) -> _Family:
    """The module names of `model`'s family (Llama's for families not in the table)."""
    fam = _FAMILIES.get(model.model_type)
    if fam is None:
        fam = _LLAMA if model.model_type not in _UNGATED else _Family(gate=None)
    return fam


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: its peft-visible name (last path part), shape and role."""

    name: str
    fan_in: int
    fan_out: int
    count: int = 1  # identical copies per block (MoE experts)
    bias: bool = False
    path: str = ""  # path inside the block, as in the real module tree (e.g. attention.query_key_value)
    role: str = ""  # q, k, v, qkv, o, gate, up, gate_up, down, router, expert_gate_up, expert_down, shared_*


def _cfg(model: ModelSpec, *keys, default=None):
    for k in keys:
        if k in model.config and model.config[k] is not None:
            return model.config[k]
    return default


_SHAPE_KEYS = ("attention_bias", "bias", "mlp_bias", "shared_expert_intermediate_size", "n_shared_experts",
               "num_shared_experts", "moe_intermediate_size", "use_qkv_bias", "use_bias", "enable_bias")
_LINEARS_CACHE: dict[tuple, list[Linear]] = {}


def block_linears(model: ModelSpec) -> list[Linear]:
    """The linear layers of one decoder block, from heads / kv-heads / head_dim and intermediate size."""
    key = (model.model_type, model.hidden_size, model.head_dim, model.num_attention_heads, model.num_key_value_heads,
           model.intermediate_size, model.num_experts) + tuple(str(model.config.get(k)) for k in _SHAPE_KEYS)
    hit = _LINEARS_CACHE.get(key)
    if hit is None:
        if len(_LINEARS_CACHE) > 512:
            _LINEARS_CACHE.clear()
        hit = _LINEARS_CACHE[key] = _block_linears(model)
    return hit


def _bias(model: ModelSpec, rule) -> bool:
    if isinstance(rule, tuple):
        return bool(_cfg(model, rule[0], default=rule[1]))
    return bool(rule)


def _lin(path: str, role: str, fan_in: int, fan_out: int, bias: bool = False, count: int = 1) -> Linear:
    return Linear(path.rsplit(".", 1)[-1], fan_in, fan_out, count=count, bias=bias, path=path, role=role)


def _block_linears(model: ModelSpec) -> list[Linear]:
    h, d = model.hidden_size, model.head_dim
    q_out, kv_out = model.num_attention_heads * d, model.num_key_value_heads * d
    fam = family(model)
    qkv_bias, o_bias, mlp_bias = _bias(model, fam.qkv_bias), _bias(model, fam.o_bias), _bias(model, fam.mlp_bias)
    if fam.qkv:
        lin = [_lin(fam.qkv, "qkv", h, q_out + 2 * kv_out, qkv_bias)]
    else:
        lin = [_lin(fam.q, "q", h, q_out, qkv_bias), _lin(fam.k, "k", h, kv_out, qkv_bias),
               _lin(fam.v, "v", h, kv_out, qkv_bias)]
    lin.append(_lin(fam.o, "o", q_out, h, o_bias))
    inter = model.intermediate_size
    if model.is_moe:
        e = model.num_experts
        # transformers 5 stores routed experts as 3-D parameters (not nn.Linear): not LoRA / bnb targets.
        lin.append(Linear("experts.gate_up_proj", h, 2 * inter, count=e, path="mlp.experts.gate_up_proj", role="expert_gate_up"))
        lin.append(Linear("experts.down_proj", inter, h, count=e, path="mlp.experts.down_proj", role="expert_down"))
        lin.append(_lin("mlp.gate", "router", h, e))
        shared = int(_cfg(model, "shared_expert_intermediate_size", default=0) or 0)
        n_shared = int(_cfg(model, "n_shared_experts", "num_shared_experts", default=0) or 0)
        if not shared and n_shared:
            shared = n_shared * int(_cfg(model, "moe_intermediate_size", default=inter))
        if shared:
            lin += [_lin("mlp.shared_expert.gate_proj", "shared_gate", h, shared),
                    _lin("mlp.shared_expert.up_proj", "shared_up", h, shared),
                    _lin("mlp.shared_expert.down_proj", "shared_down", shared, h)]
    elif fam.gate_up:
        lin += [_lin(fam.gate_up, "gate_up", h, 2 * inter, mlp_bias), _lin(fam.down, "down", inter, h, mlp_bias)]
    elif fam.gate:
        lin += [_lin(fam.gate, "gate", h, inter, mlp_bias), _lin(fam.up, "up", h, inter, mlp_bias),
                _lin(fam.down, "down", inter, h, mlp_bias)]
    else:
        lin += [_lin(fam.up, "up", h, inter, mlp_bias), _lin(fam.down, "down", inter, h, mlp_bias)]
    return lin


def _is_peft_linear(lin: Linear) -> bool:
    """A layer peft's LoRA wraps like an nn.Linear: not the fused 3-D experts (ParamWrapper, counted
    apart). The MoE router (a TopKRouter holding a bare [experts, hidden] weight) gets an adapter too."""
    return not lin.role.startswith("expert_")


def _matches(lin: Linear, key: str) -> bool:
    """peft's target_modules rule for one name: the module's path equals it or ends with '.' + it."""
    return lin.path == key or lin.path.endswith("." + key) or lin.name == key


def lora_targets(model: ModelSpec, setup: TrainingSetup) -> list[Linear]:
    """Linear layers of one block that get LoRA adapters ('all-linear' = every nn.Linear except the LM head)."""
    lins = [lin for lin in block_linears(model) if _is_peft_linear(lin)]
    if setup.target_modules == "all-linear":
        return lins
    wanted = set(setup.target_modules)
    hit = [lin for lin in lins if any(_matches(lin, w) for w in wanted)]
    unknown = sorted(w for w in wanted if not any(_matches(lin, w) for lin in block_linears(model)))
    unknown = [w for w in unknown if w not in ("lm_head", "embed_tokens", "experts") and not w.endswith(".experts")]
    if unknown and not hit:
        raise TunepilotError(
            f"target_modules: {', '.join(unknown)} not found in {model.model_id}'s blocks "
            f"(linear layers: {', '.join(sorted({lin.name for lin in lins}))}); use 'all-linear' or those names"
        )
    return hit


def adapts_fused_experts(model: ModelSpec, setup: TrainingSetup) -> bool:
    """Whether peft wraps the fused 3-D expert weights (lora.ParamWrapper: no dropout allowed), i.e. for
    'all-linear' or an 'experts' target on an MoE model."""
    if setup.method not in ("lora", "qlora", "dora") or not model.is_moe:
        return False
    t = setup.target_modules
    return t == "all-linear" or any(x == "experts" or x.endswith(".experts") for x in t)


def expert_adapter_params(model: ModelSpec, setup: TrainingSetup) -> int:
    """LoRA parameters peft's ParamWrapper adds to one block's fused experts.

    Per expert weight [E, out, in]: lora_A [r*E, in] and lora_B [out, r*E]; the fused gate_up
    weight gets twice the rank (checked against real peft on Mixtral and Qwen3-MoE configs).
    """
    if not adapts_fused_experts(model, setup):
        return 0
    n = 0
    for lin in block_linears(model):
        if lin.role.startswith("expert_"):
            factor = 2 if lin.role == "expert_gate_up" else 1
            n += factor * setup.r * (lin.fan_in + lin.fan_out) * lin.count
    return n


def ia3_targets(model: ModelSpec) -> list[tuple[Linear, bool]]:
    """(layer, feed-forward?) pairs peft's default IA3 config scales in one block (feed-forward layers scale
    their input, the others their output); Llama's k/v/down for families peft has no default for."""
    fam = family(model)
    names, ff = (fam.ia3, fam.ia3_ff) if fam.ia3 else (_LLAMA.ia3, _LLAMA.ia3_ff)
    out = []
    for lin in block_linears(model):
        if _is_peft_linear(lin) and any(_matches(lin, n) for n in names):
            out.append((lin, _matches(lin, ff)))
    return out


@dataclass
class Counts:
    """Parameter counts of the model, split the way memory cares about."""

    embed: int
    head: int
    norms: int
    per_block: int  # exact per-block parameters (derived from the exact total)
    block_linear: int  # parameters in linear layers of one block (quantizable)
    adapters: int  # trainable adapter/prompt parameters added by peft
    adapter_per_block: int
    trainable: int
    total: int


def _counts(model: ModelSpec, setup: TrainingSetup) -> Counts:
    h, L, V = model.hidden_size, model.num_hidden_layers, model.vocab_size
    embed = V * h
    head = 0 if model.tie_word_embeddings else V * h
    if setup.task == "sequence-classification":
        head = setup.num_labels * h
    lins = block_linears(model)
    block_linear = sum(lin.fan_in * lin.fan_out * lin.count + (lin.fan_out * lin.count if lin.bias else 0) for lin in lins)
    norms_per_block = 2 * h
    rest = model.num_parameters - embed - (0 if model.tie_word_embeddings else V * h) - h
    per_block = rest // L if L else 0
    if per_block <= 0:  # the total does not decompose (unusual config): trust our structure
        per_block = block_linear + norms_per_block
    block_linear = min(block_linear, per_block)
    norms = per_block - block_linear  # norms, biases and anything our structure does not name
    base_total = embed + head + h + per_block * L

    adapter_per_block = 0
    adapters = 0
    m = setup.method
    if m in ("lora", "qlora", "dora"):
        for lin in lora_targets(model, setup):
            adapter_per_block += setup.r * (lin.fan_in + lin.fan_out) * lin.count
            if setup.use_dora or m == "dora":
                adapter_per_block += lin.fan_out * lin.count  # magnitude vector
        adapter_per_block += expert_adapter_params(model, setup)
        adapters = adapter_per_block * L
    elif m == "ia3":
        for lin, ff in ia3_targets(model):
            adapter_per_block += lin.fan_in if ff else lin.fan_out
        adapters = adapter_per_block * L
    elif m == "prompt-tuning":
        adapters = setup.num_virtual_tokens * h
    elif m == "p-tuning":
        # peft PromptEncoder (MLP reparameterisation, hidden = h): embedding + 2-layer MLP
        adapters = setup.num_virtual_tokens * h + (h * h + h) * 2 + h * h + h
    elif m == "prefix-tuning":
        adapters = setup.num_virtual_tokens * 2 * L * model.num_key_value_heads * model.head_dim

    if m == "full":
        trainable = base_total
    else:
        trainable = adapters
    return Counts(embed, head, norms, per_block, block_linear, adapters, adapter_per_block, trainable, base_total + adapters)


def legacy_rope_cache_bytes(model: ModelSpec, setup: TrainingSetup) -> int:
    """Bytes of the per-layer rotary cos/sin tables of early-2024 transformers (TrainingSetup.legacy_rope_cache):
    2 x [max_position_embeddings, head_dim] per attention layer in that dtype (tools.memory.build.add_legacy_rope_caches)."""
    if setup.legacy_rope_cache == "none":
        return 0
    max_pos = model.max_position_embeddings or (model.config or {}).get("max_position_embeddings") or 0
    return int(model.num_hidden_layers * 2 * max_pos * model.head_dim * DTYPE_BYTES[setup.legacy_rope_cache])


def _weight_bytes(model: ModelSpec, setup: TrainingSetup, c: Counts) -> tuple[int, int]:
    """(resident base-weight bytes, bytes of the largest block's parameters)."""
    L = model.num_hidden_layers
    wb = DTYPE_BYTES[setup.dtype]
    # bitsandbytes converts nn.Linear only (transformers.integrations.bitsandbytes.replace_with_bnb_linear):
    # transformers 5's fused 3-D experts (MixtralExperts.gate_up_proj / down_proj) stay dense in the load dtype
    dense = sum(lin.fan_in * lin.fan_out * lin.count for lin in block_linears(model) if lin.role.startswith("expert_"))
    quantized = c.block_linear - dense
    if setup.load_in_4bit:
        n_lin_layers = len([lin for lin in block_linears(model) if not lin.role.startswith("expert_")])
        packed = quantized / 2
        blocks = quantized / BNB_4BIT_BLOCK
        if setup.bnb_4bit_use_double_quant:
            # uint8 absmax per 64 params + fp32 constant per 256 absmax + nested code (256 fp32) per layer
            consts = blocks + 4 * blocks / BNB_NESTED_BLOCK + n_lin_layers * (256 * 4 + 4)
        else:
            consts = 4 * blocks
        consts += n_lin_layers * 16 * 4  # the 16-value nf4/fp4 code per layer
        block = packed + consts + (c.per_block - quantized) * wb
    elif setup.load_in_8bit:
        rows = sum(lin.fan_out * lin.count for lin in block_linears(model) if not lin.role.startswith("expert_"))
        block = quantized + 4 * rows + (c.per_block - quantized) * wb
    else:
        block = c.per_block * wb
    rest = (c.embed + c.head + model.hidden_size) * wb
    return int(block * L + rest + legacy_rope_cache_bytes(model, setup)), int(block)


def _optimizer(setup: TrainingSetup, trainable: int, param_bytes: int, largest: int) -> tuple[int, int, list[str]]:
    """(persistent state bytes, step temporaries bytes, notes) for `trainable` params of `param_bytes` each."""
    o = setup.optim
    notes: list[str] = []
    if o in ("adamw_torch", "adamw_torch_fused"):
        state = 2 * trainable * param_bytes
        # foreach AdamW (adamw_torch) makes one temporary the size of the largest param group
        # (torch._foreach_sqrt(exp_avg_sqs)); the fused kernel updates in place.
        temp = trainable * param_bytes if o == "adamw_torch" else 0
    elif o in ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"):
        state = int(2 * trainable * (1 + 4 / BNB_OPTIM_BLOCK))
        temp = 0
        if o.startswith("paged"):
            notes.append("paged optimizer states live in CUDA unified memory: counted on the GPU here (they page out only under pressure)")
    elif o == "paged_adamw_32bit":
        state, temp = 2 * trainable * 4, 0
    elif o in ("lion_8bit", "paged_lion_8bit"):
        state, temp = int(trainable * (1 + 4 / BNB_OPTIM_BLOCK)), 0
    elif o in ("lion_32bit", "paged_lion_32bit"):
        state, temp = trainable * 4, 0
    elif o == "adamw_torch_8bit":
        state, temp = int(2 * trainable * (1 + 4 / BNB_OPTIM_BLOCK)), largest * 4
    elif o == "adamw_torch_4bit":
        state, temp = int(2 * trainable * (0.5 + 4 / BNB_OPTIM_BLOCK)), largest * 4
    elif o == "adafactor":
        # factored second moment (row + column vectors): negligible; the step upcasts grad,
        # param and update of one parameter at a time to fp32.
        state = int(trainable * param_bytes * 0.01)
        temp = largest * 17  # fp32 grad, grad^2 update, row/col products and the fp32 param copy of one tensor
    elif o == "sgd":
        state, temp = 0, 0
    elif o in ("adagrad", "rmsprop"):
        state, temp = trainable * param_bytes, trainable * param_bytes if o == "rmsprop" else 0
    else:  # pragma: no cover - schema restricts optim
        raise TunepilotError(f"optim: {o!r} is not supported by the analytic tier")
    return int(state), int(temp), notes


def _block_activation_bytes(model: ModelSpec, setup: TrainingSetup, tokens: int, seq: int,
                            packed: bool = False) -> tuple[int, int]:
    """(saved-for-backward bytes of one decoder block, transient bytes while it runs) for `tokens` = b*s.

    `packed`: one padding-free row of `tokens` packed sequences (pass seq=tokens)."""
    h, d = model.hidden_size, model.head_dim
    nh, nkv = model.num_attention_heads, model.num_key_value_heads
    b = tokens // max(seq, 1)
    c = DTYPE_BYTES[setup.compute_dtype]
    full = setup.method == "full"
    layer_norm = model.model_type in _LAYERNORM
    per_tok = 0
    # two norms: RMSNorm saves its fp32 upcast and rsqrt (+ the cast input for a trainable weight,
    # + its output as the next linear's input when that linear is trainable); LayerNorm saves input + stats
    norm = (c * h + 8) if layer_norm else (4 * h + 4)
    if full:
        norm += 2 * c * h if not layer_norm else c * h
    per_tok += 2 * norm
    wb = DTYPE_BYTES[setup.dtype]
    if not full and not layer_norm and (setup.bf16 or setup.fp16) and wb > c:
        # frozen fp32 norms/embeddings under autocast: the residual stream and both norm outputs stay fp32
        per_tok += 2 * (wb - c) * h + 2 * wb * h
    if full and not layer_norm and (setup.bf16 or setup.fp16) and wb > c and not setup.load_in_4bit:
        # fp32 weights under autocast: the residual stream stays fp32, the norm's weight sees the fp32
        # product, and every linear casts the norm output itself (q, k, v: 3 casts; gate, up: 2)
        per_tok += ((wb - c) + 2 * c) * h + ((wb - c) + c) * h
    # attention: q, k, v, output and the fp32 logsumexp (flash/SDPA); eager: repeated k/v + s^2 scores
    q, kv = nh * d * c, nkv * d * c
    extra = 0
    if setup.attn_implementation == "eager":
        per_tok += q + 2 * q + q  # q, repeated k and v, attention output
        extra = b * nh * seq * seq * (4 + c)  # fp32 softmax output + probabilities in compute dtype
        if float(_cfg(model, "attention_probs_dropout_prob", "attention_dropout", default=0.0) or 0.0) > 0:
            extra += b * nh * seq * seq * DROPOUT_MASK_BYTES  # attention dropout's mask (BERT: 0.1)
    else:
        per_tok += q + 2 * kv + q + 4 * nh
        if packed and setup.attn_implementation != "flash_attention_2":
            # a packed row with transformers' block mask: SDPA turns the bool mask into an additive one
            # in the compute dtype (saved for backward), and with a mask transformers repeats k/v
            extra += c * seq * seq
            per_tok += 2 * (q - kv)
    if full:
        per_tok += q  # o_proj input
    # MLP
    roles = {lin.role for lin in block_linears(model)}
    if model.is_moe:
        k = max(model.num_experts_per_tok, 1)
        inter = model.intermediate_size
        per_tok += k * (c * h + 4 * c * inter) + 4 * model.num_experts + 8 * k
    elif roles & {"gate", "gate_up"}:
        inter = model.intermediate_size
        per_tok += 3 * c * inter + (c * inter if full else 0)  # gate out, act out, up out (+ down input)
    else:
        inter = model.intermediate_size
        per_tok += c * inter + (c * inter if full else 0)  # fc_in out (+ act out as fc_out input)
    # adapters (peft casts the input to the adapter dtype; under autocast lora_A then runs in the
    # compute dtype and saves that cast; dropout keeps a 1-byte mask, as CUDA's fused kernel does)
    if setup.method in ("lora", "qlora", "dora"):
        ad = adapter_dtype_bytes(setup)
        autocast = setup.bf16 or setup.fp16
        for lin in lora_targets(model, setup):
            mask = DROPOUT_MASK_BYTES if setup.lora_dropout > 0 else 0
            if autocast and ad != c:
                x = mask + c  # mask + the compute-dtype cast lora_A saves
                a_out = c
            else:
                x = mask + ad  # mask + dropout output (or the cast input without dropout)
                a_out = ad
            per_tok += (x * lin.fan_in + a_out * setup.r) * lin.count
            if setup.use_dora:
                per_tok += 2 * c * lin.fan_out * lin.count  # base_result and lora_result, for the magnitude's gradient
                # B(A(eye)) builds the adapter's weight with autograd on; the dry run sees its saved
                # identity cast alive with the block's activations
                extra += c * lin.fan_in * lin.fan_in * lin.count
    elif setup.method == "ia3":
        # the scaled outputs (inputs of the feed-forward layer) are saved for the IA3 vectors' gradients
        per_tok += c * sum(lin.fan_in if ff else lin.fan_out for lin, ff in ia3_targets(model))
    if adapts_fused_experts(model, setup):
        # peft's ParamWrapper adds B@A, reshaped to [experts, out, in], to each fused expert weight in
        # forward and keeps it for backward: a compute-dtype copy of the block's expert weights
        extra += c * sum(lin.fan_in * lin.fan_out * lin.count for lin in block_linears(model) if lin.role.startswith("expert_"))
    saved = per_tok * tokens + extra
    # transient while a block runs: its MLP intermediate and (QLoRA) one dequantized weight
    transient = 2 * c * model.intermediate_size * tokens
    if setup.use_dora and setup.method in ("lora", "qlora", "dora"):
        # DoRA rebuilds each weight in forward: identity input (in x in, adapter dtype) and its cast,
        # the base weight cast, B@A and their sum (out x in) for the column norms
        big = max(lora_targets(model, setup), key=lambda t: t.fan_in * t.fan_out, default=None)
        if big is not None:
            transient += (4 + c) * big.fan_in * big.fan_in + 3 * c * big.fan_in * big.fan_out
    if setup.method in ("lora", "qlora", "dora"):
        # backward of an adapter: the fp32 gradient of its (widest) input is alive next to the block's
        transient += adapter_dtype_bytes(setup) * max((t.fan_in for t in lora_targets(model, setup)), default=0) * tokens
    return int(saved), int(transient)


def adapter_dtype_bytes(setup: TrainingSetup) -> int:
    """Bytes per adapter parameter: peft upcasts bf16/fp16 adapters to fp32 (autocast_adapter_dtype);
    trl's SFTTrainer casts QLoRA adapters to bf16."""
    if setup.method == "qlora" or setup.load_in_4bit:
        return 2
    return 4


TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl.kernels.chunked_logprob TOKEN_CHUNK_SIZE, trl's chunk_size


def liger_chunk_rows(bt: int, hidden: int, vocab: int) -> int:
    """Rows per chunk of liger-kernel's fused linear cross-entropy: next_pow2(ceil(BT / ceil(V/H))), at most BT."""
    inc = -(-vocab // hidden)
    rows = -(-bt // inc)
    return max(1, min(1 << (rows - 1).bit_length() if rows > 1 else 1, bt))


def loss_path_bytes(impl: str, *, T: int, N: int, H: int, V: int, c: int, hb: int, wb: int,
                    head_trainable: bool, legacy: str = "none", autocast: bool = True) -> tuple[int, int, int]:
    """(forward peak, backward-start peak, saved for backward) bytes of the causal-LM head + loss of one micro-batch.

    T tokens, N of them scored (labels shifted), hidden H in `hb` bytes, vocabulary V, compute dtype `c`
    bytes, head weight `wb` bytes. hf: transformers' ForCausalLMLoss (logits, fp32 upcast, log-softmax and
    its gradient); trl_fused: trl's CUDA path (compact hidden copy, one [4096, 32768] tile, fp32 grad of the
    hidden states); liger: the gradient computed in forward chunk by chunk; cce: no logits at all.
    """
    if impl == "hf":
        # legacy (TrainingSetup.legacy_loss): the shifted contiguous copy of older releases' loss
        if legacy == "upcast_in_model":  # fp32 logits + fp32 shifted copy + fp32 log-softmax
            return 12 * V * T, 12 * V * T, 4 * V * T
        if legacy == "upcast_in_loss":  # + the 16-bit logits the output keeps
            return (c + 12) * V * T, 12 * V * T, 4 * V * T
        if legacy == "no_upcast":  # 16-bit logits + 16-bit shifted copy + log-softmax; autocast runs
            # cross_entropy in fp32: one more fp32 copy of its input, an fp32 log-softmax and fp32 gradients
            if autocast:
                return (2 * c + 8) * V * T, 12 * V * T, 4 * V * T
            return 3 * c * V * T, 3 * c * V * T, c * V * T
        return (c + 4 + 4) * V * T, 12 * V * T, 4 * V * T
    head_grad = V * H * 4 if head_trainable else 0
    if impl == "trl_fused":
        tile = min(N, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * c  # trl allocates the full-width tile even for V < 32768
        per_tok = 8 + 1 + 7 * 4 + 3 * 4 + 1 + 8  # labels, mask, running stats, log_z/log-probs/entropy, is_top1, outputs
        saved = N * hb + N * (8 + 8)
        fwd = N * H * hb + N * per_tok + tile
        # backward: fp32 grad of the scored hidden states, the tile again, then the cast and the scatter back
        bwd = saved + N * H * 4 + tile + head_grad
        # the fp32 head gradient is cast to the weight dtype (the .grad) while it is still alive
        return int(fwd), int(bwd + N * H * hb + (V * H * wb if head_trainable else 0)), int(saved)
    if impl == "liger":
        rows = liger_chunk_rows(T, H, V)
        gw = V * H * wb if head_trainable else 0
        saved = T * H * hb + gw
        fwd = saved + T * (4 + 1 + 8 + 8) + rows * V * c + rows * H * c
        return int(fwd), int(saved), int(saved)
    if impl == "cce":
        saved = N * (4 + 8) + V * 4
        fwd = saved + N * (8 + 4) + N * 16
        bwd = saved + V * 12 + T * H * hb + (V * H * c if head_trainable else 0)
        return int(fwd), int(bwd), int(saved)
    raise TunepilotError(f"loss_impl: unknown loss path {impl!r}")


def _seq_len(setup: TrainingSetup) -> int:
    if setup.method in ("prompt-tuning", "p-tuning", "prefix-tuning"):
        return setup.max_length + setup.num_virtual_tokens
    return setup.max_length


def analytic_step_memory(model: ModelSpec, setup: TrainingSetup, *, moments: dict | None = None) -> StepMemory:
    """Closed-form bytes of one training step of one model replica (no sharding, no CUDA terms): tier 'analytic'.

    `moments`, when given, is filled with every candidate peak moment: name -> (phase, breakdown in bytes).
    """
    if setup.objective != "sft":
        return _objective_step_memory(model, setup, moments=moments)
    t0 = time.perf_counter()
    moments_out = moments
    if model.num_hidden_layers < 1 or model.hidden_size < 1:
        raise TunepilotError(f"model {model.model_id}: num_hidden_layers and hidden_size must be positive")
    notes: list[str] = []
    L, h, V = model.num_hidden_layers, model.hidden_size, model.vocab_size
    c = DTYPE_BYTES[setup.compute_dtype]
    wb = DTYPE_BYTES[setup.dtype]
    seq = _seq_len(setup)
    b = setup.per_device_train_batch_size
    T = b * seq
    cnt = _counts(model, setup)

    weights, block_bytes = _weight_bytes(model, setup, cnt)
    full = setup.method == "full"
    # peft keeps adapters in fp32 when the base is bf16/fp16 (autocast_adapter_dtype=True)
    ad_bytes = adapter_dtype_bytes(setup)
    adapters = 0 if full else cnt.adapters * ad_bytes
    param_bytes = wb if full else ad_bytes
    grads = cnt.trainable * param_bytes
    largest_param = max(cnt.embed, cnt.head, max(lin.fan_in * lin.fan_out * lin.count for lin in block_linears(model)))
    if full:
        opt_elems, opt_largest = cnt.trainable, largest_param
    else:
        opt_elems = cnt.trainable
        opt_largest = max((setup.r * lin.fan_in for lin in lora_targets(model, setup)), default=cnt.adapters) \
            if setup.method in ("lora", "qlora", "dora") else cnt.adapters
    optim, opt_temp, onotes = _optimizer(setup, opt_elems, param_bytes, opt_largest)
    notes += onotes
    if setup.optim in ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit") and not full:
        # bnb keeps 32-bit state for tensors under 4096 elements (LoRA B of small blocks, DoRA magnitudes)
        small = sum(setup.r * lin.fan_out for lin in lora_targets(model, setup) if setup.r * lin.fan_out < BNB_MIN_8BIT_SIZE) * L \
            if setup.method in ("lora", "qlora", "dora") else 0
        per = 2 if "adamw" in setup.optim else 1
        optim += int(small * per * (4 - (1 + 4 / BNB_OPTIM_BLOCK)))

    # activations
    packed = setup.padding_free
    # trl's packing is padding-free: the batch is one row of T tokens, attention spans it
    block_saved, block_transient = _block_activation_bytes(model, setup, T, T if packed else seq, packed)
    if setup.use_liger_kernel:
        # Liger's RMSNorm keeps its bf16 input + fp32 rstd instead of the fp32 upcast (2h less per norm, two norms),
        # its SwiGLU keeps gate and up but not silu(gate) (one [T, intermediate] less); RoPE saves the same cos/sin
        inter = model.intermediate_size if not model.is_moe else 0
        block_saved = max(0, block_saved - T * (2 * 2 * h + c * inter))
        notes.append("Liger kernels: RMSNorm and SwiGLU save fewer activations per block")
    if setup.load_in_4bit:
        block_transient += max(lin.fan_in * lin.fan_out for lin in block_linears(model) if _is_peft_linear(lin)) * c
    # the residual stream has the embeddings' dtype: fp32 embeddings (fp32 load dtype, or peft's
    # prepare_model_for_kbit_training upcast of a 4-bit model) keep fp32 layer inputs under autocast
    layer_input = max(c, wb) * h * T
    head_trainable = full
    final_norm = (4 * h + 4) * T + (2 * c * h * T if head_trainable else 0)
    if setup.task == "causal-lm":
        logits_fwd, logits_bwd, logits_saved = loss_path_bytes(
            setup.loss_impl, T=T, N=T - 1 if packed else b * (seq - 1), H=h, V=V, c=c, hb=max(c, wb), wb=wb,
            head_trainable=head_trainable, legacy=setup.legacy_loss,
            autocast=(setup.bf16 or setup.fp16) and not setup.zero_stage)
        if setup.loss_impl != "hf":
            notes.append(f"loss path {setup.loss_impl}: no (batch, seq, vocab) logits")
    else:
        n = setup.num_labels * b
        logits_fwd, logits_bwd, logits_saved = 12 * n, 12 * n, 4 * n

    packed_mask = 0
    if packed and setup.attn_implementation != "flash_attention_2":
        # transformers' block-diagonal mask over the packed row: bool for SDPA, additive in compute
        # dtype for eager; built once per forward, alive until the last block's backward
        packed_mask = T * T * (1 if setup.attn_implementation != "eager" else c)
        notes.append(f"packing with {setup.attn_implementation}: a [1,1,{T},{T}] block-diagonal mask (flash_attention_2 needs none)")
    if setup.gradient_checkpointing:
        acts_all = L * layer_input + final_norm + packed_mask
        recompute = block_saved + block_transient + 2 * layer_input
        notes.append("gradient checkpointing: one saved layer input per block + one block recomputed in backward")
    else:
        acts_all = L * block_saved + final_norm + packed_mask
        recompute = 0
        if setup.method in ("lora", "qlora", "dora", "ia3"):
            # the first block's input (frozen embeddings) needs no gradient: its first norm and the
            # dropout masks of the adapters reading it are not saved
            first = 4 * h + 4
            if setup.method != "ia3" and setup.lora_dropout > 0:
                first += DROPOUT_MASK_BYTES * h * sum(1 for t in lora_targets(model, setup) if t.fan_in == h and t.role in ("q", "k", "v", "qkv"))
            acts_all -= first * T

    offload_host = 0
    if setup.activation_offloading:
        # trl's hooks copy every saved activation to host RAM and keep only the last 5 on the device (its
        # forward stash); with checkpointing those are the blocks' inputs, without it all of a block's tensors
        if setup.gradient_checkpointing:
            offload_host = L * layer_input
            acts_all -= max(0, L - 5) * layer_input
        else:
            offload_host = L * block_saved
            acts_all -= max(0, L - 1) * block_saved
            recompute = 0
        if setup.task == "causal-lm" and setup.loss_impl == "trl_fused":
            offload_host += logits_saved  # the fused head never calls lm_head, so its saved hidden copy moves too
        notes.append("activation offloading: saved activations in host RAM, the last few on the device")

    static = weights + adapters + optim
    head_grad = (cnt.head if not model.tie_word_embeddings else cnt.embed) * param_bytes if full else 0
    block_grad = cnt.per_block * param_bytes if full else cnt.adapter_per_block * param_bytes
    moments: dict[str, tuple[str, dict[str, int]]] = {}
    if full and (setup.bf16 or setup.fp16) and wb > c and not setup.load_in_4bit:
        # autocast caches the compute-dtype copy of every trainable fp32 weight it casts (all linears and
        # the LM head) for the forward; without checkpointing the linears also save them for backward
        cache = c * (cnt.block_linear * L + cnt.head)
        acts_all += cache
        if setup.gradient_checkpointing:
            moments["loss_forward_autocast_cache"] = ("forward", {"activations": acts_all, "logits_loss": logits_fwd})
            acts_all -= cache
        notes.append("autocast keeps compute-dtype copies of the fp32 weights through the forward")
    moments["last_block_forward"] = ("forward", {"activations": acts_all - final_norm + block_transient})
    moments["loss_forward"] = ("forward", {"activations": acts_all, "logits_loss": logits_fwd})
    moments["backward_start"] = ("backward", {"activations": acts_all, "logits_loss": logits_bwd})
    if setup.gradient_checkpointing:
        # non-reentrant checkpointing frees a block's saved input once its backward is done: the
        # last block recomputes with every input alive, the first one with every later block's gradients
        moments["recompute"] = ("backward", {"activations": acts_all + recompute, "gradients": head_grad + block_grad})
        moments["recompute_first_block"] = ("backward", {
            "activations": acts_all - (L - 1) * layer_input + recompute,
            "gradients": head_grad + L * block_grad})
    else:
        moments["first_block_backward"] = ("backward", {"activations": acts_all + block_transient, "gradients": head_grad})
    moments["backward_end"] = ("backward", {"gradients": grads, "temporaries": 2 * layer_input})
    moments["optimizer_step"] = ("optimizer", {"gradients": grads, "temporaries": opt_temp})

    if setup.gradient_accumulation_steps > 1:
        # later micro-batches of an accumulation window run with the earlier ones' gradients alive
        for _, parts in moments.values():
            parts["gradients"] = grads
        notes.append("gradient accumulation: gradients stay allocated through every micro-batch")
    base_bd = {"weights": weights, "adapters": adapters, "gradients": 0, "optimizer_state": optim,
               "activations": 0, "logits_loss": 0, "temporaries": 0}
    if moments_out is not None:
        for name, (phase, parts) in moments.items():
            bd = dict(base_bd)
            for k, v in parts.items():
                bd[k] += int(v)
            moments_out[name] = (phase, bd)
    best_name, best_total, best = "", -1, {}
    for name, (phase, parts) in moments.items():
        total = static + sum(parts.values())
        if total > best_total:
            best_name, best_total, best = name, total, {"phase": phase, **parts}
    phase = best.pop("phase")
    breakdown = {k: 0 for k in ("weights", "adapters", "gradients", "optimizer_state", "activations", "logits_loss", "temporaries")}
    breakdown["weights"], breakdown["adapters"], breakdown["optimizer_state"] = weights, adapters, optim
    for k, v in best.items():
        breakdown[k] += int(v)
    peak = sum(breakdown.values())
    notes.append(f"peak at {best_name}")
    del logits_saved

    per_layer = (block_bytes + (cnt.adapter_per_block * ad_bytes if not full else 0)
                 + (layer_input if setup.gradient_checkpointing else block_saved))
    return StepMemory(
        tier="analytic",
        num_parameters=cnt.total,
        trainable_parameters=cnt.trainable,
        weights_bytes=weights,
        adapter_bytes=adapters,
        gradient_bytes=grads,
        optimizer_bytes=optim,
        peak_bytes=peak,
        peak_breakdown=breakdown,
        peak_phase=phase,
        largest_layer_param_bytes=block_bytes,
        per_layer_bytes=int(per_layer),
        offload_host_bytes=int(offload_host),
        offload_traffic_bytes=int(offload_host),
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


# --------------------------------------------------------------------------------------
# Preference and RL objectives (issue 15): closed forms beside the dry run's tools.memory.objectives
# --------------------------------------------------------------------------------------


def kv_cache_bytes(model: ModelSpec, setup: TrainingSetup, rows: int, tokens: int) -> int:
    """K and V of every layer for `rows` sequences of `tokens` tokens, in the weights' dtype (transformers' DynamicCache)."""
    kv_heads = model.num_key_value_heads or model.num_attention_heads
    elem = DTYPE_BYTES[setup.compute_dtype if setup.load_in_4bit or setup.load_in_8bit else setup.dtype]
    window = _cfg(model, "sliding_window")
    layer_types = _cfg(model, "layer_types")
    total = 0
    for i in range(model.num_hidden_layers):
        length = tokens
        sliding = isinstance(layer_types, list) and i < len(layer_types) and "sliding" in str(layer_types[i])
        if isinstance(window, int) and window > 0 and (sliding or not isinstance(layer_types, list)) and _cfg(model, "use_sliding_window", default=True) is not False:
            length = min(tokens, window)
        total += 2 * rows * kv_heads * model.head_dim * length * elem
    return total


def _objective_step_memory(model: ModelSpec, setup: TrainingSetup, *, moments: dict | None = None) -> StepMemory:
    """A DPO / KTO / reward / GRPO step: the SFT closed form on the objective's rows, plus its reference and generation terms.

    - DPO and reward models: 2 x micro-batch rows (chosen + rejected) of max_length; KTO: micro-batch rows and as many
      KL rows without gradient; GRPO: micro-batch completions of prompt + completion tokens.
    - reference_model: a frozen copy of the base weights (same quantization) when reference_mode is 'copy'.
    - the reference forward (no grad) runs while the policy's activations are alive: one block's transient on top.
    - GRPO generation (without vLLM): resident state + the KV cache of the local generation batch at prompt +
      completion tokens + one block's transient of the prefill; the step peak is the larger of that and training.
    """
    t0 = time.perf_counter()
    rows = setup.per_device_train_batch_size * (2 if setup.objective in ("dpo", "reward") else 1)
    sft = setup.model_copy(update={"objective": "sft", "per_device_train_batch_size": rows})
    inner: dict = {}
    base = analytic_step_memory(model, sft, moments=inner)
    bd = dict.fromkeys(STEP_CATEGORIES, 0)
    bd.update(base.peak_breakdown)
    notes = list(base.notes)
    h, inter = model.hidden_size, model.intermediate_size
    c = DTYPE_BYTES[setup.compute_dtype]
    seq = setup.max_length
    if setup.objective != "reward":
        # trl's fused LM head (CUDA path) instead of the full logits: the labelled positions' hidden states (compact
        # copy, saved), one [min(N, 4096), 32768] tile buffer, fp32 per-token statistics; in backward an fp32
        # gradient of the hidden states and its cast. N = completion tokens of the micro-batch.
        labelled = rows * (setup.max_completion_length if setup.objective == "grpo" else max(1, seq - setup.prompt_length))
        fused = labelled * h * (2 * c + 4) + min(labelled, 4096) * 32768 * c + 8 * labelled * 4
        best_total, best_bd, best_phase = -1, bd, base.peak_phase
        for name, (ph, parts) in inner.items():
            cand = dict.fromkeys(STEP_CATEGORIES, 0)
            cand.update(parts)
            if cand.get("logits_loss"):
                cand["logits_loss"] = fused
            if sum(cand.values()) > best_total:
                best_total, best_bd, best_phase = sum(cand.values()), cand, ph
        if inner:
            bd, base = best_bd, base.model_copy(update={"peak_phase": best_phase})
            for name, (ph, parts) in list(inner.items()):
                if parts.get("logits_loss"):
                    parts["logits_loss"] = fused
        notes.append(f"trl's fused LM head on {labelled:,} completion tokens: {fused / 2**30:.2f} GiB (no full logits)")
    ref_weights = base.weights_bytes + (base.adapter_bytes if setup.method == "full" else 0) if setup.reference_mode == "copy" else 0
    block_transient = rows * seq * (3 * inter + 4 * h) * c  # one block's no-grad forward: MLP gate/up/act and attention in/out
    phase = base.peak_phase
    extra_moments: dict = {}
    if setup.reference_mode in ("copy", "peft_base") and setup.objective in ("dpo", "kto"):
        fwd = {k: v for k, v in bd.items()}
        fwd["temporaries"] = block_transient
        extra_moments["reference_forward"] = ("forward", fwd)
        notes.append("reference forward (no grad) while the policy's activations are alive: one block's transient")
    if setup.objective == "kto":
        bd["temporaries"] = max(bd["temporaries"], block_transient)  # the KL rows' no-grad forward
    if setup.objective == "grpo" and not setup.use_vllm:
        local = max(1, setup.grpo_generation_batch // max(1, setup.num_gpus))
        kv = kv_cache_bytes(model, setup, local, setup.prompt_length + setup.max_completion_length)
        prefill = local * setup.prompt_length * (3 * inter + 4 * h) * DTYPE_BYTES[setup.dtype]
        gen = dict.fromkeys(STEP_CATEGORIES, 0)
        gen.update(weights=bd["weights"], adapters=bd["adapters"], optimizer_state=bd["optimizer_state"], kv_cache=kv,
                   temporaries=max(prefill, local * model.vocab_size * 4 * 2))
        extra_moments["generation"] = ("generation", gen)
        notes.append(f"generation: KV cache of {local} completions x {setup.prompt_length + setup.max_completion_length} tokens "
                     f"= {kv / 2**30:.2f} GiB (2 x layers x kv_heads x head_dim x tokens x dtype)")
    bd["reference_model"] = ref_weights
    for name, (ph, parts) in extra_moments.items():
        parts["reference_model"] = ref_weights
        if sum(parts.values()) > sum(bd.values()):
            bd, phase = dict(parts), ph
            notes.append(f"peak at {name.replace('_', ' ')}")
    if moments is not None:
        for name, (ph, parts) in inner.items():
            full = dict.fromkeys(STEP_CATEGORIES, 0)
            full.update(parts)
            full["reference_model"] = ref_weights
            moments[name] = (ph, full)
        moments.update(extra_moments)
    return base.model_copy(update={
        "peak_bytes": sum(bd.values()), "peak_breakdown": bd, "peak_phase": phase,
        "seconds": time.perf_counter() - t0, "notes": notes + [f"objective {setup.objective}: {rows} rows per micro-batch"],
    })
