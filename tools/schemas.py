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
import math
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
# How the causal-LM loss is computed from the last hidden state (see TrainingSetup.loss_impl).
LossImpl = Literal["trl_fused", "hf", "liger", "cce"]
LOSS_IMPLS: tuple[str, ...] = LossImpl.__args__  # type: ignore[attr-defined]
# The extra PyPI package each loss path / kernel set needs in the generated script (none: already there).
LOSS_IMPL_PACKAGES = {"trl_fused": None, "hf": None, "liger": "liger-kernel", "cce": "cut-cross-entropy"}
LOSS_IMPL_LABELS = {
    "trl_fused": "trl's fused LM head (tiled log-probs, no full logits)",
    "hf": "transformers' loss (full logits, fp32 upcast)",
    "liger": "Liger Kernel fused linear cross-entropy (chunked, gradient in forward)",
    "cce": "Cut Cross-Entropy (blockwise, no logits)",
}

# Training objectives (issue 15): trl 1.16's SFTTrainer, DPOTrainer, KTOTrainer, RewardTrainer, GRPOTrainer.
Objective = Literal["sft", "dpo", "kto", "reward", "grpo"]
OBJECTIVES: tuple[str, ...] = Objective.__args__  # type: ignore[attr-defined]
PREFERENCE_OBJECTIVES = ("dpo", "kto")  # a reference model beside the policy (unless precomputed)
RefModel = Literal["auto", "copy", "peft_base"]
VllmMode = Literal["colocate", "server"]
# trl 1.16's accepted loss_type values per objective (DPOConfig / KTOConfig / GRPOConfig), the default first.
LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
            "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
    "kto": ("kto", "apo_zero_unpaired"),
    "grpo": ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
}
# Fields of the objectives (issue 15); GRPO_FIELDS only mean something for objective grpo.
GRPO_FIELDS = ("num_generations", "max_completion_length", "generation_batch_size", "use_vllm", "vllm_mode",
               "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_server_gpus")
OBJECTIVE_FIELDS = ("ref_model", "precompute_ref_log_probs", "max_prompt_length", "loss_type", "beta") + GRPO_FIELDS
# trl 1.16's default beta per objective (DPOConfig.beta, KTOConfig.beta, GRPOConfig.beta).
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "grpo": 0.0}

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
    power_limit_w: Optional[float] = Field(default=None, description="Power limit the board runs at when set below its board power (nvidia-smi -pl); lowers its sustained clock. None: at board power.")
    source: str = Field(default="", description="Where these figures come from (vendor datasheet URL or name).")
    nvlink_gbs: Optional[float] = Field(default=None, description="GPU-to-GPU NVLink (or Infinity Fabric) bandwidth per GPU per direction, GB/s; None when GPUs talk over PCIe.")
    pcie_gbs: Optional[float] = Field(default=None, description="Host link (PCIe) bandwidth per direction, GB/s (Gen3/4/5 x16 = 15.75/31.5/63).")
    pcie_p2p: bool = Field(default=True, description="False where the driver has no PCIe peer-to-peer between these GPUs (GeForce): NCCL goes through host memory.")
    interconnect_source: str = Field(default="", description="Where the interconnect figures come from.")


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
    reentrant_checkpointing: bool = Field(default=False, description="gradient_checkpointing_kwargs use_reentrant=True (transformers 4.35-4.5x's default, torch.utils.checkpoint's old default): the whole block is recomputed in backward, where non-reentrant checkpointing stops once every saved tensor is back.")
    legacy_loss: Literal["none", "upcast_in_model", "upcast_in_loss", "no_upcast"] = Field(
        default="none",
        description="transformers' causal-LM loss of older releases (loss_impl 'hf' only), to reproduce their measurements: "
                    "'upcast_in_model' = 4.36-4.45 (the model casts its logits to fp32, the 16-bit ones are freed, and the loss "
                    "takes a shifted contiguous fp32 copy: logits[..., :-1, :].contiguous()); 'upcast_in_loss' = 4.46-4.49 "
                    "(ForCausalLMLoss upcasts while the output keeps the 16-bit logits, then the same shifted copy); "
                    "'no_upcast' = the shifted copy in the compute dtype, no upcast (transformers <= 4.30 Llama, remote-code "
                    "models such as Qwen v1). 'none' (default) = today's ForCausalLMLoss (fp32 upcast, labels padded instead of "
                    "the logits shifted: no copy).")
    legacy_rope_cache: Literal["none", "fp16", "bf16", "fp32"] = Field(
        default="none",
        description="Rotary caches of the transformers of early 2024 (4.38-4.40 checked: modeling_llama/mistral/mixtral.py): every "
                    "attention layer's RotaryEmbedding registers cos/sin buffers of [max_position_embeddings, head_dim] in the "
                    "dtype the model was loaded in (torch's default dtype during from_pretrained), resident for the whole run "
                    "and never sharded by FSDP/ZeRO (buffers). Set that dtype to count them (e.g. Mistral-7B in fp16: "
                    "32 layers x 2 x 32768 x 128 x 2 B = 512 MiB); 'none' (default) = today's transformers (one shared "
                    "rotary module, cos/sin computed per step).",
    )
    optim: Optim = Field(default="adamw_torch_fused", description="Optimizer (TrainingArguments.optim): adamw_torch(_fused), adamw_bnb_8bit/adamw_8bit, paged_adamw_8bit/32bit, adafactor, sgd, lion_*.")
    bf16: bool = Field(default=True, description="bf16 mixed precision (TrainingArguments.bf16). Needs an Ampere or newer GPU.")
    fp16: bool = Field(default=False, description="fp16 mixed precision with loss scaling (TrainingArguments.fp16), for GPUs without bf16 (T4, V100).")
    attn_implementation: AttnImpl = Field(default="sdpa", description="Attention kernel: sdpa / flash_attention_2 (no s^2 matrix) or eager (materialises s^2 scores).")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    loss_impl: LossImpl = Field(
        default="trl_fused",
        description="How the causal-LM loss is computed: trl_fused (trl SFTTrainer's default fused LM head: tiled log-probs, "
                    "the (batch, seq, vocab) logits never exist), hf (transformers' model(labels=...): full logits upcast to fp32), "
                    "liger (Liger Kernel's fused linear cross-entropy; needs liger-kernel and a GPU), cce (Cut Cross-Entropy; "
                    "needs cut-cross-entropy, a GPU and bf16/fp16 compute). Other tasks always use their head's own loss.",
    )
    use_liger_kernel: bool = Field(
        default=False,
        description="Liger Kernel's RMSNorm, RoPE and SwiGLU kernels (TrainingArguments.use_liger_kernel / liger_kernel_config): "
                    "fewer saved activations per block; needs liger-kernel and a GPU.",
    )
    torch_compile: bool = Field(
        default=False,
        description="TrainingArguments.torch_compile: compile the model (forward and backward) with torch.compile / Inductor, "
                    "which fuses chains of elementwise and norm ops into single kernels; faster steps after a one-off "
                    "compile. Timed; memory is simulated as eager.",
    )
    activation_offloading: bool = Field(
        default=False,
        description="trl SFTConfig.activation_offloading: saved activations move to (pinned) host RAM in forward and stream "
                    "back in backward; less GPU memory, costs host RAM and PCIe time.",
    )

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
    zero_reduce_bucket_size: int = Field(default=0, ge=0, description="DeepSpeed reduce_bucket_size in elements (0 = 'auto': hidden_size^2, what transformers fills in; DeepSpeed's own default without a config is 5e8).")
    zero_prefetch_bucket_size: int = Field(default=0, ge=0, description="DeepSpeed stage3_prefetch_bucket_size in elements (0 = 'auto': 0.9 x hidden_size^2; DeepSpeed's own default is 5e7).")
    zero_max_live_parameters: int = Field(default=1_000_000_000, ge=0, description="DeepSpeed stage3_max_live_parameters in elements: ZeRO-3 prefetches only while fewer are gathered (what tunepilot's ds_config.json writes, DeepSpeed's default 1e9).")
    zero_max_reuse_distance: int = Field(default=1_000_000_000, ge=0, description="DeepSpeed stage3_max_reuse_distance in elements: ZeRO-3 keeps a parameter gathered when it is used again within this many elements of the trace (ds_config.json's and DeepSpeed's default 1e9).")
    zero_param_persistence_threshold: int = Field(default=0, ge=0, description="DeepSpeed stage3_param_persistence_threshold in elements: smaller parameters stay gathered on every GPU (0 = 'auto': 10 x hidden_size, what transformers fills in; DeepSpeed's own default without a config is 1e5).")
    zero_sub_group_size: int = Field(default=1_000_000_000, ge=1, description="DeepSpeed ZeRO-3 sub_group_size in elements: the optimizer step makes the fp32 gradient of one sub-group at a time (DeepSpeed's default 1e9).")
    fsdp: FSDPMode = Field(default="none", description="PyTorch FSDP sharding: none, full_shard (like ZeRO-3) or shard_grad_op (like ZeRO-2).")
    fsdp_version: Literal[1, 2] = Field(default=2, description="FSDP implementation accelerate uses: 2 = FSDP2 (per-parameter DTensor sharding, fully_shard; the default) or 1 = FSDP1 (FlatParameter, use_orig_params).")
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

    # objective (issue 15): preference and RL fine-tuning with trl, under trl's names
    objective: Objective = Field(
        default="sft",
        description="What is trained: sft (supervised, trl SFTTrainer), dpo (preference pairs prompt/chosen/rejected, DPOTrainer), "
        "kto (unpaired prompt/completion/label, KTOTrainer), reward (a reward model: sequence classification on chosen/rejected, "
        "RewardTrainer), grpo (RL with a reward function on generated completions, GRPOTrainer).",
    )
    ref_model: RefModel = Field(
        default="auto",
        description="DPO/KTO/GRPO reference model: auto (trl's default: a PEFT policy is its own reference with the adapter "
        "disabled, a full fine-tune loads a separate frozen copy), copy (always a separate frozen copy), peft_base (the PEFT "
        "base with the adapter disabled; needs a PEFT method).",
    )
    precompute_ref_log_probs: bool = Field(
        default=False,
        description="DPO/KTO: compute the reference log-probs of the whole dataset once before training (trl "
        "precompute_ref_log_probs), so no reference model is kept during training; one extra forward pass over the data.",
    )
    max_prompt_length: Optional[int] = Field(
        default=None, ge=1,
        description="Longest prompt in tokens (DPO/KTO/GRPO); longer prompts are truncated from the left by the generated "
        "script (trl 1.16 has no such knob). None: DPO/KTO prompts share max_length with the completion (the estimate "
        "assumes half each); GRPO prompts get max_length - max_completion_length.",
    )
    loss_type: Optional[Union[str, list[str]]] = Field(
        default=None,
        description="trl loss_type; None keeps trl's default (DPO 'sigmoid', KTO 'kto', GRPO 'dapo'). DPO accepts a list "
        "of losses combined (e.g. MPO ['sigmoid', 'bco_pair', 'sft']).",
    )
    beta: Optional[float] = Field(
        default=None, ge=0.0,
        description="trl beta: DPO/KTO deviation from the reference (default 0.1); GRPO KL coefficient (default 0.0, and a "
        "reference model is loaded only when beta > 0).",
    )
    num_generations: int = Field(default=8, ge=2, description="GRPO: completions sampled per prompt (trl GRPOConfig.num_generations).")
    max_completion_length: int = Field(default=512, ge=1, description="GRPO: longest generated completion in tokens (trl GRPOConfig.max_completion_length).")
    generation_batch_size: Optional[int] = Field(
        default=None, ge=1,
        description="GRPO: completions generated at once across all GPUs (trl GRPOConfig.generation_batch_size); None: "
        "per_device_train_batch_size x num_gpus x gradient_accumulation_steps.",
    )
    use_vllm: bool = Field(default=False, description="GRPO: generate with vLLM instead of model.generate (trl GRPOConfig.use_vllm).")
    vllm_mode: VllmMode = Field(
        default="colocate",
        description="GRPO with vLLM: colocate (vLLM shares the training GPUs and takes vllm_gpu_memory_utilization of each) "
        "or server (a `trl vllm-serve` process on other GPUs).",
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.3, gt=0.0, le=1.0,
        description="GRPO, colocated vLLM: fraction of each GPU's memory vLLM reserves for its weights and KV cache "
        "(trl's default 0.3, lowered from 0.9 after out-of-memory reports).",
    )
    vllm_tensor_parallel_size: int = Field(default=1, ge=1, description="GRPO with vLLM: tensor-parallel size of the vLLM engine (trl GRPOConfig.vllm_tensor_parallel_size; in server mode the server's --tensor-parallel-size).")
    vllm_server_gpus: int = Field(default=1, ge=1, description="GRPO, vLLM server mode: GPUs the vLLM server runs on, apart from the num_gpus that train.")

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
        if self.legacy_loss != "none" and (self.loss_impl != "hf" or self.task != "causal-lm"):
            p.append(f"legacy_loss: {self.legacy_loss!r} is transformers' own causal-LM loss of older releases; set loss_impl 'hf' "
                     "(task causal-lm) or legacy_loss 'none'")
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
        if self.loss_impl in ("liger", "cce") and self.task != "causal-lm":
            p.append(f"loss_impl: {self.loss_impl!r} is a causal-LM loss; task {self.task!r} trains with its head's own loss (loss_impl 'hf')")
        if self.loss_impl in ("liger", "cce") and self.method in PROMPT_METHODS:
            p.append(f"loss_impl: {self.loss_impl!r} scores the model's hidden states directly, which {self.method} (virtual tokens) does not support; use trl_fused or hf")
        if self.loss_impl == "cce" and self.compute_dtype == "fp32":
            p.append("loss_impl: Cut Cross-Entropy's backward needs bf16/fp16 hidden states; set bf16 (or fp16) or use liger/trl_fused")
        if self.use_liger_kernel and self.method in PROMPT_METHODS:
            p.append(f"use_liger_kernel: not supported with {self.method}")
        p += self._objective_problems()
        return p

    def _objective_problems(self) -> list[str]:
        """Problems of the objective and its knobs (issue 15), each naming its field."""
        p: list[str] = []
        obj = self.objective
        given = self.model_fields_set
        if obj == "reward":
            # normalised rather than rejected: a reward model is a sequence classifier with one output (trl RewardTrainer)
            if self.task == "seq2seq":
                p.append("task: objective 'reward' trains a sequence-classification head, not 'seq2seq'")
            object.__setattr__(self, "task", "sequence-classification")
            object.__setattr__(self, "num_labels", 1)
        elif obj != "sft" and self.task != "causal-lm":
            p.append(f"task: objective {obj!r} trains a causal-lm policy, not {self.task!r}")
        if obj in ("sft", "reward"):
            for name in ("precompute_ref_log_probs", "loss_type", "beta", "max_prompt_length"):
                if name in given and getattr(self, name) not in (None, False):
                    p.append(f"{name}: only for objectives dpo, kto and grpo (objective is {obj!r})")
            if "ref_model" in given and self.ref_model != "auto":
                p.append(f"ref_model: objective {obj!r} has no reference model")
        if obj != "grpo":
            for name in ("use_vllm", "generation_batch_size"):
                if name in given and getattr(self, name) not in (None, False):
                    p.append(f"{name}: only for objective grpo (objective is {obj!r})")
        if self.ref_model == "peft_base" and not self.is_peft:
            p.append("ref_model: 'peft_base' (adapter disabled) needs a PEFT method (lora, qlora, dora, ...); full fine-tuning needs 'copy' or 'auto'")
        if obj == "grpo" and self.ref_model == "copy" and self.is_peft and self.effective_beta > 0:
            p.append("ref_model: trl's GRPOTrainer always uses the PEFT base (adapter disabled) as the reference of a PEFT policy; use 'auto' or 'peft_base'")
        if self.precompute_ref_log_probs:
            if obj == "grpo":
                p.append("precompute_ref_log_probs: GRPO scores freshly generated completions, so reference log-probs cannot be precomputed")
            elif self.ref_model == "copy":
                p.append("precompute_ref_log_probs: with precomputed log-probs a separate reference copy is never used; set ref_model 'auto'")
        if self.loss_type is not None and obj in LOSS_TYPES:
            allowed = LOSS_TYPES[obj]
            values = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
            if isinstance(self.loss_type, list) and obj != "dpo":
                p.append(f"loss_type: only DPO combines several losses; give one of {', '.join(allowed)}")
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                p.append(f"loss_type: {', '.join(map(repr, bad)) or 'empty'} is not a trl {obj.upper()} loss; use one of {', '.join(allowed)}")
        if obj == "kto" and self.per_device_train_batch_size < 2 and self.effective_loss_type == "kto":
            p.append("per_device_train_batch_size: KTO's KL estimate pairs each prompt with another row of the micro-batch; use at least 2 (or loss_type 'apo_zero_unpaired')")
        if obj in PREFERENCE_OBJECTIVES and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            p.append(f"max_prompt_length: {self.max_prompt_length} leaves no room for the completion in max_length {self.max_length}")
        if obj == "grpo":
            if self.max_completion_length >= self.max_length:
                p.append(f"max_completion_length: {self.max_completion_length} leaves no room for the prompt in max_length {self.max_length} (max_length is prompt + completion)")
            elif self.max_prompt_length is not None and self.max_prompt_length + self.max_completion_length > self.max_length:
                p.append(f"max_prompt_length: {self.max_prompt_length} + max_completion_length {self.max_completion_length} exceeds max_length {self.max_length}")
            global_batch = self.per_device_train_batch_size * self.num_gpus
            if self.generation_batch_size is None and self.grpo_generation_batch % self.num_generations:
                # normalised rather than rejected: generate whole groups (the least common multiple of the global batch
                # and num_generations); trl then trains on them over several steps (steps_per_generation)
                object.__setattr__(self, "generation_batch_size", math.lcm(global_batch, self.num_generations))
            gen = self.generation_batch_size
            if gen is not None and gen % global_batch:
                p.append(f"generation_batch_size: {gen} must be a multiple of per_device_train_batch_size x num_gpus = {global_batch}")
            elif self.grpo_generation_batch % self.num_generations:
                p.append(
                    f"num_generations: the generation batch ({self.grpo_generation_batch} completions) must hold whole groups of "
                    f"{self.num_generations}; make per_device_train_batch_size x num_gpus x gradient_accumulation_steps "
                    "(or generation_batch_size) a multiple of num_generations"
                )
            if self.use_vllm and self.vllm_mode == "colocate" and self.vllm_tensor_parallel_size > self.num_gpus:
                p.append(f"vllm_tensor_parallel_size: {self.vllm_tensor_parallel_size} exceeds the {self.num_gpus} GPU(s) vLLM is colocated on")
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
    def reference_mode(self) -> str:
        """Where the reference log-probs come from: 'none', 'copy' (a separate frozen model), 'peft_base' (the policy
        with its adapter disabled) or 'precomputed' (once before training), following trl 1.16's trainers."""
        if self.objective in ("sft", "reward"):
            return "none"
        if self.objective == "grpo" and self.effective_beta == 0.0:
            return "none"  # trl GRPOTrainer loads no reference model when beta == 0
        if self.objective in PREFERENCE_OBJECTIVES and self.precompute_ref_log_probs:
            return "precomputed"
        if self.ref_model == "copy" or (self.ref_model == "auto" and not self.is_peft):
            return "copy"
        return "peft_base"

    @property
    def effective_beta(self) -> float:
        """beta as trl will use it (the objective's default when not set)."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.objective, 0.0)

    @property
    def effective_loss_type(self) -> Optional[Union[str, list[str]]]:
        """loss_type as trl will use it (the objective's default when not set); None for sft/reward."""
        if self.loss_type is not None:
            return self.loss_type
        return LOSS_TYPES[self.objective][0] if self.objective in LOSS_TYPES else None

    @property
    def prompt_length(self) -> int:
        """Planned prompt tokens per sequence: max_prompt_length, or GRPO max_length - max_completion_length, or half of max_length."""
        if self.objective == "grpo":
            room = max(1, self.max_length - self.max_completion_length)
            return min(self.max_prompt_length, room) if self.max_prompt_length else room
        if self.max_prompt_length:
            return min(self.max_prompt_length, self.max_length - 1)
        return max(1, self.max_length // 2)

    @property
    def grpo_generation_batch(self) -> int:
        """GRPO completions generated at once across all GPUs (trl's default: the effective batch)."""
        return self.generation_batch_size or self.per_device_train_batch_size * self.num_gpus * self.gradient_accumulation_steps

    @property
    def sequences_per_example(self) -> int:
        """Sequences one micro-batch row becomes in the forward: 2 for pairs (DPO chosen + rejected, reward), else 1."""
        return 2 if self.objective in ("dpo", "reward") else 1

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
        parts = [name] if self.objective == "sft" else [f"{self.objective.upper()} {name}"]
        if self.method == "qlora":
            parts[0] += f" {self.bnb_4bit_quant_type}{'+dq' if self.bnb_4bit_use_double_quant else ''}"
        if self.method in PEFT_LORA_METHODS:
            tm = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
            parts[0] += f" r={self.r} {tm}"
        parts.append(f"b={self.per_device_train_batch_size}x{self.gradient_accumulation_steps}")
        parts.append(f"seq {self.max_length}")
        if self.gradient_checkpointing:
            parts.append("ckpt")
        if self.activation_offloading:
            parts.append("act-offload")
        parts.append(self.optim)
        if self.objective != "sft":
            parts.append(self._objective_short())
        if self.loss_impl != "trl_fused":
            parts.append(f"loss {self.loss_impl}")
        if self.legacy_rope_cache != "none":
            parts.append(f"per-layer rope caches {self.legacy_rope_cache}")
        if self.legacy_loss != "none":
            parts.append(f"legacy loss {self.legacy_loss}")
        if self.use_liger_kernel:
            parts.append("liger kernels")
        if self.torch_compile:
            parts.append("torch.compile")
        if self.num_gpus > 1 or self.sharding != "single":
            s = f"{self.num_gpus} GPU {self.sharding}"
            if self.offload != "none":
                s += f"+offload {self.offload}"
            parts.append(s)
        return ", ".join(parts)

    def _objective_short(self) -> str:
        """The objective's knobs in a few words, e.g. 'ref peft_base' or '8 gen x 512, vLLM colocate 0.3'."""
        if self.objective == "grpo":
            s = f"{self.num_generations} gen x {self.max_completion_length}"
            if self.use_vllm:
                s += f", vLLM {self.vllm_mode}" + (f" {self.vllm_gpu_memory_utilization:g}" if self.vllm_mode == "colocate" else "")
            if self.reference_mode != "none":
                s += f", beta {self.effective_beta:g} ref {self.reference_mode}"
            return s
        if self.objective == "reward":
            return "reward head"
        return f"ref {self.reference_mode}"

    def for_objective(self, objective: str) -> "TrainingSetup":
        """This setup trained with another objective: the knobs the new objective does not have go back to their defaults."""
        data = self.model_dump()
        data["objective"] = objective
        if objective in ("sft", "reward"):
            for name in OBJECTIVE_FIELDS:
                data.pop(name, None)
        elif objective != "grpo":
            for name in GRPO_FIELDS:
                data.pop(name, None)
        if objective != self.objective:
            for name in ("loss_type", "beta"):  # their meaning and defaults differ per objective
                data.pop(name, None)
        if self.objective == "reward" and objective != "reward":
            data.pop("task", None)
            data.pop("num_labels", None)
        return TrainingSetup.model_validate(data)

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
    host_breakdown: dict[str, float] = Field(default_factory=dict, description="Host RAM per node by part at its peak moment, GiB (runtime, checkpoint_copies, adapters, fsdp_fp32_upcast, offloaded_params, master_weights, optimizer_states, gradients, pinned_buffers, dataloader_workers, activation_offload); sums to host_ram_gib.")
    host_phase: str = Field(default="", description="When host RAM peaks: 'loading' (from_pretrained and prepare) or 'training'.")
    host_page_cache_gib: float = Field(default=0.0, description="Reclaimable file-backed pages per node on top of host_ram_gib: the memory-mapped checkpoint and the tokenized dataset's Arrow cache, GiB.")
    host_ram_available_gib: Optional[float] = Field(default=None, description="Host RAM per node checked against (--host-ram or detected), GiB.")
    host_fits: Optional[bool] = Field(default=None, description="True when host_ram_gib fits in host_ram_available_gib; None when the host's RAM is unknown.")
    breakdown: dict[str, float] = Field(description="Component -> GiB at the peak moment, per GPU (weights, adapters, gradients, optimizer_state, activations, logits_loss, temporaries, allocator_overhead, cuda_context, ...).")
    rank: Optional[int] = Field(default=None, description="Under ZeRO/FSDP sharding: the rank whose per-GPU peak is reported (the worst one); None on one GPU or for a plain replica.")
    gpu: Optional[str] = Field(default=None, description="GPU checked against, if any.")
    gpu_memory_gib: Optional[float] = Field(default=None, description="That GPU's memory, GiB.")
    fits: Optional[bool] = Field(default=None, description="True when device_total_gib plus the safety margin is within the GPU's memory.")
    headroom_gib: Optional[float] = Field(default=None, description="GPU memory minus device_total_gib, GiB (negative = does not fit).")
    uncertainty: Uncertainty = Field(description="Band around device_total_gib.")
    dominant: str = Field(default="", description="The component that dominates the peak.")
    advice: str = Field(default="", description="One line: what dominates and what would cut it most.")
    provenance: list[str] = Field(default_factory=list, description="How each number was obtained (tier, calibration constants and their sources).")
    step_seconds: Optional[float] = Field(default=None, description="Wall time of one optimizer step on the GPU checked against (None without a GPU), seconds.")
    tokens_per_second: Optional[float] = Field(default=None, description="Training tokens per second across all GPUs (None without a GPU).")
    time_breakdown: Optional[dict[str, dict[str, float]]] = Field(default=None, description="Step seconds by phase and by op class (see ThroughputEstimate.time_breakdown).")
    time_model: Optional[str] = Field(default=None, description="'op-roofline' (simulated op trace) or 'flat-factors' (analytic fallback).")
    time_calibrated: bool = Field(default=False, description="True when measured trial runs on this GPU with this method scaled the time.")
    time_notes: list[str] = Field(default_factory=list, description="How the time was obtained: rates, efficiency factors, communication, calibration.")
    loss_impl: Optional[str] = Field(default=None, description="The causal-LM loss path this estimate assumed (TrainingSetup.loss_impl); None for other tasks.")


class ThroughputEstimate(_Strict):
    tokens_per_second: float = Field(description="Training tokens per second across all GPUs.")
    flops_per_token: float = Field(description="Training FLOPs per token (forward+backward+recompute).")
    mfu: float = Field(description="Assumed model-FLOPs utilisation (fraction of dense peak).")
    time_per_epoch_hours: Optional[float] = Field(default=None, description="Wall-clock hours per epoch.")
    total_hours: Optional[float] = Field(default=None, description="Wall-clock hours for all epochs.")
    gpu_hours: Optional[float] = Field(default=None, description="GPU-hours for all epochs.")
    cost: Optional[float] = Field(default=None, description="Cost at the given price per GPU-hour.")
    notes: list[str] = Field(default_factory=list, description="Assumptions and their sources.")
    step_seconds: Optional[float] = Field(default=None, description="Wall time of one optimizer step (all micro-batches of an accumulation window), seconds.")
    time_breakdown: Optional[dict[str, dict[str, float]]] = Field(default=None, description="Step seconds by phase (forward, recompute, backward, optimizer, communication, offload) and by op class (matmul, attention, elementwise, norm_softmax, optimizer, dequant, host_overhead, communication, offload).")
    time_model: str = Field(default="flat-factors", description="How the time was obtained: 'op-roofline' (per-op roofline over the simulated step's op trace, tools.memory.timing) or 'flat-factors' (FLOPs per token x stated utilisation factors, the analytic fallback).")
    calibrated: bool = Field(default=False, description="True when measured trial runs on this GPU with this method scaled the estimate.")


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

STEP_CATEGORIES = ("weights", "adapters", "gradients", "optimizer_state", "activations", "logits_loss", "temporaries",
                   # objectives (issue 15): a frozen reference copy, the KV cache of GRPO's generation
                   "reference_model", "kv_cache")


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
    peak_phase: str = Field(default="", description="Where the peak happened: forward, backward, optimizer, generation (GRPO), eval.")
    segment_breakdowns: Optional[dict[str, dict[str, int]]] = Field(
        default=None, description="Simulated tier: every segment's peak breakdown at full depth (forward, backward-loss, backward, "
        "backward-tail, optimizer, ...); the estimator re-chooses the peak where it models an engine on top of the simulated "
        "step (DeepSpeed's gradients: tools.memory.distributed.deepspeed_gradients).")
    eval_peak_bytes: Optional[int] = Field(default=None, description="Peak of an evaluation step when the setup evaluates.")
    largest_layer_param_bytes: int = Field(default=0, description="Bytes of the largest single transformer block's parameters (for ZeRO-3/FSDP all-gather buffers).")
    per_layer_bytes: Optional[int] = Field(default=None, description="Peak growth per extra transformer block (the extrapolation slope).")
    layers_simulated: Optional[list[int]] = Field(default=None, description="Depths actually simulated before extrapolation.")
    seconds: float = Field(default=0.0, description="Wall time of the computation.")
    notes: list[str] = Field(default_factory=list, description="Provenance and approximations.")
    op_trace: Optional[list[list]] = Field(default=None, description="The step's op cost records at full depth (tools.memory.timing: phase, op class, dtype, FLOPs, bytes, tile efficiency, causal, count); None for the analytic tier.")
    allocator_overhead_bytes: Optional[int] = Field(default=None, description="Peak reserved minus peak live bytes of PyTorch's caching allocator replayed over this step's allocation order (tools/memory/allocator.py); None when not replayed (analytic tier).")
    allocator_overhead_expandable_bytes: Optional[int] = Field(default=None, description="The same with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.")
    world_size: int = Field(default=1, ge=1, description="Ranks the simulated step was sharded over (1 = one unsharded replica; >1 = bytes are per rank of a sharded step).")
    rank: Optional[int] = Field(default=None, description="The rank a sharded step's bytes belong to (the worst rank).")
    offloaded_bytes: dict[str, int] = Field(default_factory=dict, description="Per rank, bytes a CPU-offloaded sharded step keeps in host RAM, by part (tools.memory.host.OFFLOAD_PARTS: offloaded_params, master_weights, optimizer_states, gradients, optimizer_step_temporaries).")
    offload_host_bytes: int = Field(default=0, description="Peak host (pinned) RAM of trl's activation offloading in one step; 0 without it.")
    offload_traffic_bytes: int = Field(default=0, description="Bytes activation offloading copies device->host per micro-batch (the same come back in backward).")


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
    fsdp: Optional[FSDPMode] = Field(default=None, description="Multi-GPU: plan only FSDP with this sharding (full_shard or shard_grad_op); None searches every engine.")
    fsdp_version: Literal[1, 2] = Field(default=2, description="FSDP implementation of FSDP candidates: 2 (FSDP2) or 1 (FSDP1).")
    mixed_precision: bool = Field(default=True, description="False: pure-precision training (weights in bf16 where the GPU has it, else fp32; no autocast).")

    objective: Objective = Field(default="sft", description="Training objective every candidate keeps (the planner never changes it): sft, dpo, kto, reward or grpo.")
    objective_knobs: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainingSetup objective fields fixed for every candidate, e.g. {'num_generations': 8, 'max_completion_length': 512, "
        "'use_vllm': true, 'beta': 0.04}; the planner varies the other objective levers (precompute_ref_log_probs, "
        "generation_batch_size, vllm_gpu_memory_utilization) only when a candidate does not fit otherwise.",
    )

    @model_validator(mode="after")
    def _objective_knobs_known(self) -> "PlanGoals":
        unknown = [k for k in self.objective_knobs if k not in OBJECTIVE_FIELDS]
        if unknown:
            raise ValueError(f"objective_knobs: {', '.join(unknown)} not objective fields; use {', '.join(OBJECTIVE_FIELDS)}")
        return self


# --------------------------------------------------------------------------------------
# Fit map (tunepilot sweep)
# --------------------------------------------------------------------------------------


class FitCell(_Strict):
    """One micro-batch x sequence-length point of a fit map."""

    per_device_train_batch_size: int = Field(description="Micro-batch per GPU.")
    max_length: int = Field(description="Tokens per sequence.")
    device_total_gib: float = Field(description="Device total per GPU (what nvidia-smi shows), GiB.")
    fits: bool = Field(description="True when device_total_gib is within the usable memory (GPU memory minus the safety margin).")
    tier: Literal["simulated", "analytic"] = Field(description="simulated at the fit boundary, analytic elsewhere.")


class FitRow(_Strict):
    """One sequence length of a fit map."""

    max_length: int = Field(description="Tokens per sequence of this row.")
    largest_fitting_batch: Optional[int] = Field(default=None, description="Largest micro-batch of this row that fits, or None when none does.")
    cells: list[FitCell] = Field(description="One cell per micro-batch, smallest first.")


class FitMap(_Strict):
    """Which micro-batch x sequence-length combinations of one setup fit one GPU (tunepilot sweep)."""

    model_id: str
    hardware: str = Field(description="Hardware swept for, e.g. '1x NVIDIA RTX 4090 (23.99 GiB)'.")
    setup_summary: str = Field(description="The setup swept (its micro-batch and sequence length vary).")
    gpu_memory_gib: float = Field(description="Memory of one GPU, GiB.")
    usable_gib: float = Field(description="GPU memory minus the safety margin, GiB: a cell fits when its device total is within it.")
    safety_margin: float = Field(description="Fraction of GPU memory kept free.")
    batch_sizes: list[int] = Field(description="Micro-batches swept (columns).")
    seq_lens: list[int] = Field(description="Sequence lengths swept (rows).")
    rows: list[FitRow] = Field(description="One row per sequence length, shortest first.")
    simulated_cells: int = Field(default=0, description="Cells confirmed by the simulator (the fit boundary).")
    notes: list[str] = Field(default_factory=list, description="How the map was made, and what the simulator could not run.")
