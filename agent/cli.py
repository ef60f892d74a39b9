"""`tunepilot` command line: every subcommand. Front end only: parse, call tools, render.

Heavy libraries (torch, transformers, langchain) are imported inside the commands that
need them, so `tunepilot --help` and catalog look-ups start fast.
Errors meant for people (TunepilotError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from tools.schemas import TunepilotError

class _Commands(TyperGroup):
    """The command group; a bare `--fsdp` (no mode after it) means `--fsdp full_shard`, as it always has."""

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        out: list[str] = []
        for i, a in enumerate(rest):
            out.append(a)
            if a == "--fsdp" and (i + 1 == len(rest) or rest[i + 1] not in _FSDP_MODES):
                out.append("full_shard")
        return name, cmd, out


_FSDP_MODES = ("full_shard", "shard_grad_op", "none")

app = typer.Typer(
    cls=_Commands,
    name="tunepilot",
    help="How should I fine-tune model X on my hardware? Estimate, plan, script and trial-run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear line and exit (no traceback)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def progress_line(json_out: bool = False):
    """A context that shows the engine's progress (tools.progress) as one status line on stderr.

    Only on a terminal, never with --json (TUNEPILOT_PROGRESS=0 turns it off). The line is redrawn
    when the engine reports, without a refresh thread: the simulator forks its second dry run only
    in a single-threaded process."""
    from contextlib import nullcontext

    from tools import progress

    if json_out or not err_console.is_terminal or os.environ.get("TUNEPILOT_PROGRESS", "1") == "0":
        return nullcontext()
    from contextlib import contextmanager

    @contextmanager
    def _live():
        import time

        from rich.live import Live
        from rich.text import Text

        start = time.monotonic()
        with Live(Text(""), console=err_console, auto_refresh=False, transient=True, redirect_stdout=False,
                  redirect_stderr=False) as live:
            def show(line):
                if line is None:
                    live.update(Text(""), refresh=True)
                else:
                    live.update(Text.assemble(("⏳ ", "cyan"), line, (f"  {time.monotonic() - start:.0f}s", "dim")),
                                refresh=True)

            with progress.use(show):
                yield

    return _live()


def write_plot(kind: str, obj, path: Path, *, json_out: bool = False, **kw) -> None:
    """Draw `obj` (estimate | plan | fit map) to `path`; one line saying where (on stderr with --json)."""
    from tools import plots

    draw = {"estimate": plots.estimate_chart, "plan": plots.plan_chart, "sweep": plots.fit_map_chart}[kind]
    try:
        written = draw(obj, path, **kw)
    except TunepilotError as e:
        fail(str(e))
    (err_console if json_out else console).print(f"[green]wrote[/] {written}", highlight=False, soft_wrap=True)


def print_json(obj) -> None:
    """Machine output: plain JSON on stdout, nothing else."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("tunepilot")
        except PackageNotFoundError:  # running from a checkout without install
            v = "0.1.0"
        typer.echo(f"tunepilot {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
) -> None:
    """tunepilot: plan, estimate, script and trial-run LLM fine-tuning."""


# ---------------------------------------------------------------------------------------
# Foundation (issue 2): models, model, gpus
# ---------------------------------------------------------------------------------------

@app.command()
def models(query: Optional[str] = typer.Argument(None, help="Filter by substring of the id or family."),
           json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the bundled model catalog."""
    from rich.table import Table

    from tools.models import search_catalog

    try:
        found = search_catalog(query or "")
    except TunepilotError as e:
        fail(str(e))
    if json_out:
        print_json([m.model_dump(mode="json", exclude={"config"}) for m in found])
        return
    if not found:
        fail(f"no catalog model matches {query!r}; run `tunepilot models` for the full list, or `tunepilot model HUB_ID` for any Hub model")
    from rich import box

    table = Table(title=f"Model catalog ({len(found)} models)" + (f" matching {query!r}" if query else ""),
                  box=box.SIMPLE_HEAD, caption="architecture: transformers class without 'ForCausalLM'")
    for col, justify in (("id", "left"), ("architecture", "left"), ("params B", "right"), ("layers", "right"),
                         ("hidden", "right"), ("heads/kv", "right"), ("context", "right"), ("MoE", "left")):
        table.add_column(col, justify=justify, no_wrap=col == "id")
    for m in found:
        moe = f"{m.num_experts}x{m.num_experts_per_tok}" if m.is_moe else ""
        ctx = f"{m.max_position_embeddings:,}" if m.max_position_embeddings else "-"
        arch = m.architecture.removesuffix("ForCausalLM")
        table.add_row(m.model_id, arch, f"{m.num_parameters / 1e9:.2f}", str(m.num_hidden_layers),
                      str(m.hidden_size), f"{m.num_attention_heads}/{m.num_key_value_heads}", ctx, moe)
    console.print(table)


@app.command()
def model(model_id: str = typer.Argument(..., help="Hub id, catalog name or local path (config.json or model dir)."),
          json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show one model's architecture and exact parameter count."""
    from rich.table import Table

    from tools.models import lookup_model
    from tools.schemas import ModelSpec

    try:
        spec = lookup_model(model_id)
    except TunepilotError as e:
        fail(str(e))
    if json_out:
        print_json(spec)
        return
    table = Table(title=spec.model_id, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, field in ModelSpec.model_fields.items():
        if name == "config":
            continue
        value = getattr(spec, name)
        if name == "num_parameters":
            value = f"{value:,} ({value / 1e9:.2f} B)"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(name, "-" if value is None else str(value))
    console.print(table)


@app.command()
def gpus(json_out: bool = typer.Option(False, "--json", help="Print JSON."),
         local: bool = typer.Option(False, "--local", help="Detect the GPUs of this machine instead of listing the catalog.")) -> None:
    """List the GPU catalog, or detect local GPUs."""
    from rich.table import Table

    from tools.gpus import detect_hardware, gpu_catalog

    def fmt(x, spec: str = "g") -> str:
        return "-" if x is None else format(x, spec)

    if local:
        try:
            hw = detect_hardware()
        except TunepilotError as e:
            fail(str(e))
        if json_out:
            print_json(hw)
            return
        table = Table(title="GPUs on this machine")
        for col in ("GPUs", "GPU", "memory GiB", "free GiB", "bf16", "bf16/fp16 TFLOPs", "host RAM GiB"):
            table.add_column(col)
        free = ", ".join(f"{f:.1f}" for f in hw.free_memory_gib) if hw.free_memory_gib else "-"
        g = hw.gpu
        table.add_row(str(hw.num_gpus), g.name, f"{g.memory_gib:.2f}", free, "yes" if g.bf16 else "no",
                      f"{fmt(g.bf16_tflops)}/{fmt(g.fp16_tflops)}", fmt(hw.host_ram_gib, ".1f"))
        console.print(table)
        return

    try:
        catalog = sorted(gpu_catalog(), key=lambda g: (-g.memory_gib, g.name))
    except TunepilotError as e:
        fail(str(e))
    if json_out:
        print_json([g.model_dump(mode="json") for g in catalog])
        return
    table = Table(title=f"GPU catalog: {len(catalog)} GPUs", caption="GiB: total as nvidia-smi shows it; TFLOPs: dense bf16/fp16 tensor "
                  "(FP32 accumulate); GB/s: memory bandwidth; CC: compute capability. Sources: --json")
    for col, justify in (("GPU", "left"), ("GiB", "right"), ("bf16", "center"), ("TFLOPs", "right"), ("GB/s", "right"), ("CC", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for g in catalog:
        table.add_row(g.name, f"{g.memory_gib:.2f}", "yes" if g.bf16 else "no", f"{fmt(g.bf16_tflops)}/{fmt(g.fp16_tflops)}",
                      fmt(g.memory_bandwidth_gbs), g.compute_capability or "-")
    console.print(table)


def _refuse_beyond_context(spec, seq_len: Optional[int]) -> None:
    """A sequence longer than the model's context (config max_position_embeddings) is refused, in one line."""
    limit = getattr(spec, "max_position_embeddings", None)
    if seq_len and limit and seq_len > limit:
        fail(f"--seq-len {seq_len} is longer than {spec.model_id}'s context of {limit:,} tokens: "
             f"use --seq-len {limit} or less (or a model with a longer context)")


# ---------------------------------------------------------------------------------------
# Memory engine (issue 3): estimate
# ---------------------------------------------------------------------------------------

@app.command()
def estimate(
    model_ref: str = typer.Argument(..., metavar="MODEL", help="Hub id, catalog name or local path (config.json or model dir)."),
    setup_file: Optional[Path] = typer.Option(None, "--setup", help="Setup file (YAML/JSON) to start from; flags override it."),
    ds_config: Optional[Path] = typer.Option(None, "--ds-config", help="DeepSpeed JSON of the run (stage, offload, bucket sizes, sub_group_size, precision, micro-batch); over --setup, under the flags."),
    method: Optional[str] = typer.Option(None, "--method", help="full | lora | qlora | dora | ia3 | prompt-tuning | prefix-tuning | p-tuning."),
    r: Optional[int] = typer.Option(None, "--r", help="LoRA rank."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha."),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help="all-linear, or module names separated by commas (q_proj,v_proj)."),
    batch: Optional[int] = typer.Option(None, "--per-device-train-batch-size", "--batch-size", help="Micro-batch per GPU."),
    seq: Optional[int] = typer.Option(None, "--max-seq-length", "--seq-len", help="Tokens per sequence."),
    ckpt: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward (default on)."),
    optim: Optional[str] = typer.Option(None, "--optim", help="Optimizer, e.g. adamw_torch_fused, paged_adamw_8bit, adafactor, sgd."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Load dtype of the weights: fp32 | bf16 | fp16."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp16", help="Mixed precision: bf16 (Ampere+) or fp16 (T4, V100)."),
    attn: Optional[str] = typer.Option(None, "--attn-implementation", help="sdpa | flash_attention_2 | eager."),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help="GPUs in total."),
    zero: Optional[int] = typer.Option(None, "--zero", help="DeepSpeed ZeRO stage 0-3."),
    fsdp: Optional[str] = typer.Option(None, "--fsdp", metavar="[full_shard|shard_grad_op]",
                                       help="PyTorch FSDP: full_shard (like ZeRO-3; what a bare --fsdp means) or shard_grad_op (like ZeRO-2)."),
    fsdp_version: Optional[int] = typer.Option(None, "--fsdp-version", help="FSDP implementation: 2 (FSDP2, default) or 1 (FSDP1, flat parameters)."),
    no_mixed_precision: bool = typer.Option(False, "--no-mixed-precision", help="Pure precision: train in the load dtype (--dtype fp32 or bf16), no autocast (bf16 = fp16 = false)."),
    offload: Optional[str] = typer.Option(None, "--offload", help="none | optimizer | all (CPU offload with ZeRO/FSDP)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU to check against, e.g. '4090', 'A100 80GB', '2x H100'."),
    fast: bool = typer.Option(False, "--fast", help="Closed-form analytic tier (instant, ~10%) instead of the dry run."),
    host_ram: Optional[float] = typer.Option(None, "--host-ram", help="Host RAM per node in GiB to check loading and offload against (e.g. 12 for a free Colab)."),
    local: bool = typer.Option(False, "--local", help="Check against this machine: its GPUs and its host RAM (/proc/meminfo)."),
    dataset_tokens: Optional[int] = typer.Option(None, "--dataset-tokens", help="Training tokens per epoch (sizes the tokenized dataset's page cache)."),
    json_out: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Also draw the per-GPU breakdown as a stacked bar (FILE.png or FILE.svg; needs matplotlib)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="sft | dpo | kto | reward | grpo (trl's trainer; default sft)."),
    ref_model: Optional[str] = typer.Option(None, "--ref-model", help="DPO/KTO/GRPO reference: auto | copy | peft_base."),
    precompute_ref: Optional[bool] = typer.Option(None, "--precompute-ref-log-probs/--no-precompute-ref-log-probs", help="DPO/KTO: reference log-probs computed once before training."),
    beta: Optional[float] = typer.Option(None, "--beta", help="trl beta (DPO/KTO default 0.1; GRPO 0.0 = no reference model)."),
    num_generations: Optional[int] = typer.Option(None, "--num-generations", help="GRPO: completions per prompt (default 8)."),
    max_completion_length: Optional[int] = typer.Option(None, "--max-completion-length", help="GRPO: longest completion, tokens (default 512)."),
    use_vllm: Optional[bool] = typer.Option(None, "--use-vllm/--no-vllm", help="GRPO: generate with vLLM."),
    vllm_mode: Optional[str] = typer.Option(None, "--vllm-mode", help="GRPO: colocate | server."),
    vllm_util: Optional[float] = typer.Option(None, "--vllm-gpu-memory-utilization", help="GRPO, colocated vLLM: fraction of each GPU vLLM takes (default 0.3)."),
    loss_impl: Optional[str] = typer.Option(None, "--loss-impl", help="Loss path: trl_fused (SFTTrainer default) | hf | liger | cce."),
    act_offload: Optional[bool] = typer.Option(None, "--activation-offloading/--no-activation-offloading", help="trl's activation offloading (saved activations to host RAM)."),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="trl's padding-free packing (the batch as one packed row)."),
    liger: Optional[bool] = typer.Option(None, "--liger-kernels/--no-liger-kernels", help="Liger's RMSNorm/RoPE/SwiGLU kernels (use_liger_kernel)."),
    torch_compile: Optional[bool] = typer.Option(None, "--torch-compile/--no-torch-compile", help="TrainingArguments.torch_compile: Inductor fuses elementwise/norm chains (changes the time, not the memory model)."),
    reentrant: Optional[bool] = typer.Option(None, "--reentrant-checkpointing/--no-reentrant-checkpointing", help="gradient_checkpointing_kwargs use_reentrant=True (transformers 4.35-4.5x's default): the whole block is recomputed."),
) -> None:
    """Estimate per-GPU training memory of a setup (simulated dry run, or --fast analytic)."""
    from pydantic import ValidationError

    from tools.schemas import TrainingSetup, format_validation_error

    notes: list[str] = []
    switched_fp16 = False
    if fsdp is not None and fsdp not in _FSDP_MODES:
        fail(f"--fsdp: {fsdp!r} is not an FSDP mode; use full_shard (like ZeRO-3) or shard_grad_op (like ZeRO-2)")
    if fsdp_version is not None and fsdp_version not in (1, 2):
        fail(f"--fsdp-version: {fsdp_version} is not an FSDP version; use 2 (FSDP2) or 1 (FSDP1)")
    if fsdp not in (None, "none") and zero:
        fail("--zero/--fsdp: use DeepSpeed ZeRO or FSDP, not both")
    if no_mixed_precision and bf16 is not None:
        fail("--no-mixed-precision/--bf16/--fp16: choose mixed precision (--bf16 or --fp16) or none (--no-mixed-precision)")
    if zero is not None and zero not in (0, 1, 2, 3):
        fail(f"--zero: {zero} is not a ZeRO stage; use 0, 1, 2 or 3")
    for name, value in (("--num-gpus", num_gpus), ("--per-device-train-batch-size", batch), ("--max-seq-length", seq), ("--r", r),
                        ("--dataset-tokens", dataset_tokens)):
        if value is not None and value < 1:
            fail(f"{name}: must be at least 1, got {value}")
    if host_ram is not None and host_ram <= 0:
        fail(f"--host-ram: must be a positive number of GiB, got {host_ram:g}")
    if gpu and local:
        fail("give either --gpu SPEC or --local, not both")
    try:
        from tools.models import lookup_model

        spec = lookup_model(model_ref)
        hardware = None
        if gpu:
            from tools.gpus import parse_hardware

            hardware = parse_hardware(gpu)
        elif local:
            from tools.gpus import NoGPUError, detect_hardware, host_ram_gib

            try:
                hardware = detect_hardware()
            except NoGPUError:
                ram = host_ram_gib()
                if host_ram is None and ram:
                    host_ram = ram
                notes.append(f"--local: no GPU on this machine; host RAM checked against its {ram:.1f} GiB")
        if hardware is not None and host_ram is not None:
            hardware = hardware.model_copy(update={"host_ram_gib": host_ram})
        data: dict = {}
        if setup_file is not None:
            data = TrainingSetup.load(setup_file).model_dump(exclude_unset=False)
        if ds_config is not None:
            from tools.dsconfig import setup_fields

            ds_fields, ds_notes = setup_fields(ds_config)
            if data.get("fsdp", "none") != "none" or fsdp not in (None, "none"):
                fail("--ds-config/--fsdp: a DeepSpeed config and FSDP exclude each other; drop one")
            data.update(ds_fields)
            notes.extend(ds_notes)
        data["model_id"] = spec.model_id
        given = {
            "method": method, "r": r, "lora_alpha": lora_alpha, "per_device_train_batch_size": batch, "max_length": seq,
            "gradient_checkpointing": ckpt, "optim": optim, "dtype": dtype, "attn_implementation": attn,
            "num_gpus": num_gpus, "zero_stage": zero, "offload": offload,
            "loss_impl": loss_impl, "activation_offloading": act_offload, "packing": packing, "use_liger_kernel": liger,
            "torch_compile": torch_compile, "reentrant_checkpointing": reentrant,
        }
        from tools.schemas import LOSS_IMPLS

        if loss_impl is not None and loss_impl not in LOSS_IMPLS:
            fail(f"--loss-impl: {loss_impl!r} is not a loss path; use one of {', '.join(LOSS_IMPLS)}")
        data.update({k: v for k, v in given.items() if v is not None})
        data.update(_objective_flags(objective, ref_model, precompute_ref, beta, num_generations, max_completion_length,
                                     use_vllm, vllm_mode, vllm_util))
        if target_modules is not None:
            tm = target_modules.strip()
            data["target_modules"] = "all-linear" if tm == "all-linear" else [x.strip() for x in tm.split(",") if x.strip()]
        if fsdp is not None:
            data["fsdp"] = fsdp
        if fsdp_version is not None:
            data["fsdp_version"] = fsdp_version
        if bf16 is not None:
            data["bf16"], data["fp16"] = bf16, not bf16
        if no_mixed_precision:
            data["bf16"], data["fp16"] = False, False
        if hardware is not None and num_gpus is None and setup_file is None and hardware.num_gpus > 1:
            data["num_gpus"] = hardware.num_gpus
        if hardware is not None and not hardware.gpu.bf16 and bf16 is None and not no_mixed_precision and data.get("bf16", True):
            data["bf16"], data["fp16"] = False, True
            if data.get("dtype", "bf16") == "bf16":
                data["dtype"] = "fp16"
            notes.append(f"{hardware.gpu.name} has no bf16: using fp16 mixed precision (pass --bf16 to override)")
            switched_fp16 = True
        m = data.get("method", "lora")
        if m == "qlora":
            data["load_in_4bit"] = True
            if setup_file is None or bf16 is not None or method is not None or switched_fp16:
                # the 4-bit matmuls run in the mixed-precision dtype
                if data.get("bf16", True) or data.get("fp16"):
                    data["bnb_4bit_compute_dtype"] = "fp16" if data.get("fp16") else "bf16"
                else:
                    data["bnb_4bit_compute_dtype"] = data.get("dtype", "bf16")
            sharded_params = data.get("fsdp", "none") != "none" or data.get("zero_stage") == 3
            if sharded_params and data.get("bnb_4bit_quant_storage", "uint8") == "uint8" and (setup_file is None or fsdp is not None or zero is not None):
                # FSDP-QLoRA / ZeRO-3: only 4-bit weights stored in a float dtype can be sharded
                # (accelerate leaves uint8 ones whole on every GPU)
                data["bnb_4bit_quant_storage"] = data.get("bnb_4bit_compute_dtype", "bf16")
                notes.append(f"QLoRA under {'FSDP' if data.get('fsdp', 'none') != 'none' else 'ZeRO-3'}: 4-bit weights stored as "
                             f"{data['bnb_4bit_quant_storage']} (bnb_4bit_quant_storage) so they can be sharded")
        elif m != "qlora" and method is not None:
            data["load_in_4bit"] = False
        if m == "dora":
            data["use_dora"] = True
        setup = TrainingSetup.model_validate(data)
        _refuse_beyond_context(spec, setup.max_length)
        from tools.estimator import estimate as run_estimate

        if plot is not None:
            from tools.plots import _check_path

            _check_path(plot)  # a bad --plot fails before the dry run, not after
        with progress_line(json_out):
            est = run_estimate(spec, setup, hardware, fast=fast, host_ram_gib=host_ram, dataset_tokens=dataset_tokens)
    except TunepilotError as e:
        fail(str(e))
    except ValidationError as e:
        fail(format_validation_error(e))
    est.provenance = notes + est.provenance

    if json_out:
        print_json(est)
        if plot is not None:
            write_plot("estimate", est, plot, json_out=True)
        return

    from rich import box
    from rich.table import Table

    for n in notes:
        err_console.print(f"note: {n}", highlight=False, soft_wrap=True)
    console.print(f"[bold]{est.model_id}[/]", highlight=False)
    console.print(est.setup_summary, highlight=False)
    if est.loss_impl:
        from tools.schemas import LOSS_IMPL_LABELS

        console.print(f"loss path: {est.loss_impl} ({LOSS_IMPL_LABELS.get(est.loss_impl, est.loss_impl)})", highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, caption=f"per GPU, {est.tier} tier (±{est.uncertainty.pct:g}%)")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("%", justify="right")
    total = est.device_total_gib or 1.0
    for k, v in sorted(est.breakdown.items(), key=lambda kv: -kv[1]):
        table.add_row(k, f"{v:.2f}", f"{100 * v / total:.0f}")
    console.print(table)
    console.print(f"parameters {est.num_parameters:,} (trainable {est.trainable_parameters:,})", highlight=False)
    console.print(f"peak allocated {est.peak_allocated_gib:.2f} GiB | peak reserved {est.peak_reserved_gib:.2f} GiB",
                  highlight=False)
    console.print(f"device total (nvidia-smi) {est.device_total_gib:.2f} GiB "
                  f"[{est.uncertainty.low_gib:.1f}-{est.uncertainty.high_gib:.1f}]", highlight=False)
    if est.host_ram_gib:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(est.host_breakdown.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        line = (f"host RAM per node {est.host_ram_gib:.1f} GiB at {est.host_phase} ({parts}) "
                f"+ {est.host_page_cache_gib:.1f} GiB reclaimable page cache")
        if est.host_fits is not None:
            line += (f"; [bold green]fits[/] the host's {est.host_ram_available_gib:g} GiB" if est.host_fits
                     else f"; [bold red]does not fit[/] the host's {est.host_ram_available_gib:g} GiB")
        console.print(line, highlight=False)
    if est.fits is not None:
        verdict = "[bold green]fits[/]" if est.fits else "[bold red]does not fit[/]"
        console.print(f"{est.gpu} ({est.gpu_memory_gib:g} GiB): {verdict}, headroom {est.headroom_gib:+.2f} GiB", highlight=False)
    if est.tokens_per_second:
        # issue 14: step time from the op trace (or the flat-factor fallback of the analytic tier)
        phases = ""
        if est.time_breakdown:
            ph = est.time_breakdown.get("by_phase", {})
            phases = " (" + ", ".join(f"{k} {v:.3g} s" for k, v in ph.items() if v > 0) + ")"
        cal = ", calibrated by trial runs" if est.time_calibrated else ""
        console.print(f"time: {est.step_seconds:.3g} s per optimizer step{phases}, {est.tokens_per_second:,.0f} tokens/s "
                      f"({est.time_model}{cal})", highlight=False, markup=False)
    if est.advice:
        console.print(est.advice, highlight=False)
    if plot is not None:
        write_plot("estimate", est, plot)


# ---------------------------------------------------------------------------------------
# Planner (issue 4): plan
# ---------------------------------------------------------------------------------------

@app.command()
def plan(
    model_ref: str = typer.Argument(..., metavar="MODEL", help="Hub id, catalog name or local path (config.json or model dir)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Hardware, e.g. '4090', '2x A100 80GB', '24GB'."),
    local: bool = typer.Option(False, "--local", help="Plan for the GPUs of this machine."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per training sequence."),
    dataset_tokens: Optional[int] = typer.Option(None, "--dataset-tokens", help="Training tokens per epoch (for time and cost)."),
    dataset_examples: Optional[int] = typer.Option(None, "--dataset-examples", help="Training examples per epoch (tokens = examples x seq-len)."),
    effective_batch: int = typer.Option(16, "--effective-batch", help="Sequences per optimizer step across GPUs (micro-batch x accumulation x GPUs)."),
    method: str = typer.Option("auto", "--method", help="auto | full | lora | qlora."),
    price_per_gpu_hour: Optional[float] = typer.Option(None, "--price-per-gpu-hour", help="Price of one GPU-hour, for cost."),
    top: int = typer.Option(5, "--top", help="Candidates to show."),
    quality: str = typer.Option("balanced", "--quality", help="speed | balanced | quality: how much time to trade for full > LoRA > QLoRA and larger r."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the dataset."),
    fast: bool = typer.Option(False, "--fast", help="Skip the simulator confirmation (analytic estimates only)."),
    host_ram: Optional[float] = typer.Option(None, "--host-ram", help="Host RAM per node in GiB (overrides what --local detects); setups that need more are rejected."),
    fsdp: Optional[str] = typer.Option(None, "--fsdp", metavar="[full_shard|shard_grad_op]",
                                       help="Multi-GPU: plan only FSDP with this sharding (a bare --fsdp means full_shard)."),
    fsdp_version: int = typer.Option(2, "--fsdp-version", help="FSDP implementation of FSDP candidates: 2 (FSDP2) or 1 (FSDP1)."),
    no_mixed_precision: bool = typer.Option(False, "--no-mixed-precision", help="Pure-precision training (bf16 weights where the GPU has it, else fp32; no autocast)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the winning setup here (YAML, or JSON for a .json suffix)."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Also draw the candidates as memory per GPU against time to train (FILE.png or FILE.svg; needs matplotlib)."),
    objective: str = typer.Option("sft", "--objective", help="sft | dpo | kto | reward | grpo: kept by every candidate."),
    ref_model: Optional[str] = typer.Option(None, "--ref-model", help="DPO/KTO/GRPO reference: auto | copy | peft_base."),
    precompute_ref: Optional[bool] = typer.Option(None, "--precompute-ref-log-probs/--no-precompute-ref-log-probs", help="DPO/KTO: fix it (default: the planner may turn it on to fit)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="trl beta (DPO/KTO default 0.1; GRPO 0.0 = no reference model)."),
    num_generations: Optional[int] = typer.Option(None, "--num-generations", help="GRPO: completions per prompt (default 8)."),
    max_completion_length: Optional[int] = typer.Option(None, "--max-completion-length", help="GRPO: longest completion, tokens (default 512)."),
    use_vllm: Optional[bool] = typer.Option(None, "--use-vllm/--no-vllm", help="GRPO: generate with vLLM."),
    vllm_mode: Optional[str] = typer.Option(None, "--vllm-mode", help="GRPO: colocate | server."),
    vllm_util: Optional[float] = typer.Option(None, "--vllm-gpu-memory-utilization", help="GRPO, colocated vLLM: fix vLLM's fraction (default: 0.3, lowered to fit)."),
) -> None:
    """Search the best setup that fits the hardware, ranked by time to train."""
    from pydantic import ValidationError

    from tools.gpus import detect_hardware, parse_hardware
    from tools.models import lookup_model
    from tools.planner import plan as make_plan
    from tools.schemas import PlanGoals, format_validation_error

    if gpu and local:
        fail("give either --gpu SPEC or --local, not both")
    if not gpu and not local:
        fail("which GPUs? give --gpu SPEC (e.g. --gpu 4090, --gpu '2x A100 80GB') or --local to detect this machine's")
    if dataset_tokens is not None and dataset_examples is not None:
        fail("give either --dataset-tokens or --dataset-examples, not both")
    if host_ram is not None and host_ram <= 0:
        fail(f"--host-ram: must be a positive number of GiB, got {host_ram:g}")
    if fsdp is not None and fsdp not in _FSDP_MODES:
        fail(f"--fsdp: {fsdp!r} is not an FSDP mode; use full_shard (like ZeRO-3) or shard_grad_op (like ZeRO-2)")
    if fsdp_version not in (1, 2):
        fail(f"--fsdp-version: {fsdp_version} is not an FSDP version; use 2 (FSDP2) or 1 (FSDP1)")
    try:
        goals = PlanGoals(
            fsdp=fsdp, fsdp_version=fsdp_version, mixed_precision=not no_mixed_precision,
            seq_len=seq_len, dataset_tokens=dataset_tokens, dataset_examples=dataset_examples,
            effective_batch=effective_batch, method=method, num_train_epochs=epochs,
            price_per_gpu_hour=price_per_gpu_hour, quality=quality, top=top, confirm=not fast,
            **_plan_objective(objective, ref_model, precompute_ref, beta, num_generations, max_completion_length,
                              use_vllm, vllm_mode, vllm_util),
        )
    except ValidationError as e:
        fail(format_validation_error(e).replace("invalid setup:", "invalid plan goals:", 1))
    try:
        hardware = detect_hardware() if local else parse_hardware(gpu)
        if host_ram is not None:
            hardware = hardware.model_copy(update={"host_ram_gib": host_ram})
        spec = lookup_model(model_ref)
        _refuse_beyond_context(spec, seq_len)
        if plot is not None:
            from tools.plots import _check_path

            _check_path(plot)
        with progress_line(json_out):
            result = make_plan(spec, hardware, goals)
    except TunepilotError as e:
        fail(str(e))
    except ValidationError as e:
        fail(format_validation_error(e))

    written: Optional[Path] = None
    if output is not None and result.best is not None:
        try:
            written = result.best.setup.save(output)
        except OSError as e:
            fail(f"-o {output}: cannot write the setup ({e.strerror or e})")
    if json_out:
        print_json(result)
        if plot is not None and result.candidates:
            write_plot("plan", result, plot, json_out=True, safety_margin=goals.safety_margin)
        return

    from rich import box
    from rich.table import Table

    from tools.labels import label, labels

    def hours(h: Optional[float]) -> str:
        if h is None:
            return "-"
        return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"

    title = f"{result.model_id} on {result.hardware}"
    # Short labels keep one setup per line at 80 columns: what every candidate shares goes in the
    # caption, and the full descriptions follow the table.
    short, shared = labels([c.setup for c in result.candidates])
    every = f"; every setup: {' '.join(shared)}" if shared else ""
    if result.fits:
        with_cost = any(c.throughput.cost is not None for c in result.candidates)
        # time per epoch apart only when there is more than one epoch (otherwise "time" is one epoch)
        with_epoch = any(c.throughput.time_per_epoch_hours is not None and c.throughput.total_hours is not None
                         and abs(c.throughput.total_hours - c.throughput.time_per_epoch_hours) > 1e-9 for c in result.candidates)
        table = Table(title=f"Plan: {title}", box=box.SIMPLE_HEAD, title_justify="left",
                      caption=f"GiB/GPU: device total (nvidia-smi); * = simulated{every}", caption_justify="left")
        cols = [("#", "right"), ("setup", "left"), ("GiB/GPU", "right"), ("spare", "right"), ("tok/s", "right")]
        cols += ([("epoch", "right")] if with_epoch else []) + [("time", "right")]
        for col, justify in cols + ([("cost", "right")] if with_cost else []):
            table.add_column(col, justify=justify, no_wrap=col != "setup")
        for i, c in enumerate(result.candidates, 1):
            est, thr = c.estimate, c.throughput
            mark = "*" if est.tier == "simulated" else ""
            headroom = est.headroom_gib if est.headroom_gib is not None else (est.gpu_memory_gib or 0) - est.device_total_gib
            row = [str(i), short[i - 1], f"{est.device_total_gib:.1f}{mark}", f"{headroom:.1f}",
                   f"{thr.tokens_per_second:,.0f}"]
            row += ([hours(thr.time_per_epoch_hours)] if with_epoch else []) + [hours(thr.total_hours)]
            if with_cost:
                row.append("-" if thr.cost is None else f"${thr.cost:,.2f}" if thr.cost < 100 else f"${thr.cost:,.0f}")
            table.add_row(*row)
        console.print(table)
    else:
        console.print(f"[bold red]Nothing fits[/]: {title}.", highlight=False)
        if result.candidates:
            table = Table(title="Closest setups (do not fit)", box=box.SIMPLE_HEAD, title_justify="left",
                          caption=f"GiB/GPU: device total (nvidia-smi){every}" if every else None, caption_justify="left")
            for col in ("#", "setup", "GiB/GPU", "GPU GiB"):
                table.add_column(col, no_wrap=col != "setup", justify="left" if col == "setup" else "right")
            for i, c in enumerate(result.candidates, 1):
                table.add_row(str(i), short[i - 1], f"{c.estimate.device_total_gib:.1f}",
                              f"{c.estimate.gpu_memory_gib or 0:g}")
            console.print(table)
    if result.candidates:
        details = Table.grid(padding=(0, 1))
        details.add_column(style="dim", no_wrap=True)
        details.add_column()
        for i, c in enumerate(result.candidates, 1):
            details.add_row(f"#{i}", c.setup.short())
        console.print(details, highlight=False)
        console.print()
    for line in result.advice:
        console.print(line if line.startswith("- ") else f"• {line}", highlight=False)
    if output is not None:
        if written is not None:
            console.print(f"Wrote the winning setup to {written}. Next: tunepilot script {written} -o train.py",
                          highlight=False)
        else:
            console.print(f"Nothing fits, so {output} was not written.", highlight=False)
    if plot is not None and result.candidates:
        write_plot("plan", result, plot, safety_margin=goals.safety_margin,
                   labels=[f"#{i} {label(c.setup)}" for i, c in enumerate(result.candidates, 1)])
    elif plot is not None:
        err_console.print(f"note: no candidate to draw, so {plot} was not written", highlight=False)


# ---------------------------------------------------------------------------------------
# Fit map (issue 16): sweep
# ---------------------------------------------------------------------------------------

def _int_list(flag: str, text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"{flag}: give whole numbers separated by commas, e.g. {flag} 1,2,4,8 (got {text!r})")
    if not values or min(values) < 1:
        fail(f"{flag}: give positive whole numbers, e.g. {flag} 1,2,4,8 (got {text!r})")
    return values


@app.command()
def sweep(
    model_ref: str = typer.Argument(..., metavar="MODEL", help="Hub id, catalog name or local path (config.json or model dir)."),
    gpu: str = typer.Option(..., "--gpu", help="GPU to fit, e.g. '4090', 'A100 80GB', '2x H100'."),
    method: Optional[str] = typer.Option(None, "--method", help="full | lora | qlora | dora | ia3 | ... (default lora, or the --setup file's)."),
    setup_file: Optional[Path] = typer.Option(None, "--setup", help="Setup file (YAML/JSON) to sweep; its micro-batch and sequence length are varied."),
    r: Optional[int] = typer.Option(None, "--r", help="LoRA rank."),
    optim: Optional[str] = typer.Option(None, "--optim", help="Optimizer, e.g. adamw_torch_fused, paged_adamw_8bit."),
    ckpt: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward (default on)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Micro-batches to sweep, e.g. 1,2,4,8,16,32 (the default)."),
    seq_lens: Optional[str] = typer.Option(None, "--seq-lens", help="Sequence lengths to sweep (default 512 ... 16384, up to the model's context)."),
    safety_margin: float = typer.Option(0.10, "--safety-margin", help="Fraction of GPU memory kept free (the planner's default 0.10)."),
    fast: bool = typer.Option(False, "--fast", help="Analytic tier only: do not confirm the boundary with the simulator."),
    json_out: bool = typer.Option(False, "--json", help="Print the fit map as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE", help="Also draw the fit map (FILE.png or FILE.svg; needs matplotlib)."),
) -> None:
    """Fit map: which micro-batch x sequence-length combinations fit the GPU (analytic, simulated at the boundary)."""
    from pydantic import ValidationError

    from tools.gpus import parse_hardware
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup, format_validation_error
    from tools.sweep import sweep as make_sweep

    batches, seqs = _int_list("--batch-sizes", batch_sizes), _int_list("--seq-lens", seq_lens)
    if r is not None and r < 1:
        fail(f"--r: must be at least 1, got {r}")
    if not 0.0 <= safety_margin < 0.9:
        fail(f"--safety-margin: {safety_margin} must be between 0 and 0.9")
    try:
        hardware = parse_hardware(gpu)
        spec = lookup_model(model_ref)
        data: dict = TrainingSetup.load(setup_file).model_dump() if setup_file is not None else {}
        data["model_id"] = spec.model_id
        data.update({k: v for k, v in {"method": method, "r": r, "optim": optim, "gradient_checkpointing": ckpt}.items()
                     if v is not None})
        if setup_file is None:
            data["num_gpus"] = hardware.num_gpus
            if not hardware.gpu.bf16:
                data.update(bf16=False, fp16=True, dtype="fp16")
        m = data.get("method", "lora")
        if method is not None:
            data["load_in_4bit"] = m == "qlora"
            if m == "qlora":
                data["bnb_4bit_compute_dtype"] = "fp16" if data.get("fp16") else "bf16"
            data["use_dora"] = m == "dora"
        setup = TrainingSetup.model_validate(data)
        if plot is not None:
            from tools.plots import _check_path

            _check_path(plot)
        with progress_line(json_out):
            result = make_sweep(spec, hardware, setup, batch_sizes=batches, seq_lens=seqs, confirm=not fast,
                                safety_margin=safety_margin)
    except ValidationError as e:
        fail(format_validation_error(e))
    except TunepilotError as e:
        fail(str(e))
    if json_out:
        print_json(result)
        if plot is not None:
            write_plot("sweep", result, plot, json_out=True)
        return

    from rich import box
    from rich.table import Table

    console.print(f"[bold]Fit map[/]: {result.model_id} on {result.hardware}", highlight=False)
    table = Table(box=box.SIMPLE_HEAD,
                  caption=f"GiB per GPU (device total); fits within {result.usable_gib:.1f} GiB usable; "
                          "* = simulated; max = largest fitting micro-batch", caption_justify="left")
    table.add_column("seq \\ b", justify="right", no_wrap=True)
    for b in result.batch_sizes:
        table.add_column(str(b), justify="right", no_wrap=True)
    table.add_column("max", justify="right", no_wrap=True)
    for row in result.rows:
        cells = []
        for c in row.cells:
            text = f"{c.device_total_gib:.1f}{'*' if c.tier == 'simulated' else ''}"
            style = "green" if c.fits else "red"
            if c.per_device_train_batch_size == row.largest_fitting_batch:
                style = "bold green"
            cells.append(f"[{style}]{text}[/]")
        table.add_row(f"{row.max_length:,}", *cells, "-" if row.largest_fitting_batch is None else str(row.largest_fitting_batch))
    console.print(table)
    console.print(f"setup: {result.setup_summary}", highlight=False)
    console.print(f"[dim]{'; '.join(result.notes)}[/]", highlight=False)
    if plot is not None:
        write_plot("sweep", result, plot)


# ---------------------------------------------------------------------------------------
# Script and trial (issue 5)
# ---------------------------------------------------------------------------------------

@app.command()
def script(
    setup_file: Path = typer.Argument(..., metavar="SETUP.yaml", help="Training setup (YAML or JSON), e.g. from `tunepilot plan -o setup.yaml`."),
    output: Path = typer.Option(Path("train.py"), "-o", "--output", help="Where to write the script; extra config files go beside it."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Hub dataset id or local jsonl/json/csv/parquet (default: the setup's)."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Column holding the training text."),
    chat: bool = typer.Option(False, "--chat", help="Data is a 'messages' column: format it with the tokenizer's chat template."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
    objective: Optional[str] = typer.Option(None, "--objective", help="sft | dpo | kto | reward | grpo: the trl trainer the script uses (default: the setup's)."),
) -> None:
    """Render a ready-to-run training script for a setup file."""
    from pydantic import ValidationError

    from tools.schemas import TrainingSetup, format_validation_error
    from tools.script import write_script

    if text_field and chat:
        fail("give either --text-field F or --chat, not both")
    try:
        setup = TrainingSetup.load(setup_file)
        if objective is not None:
            setup = _with_objective(setup, objective)
        setup, fixes = _supported_setup(setup)
        rendered = write_script(setup, output, dataset=dataset, text_field=text_field, chat=chat)
        rendered.notes[:0] = fixes
    except ValidationError as e:
        fail(format_validation_error(e))
    except TunepilotError as e:
        fail(str(e))
    script_path = output / "train.py" if output.is_dir() else output
    extra = [str(script_path.parent / name) for name in rendered.files]
    if json_out:
        print_json({"script": str(script_path), "files": extra, "launch_command": rendered.launch_command,
                    "trial_command": rendered.trial_command, "notes": rendered.notes})
        return
    console.print(f"[bold green]wrote[/] {script_path}  ({setup.short()})", highlight=False)
    for path in extra:
        console.print(f"[green]wrote[/] {path}", highlight=False)
    console.print(f"launch (from {script_path.parent}):  [bold]{rendered.launch_command}[/]", highlight=False)
    console.print(f"trial first:  {rendered.trial_command}", highlight=False)
    for note in rendered.notes:
        console.print(f"[dim]note: {note}[/]", highlight=False)


def _objective_flags(objective, ref_model, precompute_ref, beta, num_generations, max_completion_length,
                     use_vllm, vllm_mode, vllm_util) -> dict:
    """The objective flags of estimate / plan as TrainingSetup fields (issue 15); an unknown objective is one clear error."""
    from tools.schemas import OBJECTIVES

    if objective is not None and objective not in OBJECTIVES:
        fail(f"--objective: {objective!r} is not an objective; use one of {', '.join(OBJECTIVES)}")
    given = {"objective": objective, "ref_model": ref_model, "precompute_ref_log_probs": precompute_ref, "beta": beta,
             "num_generations": num_generations, "max_completion_length": max_completion_length, "use_vllm": use_vllm,
             "vllm_mode": vllm_mode, "vllm_gpu_memory_utilization": vllm_util}
    return {k: v for k, v in given.items() if v is not None}


def _plan_objective(*flags) -> dict:
    """PlanGoals' objective and the knobs given on the command line."""
    knobs = _objective_flags(*flags)
    objective = knobs.pop("objective", "sft")
    return {"objective": objective, "objective_knobs": knobs}


def _with_objective(setup, objective: str):
    """The setup trained with --objective (issue 15); an unknown objective is one clear error."""
    from tools.schemas import OBJECTIVES

    if objective not in OBJECTIVES:
        fail(f"--objective: {objective!r} is not an objective; use one of {', '.join(OBJECTIVES)}")
    return setup.for_objective(objective)


def _supported_setup(setup):
    """The setup with what transformers/peft would refuse at load time replaced, and a note per change.

    Catalog / HF-cache models only (no Hub access): lora_dropout 0 for LoRA on fused MoE experts,
    eager attention where the model class has no sdpa / flash-attention kernel."""
    from tools.models import lookup_model
    from tools.peft_config import loadable_setup

    try:
        spec = lookup_model(setup.model_id, hub=False)
    except TunepilotError:  # not in the catalog or the local cache: transformers/peft will say it themselves
        return setup, []
    return loadable_setup(spec, setup)


def _trial_table(report) -> "object":
    from rich.table import Table

    table = Table(title=f"Trial: {report.setup_summary}", title_justify="left")
    table.add_column("quantity")
    table.add_column("measured", justify="right")
    table.add_column("estimated", justify="right")
    table.add_column("error", justify="right")

    def fmt(value, unit: str = "") -> str:
        return "—" if value is None else f"{value:,.2f}{unit}"

    if report.device == "cuda":
        labels = {"allocated_gib": "peak allocated", "reserved_gib": "peak reserved",
                  "device_total_gib": "device total", "tokens_per_second": "tokens/s"}
        for key, label in labels.items():
            row = report.comparison.get(key, {})
            unit = "" if key == "tokens_per_second" else " GiB"
            err = row.get("error_pct")
            table.add_row(label, fmt(row.get("measured"), unit), fmt(row.get("estimated"), unit), "—" if err is None else f"{err:+.1f}%")
    else:
        table.add_row("peak RSS (CPU)", fmt(report.cpu_peak_rss_gib, " GiB"), "n/a", "n/a")
        table.add_row("tokens/s (CPU)", fmt(report.tokens_per_second), "n/a", "n/a")
    if report.loss_per_step:
        table.add_row("loss per step", " ".join(f"{x:.3f}" for x in report.loss_per_step), "", "")
    if report.wall_seconds is not None:
        table.add_row("wall time", f"{report.wall_seconds:.1f} s", "", "")
    return table


@app.command()
def trial(
    setup_file: Path = typer.Argument(..., metavar="SETUP.yaml", help="Training setup (YAML or JSON) to trial-run."),
    steps: int = typer.Option(3, "--steps", help="Optimizer steps to run on worst-case batches."),
    timeout: float = typer.Option(900, "--timeout", help="Seconds before the trial is killed."),
    find_max_batch: bool = typer.Option(False, "--find-max-batch", help="Search the largest micro-batch that fits (a few trials, seeded by the estimate)."),
    model_path: Optional[str] = typer.Option(None, "--model", help="Load the weights from this local directory instead of the setup's model_id."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset for the worst-case batches (default: the setup's; random tokens without one)."),
    memory_limit_gib: Optional[float] = typer.Option(None, "--memory-limit-gib", help="Limit the trial process's address space (GiB); mainly for tests."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where to write the script, report and log (default: a temp dir)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="With --find-max-batch: write the best setup here."),
    json_out: bool = typer.Option(False, "--json", help="Print the report(s) as JSON."),
) -> None:
    """Trial-run a setup for a few steps and compare measured memory to the estimate."""
    from pydantic import ValidationError

    from tools.schemas import TrainingSetup, format_validation_error
    from tools.trial import find_max_batch as search_batch
    from tools.trial import run_trial

    kw = dict(steps=steps, timeout=timeout, workdir=workdir, model_path=model_path, dataset=dataset,
              memory_limit_gib=memory_limit_gib)
    try:
        setup = TrainingSetup.load(setup_file)
        with progress_line(json_out):
            if find_max_batch:
                best, reports = search_batch(setup, **kw)
            else:
                best, reports = setup, [run_trial(setup, **kw)]
        if output is not None and find_max_batch:
            best.save(output)
    except ValidationError as e:
        fail(format_validation_error(e))
    except TunepilotError as e:
        fail(str(e))
    ok = any(r.ok for r in reports)
    if json_out:
        if find_max_batch:
            print_json({"best_setup": best.model_dump(mode="json"), "best": best.short(), "ok": ok,
                        "trials": [r.model_dump(mode="json") for r in reports]})
        else:
            print_json(reports[0])
        raise typer.Exit(0 if ok else 1)
    for r in reports:
        console.print(_trial_table(r))
        style = "bold green" if r.ok else "bold red"
        console.print(f"[{style}]{'ok' if r.ok else (r.error_kind or 'failed')}:[/] {r.verdict}", highlight=False)
        if r.error_message and not r.ok:
            console.print(f"  {r.error_message.splitlines()[0][:300]}", highlight=False, markup=False)
        for line in r.advice:
            console.print(f"  • {line}", highlight=False, markup=False)
        console.print(f"[dim]log: {r.log_path}[/]", highlight=False)
    if find_max_batch:
        if ok:
            console.print(f"[bold]largest micro-batch that ran:[/] {best.short()}", highlight=False)
            if output is not None:
                console.print(f"wrote {output}", highlight=False)
        else:
            console.print("[bold red]no micro-batch ran[/]", highlight=False)
    raise typer.Exit(0 if ok else 1)


# ---------------------------------------------------------------------------------------
# Agent (issue 6) and Slack (issue 7)
# ---------------------------------------------------------------------------------------

@app.command()
def chat(
    llm: Optional[str] = typer.Option(None, "--llm", help="Chat model as provider:model, e.g. openai:gpt-4o-mini (default: $TUNEPILOT_LLM)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio), e.g. http://localhost:11434/v1."),
    resume: bool = typer.Option(False, "--resume", help="Continue the last conversation."),
    llm_timeout: Optional[float] = typer.Option(None, "--llm-timeout", help="Seconds to wait for the chat model's reply (default $TUNEPILOT_LLM_TIMEOUT; 900 for a local server, 120 otherwise)."),
    llm_retries: Optional[int] = typer.Option(None, "--llm-retries", help="Resends after a failed model call (default $TUNEPILOT_LLM_RETRIES; 0 for a local server, 2 otherwise)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature sent to the model (default $TUNEPILOT_LLM_TEMPERATURE, else 0.1)."),
) -> None:
    """Interactive chat with the tunepilot agent."""
    from agent.chat import chat_main

    try:
        chat_main(llm=llm, base_url=base_url, resume=resume, timeout=llm_timeout, retries=llm_retries, temperature=temperature)
    except TunepilotError as e:
        fail(str(e))


@app.command()
def ask(
    question: str = typer.Argument(..., help="Your question, e.g. \"Can I fine-tune Llama-3.1-8B on one RTX 4090?\""),
    json_out: bool = typer.Option(False, "--json", help="Print JSON: answer, setup, tool_calls, script_path, stopped, memory, summary."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Chat model as provider:model, e.g. openai:gpt-4o-mini (default: $TUNEPILOT_LLM)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server (vLLM, Ollama, llama.cpp, LM Studio), e.g. http://localhost:11434/v1."),
    allow_trial: bool = typer.Option(False, "--allow-trial", help="Let the agent trial-run the script on this machine (without it, no trial starts)."),
    llm_timeout: Optional[float] = typer.Option(None, "--llm-timeout", help="Seconds to wait for the chat model's reply (default $TUNEPILOT_LLM_TIMEOUT; 900 for a local server, 120 otherwise)."),
    llm_retries: Optional[int] = typer.Option(None, "--llm-retries", help="Resends after a failed model call (default $TUNEPILOT_LLM_RETRIES; 0 for a local server, 2 otherwise)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature sent to the model (default $TUNEPILOT_LLM_TEMPERATURE, else 0.1)."),
) -> None:
    """One-shot question to the agent (exit 1 when the turn did not finish: model-call limit, unconfirmed step)."""
    from agent.chat import ask_once
    from agent.core import agent_error_message

    try:
        data = ask_once(question, llm=llm, base_url=base_url, json_out=json_out, out=console, err=err_console,
                        allow_trial=allow_trial, timeout=llm_timeout, retries=llm_retries, temperature=temperature)
        if data.get("stopped"):
            if not json_out:
                err_console.print(f"[yellow]the answer is incomplete[/] (stopped: {data['stopped']})", highlight=False)
            raise typer.Exit(1)
    except typer.Exit:
        raise
    except TunepilotError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except Exception as e:  # noqa: BLE001 - the edge: one line, no traceback (TUNEPILOT_DEBUG=1 re-raises)
        import os

        if os.environ.get("TUNEPILOT_DEBUG"):
            raise
        fail(agent_error_message(e))


@app.command()
def slack(
    http: bool = typer.Option(False, "--http", help="Serve Slack's Events API over HTTP (needs SLACK_SIGNING_SECRET) instead of Socket Mode (SLACK_APP_TOKEN)."),
    port: int = typer.Option(3000, "--port", help="Port for --http; Slack posts to http://HOST:PORT/slack/events."),
    db: Optional[Path] = typer.Option(None, "--db", help="SQLite file keeping every thread's conversation (default $TUNEPILOT_HOME/slack.sqlite)."),
    trial_users: Optional[str] = typer.Option(None, "--trial-users", help="Comma-separated Slack user ids allowed to start trial runs (default $TUNEPILOT_SLACK_TRIAL_USERS; nobody if unset)."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Chat model as provider:model, e.g. openai:gpt-4o-mini (default $TUNEPILOT_LLM)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server URL (vLLM, Ollama, llama.cpp, LM Studio)."),
    slack_api_url: Optional[str] = typer.Option(None, "--slack-api-url", help="Slack Web API base URL (default https://slack.com/api/; for Slack-compatible gateways)."),
    llm_timeout: Optional[float] = typer.Option(None, "--llm-timeout", help="Seconds to wait for the chat model's reply (default $TUNEPILOT_LLM_TIMEOUT; 900 for a local server, 120 otherwise)."),
    llm_retries: Optional[int] = typer.Option(None, "--llm-retries", help="Resends after a failed model call (default $TUNEPILOT_LLM_RETRIES; 0 for a local server, 2 otherwise)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature sent to the model (default $TUNEPILOT_LLM_TEMPERATURE, else 0.1)."),
) -> None:
    """Run the Slack bot: answers mentions, DMs and thread follow-ups; uploads train.py to the thread."""
    from pydantic import ValidationError

    from tools.schemas import format_validation_error

    if not 1 <= port <= 65535:
        fail(f"--port {port}: choose a port between 1 and 65535")
    try:
        from agent.slack_bot import run

        run(http=http, port=port, db=db, trial_users=trial_users, llm=llm, base_url=base_url, slack_api_url=slack_api_url,
            llm_options={"timeout": llm_timeout, "max_retries": llm_retries, "temperature": temperature})
    except TunepilotError as e:
        fail(str(e))
    except ValidationError as e:
        fail(format_validation_error(e))
    except KeyboardInterrupt:
        err_console.print("Slack bot stopped")


# Commands that only compute and print: once their output is flushed, nothing is left to save, and
# the interpreter's teardown of torch/transformers (~1 s of freeing modules) is skipped.
_QUICK_EXIT = {"estimate", "plan", "sweep", "script", "model", "models", "gpus"}


def main() -> None:
    """Console-script entry point: people see one line per error, never a traceback."""
    from tools.quiet import silence_library_chatter

    silence_library_chatter()
    code: int | str | None = 0
    try:
        app()
    except SystemExit as e:
        code = e.code
    except TunepilotError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        code = 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        code = 130
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if command in _QUICK_EXIT and "torch" in sys.modules and isinstance(code, (int, type(None))):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
        os._exit(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    main()
