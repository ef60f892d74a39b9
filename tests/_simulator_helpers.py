"""Tiny real models and a real CPU training step to check the memory engine (tools.memory) against.

The real step allocates every tensor (tiny model, CPU) and is tracked by the same storage counter the
simulator uses, so simulated and measured peaks can be compared; resident bytes are summed straight
from the tensors (p.nbytes, p.grad.nbytes, optimizer.state) with no tracker involved.
"""

from __future__ import annotations

import warnings

from tools.schemas import ModelSpec, TrainingSetup

TINY_LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, tie_word_embeddings=False,
)


def tiny_spec(config: dict | None = None, **overrides) -> ModelSpec:
    """A ModelSpec for a tiny config (Llama by default); overrides go into the config dict."""
    cfg = dict(config or TINY_LLAMA)
    cfg.update(overrides)
    layers = cfg.get("num_hidden_layers", 2)
    hidden = cfg.get("hidden_size", 64)
    heads = cfg.get("num_attention_heads", 4)
    return ModelSpec(
        model_id=f"tiny-{cfg['model_type']}", architecture="TinyForCausalLM", model_type=cfg["model_type"],
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads", heads), head_dim=hidden // heads,
        intermediate_size=cfg.get("intermediate_size", 4 * hidden), vocab_size=cfg.get("vocab_size", 256),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), num_parameters=0, source="test", config=cfg,
    )


def setup(**kw) -> TrainingSetup:
    """A small TrainingSetup (b=2, s=64) with the given overrides."""
    base = dict(model_id="tiny", max_length=64, per_device_train_batch_size=2)
    base.update(kw)
    return TrainingSetup(**base)


def real_step(spec: ModelSpec, st: TrainingSetup, device: str = "cpu", *, cuda_loss: bool = True,
              prepare=None) -> dict:
    """Run two REAL training steps (step 1 complete, step 2 measured) and measure them.

    The loss is the setup's loss path (`tools.memory.loss`: trl's fused head — on its CUDA path
    unless cuda_loss=False —, transformers' loss, or the Liger/CCE stand-ins), as the dry run runs it.
    `prepare(model)` runs on the freshly built transformers model, before peft wraps it.
    Returns exact resident bytes summed from the tensors and the peak of step 2: tracked storage by
    storage on CPU; on CUDA, torch.cuda.max_memory_allocated (the caching allocator's own count).
    """
    import peft
    import torch
    import transformers

    from tools.memory.step import CudaLikeDropout, make_optimizer
    from tools.memory.tracker import make_tracker
    from tools.memory import loss as loss_paths

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(spec.model_type, **{k: v for k, v in spec.config.items() if k != "model_type"})
    cfg.use_cache = False
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[st.dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if st.task == "sequence-classification":
            cfg.num_labels = st.num_labels
            auto = transformers.AutoModelForSequenceClassification
        else:
            auto = transformers.AutoModelForCausalLM
        with torch.device(device):
            model = auto.from_config(cfg, dtype=dtype, attn_implementation=st.attn_implementation)
            if prepare is not None:  # e.g. what another transformers version's modules add (test_simulator)
                prepare(model)
        if st.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if st.method == "lora":
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=st.r, lora_alpha=st.lora_alpha, lora_dropout=st.lora_dropout,
                target_modules=st.target_modules,
                task_type="SEQ_CLS" if st.task == "sequence-classification" else "CAUSAL_LM"))
            if st.gradient_checkpointing:
                model.enable_input_require_grads()
    loss_paths.prepare_liger_layers(model, st)
    forward = loss_paths.forward_for(st)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, st, params)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(st.compute_dtype)
    extra = {}
    if st.packing and st.task == "causal-lm":
        # trl's padding-free packing: the batch as one row, position_ids restarting at every example
        ids = torch.randint(0, spec.vocab_size, (1, st.per_device_train_batch_size * st.max_length), device=device)
        extra["position_ids"] = torch.arange(st.max_length, device=device).repeat(st.per_device_train_batch_size)[None]
    else:
        ids = torch.randint(0, spec.vocab_size, (st.per_device_train_batch_size, st.max_length), device=device)
    if st.task == "sequence-classification":
        labels = torch.zeros(st.per_device_train_batch_size, dtype=torch.long, device=device)
    else:
        labels = ids

    scaler = torch.amp.GradScaler(device) if st.fp16 else None  # the Trainer's fp16 path

    def step():
        ctx = torch.autocast(device, dtype=amp_dtype) if (st.bf16 or st.fp16) else torch.autocast(device, enabled=False)
        batch = dict(input_ids=ids, labels=labels, **extra,
                     **({} if st.task == "sequence-classification" else {"use_cache": False}))
        with loss_paths.step_context(model, st, cuda=cuda_loss):
            out = forward(model, st, batch, ctx)
            loss = out.loss
            del out
            (scaler.scale(loss) if scaler else loss).backward()
            del loss
        if scaler:
            scaler.unscale_(opt)
        if st.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, st.max_grad_norm, foreach=True)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    with warnings.catch_warnings(), CudaLikeDropout():  # same dropout kernel as the simulator (and CUDA)
        warnings.simplefilter("ignore")
        step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        tracker = make_tracker(fake=False)
        states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        if device == "cpu":
            with tracker:
                # what exists before step 2 (parameters, buffers, optimizer state) is live from the start
                for t in list(model.parameters()) + list(model.buffers()) + states:
                    tracker.add(t)
                tracker.reset_peak()
                step()
                tracker.finish()
            peak = tracker.peak
            host_peak = tracker.host_peak
    seen = set()
    resident = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t.untyped_storage())
        if key not in seen:
            seen.add(key)
            resident += t.untyped_storage().nbytes()
    states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    state_store = {id(v.untyped_storage()): v.untyped_storage().nbytes() for v in states}
    state_bytes = sum(state_store.values())
    return {
        "frozen_bytes": sum(p.nbytes for p in model.parameters() if not p.requires_grad),
        "trainable_bytes": sum(p.nbytes for p in params),
        "param_and_buffer_bytes": resident,
        "gradient_bytes": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_bytes": state_bytes,
        "peak_bytes": peak,
        "host_peak_bytes": host_peak if device == "cpu" else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "num_parameters": sum(p.numel() for p in model.parameters()),  # tied parameters once (as HF counts)
    }
