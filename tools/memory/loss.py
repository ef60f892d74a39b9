"""The loss paths of the dry run: forward + loss of one micro-batch, exactly as the generated script computes it.

`forward_for(setup)` returns the function the step runs for `setup.loss_impl` (signature of
`tools.memory.step.forward_loss`: `(pm, setup, batch, amp) -> ForwardOutput`):

- `trl_fused` — trl 1.16's `SFTTrainer.compute_loss`: `add_fused_lm_head` on the transformers
  model, `model(**inputs, fused_lm_head=True)`, per-token log-probs summed over the labelled tokens.
  The real trl code runs; with `cuda=True` (the default for estimates) it takes its CUDA path
  (`tools.memory.kernels.trl_cuda_path`: compact positions, Triton fold and out-dtype GEMM
  stand-ins); `cuda=False` runs it exactly as it runs on this CPU (the tests compare both with real
  CPU steps).
- `hf` — transformers' own loss: `model(labels=...)` builds the full logits, upcasts them, and
  runs `ForCausalLMLoss` (that is `tools.memory.step.forward_loss`).
- `liger` — liger-kernel's `lce_forward`: the backbone, then `LigerForCausalLMLoss` over the last
  hidden state (stand-in `kernels.LigerFusedLinearCrossEntropy`).
- `cce` — the backbone, then `cut_cross_entropy.linear_cross_entropy(hidden, lm_head.weight,
  labels, shift=True)` (stand-in `kernels.CutCrossEntropy`).

For the fused paths the "logits" the step watches (to know when the loss backward is over) is the
last hidden state entering the head. `use_liger_kernel` swaps Liger's RMSNorm/SwiGLU/RoPE
stand-ins into the model (`prepare_liger_layers`). The functions take the model, not a Trainer, so
other objectives (DPO/GRPO policies score with the same fused head) can reuse `fused_hidden_loss`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from tools.schemas import TrainingSetup


def _unwrap(pm):
    """The transformers model under a peft wrapper."""
    get = getattr(pm, "get_base_model", None)
    return get() if callable(get) and hasattr(pm, "peft_config") else pm


def _backbone(base):
    """The decoder stack that produces the last hidden state (trl: `getattr(model, 'base_model')`)."""
    return getattr(base, "base_model", None) or getattr(base, base.base_model_prefix)


class _HiddenCatcher:
    """A forward hook on the backbone: remembers its last hidden state and marks the start of the head phase."""

    def __init__(self, base):
        from tools.memory.kernels import enter_head_phase

        self.hidden = None
        self._enter = enter_head_phase
        self._handle = _backbone(base).register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        hs = getattr(output, "last_hidden_state", None)
        if hs is None and isinstance(output, (tuple, list)):
            hs = output[0]
        self.hidden = hs
        self._enter()

    def remove(self):
        self._handle.remove()


def _output(loss, logits, output):
    from tools.memory.step import ForwardOutput

    return ForwardOutput(loss=loss, logits=logits, output=output)


def trl_fused_forward(pm, setup: TrainingSetup, batch: dict, amp):
    """SFTTrainer.compute_loss with trl's fused LM head (its CUDA path when the step runs in `step_context`)."""
    from tools.memory.kernels import add_trl_fused_head, sft_fused_loss

    base = _unwrap(pm)
    add_trl_fused_head(base)
    catcher = _HiddenCatcher(base)
    try:
        with amp:
            loss, out = sft_fused_loss(pm, _without_use_cache(batch))
    finally:
        catcher.remove()
    return _output(loss, catcher.hidden, out)


def hf_forward(pm, setup: TrainingSetup, batch: dict, amp):
    """transformers' own loss inside the model (full logits, fp32 upcast); an older release's (legacy_loss)."""
    from tools.memory.step import forward_loss

    if setup.legacy_loss != "none" and setup.task == "causal-lm":
        return legacy_hf_forward(pm, setup, batch, amp)
    return forward_loss(pm, setup, batch, amp)


def legacy_hf_forward(pm, setup: TrainingSetup, batch: dict, amp):
    """The causal-LM loss of older transformers, inside the model's forward (TrainingSetup.legacy_loss).

    4.36-4.45 (`upcast_in_model`, modeling_llama/mistral.py of those releases):
        logits = self.lm_head(hidden_states); logits = logits.float()
        shift_logits = logits[..., :-1, :].contiguous(); shift_labels = labels[..., 1:].contiguous()
        loss = CrossEntropyLoss()(shift_logits.view(-1, V), shift_labels.view(-1))   # returns the fp32 logits
    4.46-4.49 (`upcast_in_loss`, loss_utils.ForCausalLMLoss): the same, with the upcast inside the loss
    function while the output keeps the 16-bit logits. `no_upcast`: the shifted copy of the 16-bit logits.
    The model runs without labels here (its logits are today's), and the loss is computed as those
    releases did, in the same autocast.
    """
    import torch

    labels = batch["labels"]
    with amp:
        out = pm(**{k: v for k, v in batch.items() if k != "labels"})
        logits = out.logits
        out["logits"] = None  # the output's reference is the one the release kept (or not), below
        kept = None
        if setup.legacy_loss == "upcast_in_model":
            logits = logits.float()  # the 16-bit logits die with this rebinding
        elif setup.legacy_loss == "upcast_in_loss":
            kept, logits = logits, logits.float()  # CausalLMOutputWithPast.logits stays 16-bit
        shift = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        loss = torch.nn.functional.cross_entropy(shift.view(-1, shift.shape[-1]), shift_labels.view(-1), ignore_index=-100)
        del shift
    return _output(loss, logits, (out, kept))


def fused_hidden_loss(base, hidden, labels, impl: str):
    """The loss of a fused path from the last hidden state (liger: its lce_forward's loss; cce: CCE shift=True)."""
    from tools.memory import kernels

    weight = base.get_output_embeddings().weight
    weight = getattr(weight, "base_layer", None) or weight
    if impl == "liger":
        return kernels.liger_causal_lm_loss(hidden, weight, labels, hidden.shape[-1])
    if impl == "cce":
        return kernels.cce_causal_lm_loss(hidden, weight, labels)
    raise ValueError(f"loss_impl: {impl!r} has no hidden-state loss")


def _backbone_forward(impl: str):
    def forward(pm, setup: TrainingSetup, batch: dict, amp):
        from tools.memory.kernels import enter_head_phase

        base = _unwrap(pm)
        kw = _without_use_cache(dict(batch))
        labels = kw.pop("labels")
        with amp:
            # the peft wrapper's own forward hooks (prompt learning) are not used by these paths
            out = _backbone(base)(**kw, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            enter_head_phase()
            loss = fused_hidden_loss(base, hidden, labels, impl)
        return _output(loss, hidden, out)

    forward.__name__ = f"{impl}_forward"
    return forward


liger_forward = _backbone_forward("liger")
cce_forward = _backbone_forward("cce")


def _without_use_cache(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "use_cache"}


def forward_for(setup: TrainingSetup) -> Callable[..., Any]:
    """The forward+loss function of `setup.loss_impl` (sequence classification and seq2seq: the model's own loss)."""
    if setup.task != "causal-lm" or setup.loss_impl == "hf":
        return hf_forward
    if setup.loss_impl == "trl_fused":
        return trl_fused_forward
    if setup.loss_impl == "liger":
        return liger_forward
    if setup.loss_impl == "cce":
        return cce_forward
    raise ValueError(f"loss_impl: unknown {setup.loss_impl!r}")


@contextlib.contextmanager
def step_context(pm, setup: TrainingSetup, *, cuda: bool = True):
    """What stays patched for the whole step (forward AND backward): trl's CUDA path of the fused head
    (unless cuda=False: the CPU path, as on this machine), Liger's RoPE, and trl's activation offloading
    hooks (SFTTrainer.training_step wraps forward and backward in them)."""
    from tools.memory.kernels import trl_cuda_path

    with contextlib.ExitStack() as stack:
        if cuda and setup.task == "causal-lm" and setup.loss_impl == "trl_fused":
            stack.enter_context(trl_cuda_path())
        stack.enter_context(liger_rope_context(pm, setup))
        if setup.activation_offloading:
            from tools.memory.kernels import current_tracker
            from tools.memory.offload import offloading

            stack.enter_context(offloading(pm, current_tracker()))
        yield


def prepare_liger_layers(pm, setup: TrainingSetup) -> list[str]:
    """With use_liger_kernel: Liger's RMSNorm and SwiGLU stand-ins in the model (RoPE: `liger_rope_context`)."""
    if not setup.use_liger_kernel:
        return []
    from tools.memory.kernels import apply_liger_layer_kernels

    return apply_liger_layer_kernels(_unwrap(pm))


def liger_rope_context(pm, setup: TrainingSetup):
    """Liger's RoPE stand-in in place of the modeling module's apply_rotary_pos_emb while the step runs."""
    if not setup.use_liger_kernel:
        return contextlib.nullcontext()
    from tools.memory.kernels import liger_rope_patch

    return liger_rope_patch(_unwrap(pm))


LOSS_NOTES = {
    "trl_fused": "loss: trl's fused LM head (SFTTrainer default), real trl code on its CUDA path: compact labelled "
                 "positions, [4096, 32768] logits tiles, Triton fold and fp32 out-dtype GEMMs as stand-ins",
    "hf": "loss: transformers' model(labels=...) (full logits, fp32 upcast, cross-entropy)",
    "liger": "loss: Liger fused linear cross-entropy stand-in (liger-kernel 0.8.5's chunks and saved gradients)",
    "cce": "loss: Cut Cross-Entropy stand-in (cut-cross-entropy 25.1.1's buffers; no logits)",
}
