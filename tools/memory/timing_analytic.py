"""The analytic tier's op trace: the cost records of a training step written down from the model's shapes.

`analytic_counts(model, setup)` returns the same kind of trace the dry run records
(`tools.memory.timing`: (phase, op class, dtype, FLOPs, bytes, tile, causal, op) -> count), for the
whole depth, from closed-form shapes: per block the attention projections, the flash-attention
kernel (or eager's two bmm and a softmax), the MLP (gated or not; MoE experts at their routed
share of tokens), the LoRA adapters with peft's casts, dropout, scaling and add, 4-bit
dequantisation per pass, and the memory-bound rest of a Hugging Face block (RMSNorm/LayerNorm in
fp32, rotary embeddings, activation, residual adds) as op groups whose bytes are those of the
tensors they read and write; the LM head and HF's fp32 loss; the optimizer's foreach or fused
update. Backward: activation gradients of every matmul, weight gradients of trainable ones, and
the memory-bound ops' backward (each reads what its forward saved plus the gradient and writes a
gradient). The same roofline (`tools.memory.timing.step_time`) then times it, so the planner's
thousands of analytic candidates and the dry run's confirmed ones rank on one model; a test grid
(tests/test_timing.py) keeps the two within a stated tolerance. Pure Python: no torch.
"""

from __future__ import annotations

from tools.memory.timing import tile_efficiency

_ES = {"bf16": 2, "fp16": 2, "fp32": 4}
_NON_GATED = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "gpt2", "gpt_neox",
              "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "codegen", "t5", "mt5", "bart", "mbart",
              "starcoder2", "mpt", "stablelm"}
_NORM_LAYERNORM = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "gpt2", "gpt_neox", "gptj", "opt",
                   "bloom", "falcon", "phi", "gpt_bigcode", "codegen", "bart", "mbart", "starcoder2", "mpt", "stablelm"}
_ROTARY_FREE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "gpt2", "opt", "bloom", "gpt_bigcode",
                "t5", "mt5", "bart", "mbart", "mpt"}
_ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "q", "k", "v", "o", "query_key_value",
               "c_attn", "Wqkv", "qkv_proj", "dense", "out_proj", "c_proj")
_MLP_IN = ("gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h", "wi", "gate_up_proj")
_MLP_OUT = ("down_proj", "fc2", "w2", "dense_4h_to_h", "wo")


class _Trace:
    def __init__(self):
        self.counts: dict[tuple, float] = {}

    def add(self, phase: str, kind: str, dtype: str, flops: float, nbytes: float, tile: float = 1.0,
            causal: bool = False, op: str = "", count: float = 1.0) -> None:
        if count <= 0:
            return
        rec = (phase, kind, dtype, int(flops), int(nbytes), tile, causal, op)
        self.counts[rec] = self.counts.get(rec, 0.0) + count

    def mem(self, phase: str, dtype: str, nbytes: float, ops: int, name: str, kind: str = "elementwise") -> None:
        """A group of `ops` memory-bound ops moving `nbytes` in all (split evenly: one record, `ops` times)."""
        if ops > 0 and nbytes > 0:
            self.add(phase, kind, dtype, 0, nbytes / ops, op=name, count=ops)


def _linears(model, setup) -> list[tuple[str, int, int, float]]:
    """(name, in, out, tokens share) of the linear layers of one block (MoE experts at their routed share)."""
    d = model.hidden_size
    q = model.num_attention_heads * model.head_dim
    kv = model.num_key_value_heads * model.head_dim
    i = model.intermediate_size
    gated = model.model_type not in _NON_GATED
    out = [("q_proj", d, q, 1.0), ("k_proj", d, kv, 1.0), ("v_proj", d, kv, 1.0), ("o_proj", q, d, 1.0)]
    if model.is_moe and model.num_experts_per_tok > 0:
        share = model.num_experts_per_tok / model.num_experts
        out.append(("router", d, model.num_experts, 1.0))
        for _e in range(model.num_experts):
            if gated:
                out += [("gate_proj", d, i, share), ("up_proj", d, i, share)]
            else:
                out.append(("fc1", d, i, share))
            out.append(("down_proj", i, d, share))
    elif gated:
        out += [("gate_proj", d, i, 1.0), ("up_proj", d, i, 1.0), ("down_proj", i, d, 1.0)]
    else:
        out += [("fc1", d, i, 1.0), ("fc2", i, d, 1.0)]
    return out


def _targeted(name: str, setup) -> bool:
    if setup.method not in ("lora", "qlora", "dora"):
        return False
    if name == "router":
        return False
    tm = setup.target_modules
    if tm == "all-linear":
        return True
    short = {t.rsplit(".", 1)[-1] for t in tm}
    alias = {"o_proj": {"o_proj", "dense", "out_proj", "c_proj", "o", "output_proj"},
             "q_proj": {"q_proj", "query", "q", "c_attn", "query_key_value", "qkv_proj", "Wqkv"},
             "k_proj": {"k_proj", "key", "k", "c_attn", "query_key_value", "qkv_proj", "Wqkv"},
             "v_proj": {"v_proj", "value", "v", "c_attn", "query_key_value", "qkv_proj", "Wqkv"},
             "gate_proj": {"gate_proj", "w1", "gate_up_proj"}, "up_proj": {"up_proj", "w3", "fc1", "c_fc", "gate_up_proj",
                                                                           "dense_h_to_4h", "wi"},
             "fc1": {"fc1", "c_fc", "dense_h_to_4h", "wi", "up_proj"},
             "down_proj": {"down_proj", "w2", "fc2", "dense_4h_to_h", "wo"}, "fc2": {"fc2", "down_proj", "dense_4h_to_h", "wo", "w2"}}
    return bool(short & alias.get(name, {name}))


def _matmul(tr: _Trace, phase: str, dt: str, es: int, m: float, k: int, n: int, w_es: float | None = None) -> None:
    """One [m, k] x [k, n] matmul (the weight read at w_es bytes per element)."""
    if m <= 0:
        return
    w = es if w_es is None else w_es
    tr.add(phase, "matmul", dt, 2 * m * k * n, (m * k + n * m) * es + k * n * w, tile_efficiency(int(m), n), op="mm")


def analytic_counts(model, setup) -> dict[tuple, float]:
    """The cost records of one training step of `setup` (one micro-batch + the optimizer step), whole depth."""
    tr = _Trace()
    B, S = setup.per_device_train_batch_size, setup.max_length
    extra = setup.num_virtual_tokens if setup.method in ("prompt-tuning", "p-tuning", "prefix-tuning") else 0
    S_eff = S + extra
    T = B * S_eff
    d, L, V = model.hidden_size, model.num_hidden_layers, model.vocab_size
    H, KVH, hd = model.num_attention_heads, model.num_key_value_heads, model.head_dim
    dt = setup.compute_dtype
    es = _ES.get(dt, 2)
    autocast = setup.bf16 or setup.fp16
    w_dt = setup.dtype
    quant4 = setup.load_in_4bit
    quant8 = setup.load_in_8bit
    full = setup.method == "full"
    peft_lora = setup.method in ("lora", "qlora", "dora")
    # the adapters' dtype: peft keeps them in fp32 (autocast_adapter_dtype); trl casts them to bf16 over a
    # quantized model. Their matmuls run in the autocast dtype, or in the adapters' dtype without autocast.
    lw_dt = "bf16" if (quant4 or quant8) else "fp32"
    lw_es = _ES[lw_dt]
    mm_dt = dt if autocast else lw_dt
    mm_es = _ES[mm_dt]
    # the residual stream: fp32 when the non-quantized weights are fp32 (autocast casts only matmul outputs)
    res_es = 4 if w_dt == "fp32" else es
    res_dt = "fp32" if res_es == 4 else dt
    ckpt = setup.gradient_checkpointing
    passes_fwd = ["forward"] + (["recompute"] if ckpt else [])
    is_bert = model.model_type in _ROTARY_FREE and setup.task != "causal-lm"
    causal = setup.task != "sequence-classification" and not is_bert
    if causal and setup.attn_implementation != "flash_attention_2":
        # SDPA gets an explicit mask (no causal skipping) for packed rows and sliding-window models
        cfg = model.config or {}
        if setup.padding_free or (cfg.get("sliding_window") and cfg.get("use_sliding_window", True)):
            causal = False
    gated = model.model_type not in _NON_GATED
    i = model.intermediate_size
    q_dim, kv_dim = H * hd, KVH * hd
    r = setup.r
    # torch.compile (Inductor): each chain of pointwise/reduction ops between two matmuls is one kernel that
    # reads its inputs once and writes what later ops need (tools.memory.timing.OpTrace, fuse=True)
    fz = bool(getattr(setup, "torch_compile", False))
    # reentrant checkpointing recomputes the whole block (no early stop)
    reentrant = bool(getattr(setup, "reentrant_checkpointing", False))
    # bitsandbytes' Linear4bit/8bit casts its input to the compute dtype and its output back to the input's
    # dtype: over fp32 weights the activations between the quantized matmuls stay fp32 (two casts each)
    act_es = 4 if ((quant4 or quant8) and w_dt == "fp32") else es
    act_dt = "fp32" if act_es == 4 else dt

    lins = _linears(model, setup)
    for phase in passes_fwd + ["backward"]:
        bwd = phase == "backward"
        for name, k_in, n_out, share in lins:
            m = T * share
            targeted = _targeted(name, setup)
            if quant4 and name != "router":
                # dequantise the packed weight to the compute dtype, every pass (bnb gemm_4bit / dequantize_4bit)
                tr.add(phase, "dequant", dt, 0, k_in * n_out * (0.5 + 1 / 64 + es), op="dequantize_4bit")
            if act_es != es and name != "router":
                tr.mem(phase, act_dt, m * k_in * (act_es + es) + m * n_out * (es + act_es), 2, "_to_copy")
            w_es = es
            if autocast and w_dt == "fp32" and not quant4:
                # autocast casts the fp32 weight to the compute dtype for the matmul
                tr.add(phase, "elementwise", dt, 0, k_in * n_out * (4 + es), op="_to_copy")
            if phase == "recompute" and name in _MLP_OUT and (full or not targeted) and not reentrant:
                # non-reentrant checkpointing stops recomputing once every saved tensor is back: the
                # block's last matmul (its output is saved by nothing) is not run again
                pass
            elif not bwd:
                _matmul(tr, phase, dt, es, m, k_in, n_out, w_es)
            else:
                _matmul(tr, phase, dt, es, m, n_out, k_in, w_es)  # grad input
                if full:
                    _matmul(tr, phase, dt, es, k_in, m, n_out)  # grad weight: [k, m] x [m, n]
            if targeted and r:
                # peft LoRA: x -> cast to the adapters' dtype -> dropout -> (autocast: cast back) -> A -> B
                # -> * scaling -> + base output. peft keeps adapters in fp32 over 16-bit weights
                # (autocast_adapter_dtype); trl casts them to bf16 for quantized models.
                xb = m * k_in
                drop = 1 if setup.lora_dropout > 0 else 0
                if fz:
                    # one kernel each: forward cast -> dropout -> cast back (the mask kept); backward the
                    # gradient back through them, summed with the base path's input gradient
                    if not bwd:
                        tr.mem(phase, lw_dt, xb * (es + mm_es + drop), 1, "fused_pointwise")
                    else:
                        tr.mem(phase, dt, xb * (mm_es + 2 * es + drop), 1, "fused_pointwise")
                else:
                    if lw_es != es:
                        tr.mem(phase, lw_dt, xb * (es + lw_es), 1, "_to_copy")
                    if drop:
                        tr.mem(phase, lw_dt, xb * (2 * lw_es + 1), 1, "native_dropout")
                    if autocast and lw_es != es:
                        tr.mem(phase, dt, xb * (lw_es + es), 1, "_to_copy")
                if not bwd:
                    _matmul(tr, phase, mm_dt, mm_es, m, k_in, r)
                    _matmul(tr, phase, mm_dt, mm_es, m, r, n_out)
                else:
                    _matmul(tr, phase, mm_dt, mm_es, m, n_out, r)  # grad through B
                    _matmul(tr, phase, mm_dt, mm_es, m, r, k_in)  # grad through A
                    _matmul(tr, phase, mm_dt, mm_es, r, m, n_out)  # grad B
                    _matmul(tr, phase, mm_dt, mm_es, k_in, m, r)  # grad A
                    if not fz:
                        tr.mem(phase, dt, xb * 3 * es, 1, "add")  # the input's gradient from both paths summed
                if fz:  # forward: * scaling + base output in one kernel; backward: the gradient * scaling
                    tr.mem(phase, act_dt, m * n_out * ((act_es + mm_es) if bwd else (2 * act_es + mm_es)), 1, "fused_pointwise")
                    continue
                tr.mem(phase, mm_dt, m * n_out * 2 * mm_es, 1, "mul")  # * scaling (backward: the same)
                if not bwd:
                    tr.mem(phase, act_dt, m * n_out * (2 * act_es + mm_es), 1, "add")  # + base output
        # attention
        if setup.attn_implementation == "eager":
            scores = B * H * S_eff * S_eff
            if not bwd:
                tr.add(phase, "matmul", dt, 2 * scores * hd, (2 * T * q_dim + scores) * es, tile_efficiency(S_eff, S_eff), op="bmm")
                tr.mem(phase, "fp32", scores * (es + 4 + 4 + es), 2, "_softmax", "norm_softmax")  # upcast + softmax + cast back
                if causal:
                    tr.mem(phase, dt, scores * 2 * es, 1, "add")  # + mask
                tr.add(phase, "matmul", dt, 2 * scores * hd, (scores + 2 * T * q_dim) * es, tile_efficiency(S_eff, hd), op="bmm")
            else:
                for _ in range(4):
                    tr.add(phase, "matmul", dt, 2 * scores * hd, (scores + 2 * T * q_dim) * es, tile_efficiency(S_eff, hd), op="bmm")
                tr.mem(phase, "fp32", scores * (3 * 4 + es * 2), 2, "_softmax_backward_data", "norm_softmax")
        else:
            fl = 4 * B * H * S_eff * S_eff * hd
            qkvo = T * (2 * q_dim + 2 * kv_dim) * es
            if not bwd:
                tr.add(phase, "attention_fwd", dt, fl, qkvo + B * H * S_eff * 4, 1.0, causal, "_scaled_dot_product_flash_attention")
            else:
                tr.add(phase, "attention_bwd", dt, 2.5 * fl, 2 * qkvo + T * q_dim * es + B * H * S_eff * 4, 1.0, causal,
                       "_scaled_dot_product_flash_attention_backward")
            if KVH < H:  # HF's repeat_kv before SDPA: k and v copied to every query head
                tr.mem(phase, act_dt, 2 * T * (kv_dim + q_dim) * act_es * (2 if bwd else 1), 2, "clone")
            if act_es != es:  # SDPA under autocast: q, k, v cast to the compute dtype (the gradients back)
                tr.mem(phase, act_dt, T * (q_dim + 2 * kv_dim) * (act_es + es), 3, "_to_copy")
        # the memory-bound rest of a block, per tensor of T x width (bytes read + written by the group)
        f = 2.0 if bwd else 1.0  # a backward op reads the gradient and what its forward saved, writes a gradient
        if fz and not is_bert:
            # fused: [residual add + norm] x2 (read the branch output and the stream, write the new stream and
            # the normed input; backward: read the gradient(s) and the saved input, write the stream's
            # gradient), rotary on q/k (read, write), the activation and gated product (read gate/up, write)
            if not bwd:
                tr.mem(phase, res_dt, 2 * T * d * (2 * es + 2 * res_es), 2, "fused_pointwise")
            else:
                tr.mem(phase, res_dt, 2 * T * d * (es + 3 * res_es), 2, "fused_pointwise")
            if model.model_type not in _ROTARY_FREE:
                tr.mem(phase, act_dt, T * (q_dim + kv_dim) * act_es * 2, 1, "fused_pointwise")
            tr.mem(phase, act_dt, T * i * act_es * ((5 if bwd else 3) if gated else 2), 1, "fused_pointwise")
            if model.is_moe and model.num_experts_per_tok > 0:
                tr.mem(phase, dt, f * T * d * es * 2 * model.num_experts_per_tok * 2, 4, "index")  # dispatch / combine
            if bwd:
                tr.mem(phase, dt, T * (d + q_dim + 2 * kv_dim) * 3 * es, 3, "add")  # q/k/v input gradients summed
            continue
        if model.model_type in _NORM_LAYERNORM:
            norm_b = T * d * (2 * res_es + 2 * 4)  # LayerNorm kernel (+ fp32 mean/rstd)
            tr.mem(phase, res_dt, 2 * f * norm_b, 2 * (2 if bwd else 1), "native_layer_norm", "norm_softmax")
        else:
            # HF RMSNorm: to(fp32), pow, mean, rsqrt, mul, to(dtype), * weight
            norm_b = T * d * ((res_es + 4) + 8 + 4 + 8 + (4 + es) + 3 * es)
            tr.mem(phase, "fp32", 2 * f * norm_b, 2 * (7 if not bwd else 10), "rms_norm")
        if model.model_type not in _ROTARY_FREE:
            # rotary on q and k: q*cos, rotate_half (slice, neg, cat), *sin, add
            rot = T * (q_dim + kv_dim) * act_es * (3 + 2 + 2 + 3 + 3)
            tr.mem(phase, act_dt, (1.4 if bwd else 1.0) * rot, 2 * (5 if not bwd else 6), "rotary")
        # activation (silu/gelu) and the gated product
        act = T * i * act_es * (2 + (3 if gated else 0))
        if model.is_moe and model.num_experts_per_tok > 0:
            act *= model.num_experts_per_tok
            tr.mem(phase, dt, f * T * d * es * 2 * model.num_experts_per_tok * 2, 4, "index")  # dispatch / combine
        tr.mem(phase, act_dt, f * act, 2 if gated else 1, "silu")
        # residual adds (+ their backward accumulations) and dropout where the model has it
        tr.mem(phase, res_dt, f * 2 * T * d * 3 * res_es, 2 * (2 if bwd else 1), "add")
        if bwd:
            tr.mem(phase, dt, T * (d + q_dim + 2 * kv_dim) * 3 * es, 3, "add")  # q/k/v input gradients summed
        if is_bert:
            tr.mem(phase, dt, f * 3 * T * d * (2 * es + 1), 3, "native_dropout")
            tr.mem(phase, dt, f * T * i * 3 * es, 1, "add")  # bias
    # per-block records -> the whole depth
    counts = {rec: c * L for rec, c in tr.counts.items()}

    head = _Trace()
    # embedding lookup (+ its weight gradient when trained)
    head.mem("forward", res_dt, 2 * T * d * res_es, 1, "embedding")
    if full:
        head.mem("backward", "fp32", V * d * res_es + T * d * res_es, 2, "embedding_dense_backward")
    if setup.task == "sequence-classification":
        n_lab = setup.num_labels
        _matmul(head, "forward", dt, es, B, d, n_lab)
        _matmul(head, "backward", dt, es, B, n_lab, d)
    elif getattr(setup, "loss_impl", "hf") == "hf":
        _matmul(head, "forward", dt, es, T, d, V)
        _matmul(head, "backward", dt, es, T, V, d)
        if full:
            _matmul(head, "backward", dt, es, d, T, V)
        # HF's loss: logits.float(), log_softmax, nll; backward the same in reverse, then cast back
        if fz:  # one kernel each way: read the logits, write the (saved) log-probs; back: read them, write the gradient
            head.mem("forward", "fp32", T * V * (es + 4), 1, "fused_pointwise")
            head.mem("backward", "fp32", T * V * (4 + es), 1, "fused_pointwise")
        else:
            head.mem("forward", "fp32", T * V * (es + 4), 1, "_to_copy")
            head.mem("forward", "fp32", T * V * 8, 1, "_log_softmax", "norm_softmax")
            head.mem("backward", "fp32", T * V * 4, 1, "nll_loss_backward", "norm_softmax")
            head.mem("backward", "fp32", T * V * 12, 1, "_log_softmax_backward_data", "norm_softmax")
            head.mem("backward", dt, T * V * (4 + es), 1, "_to_copy")
    else:
        # fused heads (trl's chunked log-probs, Liger, CCE): the logits exist one tile at a time; the
        # backward recomputes each tile's logits, then the input gradient and (trained head) the weight's
        _matmul(head, "forward", dt, es, T, d, V)
        _matmul(head, "backward", dt, es, T, d, V)
        _matmul(head, "backward", dt, es, T, V, d)
        if full:
            _matmul(head, "backward", dt, es, d, T, V)
        head.mem("forward", dt, T * V * es * 2, 1, "logits_tile")
        head.mem("backward", dt, T * V * es * 4, 2, "logits_tile")
    # final norm
    if fz:
        head.mem("forward", res_dt, T * d * (res_es + es), 1, "fused_pointwise")
        head.mem("backward", res_dt, T * d * (es + 2 * res_es), 1, "fused_pointwise")
    else:
        head.mem("forward", "fp32", T * d * 40, 7, "rms_norm")
        head.mem("backward", "fp32", T * d * 60, 10, "rms_norm")
    for rec, c in head.counts.items():
        counts[rec] = counts.get(rec, 0.0) + c

    # the optimizer step over the trainable parameters (+ gradient clipping)
    P = _trainable(model, setup)
    p_es = 2 if (setup.method != "full" and (quant4 or quant8)) else _ES.get(w_dt, 2)
    if peft_lora and not (quant4 or quant8):
        p_es = 4 if w_dt != "fp32" else 4  # peft's fp32 adapters
    opt = _optimizer_bytes(setup.optim, P, p_es)
    nops, total = opt
    if setup.max_grad_norm > 0:
        counts[("optimizer", "optimizer", "fp32", 0, int(P * p_es), 1.0, False, "_foreach_norm")] = 1.0
        counts[("optimizer", "optimizer", "fp32", 0, int(2 * P * p_es), 1.0, False, "_foreach_mul_")] = 1.0
    if nops:
        counts[("optimizer", "optimizer", "fp32", 0, int(total / nops), 1.0, False, setup.optim)] = float(nops)
    return counts


def _trainable(model, setup) -> float:
    if setup.method == "full":
        return float(model.num_parameters)
    if setup.method in ("lora", "qlora", "dora"):
        n = 0.0
        for name, k_in, n_out, share in _linears(model, setup):
            if _targeted(name, setup):
                n += setup.r * (k_in + n_out)
        return n * model.num_hidden_layers
    return float(model.hidden_size * max(setup.num_virtual_tokens, 1) * (2 * model.num_hidden_layers if setup.method == "prefix-tuning" else 1))


def _optimizer_bytes(optim: str, params: float, es: float) -> tuple[int, float]:
    """(kernels, bytes moved) of one optimizer step over `params` parameters of `es` bytes."""
    if optim == "adamw_torch_fused":
        return 1, params * es * 7  # one fused kernel: read p, g, m, v; write p, m, v
    if optim in ("adamw_torch", "adagrad", "rmsprop"):
        return 10, params * es * 26  # foreach: lerp, mul, addcmul, sqrt, div, add, addcdiv, weight decay, ...
    if optim == "sgd":
        return 2, params * es * 5
    if optim == "adafactor":
        return 40, params * es * 12
    if "8bit" in optim:
        return 1, params * (3 * es + 4)  # bitsandbytes' fused 8-bit update: p, g in their dtype, 1-byte moments
    return 10, params * es * 26
