"""A REAL CPU step of trl 1.16's DPOTrainer / GRPOTrainer code path on a tiny model, tracked by the same storage
counter as the dry run (`tools.memory.make_tracker(fake=False)`), to check `tools.memory.objectives` against.

The trainer is trl's own: its collator builds the batch, `trainer.training_step` runs its `compute_loss`
(the policy forward with the fused LM head, the reference forward under no_grad with the adapter
disabled or on the frozen copy, GRPO's generation with `model.generate` and its scoring forwards) and
the backward; clipping and the optimizer step are the simulator's (`make_optimizer`, foreach clipping),
as in tests/_simulator_helpers.real_step. Step 1 creates the optimizer state; step 2 is measured.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tools.schemas import ModelSpec, TrainingSetup

from _script_helpers import SENTENCES, build_tokenizer


def _models(spec: ModelSpec, st: TrainingSetup):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(spec.model_type, **{k: v for k, v in spec.config.items() if k != "model_type"})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[st.dtype]

    def make():
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=st.attn_implementation)
        m.config.use_cache = False  # after construction, as the generated scripts do: generate() keeps its KV cache
        return m

    model = make()
    if st.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_config = None
    if st.method == "lora":  # passed to the trainer, which wraps the model (as the generated scripts do)
        peft_config = peft.LoraConfig(r=st.r, lora_alpha=st.lora_alpha, lora_dropout=st.lora_dropout,
                                      target_modules=st.target_modules, task_type="CAUSAL_LM")
    ref = None
    if st.reference_mode == "copy":
        ref = make()
        ref.requires_grad_(False)
        ref.eval()
    return model, ref, peft_config


def _prepare(trainer, st: TrainingSetup, peft_config):
    """What Trainer.train sets up before its first step: the accumulation count, input grads, the optimizer."""
    from tools.memory.step import make_optimizer

    trainer.current_gradient_accumulation_steps = st.gradient_accumulation_steps  # set by Trainer.train's loop
    if peft_config is not None and st.gradient_checkpointing:
        trainer.model.enable_input_require_grads()  # what Trainer.train does for a PEFT model with checkpointing
    params = [q for q in trainer.model.parameters() if q.requires_grad]
    return params, make_optimizer(trainer.model, st, params)


def _measure(model, ref, params, opt, step, *, generation=None) -> dict:
    import torch

    from tools.memory import make_tracker
    from tools.memory.step import CudaLikeDropout

    with warnings.catch_warnings(), CudaLikeDropout():
        warnings.simplefilter("ignore")
        step(None)
        opt.zero_grad(set_to_none=True)
        tracker = make_tracker(fake=False)
        states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        resident = list(model.parameters()) + list(model.buffers()) + states
        if ref is not None:
            resident += list(ref.parameters()) + list(ref.buffers())
        with tracker:
            for t in resident:
                tracker.add(t)
            tracker.phase = "forward"
            tracker.reset_peak()
            step(tracker)
            tracker.finish()
        out = {"peak_bytes": tracker.peak, "segment_peaks": dict(tracker.seg_peak), "resident_bytes": _bytes(resident), "trainable_parameters": sum(p.numel() for p in params),
               "reference_bytes": _bytes(list(ref.parameters()) + list(ref.buffers())) if ref is not None else 0}
        if generation is not None:
            # generation and scoring alone (GRPO's _generate_and_score_completions), on top of the same resident state
            opt.zero_grad(set_to_none=True)
            gen = make_tracker(fake=False)
            with gen:
                for t in resident:
                    gen.add(t)
                gen.reset_peak()
                kept = generation()
                gen.finish()
            del kept
            out["generation_peak_bytes"] = gen.peak
    return out


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _config_kwargs(st: TrainingSetup, tmp: Path) -> dict:
    return dict(
        output_dir=str(tmp / "out"), per_device_train_batch_size=st.per_device_train_batch_size,
        gradient_accumulation_steps=st.gradient_accumulation_steps, learning_rate=st.learning_rate,
        bf16=False, fp16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
        activation_checkpointing=st.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        max_grad_norm=st.max_grad_norm, beta=st.effective_beta,
    )


def real_dpo_step(spec: ModelSpec, st: TrainingSetup, tmp: Path) -> dict:
    """Two real steps of DPOTrainer.training_step on worst-case pairs (every row max_length, prompt_length masked)."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, ref, peft_config = _models(spec, st)
    tok = build_tokenizer(tmp / "tok")
    cfg = DPOConfig(**_config_kwargs(st, tmp), max_length=st.max_length, precompute_ref_log_probs=False)
    data = Dataset.from_dict({"prompt": ["the model"] * 2, "chosen": ["learns"] * 2, "rejected": ["answer"] * 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft_config)
    if st.reference_mode == "precomputed":
        trainer.precompute_ref_logps = True
    g = torch.Generator().manual_seed(0)
    p, s, b = st.prompt_length, st.max_length, st.per_device_train_batch_size
    rows = []
    for _ in range(b):
        ids = torch.randint(0, spec.vocab_size, (3 * s,), generator=g).tolist()
        row = {"prompt_ids": ids[:p], "chosen_ids": ids[p:s], "rejected_ids": ids[s:2 * s - p]}
        if st.reference_mode == "precomputed":
            row.update(ref_chosen_logps=-10.0, ref_rejected_logps=-12.0)
        rows.append(row)
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape == (2 * b, s)
    params, opt = _prepare(trainer, st, peft_config)

    def step(tracker):
        trainer.training_step(trainer.model, dict(batch))
        if tracker is not None:
            tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, st.max_grad_norm, foreach=True)
        opt.step()

    return _measure(trainer.model, trainer.ref_model, params, opt, step)


def real_grpo_step(spec: ModelSpec, st: TrainingSetup, tmp: Path) -> dict:
    """Two real GRPOTrainer.training_step calls: model.generate of full-length completions, scoring, training."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, _, peft_config = _models(spec, st)
    tok = build_tokenizer(tmp / "tok")
    words = " ".join(SENTENCES).split()
    p, c, g = st.prompt_length, st.max_completion_length, st.num_generations
    prompts = [" ".join(words[i:i + p]) for i in range(st.grpo_generation_batch // g)]
    assert all(len(tok(x)["input_ids"]) == p for x in prompts)
    cfg = GRPOConfig(
        **_config_kwargs(st, tmp), num_generations=g, max_completion_length=c,
        generation_kwargs={"min_new_tokens": c}, generation_batch_size=st.grpo_generation_batch,
    )

    def reward(completions, **kwargs):
        return [float(len(x)) for x in completions]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, processing_class=tok, peft_config=peft_config,
                              train_dataset=Dataset.from_dict({"prompt": prompts}))
    raw = [{"prompt": x} for x in prompts for _ in range(g)]
    params, opt = _prepare(trainer, st, peft_config)

    def step(tracker):
        trainer.training_step(trainer.model, list(raw), None)
        if tracker is not None:
            tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, st.max_grad_norm, foreach=True)
        opt.step()

    def generation():
        trainer._buffered_inputs = None
        return trainer._prepare_inputs(list(raw))

    return _measure(trainer.model, trainer.ref_model, params, opt, step, generation=generation)
