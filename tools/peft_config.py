"""LoRA / QLoRA configuration for one model and setup: peft `LoraConfig` and transformers
`BitsAndBytesConfig` kwargs (as JSON and as Python source), the module names they target
(read from the real model's module tree, never from a hard-coded family list), the exact
trainable-parameter count, and guidance on the knobs.

The module tree comes from building the real transformers class on the `meta` device
from a one- or two-layer copy of the model's config: no memory, a fraction of a second,
and every layer of a transformer stack has the same module names. Results are cached per
model config. torch/transformers/peft are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from tools.analytic import adapts_fused_experts  # the rule lives in the torch-free tier
from tools.schemas import ModelSpec, TrainingSetup, TunepilotError

__all__ = ["PeftConfigResult", "peft_config", "attention_modules", "linear_modules", "PeftConfigError"]

_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}
_TASK_TYPE = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "sequence-classification": "SEQ_CLS"}
_SEQ_CLS_HEADS = ("score", "classifier")


class PeftConfigError(TunepilotError):
    """The setup cannot be turned into a peft/bitsandbytes configuration."""


class PeftConfigResult(BaseModel):
    """What to pass to peft and bitsandbytes to train exactly this setup."""

    model_config = ConfigDict(extra="forbid")

    lora_config: Optional[dict[str, Any]] = Field(
        description="Keyword arguments of peft.LoraConfig (r, lora_alpha, lora_dropout, target_modules, bias, task_type, use_rslora, use_dora); None for full fine-tuning."
    )
    bnb_config: Optional[dict[str, Any]] = Field(
        description="Keyword arguments of transformers.BitsAndBytesConfig (load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, bnb_4bit_quant_storage); None when the base model is not quantized."
    )
    python: str = Field(description="Python source that constructs both configs; paste it into a training script.")
    target_modules: list[str] = Field(
        description="Concrete module names that get adapters, resolved from the model's real module tree (suffixes matched by peft); empty for full fine-tuning."
    )
    trainable_parameters: int = Field(description="Exact number of parameters that receive gradients with this configuration.")
    total_parameters: int = Field(description="All parameters of the model (base + adapters).")
    guidance: list[str] = Field(default_factory=list, description="Notes on the chosen knobs: rank alignment, alpha, DoRA/QLoRA costs, sharding requirements.")


# --------------------------------------------------------------------------------------
# The module tree
# --------------------------------------------------------------------------------------


def supported_lora_dropout(model: ModelSpec, setup: TrainingSetup) -> tuple[TrainingSetup, str | None]:
    """The setup with lora_dropout=0 where peft refuses dropout (adapters on fused MoE experts), and why."""
    if setup.lora_dropout > 0 and adapts_fused_experts(model, setup):
        return setup.model_copy(update={"lora_dropout": 0.0}), (
            f"lora_dropout {setup.lora_dropout} will be refused by peft for this MoE model: LoRA on its fused expert "
            "weights ('all-linear' selects them in transformers 5) goes through lora.ParamWrapper, which takes no "
            "dropout; using lora_dropout 0")
    return setup, None


@lru_cache(maxsize=128)
def attention_support(model_type: str) -> tuple[bool, bool]:
    """(sdpa, flash_attention_2) supported by transformers' causal-LM class for this model type.

    transformers raises at load time for an attn_implementation its class does not support (Gemma-2:
    no sdpa, soft-capped logits; BLOOM: neither, ALiBi). Unknown types answer (True, True)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # no transformers here: nothing to check against
        return True, True
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    if cls is None:
        return True, True
    return bool(getattr(cls, "_supports_sdpa", True)), bool(getattr(cls, "_supports_flash_attn", True))


def supported_attention(model: ModelSpec, setup: TrainingSetup) -> tuple[TrainingSetup, str | None]:
    """The setup with an attn_implementation transformers accepts for this model (eager otherwise), and why."""
    attn = setup.attn_implementation
    if attn not in ("sdpa", "flash_attention_2") or setup.task != "causal-lm":
        return setup, None
    sdpa, flash = attention_support(model.model_type)
    if (attn == "sdpa" and sdpa) or (attn == "flash_attention_2" and flash):
        return setup, None
    alt = "flash_attention_2 on a GPU with flash-attn, or eager" if attn == "sdpa" and flash else "eager"
    return (setup.model_copy(update={"attn_implementation": "eager"}),
            f"attn_implementation eager: transformers has no {attn} attention for {model.model_type} "
            f"(it would refuse to load the model); use {alt}")


def loadable_setup(model: ModelSpec, setup: TrainingSetup, *, attention: bool = True) -> tuple[TrainingSetup, list[str]]:
    """The setup with what peft / transformers would refuse at load time replaced, and a note per change.

    attention=False leaves attn_implementation unchecked (asking transformers imports torch)."""
    notes: list[str] = []
    for fix in (supported_lora_dropout, supported_attention) if attention else (supported_lora_dropout,):
        setup, note = fix(model, setup)
        if note:
            notes.append(note)
    return setup, notes


def _config_key(model: ModelSpec) -> str:
    blob = json.dumps(model.config, sort_keys=True, default=str)
    return model.model_id + "#" + hashlib.sha1(blob.encode()).hexdigest()


_SPECS: dict[str, ModelSpec] = {}


def _remember(model: ModelSpec) -> str:
    key = _config_key(model)
    _SPECS.setdefault(key, model)
    return key


def _shallow_config(model: ModelSpec, depth: int, task: str, num_labels: int):
    """A transformers config of `model` cut to `depth` transformer blocks."""
    from tools.models import hf_config

    try:
        cfg = hf_config(model, num_hidden_layers=depth)
    except TunepilotError:
        raise
    except Exception as e:  # noqa: BLE001 - an unknown architecture is the user's input
        raise PeftConfigError(
            f"model {model.model_id!r}: transformers cannot build model_type {model.model_type!r} ({e}); "
            "upgrade transformers or give a model whose architecture it knows"
        ) from None
    for attr in ("num_hidden_layers", "num_layers", "n_layer", "num_decoder_layers"):
        if isinstance(getattr(cfg, attr, None), int) and getattr(cfg, attr) != depth:
            try:
                setattr(cfg, attr, depth)
            except Exception:  # noqa: BLE001 - read-only alias on some configs
                pass
    if task == "sequence-classification":
        cfg.num_labels = num_labels
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
    return cfg


def _build_meta(model: ModelSpec, depth: int, task: str = "causal-lm", num_labels: int = 2):
    import torch
    import transformers

    cfg = _shallow_config(model, depth, task, num_labels)
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[task]
    try:
        with torch.device("meta"):
            return auto.from_config(cfg)
    except ValueError as e:
        raise PeftConfigError(f"model {model.model_id!r}: transformers has no {task} class for {model.model_type!r} ({e})") from None


def _head_names(net) -> set[str]:
    names = set()
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    for name, module in net.named_modules():
        if head is not None and module is head:
            names.add(name)
    for attr in _SEQ_CLS_HEADS:
        mod = getattr(net, attr, None)
        if mod is not None:
            for name, module in net.named_modules():
                if module is mod:
                    names.add(name)
    return names


@lru_cache(maxsize=64)
def _tree(key: str, task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all linear suffix names, attention-only target names) of the cached model's tree."""
    import torch
    from transformers.pytorch_utils import Conv1D

    net = _build_meta(_SPECS[key], 1, task)
    heads = _head_names(net)
    leaves: list[tuple[str, bool]] = []  # (qualified name, inside attention)
    modules = dict(net.named_modules())
    for name, module in net.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or name in heads:
            continue
        parts = name.split(".")
        in_attn = any(
            "attn" in type(modules[".".join(parts[:i])]).__name__.lower()
            or "attention" in type(modules[".".join(parts[:i])]).__name__.lower()
            for i in range(1, len(parts))
        )
        leaves.append((name, in_attn))
    if not leaves:
        raise PeftConfigError(f"model {_SPECS[key].model_id!r}: no linear layers found to put LoRA adapters on")

    linear: list[str] = []
    for name, _ in leaves:
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in linear:
            linear.append(suffix)

    others = [n for n, a in leaves if not a]
    attention: list[str] = []
    for name, in_attn in leaves:
        if not in_attn:
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                break
        if suffix not in attention:
            attention.append(suffix)
    return tuple(linear), tuple(attention)


def linear_modules(model: ModelSpec, task: str = "causal-lm") -> list[str]:
    """Names of every linear layer of the model except the output head (what peft's 'all-linear' targets)."""
    return list(_tree(_remember(model), task)[0])


def attention_modules(model: ModelSpec, task: str = "causal-lm") -> list[str]:
    """Names of the linear layers inside the attention blocks (e.g. q_proj,k_proj,v_proj,o_proj), as peft target_modules."""
    names = list(_tree(_remember(model), task)[1])
    if not names:
        raise PeftConfigError(f"model {model.model_id!r}: no linear layers inside an attention module; use target_modules='all-linear'")
    return names


# --------------------------------------------------------------------------------------
# Trainable parameters
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _lora_trainable(key: str, task: str, num_labels: int, r: int, targets: tuple[str, ...], use_dora: bool) -> tuple[int, int]:
    """(trainable, total added by adapters) for the full depth, from peft on 1- and 2-layer meta models."""
    import warnings

    import peft

    spec = _SPECS[key]
    counts = []
    for depth in (1, 2):
        net = _build_meta(spec, depth, task, num_labels)
        base = sum(p.numel() for p in net.parameters())
        tm = "all-linear" if targets == ("all-linear",) else list(targets)
        cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=tm, use_dora=use_dora, task_type=_TASK_TYPE[task])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(net, cfg)
        trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pm.parameters())
        counts.append((trainable, total - base))
    (t1, a1), (t2, a2) = counts
    layers = spec.num_hidden_layers
    return t1 + (t2 - t1) * (layers - 1), a1 + (a2 - a1) * (layers - 1)


# --------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------


def _resolve_targets(model: ModelSpec, setup: TrainingSetup) -> list[str]:
    if setup.target_modules == "all-linear":
        return linear_modules(model, setup.task)
    linear, attention = _tree(_remember(model), setup.task)
    known = set(linear) | set(attention)
    names = list(setup.target_modules)
    unknown = [n for n in names if n not in known and not any(k.endswith("." + n) or n.endswith("." + k) for k in known)]
    if unknown:
        raise PeftConfigError(
            f"target_modules: {', '.join(unknown)} not found in {model.model_id}; its linear layers are {', '.join(sorted(known))} (or use 'all-linear')"
        )
    return names


def _kwargs_source(name: str, cls: str, kwargs: dict[str, Any], comments: dict[str, str]) -> list[str]:
    lines = [f"{name} = {cls}("]
    for k, v in kwargs.items():
        if k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage") and isinstance(v, str):
            text = f"torch.{v}"
        else:
            text = repr(v)
        comment = comments.get(k)
        lines.append(f"    {k}={text},{'  # ' + comment if comment else ''}")
    lines.append(")")
    return lines


def peft_config(model: ModelSpec, setup: TrainingSetup) -> PeftConfigResult:
    """LoRA/QLoRA configuration for this model and setup: peft LoraConfig and BitsAndBytesConfig kwargs, Python source, the module names targeted (from the real module tree), exact trainable parameters and guidance on r, alpha, DoRA and QLoRA."""
    if setup.method not in ("full", "lora", "qlora", "dora"):
        raise PeftConfigError(f"method: {setup.method!r} has no LoRA configuration; use full, lora, qlora or dora")
    if setup.task not in _TASK_TYPE:
        raise PeftConfigError(f"task: {setup.task!r} is not supported; use causal-lm, seq2seq or sequence-classification")
    guidance: list[str] = []
    bnb: Optional[dict[str, Any]] = None
    bnb_comments: dict[str, str] = {}
    if setup.load_in_4bit:
        compute = _TORCH_DTYPE[setup.bnb_4bit_compute_dtype]
        bnb = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": setup.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": setup.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": _TORCH_DTYPE[setup.bnb_4bit_quant_storage],
        }
        bnb_comments = {
            "load_in_4bit": "base weights stored in 4 bits (QLoRA)",
            "bnb_4bit_quant_type": "nf4 = normal-float 4-bit (QLoRA paper); fp4 is plain 4-bit float",
            "bnb_4bit_use_double_quant": "quantize the absmax constants too: ~0.37 bits/param saved",
            "bnb_4bit_compute_dtype": "weights are de-quantized to this dtype for each matmul",
            "bnb_4bit_quant_storage": "dtype the packed weights are stored in (match compute dtype for FSDP/ZeRO-3)",
        }
        sharded = setup.fsdp != "none" or setup.zero_stage == 3
        if sharded and setup.bnb_4bit_quant_storage == "uint8":
            guidance.append(
                f"bnb_4bit_quant_storage: FSDP / ZeRO-3 can only shard 4-bit weights stored as a float dtype; set it to {setup.bnb_4bit_compute_dtype} (same as the compute dtype)"
            )
        if setup.bnb_4bit_quant_type == "fp4":
            guidance.append("bnb_4bit_quant_type: nf4 matches normally distributed weights better than fp4 at the same memory (QLoRA paper); prefer nf4")
        if not setup.bnb_4bit_use_double_quant:
            guidance.append("bnb_4bit_use_double_quant: double quantization saves about 0.37 bits per parameter (~3 GB on a 65B model) at negligible cost")
        guidance.append("QLoRA trades speed for memory: 4-bit de-quantisation in every matmul makes a step roughly 30% slower than LoRA on bf16 weights")
    elif setup.load_in_8bit:
        bnb = {"load_in_8bit": True}
        bnb_comments = {"load_in_8bit": "LLM.int8 base weights"}

    if setup.method == "full":
        lora = None
        targets: list[str] = []
        trainable = model.num_parameters
        total = model.num_parameters
        guidance.append(f"full fine-tuning: all {model.num_parameters:,} parameters are trained; no peft adapter, save the whole model")
    else:
        experts = adapts_fused_experts(model, setup)
        # MoE + all-linear: peft's own resolution also wraps the fused experts (no module name reaches
        # them), so the config keeps 'all-linear', exactly as the generated script passes it
        targets = "all-linear" if experts and setup.target_modules == "all-linear" else _resolve_targets(model, setup)
        use_dora = setup.use_dora or setup.method == "dora"
        setup, dropout_note = supported_lora_dropout(model, setup)
        if dropout_note:
            guidance.append(dropout_note)
        lora = {
            "r": setup.r,
            "lora_alpha": setup.lora_alpha,
            "lora_dropout": setup.lora_dropout,
            "target_modules": targets,
            "bias": "none",
            "task_type": _TASK_TYPE[setup.task],
            "use_rslora": setup.use_rslora,
            "use_dora": use_dora,
        }
        key = _remember(model)
        trainable, added = _lora_trainable(key, setup.task, setup.num_labels, setup.r,
                                           (targets,) if isinstance(targets, str) else tuple(targets), use_dora)
        total = model.num_parameters + added
        guidance.extend(_lora_guidance(setup, use_dora, trainable, total))
        if experts:
            guidance.append(
                "MoE model: adapters on the fused experts (peft's ParamWrapper) add B@A to every expert weight in "
                "forward and keep that delta for backward: keep gradient checkpointing on, or target the attention "
                "and router modules only to leave the experts frozen")
        elif model.is_moe:
            guidance.append("MoE model: the fused experts get no adapters from these target_modules ('all-linear' would wrap them too)")

    if setup.fp16 and setup.load_in_4bit and setup.bnb_4bit_compute_dtype != "fp16":
        guidance.append("bnb_4bit_compute_dtype: with fp16 mixed precision (GPU without bf16) the 4-bit compute dtype should be fp16")

    src: list[str] = []
    if bnb and setup.load_in_4bit:
        src.append("import torch")
    imports = []
    if lora is not None:
        imports.append("from peft import LoraConfig")
    if bnb is not None:
        imports.append("from transformers import BitsAndBytesConfig")
    src.extend(imports)
    if bnb is not None:
        src.append("")
        src.extend(_kwargs_source("bnb_config", "BitsAndBytesConfig", bnb, bnb_comments))
    if lora is not None:
        src.append("")
        src.extend(
            _kwargs_source(
                "lora_config",
                "LoraConfig",
                lora,
                {
                    "r": "adapter rank",
                    "lora_alpha": "scaling numerator: alpha/r" + (" ... alpha/sqrt(r) with rsLoRA" if setup.use_rslora else ""),
                    "lora_dropout": "dropout on the adapter input",
                    "target_modules": "read from the model's module tree",
                    "bias": "train no biases",
                },
            )
        )
    if not src:
        src.append("# full fine-tuning of unquantized weights: no peft or bitsandbytes configuration needed")
    python = "\n".join(src) + "\n"
    compile(python, "<peft_config>", "exec")
    return PeftConfigResult(
        lora_config=lora,
        bnb_config=bnb,
        python=python,
        target_modules=targets if isinstance(targets, list) else [*linear_modules(model, setup.task), "experts"],
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        guidance=guidance,
    )


def _lora_guidance(setup: TrainingSetup, use_dora: bool, trainable: int, total: int) -> list[str]:
    g: list[str] = []
    r, alpha = setup.r, setup.lora_alpha
    pow2 = r & (r - 1) == 0
    if pow2 or r % 8 == 0:
        g.append(f"r={r}: {'a power of two' if pow2 else 'a multiple of 8'}, aligned with tensor-core tiles")
    else:
        up = 1 << (r - 1).bit_length()
        g.append(f"r={r} is neither a power of two nor a multiple of 8: adapter matmuls pad to tensor-core tiles; use r={up} or {max(8, (r // 8) * 8)}")
    if setup.use_rslora:
        g.append(f"use_rslora: scaling is lora_alpha/sqrt(r) = {alpha / math.sqrt(r):.2f}, stable across ranks")
    else:
        ratio = alpha / r
        note = "common choices are alpha = r or 2r" if ratio not in (1.0, 2.0) else "a common choice"
        g.append(f"lora_alpha={alpha}: scaling alpha/r = {ratio:g} ({note}); when raising r keep alpha/r or switch on use_rslora")
    if use_dora:
        g.append("DoRA: an extra magnitude vector per adapted layer and a weight-norm every step: more memory and noticeably slower steps than LoRA (merge it for inference)")
    g.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if isinstance(setup.target_modules, list):
        g.append("attention-only targets train fewer parameters; the QLoRA paper found adapters on all linear layers needed to match full fine-tuning")
    return g
