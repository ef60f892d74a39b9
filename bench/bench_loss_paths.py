"""Loss paths on one 24 GB card: peak per component, and the largest micro-batch / context that fits with each.

Llama-3.1-8B (vocab 128,256) and Qwen2.5-7B (vocab 152,064), QLoRA nf4 r=16 all-linear, gradient
checkpointing, paged_adamw_8bit, bf16, on an RTX 4090 (24 GB, 10% kept free), at seq 2k / 8k / 32k and
micro-batch 1, for each `loss_impl` (trl_fused: trl's fused LM head; hf: transformers' full logits;
liger: Liger's fused linear cross-entropy; cce: Cut Cross-Entropy), without and with trl's activation
offloading. Peaks come from the simulated tier (the dry run: real trl code / stand-ins on fake tensors)
unless --fast; the largest micro-batch (up to 16) and the largest context (doubling from 1k, then
bisected to 1k steps) come from the analytic tier, as the planner searches.

    python bench/bench_loss_paths.py            # simulated peaks (a few minutes on 2 cores)
    python bench/bench_loss_paths.py --fast     # analytic only (seconds)
    python bench/bench_loss_paths.py --fast --all-offload   # offloading rows for every loss path
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.estimator import estimate  # noqa: E402
from tools.gpus import parse_hardware  # noqa: E402
from tools.models import lookup_model  # noqa: E402
from tools.schemas import LOSS_IMPLS, TrainingSetup  # noqa: E402

MODELS = ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B")
SEQS = (2048, 8192, 32768)
MARGIN = 0.10
COMPONENTS = ("weights", "activations", "logits_loss", "temporaries", "optimizer_state")


def setup_for(model_id: str, loss: str, seq: int, micro: int = 1, offload: bool = False) -> TrainingSetup:
    return TrainingSetup(model_id=model_id, method="qlora", load_in_4bit=True, r=16, lora_alpha=32, target_modules="all-linear",
                         per_device_train_batch_size=micro, max_length=seq, gradient_checkpointing=True,
                         optim="paged_adamw_8bit", loss_impl=loss, activation_offloading=offload)


def fits(spec, hw, st) -> bool:
    e = estimate(spec, st, hw, fast=True, advice=False)
    return e.device_total_gib <= hw.gpu.memory_gib * (1 - MARGIN)


def largest_micro(spec, hw, model_id, loss, seq, offload) -> int:
    best = 0
    for m in (1, 2, 4, 8, 16):
        if not fits(spec, hw, setup_for(model_id, loss, seq, m, offload)):
            break
        best = m
    return best


def largest_context(spec, hw, model_id, loss, offload) -> int:
    lo, hi = 0, 1024
    while hi <= 262144 and fits(spec, hw, setup_for(model_id, loss, hi, 1, offload)):
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        if fits(spec, hw, setup_for(model_id, loss, mid, 1, offload)):
            lo = mid
        else:
            hi = mid
    return lo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="analytic tier for the peaks too")
    ap.add_argument("--gpu", default="RTX 4090")
    ap.add_argument("--all-offload", action="store_true", help="activation offloading rows for every loss path (default: trl_fused only)")
    args = ap.parse_args(argv)
    hw = parse_hardware(args.gpu)
    usable = hw.gpu.memory_gib * (1 - MARGIN)
    print(f"{hw.gpu.name} ({hw.gpu.memory_gib:g} GiB, {usable:.1f} usable); QLoRA nf4 r=16 all-linear, ckpt, paged_adamw_8bit, b=1")
    print(f"peaks: {'analytic' if args.fast else 'simulated'} tier; micro-batch / context: analytic")
    head = f"{'model':24s} {'seq':>6s} {'loss':9s} {'off':3s} {'total':>6s} " + " ".join(f"{c[:11]:>11s}" for c in COMPONENTS) + \
        f" {'fits':>4s} {'max b':>5s} {'max ctx':>7s} {'s':>5s}"
    print(head)
    for model_id in MODELS:
        spec = lookup_model(model_id, hub=False)
        for seq in SEQS:
            for loss in LOSS_IMPLS:
                for offload in (False, True):
                    if offload and loss != "trl_fused" and not args.all_offload:
                        continue  # the script's default loss with offloading; --all-offload for every path
                    t0 = time.perf_counter()
                    e = estimate(spec, setup_for(model_id, loss, seq, 1, offload), hw, fast=args.fast, advice=False)
                    secs = time.perf_counter() - t0
                    mb = largest_micro(spec, hw, model_id, loss, seq, offload)
                    ctx = largest_context(spec, hw, model_id, loss, offload) if seq == SEQS[0] else None
                    comps = " ".join(f"{e.breakdown.get(c, 0.0):11.2f}" for c in COMPONENTS)
                    print(f"{model_id:24s} {seq:6d} {loss:9s} {'yes' if offload else 'no':3s} {e.device_total_gib:6.2f} {comps} "
                          f"{'yes' if e.device_total_gib <= usable else 'no':>4s} {mb:5d} {ctx if ctx else '':>7} {secs:5.1f}",
                          flush=True)
    print("max ctx: the longest sequence (1k steps) that fits at micro-batch 1, shown on the seq-2048 rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
