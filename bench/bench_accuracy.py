"""Accuracy of tunepilot's memory estimate against published, measured peaks.

Reads bench/measurements.csv (each row: a fully stated setup, `extra` holding further TrainingSetup
fields as key=value;key=value, the quantity the source measured,
the source URL and where in it), estimates every row with the simulated tier and the analytic
tier, and prints the error of both next to two rules of thumb on the same rows:

- rule A "bytes per parameter": 16 B/param for full fine-tuning (mixed-precision Adam, ZeRO
  paper), 2 B/param + 20% for LoRA-style methods;
- rule B "GB per billion parameters" (LLaMA-Factory README hardware table, the commonly quoted
  one): full fine-tuning 18, LoRA 2, QLoRA 0.5 GB per billion parameters.

Each prediction is compared on the quantity the source measured: allocated, reserved or
nvidia-smi (device total; when the source measured its own CUDA context, that figure replaces
our context constant). 'unspecified' rows are compared with the device total. Rows with
grads_kept=true come from training loops that zero gradients in place (torch < 2.0's default
zero_grad(set_to_none=False)): they are estimated with every gradient allocated through the step.

    .venv/bin/python bench/bench_accuracy.py            # both tiers (the simulator takes a while)
    .venv/bin/python bench/bench_accuracy.py --fast     # analytic tier only
    .venv/bin/python bench/bench_accuracy.py --only sharded   # the ZeRO/FSDP/offload rows only

Single-GPU rows and sharded rows (ZeRO, FSDP, CPU offload: simulated per rank over a fake process
group, tools/memory/distributed.py) are summarised apart.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.schemas import BYTES_PER_GIB, TrainingSetup  # noqa: E402

# Configs of models that are not in the catalog, copied from their config.json on the Hub.
INLINE = {
    # https://huggingface.co/bert-large-uncased/blob/main/config.json
    "bert-large-uncased": {
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 16,
        "num_hidden_layers": 24, "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2,
        "vocab_size": 30522,
    },
    # Qwen v1 (remote code) shapes from Qwen/Qwen-1_8B and Qwen/Qwen-14B config.json, expressed as a
    # Qwen2 config (same widths, depth, heads, vocab, qkv bias, untied head; v1's fused c_attn = q,k,v).
    "qwen-1.8b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 5504,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
    },
    "qwen-14b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13696,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 152064,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
    },
    # Qwen-72B (v1, remote code) from Qwen/Qwen-72B config.json as a Qwen2 config: hidden 8192, 80 layers, 64 heads (no
    # GQA), vocab 152064, untied head, qkv bias; v1's intermediate_size 49152 is w1 + w2 together, so 24576 per branch
    # (the same halving as qwen-14b's 27392 -> 13696). Shapes as quoted for "qwen-72b" in the code corpus (hidden 8192,
    # 80 layers, 64/64 heads, intermediate 24576, vocab 152064); 72.3B parameters.
    "qwen-72b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 24576,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 152064,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
    },
    # https://huggingface.co/01-ai/Yi-34B/blob/main/config.json (Llama architecture; the shapes as quoted by
    # the Yi-1.5-34B copies in the code corpus: hidden 7168, MLP 20480, 60 layers, 56 heads / 8 KV, vocab 64000)
    "yi-34b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 7168, "intermediate_size": 20480,
        "num_hidden_layers": 60, "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 5000000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    },
    # IBM PowerLM-3b (GraniteForCausalLM; fms-acceleration's refs/a100_80gb_granite.csv). Shapes from the PowerLM paper
    # (arXiv 2408.13359, Table 4 'Hyperparameter for 1B and 3B models', as quoted in the code corpus): embedding size 2304,
    # 40 layers, head size 64, 36 attention heads, 36 KV heads, MLP hidden 9216 (swiglu), muP multipliers m_emb 12,
    # m_residual 0.22; '#Parameters 3.5B' -> tied embeddings (the meta count of this config: 3.51B; untied would be 3.62B).
    # vocab 49152 (the Granite/StarCoder tokenizer size; not in the table: assumed) and max positions 4096 (the table's
    # sequence length); attention_multiplier / logits_scaling do not change memory.
    "powerlm-3b": {
        "architectures": ["GraniteForCausalLM"], "model_type": "granite", "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 40, "num_attention_heads": 36, "num_key_value_heads": 36, "vocab_size": 49152,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "attention_multiplier": 0.015625, "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
        "torch_dtype": "bfloat16",
    },
    # https://huggingface.co/bigscience/bloomz-7b1/blob/main/config.json (BLOOM 7B1: hidden 4096, 30 layers, 32 heads, vocab
    # 250880, ALiBi, head tied to the embedding; n_layer/n_head written under their attribute_map names); the meta count of this config: 7.07B (bloomz-7b1 is published as 7B1).
    "bloomz-7b1": {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 30,
        "vocab_size": 250880, "layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "pretraining_tp": 1, "slow_but_exact": False, "torch_dtype": "float16",
    },
    # https://huggingface.co/bigcode/gpt_bigcode-santacoder/blob/main/config.json (SantaCoder in the GPTBigCode layout:
    # n_embd 2048, 24 layers, 16 heads with multi-query attention, n_inner 8192, vocab 49280, 2048 positions, head tied to
    # wte; written under the attribute_map names); published as 1.1B, the meta count of this config: 1.12B.
    "gpt_bigcode-santacoder": {
        "architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode", "hidden_size": 2048, "num_hidden_layers": 24,
        "num_attention_heads": 16, "n_inner": 8192, "vocab_size": 49280, "max_position_embeddings": 2048,
        "multi_query": True, "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
        "torch_dtype": "float32",
    },
}
CATALOG_STANDIN = {"qwen-7b": "Qwen/Qwen1.5-7B"}  # identical shapes to Qwen-7B (v1)

RULE_B_GB_PER_B = {"full": 18.0, "lora": 2.0, "dora": 2.0, "qlora": 0.5}

# Rows whose measured model layout tunepilot's stack (transformers 5) cannot build: printed, left out of every
# column's summary (the same rows for every tier). fms-acceleration's Mixtral QLoRA runs (2024, transformers 4.x)
# held each expert as an nn.Linear that bitsandbytes quantized; transformers 5 fuses the experts into 3-D
# parameters (MixtralExperts.gate_up_proj / down_proj) and `integrations.bitsandbytes.replace_with_bnb_linear`
# converts nn.Linear only, so under load_in_4bit the experts stay dense in the load dtype (here fp32):
# the dry run simulates that (~4x the measured weights), the measurement is of another model.
LAYOUT_DIFFERS = {
    "fms-mixtral-qlora-fsdp-b2": "experts bnb-quantized per nn.Linear in transformers 4.x; dense fused experts in transformers 5",
    "fms-mixtral-qlora-fsdp-b4": "experts bnb-quantized per nn.Linear in transformers 4.x; dense fused experts in transformers 5",
}


def load_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def model_for(ref: str):
    """ModelSpec for 'inline:NAME' (config above, exact count by meta instantiation) or a catalog id."""
    from tools.models import lookup_model, spec_from_config

    if ref.startswith("inline:"):
        name = ref.split(":", 1)[1]
        if name in CATALOG_STANDIN:
            return lookup_model(CATALOG_STANDIN[name], hub=False)
        return spec_from_config(dict(INLINE[name]), name, "bench-inline")
    return lookup_model(ref, hub=False)


def setup_for(row: dict, model_id: str) -> TrainingSetup:
    mp = row["mixed_precision"]
    ga = int(row["grad_accum"])
    if row.get("grads_kept") == "true" and ga == 1:
        # the source's loop zeroes gradients instead of freeing them (torch < 2.0 zero_grad(set_to_none=False),
        # which transformers <= 4.2x's Trainer called): from step 2 on every gradient is allocated through the
        # forward and backward, exactly the memory of a later micro-batch of an accumulation window
        ga = 2
    kw = dict(
        model_id=model_id, task=row["task"], method=row["method"], dtype=row["dtype"], bf16=mp == "bf16", fp16=mp == "fp16",
        optim=row["optim"], per_device_train_batch_size=int(row["batch"]), gradient_accumulation_steps=ga,
        max_length=int(row["seq_len"]), gradient_checkpointing=row["gradient_checkpointing"] == "true",
        attn_implementation=row["attn"], num_gpus=int(row["num_gpus"]),
    )
    if row["r"]:
        kw["r"] = int(row["r"])
    if row["lora_alpha"]:
        kw["lora_alpha"] = int(row["lora_alpha"])
    if row["target_modules"]:
        tm = row["target_modules"]
        kw["target_modules"] = tm if tm == "all-linear" else tm.split(";")
    if row["method"] == "qlora":
        kw["load_in_4bit"] = True
    for item in filter(None, (row.get("extra") or "").split(";")):
        key, value = item.split("=", 1)
        field = TrainingSetup.model_fields[key]
        kw[key] = type(field.default)(value) if isinstance(field.default, (int, float)) and not isinstance(field.default, bool) else value
    return TrainingSetup(**kw)


def predicted_gib(est, row: dict) -> float:
    """The estimate on the quantity the source measured."""
    q = row["quantity"]
    if q == "allocated":
        return est.peak_allocated_gib
    if q == "reserved":
        return est.peak_reserved_gib
    ctx = float(row["source_context_gib"]) if row["source_context_gib"] else est.breakdown.get("cuda_context", 0.0)
    return est.peak_reserved_gib + ctx + est.breakdown.get("nccl_buffers", 0.0)


def is_sharded(row: dict) -> bool:
    """A row measured under ZeRO/FSDP sharding or CPU offload (reported apart from single-GPU rows)."""
    extra = row.get("extra") or ""
    return any(k in extra for k in ("fsdp=", "zero_stage=", "offload="))


def rule_a(n_params: int, method: str) -> float:
    if method == "full":
        return 16.0 * n_params / BYTES_PER_GIB
    return 2.0 * n_params * 1.2 / BYTES_PER_GIB


def rule_b(n_params: int, method: str) -> float:
    return RULE_B_GB_PER_B.get(method, 2.0) * n_params / 1e9 * 1e9 / BYTES_PER_GIB


def pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def summary(errors: list[float]) -> str:
    if not errors:
        return "-"
    a = sorted(abs(e) for e in errors)
    p90 = a[min(len(a) - 1, int(round(0.9 * (len(a) - 1))))]
    return f"median {statistics.median(a):5.1f}%  p90 {p90:5.1f}%  (n={len(a)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_name("measurements.csv"))
    ap.add_argument("--fast", action="store_true", help="analytic tier only (no simulator)")
    ap.add_argument("--only", choices=("all", "single", "sharded"), default="all",
                    help="rows to run: single-GPU (one replica), sharded (ZeRO/FSDP/offload), or all")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from tools.estimator import estimate

    rows = load_rows(args.csv)
    if args.only != "all":
        rows = [r for r in rows if is_sharded(r) == (args.only == "sharded")]
    cols = ["simulated", "analytic", "rule A", "rule B"]
    errs: dict[str, dict[str, list[float]]] = {c: {} for c in cols}
    print(f"{'row':30s} {'qty':12s} {'measured':>9s} {'simulated':>15s} {'analytic':>15s} {'rule A':>15s} {'rule B':>15s}")
    t0 = time.perf_counter()
    for row in rows:
        spec = model_for(row["config"])
        st = setup_for(row, spec.model_id)
        meas = float(row["measured_gib"])
        preds: dict[str, float | None] = {}
        preds["simulated"] = None if args.fast else predicted_gib(estimate(spec, st, advice=False), row)
        est_a = estimate(spec, st, fast=True, advice=False)
        preds["analytic"] = predicted_gib(est_a, row)
        # the rules of thumb for a sharded run: the per-model figure divided by the GPUs (what people do)
        n = int(row["num_gpus"]) if is_sharded(row) else 1
        preds["rule A"] = rule_a(spec.num_parameters, row["method"]) / n
        preds["rule B"] = rule_b(spec.num_parameters, row["method"]) / n
        cells = []
        skipped = LAYOUT_DIFFERS.get(row["id"])
        for c in cols:
            p = preds[c]
            if p is None:
                cells.append(f"{'-':>15s}")
                continue
            e = pct(p, meas)
            if skipped:
                cells.append(f"{p:7.2f} {e:+6.1f}%")
                continue
            group = "sharded" if is_sharded(row) else "single"
            errs[c].setdefault(row["method"], []).append(e)
            errs[c].setdefault("all", []).append(e)
            errs[c].setdefault(f"[{group}]", []).append(e)
            cells.append(f"{p:7.2f} {e:+6.1f}%")
        print(f"{row['id']:30s} {row['quantity']:12s} {meas:9.2f} " + " ".join(cells)
              + (f"   (not summarised: {skipped})" if skipped else ""), flush=True)
    n_sum = sum(1 for r in rows if r["id"] not in LAYOUT_DIFFERS)
    print(f"\nabsolute error on {n_sum} published measurements (GiB; {time.perf_counter() - t0:.0f} s)"
          + (f"; {len(rows) - n_sum} rows of another model layout not summarised" if n_sum != len(rows) else ""))
    for c in cols:
        for method, e in sorted(errs[c].items()):
            if not method.startswith("["):
                print(f"  {c:10s} {method:9s} {summary(e)}")
    for group in ("single", "sharded"):
        print(f"\n{group}-GPU rows" if group == "single" else "\nsharded rows (ZeRO / FSDP / CPU offload; rules of thumb divided by the GPUs)")
        for c in cols:
            print(f"  {c:10s} {summary(errs[c].get(f'[{group}]', []))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
