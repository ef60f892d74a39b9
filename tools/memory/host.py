"""Host RAM per node: what a training run keeps resident in the machine's RAM, by named part.

`host_memory(model, setup, step)` reports two moments of the run and keeps the larger:

- **loading** — `from_pretrained` and accelerate's / DeepSpeed's prepare, until the weights sit
  on the GPUs;
- **training** — the steady state of the step loop (offloaded states, pinned buffers, workers).

Every part is per node (a node runs `local ranks = ceil(num_gpus / num_nodes)` processes) and
counts anonymous memory: what the kernel cannot drop, what the OOM killer counts. File-backed
pages that the kernel reclaims under pressure — the safetensors checkpoint, which is memory-mapped,
and the Arrow cache of the tokenized dataset — are reported apart as `page_cache_bytes`: they
cost disk reads when RAM is short, never an OOM.

What the code of the installed libraries does (transformers 5.24, accelerate 1.15,
safetensors 0.8; the tests in tests/test_host_memory.py measure the first three on this CPU):

1. `PreTrainedModel._load_pretrained_model` opens each safetensors file with
   `safe_open(..., device="cpu", backend="mmap")` and keeps `get_slice` handles; each tensor is
   materialised by `tensor[...]` (`core_model_loading._materialize_copy`) and then `.to(device,
   dtype)`. A CPU tensor in the file's dtype is a view of the private file mapping: no anonymous
   copy (measured: 305 MiB of parameters, all inside the mapping). A different load dtype (a
   float32 checkpoint loaded in bf16, or the reverse) makes an anonymous copy of every tensor.
2. Without a device_map (tunepilot's train.py for unquantized models) the model is built on
   CPU. Single GPU / DDP: the Trainer moves it to the GPU (`place_model_on_device`). FSDP and
   DeepSpeed: the Trainer leaves it on CPU and accelerate / DeepSpeed move it while preparing.
3. Quantized (bitsandbytes, `device_map={"": device}` as train.py writes): on-the-fly
   quantisation loads sequentially ("we also use sync loading to avoid worker threads loading
   full-precision tensors to GPU faster than the main thread can quantize them",
   `convert_and_load_state_dict_in_model`), each tensor goes from the mapping to the GPU and is
   quantised there: one layer's bf16 weights at a time sit on the GPU, none on the host.
4. FSDP2 (accelerate `fsdp2_prepare_model`): under mixed precision every trainable parameter
   that is not fp32 is upcast on the CPU (`param.data = param.data.to(torch.float32)`) before
   `fully_shard`, and `original_sd = model.state_dict()` keeps those tensors until the sharded
   model is loaded: 4 bytes per trainable parameter per local rank (not for 4-bit models).
5. `fsdp_cpu_ram_efficient_loading`: accelerate's doc says only the first process loads the
   checkpoint. In transformers 5.24 `from_pretrained` loads on every rank anyway
   (`is_fsdp_enabled()` only changes how missing keys and non-persistent buffers are placed on
   non-zero local ranks); accelerate then moves the model to meta and broadcasts rank 0's
   weights (`fsdp2_load_full_state_dict`). Measured: two gloo processes with
   ACCELERATE_USE_FSDP / FSDP_CPU_RAM_EFFICIENT_LOADING set, local rank 1 maps and materialises
   what rank 0 does. So copies = local ranks with the flag or without it (transformers 4.x put
   non-zero ranks on meta: rank 0 only); since same-dtype copies are mmap views, this costs
   anonymous RAM only where a dtype conversion or the fp32 upcast makes real copies.
6. DeepSpeed ZeRO-3 (unquantized): `deepspeed.zero.Init` partitions the parameters onto the GPUs
   while the model is built; rank 0 alone reads the state dict (`map_location="cpu"`, the others
   "meta"), as mmap views in the file's dtype: no anonymous copy.

Offload (training): the per-rank sizes come from the sharded step — `offload=` bytes by part, or
the simulated sharded step's own `StepMemory.offloaded_bytes` (what tools.memory.distributed's
ledger moved to the host, `offload_from_sharded_step`); otherwise `offload_from_step` computes them
from the one-replica StepMemory and the setup (formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tools.schemas import BYTES_PER_GIB, ModelSpec, StepMemory, TrainingSetup

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}
_ADAM_LIKE = {"adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "adagrad", "rmsprop", "lion_32bit",
              "paged_lion_32bit"}
# datasets writes an `input_ids` column as int32 (arrow_writer's optimized type for tokenizer columns;
# trl's SFTTrainer tokenizes plain text into input_ids only) plus one int32 offset per row; the raw text
# stays in the loader's own Arrow cache (UTF-8, ~4 bytes per token for English: an assumption).
ARROW_TOKEN_BYTES = 4
ARROW_OFFSET_BYTES = 4
TEXT_BYTES_PER_TOKEN = 4

OFFLOAD_PARTS = ("offloaded_params", "master_weights", "optimizer_states", "gradients", "optimizer_step_temporaries")


def _const(name: str) -> float:
    from tools.estimator import calibration

    return float(calibration()["constants"][name]["value"])


def local_ranks(setup: TrainingSetup) -> int:
    """Processes per node: one per GPU, the GPUs spread evenly over the nodes."""
    return max(1, math.ceil(setup.num_gpus / max(setup.num_nodes, 1)))


@dataclass
class HostMemory:
    """Host RAM per node at its peak moment, by part (bytes), plus what is reclaimable page cache."""

    total_bytes: int
    breakdown: dict[str, int]
    phase: str  # "loading" or "training"
    loading_bytes: int
    training_bytes: int
    page_cache_bytes: int
    notes: list[str] = field(default_factory=list)


def offload_from_step(step: StepMemory, setup: TrainingSetup) -> dict[str, int]:
    """Per-rank bytes the offloaded run keeps in host RAM, by part, from one replica's step (formula).

    ZeRO-Offload (DeepSpeed CPU Adam): fp32 master partition, fp32 moments, fp32 gradient partition;
    ZeRO-3 'all' also the 16-bit parameter partition. FSDP CPUOffloadPolicy: the sharded parameters
    (trainable ones upcast to fp32 under mixed precision: they are the master copy), sharded
    gradients and the optimizer states, and the CPU optimizer step's temporaries.
    """
    if setup.offload == "none":
        return {}
    n = setup.num_gpus
    t = step.trainable_parameters
    mixed = setup.bf16 or setup.fp16
    full = setup.method == "full"
    out = dict.fromkeys(OFFLOAD_PARTS, 0)
    if setup.zero_stage:
        out["master_weights"] = 4 * t // n
        out["optimizer_states"] = 8 * t // n  # DeepSpeed CPU Adam keeps exp_avg and exp_avg_sq in fp32
        out["gradients"] = 4 * t // n
        if setup.offload == "all":
            frozen = step.weights_bytes if not full else 0
            out["offloaded_params"] = (frozen + (2 if mixed else 4) * t) // n
        return out
    # FSDP: CPUOffloadPolicy offloads parameters, gradients and the optimizer together
    param_bytes = 4 if mixed else (step.gradient_bytes // max(t, 1) or 4)
    frozen = step.weights_bytes if not full else 0
    out["offloaded_params"] = frozen // n
    out["master_weights"] = param_bytes * t // n
    out["gradients"] = param_bytes * t // n
    if setup.optim in _ADAM_LIKE and mixed:
        per = step.optimizer_bytes / max(t, 1)
        states = max(1, round(per / (4 if per >= 8 else 2)))
        out["optimizer_states"] = 4 * states * t // n
    else:
        out["optimizer_states"] = step.optimizer_bytes // n
    if setup.optim == "adamw_torch":  # foreach AdamW: one temporary the size of the parameter group
        out["optimizer_step_temporaries"] = param_bytes * t // n
    return out


# what the sharded dry run's ledger (tools.memory.distributed) calls the kinds of bytes it moved to the host
_LEDGER_KINDS = {"parameters": "offloaded_params", "params": "offloaded_params", "gradients": "gradients",
                 "optimizer_state": "optimizer_states", "optimizer_states": "optimizer_states",
                 "optimizer_step": "optimizer_step_temporaries", "master_weights": "master_weights"}
_LEDGER_KINDS.update({p: p for p in ("offloaded_params", "master_weights", "optimizer_states", "gradients",
                                     "optimizer_step_temporaries")})


def offload_from_sharded_step(step: StepMemory) -> dict[str, int] | None:
    """Per-rank host bytes by part as the simulated sharded step measured them (StepMemory.offloaded_bytes), or None."""
    measured = getattr(step, "offloaded_bytes", None)
    if not measured or getattr(step, "world_size", 1) <= 1:
        return None
    out: dict[str, int] = {}
    for kind, n in measured.items():
        part = _LEDGER_KINDS.get(kind, "offloaded_params")
        out[part] = out.get(part, 0) + max(0, int(n))
    return out


def _loading_parts(model: ModelSpec, setup: TrainingSetup, step: StepMemory, ranks: int,
                   notes: list[str]) -> dict[str, int]:
    parts: dict[str, int] = {}
    quantized = setup.load_in_4bit or setup.load_in_8bit
    file_bytes = _DTYPE_BYTES.get(model.torch_dtype, 2)
    load_bytes = _DTYPE_BYTES[setup.dtype]
    base_params = step.num_parameters - (step.trainable_parameters if setup.method != "full" else 0)
    if quantized:
        notes.append("loading: on-the-fly quantisation moves one tensor at a time from the checkpoint's "
                     "memory map to the GPU and quantises it there: no host copy of the weights")
        return parts
    zero3 = setup.zero_stage == 3
    if file_bytes != load_bytes and not zero3:
        parts["checkpoint_copies"] = ranks * base_params * load_bytes
        notes.append(f"loading: the checkpoint is {model.torch_dtype} but the run loads {setup.dtype}: every "
                     f"tensor is converted into an anonymous copy, one full model per local rank ({ranks})")
    elif zero3:
        notes.append("loading: ZeRO-3 partitions parameters onto the GPUs while the model is built; rank 0 "
                     "alone reads the checkpoint, as memory-mapped views")
    else:
        notes.append("loading: the weights are views of the checkpoint's memory map (same dtype): page cache, "
                     "no anonymous copy")
    if setup.method != "full" and not zero3:
        # peft creates the adapters next to their base layers: on the CPU until the model is moved
        parts["adapters"] = ranks * step.adapter_bytes
    if setup.fsdp != "none" and (setup.bf16 or setup.fp16) and setup.method == "full" and load_bytes < 4:
        # the upcast replaces each parameter's tensor: a converted copy is freed as its fp32 one appears
        parts.pop("checkpoint_copies", None)
        parts["fsdp_fp32_upcast"] = ranks * 4 * step.trainable_parameters
        notes.append(f"loading: accelerate upcasts the trainable parameters to fp32 on the CPU before fully_shard "
                     f"(FSDP2 mixed precision) on every local rank ({ranks}); fsdp_cpu_ram_efficient_loading does "
                     "not avoid it (transformers 5 loads the checkpoint on every rank)")
    return parts


def _training_parts(setup: TrainingSetup, offload: dict[str, int], ranks: int, notes: list[str]) -> dict[str, int]:
    parts: dict[str, int] = {}
    for name in OFFLOAD_PARTS:
        v = int(offload.get(name, 0)) * ranks
        if v:
            parts[name] = v
    if setup.offload != "none":
        parts["pinned_buffers"] = int(_const("pinned_host_buffer_gib") * BYTES_PER_GIB) * ranks
        pinned = "FSDP's CPUOffloadPolicy(pin_memory=True)" if setup.fsdp != "none" else "ds_config pin_memory: true"
        notes.append(f"offload={setup.offload}: the offloaded states are page-locked ({pinned}): they cannot swap")
    return parts


def dataset_page_cache_bytes(setup: TrainingSetup, tokens: int | None, examples: int | None,
                   notes: list[str]) -> int:
    """Page-cache bytes of the tokenized dataset (Arrow cache files are memory-mapped), 0 when streaming."""
    if setup.streaming:
        notes.append("dataset: streaming keeps only the batches in flight")
        return 0
    if tokens is None and examples is not None:
        tokens = examples * setup.max_length
    if tokens is None:
        notes.append("dataset: size unknown (give dataset tokens or examples); its Arrow cache is memory-mapped "
                     "page cache either way")
        return 0
    rows = examples if examples is not None else max(1, tokens // max(setup.max_length, 1))
    size = tokens * (ARROW_TOKEN_BYTES + TEXT_BYTES_PER_TOKEN) + rows * 2 * ARROW_OFFSET_BYTES  # ids + text, each with offsets
    notes.append(f"dataset: {tokens:,} tokens tokenized into a memory-mapped Arrow cache "
                 f"({size / BYTES_PER_GIB:.2f} GiB page cache with the raw text); streaming=True avoids it")
    return int(size)


def host_memory(model: ModelSpec, setup: TrainingSetup, step: StepMemory, *, offload: dict[str, int] | None = None,
                dataset_tokens: int | None = None, dataset_examples: int | None = None,
                dataloader_workers: int = 0) -> HostMemory:
    """Host RAM per node of training `model` with `setup`: the larger of the loading and training peaks.

    `offload`: per-rank bytes by part that the sharded step keeps on the host (keys OFFLOAD_PARTS);
    None computes them from `step` (`offload_from_step`). `dataloader_workers`: the Trainer's
    dataloader_num_workers (0, the default tunepilot's train.py keeps).
    """
    notes: list[str] = []
    ranks = local_ranks(setup)
    runtime = int((_const("host_runtime_gib") + _const("host_cuda_runtime_gib")) * BYTES_PER_GIB) * ranks
    if offload is None:
        offload = offload_from_sharded_step(step)
        if offload is not None:
            notes.append("offload: the host bytes the simulated sharded step moved off the GPU, per rank")
    if offload is None:
        offload = offload_from_step(step, setup)
    loading = {"runtime": runtime, **_loading_parts(model, setup, step, ranks, notes)}
    training = {"runtime": runtime, **_training_parts(setup, offload, ranks, notes)}
    if setup.activation_offloading and step.offload_host_bytes:
        # trl's activation offloading: every process keeps its saved activations in (pinned) host RAM
        training["activation_offload"] = int(step.offload_host_bytes) * ranks
        notes.append(f"activation offloading: {step.offload_host_bytes / BYTES_PER_GIB:.2f} GiB of saved activations per "
                     f"process in pinned host RAM (trl refuses to pin past 60% of the host's RAM)")
    if dataloader_workers:
        training["dataloader_workers"] = int(_const("host_dataloader_worker_gib") * BYTES_PER_GIB) * dataloader_workers * ranks
    else:
        notes.append("dataloader: no worker processes (Trainer's dataloader_num_workers=0)")
    file_bytes = _DTYPE_BYTES.get(model.torch_dtype, 2)
    base_params = step.num_parameters - (step.trainable_parameters if setup.method != "full" else 0)
    checkpoint = base_params * file_bytes
    page_cache = checkpoint + dataset_page_cache_bytes(setup, dataset_tokens, dataset_examples, notes)
    notes.append(f"checkpoint: {checkpoint / BYTES_PER_GIB:.1f} GiB of safetensors pass through the page cache "
                 f"(memory-mapped, shared by the node's {ranks} process(es), reclaimable)")
    lt, tt = sum(loading.values()), sum(training.values())
    phase, parts = ("loading", loading) if lt >= tt else ("training", training)
    return HostMemory(total_bytes=int(max(lt, tt)), breakdown={k: int(v) for k, v in parts.items()}, phase=phase,
                      loading_bytes=int(lt), training_bytes=int(tt), page_cache_bytes=int(page_cache), notes=notes)
