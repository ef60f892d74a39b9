"""One simulated step of a preference or RL objective (issue 15): DPO, KTO, reward models, GRPO.

`run(model, setup, depth)` is `tools.memory.step.run` for `setup.objective != "sft"`: the same build,
prepare, optimizer, state step, backward, clipping, optimizer step and measurement, with the parts
trl 1.16's trainers add, executed with trl's own functions where they are plain PyTorch:

- **the fused LM head**: `trl.trainer.utils.add_fused_lm_head` patched onto the policy (and onto the
  reference copy) exactly as DPOTrainer / KTOTrainer / GRPOTrainer do, called with
  `fused_lm_head=True` and labels masked to the completion (so the `(rows, seq, vocab)` logits never
  exist); `trl.kernels.ChunkedLogProbFunction` runs as it is.
- **the reference model** (`setup.reference_mode`): `copy` builds a second frozen transformers model
  (quantized like the policy) that stays resident (component `reference_model`) and runs its forward
  under `torch.no_grad()`; `peft_base` runs the policy itself inside trl's `use_adapter(model, None)`
  (adapter disabled) and `disable_gradient_checkpointing`, under no_grad; `precomputed` reads
  per-row reference log-probs from the batch. The reference forward of DPO/KTO runs after the
  policy's forward, while the policy's activations are alive, as `_compute_loss` does.
- **DPO**: one batch of 2 x micro-batch rows (chosen rows, then rejected rows), each `max_length`
  tokens with the first `prompt_length` masked out of the labels; the per-sequence log-prob sums,
  the loss (trl's sigmoid form) and the metrics trl computes (entropy, mean logits, top-1, rewards).
- **KTO**: the KL rows (mismatched prompt/completion, no grad) before the policy forward, then the
  reference forward and reference KL forward.
- **reward**: a sequence classifier with one output on 2 x micro-batch rows; Bradley-Terry loss.
- **GRPO**: generation first (`generate` segment): transformers' `generate` is data dependent (EOS
  checks), so its memory is reproduced with the model's own forwards on a real `DynamicCache`: the
  prefill of the local generation batch (`grpo_generation_batch / num_gpus` rows of
  `prompt_length` tokens, `logits_to_keep=1`), the cache grown to `prompt + completion - 1` tokens
  (component `kv_cache`: exactly the tensors the cache holds at the last step), then the last decode
  step (one token against the full cache, whose `torch.cat` briefly holds two copies of one layer)
  and sampling (fp32 logits, softmax, multinomial). With vLLM none of this is on the training
  side (colocated vLLM's reserved fraction is added by `tools.estimator`; server mode's GPUs are
  apart). Then the no-grad scoring forwards in micro-batch chunks: the reference log-probs when
  beta > 0, the old log-probs when generation and optimisation steps are misaligned or vLLM's
  importance sampling correction is on. Then the training forward on the micro-batch of
  prompt + completion rows, trl's GRPO loss (ratio, clipping, KL when beta > 0), backward.

The dry run takes trl's CUDA path of the fused head where `tools.memory.kernels` provides it
(only labelled positions are projected); without it, the CPU path (every position) is run.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

from tools.memory import SimulationError
from tools.memory import step as _step
from tools.memory.build import TORCH_DTYPES, blocks, build_model, head_module, materialise, retie
from tools.schemas import ModelSpec, TrainingSetup

# outputs of the fused head per trainer (trl 1.16)
_POLICY_OUTPUTS = {
    "dpo": ("log_probs", "entropy", "mean_logits", "is_top1"),
    "kto": ("log_probs",),
    "grpo": ("log_probs", "entropy"),
}


def run(model: ModelSpec, setup: TrainingSetup, depth: int, *, cuda_path: bool | None = None) -> _step.RunResult:
    """Two steps of `setup.objective` at `depth` blocks on fake tensors (see the module docstring)."""
    import torch

    from tools.memory.tracker import make_tracker

    prep = _step.build(model, setup, depth)
    ref = build_reference(model, setup, depth) if setup.reference_mode == "copy" else None
    if setup.objective != "reward":
        # DPOConfig / KTOConfig / GRPOConfig disable_dropout=True: trl zeroes every nn.Dropout of policy and reference
        from trl.trainer.utils import disable_dropout_in_model

        disable_dropout_in_model(prep.pm)
        if ref is not None:
            disable_dropout_in_model(ref)
    compute = getattr(torch, TORCH_DTYPES[setup.compute_dtype])
    tracker = make_tracker()
    with _step.TrainingMaskPolicy(False), _step.CudaLikeDropout(), _step.CudaGroupedMm(), tracker, warnings.catch_warnings(), _head_path(cuda_path):
        warnings.simplefilter("ignore")
        _step.prepare(prep, setup, tracker)
        if ref is not None:
            prepare_reference(ref, setup, tracker)
        attach_heads(prep, ref, setup, tracker)
        optimizer = _step.make_step_optimizer(prep, setup, tracker)
        # DeepSpeed: no autocast (tools.memory.step.run)
        amp = torch.autocast("cpu", dtype=compute) if (setup.bf16 or setup.fp16) and not setup.zero_stage else nullcontext()
        _step.state_step(prep, optimizer, setup, tracker)
        kept = None
        if setup.objective == "grpo":
            kept = generate_and_score(prep, ref, setup, tracker, amp)
        forward = make_forward(prep, ref, setup, tracker, kept)
        leftovers = _step.train_step(prep, optimizer, setup, tracker, amp, forward=forward)  # noqa: F841
        extra = {"reference_model": list(ref.parameters()) + list(ref.buffers())} if ref is not None else {}
        measured = _step.measure(prep, optimizer, tracker, extra=extra)
        del kept
        _labelled(None)
    prep.notes.extend(_step._kernel_notes(setup))
    prep.notes.extend(notes(setup))
    return _step.RunResult(
        **measured, num_parameters=prep.num_parameters, trainable_parameters=prep.trainable_parameters,
        eval_peak_bytes=None, largest_layer_param_bytes=prep.largest_layer_param_bytes, notes=prep.notes,
    )


def notes(setup: TrainingSetup) -> list[str]:
    """What this objective's dry run simulated, in words."""
    out = [f"objective {setup.objective}: trl 1.16's loss path with its fused LM head (log-probs of the completion tokens only)"]
    ref = setup.reference_mode
    if ref == "copy":
        out.append("reference model: a second frozen copy of the weights, resident for the whole step, forward under no_grad")
    elif ref == "peft_base":
        out.append("reference model: the policy with its adapter disabled (trl use_adapter), forward under no_grad, no second copy")
    elif ref == "precomputed":
        out.append("reference log-probs precomputed before training (one extra no-grad pass over the data, no reference kept)")
    if setup.objective == "dpo":
        out.append(f"DPO: chosen + rejected = {2 * setup.per_device_train_batch_size} rows of {setup.max_length} tokens per micro-batch, "
                   f"{setup.prompt_length} prompt tokens masked from the labels")
    if setup.objective == "grpo":
        local = setup.grpo_generation_batch // max(1, setup.num_gpus)
        if setup.use_vllm:
            out.append(f"GRPO: generation in vLLM ({setup.vllm_mode}); the trainer only scores and trains")
        else:
            out.append(f"GRPO: model.generate of {local} completions per GPU, KV cache of {setup.prompt_length} + "
                       f"{setup.max_completion_length} tokens (prefill, cache at full length, last decode step and sampling simulated)")
    return out


def _head_path(cuda_path: bool | None):
    """trl's CUDA path of the fused head (tools.memory.kernels.trl_cuda_path: only labelled positions are projected,
    Triton folds in place), with the number of labelled positions known from the batch; the CPU path otherwise."""
    import contextlib

    if cuda_path is False:
        return nullcontext()
    try:
        from tools.memory.kernels import trl_cuda_path  # noqa: PLC0415 - the loss-path stand-ins
    except ImportError:
        return nullcontext()

    @contextlib.contextmanager
    def ctx():
        with trl_cuda_path(), _KnownCountMaskIndex():
            yield

    return ctx()


class _Labelled:
    """Labelled positions per fused-head call of the current forward (prompt tokens carry label -100)."""

    count: int | None = None


def _labelled(n: int | None) -> None:
    _Labelled.count = n


def _known_count_mask_index():
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    class KnownCountMaskIndex(torch.overrides.TorchFunctionMode):
        """`x[mask]` on fake tensors with a boolean label mask whose number of true positions the batch fixes
        (the completion tokens): a compact copy of that many rows, as CUDA's `hidden_states[mask]` makes."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            n = _Labelled.count
            if n is not None and func is torch.Tensor.__getitem__ and len(args) == 2:
                x, idx = args
                if (isinstance(idx, FakeTensor) and idx.dtype == torch.bool and isinstance(x, torch.Tensor)
                        and 0 < idx.ndim <= x.ndim and tuple(idx.shape) == tuple(x.shape[: idx.ndim])):
                    return x.flatten(0, idx.ndim - 1)[:n].clone()
            return func(*args, **kwargs)

    return KnownCountMaskIndex()


def _KnownCountMaskIndex():  # noqa: N802 - used like a class
    return _known_count_mask_index()


# --------------------------------------------------------------------------------------
# The reference copy
# --------------------------------------------------------------------------------------


def build_reference(model: ModelSpec, setup: TrainingSetup, depth: int) -> Any:
    """The frozen reference: the same transformers model again (no adapter), on meta."""
    ref = build_model(model, setup.model_copy(update={"gradient_checkpointing": False}), depth)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def prepare_reference(ref, setup: TrainingSetup, tracker) -> None:
    """Materialise the reference under the fake mode, quantized like the policy, in eval mode."""
    materialise(ref, tracker)
    retie(ref)
    if setup.load_in_4bit or setup.load_in_8bit:
        holder = _step.Prepared(pm=ref, base=ref, head=head_module(ref), is_peft=False, vocab=0)
        _step.quantize(holder, setup)
    ref.eval()


def attach_heads(prep: _step.Prepared, ref, setup: TrainingSetup, tracker) -> None:
    """trl's fused LM head on the policy (and the reference copy), and the head phase after the backbone."""
    if setup.objective == "reward":
        return
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(prep.base, outputs=_POLICY_OUTPUTS[setup.objective])
    backbone = getattr(prep.base, "base_model", None)
    if backbone is not None and backbone is not prep.base:
        def _after_backbone(*_):
            if tracker.phase == "forward":
                tracker.phase = "forward-head"
        backbone.register_forward_hook(_after_backbone)
    if ref is not None:
        add_fused_lm_head(ref)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def _rows(setup: TrainingSetup, rows: int, seq: int, prompt: int, vocab: int) -> dict:
    """A padded batch as trl's collators make it for full-length rows: input_ids, attention_mask, completion_mask."""
    import torch

    ids = torch.randint(0, max(2, vocab), (rows, seq))
    attention = torch.ones(rows, seq, dtype=torch.long)
    completion = torch.ones(rows, seq, dtype=torch.long)
    completion[:, :prompt] = 0
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _fwd_kwargs(batch: dict) -> dict:
    # full-length rows: the all-ones attention mask is what transformers drops on real tensors (SDPA is_causal)
    return {"input_ids": batch["input_ids"], "use_cache": False}


def _reference_context(prep: _step.Prepared, setup: TrainingSetup, tracker, phase: str = "reference"):
    """no_grad + trl's disable_gradient_checkpointing (+ use_adapter(None) for the PEFT base)."""
    import contextlib

    import torch
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    @contextlib.contextmanager
    def ctx():
        previous = tracker.phase
        tracker.phase = phase
        with torch.no_grad(), disable_gradient_checkpointing(prep.pm, {"use_reentrant": False}):
            if setup.reference_mode == "peft_base":
                with use_adapter(prep.pm, adapter_name=None):
                    yield
            else:
                yield
        _step._mark_recompute(blocks(prep.base), tracker)  # re-enabling checkpointing replaced the wrapped functions
        tracker.phase = previous if previous != "forward" else "forward-head"

    return ctx()


def _ref_logps(prep, ref, setup, tracker, kwargs: dict, labels, phase: str = "reference") -> Any:
    """Per-token reference log-probs of a batch (None when precomputed)."""
    if setup.reference_mode in ("none", "precomputed"):
        return None
    with _reference_context(prep, setup, tracker, phase):
        model = ref if ref is not None else prep.pm
        out = model(**kwargs, labels=labels, fused_lm_head=True)
        logps = out.log_probs
        del out
    return logps


# --------------------------------------------------------------------------------------
# The forward + loss of each objective (tools.memory.step.train_step calls it)
# --------------------------------------------------------------------------------------


def make_forward(prep: _step.Prepared, ref, setup: TrainingSetup, tracker, kept):
    """The `forward` for `train_step`: same signature as `tools.memory.step.forward_loss`."""
    fn = {"dpo": _dpo, "kto": _kto, "reward": _reward, "grpo": _grpo}.get(setup.objective)
    if fn is None:
        raise SimulationError(f"objective: {setup.objective} has no simulated step")

    def forward(pm, setup_, batch, amp):
        del batch  # the objective builds its own batch (pairs, KL rows, completions)
        with amp:
            return fn(prep, ref, setup_, tracker, kept)

    return forward


def _dpo(prep, ref, setup: TrainingSetup, tracker, kept) -> _step.ForwardOutput:
    """trl 1.16 DPOTrainer._compute_loss (sigmoid loss, no ld_alpha, no WPO weighting)."""
    import torch
    import torch.nn.functional as F

    b = setup.per_device_train_batch_size
    batch = _rows(setup, 2 * b, setup.max_length, setup.prompt_length, prep.vocab)
    if setup.reference_mode == "precomputed":
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = torch.zeros(b), torch.zeros(b)
    kwargs = _fwd_kwargs(batch)
    completion_mask = batch["completion_mask"]
    shift_mask = completion_mask[..., 1:]
    labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
    _labelled(2 * b * (setup.max_length - setup.prompt_length))  # labels[:, 1:] != -100: the completion tokens
    outputs = prep.pm(**kwargs, labels=labels, fused_lm_head=True)
    seq_len = shift_mask.size(1)
    per_token = outputs.log_probs[:, -seq_len:]
    logps = per_token.sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)
    ref_tok = _ref_logps(prep, ref, setup, tracker, kwargs, labels)
    if ref_tok is None:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = ref_tok[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
    beta = setup.effective_beta
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss = (-F.logsigmoid(beta * delta)).mean()
    # the metrics _compute_loss logs (small reductions over [2b, seq])
    (outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()
    chosen_mean, _ = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
    chosen_mask, _ = shift_mask.chunk(2, dim=0)
    (chosen_mean * chosen_mask).sum()
    top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
    (top1 & chosen_mask.bool()).sum()
    return _step.ForwardOutput(loss=loss, logits=None, output=(outputs, batch))


def _kto(prep, ref, setup: TrainingSetup, tracker, kept) -> _step.ForwardOutput:
    """trl 1.16 KTOTrainer._compute_loss: KL rows (no grad), policy forward, reference and reference-KL forwards."""
    import torch

    b = setup.per_device_train_batch_size
    batch = _rows(setup, b, setup.max_length, setup.prompt_length, prep.vocab)
    kl = _rows(setup, b, setup.max_length, setup.prompt_length, prep.vocab)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kl_labels = kl["input_ids"].masked_fill(kl["completion_mask"] == 0, -100)
    calculate_kl = setup.effective_loss_type == "kto"
    _labelled(b * (setup.max_length - setup.prompt_length))
    if calculate_kl:
        with torch.no_grad():
            kl_logps = prep.pm(**_fwd_kwargs(kl), labels=kl_labels, fused_lm_head=True).log_probs.sum(-1)
    outputs = prep.pm(**_fwd_kwargs(batch), labels=labels, fused_lm_head=True)
    logps = outputs.log_probs.sum(-1)
    if setup.reference_mode == "precomputed":
        ref_logps, ref_kl = torch.zeros(b), torch.zeros(b)
    else:
        ref_kl_tok = _ref_logps(prep, ref, setup, tracker, _fwd_kwargs(kl), kl_labels) if calculate_kl else None
        ref_tok = _ref_logps(prep, ref, setup, tracker, _fwd_kwargs(batch), labels)
        ref_logps = ref_tok.sum(-1)
        ref_kl = ref_kl_tok.sum(-1) if ref_kl_tok is not None else None
    beta = setup.effective_beta
    kl_term = (kl_logps - ref_kl).mean().clamp(min=0).detach() if calculate_kl else torch.zeros(())
    ratio = logps - ref_logps
    half = max(1, b // 2)  # label true / false halves (the worst case holds both)
    loss = torch.cat([1 - torch.sigmoid(beta * (ratio[:half] - kl_term)), 1 - torch.sigmoid(beta * (kl_term - ratio[half:]))]).mean()
    return _step.ForwardOutput(loss=loss, logits=None, output=(outputs, batch, kl))


def _reward(prep, ref, setup: TrainingSetup, tracker, kept) -> _step.ForwardOutput:
    """trl 1.16 RewardTrainer.compute_loss: chosen and rejected rows through the one-output classifier."""
    import torch.nn.functional as F

    b = setup.per_device_train_batch_size
    batch = _rows(setup, 2 * b, setup.max_length, 0, prep.vocab)
    out = prep.pm(input_ids=batch["input_ids"])
    rewards = out.logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return _step.ForwardOutput(loss=loss, logits=out.logits, output=(out, batch))


# --------------------------------------------------------------------------------------
# GRPO: generation, scoring, the training forward
# --------------------------------------------------------------------------------------


def _needs_old_logps(setup: TrainingSetup) -> bool:
    """trl computes the sampling policy's log-probs when generation and optimisation steps are misaligned, or with vLLM."""
    global_batch = setup.per_device_train_batch_size * setup.num_gpus
    steps_per_generation = setup.grpo_generation_batch // global_batch
    return setup.gradient_accumulation_steps % steps_per_generation != 0 or setup.use_vllm


def generate_and_score(prep: _step.Prepared, ref, setup: TrainingSetup, tracker, amp) -> dict:
    """GRPO's `_generate_and_score_completions` on this GPU: generation (unless vLLM) and the no-grad scoring forwards."""
    import torch

    local = max(1, setup.grpo_generation_batch // max(1, setup.num_gpus))
    p, c = setup.prompt_length, setup.max_completion_length
    tracker.phase = "generate"
    if not setup.use_vllm:
        _generate(prep, setup, tracker, local, p, c)
    # what the buffered generation batch keeps until its last micro-batch has trained
    kept: dict = {
        "prompt_completion_ids": torch.randint(0, max(2, prep.vocab), (local, p + c)),
        "attention_mask": torch.ones(local, p + c, dtype=torch.long),
        "completion_mask": torch.ones(local, c, dtype=torch.long),
        "advantages": torch.zeros(local),
    }
    labels = kept["prompt_completion_ids"].masked_fill(kept["attention_mask"] == 0, -100)
    labels[:, :-c] = -100
    micro = setup.per_device_train_batch_size
    _labelled(min(micro, local) * c)  # the completion tokens of one scoring chunk
    if _needs_old_logps(setup):
        with torch.no_grad(), amp:
            parts = []
            for start in range(0, local, micro):
                sl = slice(start, start + micro)
                out = prep.pm(input_ids=kept["prompt_completion_ids"][sl], use_cache=False, labels=labels[sl], fused_lm_head=True)
                parts.append(out.log_probs[:, -c:])
                del out
            kept["old_per_token_logps"] = torch.cat(parts, dim=0)
    if setup.reference_mode != "none":
        parts = []
        for start in range(0, local, micro):
            sl = slice(start, start + micro)
            with amp:
                tok = _ref_logps(prep, ref, setup, tracker, {"input_ids": kept["prompt_completion_ids"][sl], "use_cache": False},
                                 labels[sl], phase="generate-reference")
            parts.append(tok[:, -c:])
        kept["ref_per_token_logps"] = torch.cat(parts, dim=0)
    tracker.phase = "forward"
    return kept


def _generate(prep: _step.Prepared, setup: TrainingSetup, tracker, local: int, p: int, c: int) -> None:
    """model.generate's memory: prefill, the cache at full length, the last decode step and sampling."""
    import torch
    from transformers import DynamicCache

    pm, base = prep.pm, prep.base
    with torch.no_grad():
        cache = DynamicCache(config=base.config)
        ids = torch.randint(0, max(2, prep.vocab), (local, p))
        out = pm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _tag_cache(cache, tracker)
        _sample(out.logits)
        del out
        # the cache grown to prompt + completion - 1 tokens: what it holds before the last decode step
        full = p + c - 1
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None:
                continue
            window = getattr(layer, "sliding_window", None)
            length = min(full, window - 1) if isinstance(window, int) and window > 0 else full
            k, v = layer.keys, layer.values
            layer.keys = k.new_empty(k.shape[:-2] + (length, k.shape[-1]))
            layer.values = v.new_empty(v.shape[:-2] + (length, v.shape[-1]))
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = full
            del k, v
        _tag_cache(cache, tracker)
        nxt = torch.randint(0, max(2, prep.vocab), (local, 1))
        out = pm(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _tag_cache(cache, tracker)
        _sample(out.logits)
        del out, cache


def _tag_cache(cache, tracker) -> None:
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                r = tracker.rec_of(t)
                if r is not None:
                    r.tag = "kv_cache"


def _sample(logits) -> None:
    """generate's sampling step: fp32 copy of the last position's logits, softmax, multinomial."""
    import torch

    scores = logits[:, -1, :].to(copy=True, dtype=torch.float32)
    probs = torch.softmax(scores, dim=-1)
    torch.multinomial(probs, num_samples=1)


def _grpo(prep, ref, setup: TrainingSetup, tracker, kept) -> _step.ForwardOutput:
    """trl 1.16 GRPOTrainer._compute_loss on one micro-batch of prompt + completion rows (dapo/grpo normalisation)."""
    import torch

    b = setup.per_device_train_batch_size
    c = setup.max_completion_length
    ids = kept["prompt_completion_ids"][:b]
    mask = kept["completion_mask"][:b]
    labels = ids.masked_fill(kept["attention_mask"][:b] == 0, -100)
    labels[:, :-c] = -100
    _labelled(b * c)
    outputs = prep.pm(input_ids=ids, use_cache=False, labels=labels, fused_lm_head=True)
    logps = outputs.log_probs[:, -c:]
    entropies = outputs.entropy[:, -c:]
    old = kept["old_per_token_logps"][:b] if "old_per_token_logps" in kept else logps.detach()
    advantages = kept["advantages"][:b].unsqueeze(1)
    log_ratio = logps - old
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 0.8, 1.2)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if setup.effective_beta > 0:
        ref_tok = kept["ref_per_token_logps"][:b]
        per_token_kl = torch.exp(ref_tok - logps) - (ref_tok - logps) - 1
        per_token_loss = per_token_loss + setup.effective_beta * per_token_kl
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    (entropies.detach() * mask).sum()
    return _step.ForwardOutput(loss=loss, logits=None, output=(outputs,))
