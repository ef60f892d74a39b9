"""The training-script generator: one self-contained `train.py` for exactly one TrainingSetup.

The script uses transformers + peft + trl's SFTTrainer (bitsandbytes for QLoRA / 8-bit),
carries a comment on every knob, states its launch command and the setup YAML in its
header, and has a trial mode (`--trial-steps N --trial-report FILE`) that `tools.trial`
runs to measure memory. Several GPUs (or ZeRO/FSDP offload) add `accelerate_config.yaml`
and, for DeepSpeed, `ds_config.json`, launched with `accelerate launch`.

Pure: renders text from the setup; only `write_script` touches the disk. No torch import.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from tools.schemas import LOSS_IMPL_LABELS, LOSS_IMPL_PACKAGES, PROMPT_METHODS, TrainingSetup, TunepilotError

TEMPLATES = Path(__file__).with_name("templates")

_TORCH_DTYPE = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
_STORAGE_DTYPE = {"uint8": "torch.uint8", "bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
_FEEDFORWARD = ("down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h", "fc_out", "wo")


class ScriptError(TunepilotError):
    """The setup cannot be turned into a script as asked."""


class RenderedScript(BaseModel):
    """A rendered training script, its extra files and how to launch it."""

    train_py: str = Field(description="Source of the self-contained training script.")
    files: dict[str, str] = Field(default_factory=dict, description="Extra files to write beside the script (accelerate_config.yaml, ds_config.json), name -> content.")
    launch_command: str = Field(description="Command that starts training, run from the script's directory.")
    trial_command: str = Field(default="", description="Command that runs the script's trial mode.")
    script_name: str = Field(default="train.py", description="File name the script is meant to have.")
    notes: list[str] = Field(default_factory=list, description="What the generator decided on the user's behalf.")


def script_requirements(setup: TrainingSetup) -> list[str]:
    """The PyPI packages the generated script imports for this setup (its 'Needs: pip install ...' line)."""
    reqs = ["torch", "transformers", "datasets", "accelerate", "peft", "trl"]
    if setup.load_in_4bit or setup.load_in_8bit or "8bit" in setup.optim or setup.optim.startswith(("paged_", "lion_")):
        reqs.append("bitsandbytes")
    if setup.zero_stage:
        reqs.append("deepspeed")
    extra = LOSS_IMPL_PACKAGES.get(setup.loss_impl)
    if extra:
        reqs.append(extra)
    if setup.use_liger_kernel and "liger-kernel" not in reqs:
        reqs.append("liger-kernel")
    return reqs


def needs_accelerate(setup: TrainingSetup) -> bool:
    """True when the setup must be started with `accelerate launch` (several GPUs, ZeRO or FSDP)."""
    return setup.num_gpus > 1 or bool(setup.zero_stage) or setup.fsdp != "none"


def _py(value) -> str:
    """A Python literal for a value, strings in double quotes as a formatter would write them."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    return repr(value)


def _warmup(value: float) -> str:
    return repr(int(value)) if value >= 1 and float(value).is_integer() else repr(value)


def _peft_source(setup: TrainingSetup, model_hidden: str = "model.config.hidden_size") -> tuple[str, list[str]]:
    """Source lines building `peft_config`, and the names to import from peft."""
    m = setup.method
    ind = "    "
    if m in ("lora", "qlora", "dora"):
        lines = [
            "peft_config = LoraConfig(",
            '    task_type="CAUSAL_LM",  # causal language-modelling head',
            f"    r={setup.r},  # adapter rank",
            f"    lora_alpha={setup.lora_alpha},  # scaling numerator (scale = lora_alpha / r)",
            f"    lora_dropout={setup.lora_dropout!r},  # dropout on the adapter input",
            f"    target_modules={_py(setup.target_modules)},  # layers that get adapters",
            f"    use_rslora={setup.use_rslora},  # rank-stabilised scaling lora_alpha / sqrt(r)",
            f"    use_dora={setup.use_dora},  # weight-decomposed LoRA (DoRA): magnitude + direction",
            '    bias="none",  # biases stay frozen',
            ")",
        ]
        names = ["LoraConfig"]
    elif m == "ia3":
        if setup.target_modules == "all-linear":
            tm = "None,  # None: peft's default IA3 layers for this architecture (attention k/v and the MLP output)"
            ff = "None,  # None: peft's default feed-forward layers for this architecture"
        else:
            tm = f"{_py(setup.target_modules)},  # layers that get IA3 scaling vectors"
            ffm = [t for t in setup.target_modules if t.split(".")[-1] in _FEEDFORWARD]
            ff = f"{_py(ffm)},  # feed-forward layers (scaled on their input rather than output)"
        lines = [
            "peft_config = IA3Config(",
            '    task_type="CAUSAL_LM",  # causal language-modelling head',
            f"    target_modules={tm}",
            f"    feedforward_modules={ff}",
            ")",
        ]
        names = ["IA3Config"]
    else:
        cls = {"prompt-tuning": "PromptTuningConfig", "prefix-tuning": "PrefixTuningConfig", "p-tuning": "PromptEncoderConfig"}[m]
        lines = [
            f"peft_config = {cls}(",
            '    task_type="CAUSAL_LM",  # causal language-modelling head',
            f"    num_virtual_tokens={setup.num_virtual_tokens},  # trainable virtual tokens prepended to every sequence",
        ]
        if m == "p-tuning":
            lines.append(f"    encoder_hidden_size={model_hidden},  # width of the prompt encoder MLP")
        lines.append(")")
        names = [cls]
    return "\n".join(ind + line for line in lines), names


def _accelerate_config(setup: TrainingSetup) -> str:
    """accelerate_config.yaml for this setup (DeepSpeed, FSDP or plain multi-GPU data parallel)."""
    mp = "bf16" if setup.bf16 else ("fp16" if setup.fp16 else "no")
    lines = [
        f"# accelerate launch config written by tunepilot for: {setup.short()}",
        "# Run `accelerate launch --config_file accelerate_config.yaml train.py` from this directory.",
        "compute_environment: LOCAL_MACHINE  # GPUs on machines you control",
    ]
    if setup.zero_stage:
        lines += [
            "distributed_type: DEEPSPEED  # DeepSpeed ZeRO, configured in ds_config.json",
            "deepspeed_config:",
            "  deepspeed_config_file: ds_config.json  # ZeRO stage, offload and precision live there",
            f"  zero3_init_flag: {'true' if setup.zero_stage == 3 else 'false'}  # build ZeRO-3 models already sharded",
        ]
    elif setup.fsdp != "none":
        offload = setup.offload != "none"
        lines += [
            "distributed_type: FSDP  # PyTorch fully sharded data parallel",
            "fsdp_config:",
        ]
        if setup.fsdp_version == 2:
            lines += [
                "  fsdp_version: 2  # FSDP2 (per-parameter sharding, what accelerate now recommends)",
                f"  fsdp_reshard_after_forward: {'true' if setup.fsdp == 'full_shard' else 'false'}  # {setup.fsdp}: "
                + ("free gathered weights after forward (like ZeRO-3)" if setup.fsdp == "full_shard" else "keep gathered weights until backward (like ZeRO-2)"),
            ]
        else:
            lines += [
                "  fsdp_version: 1  # FSDP1 (FlatParameter per wrapped unit)",
                f"  fsdp_sharding_strategy: {setup.fsdp.upper()}  # {setup.fsdp}: "
                + ("free gathered weights after forward (like ZeRO-3)" if setup.fsdp == "full_shard" else "keep gathered weights until backward (like ZeRO-2)"),
                "  fsdp_use_orig_params: true  # needed for PEFT (frozen and trainable parameters in one unit)",
                "  fsdp_backward_prefetch: BACKWARD_PRE  # all-gather the next unit before the current one's gradients",
                "  fsdp_forward_prefetch: false  # no explicit forward prefetch",
                "  fsdp_sync_module_states: true  # rank 0's weights broadcast to the others",
            ]
        lines += [
            f"  fsdp_offload_params: {'true' if offload else 'false'}  # keep parameters, gradients and optimizer states on the CPU",
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP  # one FSDP unit per transformer block (the model's _no_split_modules)",
            "  fsdp_cpu_ram_efficient_loading: true  # only rank 0 reads the checkpoint; others receive shards",
            "  fsdp_state_dict_type: FULL_STATE_DICT  # save one ordinary checkpoint at the end",
            f"  fsdp_activation_checkpointing: {'true' if setup.gradient_checkpointing else 'false'}  # FSDP's own activation checkpointing (replaces the Trainer's)",
            f"mixed_precision: {mp}  # autocast dtype",
        ]
    else:
        lines += [
            "distributed_type: MULTI_GPU  # plain data parallel (DDP): a full replica per GPU",
            f"mixed_precision: {mp}  # autocast dtype",
        ]
    lines += [
        f"num_machines: {setup.num_nodes}  # machines",
        f"num_processes: {setup.num_gpus}  # processes = GPUs in total across machines",
        "machine_rank: 0  # this machine's rank (0 on the main machine" + (", 1.. on the others)" if setup.num_nodes > 1 else ")"),
    ]
    if setup.num_nodes > 1:
        lines += [
            "main_process_ip: MAIN_NODE_IP  # replace with the address of machine 0",
            "main_process_port: 29500  # a free TCP port on machine 0",
        ]
    lines += [
        "rdzv_backend: static  # fixed set of machines",
        "same_network: true  # machines reach each other directly",
        "use_cpu: false  # train on GPUs",
        "main_training_function: main  # entry point in train.py",
    ]
    return "\n".join(lines) + "\n"


def _ds_config(setup: TrainingSetup) -> str:
    """ds_config.json: ZeRO stage and CPU offload of this setup; "auto" values come from the script's SFTConfig."""
    # "auto" only where transformers fills in the value from the model (reduce_bucket_size = hidden^2,
    # stage3_prefetch_bucket_size = 0.9 hidden^2, stage3_param_persistence_threshold = 10 hidden: the
    # estimator uses the same rules); every other buffer size is written out, so the run uses exactly the
    # values `tunepilot estimate` counted (tools.memory.distributed.deepspeed_buffers)
    zero: dict = {"stage": setup.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": setup.zero_reduce_bucket_size or "auto"}
    if setup.zero_stage in (1, 2):
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 500_000_000, "reduce_scatter": True})
    if setup.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if setup.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if setup.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": setup.zero_prefetch_bucket_size or "auto",
            "stage3_param_persistence_threshold": setup.zero_param_persistence_threshold or "auto",
            "stage3_max_live_parameters": setup.zero_max_live_parameters,
            "stage3_max_reuse_distance": setup.zero_max_reuse_distance,
            "sub_group_size": setup.zero_sub_group_size,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    cfg: dict = {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    if setup.offload != "none":
        # DeepSpeed's CPU Adam runs the offloaded optimizer step on the host.
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return json.dumps(cfg, indent=2) + "\n"


# ---- objectives (issue 15): one readable template per trl trainer --------------------

TEMPLATE_BY_OBJECTIVE = {
    "sft": "train.py.j2",
    "dpo": "train_dpo.py.j2",
    "kto": "train_kto.py.j2",
    "reward": "train_reward.py.j2",
    "grpo": "train_grpo.py.j2",
}
_REF_NOTE = {
    "copy": "a separate frozen copy of the starting weights",
    "peft_base": "the same base model with the adapter disabled (no second copy)",
    "precomputed": "log-probs computed once before training (precompute_ref_log_probs), no reference kept",
    "none": "none",
}


def _objective_script_problems(setup: TrainingSetup) -> list[str]:
    """What the trl trainers of this objective cannot do, each naming the field."""
    p: list[str] = []
    if setup.objective in ("dpo", "kto", "grpo") and setup.method in PROMPT_METHODS and setup.reference_mode == "peft_base":
        p.append(f"method: {setup.method} with a reference model: use lora/qlora/dora, or precompute_ref_log_probs")
    if setup.objective == "reward" and setup.method in PROMPT_METHODS:
        p.append(f"method: {setup.method} is not supported for reward models; use lora, qlora or full")
    if setup.objective == "grpo" and setup.use_vllm and setup.vllm_mode == "colocate" and (setup.zero_stage or setup.fsdp != "none") and setup.offload == "all":
        p.append("offload: colocated vLLM needs the weights on the GPU; use offload 'optimizer' or vllm_mode 'server'")
    return p


def _vllm_serve_command(setup: TrainingSetup) -> str:
    """The `trl vllm-serve` command for GRPO's server mode."""
    return (
        f"trl vllm-serve --model {setup.model_id} --tensor-parallel-size {setup.vllm_tensor_parallel_size} "
        f"--max-model-len {setup.prompt_length + setup.max_completion_length}"
    )


def _objective_context(setup: TrainingSetup) -> dict:
    """Template variables of the objective's knobs (trl names, Python literals)."""
    loss = setup.effective_loss_type
    extra: dict = {}
    if setup.objective in ("dpo", "kto", "grpo"):
        # the trainer wraps the policy itself (peft_config=...): no get_peft_model in the script
        names = [n for n in ("LoraConfig", "IA3Config", "PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig")
                 if setup.is_peft and n == _peft_source(setup)[1][0]]
        if setup.load_in_4bit or setup.load_in_8bit:
            names.append("prepare_model_for_kbit_training")
        if setup.merge_adapter and setup.method != "full":
            names.append("PeftModel")
        extra["peft_import"] = ", ".join(names)
    if setup.objective == "reward":
        # a reward model is a sequence classifier with one output; peft then also trains the new score head
        extra["transformers_import"] = "AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback" + (
            ", BitsAndBytesConfig" if setup.load_in_4bit or setup.load_in_8bit else "")
        if setup.is_peft:
            src, _ = _peft_source(setup)
            extra["peft_config_src"] = src.replace('task_type="CAUSAL_LM",  # causal language-modelling head',
                                                   'task_type="SEQ_CLS",  # sequence classification: the score head is trained in full')
    return dict(
        **extra,
        objective=setup.objective,
        reference=setup.reference_mode,
        reference_py=_py(setup.reference_mode),
        ref_note=_REF_NOTE[setup.reference_mode],
        precompute=_py(setup.precompute_ref_log_probs),
        beta=_py(setup.effective_beta),
        loss_type=_py(loss) if loss is not None else "None",
        max_prompt_length=_py(setup.max_prompt_length) if setup.max_prompt_length else "None",
        prompt_length=setup.prompt_length,
        num_generations=setup.num_generations,
        max_completion_length=setup.max_completion_length,
        generation_batch_size=_py(setup.generation_batch_size) if setup.generation_batch_size else "None",
        use_vllm=_py(setup.use_vllm),
        vllm_mode=_py(setup.vllm_mode),
        vllm_gpu_memory_utilization=_py(setup.vllm_gpu_memory_utilization),
        vllm_tensor_parallel_size=setup.vllm_tensor_parallel_size,
        vllm_serve_command=_vllm_serve_command(setup),
        vllm_server_gpus=setup.vllm_server_gpus,
        vllm_gpu_list=",".join(str(setup.num_gpus + i) for i in range(setup.vllm_server_gpus)),
        train_gpu_list=",".join(str(i) for i in range(setup.num_gpus)),
        num_gpus=setup.num_gpus,
    )


def render_script(
    setup: TrainingSetup,
    *,
    dataset: str | None = None,
    text_field: str | None = None,
    chat: bool = False,
    script_name: str = "train.py",
) -> RenderedScript:
    """Render a ready-to-run train.py (transformers + peft + trl SFTTrainer) for exactly this setup, plus accelerate/DeepSpeed configs when it spans several GPUs."""
    import jinja2
    import yaml

    problems: list[str] = []
    if setup.task != "causal-lm" and setup.objective != "reward":
        problems.append(f"task: the script generator writes causal-lm scripts (and reward models with objective 'reward'); {setup.task!r} is not supported yet")
    problems += _objective_script_problems(setup)
    if setup.merge_adapter and setup.method in PROMPT_METHODS:
        problems.append(f"merge_adapter: {setup.method} adapters cannot be merged into the weights; set merge_adapter false")
    if problems:
        raise ScriptError("; ".join(problems))

    notes: list[str] = []
    use_chat = bool(chat or (setup.use_chat_template and not text_field))
    source = dataset if dataset is not None else setup.dataset
    field = text_field or setup.dataset_text_field
    quantized = setup.load_in_4bit or setup.load_in_8bit
    merge = setup.merge_adapter and setup.method != "full"
    if setup.merge_adapter and setup.method == "full":
        notes.append("merge_adapter ignored: full fine-tuning has no adapter to merge")
    fsdp = setup.fsdp != "none"
    # Under FSDP, accelerate's fsdp_activation_checkpointing does the recomputation instead of the Trainer.
    trainer_ckpt = setup.gradient_checkpointing and not fsdp
    if setup.offload != "none" and setup.zero_stage:
        notes.append(f"ZeRO offload uses DeepSpeed's CPU AdamW (ds_config.json 'optimizer'); optim={setup.optim} is not used")

    peft_src, peft_names = ("", [])
    if setup.is_peft:
        peft_src, peft_names = _peft_source(setup)
        peft_names.append("get_peft_model")
    if quantized:
        peft_names.append("prepare_model_for_kbit_training")
    if merge:
        peft_names.append("PeftModel")
    tf_names = ["AutoModelForCausalLM", "AutoTokenizer", "TrainerCallback"]
    if quantized:
        tf_names.insert(2, "BitsAndBytesConfig")

    accelerate = needs_accelerate(setup)
    launch = f"accelerate launch --config_file accelerate_config.yaml {script_name}" if accelerate else f"python {script_name}"
    trial_cmd = f"{launch} --trial-steps 3 --trial-report trial_report.json"
    title = f"Fine-tune {setup.model_id}: {setup.short()}"
    if setup.objective == "grpo" and setup.use_vllm and setup.vllm_mode == "server":
        notes.append(
            f"vLLM server mode: start `{_vllm_serve_command(setup)}` on {setup.vllm_server_gpus} other GPU(s) first; "
            f"training uses {setup.num_gpus} GPU(s)"
        )

    setup_yaml = yaml.safe_dump(setup.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    setup_yaml = "\n".join("    " + line for line in setup_yaml.rstrip().splitlines())
    setup_yaml = setup_yaml.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')

    requirements = script_requirements(setup)
    gpu_only = [x for x in requirements if x in ("liger-kernel", "cut-cross-entropy")]
    if gpu_only:
        notes.append(f"needs {' and '.join(gpu_only)} (Triton kernels: CUDA GPUs only)")
    ctx = dict(
        requirements=" ".join(requirements),
        loss_impl=setup.loss_impl,
        loss_impl_py=_py(setup.loss_impl),
        loss_label=LOSS_IMPL_LABELS[setup.loss_impl],
        use_liger_kernel=setup.use_liger_kernel,
        torch_compile=getattr(setup, "torch_compile", False),
        reentrant=_py(bool(getattr(setup, "reentrant_checkpointing", False))),
        activation_offloading=setup.activation_offloading,
        title=title.replace("\\", "/").replace('"""', "'''"),
        title_py=_py(title),
        launch_command=launch,
        trial_command=trial_cmd,
        setup_yaml=setup_yaml,
        method=setup.method,
        dtype=setup.dtype,
        peft_import=", ".join(peft_names),
        transformers_import=", ".join(tf_names),
        model_id=_py(setup.model_id),
        dataset=_py(source),
        text_field=_py(field),
        chat=_py(use_chat),
        streaming=_py(setup.streaming),
        output_dir=_py(setup.output_dir),
        seed=_py(setup.seed),
        max_length=setup.max_length,
        micro_batch=setup.per_device_train_batch_size,
        grad_accum=setup.gradient_accumulation_steps,
        eval_batch=setup.per_device_eval_batch_size,
        evaluates=_py(setup.eval_strategy != "no"),
        load_in_4bit=setup.load_in_4bit,
        load_in_8bit=setup.load_in_8bit,
        quantized=quantized,
        bnb_4bit_quant_type=_py(setup.bnb_4bit_quant_type),
        bnb_4bit_use_double_quant=_py(setup.bnb_4bit_use_double_quant),
        bnb_4bit_compute_dtype=_TORCH_DTYPE[setup.bnb_4bit_compute_dtype],
        bnb_4bit_quant_storage=_STORAGE_DTYPE[setup.bnb_4bit_quant_storage],
        torch_dtype=_TORCH_DTYPE[setup.dtype],
        attn_implementation=_py(setup.attn_implementation),
        gradient_checkpointing=_py(trainer_ckpt),
        trainer_checkpointing=_py(trainer_ckpt),
        checkpointing_note="FSDP checkpoints activations itself, see accelerate_config.yaml" if fsdp and setup.gradient_checkpointing else "memory for ~33% more compute",
        peft_config_src=peft_src,
        packing=_py(setup.packing),
        num_train_epochs=_py(setup.num_train_epochs),
        learning_rate=_py(setup.learning_rate),
        lr_scheduler_type=_py(setup.lr_scheduler_type),
        warmup_steps=_warmup(setup.warmup_steps),
        weight_decay=_py(setup.weight_decay),
        max_grad_norm=_py(setup.max_grad_norm),
        optim=_py(setup.optim),
        bf16=_py(setup.bf16),
        fp16=_py(setup.fp16),
        eval_strategy=_py(setup.eval_strategy),
        eval_steps=_py(setup.eval_steps),
        prediction_loss_only=_py(setup.prediction_loss_only),
        save_steps=_py(setup.save_steps),
        save_total_limit=_py(setup.save_total_limit),
        logging_steps=_py(setup.logging_steps),
        deepspeed=bool(setup.zero_stage),
        zero_stage=setup.zero_stage,
        ddp=setup.num_gpus > 1 and not setup.zero_stage and not fsdp,
        merge=merge,
    )
    ctx.update(_objective_context(setup))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    train_py = env.get_template(TEMPLATE_BY_OBJECTIVE[setup.objective]).render(**ctx)

    files: dict[str, str] = {}
    if accelerate:
        files["accelerate_config.yaml"] = _accelerate_config(setup)
    if setup.zero_stage:
        files["ds_config.json"] = _ds_config(setup)
    if source is None:
        notes.append("no dataset in the setup: pass --dataset when training (trial mode uses random tokens without one)")
    return RenderedScript(
        train_py=train_py, files=files, launch_command=launch, trial_command=trial_cmd,
        script_name=script_name, notes=notes,
    )


def write_script(setup: TrainingSetup, path: str | Path, **kw) -> RenderedScript:
    """Render the script for `setup` and write it to `path`, with its extra config files beside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.py"
    rendered = render_script(setup, script_name=path.name, **kw)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered.train_py, encoding="utf-8")
        for name, text in rendered.files.items():
            (path.parent / name).write_text(text, encoding="utf-8")
    except OSError as e:
        raise ScriptError(f"cannot write the script to {path}: {e.strerror or e}") from None
    return rendered
