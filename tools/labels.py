"""Short setup labels for narrow tables and chart annotations ('LoRA r16 all b1x16 ckpt AdamW').

`TrainingSetup.short()` is the full one-line description; `label(setup)` is the compact form that
keeps an 80-column plan table to one line per setup (the full description goes below the table);
`labels(setups)` also takes out the parts every setup of the table shares (for the caption).
"""

from __future__ import annotations

from tools.schemas import PEFT_LORA_METHODS, TrainingSetup

_METHOD = {"full": "Full", "lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "ia3": "IA3",
           "prompt-tuning": "Prompt", "prefix-tuning": "Prefix", "p-tuning": "P-tune"}
_OPTIM = {
    "adamw_torch": "AdamW", "adamw_torch_fused": "AdamW", "adamw_bnb_8bit": "AdamW8", "adamw_8bit": "AdamW8",
    "paged_adamw_8bit": "pAdamW8", "paged_adamw_32bit": "pAdamW", "adafactor": "Adafactor", "sgd": "SGD",
    "adagrad": "Adagrad", "rmsprop": "RMSprop", "lion_8bit": "Lion8", "lion_32bit": "Lion",
    "paged_lion_8bit": "pLion8", "paged_lion_32bit": "pLion", "adamw_torch_8bit": "AdamW8t", "adamw_torch_4bit": "AdamW4t",
}
_SHARD = {"ddp": "DDP", "zero1": "Z1", "zero2": "Z2", "zero3": "Z3", "fsdp_full_shard": "FSDP", "fsdp_shard_grad_op": "FSDP-2"}


def targets(setup: TrainingSetup) -> str:
    """'all-lin', 'q,k,v,o' (projection suffixes dropped) or 'N mods' for long lists."""
    tm = setup.target_modules
    if isinstance(tm, str):
        return "all-lin" if tm == "all-linear" else tm
    short = [t.removesuffix("_proj") for t in tm]
    return ",".join(short) if len(short) <= 4 and sum(map(len, short)) <= 12 else f"{len(short)} mods"


def label(setup: TrainingSetup, *, seq: bool = False) -> str:
    """Compact description, e.g. 'QLoRA r8 q,k,v,o b4x4 ckpt AdamW' or 'Full b1x16 ckpt AdamW 4xZ3+off'."""
    return " ".join(_parts(setup, seq=seq))


def labels(setups: list[TrainingSetup]) -> tuple[list[str], list[str]]:
    """Labels for a table of setups, with the parts every setup shares taken out: (labels, shared parts).

    The method always stays; the shared parts (e.g. ['ckpt', 'AdamW']) go in the table's caption."""
    seq = len({s.max_length for s in setups}) > 1
    parts = [_parts(s, seq=seq) for s in setups]
    shared: list[str] = []
    if len(parts) > 1:
        shared = [p for p in parts[0][1:] if all(p in ps[1:] for ps in parts[1:])]
    return [" ".join([ps[0]] + [p for p in ps[1:] if p not in shared]) for ps in parts], shared


def _parts(setup: TrainingSetup, *, seq: bool = False) -> list[str]:
    parts = [_METHOD.get(setup.method, setup.method)]
    if setup.method in PEFT_LORA_METHODS:
        parts.append(f"r{setup.r}")
        parts.append(targets(setup))
    parts.append(f"b{setup.per_device_train_batch_size}x{setup.gradient_accumulation_steps}")
    if seq:
        parts.append(f"s{setup.max_length}")
    if setup.gradient_checkpointing:
        parts.append("ckpt")
    parts.append(_OPTIM.get(setup.optim, setup.optim))
    if setup.num_gpus > 1 or setup.sharding != "single":
        s = f"{setup.num_gpus}x{_SHARD.get(setup.sharding, setup.sharding)}"
        if setup.offload != "none":
            s += "+off" if setup.offload == "optimizer" else "+offall"
        parts.append(s)
    return parts
