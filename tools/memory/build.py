"""The real transformers model, built as the generated script will build it, on meta then on fake tensors.

`build_model(model, setup, depth)` makes the model class transformers would load (causal LM, seq2seq
or sequence classification) from the spec's config.json with `depth` blocks (`depth_overrides`: every
depth key the config uses, and the per-block `layer_types` cut to that depth) on the `meta` device,
with the attention implementation the setup asks for (flash_attention_2 runs as SDPA's CPU flash
kernel; a class that refuses SDPA is built eager and runs SDPA's attention function). `wrap_peft`
applies the real peft adapter (imported without bitsandbytes: `import_peft`). `materialise` turns
every meta tensor into a tracked fake CPU storage; `retie` re-ties input and output embeddings
afterwards (to_empty unties them; they are counted once). `head_module` and `blocks` find the output
head and the transformer blocks.

torch, transformers and peft are imported inside the functions (no torch at import).
"""

from __future__ import annotations

import warnings
from typing import Any

from tools.memory import SimulationError
from tools.schemas import ModelSpec, TrainingSetup, TunepilotError

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class QuietTransformers:
    """transformers' advice about a config ("legacy hidden_act value", "loss_type ... unrecognized") is
    for people loading a model to run it; a dry run only counts bytes, so it is kept off the screen."""

    def __enter__(self):
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # pragma: no cover - transformers is a [train] dependency
            self._log = None
            return self
        self._log = hf_logging
        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        if self._log is not None:
            self._log.set_verbosity(self._level)
        return False


# --------------------------------------------------------------------------------------
# Config and depth
# --------------------------------------------------------------------------------------


def hf_config(model: ModelSpec, **overrides):
    """The transformers config of `model` (its config.json) with `overrides` (depth keys ...) applied."""
    from transformers import AutoConfig

    raw = {k: v for k, v in model.config.items() if k not in ("model_type", "transformers_version", "architectures", "auto_map")}
    raw.update(overrides)
    try:
        cfg = AutoConfig.for_model(model.model_type, **raw)
    except Exception as e:  # noqa: BLE001 - any failure here is an unknown/odd config
        raise SimulationError(f"model.config: transformers cannot build a '{model.model_type}' config ({e}); use --fast") from None
    for k, v in overrides.items():  # attribute_map aliases (n_layer ...) are set both ways
        try:
            setattr(cfg, k, v)
        except Exception:  # noqa: BLE001
            pass
    return cfg


def layer_types(model: ModelSpec) -> list | None:
    """Per-block attention types (sliding/full...) as transformers derives them for the full depth."""
    lt = model.config.get("layer_types")
    if isinstance(lt, list) and lt:
        return lt
    try:
        lt = getattr(hf_config(model), "layer_types", None)
    except TunepilotError:
        return None
    return list(lt) if isinstance(lt, (list, tuple)) and lt else None


def depth_overrides(model: ModelSpec, depth: int) -> dict[str, Any]:
    """The config keys that make `model` the same architecture with `depth` blocks."""
    cfg = model.config
    out: dict[str, Any] = {}
    for k in DEPTH_KEYS:
        if isinstance(cfg.get(k), int):
            out[k] = depth
    if "num_decoder_layers" in cfg and isinstance(cfg.get("num_decoder_layers"), int):
        out["num_decoder_layers"] = depth
    for k in ("encoder_layers", "decoder_layers"):
        if isinstance(cfg.get(k), int):
            out[k] = depth
    per_block = layer_types(model)
    if per_block:
        out["layer_types"] = per_block[:depth]
    if not out:
        out["num_hidden_layers"] = depth
    return out


# --------------------------------------------------------------------------------------
# Building the model exactly as the generated script will
# --------------------------------------------------------------------------------------


def build_model(model: ModelSpec, setup: TrainingSetup, depth: int):
    """The transformers model for `setup.task` with `depth` blocks, on meta, as from_pretrained makes it."""
    import torch
    import transformers

    cfg = hf_config(model, **depth_overrides(model, depth))
    cfg.use_cache = False
    if setup.task == "sequence-classification":
        cfg.num_labels = setup.num_labels
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
        auto = transformers.AutoModelForSequenceClassification
    elif setup.task == "seq2seq":
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModelForCausalLM
    attn = "sdpa" if setup.attn_implementation == "flash_attention_2" else setup.attn_implementation
    dtype = getattr(torch, TORCH_DTYPES[setup.dtype])
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m = auto.from_config(cfg, dtype=dtype, attn_implementation=attn)
        except ValueError as e:
            text = str(e)
            if setup.attn_implementation == "flash_attention_2" and "scaled_dot_product_attention" in text:
                # the model class refuses SDPA but supports flash-attn on GPU: build it eager, then run
                # transformers' SDPA attention function (the CPU flash kernel) in its place
                # (logit soft-capping is fused into the flash kernel: no memory of its own)
                if getattr(cfg, "attn_logit_softcapping", None) is not None:
                    cfg.attn_logit_softcapping = None
                m = auto.from_config(cfg, dtype=dtype, attn_implementation="eager")
                m.config._attn_implementation = "sdpa"
            elif "attn_implementation" in text or "scaled_dot_product_attention" in text:
                raise SimulationError(
                    f"attn_implementation: transformers does not support '{attn}' for {model.model_type}; "
                    "use attn_implementation='eager' (or flash_attention_2 on a GPU with flash-attn)") from None
            else:
                raise SimulationError(f"task: transformers cannot build {setup.task} for '{model.model_type}' ({text[:200]})") from None
        except (KeyError, TypeError, AttributeError, NotImplementedError) as e:
            raise SimulationError(f"model.config: transformers cannot build '{model.model_type}' from this config ({e}); use --fast") from None
        if setup.gradient_checkpointing:
            # transformers 5 name (the old gradient_checkpointing_enable warns FutureWarning on every call)
            kw = {"use_reentrant": bool(getattr(setup, "reentrant_checkpointing", False))}
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        if setup.legacy_rope_cache != "none":
            add_legacy_rope_caches(m, getattr(torch, TORCH_DTYPES[setup.legacy_rope_cache]))
    return m


def add_legacy_rope_caches(m, dtype) -> int:
    """The per-layer rotary caches of the transformers of early 2024, as buffers of each block's attention.

    transformers 4.38-4.40 (modeling_llama.py, modeling_mistral.py, modeling_mixtral.py of 4.40.2):
    every attention layer builds its own RotaryEmbedding, whose __init__ registers two non-persistent
    buffers of [max_position_embeddings, head_dim] (Llama `_cos_cached`/`_sin_cached`, Mistral and Mixtral
    `cos_cached`/`sin_cached`) in torch's default dtype, which from_pretrained sets to the load dtype.
    They stay on the GPU for the whole run and FSDP/ZeRO never shard buffers. Today's transformers keeps
    one rotary module per model and computes cos/sin per step (no table). Returns the bytes added.
    """
    import torch

    cfg = m.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    max_pos = getattr(cfg, "max_position_embeddings", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not max_pos or not heads:
        return 0
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    added = 0
    for blk in blocks(m):
        attn = getattr(blk, "self_attn", None)
        if attn is None:
            continue
        for name in ("legacy_rope_cos_cached", "legacy_rope_sin_cached"):
            attn.register_buffer(name, torch.empty(max_pos, head_dim, dtype=dtype, device="meta"), persistent=False)
            added += max_pos * head_dim * dtype.itemsize
    return added


def import_peft():
    """Import peft without bitsandbytes (~2 s: bnb compiles its default ops with torch.compile on import).

    peft.helpers imports bitsandbytes eagerly only to offer it; the simulator never lets peft dispatch
    to bnb layers (it wraps plain nn.Linear on meta, then swaps in tools.memory.quant stand-ins), and
    imports bitsandbytes itself when a setup is quantized or uses a bnb optimizer.
    """
    import sys

    if "peft" in sys.modules:
        return sys.modules["peft"]
    blocked = "bitsandbytes" not in sys.modules
    if blocked:
        sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError: peft.helpers sets bnb = None
    try:
        import peft
    finally:
        if blocked and sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
    return peft


class _NoPeftBnbDispatch:
    """While peft wraps the model: no bitsandbytes dispatchers (they would import bnb for nothing)."""

    def __enter__(self):
        from peft.tuners.lora import model as lora_model

        self._mod = lora_model
        self._saved = {n: getattr(lora_model, n) for n in ("is_bnb_available", "is_bnb_4bit_available") if hasattr(lora_model, n)}
        for n in self._saved:
            setattr(lora_model, n, lambda: False)
        return self

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(self._mod, n, f)
        return False


def peft_config(setup: TrainingSetup):
    """The peft config object the generated script builds for `setup.method`."""
    peft = import_peft()

    task_type = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "sequence-classification": "SEQ_CLS"}[setup.task]
    if setup.method in ("lora", "qlora", "dora"):
        return peft.LoraConfig(
            r=setup.r, lora_alpha=setup.lora_alpha, lora_dropout=setup.lora_dropout,
            target_modules=setup.target_modules, use_rslora=setup.use_rslora,
            use_dora=setup.use_dora or setup.method == "dora", task_type=task_type,
        )
    if setup.method == "ia3":
        return peft.IA3Config(task_type=task_type)
    if setup.method == "prompt-tuning":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=setup.num_virtual_tokens)
    if setup.method == "prefix-tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=setup.num_virtual_tokens)
    if setup.method == "p-tuning":
        return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=setup.num_virtual_tokens)
    raise SimulationError(f"method: unknown method {setup.method!r}")


def wrap_peft(m, setup: TrainingSetup):
    """`m` wrapped with the setup's real peft adapter (on meta), or `m` itself for full fine-tuning."""
    if setup.method == "full":
        return m
    import torch

    peft = import_peft()
    try:
        # on meta, peft's new adapter layers skip their (real, costly) random init
        with torch.device("meta"), warnings.catch_warnings(), _NoPeftBnbDispatch():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(m, peft_config(setup))
    except (ValueError, KeyError, TypeError) as e:
        raise SimulationError(f"target_modules/method: peft cannot apply {setup.method} to this model ({e})") from None
    return pm


def materialise(module, mode) -> None:
    """`module.to_empty(device="cpu")` under the fake mode, at a fraction of its cost.

    to_empty runs empty_like on every meta parameter, which FakeTensorMode treats as a foreign
    (non-fake) input to convert (~2 ms each); the result is the same: an uninitialised fake CPU
    tensor with the parameter's shape, strides and dtype, tracked as a new storage.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    cpu = torch.device("cpu")

    def fake_empty(t):
        with unset_fake_temporarily():
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        out = FakeTensor(mode, meta, cpu)
        mode.add(out)
        return out

    module._apply(fake_empty)


def retie(base) -> None:
    """Re-tie input and output embeddings after materialisation (transformers 5: `tie_weights()`)."""
    if not getattr(getattr(base, "config", None), "tie_word_embeddings", False):
        return
    try:
        base.tie_weights()
    except Exception:  # noqa: BLE001 - fall back to pointing the head at the embedding matrix
        pass
    try:
        out, inp = base.get_output_embeddings(), base.get_input_embeddings()
    except Exception:  # noqa: BLE001
        return
    if out is None or inp is None:
        return
    out = getattr(out, "base_layer", out)  # a LoRA-wrapped head keeps its frozen weight in base_layer
    if getattr(out, "weight", None) is not None and out.weight.shape == inp.weight.shape and out.weight is not inp.weight:
        out.weight = inp.weight


def head_module(base):
    """The output head (lm_head, or score/classifier for sequence classification)."""
    head = None
    try:
        head = base.get_output_embeddings()
    except Exception:  # noqa: BLE001
        head = None
    if head is None:
        for name in ("score", "classifier", "lm_head"):
            head = getattr(base, name, None)
            if head is not None:
                break
    return head


def blocks(base) -> list:
    """The transformer blocks (GradientCheckpointingLayer instances, or the largest ModuleList)."""
    from torch import nn

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        found = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        if found:
            return found
    except ImportError:
        pass
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []
