"""Training throughput, wall-clock time and cost of a setup.

Two time models:

- **op-roofline** (`estimate_throughput(..., step=StepMemory)` with a simulated step): the step
  time from the dry run's op trace, op by op (`tools.memory.timing`: FLOPs and bytes moved of every
  aten op at the GPU's achievable matmul / flash-attention / memory rates, plus communication,
  offload, host dispatch), for one optimizer step; tokens/s follow from the tokens in that step.
- **flat-factors** (`flat_estimate_throughput`, and `estimate_throughput` without a simulated
  step): the stated fallback of the analytic tier, FLOPs per token over a product of literature
  MFU factors:

    tokens/s = num_gpus x dense peak TFLOPs (compute dtype) x utilisation / FLOPs per token

FLOPs per token (N = matmul parameters: everything except the input embedding, so the LM
head counts; for MoE models only the experts a token is routed to):
  forward                 2N + attention
  backward, full FT       4N + 2 x attention   (activation grads 2N + weight grads 2N)
  backward, LoRA/QLoRA    2N + 2 x attention   (activation grads only: frozen weights get no
                                                weight-gradient matmul) + adapter terms
  gradient checkpointing  + the forward of the decoder layers again (recompute)
  attention per token     2·2·L·s·H·head_dim / 2 forward (QK^T and AV, 2 FLOPs per
                          multiply-add, causal mask halves it) = 2·L·s·H·head_dim; backward twice that
  LoRA adapters           per adapted Linear(in, out): r·(in+out) parameters, 6 FLOPs each per token

Utilisation is a product of stated factors (tables below) and is corrected by measured trial
runs through `$TUNEPILOT_HOME/calibration.jsonl`. Because the FLOPs include recompute, the
utilisation here is hardware-FLOPs utilisation (HFU); without checkpointing it equals MFU.

Pure Python over the pydantic models: no torch import.
"""

from __future__ import annotations

import json
import os
import statistics
from functools import lru_cache
from pathlib import Path

from tools.schemas import HardwareSpec, ModelSpec, ThroughputEstimate, TrainingSetup, TunepilotError

# --------------------------------------------------------------------------------------
# Utilisation factors. Estimates with sources; trial runs correct them (calibration.jsonl).
# --------------------------------------------------------------------------------------

# Fraction of dense peak a well-configured single-GPU run reaches for a 7B-class model
# (hidden size >= 4096, >= 4k tokens per micro-batch, flash/SDPA attention, bf16) on A100/H100.
MFU_BY_METHOD: dict[str, float] = {
    # Full fine-tuning: 40-45% MFU is what tuned PyTorch/HF stacks report for 7B-class models
    # on A100/H100 (torchtune and HF Trainer + FSDP/flash-attn; PaLM reported 46% at scale,
    # MosaicML llm-foundry ~50% on A100 for 7B pre-training). We take the low end.
    "full": 0.40,
    # LoRA: no weight-gradient GEMMs, but the rank-r adapter GEMMs, dropout and extra kernel
    # launches run far below peak; HF/peft LoRA typically lands at 30-40%.
    "lora": 0.35,
    # DoRA: LoRA plus the weight-norm of W + BA on every forward; the peft docs warn DoRA has
    # "a bigger overhead than pure LoRA" (reported 1.2-2x slower step time without caching).
    "dora": 0.25,
    # QLoRA: every base weight is de-quantised from NF4 on each forward and backward
    # (Dettmers et al. 2023, QLoRA paper); HF QLoRA runs roughly 1.3-2x slower than bf16 LoRA
    # (Unsloth and HF blog benchmarks), i.e. ~25% of peak.
    "qlora": 0.25,
    # Other PEFT methods run the full frozen forward/backward like LoRA with tiny trainables.
    "ia3": 0.35,
    "prompt-tuning": 0.35,
    "prefix-tuning": 0.35,
    "p-tuning": 0.35,
}

# LLM.int8 base weights (load_in_8bit): the outlier-decomposed int8 matmul is much slower than
# bf16 GEMM in training (LLM.int8 paper; bitsandbytes docs recommend 4-bit for fine-tuning).
INT8_BASE_FACTOR = 0.6

# GPU class (the TFLOPs in the catalog already use the GeForce FP32-accumulate rate).
GPU_CLASS_FACTOR: dict[str, float] = {
    "hbm": 1.0,         # A100/H100/H200/B200/GH200: the references above were measured here
    "gddr": 0.9,        # L40S, A10G, RTX 4090, ...: lower power limits and smaller caches
    "low_power": 0.8,   # L4 (72 W), T4 (70 W): clocks throttle under sustained tensor load
    "volta_turing": 0.8,  # CC 7.x: no FlashAttention-2 (needs sm80+), fp16 with loss scaling
    "pascal": 0.6,      # CC 6.x: no tensor cores at all
    "amd": 0.75,        # MI300X: ROCm training stacks reach a lower share of peak than CUDA on H100
                        # (SemiAnalysis MI300X vs H100 training benchmark, Dec 2024)
}

# Multi-GPU scaling efficiency per strategy (fraction of N x single-GPU throughput).
SCALING_EFFICIENCY: dict[str, float] = {
    "single": 1.0,
    "ddp": 0.90,                 # gradient all-reduce overlapped with backward (PyTorch DDP paper, VLDB 2020)
    "zero1": 0.90,
    "zero2": 0.90,               # DeepSpeed ZeRO-1/2: same traffic as DDP, reduce-scatter + all-gather
    "zero3": 0.80,               # ZeRO-3: parameters all-gathered every forward and backward (1.5x DDP traffic)
    "fsdp_full_shard": 0.80,     # FSDP full_shard is ZeRO-3 shaped
    "fsdp_shard_grad_op": 0.88,  # FSDP shard_grad_op is ZeRO-2 shaped
}
# PEFT gradients are tiny, so data-parallel all-reduce costs almost nothing.
PEFT_DATA_PARALLEL_EFFICIENCY = 0.95
# Extra factor when GPUs span machines (inter-node links are slower than NVLink/PCIe).
MULTI_NODE_FACTOR = 0.90

# CPU offload (DeepSpeed ZeRO-Offload / ZeRO-Infinity, FSDP cpu_offload): the optimizer step runs
# on the CPU and states/parameters cross PCIe every step. ZeRO-Offload paper (Ren et al. 2021)
# reports large slow-downs for small batches; taken as x0.5 (optimizer) and x0.3 (parameters).
OFFLOAD_FACTOR: dict[str, float] = {"none": 1.0, "optimizer": 0.5, "all": 0.3}
# With PEFT the offloaded optimizer state is tiny: little is lost.
PEFT_OPTIMIZER_OFFLOAD_FACTOR = 0.9
# Parameter offload ('all': ZeRO-3 offload_param / FSDP cpu_offload) is bounded by host<->GPU
# traffic, not by a flat factor: every micro-batch copies this GPU's shard of the weights to the
# GPU for the forward, again for the checkpointed recompute, and again for the backward. So the
# cost depends on how many bytes the weights take (4-bit QLoRA moves ~4x less than bf16 LoRA).
# PCIe 4.0 x16 moves ~25 GB/s per direction in practice from pinned memory (32 GB/s theoretical);
# DeepSpeed overlaps prefetch with compute, taken as half of the shorter of the two hidden.
PCIE_GBS = 25.0
OFFLOAD_OVERLAP = 0.5

# GEMMs with few rows (tokens per micro-batch) and narrow models run below peak.
FULL_EFFICIENCY_TOKENS = 4096   # tokens per micro-batch per GPU
TOKENS_EXPONENT = 0.15          # 2048 tokens -> 0.90, 512 -> 0.73, 128 -> 0.59
FULL_EFFICIENCY_HIDDEN = 4096   # hidden size of the 7B-class reference
HIDDEN_EXPONENT = 0.4           # 2048 -> 0.76, 896 -> 0.54
EAGER_ATTENTION_FACTOR = 0.85   # eager attention materialises s^2 scores (memory-bound) for s >= 1024
MAX_UTILISATION = 0.95

CALIBRATION_FILE = "calibration.jsonl"
# Which time model predicted a calibration record ('predictor' key written by tools.trial); records
# predicted by another model (older records: the flat factors) are not comparable and are skipped.
OP_ROOFLINE = "op-roofline"
FLAT_FACTORS = "flat-factors"

# Linear layers people target, as (in, out) in terms of the model's shape.
_PROJ_SHAPES = {
    "q_proj": ("d", "q"), "k_proj": ("d", "kv"), "v_proj": ("d", "kv"), "o_proj": ("q", "d"),
    "gate_proj": ("d", "i"), "up_proj": ("d", "i"), "down_proj": ("i", "d"),
    "query": ("d", "q"), "key": ("d", "kv"), "value": ("d", "kv"), "q": ("d", "q"), "k": ("d", "kv"), "v": ("d", "kv"), "o": ("q", "d"),
    "query_key_value": ("d", "qkv"), "c_attn": ("d", "qkv"), "Wqkv": ("d", "qkv"), "qkv_proj": ("d", "qkv"),
    "dense": ("q", "d"), "out_proj": ("q", "d"), "c_proj": ("q", "d"),
    "fc1": ("d", "i"), "c_fc": ("d", "i"), "w1": ("d", "i"), "w3": ("d", "i"), "dense_h_to_4h": ("d", "i"), "wi": ("d", "i"),
    "gate_up_proj": ("d", "2i"),
    "fc2": ("i", "d"), "w2": ("i", "d"), "dense_4h_to_h": ("i", "d"), "wo": ("i", "d"),
}
_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "wi", "wo", "gate_up_proj"}


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


def _matmul_params(model: ModelSpec, setup: TrainingSetup) -> tuple[float, list[str]]:
    """Parameters that take part in a matmul per token (N), and notes on how it was counted."""
    notes: list[str] = []
    emb = model.vocab_size * model.hidden_size
    total = float(model.num_parameters)
    # Tied: the one matrix is both the (free) lookup and the LM head matmul. Untied: drop the lookup.
    n = total if model.tie_word_embeddings else total - emb
    if setup.task == "sequence-classification":
        n -= emb  # a num_labels-wide score head replaces the vocabulary-wide LM head
    if model.is_moe and model.num_experts_per_tok > 0:
        expert = 3 * model.hidden_size * model.intermediate_size  # gated MLP: gate, up, down
        inactive = model.num_hidden_layers * (model.num_experts - model.num_experts_per_tok) * expert
        if 0 < inactive < n:
            n -= inactive
            notes.append(f"MoE: {model.num_experts_per_tok} of {model.num_experts} experts active per token; "
                         f"N counts active parameters only ({n / 1e9:.2f}B of {total / 1e9:.2f}B)")
    if n <= 0:
        n = total
    return n, notes


def _adapter_params_per_token(model: ModelSpec, setup: TrainingSetup) -> float:
    """LoRA parameters a token passes through (r x (in + out) per adapted Linear, active experts only)."""
    if setup.method not in ("lora", "qlora", "dora"):
        return 0.0
    dims = {
        "d": model.hidden_size,
        "q": model.num_attention_heads * model.head_dim,
        "kv": model.num_key_value_heads * model.head_dim,
        "i": model.intermediate_size,
    }
    dims["qkv"] = dims["q"] + 2 * dims["kv"]
    dims["2i"] = 2 * dims["i"]
    names = _ALL_LINEAR if setup.target_modules == "all-linear" else tuple(setup.target_modules)
    experts = model.num_experts_per_tok if model.is_moe and model.num_experts_per_tok > 0 else 1
    per_layer = 0.0
    for name in names:
        short = name.rsplit(".", 1)[-1]
        a, b = _PROJ_SHAPES.get(short, ("d", "d"))
        p = setup.r * (dims[a] + dims[b])
        per_layer += p * (experts if short in _MLP_NAMES else 1)
    return per_layer * model.num_hidden_layers


def _flops_breakdown(model: ModelSpec, setup: TrainingSetup) -> tuple[float, list[str]]:
    n, notes = _matmul_params(model, setup)
    s = setup.max_length
    extra_tokens = setup.num_virtual_tokens if setup.method in ("prompt-tuning", "p-tuning", "prefix-tuning") else 0
    attn_fwd = 2.0 * model.num_hidden_layers * (s + extra_tokens) * model.num_attention_heads * model.head_dim
    lm_head = 0.0 if setup.task == "sequence-classification" else model.vocab_size * model.hidden_size
    adapters = _adapter_params_per_token(model, setup)

    forward = 2 * n + attn_fwd + 2 * adapters
    if setup.method == "full":
        backward = 4 * n + 2 * attn_fwd
        how = "full FT: forward 2N, backward 4N (activation + weight gradients)"
    else:
        backward = 2 * n + 2 * attn_fwd + 4 * adapters
        how = (f"{setup.method}: forward 2N, backward 2N (activation gradients only through frozen weights)"
               + (f" + adapters 6 x {adapters / 1e6:.1f}M" if adapters else ""))
    recompute = (forward - 2 * lm_head) if setup.gradient_checkpointing else 0.0
    # trl's fused head and CCE recompute the LM head's logits tiles in backward (Liger computes the gradient in forward)
    head_recompute = 2 * lm_head if setup.task == "causal-lm" and setup.loss_impl in ("trl_fused", "cce") else 0.0
    recompute += head_recompute
    total = forward + backward + recompute
    if extra_tokens:
        total *= (s + extra_tokens) / s  # the virtual tokens run through every layer too
    notes.insert(0, f"FLOPs/token {total / 1e9:.1f} GFLOP = {how}"
                    f"{'; + recomputed forward (gradient checkpointing)' if recompute - head_recompute else ''}"
                    f"{f'; + LM-head tiles recomputed in backward ({setup.loss_impl})' if head_recompute else ''}; "
                    f"N = {n / 1e9:.2f}B matmul params (all but the input embedding); "
                    f"attention 2·L·s·H·head_dim = {attn_fwd / 1e9:.2f} GFLOP/token forward at s={s} (causal), x3 fwd+bwd")
    return total, notes


# Decode is memory-bandwidth bound: every step reads all weights (and the KV cache) once for the whole batch.
# Fraction of the GPU's memory bandwidth a decode step reaches: transformers' generate (eager, one Python step per
# token, unfused sampling) vs vLLM (paged attention, CUDA graphs). Stated assumptions, refined by trial runs.
DECODE_BANDWIDTH_EFFICIENCY = {"transformers": 0.35, "vllm": 0.8}


def _objective_time_factor(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec, fpt: float,
                           flops_per_s: float) -> tuple[float, list[str]]:
    """How much slower than SFT on the same trained tokens an objective's step is (issue 15), with the factors stated.

    - DPO/KTO: the reference forward (a no-grad forward of every row: ~1/(3+ckpt) of a training step's FLOPs);
      precomputed reference log-probs: one forward over the data before training, amortised over the epochs;
      KTO adds the KL rows' no-grad forward (and the reference's).
    - GRPO: per optimizer step and GPU, the generation of the local generation batch (prefill + max_completion_length
      decode steps, each max(weights + KV bytes / (bandwidth x efficiency), FLOPs / peak)) and the no-grad scoring
      forwards (old log-probs when needed, reference log-probs when beta > 0), on top of training the completions.
    """
    notes: list[str] = []
    passes = 4.0 if setup.gradient_checkpointing else 3.0  # forward + backward (2x) + recompute, in forward units
    extra_fwd = 0.0
    if setup.objective in ("dpo", "kto"):
        if setup.reference_mode in ("copy", "peft_base"):
            extra_fwd += 1.0
        elif setup.reference_mode == "precomputed":
            extra_fwd += 1.0 / max(setup.num_train_epochs, 1.0)
        if setup.objective == "kto" and setup.effective_loss_type == "kto":
            extra_fwd += 1.0 + (1.0 if setup.reference_mode in ("copy", "peft_base") else 0.0)  # KL rows: policy (+ reference)
        factor = (passes + extra_fwd) / passes
        notes.append(f"{setup.objective}: {extra_fwd:g} extra no-grad forward(s) per row (reference {setup.reference_mode}"
                     f"{', KL rows' if setup.objective == 'kto' else ''}): x{factor:.2f} step time")
        return factor, notes
    if setup.objective != "grpo":
        return 1.0, notes
    n = max(1, setup.num_gpus)
    local = max(1, setup.grpo_generation_batch // n)
    p, c = setup.prompt_length, setup.max_completion_length
    seq = p + c
    steps_per_generation = max(1, setup.grpo_generation_batch // (setup.per_device_train_batch_size * n))
    rounds_per_step = setup.gradient_accumulation_steps / steps_per_generation
    trained_tokens = setup.per_device_train_batch_size * setup.gradient_accumulation_steps * seq
    train_s = trained_tokens * fpt / flops_per_s
    fwd_flops_per_token = fpt / passes
    score_fwd = (1.0 if setup.reference_mode != "none" else 0.0)
    from tools.memory.objectives import _needs_old_logps  # noqa: PLC0415 - light: no torch at import

    score_fwd += 1.0 if _needs_old_logps(setup) else 0.0
    score_s = rounds_per_step * local * seq * fwd_flops_per_token * score_fwd / flops_per_s
    engine = "vllm" if setup.use_vllm else "transformers"
    eff = DECODE_BANDWIDTH_EFFICIENCY[engine]
    bw = hardware.gpu.memory_bandwidth_gbs * 1e9 * eff
    weight_bytes = model.num_parameters * (0.55 if setup.load_in_4bit and not setup.use_vllm else 2.0)
    from tools.analytic import kv_cache_bytes  # noqa: PLC0415

    kv_mean = kv_cache_bytes(model, setup, local, p + c // 2)  # the cache read per step grows from p to p + c
    decode_step = max((weight_bytes + kv_mean) / bw, 2.0 * model.num_parameters * local / flops_per_s)
    prefill = local * p * fwd_flops_per_token / flops_per_s
    gen_s = rounds_per_step * (prefill + c * decode_step)
    if setup.use_vllm and setup.vllm_mode == "server":
        notes.append(f"vLLM server on {setup.vllm_server_gpus} other GPU(s): generation overlaps nothing in trl 1.16 "
                     "(the trainer waits for it), counted at the server's decode rate")
    factor = (train_s + score_s + gen_s) / train_s
    notes.append(
        f"grpo: per optimizer step and GPU, training {trained_tokens:,} tokens {train_s:.2f} s + scoring forwards "
        f"({score_fwd:g} per completion) {score_s:.2f} s + generation of {local} x {c} tokens with {engine} "
        f"{gen_s:.2f} s ({c} decode steps x {decode_step * 1e3:.1f} ms: weights {weight_bytes / 2**30:.1f} GiB + KV cache read at "
        f"{eff:.0%} of {hardware.gpu.memory_bandwidth_gbs:g} GB/s; prefill {prefill:.2f} s): x{factor:.2f} step time"
    )
    return factor, notes


def flops_per_token(model: ModelSpec, setup: TrainingSetup) -> float:
    """Training FLOPs per token of this setup: forward + backward (+ recompute with gradient checkpointing), incl. attention."""
    return _flops_breakdown(model, setup)[0]


# --------------------------------------------------------------------------------------
# Utilisation
# --------------------------------------------------------------------------------------


def _gpu_class(hardware: HardwareSpec) -> str:
    gpu = hardware.gpu
    if gpu.vendor.upper() == "AMD":
        return "amd"
    try:
        cc = float(gpu.compute_capability) if gpu.compute_capability else None
    except ValueError:
        cc = None
    if cc is not None and cc < 7.0:
        return "pascal"
    if cc is not None and cc < 8.0:
        return "volta_turing" if (gpu.tdp_w or 300) > 100 else "low_power"
    if gpu.tdp_w is not None and gpu.tdp_w < 100:
        return "low_power"
    if gpu.memory_bandwidth_gbs >= 1500:
        return "hbm"
    return "gddr"


def _peak_tflops(setup: TrainingSetup, hardware: HardwareSpec, notes: list[str]) -> tuple[float, str]:
    gpu = hardware.gpu
    dtype = setup.bnb_4bit_compute_dtype if setup.load_in_4bit else setup.compute_dtype
    if dtype == "bf16":
        if gpu.bf16 and gpu.bf16_tflops:
            return gpu.bf16_tflops, "bf16"
        notes.append(f"{gpu.name} has no bf16: this setup must use fp16 (fp16=True, bf16=False); estimated at the fp16 rate")
        return gpu.fp16_tflops, "fp16"
    if dtype == "fp16":
        return gpu.fp16_tflops, "fp16"
    fp32 = gpu.fp32_tflops or gpu.fp16_tflops / 8
    notes.append("fp32 training: non-tensor-core FP32 rate (TF32 is off by default in PyTorch/HF); bf16/fp16 mixed precision is far faster")
    return fp32, "fp32"


def _scaling(setup: TrainingSetup) -> tuple[float, str]:
    if setup.num_gpus <= 1:
        return 1.0, "single GPU"
    strategy = setup.sharding
    eff = SCALING_EFFICIENCY.get(strategy, 0.85)
    if setup.is_peft and strategy in ("ddp", "zero1", "zero2"):
        eff = PEFT_DATA_PARALLEL_EFFICIENCY
    if setup.num_nodes > 1:
        eff *= MULTI_NODE_FACTOR
    return eff, f"{setup.num_gpus} GPUs {strategy}{f' on {setup.num_nodes} nodes' if setup.num_nodes > 1 else ''}"


def _calibration_path() -> Path:
    home = os.environ.get("TUNEPILOT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tunepilot")
    return Path(home) / CALIBRATION_FILE


_CAL_CACHE: dict[str, tuple[tuple[int, int], list[dict]]] = {}


def _calibration_records(path: Path) -> list[dict]:
    try:
        st = path.stat()
    except OSError:
        return []
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _CAL_CACHE.get(str(path))
    if cached and cached[0] == stamp:
        return cached[1]
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    _CAL_CACHE[str(path)] = (stamp, records)
    return records


@lru_cache(maxsize=256)
def _canonical_gpu(name: str) -> str:
    from tools.gpus import find_gpu

    try:
        return find_gpu(name).name
    except TunepilotError:
        return name.strip().lower()


def _calibration_ratio(hardware: HardwareSpec, method: str, predictor: str = FLAT_FACTORS) -> tuple[float, int, Path] | None:
    """Median measured/predicted tokens/s of trial runs on this GPU model with this method, predicted by `predictor`."""
    path = _calibration_path()
    want = _canonical_gpu(hardware.gpu.name)
    ratios = []
    for rec in _calibration_records(path):
        if rec.get("ok") is False:  # a failed trial (OOM, crash) measured no steady rate
            continue
        if rec.get("predictor", FLAT_FACTORS) != predictor:  # another time model's prediction: not comparable
            continue
        try:
            gpu, m = str(rec["gpu"]), str(rec["method"])
            measured, predicted = float(rec["tokens_per_second"]), float(rec["predicted_tokens_per_second"])
        except (KeyError, TypeError, ValueError):
            continue
        if m == method and measured > 0 and predicted > 0 and _canonical_gpu(gpu) == want:
            ratios.append(measured / predicted)
    if not ratios:
        return None
    return min(max(statistics.median(ratios), 0.05), 5.0), len(ratios), path


def _utilisation(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec) -> tuple[float, float, str]:
    """(utilisation incl. everything, multi-GPU scaling factor, description of the factors)."""
    method = MFU_BY_METHOD.get(setup.method, 0.3)
    parts = [f"method {setup.method} {method:.2f}"]
    u = method
    if setup.load_in_8bit:
        u *= INT8_BASE_FACTOR
        parts.append(f"int8 base x{INT8_BASE_FACTOR}")
    cls = _gpu_class(hardware)
    u *= GPU_CLASS_FACTOR[cls]
    parts.append(f"GPU class {cls} x{GPU_CLASS_FACTOR[cls]}")
    tokens = setup.per_device_train_batch_size * setup.max_length
    if tokens < FULL_EFFICIENCY_TOKENS:
        f = max(0.5, (tokens / FULL_EFFICIENCY_TOKENS) ** TOKENS_EXPONENT)
        u *= f
        parts.append(f"{tokens} tokens/micro-batch x{f:.2f}")
    if model.hidden_size < FULL_EFFICIENCY_HIDDEN:
        f = max(0.3, (model.hidden_size / FULL_EFFICIENCY_HIDDEN) ** HIDDEN_EXPONENT)
        u *= f
        parts.append(f"hidden {model.hidden_size} x{f:.2f}")
    if setup.attn_implementation == "eager" and setup.max_length >= 1024:
        u *= EAGER_ATTENTION_FACTOR
        parts.append(f"eager attention x{EAGER_ATTENTION_FACTOR}")
    if setup.offload != "none":
        # the optimizer part of any offload; parameter traffic ('all') is added in _param_offload_factor
        f = PEFT_OPTIMIZER_OFFLOAD_FACTOR if setup.is_peft else OFFLOAD_FACTOR["optimizer"]
        u *= f
        parts.append(f"CPU offload of the optimizer x{f}")
    scale, scale_desc = _scaling(setup)
    if scale != 1.0:
        parts.append(f"{scale_desc} scaling x{scale:.2f}")
    u *= scale
    return u, scale, "; ".join(parts)


def _weight_bytes_per_param(setup: TrainingSetup) -> float:
    """Bytes per base parameter as stored (what parameter offload moves across PCIe)."""
    if setup.load_in_4bit:
        return 0.5 + 0.07  # packed 4-bit + absmax/double-quant constants and unquantized embeddings, roughly
    if setup.load_in_8bit:
        return 1.0 + 0.02
    if setup.method == "full" and (setup.zero_stage or setup.fsdp != "none"):
        return 2.0 if (setup.bf16 or setup.fp16) else 4.0  # sharded engines gather the compute-dtype copy
    return {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[setup.dtype]


def _param_offload_factor(model: ModelSpec, setup: TrainingSetup, fpt: float, tflops_per_gpu: float) -> tuple[float, str]:
    """Slow-down from streaming offloaded parameters over PCIe each micro-batch: compute / step time."""
    shards = max(1, setup.num_gpus)
    passes = 3 if setup.gradient_checkpointing else 2  # forward, (recompute,) backward
    traffic = model.num_parameters * _weight_bytes_per_param(setup) / shards * passes  # bytes per GPU per micro-batch
    transfer_s = traffic / (PCIE_GBS * 1e9)
    compute_s = fpt * setup.per_device_train_batch_size * setup.max_length / (tflops_per_gpu * 1e12)
    step_s = max(compute_s, transfer_s) + (1 - OFFLOAD_OVERLAP) * min(compute_s, transfer_s)
    f = compute_s / step_s
    return f, (f"parameter offload x{f:.2f} ({traffic / 1e9:.1f} GB over PCIe per micro-batch at {PCIE_GBS:g} GB/s: "
               f"{transfer_s:.2f} s vs {compute_s:.2f} s compute)")


def _activation_offload_factor(model: ModelSpec, setup: TrainingSetup, fpt: float, tflops_per_gpu: float) -> tuple[float, str]:
    """Slow-down from trl's activation offloading: the saved activations go to the host in forward and come back in
    backward over PCIe, on a side stream (overlapped with compute as much as OFFLOAD_OVERLAP allows)."""
    from tools.analytic import analytic_step_memory

    traffic = 2 * analytic_step_memory(model, setup).offload_traffic_bytes  # to the host and back, per micro-batch
    transfer_s = traffic / (PCIE_GBS * 1e9)
    compute_s = fpt * setup.per_device_train_batch_size * setup.max_length / (tflops_per_gpu * 1e12)
    step_s = max(compute_s, transfer_s) + (1 - OFFLOAD_OVERLAP) * min(compute_s, transfer_s)
    f = compute_s / step_s if step_s else 1.0
    return f, (f"activation offloading x{f:.2f} ({traffic / 1e9:.1f} GB over PCIe per micro-batch at {PCIE_GBS:g} GB/s: "
               f"{transfer_s:.2f} s vs {compute_s:.2f} s compute)")


# --------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------


def _check_inputs(dataset_tokens, price_per_gpu_hour) -> None:
    if dataset_tokens is not None and (isinstance(dataset_tokens, bool) or not isinstance(dataset_tokens, (int, float))
                                       or not dataset_tokens > 0):
        raise TunepilotError(f"dataset_tokens: must be a positive number of training tokens per epoch, got {dataset_tokens!r}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise TunepilotError(f"price_per_gpu_hour: must be >= 0, got {price_per_gpu_hour!r}")


def _hours(tps: float, setup: TrainingSetup, dataset_tokens, price_per_gpu_hour, notes: list[str]):
    time_epoch = total_hours = gpu_hours = cost = None
    if dataset_tokens is not None:
        time_epoch = dataset_tokens / tps / 3600.0
        total_hours = time_epoch * setup.num_train_epochs
        gpu_hours = total_hours * setup.num_gpus
        if price_per_gpu_hour is not None:
            cost = price_per_gpu_hour * gpu_hours
        if not setup.packing:
            notes.append("time assumes dataset_tokens are the tokens actually computed; without packing, padding to the "
                         "longest sequence in a batch adds compute")
    else:
        notes.append("give dataset_tokens for time and cost")
    return time_epoch, total_hours, gpu_hours, cost


def estimate_throughput(
    model: ModelSpec,
    setup: TrainingSetup,
    hardware: HardwareSpec,
    *,
    dataset_tokens: int | None = None,
    price_per_gpu_hour: float | None = None,
    calibrate: bool = True,
    step=None,
) -> ThroughputEstimate:
    """Training tokens/s across all GPUs, step seconds and their breakdown, and (given dataset tokens and a price) hours and cost.

    With `step` (a simulated StepMemory carrying its op trace) the time is the op-roofline model of
    that step (tools.memory.timing); without one, the same roofline over the analytic tier's op records
    written down from the model's shapes (tools.memory.timing_analytic); the flat factors
    (`flat_estimate_throughput`) only where those cannot be written (stated in the notes).
    With calibrate=True, measured trial runs for this GPU and method predicted by the same time model
    ($TUNEPILOT_HOME/calibration.jsonl) scale the result, and the estimate says so.
    """
    _check_inputs(dataset_tokens, price_per_gpu_hour)
    if setup.objective != "sft":
        return _objective_throughput(model, setup, hardware, dataset_tokens, price_per_gpu_hour, calibrate)
    from tools.memory.timing import time_analytic, time_from_step

    if step is not None and getattr(step, "op_trace", None) is not None:
        st = time_from_step(step, setup, hardware)
        tier = "simulated op trace"
    else:
        try:
            st = time_analytic(model, setup, hardware)
        except (KeyError, ValueError, ZeroDivisionError, AttributeError) as e:  # the stated fallback
            thr = flat_estimate_throughput(model, setup, hardware, dataset_tokens=dataset_tokens,
                                           price_per_gpu_hour=price_per_gpu_hour, calibrate=calibrate)
            thr.notes.insert(0, f"analytic op records unavailable ({e.__class__.__name__}: {e}): flat-factor fallback")
            return thr
        tier = "analytic op records"
    notes = list(st.notes)
    tps = st.tokens_per_second
    step_s = st.step_seconds
    breakdown = st.breakdown()
    calibrated = False
    if calibrate:
        cal = _calibration_ratio(hardware, setup.method, OP_ROOFLINE)
        if cal:
            ratio, count, path = cal
            tps *= ratio
            step_s /= ratio
            breakdown = {k: {kk: round(vv / ratio, 6) for kk, vv in v.items()} for k, v in breakdown.items()}
            calibrated = True
            notes.append(f"calibrated x{ratio:.2f}: median measured/predicted tokens/s of {count} trial run(s) on "
                         f"{hardware.gpu.name} with {setup.method} ({path})")
    if setup.num_gpus > hardware.num_gpus:
        notes.append(f"setup uses {setup.num_gpus} GPUs but the hardware has {hardware.num_gpus}; estimated for {setup.num_gpus}")
    fpt = st.flops_per_step * setup.num_gpus / max(st.tokens_per_step, 1)
    peak = _peak_tflops(setup, hardware, notes)[0] * 1e12
    mfu = fpt * tps / (setup.num_gpus * peak) if peak else 0.0
    notes.append(f"op-roofline ({tier}): {step_s:.3f} s per optimizer step of {st.tokens_per_step:,} tokens "
                 f"({setup.gradient_accumulation_steps} micro-batch(es) x {setup.per_device_train_batch_size} x "
                 f"{setup.max_length} x {setup.num_gpus} GPU(s)); {fpt / 1e9:.1f} GFLOP per token as traced (incl. recompute), "
                 f"{mfu:.0%} of the dense peak")
    time_epoch, total_hours, gpu_hours, cost = _hours(tps, setup, dataset_tokens, price_per_gpu_hour, notes)
    return ThroughputEstimate(
        tokens_per_second=tps, flops_per_token=fpt, mfu=mfu, time_per_epoch_hours=time_epoch, total_hours=total_hours,
        gpu_hours=gpu_hours, cost=cost, notes=notes, step_seconds=step_s, time_breakdown=breakdown,
        time_model=OP_ROOFLINE, calibrated=calibrated,
    )


def _objective_throughput(model: ModelSpec, setup: TrainingSetup, hardware: HardwareSpec, dataset_tokens, price_per_gpu_hour,
                          calibrate: bool) -> ThroughputEstimate:
    """A preference / RL step (issue 15): the op-roofline time of the same trained rows as an SFT step (DPO / reward:
    chosen + rejected rows), times the objective's stated factor (`_objective_time_factor`: reference forwards,
    KL rows, GRPO's generation at the decode-rate model and its scoring forwards). Tokens are trained tokens."""
    rows = setup.per_device_train_batch_size * (2 if setup.objective in ("dpo", "reward") else 1)
    sft = setup.model_copy(update={"objective": "sft", "per_device_train_batch_size": rows})
    base = estimate_throughput(model, sft, hardware, calibrate=calibrate)
    fpt = base.flops_per_token
    flops_per_s = base.tokens_per_second * fpt / max(1, setup.num_gpus)
    factor, more = _objective_time_factor(model, setup, hardware, fpt, flops_per_s)
    tps = base.tokens_per_second / factor
    notes = [f"{setup.objective}: the SFT step of the same {rows} row(s) per micro-batch, x{factor:.2f}"] + more + list(base.notes)
    time_epoch, total_hours, gpu_hours, cost = _hours(tps, setup, dataset_tokens, price_per_gpu_hour, notes)
    step_s = None if base.step_seconds is None else base.step_seconds * factor
    breakdown = {k: dict(v) for k, v in (base.time_breakdown or {}).items()}
    if step_s is not None and base.step_seconds is not None and "by_phase" in breakdown:
        # reference forwards / generation / scoring, as one phase of the step
        breakdown["by_phase"]["generation" if setup.objective == "grpo" else "reference"] = round(step_s - base.step_seconds, 6)
    return base.model_copy(update={
        "tokens_per_second": tps, "time_per_epoch_hours": time_epoch, "total_hours": total_hours, "gpu_hours": gpu_hours,
        "cost": cost, "notes": notes, "step_seconds": step_s, "time_breakdown": breakdown, "mfu": base.mfu / factor,
    })


def flat_estimate_throughput(
    model: ModelSpec,
    setup: TrainingSetup,
    hardware: HardwareSpec,
    *,
    dataset_tokens: int | None = None,
    price_per_gpu_hour: float | None = None,
    calibrate: bool = True,
) -> ThroughputEstimate:
    """The flat-factor model (the analytic fallback): FLOPs/token over a product of stated utilisation factors.

    Training tokens/s across all GPUs, FLOPs/token, assumed utilisation, and (given dataset tokens and a price) hours and cost.

    Uses setup.num_gpus GPUs of hardware.gpu; time covers dataset_tokens x setup.num_train_epochs.
    With calibrate=True, measured trial runs for this GPU and method in $TUNEPILOT_HOME/calibration.jsonl
    scale the utilisation (pass calibrate=False to get the raw model, e.g. to record a prediction).
    """
    if dataset_tokens is not None and (isinstance(dataset_tokens, bool) or not isinstance(dataset_tokens, (int, float))
                                       or not dataset_tokens > 0):
        raise TunepilotError(f"dataset_tokens: must be a positive number of training tokens per epoch, got {dataset_tokens!r}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise TunepilotError(f"price_per_gpu_hour: must be >= 0, got {price_per_gpu_hour!r}")

    fpt, notes = _flops_breakdown(model, setup)
    peak, dtype = _peak_tflops(setup, hardware, notes)
    u, _scale, factors = _utilisation(model, setup, hardware)
    notes.append(f"peak {peak:g} dense {dtype} TFLOPs per {hardware.gpu.name} ({hardware.gpu.source or 'catalog'})")

    calibrated = False
    if calibrate:
        cal = _calibration_ratio(hardware, setup.method, FLAT_FACTORS)
        if cal:
            calibrated = True
            ratio, count, path = cal
            u *= ratio
            factors += f"; calibrated x{ratio:.2f} (median measured/predicted of {count} trial run(s) on this GPU with {setup.method}, {path})"
    if u > MAX_UTILISATION:
        u = MAX_UTILISATION
        factors += f"; capped at {MAX_UTILISATION}"
    if setup.offload == "all":
        f, desc = _param_offload_factor(model, setup, fpt, peak * u)
        u *= f
        factors += f"; {desc}"
    if setup.activation_offloading:
        f, desc = _activation_offload_factor(model, setup, fpt, peak * u)
        u *= f
        factors += f"; {desc}"
    notes.append(f"utilisation {u:.3f} = {factors}")

    num_gpus = setup.num_gpus
    if num_gpus > hardware.num_gpus:
        notes.append(f"setup uses {num_gpus} GPUs but the hardware has {hardware.num_gpus}; estimated for {num_gpus}")
    tps = num_gpus * peak * 1e12 * u / fpt
    if setup.objective != "sft":
        slow, more = _objective_time_factor(model, setup, hardware, fpt, peak * 1e12 * u)
        tps /= slow
        notes += more

    time_epoch = total_hours = gpu_hours = cost = None
    if dataset_tokens is not None:
        time_epoch = dataset_tokens / tps / 3600.0
        total_hours = time_epoch * setup.num_train_epochs
        gpu_hours = total_hours * num_gpus
        if price_per_gpu_hour is not None:
            cost = price_per_gpu_hour * gpu_hours
        if not setup.packing:
            notes.append("time assumes dataset_tokens are the tokens actually computed; without packing, padding to the "
                         "longest sequence in a batch adds compute")
    else:
        notes.append("give dataset_tokens for time and cost")
    notes.append("estimate from FLOPs and stated utilisation factors; a trial run measures the real rate and calibrates later estimates")
    return ThroughputEstimate(
        tokens_per_second=tps,
        flops_per_token=fpt,
        mfu=u,
        time_per_epoch_hours=time_epoch,
        total_hours=total_hours,
        gpu_hours=gpu_hours,
        cost=cost,
        notes=notes,
        step_seconds=setup.gradient_accumulation_steps * setup.per_device_train_batch_size * setup.max_length * num_gpus / tps,
        time_model=FLAT_FACTORS,
        calibrated=calibrated,
    )
