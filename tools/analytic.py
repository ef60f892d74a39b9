"""Analytic memory tier: closed-form bytes of one training step, no torch.

`analytic_step_memory(model, setup)` mirrors what the simulator (tools/simulator.py) sees
when it runs the real Hugging Face training step on fake tensors, one component at a time:

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

from tools.schemas import ModelSpec, StepMemory, TrainingSetup, TunepilotError

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

# Names peft/HF use for the linear layers of common decoder blocks.
ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
# Architecture families whose MLP is not gated (fc_in -> act -> fc_out).
# Encoders (BERT family) are ungated GELU MLPs with LayerNorm too.
_ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"}
_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "codegen", "gpt_neo"} | _ENCODERS
_LAYERNORM = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "codegen", "gpt_neo",
              "stablelm"} | _ENCODERS


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: its peft-visible name and shape."""

    name: str
    fan_in: int
    fan_out: int
    count: int = 1  # identical copies per block (MoE experts)
    bias: bool = False


def _cfg(model: ModelSpec, *keys, default=None):
    for k in keys:
        if k in model.config and model.config[k] is not None:
            return model.config[k]
    return default


_SHAPE_KEYS = ("attention_bias", "bias", "mlp_bias", "shared_expert_intermediate_size", "n_shared_experts",
               "num_shared_experts", "moe_intermediate_size")
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


def _block_linears(model: ModelSpec) -> list[Linear]:
    h, d = model.hidden_size, model.head_dim
    q_out, kv_out = model.num_attention_heads * d, model.num_key_value_heads * d
    attn_bias = bool(_cfg(model, "attention_bias", "bias", default=model.model_type in ("qwen2", "qwen2_moe")))
    mlp_bias = bool(_cfg(model, "mlp_bias", default=False))
    lin = [
        Linear("q_proj", h, q_out, bias=attn_bias),
        Linear("k_proj", h, kv_out, bias=attn_bias),
        Linear("v_proj", h, kv_out, bias=attn_bias),
        Linear("o_proj", q_out, h, bias=bool(_cfg(model, "attention_bias", default=False))),
    ]
    inter = model.intermediate_size
    if model.is_moe:
        e = model.num_experts
        # transformers 5 stores routed experts as 3-D parameters (not nn.Linear): not LoRA / bnb targets.
        lin.append(Linear("experts.gate_up_proj", h, 2 * inter, count=e))
        lin.append(Linear("experts.down_proj", inter, h, count=e))
        lin.append(Linear("gate", h, e))
        shared = int(_cfg(model, "shared_expert_intermediate_size", default=0) or 0)
        n_shared = int(_cfg(model, "n_shared_experts", "num_shared_experts", default=0) or 0)
        if not shared and n_shared:
            shared = n_shared * int(_cfg(model, "moe_intermediate_size", default=inter))
        if shared:
            lin += [Linear("shared_expert.gate_proj", h, shared), Linear("shared_expert.up_proj", h, shared),
                    Linear("shared_expert.down_proj", shared, h)]
    elif model.model_type in _UNGATED:
        lin += [Linear("up_proj", h, inter, bias=True), Linear("down_proj", inter, h, bias=True)]
    else:
        lin += [Linear("gate_proj", h, inter, bias=mlp_bias), Linear("up_proj", h, inter, bias=mlp_bias),
                Linear("down_proj", inter, h, bias=mlp_bias)]
    return lin


def _is_peft_linear(lin: Linear) -> bool:
    return not lin.name.startswith("experts.")


def lora_targets(model: ModelSpec, setup: TrainingSetup) -> list[Linear]:
    """Linear layers of one block that get LoRA adapters ('all-linear' = every nn.Linear except the LM head)."""
    lins = [lin for lin in block_linears(model) if _is_peft_linear(lin)]
    if setup.target_modules == "all-linear":
        return lins
    wanted = set(setup.target_modules)
    hit = [lin for lin in lins if lin.name.split(".")[-1] in wanted or lin.name in wanted]
    known = {lin.name.split(".")[-1] for lin in lins} | {lin.name for lin in lins}
    unknown = sorted(wanted - known - {"lm_head", "embed_tokens"})
    if unknown and not hit:
        raise TunepilotError(
            f"target_modules: {', '.join(unknown)} not found in {model.model_id}'s blocks "
            f"(linear layers: {', '.join(sorted({lin.name.split('.')[-1] for lin in lins}))}); use 'all-linear' or those names"
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
        if lin.name.startswith("experts."):
            factor = 2 if lin.name.endswith("gate_up_proj") else 1
            n += factor * setup.r * (lin.fan_in + lin.fan_out) * lin.count
    return n


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
        names = {lin.name: lin for lin in block_linears(model)}
        for n, use_in in (("k_proj", False), ("v_proj", False), ("down_proj", True)):
            if n in names:
                adapter_per_block += names[n].fan_in if use_in else names[n].fan_out
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


def _weight_bytes(model: ModelSpec, setup: TrainingSetup, c: Counts) -> tuple[int, int]:
    """(resident base-weight bytes, bytes of the largest block's parameters)."""
    L = model.num_hidden_layers
    wb = DTYPE_BYTES[setup.dtype]
    if setup.load_in_4bit:
        n_lin_layers = len(block_linears(model))
        packed = c.block_linear / 2
        blocks = c.block_linear / BNB_4BIT_BLOCK
        if setup.bnb_4bit_use_double_quant:
            # uint8 absmax per 64 params + fp32 constant per 256 absmax + nested code (256 fp32) per layer
            consts = blocks + 4 * blocks / BNB_NESTED_BLOCK + n_lin_layers * (256 * 4 + 4)
        else:
            consts = 4 * blocks
        consts += n_lin_layers * 16 * 4  # the 16-value nf4/fp4 code per layer
        block = packed + consts + (c.per_block - c.block_linear) * wb
    elif setup.load_in_8bit:
        rows = sum(lin.fan_out * lin.count for lin in block_linears(model))
        block = c.block_linear + 4 * rows + (c.per_block - c.block_linear) * wb
    else:
        block = c.per_block * wb
    rest = (c.embed + c.head + model.hidden_size) * wb
    return int(block * L + rest), int(block)


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
    lins = {lin.name: lin for lin in block_linears(model)}
    if model.is_moe:
        k = max(model.num_experts_per_tok, 1)
        inter = model.intermediate_size
        per_tok += k * (c * h + 4 * c * inter) + 4 * model.num_experts + 8 * k
    elif "gate_proj" in lins:
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
        per_tok += c * (2 * nkv * d + model.intermediate_size)
    if adapts_fused_experts(model, setup):
        # peft's ParamWrapper adds B@A, reshaped to [experts, out, in], to each fused expert weight in
        # forward and keeps it for backward: a compute-dtype copy of the block's expert weights
        extra += c * sum(lin.fan_in * lin.fan_out * lin.count for lin in block_linears(model) if lin.name.startswith("experts."))
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


def _seq_len(setup: TrainingSetup) -> int:
    if setup.method in ("prompt-tuning", "p-tuning", "prefix-tuning"):
        return setup.max_length + setup.num_virtual_tokens
    return setup.max_length


def analytic_step_memory(model: ModelSpec, setup: TrainingSetup, *, moments: dict | None = None) -> StepMemory:
    """Closed-form bytes of one training step of one model replica (no sharding, no CUDA terms): tier 'analytic'.

    `moments`, when given, is filled with every candidate peak moment: name -> (phase, breakdown in bytes).
    """
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
    if setup.load_in_4bit:
        block_transient += max(lin.fan_in * lin.fan_out for lin in block_linears(model) if _is_peft_linear(lin)) * c
    # the residual stream has the embeddings' dtype: fp32 embeddings (fp32 load dtype, or peft's
    # prepare_model_for_kbit_training upcast of a 4-bit model) keep fp32 layer inputs under autocast
    layer_input = max(c, wb) * h * T
    head_trainable = full
    final_norm = (4 * h + 4) * T + (2 * c * h * T if head_trainable else 0)
    if setup.task == "causal-lm":
        logits_fwd = (c + 4 + 4) * V * T  # logits, fp32 upcast, log-softmax output
        logits_bwd = 12 * V * T  # saved log-softmax, its incoming gradient, its input gradient (fp32)
        logits_saved = 4 * V * T
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
                first += DROPOUT_MASK_BYTES * h * sum(1 for t in lora_targets(model, setup) if t.fan_in == h and t.name in ("q_proj", "k_proj", "v_proj"))
            acts_all -= first * T

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
        seconds=time.perf_counter() - t0,
        notes=notes,
    )
