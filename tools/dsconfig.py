"""A DeepSpeed JSON (the `ds_config.json` a run passes to `--deepspeed`) read into TrainingSetup fields.

`tunepilot estimate MODEL --ds-config ds_config.json` estimates the run that config describes: its
ZeRO stage, CPU offload, bucket sizes, ZeRO-3 sub-group size, precision, micro-batch and accumulation.
Values written "auto" are filled by transformers from TrainingArguments at run time, so they keep the
setup's (the flags', or the defaults). What the memory model does not follow is said in a note
rather than silently dropped. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tools.schemas import TunepilotError

# ds_config zero_optimization key -> TrainingSetup field (element counts)
_SIZES = {
    "reduce_bucket_size": "zero_reduce_bucket_size",
    "stage3_prefetch_bucket_size": "zero_prefetch_bucket_size",
    "sub_group_size": "zero_sub_group_size",
    "stage3_max_live_parameters": "zero_max_live_parameters",
    "stage3_max_reuse_distance": "zero_max_reuse_distance",
    "stage3_param_persistence_threshold": "zero_param_persistence_threshold",
}
# keys the estimate does not model differently from its own ds_config.json (said once, in a note)
_FIXED = {
    "overlap_comm": True, "contiguous_gradients": True,
}


def _number(value, key: str, path: Path) -> int | None:
    """An element count from the JSON: None for "auto", an int for a number (1e9 and 1_000_000_000 alike)."""
    if value == "auto" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TunepilotError(f"--ds-config: {path.name}: {key} = {value!r} is not a number of elements or \"auto\"; fix the file")
    return int(value)


def _device(section, key: str, path: Path) -> str:
    if not isinstance(section, dict):
        return "none"
    device = str(section.get("device", "none")).lower()
    if device not in ("none", "cpu", "nvme"):
        raise TunepilotError(f"--ds-config: {path.name}: zero_optimization.{key}.device = {device!r}; use cpu, nvme or none")
    return device


def setup_fields(path: Path) -> tuple[dict, list[str]]:
    """(TrainingSetup fields, notes) from a DeepSpeed JSON file; TunepilotError naming what is wrong."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunepilotError(f"--ds-config: {path} does not exist; give the DeepSpeed JSON your run passes to --deepspeed") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TunepilotError(f"--ds-config: cannot read {path} ({e.__class__.__name__}); give a readable JSON file") from None
    except json.JSONDecodeError as e:
        raise TunepilotError(f"--ds-config: {path.name} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file") from None
    if not isinstance(cfg, dict):
        raise TunepilotError(f"--ds-config: {path.name} holds a {type(cfg).__name__}, not a DeepSpeed config object")
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise TunepilotError(f"--ds-config: {path.name}: zero_optimization must be an object")
    fields: dict = {}
    notes: list[str] = []
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise TunepilotError(f"--ds-config: {path.name}: zero_optimization.stage = {stage!r}; use 0, 1, 2 or 3")
    fields["zero_stage"] = stage
    opt_dev = _device(zero.get("offload_optimizer"), "offload_optimizer", path)
    par_dev = _device(zero.get("offload_param"), "offload_param", path)
    if "nvme" in (opt_dev, par_dev):
        raise TunepilotError(f"--ds-config: {path.name}: NVMe offload (ZeRO-Infinity) is not modelled; use device cpu or none")
    if par_dev == "cpu" and stage != 3:
        raise TunepilotError(f"--ds-config: {path.name}: offload_param needs stage 3 (ZeRO-1/2 offload only the optimizer)")
    fields["offload"] = "all" if par_dev == "cpu" else "optimizer" if opt_dev == "cpu" else "none"
    for key, field in _SIZES.items():
        value = _number(zero.get(key), key, path)
        if value is not None:
            fields[field] = max(1, value) if field == "zero_sub_group_size" else value
    unmodelled = [f"{k}={zero[k]!r}" for k, v in _FIXED.items() if k in zero and zero[k] != v]
    if unmodelled:
        notes.append(f"--ds-config: {', '.join(unmodelled)} read but not modelled (the estimate counts DeepSpeed's "
                     "buckets with overlap_comm and contiguous_gradients on)")
    for name in ("bf16", "fp16"):
        sec = cfg.get(name)
        if isinstance(sec, dict) and sec.get("enabled") is True:
            fields["bf16"], fields["fp16"] = name == "bf16", name == "fp16"
    for key, field in (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                       ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        value = _number(cfg.get(key), key, path)
        if value is not None:
            if value < 1:
                raise TunepilotError(f"--ds-config: {path.name}: {key} = {value}; must be at least 1")
            fields[field] = value
    clip = cfg.get("gradient_clipping")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        fields["max_grad_norm"] = float(clip)
    read = ", ".join(f"{k}={v}" for k, v in fields.items())
    notes.insert(0, f"--ds-config {path.name}: {read} (values \"auto\" keep the setup's)")
    return fields, notes
