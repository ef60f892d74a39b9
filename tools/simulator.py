"""The dry-run simulator: the memory of one real training step, counted on fake tensors.

`simulate(model, setup)` builds the real Hugging Face model from its config.json on the `meta`
device, wraps it with the real peft adapter the generated script will use, materialises it
under PyTorch's `FakeTensorMode` (shapes and dtypes, no memory) and runs two real training
steps: forward on input_ids [per_device_train_batch_size, max_length] with labels (HF's loss
path: logits upcast to fp32, cross-entropy), backward, gradient clipping, optimizer.step(),
zero_grad(set_to_none=True). A `TorchDispatchMode` sees the outputs of every op, records each
new storage with its size, and learns its death through a weakref finalizer, so it knows the
live total after every op. Step 1 only creates the optimizer state (zero gradients + one
optimizer.step(), which allocates exactly what a first real step leaves behind); the peak of the
SECOND, complete step (steady state) is reported. Peaks are kept per segment of the step (forward,
loss backward, block backward, backward after the first block i.e. the embedding backward, optimizer)
because the segment that holds the peak can change with depth, and each segment's peak must be the
same kind of moment at depth k and k+period for the linear extrapolation to hold. Tied input/output
embeddings are re-tied after materialisation (to_empty unties them) and counted once. peft is
imported without bitsandbytes and bitsandbytes without compiling its CPU kernels (import time only).
The live storages at the peak moment are split into categories:

- weights / adapters: storages of frozen parameters and buffers (incl. 4-bit packed weights and
  their absmax/constants) / of trainable peft parameters (in full fine-tuning, trainable
  parameters are "weights");
- gradients: storages that are some parameter's `.grad` at the end of the step;
- optimizer_state: tensors in `optimizer.state`;
- activations: anything else produced during the forward (saved for backward) or during the
  gradient-checkpointing recompute inside backward;
- logits_loss: what the output head and the loss produce in forward (logits, fp32 upcast,
  log-softmax) and the loss backward produces before the gradient reaches the logits;
- temporaries: everything else (backward and optimizer transients, e.g. foreach AdamW buffers).

Identity (params, grads, optimizer states) wins over the phase an allocation happened in.

CUDA behaviour rather than CPU's, where they differ: `adamw_torch` runs torch AdamW with
foreach=True (the CUDA default), `adamw_torch_fused` with fused=True; params are grouped as
HF Trainer does (decay / no-decay). Mixed precision runs under `torch.autocast("cpu", dtype)`
(the HF Trainer uses CUDA autocast; the two op lists differ in a few fp32 ops). CPU SDPA
dispatches to a flash kernel (no s^2 matrix), so `flash_attention_2` is simulated as `sdpa`;
dropout runs CUDA's fused kernel (bool mask) instead of CPU's composite (mask in the input dtype);
`eager` materialises the s^2 scores. QLoRA uses `tools._fake_bnb.Fake4bitLinear`, which calls
bitsandbytes' own `matmul_4bit` (transient dequantised weight in forward and backward); 8-bit
(LLM.int8) bases use `Fake8bitLinear` and `bnb.matmul`; trl's SFTTrainer casts the adapters of
a quantized model to bf16, and so does the simulator. bitsandbytes 8-bit/32-bit/
paged optimizers are the real ones (built outside fake mode, stepped inside); paged state is
counted as resident. MoE experts run transformers' default grouped_mm path, whose shapes do not
depend on the routing; an eager experts loop (data dependent) is replaced by one with a
perfectly balanced load. transformers keeps the [b,1,s,s] causal mask on fake tensors ("tracing")
where it skips it on real ones; the simulator restores the real-tensor decision (full-length rows,
one sequence per row, no padding: the trial run's worst case).

Depth is extrapolated: k and k+period blocks are simulated and every category is extended
linearly to the full depth (`extrapolate=False` simulates the full depth). Nothing here adds
CUDA context, allocator rounding or ZeRO/FSDP sharding: that is `tools.estimator`'s job.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

from tools.schemas import STEP_CATEGORIES, ModelSpec, StepMemory, TrainingSetup, TunepilotError


class SimulationError(TunepilotError):
    """A setup the simulator cannot run (unsupported combination or a model transformers cannot build)."""


# Fields of TrainingSetup that cannot change the memory of one simulated training step (the cache
# ignores them). Not here, on purpose: lora_dropout (0 -> peft's Identity, no mask and no dropped
# copy), weight_decay (foreach SGD/Adagrad/RMSprop add it out of place: a copy of every gradient),
# max_grad_norm (clipping temporaries), and every shape/dtype/kernel field. Sharding and offload
# (num_gpus, zero_stage, fsdp, offload) are applied to the one-replica step by tools.estimator.
# lora_alpha/use_rslora only change a scalar. packing is simulated (trl flattens the packed batch into
# one row; with sdpa/eager transformers then builds a block-diagonal [1,1,b*s,b*s] mask).
_IRRELEVANT = {
    "model_id", "learning_rate", "num_train_epochs", "warmup_steps", "lr_scheduler_type",
    "seed", "eval_steps", "num_gpus", "num_nodes", "zero_stage", "fsdp", "offload", "gpu", "dataset",
    "dataset_text_field", "use_chat_template", "streaming", "output_dir", "save_steps", "save_total_limit",
    "logging_steps", "merge_adapter", "lora_alpha", "use_rslora",
}
_CACHE: dict[str, StepMemory] = {}
_LOCK = threading.RLock()
_CACHE_MAX = 256

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_FP16_LOSS_SCALE = 65536.0  # torch.amp.GradScaler's initial scale
_BNB_OPTIMS = {
    # name: (bnb class name, optim_bits, is_paged)
    "adamw_bnb_8bit": ("AdamW", 8, False),
    "adamw_8bit": ("AdamW", 8, False),
    "paged_adamw_8bit": ("AdamW", 8, True),
    "paged_adamw_32bit": ("AdamW", 32, True),
    "lion_8bit": ("Lion", 8, False),
    "lion_32bit": ("Lion", 32, False),
    "paged_lion_8bit": ("Lion", 8, True),
    "paged_lion_32bit": ("Lion", 32, True),
}


def simulate(model: ModelSpec, setup: TrainingSetup, *, extrapolate: bool = True) -> StepMemory:
    """Exact raw memory of one training step of one model replica, by running the real step on fake tensors.

    Builds the real transformers model (and peft adapter, 4-bit stand-ins, optimizer) for `setup`,
    runs two training steps (and an eval step when setup.eval_strategy != 'no') under FakeTensorMode
    and returns the steady-state peak with its breakdown (weights, adapters, gradients,
    optimizer_state, activations, logits_loss, temporaries) in bytes. Depth is extrapolated from
    1-2 simulated blocks unless extrapolate=False. No sharding and no CUDA-only overheads.
    Raises SimulationError (a TunepilotError) for combinations it cannot simulate.
    """
    _check_supported(model, setup)
    key = _cache_key(model, setup, extrapolate)
    t0 = time.perf_counter()
    hit = _CACHE.get(key)
    if hit is not None:
        result = hit.model_copy(deep=True)
        result.seconds = round(time.perf_counter() - t0, 3)
        result.notes.append(f"served from the in-process cache (first simulation took {hit.seconds:.2f} s)")
        return result
    try:
        # the dry run patches a few library functions process-wide while it runs
        with _LOCK, _QuietTransformers():
            total = _num_layers(model)
            prefix, period = _layer_period(model)
            k1, k2 = prefix + period, prefix + 2 * period
            depths = [k1, k2] if extrapolate and k2 < total else [total]
            runs = _run_depths(model, setup, depths)
    except TunepilotError:
        raise
    except Exception as e:  # noqa: BLE001 - a model/library combination we cannot run: say so, the caller falls back
        raise SimulationError(
            f"model: the dry run of {model.model_id} ({model.model_type}, {setup.short()}) failed in "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; use --fast (analytic)"
        ) from e
    result = _combine(runs, depths, total)
    result.seconds = round(time.perf_counter() - t0, 3)
    if len(depths) == 2:
        result.notes.append(
            f"simulated {depths[0]} and {depths[1]} of {total} blocks and extrapolated every category linearly "
            f"(slope per block {result.per_layer_bytes / 2**20:.1f} MiB)"
        )
    else:
        result.notes.append(f"simulated all {total} blocks")
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = result.model_copy(deep=True)
    return result


# --------------------------------------------------------------------------------------
# Two depths side by side
# --------------------------------------------------------------------------------------

# The two dry runs of an extrapolated simulation are independent: where it is safe, the shallower
# one runs in a forked child while this process runs the deeper one, so a 70B estimate costs one
# run's time on a machine with two cores. "Safe": Linux, at least two usable cores, and no other
# Python thread in the process (forking a threaded process can leave the child stuck on a lock
# another thread held; the Slack bot and anything else threaded simply run the two in turn). A
# child that fails, or has not answered long after the parent's own run, is killed and its depth
# is simulated in-process, so the result never depends on the fork. TUNEPILOT_SIM_PARALLEL=0
# switches this off.
_PARALLEL = os.environ.get("TUNEPILOT_SIM_PARALLEL", "1") != "0"
_CHILD_MIN_WAIT = 10.0  # seconds the parent waits for the child at least (and 3x its own run)
_fork_broken = False


def _single_threaded() -> bool:
    return threading.active_count() == 1


def _fork_ok() -> bool:
    if not _PARALLEL or _fork_broken or not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return False
    if not _single_threaded():
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus >= 2


def _run_depths(model: ModelSpec, setup: TrainingSetup, depths: list[int]) -> list[_RunResult]:
    child = _fork_run(model, setup, depths[0]) if len(depths) == 2 and _fork_ok() else None
    if child is None:
        return [_run(model, setup, d) for d in depths]
    pid, fd = child
    t0 = time.perf_counter()
    try:
        deep = _run(model, setup, depths[1])
    except BaseException:
        _collect(pid, fd, deadline=0.0)
        raise
    shallow = _collect(pid, fd, deadline=max(_CHILD_MIN_WAIT, 3 * (time.perf_counter() - t0)))
    if shallow is None:
        shallow = _run(model, setup, depths[0])
    return [shallow, deep]


def _fork_run(model: ModelSpec, setup: TrainingSetup, depth: int) -> tuple[int, int] | None:
    """Start the dry run of `depth` in a forked child: (its pid, the pipe its result comes on), or None."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid:
        os.close(w)
        return pid, r
    try:  # the child: simulate, send the result back, leave without any clean-up
        os.close(r)
        try:
            import torch

            torch.set_num_threads(1)  # never enter the parent's OpenMP pool after a fork
            payload = pickle.dumps(("ok", _run(model, setup, depth)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which re-runs in-process
            payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
    finally:
        os._exit(0)


def _collect(pid: int, fd: int, deadline: float) -> _RunResult | None:
    """The child's result, or None (failed, or killed after `deadline` seconds without an answer)."""
    global _fork_broken
    import select
    import signal

    chunks: list[bytes] = []
    end = time.monotonic() + deadline
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                if deadline > 0:
                    _fork_broken = True  # a stuck child: do not fork again in this process
                return None
            data = os.read(fd, 1 << 20)
            if not data:
                break
            chunks.append(data)
    except OSError:
        return None
    finally:
        os.close(fd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    try:
        status, value = pickle.loads(b"".join(chunks))
    except Exception:  # noqa: BLE001 - a truncated or garbled answer: simulate in-process instead
        return None
    return value if status == "ok" else None


# --------------------------------------------------------------------------------------
# Validation and caching
# --------------------------------------------------------------------------------------


def _check_supported(model: ModelSpec, setup: TrainingSetup) -> None:
    if not model.config:
        raise SimulationError(
            f"model.config: {model.model_id} has no config.json dict; the simulator builds the model from it "
            "(look the model up with tools.models.lookup_model, or use the analytic tier with --fast)"
        )
    if setup.optim in ("adamw_torch_8bit", "adamw_torch_4bit"):
        raise SimulationError(f"optim: {setup.optim} (torchao) is not simulated yet; use adamw_bnb_8bit / paged_adamw_8bit or --fast")
    if setup.method in ("prompt-tuning", "prefix-tuning", "p-tuning") and setup.task != "causal-lm":
        raise SimulationError(f"method: {setup.method} is simulated for task causal-lm only")
    if setup.method == "prefix-tuning" and setup.gradient_checkpointing:
        raise SimulationError("gradient_checkpointing: peft's prefix-tuning does not work with gradient checkpointing; set gradient_checkpointing=false or use prompt-tuning/p-tuning")
    if (setup.load_in_4bit or setup.load_in_8bit) and setup.method not in ("qlora", "lora", "dora"):
        raise SimulationError(f"method: {setup.method} on a quantized (4/8-bit) base is not simulated; use qlora/lora/dora")


def _cache_key(model: ModelSpec, setup: TrainingSetup, extrapolate: bool) -> str:
    s = setup.model_dump(mode="json", exclude=_IRRELEVANT)
    s["gradient_accumulation_steps"] = min(setup.gradient_accumulation_steps, 2)
    s["lora_dropout"] = setup.lora_dropout > 0  # a dropped copy of the input exists or not; the rate is irrelevant
    s["weight_decay"] = setup.weight_decay > 0  # only whether the optimizer runs the decay term
    if setup.eval_strategy != "no":
        s["eval_strategy"] = "yes"
    else:
        s.pop("per_device_eval_batch_size")
        s.pop("prediction_loss_only")
    return json.dumps([model.model_type, model.config, s, extrapolate], sort_keys=True, default=str)


def clear_cache() -> None:
    """Forget cached simulations (tests, benchmarks)."""
    _CACHE.clear()


# --------------------------------------------------------------------------------------
# Depth: how many blocks, and which depths to simulate
# --------------------------------------------------------------------------------------

_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _num_layers(model: ModelSpec) -> int:
    cfg = model.config
    for k in _DEPTH_KEYS:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return model.num_hidden_layers


def _min_period(seq: list) -> int:
    for p in range(1, len(seq) + 1):
        if all(seq[i] == seq[i % p] for i in range(len(seq))):
            return p
    return len(seq)


class _QuietTransformers:
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


def _layer_types(model: ModelSpec) -> list | None:
    """Per-block attention types (sliding/full...) as transformers derives them for the full depth."""
    lt = model.config.get("layer_types")
    if isinstance(lt, list) and lt:
        return lt
    try:
        lt = getattr(_hf_config(model), "layer_types", None)
    except TunepilotError:
        return None
    return list(lt) if isinstance(lt, (list, tuple)) and lt else None


def _layer_period(model: ModelSpec) -> tuple[int, int]:
    """(dense prefix, period) of the block stack: simulate prefix+period and prefix+2*period blocks."""
    cfg = model.config
    prefix, period = 0, 1
    if isinstance(cfg.get("first_k_dense_replace"), int):
        prefix = cfg["first_k_dense_replace"]
    layer_types = _layer_types(model)
    if layer_types:
        period = _min_period(layer_types[prefix:] or layer_types)
    elif isinstance(cfg.get("sliding_window_pattern"), int) and cfg["sliding_window_pattern"] > 1:
        period = cfg["sliding_window_pattern"]
    step = cfg.get("decoder_sparse_step")
    if isinstance(step, int) and step > 1:
        period = period * step // math.gcd(period, step)
    mlp_only = cfg.get("mlp_only_layers")
    if isinstance(mlp_only, list) and mlp_only:
        # irregular dense layers: simulate everything (rare; usually an empty list)
        prefix = _num_layers(model)
    return prefix, period


def _depth_overrides(model: ModelSpec, depth: int) -> dict[str, Any]:
    cfg = model.config
    out: dict[str, Any] = {}
    for k in _DEPTH_KEYS:
        if isinstance(cfg.get(k), int):
            out[k] = depth
    if "num_decoder_layers" in cfg and isinstance(cfg.get("num_decoder_layers"), int):
        out["num_decoder_layers"] = depth
    for k in ("encoder_layers", "decoder_layers"):
        if isinstance(cfg.get(k), int):
            out[k] = depth
    layer_types = _layer_types(model)
    if layer_types:
        out["layer_types"] = layer_types[:depth]
    if not out:
        out["num_hidden_layers"] = depth
    return out


# --------------------------------------------------------------------------------------
# Building the model exactly as the generated script will
# --------------------------------------------------------------------------------------


def _hf_config(model: ModelSpec, **overrides):
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


def _build_model(model: ModelSpec, setup: TrainingSetup, depth: int):
    import torch
    import transformers

    cfg = _hf_config(model, **_depth_overrides(model, depth))
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
    dtype = getattr(torch, _TORCH_DTYPES[setup.dtype])
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
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def _import_peft():
    """Import peft without bitsandbytes (~2 s: bnb compiles its default ops with torch.compile on import).

    peft.helpers imports bitsandbytes eagerly only to offer it; the simulator never lets peft dispatch
    to bnb layers (it wraps plain nn.Linear on meta, then swaps in tools._fake_bnb stand-ins), and
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


def _peft_config(setup: TrainingSetup):
    peft = _import_peft()

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


def _wrap_peft(m, setup: TrainingSetup):
    if setup.method == "full":
        return m
    import torch

    peft = _import_peft()
    try:
        # on meta, peft's new adapter layers skip their (real, costly) random init
        with torch.device("meta"), warnings.catch_warnings(), _NoPeftBnbDispatch():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(m, _peft_config(setup))
    except (ValueError, KeyError, TypeError) as e:
        raise SimulationError(f"target_modules/method: peft cannot apply {setup.method} to this model ({e})") from None
    return pm


def _materialise(module, mode) -> None:
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


def _retie(base) -> None:
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


def _head_module(base):
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


# --------------------------------------------------------------------------------------
# Memory tracking
# --------------------------------------------------------------------------------------


_SEGMENT = {"forward-head": "forward", "setup": "setup"}
# backward-tail: after the gradient has left the first block (embedding backward, or nothing). Kept apart
# from the blocks' backward so that each segment's peak moment is the same kind of moment at every
# depth (a 1-block model otherwise peaks in the embedding backward, a 2-block one at the start of
# backward, and the linear extrapolation of that segment mixes the two).
_TRAIN_SEGMENTS = ("forward", "backward-loss", "backward", "backward-tail", "optimizer")
_PHASE_OF_SEGMENT = {"forward": "forward", "backward-loss": "backward", "backward": "backward", "backward-tail": "backward",
                     "optimizer": "optimizer"}


class _Rec:
    __slots__ = ("nbytes", "tag", "__weakref__")

    def __init__(self, nbytes: int, tag: str):
        self.nbytes = nbytes
        self.tag = tag


def _make_tracker(fake: bool = True):
    """The memory tracker: the FakeTensorMode of a dry run (fake=True), or a plain dispatch mode that
    counts the storages of a real step the same way (fake=False; the tests compare the two)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    prim_device = torch.ops.prim.device.default
    unsafe_view = torch.ops.aten._unsafe_view.default
    global _HASHABLE_TORCH
    _HASHABLE_TORCH = (torch.dtype, torch.device, torch.layout, torch.memory_format)
    fake_dispatch = FakeTensorMode.__torch_dispatch__
    try:  # ops FakeTensorMode.dispatch answers before its cache: never run those directly
        from torch._subclasses.fake_tensor import _DISPATCH_HANDLE_DIRECTLY, _DISPATCH_META_HANDLERS

        special = set(_DISPATCH_HANDLE_DIRECTLY) | set(_DISPATCH_META_HANDLERS)
        direct_ok = hasattr(FakeTensorMode, "_validate_cache_key") and hasattr(FakeTensorMode, "_dispatch_impl")
    except ImportError:  # another torch: keep FakeTensorMode's own path for new ops
        special, direct_ok = set(), False

    class _Tracking:
        """Counts every live storage an op produces; keeps, per segment of the step, the peak and what was alive then.

        Segments: forward (incl. head and loss), backward-loss (until the gradient reaches the
        logits), backward (the blocks), optimizer (clipping + step), eval. The step peak is the max.
        """

        def _init_tracking(self):
            self._nested = 0
            self.live: dict[int, _Rec] = {}
            self.current = 0
            self.seg_peak: dict[str, int] = {}
            self.seg_snap: dict[str, list[_Rec]] = {}
            self._stale: str | None = None
            self._phase = "setup"
            self.in_block = 0

        @property
        def phase(self) -> str:
            return self._phase

        @phase.setter
        def phase(self, value: str) -> None:
            self.finish()
            self._phase = value
            self._enter(_SEGMENT.get(value, value))

        def _enter(self, seg: str) -> None:
            if self.current > self.seg_peak.get(seg, -1):
                self.seg_peak[seg] = self.current
                self.take_snapshot(seg)

        @property
        def segment(self) -> str:
            return _SEGMENT.get(self._phase, self._phase)

        @property
        def peak(self) -> int:
            return max(self.seg_peak.values(), default=self.current)

        def tag(self) -> str:
            if self._phase == "backward" and self.in_block > 0:
                return "recompute"
            return self._phase

        def add(self, t) -> None:
            st = t.untyped_storage()
            key = id(st)
            if key in self.live:
                return
            rec = _Rec(st.nbytes(), self.tag())
            self.live[key] = rec
            self.current += rec.nbytes
            weakref.finalize(st, self._free, key, rec)
            seg = self.segment
            if self.current > self.seg_peak.get(seg, -1):
                self.seg_peak[seg] = self.current
                self._stale = seg

        def _free(self, key: int, rec: _Rec) -> None:
            if self._stale is not None:
                self.take_snapshot(self._stale)
            if self.live.get(key) is rec:
                del self.live[key]
                self.current -= rec.nbytes

        def take_snapshot(self, seg: str) -> None:
            self.seg_snap[seg] = list(self.live.values())
            self._stale = None

        def reset_peak(self) -> None:
            """Forget earlier peaks; the current segment starts from what is alive now."""
            self.finish()
            self.seg_peak.clear()
            self.seg_snap.clear()
            self._enter(self.segment)

        def finish(self) -> None:
            if self._stale is not None:
                self.take_snapshot(self._stale)

        def rec_of(self, t) -> _Rec | None:
            return self.live.get(id(t.untyped_storage()))

        def _track(self, out) -> None:
            if isinstance(out, torch.Tensor):
                self.add(out)
                return
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.add(t)

    class MemoryTracker(_Tracking, FakeTensorMode):
        """The fake-tensor mode itself, tracking. One mode rather than a TorchDispatchMode stacked on
        FakeTensorMode: every op (and the thousands of device queries autograd makes) crosses one
        Python layer instead of two. Only the outputs of top-level ops are tracked, not those of
        decompositions FakeTensorMode runs inside one (the same ops a stacked mode would see)."""

        def __init__(self):
            FakeTensorMode.__init__(self, allow_non_fake_inputs=True)
            self._init_tracking()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is prim_device:  # autograd asks thousands of times: answer as FakeTensorMode's handler does
                t = args[0] if len(args) == 1 else None
                if isinstance(t, FakeTensor) and not t.fake_mode.in_kernel_invocation:
                    return t.fake_device
                return fake_dispatch(self, func, types, args, kwargs or {})
            key = None
            if not self._nested and _FAST_PATH:
                key = _op_key(func, args, kwargs)
                if key is not None:
                    entry = _OP_CACHE.get(key)
                    if entry is not None:
                        out = _replay(self, entry, args)
                        self._track(out)
                        return out
            # an op not seen yet: when FakeTensorMode would cache it, run its kernel directly, without
            # building FakeTensorMode's cache key and entry (this cache replaces them)
            direct = False
            if key is not None and direct_ok and func not in special:
                try:
                    self._validate_cache_key(func, args, kwargs or {})
                    direct = True
                except Exception:  # noqa: BLE001 - _BypassDispatchCache: FakeTensorMode's full path
                    direct = False
            cacheable = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses
            self._nested += 1
            try:
                if direct:
                    out = self._dispatch_impl(func, types, args, kwargs or {})
                else:
                    out = fake_dispatch(self, func, types, args, kwargs or {})
            finally:
                self._nested -= 1
            if self._nested:
                return out
            if key is not None and (direct or func is unsafe_view or getattr(func, "namespace", None) == "bitsandbytes"
                                    or cacheable != FakeTensorMode.cache_hits + FakeTensorMode.cache_misses):
                entry = _record(out, args)
                if entry is not None:
                    if len(_OP_CACHE) >= _OP_CACHE_MAX:
                        _OP_CACHE.clear()
                    _OP_CACHE[key] = entry
            self._track(out)
            return out


    class RealMemoryTracker(_Tracking, TorchDispatchMode):
        def __init__(self):
            TorchDispatchMode.__init__(self)
            self._init_tracking()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is not prim_device:
                self._track(out)
            return out

    return MemoryTracker() if fake else RealMemoryTracker()


# The tracker's own op cache, in front of FakeTensorMode's. FakeTensorMode answers a repeated op
# (same op, same input shapes/strides/dtypes) from its cache, but builds that cache key and the
# output through ~0.4 ms of Python per op, and a 70B LoRA dry run dispatches ~2,500 such ops.
# Here an op that FakeTensorMode itself found cacheable (a hit or a cached miss; plus
# aten._unsafe_view, which it never caches, and bitsandbytes' ops, which it never caches as
# non-builtin ops: their outputs follow from their arguments' metadata) is remembered under a cheaper key: per tensor input
# (shape, stride, storage offset, dtype, requires_grad, device), other inputs by type and value.
# A replay makes the output on `meta` exactly as FakeTensorMode's cache does: a fresh storage of
# the same size, a view of the same input's storage, or the in-place input itself. Inputs with a
# known constant value, real (non-fake) tensors and unhashable arguments always take the full path.
# tests/test_simulator.py checks that both paths give identical results; TUNEPILOT_SIM_FASTPATH=0
# switches this off.
_FAST_PATH = os.environ.get("TUNEPILOT_SIM_FASTPATH", "1") != "0"
_OP_CACHE: dict[tuple, tuple] = {}
_OP_CACHE_MAX = 50_000
_SCALARS = (int, float, bool, str, type(None))
_HASHABLE_TORCH: tuple = ()  # torch.dtype, device, layout, memory_format (set on first use: torch is imported lazily)


class _NoKey(Exception):
    pass


def _arg_key(x):
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(x, FakeTensor):
        if x.constant is not None:
            raise _NoKey
        return (x.shape, x.stride(), x.storage_offset(), x.dtype, x.requires_grad, x.fake_device)
    if isinstance(x, _SCALARS):
        return (type(x), x)
    if isinstance(x, (list, tuple)):
        return (type(x), tuple(_arg_key(y) for y in x))
    if isinstance(x, _HASHABLE_TORCH):
        return x
    raise _NoKey


def _op_key(func, args, kwargs):
    try:
        k = (func, tuple(_arg_key(a) for a in args))
        if kwargs:
            k += tuple((n, _arg_key(v)) for n, v in sorted(kwargs.items()))
        return k
    except _NoKey:
        return None


def _record(out, args):
    """How to make `out` again from inputs of the same metadata, or None if this op is not replayable."""
    from torch._subclasses.fake_tensor import FakeTensor

    if out is None:
        return ("none", ())  # an op that only mutates values (foreach/in-place updates): nothing to make
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not outs or not all(isinstance(o, FakeTensor) for o in outs):
        return None
    tensor_args = [(i, a) for i, a in enumerate(args) if isinstance(a, FakeTensor)]
    infos = []
    for o in outs:
        if o.constant is not None:
            return None
        meta = (tuple(o.shape), o.stride(), o.storage_offset(), o.dtype, o.requires_grad, o.fake_device)
        st = o.untyped_storage()
        inplace = next((i for i, a in tensor_args if a is o), None)
        if inplace is not None:
            infos.append(("inplace", inplace))
            continue
        view = next((i for i, a in tensor_args if a.untyped_storage() is st), None)
        if view is not None:
            infos.append(("view", view, meta))
            continue
        if o.storage_offset() != 0 or st.nbytes() != _min_storage_bytes(o):
            return None  # a fresh output that is a window of a larger buffer: leave it to FakeTensorMode
        infos.append(("new", meta))
    seq_type = (list if isinstance(out, list) else tuple) if isinstance(out, (tuple, list)) else None
    return (seq_type, tuple(infos))


def _min_storage_bytes(t) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _replay(mode, entry, args):
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    seq_type, infos = entry
    if seq_type == "none":
        return None
    outs = []
    for info in infos:
        if info[0] == "inplace":
            outs.append(args[info[1]])
            continue
        shape, stride, offset, dtype, requires_grad, device = info[-1]
        empty = torch.empty_strided(shape, stride, dtype=dtype, device="meta", requires_grad=requires_grad)
        if info[0] == "view":
            empty.set_(args[info[1]].untyped_storage(), offset, shape, stride)
        outs.append(FakeTensor(mode, empty, device))
    return seq_type(outs) if seq_type is not None else outs[0]


# --------------------------------------------------------------------------------------
# One simulated run at one depth
# --------------------------------------------------------------------------------------


@dataclass
class _RunResult:
    segments: dict[str, dict[str, int]]  # segment of the step -> breakdown at that segment's peak
    num_parameters: int
    trainable_parameters: int
    weights_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    eval_peak_bytes: int | None
    largest_layer_param_bytes: int
    notes: list[str] = field(default_factory=list)


def _decay_groups(model, params: list, weight_decay: float = 0.0):
    """HF Trainer's two parameter groups: weight decay for everything but biases and norms."""
    import re

    from torch import nn

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    no_decay_ids = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.LayerNorm) or any(re.search(pat, full.lower()) for pat in patterns):
                no_decay_ids.add(id(p))
    decay = [p for p in params if id(p) not in no_decay_ids]
    no_decay = [p for p in params if id(p) in no_decay_ids]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _make_optimizer(model, setup: TrainingSetup, params: list):
    import torch

    groups = _decay_groups(model, params, setup.weight_decay)
    lr = setup.learning_rate
    name = setup.optim
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, foreach=True)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, foreach=True)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, foreach=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name in _BNB_OPTIMS:
        from tools._fake_bnb import import_bitsandbytes

        bnb = import_bitsandbytes()

        cls_name, bits, paged = _BNB_OPTIMS[name]
        cls = getattr(bnb.optim, cls_name)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), warnings.catch_warnings():  # bnb builds its qmap with .tolist()
            warnings.simplefilter("ignore")
            return cls(groups, lr=lr, optim_bits=bits, is_paged=paged)
    raise SimulationError(f"optim: {name} is not simulated; use adamw_torch_fused, adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, sgd or adafactor")


def _blocks(base) -> list:
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


def _mark_recompute(blocks: list, tracker) -> None:
    """Count allocations made while a checkpointed block re-runs its forward in backward as activations.

    transformers calls `block._gradient_checkpointing_func(partial(forward, ...), *args)`; the
    recompute calls that partial again from inside backward (and may stop it early by raising), so
    the wrapper keeps a depth counter with try/finally.
    """
    for blk in blocks:
        ckpt = getattr(blk, "_gradient_checkpointing_func", None)
        if ckpt is None:
            continue

        def wrapped(fn, *args, _ckpt=ckpt, **kwargs):
            def counted(*a, **k):
                tracker.in_block += 1
                try:
                    return fn(*a, **k)
                finally:
                    tracker.in_block -= 1

            return _ckpt(counted, *args, **kwargs)

        blk._gradient_checkpointing_func = wrapped


def _balanced_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Eager MoE experts forward with a perfectly balanced, data-independent routing (fake tensors)."""
    import torch
    from torch import nn

    num_tokens = hidden_states.shape[0]
    top_k = top_k_index.shape[-1]
    per_expert = max(1, math.ceil(num_tokens * top_k / self.num_experts))
    final = torch.zeros_like(hidden_states)
    device = hidden_states.device
    for e in range(self.num_experts):
        token_idx = (torch.arange(per_expert, device=device) + e * per_expert) % num_tokens
        top_k_pos = torch.zeros(per_expert, dtype=torch.long, device=device)
        current = hidden_states[token_idx]
        gate_up = nn.functional.linear(current, self.gate_up_proj[e])
        if getattr(self, "has_gate", True):
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
        else:
            h = self.act_fn(gate_up)
        h = nn.functional.linear(h, self.down_proj[e])
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


def _patch_moe(base) -> int:
    import types

    n = 0
    for m in base.modules():
        gu, dp = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if gu is None or dp is None or not hasattr(m, "num_experts"):
            continue
        if getattr(gu, "ndim", 0) != 3:
            continue
        impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
        if impl not in (None, "eager"):
            continue  # grouped_mm / batched_mm: shapes do not depend on the routing, run them as they are
        if getattr(m, "is_transposed", False) or getattr(m, "has_bias", False) or not getattr(m, "is_concatenated", True):
            raise SimulationError(f"model: the experts layout of {type(m).__name__} is not simulated yet; use --fast")
        m.forward = types.MethodType(_balanced_experts_forward, m)
        n += 1
    return n


class CudaLikeDropout:
    """Dropout as CUDA runs it: the fused native_dropout kernel keeps a 1-byte bool mask for backward.

    On CPU, torch.nn.functional.dropout takes a composite path whose saved mask has the input's
    dtype (2 bytes in bf16): that would overcount every LoRA dropout by a byte per element.
    """

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        self._orig = orig = F.dropout

        def dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 - torch's own signature
            if not training or p == 0.0 or p == 1.0 or not input.is_floating_point():
                return orig(input, p, training, inplace)
            return torch.native_dropout(input, p, True)[0]

        F.dropout = dropout
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.dropout = self._orig
        return False


class _TrainingMaskPolicy:
    """Let transformers decide the attention mask exactly as it does on real tensors.

    transformers refuses to skip the materialised [b,1,s,s] mask when the position ids or the query
    offset are fake tensors ("tracing"); on a GPU, a full-length training batch with one sequence
    per row and no padding skips it (SDPA's is_causal, which also enables GQA without repeating
    k/v). Training always starts at offset 0. With `packed`, the rows hold several sequences
    (position_ids restart) and transformers builds its block-diagonal mask, as on a GPU.
    """

    def __init__(self, packed: bool = False):
        self.packed = packed

    def __enter__(self):
        import torch
        from transformers import masking_utils

        self._mod = masking_utils
        self._orig = orig = masking_utils._ignore_causal_mask_sdpa

        def patched(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs):
            if isinstance(q_offset, torch.Tensor):
                q_offset = 0
            if isinstance(kv_offset, torch.Tensor):
                kv_offset = 0
            return orig(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs)

        masking_utils._ignore_causal_mask_sdpa = patched
        self._orig_packed = masking_utils.find_packed_sequence_indices
        if self.packed:
            # several sequences per row: transformers' own computation without its data-dependent
            # "is there only one?" check (there are several: position_ids restart)
            def packed_indices(position_ids):
                first = position_ids[:, :1] - 1
                return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

            masking_utils.find_packed_sequence_indices = packed_indices
        else:
            # one sequence per row (position_ids 0..s-1): transformers returns None here on real tensors
            masking_utils.find_packed_sequence_indices = lambda position_ids: None
        return self

    def __exit__(self, *exc):
        self._mod._ignore_causal_mask_sdpa = self._orig
        self._mod.find_packed_sequence_indices = self._orig_packed
        return False


def _inputs(setup: TrainingSetup, batch: int, seq: int, vocab: int):
    """One batch as the Trainer feeds it: [batch, seq] rows, or with packing trl's padding-free form.

    Packing: trl's collator flattens the batch into a single row of batch*seq tokens whose position_ids
    restart at every packed example, and passes no attention mask (the worst case: every row full).
    """
    import torch

    if setup.padding_free:
        ids = torch.randint(0, max(2, vocab), (1, batch * seq))
        pos = torch.arange(seq).repeat(batch).unsqueeze(0)
        return {"input_ids": ids, "labels": ids, "position_ids": pos, "use_cache": False}
    ids = torch.randint(0, max(2, vocab), (batch, seq))
    kw = {"input_ids": ids}
    if setup.task == "sequence-classification":
        kw["labels"] = torch.zeros(batch, dtype=torch.long)
    else:
        kw["labels"] = ids
    kw["use_cache"] = False
    return kw


def _run(model: ModelSpec, setup: TrainingSetup, depth: int) -> _RunResult:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    notes: list[str] = []
    m = _build_model(model, setup, depth)
    pm = _wrap_peft(m, setup)
    is_peft = pm is not m
    base = m
    head = _head_module(base)
    if head is not None and hasattr(head, "modules_to_save"):
        head = head.modules_to_save["default"] if "default" in head.modules_to_save else head
    if setup.method == "full":
        for p in pm.parameters():
            p.requires_grad_(True)
    compute = getattr(torch, _TORCH_DTYPES[setup.compute_dtype])
    autocast = setup.bf16 or setup.fp16
    vocab = int(getattr(base.config, "vocab_size", 0) or model.vocab_size)

    tracker = _make_tracker()  # the FakeTensorMode, counting storages
    # flash-attention runs packed rows as variable-length sequences (no mask); sdpa/eager get the block mask
    packed_mask = setup.padding_free and setup.attn_implementation != "flash_attention_2"
    with _TrainingMaskPolicy(packed_mask), CudaLikeDropout(), tracker, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _materialise(pm, tracker)
        # to_empty converts each module's parameters separately, so a tied output head (embeddings
        # shared with lm_head) comes back as two tensors: re-tie exactly as from_pretrained does
        _retie(base)
        if _patch_moe(base):
            notes.append("MoE experts routed with a perfectly balanced load (tokens*top_k/num_experts per expert), eager experts loop")
        elif getattr(base.config, "_experts_implementation", None) not in (None, "eager") and any(
                getattr(getattr(x, "gate_up_proj", None), "ndim", 0) == 3 for x in base.modules()):
            notes.append(f"MoE experts run transformers' {base.config._experts_implementation} path (its memory does not depend on the routing)")
        if setup.load_in_4bit or setup.load_in_8bit:
            from tools._fake_bnb import import_bitsandbytes, quantize_linears_4bit, quantize_linears_8bit

            import_bitsandbytes()

            # transformers quantizes every linear layer except the output head; adapters come later
            skip = {id(x) for x in pm.modules() if any(p.requires_grad for p in x.parameters(recurse=False))}
            if head is not None:
                skip.update(id(x) for x in head.modules())
            for x in pm.modules():
                if type(x).__name__ == "ModulesToSaveWrapper":
                    skip.update(id(y) for y in x.modules())
            if setup.load_in_4bit:
                nq = quantize_linears_4bit(
                    pm, skip=skip, quant_type=setup.bnb_4bit_quant_type, double_quant=setup.bnb_4bit_use_double_quant,
                    compute_dtype=getattr(torch, _TORCH_DTYPES[setup.bnb_4bit_compute_dtype]),
                    quant_storage=setup.bnb_4bit_quant_storage,
                )
                kind = f"4-bit {setup.bnb_4bit_quant_type} stand-ins (bnb.matmul_4bit)"
            else:
                nq = quantize_linears_8bit(pm, skip=skip)
                kind = "LLM.int8 stand-ins (bnb.matmul, outlier threshold 0: outlier columns not counted)"
            # trl's SFTTrainer casts the adapters of a quantized model to bf16 (except DoRA magnitudes)
            for name, p in pm.named_parameters():
                if p.requires_grad and "lora_magnitude_vector" not in name:
                    p.data = p.data.to(torch.bfloat16)
            notes.append(f"{nq} linear layers as bitsandbytes {kind}; adapters in bf16 as trl does")
        if is_peft and setup.gradient_checkpointing:
            pm.enable_input_require_grads()
        pm.train()

        from tools._fake_bnb import Fake4bitLinear, Fake8bitLinear

        params = [p for p in pm.parameters() if p.requires_grad]
        if not params:
            raise SimulationError(f"method: {setup.method} leaves no trainable parameter for this model")
        frozen_store = {id(x.untyped_storage()) for x in list(pm.parameters()) + list(pm.buffers()) if not x.requires_grad}
        num_parameters = 0
        seen_params: set[int] = set()  # a tied parameter belongs to two modules: count it once
        for mod in pm.modules():
            if isinstance(mod, (Fake4bitLinear, Fake8bitLinear)):
                num_parameters += mod.logical_numel
                continue
            for p in mod.parameters(recurse=False):
                if id(p) not in seen_params:
                    seen_params.add(id(p))
                    num_parameters += p.numel()
        trainable = sum(p.numel() for p in params)
        _mark_recompute(_blocks(base), tracker)
        if head is not None:
            def _head_pre(*_):
                if tracker.phase == "forward":
                    tracker.phase = "forward-head"
            head.register_forward_pre_hook(_head_pre)
        blocks = _blocks(base)
        if blocks:
            def _first_block_pre(_mod, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states")
                if tracker.phase == "forward" and isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(lambda g: setattr(tracker, "phase", "backward-tail"))

            blocks[0].register_forward_pre_hook(_first_block_pre, with_kwargs=True)
        largest = 0
        for blk in _blocks(base):
            largest = max(largest, sum(x.untyped_storage().nbytes() for x in list(blk.parameters()) + list(blk.buffers())))

        optimizer = _make_optimizer(pm, setup, params)
        qmaps = getattr(optimizer, "name2qmap", None)
        if isinstance(qmaps, dict):
            # bitsandbytes' quantile maps are real tensors shared by every parameter's state: make them
            # fake once, instead of FakeTensorMode converting them in each per-parameter update
            from torch._subclasses.fake_tensor import FakeTensor

            for k, v in list(qmaps.items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
                    qmaps[k] = tracker.from_tensor(v)
        amp = torch.autocast("cpu", dtype=compute) if autocast else _null()
        seq = setup.max_length

        # Step 1 only creates the optimizer state: zero gradients and one optimizer.step() allocate
        # exactly what a first real step leaves behind, at a fraction of the cost.
        tracker.phase = "optimizer"
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # state tensors no op produced (bitsandbytes' quantile maps, made fake above and shared by every
        # parameter's state; on a GPU they are moved there once): count them
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and tracker.rec_of(v) is None:
                    tracker.add(v)
        if setup.gradient_accumulation_steps > 1:
            # a later micro-batch of an accumulation window: gradients of the earlier ones already exist
            for p in params:
                p.grad = torch.zeros_like(p)
        tracker.phase = "forward"
        tracker.reset_peak()

        # Step 2, the steady state: forward, loss, backward, clipping, optimizer step.
        with amp:
            out = pm(**_inputs(setup, setup.per_device_train_batch_size, seq, vocab))
        loss = out.loss / setup.gradient_accumulation_steps
        if setup.fp16:
            loss = loss * _FP16_LOSS_SCALE  # GradScaler.scale(loss): the Trainer's fp16 path
        logits = getattr(out, "logits", None)
        tracker.phase = "backward-loss"
        if logits is not None and logits.requires_grad:
            logits.register_hook(lambda g: setattr(tracker, "phase", "backward"))
        else:
            tracker.phase = "backward"
        del out, logits
        loss.backward()
        del loss
        tracker.phase = "optimizer"
        if setup.fp16:
            # GradScaler.unscale_ (before clipping): the in-place foreach check-and-unscale per dtype group;
            # scaler.step's found_inf.item() needs real values and allocates nothing, so it is skipped
            found_inf, inv_scale = torch.zeros(1), torch.full((1,), 1.0 / _FP16_LOSS_SCALE)
            groups: dict = {}
            for p in params:
                if p.grad is not None:
                    groups.setdefault(p.grad.dtype, []).append(p.grad)
            for grads in groups.values():
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        if setup.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, setup.max_grad_norm, foreach=True)  # CUDA default: foreach
        optimizer.step()
        tracker.finish()
        seg_snaps = {seg: tracker.seg_snap[seg] for seg in _TRAIN_SEGMENTS if seg in tracker.seg_snap}

        # identities at the end of step 2
        def recs(tensors) -> dict[int, _Rec]:
            out = {}
            for t in tensors:
                r = tracker.rec_of(t)
                if r is not None:
                    out[id(r)] = r
            return out

        weight_recs = recs(list(pm.parameters()) + list(pm.buffers()))
        adapter_ids = set()
        if is_peft:
            adapter_ids = set(recs(params))
        grad_recs = recs([p.grad for p in params if p.grad is not None])
        state_tensors = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        state_recs = recs(state_tensors)
        frozen_ids = {id(r) for k, r in tracker.live.items() if k in frozen_store}

        def classify(snapshot) -> dict[str, int]:
            breakdown = dict.fromkeys(STEP_CATEGORIES, 0)
            for r in snapshot:
                rid = id(r)
                if rid in adapter_ids:
                    cat = "adapters"
                elif rid in weight_recs or rid in frozen_ids:
                    cat = "weights"
                elif rid in grad_recs:
                    cat = "gradients"
                elif rid in state_recs:
                    cat = "optimizer_state"
                elif r.tag in ("forward", "recompute", "setup"):
                    cat = "activations"
                elif r.tag in ("forward-head", "backward-loss"):
                    cat = "logits_loss"
                else:
                    cat = "temporaries"
                breakdown[cat] += r.nbytes
            return breakdown

        segments = {seg: classify(snap) for seg, snap in seg_snaps.items()}
        weights_bytes = sum(r.nbytes for rid, r in weight_recs.items() if rid not in adapter_ids)
        adapter_bytes = sum(r.nbytes for rid, r in weight_recs.items() if rid in adapter_ids)
        gradient_bytes = sum(r.nbytes for r in grad_recs.values())
        optimizer_bytes = sum(r.nbytes for r in state_recs.values())
        del seg_snaps, weight_recs, grad_recs, state_recs

        eval_peak = None
        if setup.eval_strategy != "no":
            optimizer.zero_grad(set_to_none=True)
            pm.eval()
            tracker.phase = "eval"
            tracker.reset_peak()
            with torch.no_grad(), amp:
                out = pm(**_inputs(setup, setup.per_device_eval_batch_size, seq, vocab))
                kept = None if setup.prediction_loss_only else out.logits
                del out
            tracker.finish()
            eval_peak = tracker.peak
            del kept
            if not setup.prediction_loss_only:
                notes.append("eval peak keeps one batch's logits; the Trainer also gathers every eval batch's logits "
                             "on the GPU unless eval_accumulation_steps is set (not counted)")
    if setup.attn_implementation == "flash_attention_2":
        notes.append("flash_attention_2 simulated as CPU SDPA's flash kernel (no s^2 score matrix)")
    if setup.optim.startswith("paged_"):
        notes.append(f"{setup.optim}: paged optimizer state counted as resident GPU memory (it is unified memory, evicted only under pressure)")
    if setup.fp16:
        notes.append("fp16: GradScaler's scaled loss and in-place unscale of the gradients simulated")
    if autocast:
        notes.append(f"mixed precision simulated with torch.autocast('cpu', {setup.compute_dtype}); the Trainer uses CUDA autocast (same policy for matmuls)")
    return _RunResult(
        segments=segments, num_parameters=num_parameters, trainable_parameters=trainable,
        weights_bytes=weights_bytes, adapter_bytes=adapter_bytes, gradient_bytes=gradient_bytes,
        optimizer_bytes=optimizer_bytes, eval_peak_bytes=eval_peak, largest_layer_param_bytes=largest, notes=notes,
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------------------
# Extrapolation
# --------------------------------------------------------------------------------------


def _combine(runs: list[_RunResult], depths: list[int], total: int) -> StepMemory:
    """Extend each segment's breakdown linearly in depth; the step peak is the largest segment at full depth.

    Peaks are tracked per segment because the segment holding the peak can change with depth
    (a 2-block model peaks at the logits, an 80-block one at the optimizer step).
    """
    a = runs[0]
    notes = list(dict.fromkeys(n for r in runs for n in r.notes))
    if len(runs) == 1:
        segs = a.segments
        ext = lambda x, y: x  # noqa: E731
        b = a
        per_layer = None
    else:
        b = runs[1]
        k1, k2 = depths
        steps = (total - k1) / (k2 - k1)  # periods to add beyond k1

        def ext(x: int, y: int) -> int:
            return max(0, round(x + (y - x) * steps))

        segs = {
            seg: {c: ext(a.segments[seg][c], b.segments[seg][c]) for c in STEP_CATEGORIES}
            for seg in a.segments if seg in b.segments
        }
    best = max(segs, key=lambda seg: sum(segs[seg].values()))
    breakdown = segs[best]
    if len(runs) == 2:
        per_layer = round((sum(b.segments[best].values()) - sum(a.segments[best].values())) / (depths[1] - depths[0]))
    eval_peak = None if a.eval_peak_bytes is None else ext(a.eval_peak_bytes, b.eval_peak_bytes)
    return StepMemory(
        tier="simulated",
        num_parameters=ext(a.num_parameters, b.num_parameters),
        trainable_parameters=ext(a.trainable_parameters, b.trainable_parameters),
        weights_bytes=ext(a.weights_bytes, b.weights_bytes),
        adapter_bytes=ext(a.adapter_bytes, b.adapter_bytes),
        gradient_bytes=ext(a.gradient_bytes, b.gradient_bytes),
        optimizer_bytes=ext(a.optimizer_bytes, b.optimizer_bytes),
        peak_bytes=sum(breakdown.values()), peak_breakdown=breakdown, peak_phase=_PHASE_OF_SEGMENT[best],
        eval_peak_bytes=eval_peak,
        largest_layer_param_bytes=max(a.largest_layer_param_bytes, b.largest_layer_param_bytes),
        per_layer_bytes=per_layer, layers_simulated=list(depths), notes=notes,
    )
