"""The one schema of tunepilot: what a model is, what hardware is, what a training setup is,
and what an estimate / plan says about it.

Every front end (CLI, agent tools, Slack) reads and writes these objects; the field
descriptions below are the documentation the agent's model, the CLI help and the Slack
rendering all show. Names follow Hugging Face (transformers TrainingArguments, trl
SFTConfig, peft LoraConfig, transformers BitsAndBytesConfig) wherever HF has one.

This module must stay light: pydantic and yaml only, never torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

# --------------------------------------------------------------------------------------
# Vocabularies (HF's values)
# --------------------------------------------------------------------------------------

Method = Literal[
    "full", "lora", "qlora", "dora", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning"
]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]
PEFT_LORA_METHODS = ("lora", "qlora", "dora")
PROMPT_METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning")

# transformers.training_args.OptimizerNames values people use for fine-tuning.
Optim = Literal[
    "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit",
    "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd", "adagrad", "rmsprop",
    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit",
    "adamw_torch_8bit", "adamw_torch_4bit",
]
OPTIMS: tuple[str, ...] = Optim.__args__  # type: ignore[attr-defined]

DType = Literal["fp32", "bf16", "fp16"]
AttnImpl = Literal["sdpa", "flash_attention_2", "eager"]
Task = Literal["causal-lm", "seq2seq", "sequence-classification"]
Offload = Literal["none", "optimizer", "all"]
FSDPMode = Literal["none", "full_shard", "shard_grad_op"]

BYTES_PER_GIB = 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class ModelSpec(_Strict):
    """What a model is: its identity, its shape and its exact size."""

    model_id: str = Field(description="Hugging Face Hub id (or local path) of the model, e.g. 'meta-llama/Llama-3.1-8B'.")
    architecture: str = Field(description="transformers class from config.json 'architectures', e.g. 'LlamaForCausalLM'.")
    model_type: str = Field(description="config.json 'model_type', e.g. 'llama'.")
    num_hidden_layers: int = Field(description="Number of transformer blocks.")
    hidden_size: int = Field(description="Width of the residual stream.")
    num_attention_heads: int = Field(description="Query heads per layer.")
    num_key_value_heads: int = Field(description="Key/value heads per layer (equals num_attention_heads without GQA).")
    head_dim: int = Field(description="Dimension of one attention head.")
    intermediate_size: int = Field(description="MLP inner width (per expert for MoE models).")
    vocab_size: int = Field(description="Vocabulary size (rows of the embedding matrix).")
    tie_word_embeddings: bool = Field(description="True when the LM head shares the input embedding matrix.")
    max_position_embeddings: Optional[int] = Field(default=None, description="Longest context the model was configured for.")
    num_experts: int = Field(default=0, description="Routed experts per MoE layer; 0 for dense models.")
    num_experts_per_tok: int = Field(default=0, description="Experts active per token; 0 for dense models.")
    torch_dtype: str = Field(default="bfloat16", description="Native dtype of the released weights (config.json 'torch_dtype'/'dtype').")
    num_parameters: int = Field(description="Exact total parameter count.")
    num_parameters_method: Literal["meta-instantiation", "formula"] = Field(
        default="meta-instantiation",
        description="How num_parameters was obtained: instantiating the real transformers class on the meta device, or a stated formula when transformers does not know the architecture.",
    )
    source: str = Field(description="Where the config came from: 'catalog', 'local:PATH', 'hf-cache', or 'hub'.")
    source_note: Optional[str] = Field(default=None, description="Provenance of the catalog entry (e.g. the Hub file it was copied from).")
    config: dict[str, Any] = Field(default_factory=dict, description="The raw config.json, used to build the real model on the meta device.")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


# --------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------


class GPUSpec(_Strict):
    """One GPU model and what it can hold and compute."""

    name: str = Field(description="Canonical name, e.g. 'NVIDIA RTX 4090' or 'NVIDIA H100 SXM 80GB'.")
    aliases: list[str] = Field(default_factory=list, description="Other spellings people type ('4090', 'rtx4090').")
    vendor: str = Field(default="NVIDIA", description="Vendor.")
    memory_gib: float = Field(description="Total device memory in GiB as the driver reports it (nvidia-smi 'Total').")
    compute_capability: Optional[str] = Field(default=None, description="CUDA compute capability, e.g. '8.9'.")
    bf16: bool = Field(description="True when the GPU supports bfloat16 natively (Ampere and newer).")
    fp16_tflops: float = Field(description="Dense FP16 tensor-core TFLOPs (FP32 accumulate where the vendor distinguishes).")
    bf16_tflops: Optional[float] = Field(default=None, description="Dense BF16 tensor-core TFLOPs; None when not supported.")
    fp32_tflops: Optional[float] = Field(default=None, description="Non-tensor FP32 TFLOPs.")
    memory_bandwidth_gbs: float = Field(description="Memory bandwidth in GB/s.")
    tdp_w: Optional[int] = Field(default=None, description="Board power in watts.")
    source: str = Field(default="", description="Where these figures come from (vendor datasheet URL or name).")


class HardwareSpec(_Strict):
    """The GPUs a setup runs on."""

    gpu: GPUSpec = Field(description="The GPU model (all GPUs are assumed identical).")
    num_gpus: int = Field(default=1, ge=1, description="GPUs in total across all nodes.")
    num_nodes: int = Field(default=1, ge=1, description="Machines.")
    free_memory_gib: Optional[list[float]] = Field(default=None, description="Free memory per GPU when detected locally.")
    host_ram_gib: Optional[float] = Field(default=None, description="Host (CPU) RAM per node in GiB, when known; checked against the run's loading peak and CPU offload.")
    detected: bool = Field(default=False, description="True when read from the local machine rather than typed.")


# --------------------------------------------------------------------------------------
# Training setup
# --------------------------------------------------------------------------------------


class TrainingSetup(_Strict):
    """One complete fine-tuning setup. What is estimated is what is generated is what is trial-run."""

    # what
    model_id: str = Field(description="Hugging Face Hub id or local path of the base model.")
    task: Task = Field(default="causal-lm", description="Training objective / head: causal-lm (SFT), seq2seq or sequence-classification.")
    num_labels: int = Field(default=2, ge=1, description="Number of classes for sequence-classification.")
    method: Method = Field(default="lora", description="Fine-tuning method: full, lora, qlora (4-bit base + LoRA), dora, ia3, prompt-tuning, prefix-tuning, p-tuning.")

    # peft (LoraConfig names)
    r: int = Field(default=16, ge=1, description="LoRA rank (peft LoraConfig.r). Powers of two / multiples of 8 align with tensor cores.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator (peft LoraConfig.lora_alpha); commonly r or 2r.")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input (peft LoraConfig.lora_dropout).")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        default="all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer except the LM head) or a list of module names such as ['q_proj','v_proj'].",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA scaling alpha/sqrt(r) (peft LoraConfig.use_rslora).")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (peft LoraConfig.use_dora); implied by method 'dora'.")
    num_virtual_tokens: int = Field(default=20, ge=1, description="Virtual tokens for prompt-tuning, prefix-tuning and p-tuning.")

    # weights and quantization (BitsAndBytesConfig names)
    dtype: DType = Field(default="bf16", description="dtype the base weights are loaded in (from_pretrained dtype); ignored for quantized layers.")
    load_in_4bit: bool = Field(default=False, description="Load the base model in 4-bit with bitsandbytes (QLoRA).")
    load_in_8bit: bool = Field(default=False, description="Load the base model in 8-bit with bitsandbytes (LLM.int8).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type (BitsAndBytesConfig.bnb_4bit_quant_type).")
    bnb_4bit_use_double_quant: bool = Field(default=True, description="Quantize the quantization constants too (saves ~0.37 bits/param).")
    bnb_4bit_compute_dtype: DType = Field(default="bf16", description="dtype of the de-quantized weight in matmuls (BitsAndBytesConfig.bnb_4bit_compute_dtype).")
    bnb_4bit_quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = Field(default="uint8", description="Storage dtype of packed 4-bit weights (bf16 for FSDP-QLoRA).")

    # batch and sequence (TrainingArguments / SFTConfig names)
    per_device_train_batch_size: int = Field(default=1, ge=1, description="Micro-batch per GPU per forward/backward.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    per_device_eval_batch_size: int = Field(default=1, ge=1, description="Batch per GPU during evaluation.")
    max_length: int = Field(
        default=2048, ge=1,
        validation_alias=AliasChoices("max_length", "max_seq_length", "seq_len"),
        description="Tokens per sequence after truncation (trl SFTConfig.max_length).",
    )
    packing: bool = Field(default=False, description="Pack several short examples into each max_length sequence (trl SFTConfig.packing).")

    # memory/time knobs
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in backward (HF non-reentrant checkpointing): far less activation memory, ~33% more compute.")
    optim: Optim = Field(default="adamw_torch_fused", description="Optimizer (TrainingArguments.optim): adamw_torch(_fused), adamw_bnb_8bit/adamw_8bit, paged_adamw_8bit/32bit, adafactor, sgd, lion_*.")
    bf16: bool = Field(default=True, description="bf16 mixed precision (TrainingArguments.bf16). Needs an Ampere or newer GPU.")
    fp16: bool = Field(default=False, description="fp16 mixed precision with loss scaling (TrainingArguments.fp16), for GPUs without bf16 (T4, V100).")
    attn_implementation: AttnImpl = Field(default="sdpa", description="Attention kernel: sdpa / flash_attention_2 (no s^2 matrix) or eager (materialises s^2 scores).")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")

    # optimisation schedule
    learning_rate: float = Field(default=2e-4, gt=0.0, description="Peak learning rate.")
    num_train_epochs: float = Field(default=1.0, gt=0.0, description="Passes over the dataset.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: float = Field(default=0.03, ge=0.0, description="Warm-up: an int number of steps, or a fraction (<1) of total steps.")
    lr_scheduler_type: str = Field(default="cosine", description="LR schedule (TrainingArguments.lr_scheduler_type).")
    seed: int = Field(default=42, description="Random seed.")

    # evaluation
    eval_strategy: Literal["no", "steps", "epoch"] = Field(default="no", description="When to evaluate (TrainingArguments.eval_strategy).")
    eval_steps: Optional[int] = Field(default=None, ge=1, description="Evaluate every N steps when eval_strategy='steps'.")
    prediction_loss_only: bool = Field(default=True, description="Evaluation keeps only the loss (False keeps full logits for metrics: much more memory).")

    # scale-out
    num_gpus: int = Field(default=1, ge=1, description="GPUs in total.")
    num_nodes: int = Field(default=1, ge=1, description="Machines.")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage (0 = none / plain data parallel).")
    fsdp: FSDPMode = Field(default="none", description="PyTorch FSDP sharding: none, full_shard (like ZeRO-3) or shard_grad_op (like ZeRO-2).")
    offload: Offload = Field(default="none", description="CPU offload with ZeRO/FSDP: none, optimizer (states on host), all (states and parameters).")
    gpu: Optional[str] = Field(default=None, description="The GPU this setup was planned for, as typed or from the catalog (e.g. 'RTX 4090').")

    # data and outputs (used by the script generator)
    dataset: Optional[str] = Field(default=None, description="Hub dataset id or local jsonl/json/csv/parquet path.")
    dataset_text_field: str = Field(default="text", description="Column holding the training text.")
    use_chat_template: bool = Field(default=False, description="Format 'messages' conversations with the tokenizer's chat template.")
    streaming: bool = Field(default=False, description="Stream the dataset instead of downloading it whole.")
    output_dir: str = Field(default="outputs", description="Where checkpoints and the final adapter/model go.")
    save_steps: int = Field(default=500, ge=1, description="Save a checkpoint every N steps.")
    save_total_limit: int = Field(default=2, ge=1, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(default=10, ge=1, description="Log every N steps.")
    merge_adapter: bool = Field(default=False, description="Merge the LoRA adapter into the base weights after training.")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingSetup":
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def problems(self) -> list[str]:
        """Every cross-field inconsistency, each naming its field(s)."""
        p: list[str] = []
        if self.bf16 and self.fp16:
            p.append("bf16/fp16: choose one mixed-precision mode, not both")
        if self.load_in_4bit and self.load_in_8bit:
            p.append("load_in_4bit/load_in_8bit: choose one quantization")
        if self.method == "qlora" and not self.load_in_4bit:
            p.append("load_in_4bit: method 'qlora' needs load_in_4bit=true")
        if (self.load_in_4bit or self.load_in_8bit) and self.method == "full":
            p.append("method: full fine-tuning cannot train quantized (load_in_4bit/8bit) weights; use qlora or lora")
        if self.load_in_4bit and self.bnb_4bit_compute_dtype == "fp32":
            p.append("bnb_4bit_compute_dtype: QLoRA with fp32 compute defeats its purpose; use bf16 (or fp16 on GPUs without bf16)")
        if self.method == "dora" and not self.use_dora:
            # normalised rather than rejected: method 'dora' means LoRA with use_dora
            object.__setattr__(self, "use_dora", True)
        if self.zero_stage and self.fsdp != "none":
            p.append("zero_stage/fsdp: use DeepSpeed ZeRO or FSDP, not both")
        if self.offload != "none" and not self.zero_stage and self.fsdp == "none":
            p.append("offload: CPU offload needs zero_stage 1-3 or fsdp")
        if self.offload == "all" and self.zero_stage in (1, 2):
            p.append("offload: parameter offload ('all') needs zero_stage 3 (ZeRO-1/2 offload only the optimizer)")
        if self.fsdp != "none" and self.num_gpus == 1 and self.offload == "none":
            p.append("fsdp: sharding over one GPU saves nothing; set num_gpus > 1 or use offload")
        if self.zero_stage and self.num_gpus == 1 and self.offload == "none":
            p.append("zero_stage: ZeRO on one GPU saves nothing without offload; set num_gpus > 1 or offload")
        if self.num_nodes > self.num_gpus:
            p.append("num_nodes: cannot exceed num_gpus")
        if self.eval_strategy == "steps" and not self.eval_steps:
            p.append("eval_steps: required when eval_strategy='steps'")
        if isinstance(self.target_modules, list) and not self.target_modules:
            p.append("target_modules: give 'all-linear' or at least one module name")
        return p

    # ---- derived ---------------------------------------------------------------
    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_gpus

    @property
    def is_peft(self) -> bool:
        return self.method != "full"

    @property
    def padding_free(self) -> bool:
        """trl's packing ('bfd', its default) is padding-free: the whole batch is one row of packed examples."""
        return self.packing and self.task == "causal-lm" and self.method not in ("prompt-tuning", "prefix-tuning", "p-tuning")

    @property
    def compute_dtype(self) -> DType:
        """dtype the matmuls run in."""
        if self.bf16:
            return "bf16"
        if self.fp16:
            return "fp16"
        return self.dtype

    @property
    def sharding(self) -> str:
        """One word for the distributed strategy: single, ddp, zero1-3, fsdp_full_shard, fsdp_shard_grad_op."""
        if self.fsdp != "none":
            return f"fsdp_{self.fsdp}"
        if self.zero_stage:
            return f"zero{self.zero_stage}"
        return "ddp" if self.num_gpus > 1 else "single"

    def short(self) -> str:
        """One-line human description, e.g. 'QLoRA nf4 r=16 all-linear, b=2x8, seq 2048, ckpt, paged_adamw_8bit'."""
        name = {"qlora": "QLoRA", "lora": "LoRA", "dora": "DoRA", "full": "Full FT", "ia3": "IA3"}.get(self.method, self.method)
        parts = [name]
        if self.method == "qlora":
            parts[0] += f" {self.bnb_4bit_quant_type}{'+dq' if self.bnb_4bit_use_double_quant else ''}"
        if self.method in PEFT_LORA_METHODS:
            tm = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
            parts[0] += f" r={self.r} {tm}"
        parts.append(f"b={self.per_device_train_batch_size}x{self.gradient_accumulation_steps}")
        parts.append(f"seq {self.max_length}")
        if self.gradient_checkpointing:
            parts.append("ckpt")
        parts.append(self.optim)
        if self.num_gpus > 1 or self.sharding != "single":
            s = f"{self.num_gpus} GPU {self.sharding}"
            if self.offload != "none":
                s += f"+offload {self.offload}"
            parts.append(s)
        return ", ".join(parts)

    # ---- files -------------------------------------------------------------------
    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        text = self.model_dump_json(indent=2) if path.suffix == ".json" else self.to_yaml()
        path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainingSetup":
        """Read a setup from YAML or JSON; raises SetupFileError with every problem listed."""
        path = Path(path)
        if not path.is_file():
            raise SetupFileError(f"setup file not found: {path} (write one with `tunepilot plan ... -o {path.name}`)")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file
            raise SetupFileError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
        if not isinstance(data, dict):
            raise SetupFileError(f"{path}: expected a mapping of setup fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SetupFileError(f"{path}: {format_validation_error(e)}") from None


# --------------------------------------------------------------------------------------
# Estimates and plans
# --------------------------------------------------------------------------------------


class Uncertainty(_Strict):
    low_gib: float = Field(description="Lower end of the band for device_total_gib.")
    high_gib: float = Field(description="Upper end of the band for device_total_gib.")
    pct: float = Field(description="Half-width of the band in percent.")


class MemoryEstimate(_Strict):
    """Per-GPU memory of one training setup, with its provenance."""

    model_id: str = Field(description="Model estimated.")
    setup_summary: str = Field(description="One-line description of the setup.")
    tier: Literal["simulated", "analytic"] = Field(description="simulated = fake-tensor dry run of the real step; analytic = closed form.")
    num_parameters: int = Field(description="Total parameters of the model (base + adapters).")
    trainable_parameters: int = Field(description="Parameters that receive gradients.")
    peak_allocated_gib: float = Field(description="Peak of torch.cuda.max_memory_allocated per GPU, GiB.")
    peak_reserved_gib: float = Field(description="Peak of torch.cuda.max_memory_reserved per GPU (caching allocator), GiB.")
    device_total_gib: float = Field(description="What nvidia-smi shows per GPU at peak: reserved + CUDA context and library workspaces, GiB.")
    host_ram_gib: float = Field(default=0.0, description="Host RAM per node at its peak (the larger of loading and training), GiB: runtime per process, checkpoint copies while loading, offloaded states and pinned buffers; reclaimable page cache excluded.")
    host_breakdown: dict[str, float] = Field(default_factory=dict, description="Host RAM per node by part at its peak moment, GiB (runtime, checkpoint_copies, adapters, fsdp_fp32_upcast, offloaded_params, master_weights, optimizer_states, gradients, pinned_buffers, dataloader_workers); sums to host_ram_gib.")
    host_phase: str = Field(default="", description="When host RAM peaks: 'loading' (from_pretrained and prepare) or 'training'.")
    host_page_cache_gib: float = Field(default=0.0, description="Reclaimable file-backed pages per node on top of host_ram_gib: the memory-mapped checkpoint and the tokenized dataset's Arrow cache, GiB.")
    host_ram_available_gib: Optional[float] = Field(default=None, description="Host RAM per node checked against (--host-ram or detected), GiB.")
    host_fits: Optional[bool] = Field(default=None, description="True when host_ram_gib fits in host_ram_available_gib; None when the host's RAM is unknown.")
    breakdown: dict[str, float] = Field(description="Component -> GiB at the peak moment, per GPU (weights, adapters, gradients, optimizer_state, activations, logits_loss, temporaries, allocator_overhead, cuda_context, ...).")
    gpu: Optional[str] = Field(default=None, description="GPU checked against, if any.")
    gpu_memory_gib: Optional[float] = Field(default=None, description="That GPU's memory, GiB.")
    fits: Optional[bool] = Field(default=None, description="True when device_total_gib plus the safety margin is within the GPU's memory.")
    headroom_gib: Optional[float] = Field(default=None, description="GPU memory minus device_total_gib, GiB (negative = does not fit).")
    uncertainty: Uncertainty = Field(description="Band around device_total_gib.")
    dominant: str = Field(default="", description="The component that dominates the peak.")
    advice: str = Field(default="", description="One line: what dominates and what would cut it most.")
    provenance: list[str] = Field(default_factory=list, description="How each number was obtained (tier, calibration constants and their sources).")


class ThroughputEstimate(_Strict):
    tokens_per_second: float = Field(description="Training tokens per second across all GPUs.")
    flops_per_token: float = Field(description="Training FLOPs per token (forward+backward+recompute).")
    mfu: float = Field(description="Assumed model-FLOPs utilisation (fraction of dense peak).")
    time_per_epoch_hours: Optional[float] = Field(default=None, description="Wall-clock hours per epoch.")
    total_hours: Optional[float] = Field(default=None, description="Wall-clock hours for all epochs.")
    gpu_hours: Optional[float] = Field(default=None, description="GPU-hours for all epochs.")
    cost: Optional[float] = Field(default=None, description="Cost at the given price per GPU-hour.")
    notes: list[str] = Field(default_factory=list, description="Assumptions and their sources.")


class Candidate(_Strict):
    setup: TrainingSetup
    estimate: MemoryEstimate
    throughput: ThroughputEstimate
    fits: bool = Field(description="Fits with the safety margin.")
    why: str = Field(default="", description="Short reason for its rank or rejection.")


class Plan(_Strict):
    model_id: str
    hardware: str = Field(description="Hardware planned for, e.g. '2x NVIDIA RTX 4090 (24 GiB)'.")
    candidates: list[Candidate] = Field(default_factory=list, description="Ranked candidates, best first.")
    best: Optional[Candidate] = Field(default=None, description="The recommended setup, or None when nothing fits.")
    fits: bool = Field(description="True when at least one candidate fits.")
    advice: list[str] = Field(default_factory=list, description="Why the winner, why each rejected family, and smallest changes that would fit.")


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class TunepilotError(Exception):
    """An error meant for the person (or the agent's model): one clear line, no traceback."""


class SetupFileError(TunepilotError):
    pass


def format_validation_error(e: ValidationError) -> str:
    """All problems of a pydantic ValidationError on one line each, naming the field."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "setup"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}" if loc != "setup" else msg)
    return "invalid setup: " + "; ".join(lines)


# --------------------------------------------------------------------------------------
# Raw step memory (what the simulator and the analytic tier both produce)
# --------------------------------------------------------------------------------------

STEP_CATEGORIES = ("weights", "adapters", "gradients", "optimizer_state", "activations", "logits_loss", "temporaries")


class StepMemory(_Strict):
    """Memory of one training step of ONE model replica (no sharding, no CUDA-only overheads), in bytes.

    Produced by `tools.memory.simulate` (tier 'simulated') and `tools.analytic.analytic_step_memory`
    (tier 'analytic'); `tools.estimator.estimate` turns it into a per-GPU MemoryEstimate.
    """

    tier: Literal["simulated", "analytic"]
    num_parameters: int = Field(description="All parameters (base + adapters), counted as logical elements (a 4-bit weight counts its unpacked elements).")
    trainable_parameters: int = Field(description="Parameters with requires_grad.")
    weights_bytes: int = Field(description="Resident bytes of base-model weights (quantized storage + absmax/constants for 4/8-bit).")
    adapter_bytes: int = Field(description="Resident bytes of trainable adapter/prompt parameters (0 for full fine-tuning: those are in weights_bytes).")
    gradient_bytes: int = Field(description="Bytes of .grad of all trainable parameters.")
    optimizer_bytes: int = Field(description="Persistent optimizer-state bytes after the first step.")
    peak_bytes: int = Field(description="Peak of live storage bytes over forward, backward, optimizer step (train step).")
    peak_breakdown: dict[str, int] = Field(description="Bytes by category at the peak moment; keys from STEP_CATEGORIES; sums to peak_bytes.")
    peak_phase: str = Field(default="", description="Where the peak happened: forward, backward, optimizer, eval.")
    eval_peak_bytes: Optional[int] = Field(default=None, description="Peak of an evaluation step when the setup evaluates.")
    largest_layer_param_bytes: int = Field(default=0, description="Bytes of the largest single transformer block's parameters (for ZeRO-3/FSDP all-gather buffers).")
    per_layer_bytes: Optional[int] = Field(default=None, description="Peak growth per extra transformer block (the extrapolation slope).")
    layers_simulated: Optional[list[int]] = Field(default=None, description="Depths actually simulated before extrapolation.")
    seconds: float = Field(default=0.0, description="Wall time of the computation.")
    notes: list[str] = Field(default_factory=list, description="Provenance and approximations.")


class PlanGoals(_Strict):
    """What the user wants; the planner searches setups that deliver it."""

    seq_len: int = Field(default=2048, ge=1, description="Tokens per training sequence.")
    dataset_tokens: Optional[int] = Field(default=None, ge=1, description="Training tokens per epoch.")
    dataset_examples: Optional[int] = Field(default=None, ge=1, description="Training examples per epoch (tokens = examples x seq_len when dataset_tokens is not given).")
    effective_batch: int = Field(default=16, ge=1, description="Sequences per optimizer step across GPUs (micro-batch x accumulation x GPUs).")
    method: Literal["auto", "full", "lora", "qlora"] = Field(default="auto", description="Preferred method, or auto to search all.")
    num_train_epochs: float = Field(default=1.0, gt=0, description="Epochs.")
    price_per_gpu_hour: Optional[float] = Field(default=None, ge=0, description="Price of one GPU-hour, for cost.")
    quality: Literal["speed", "balanced", "quality"] = Field(default="balanced", description="Trade-off when times are comparable: quality prefers full > LoRA > QLoRA and larger r.")
    safety_margin: float = Field(default=0.10, ge=0, lt=0.9, description="Fraction of GPU memory kept free.")
    top: int = Field(default=5, ge=1, description="Candidates to return.")
    confirm: bool = Field(default=True, description="Confirm the best candidates with the simulator (slower, exact).")
