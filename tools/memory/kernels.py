"""Stand-ins for the GPU-only kernels of the loss paths and of Liger's layer kernels.

The dry run executes the code the generated script executes. Where that code is plain PyTorch it
runs as it is (trl's fused LM head: `trl.trainer.utils.add_fused_lm_head` and
`trl.kernels.ChunkedLogProbFunction`; transformers' own loss). Where a piece only exists as a
Triton/CUDA kernel, a stand-in here has the same saved tensors and transient buffers, as the
bitsandbytes stand-ins in `tools.memory.quant` do:

- **trl's fused head on a GPU** (`trl_cuda_path`): on CUDA trl scores only the positions with a
  label (`hidden[mask]`, a compact copy), folds each `[4096, 32768]` logits tile into online
  log-sum-exp statistics with a Triton kernel that writes in place (no temporaries), and
  accumulates the gradient GEMMs with `addmm(out_dtype=float32, out=acc)` (no fp32 copies). On CPU
  trl runs a torch fallback whose fp32 temporaries a GPU never allocates. `trl_cuda_path()` makes
  a CPU step take the CUDA path: the compact copy is made (every position of the worst-case batch
  has a label), the fold and the fp32 accumulation run out of the storage counter's sight (on real
  tensors they still compute the exact values; on fake tensors they do nothing) — exactly the
  memory effect of the Triton kernel and of cuBLAS' out-dtype GEMM.
- **Liger's fused linear cross-entropy** (`LigerFusedLinearCrossEntropy`): liger-kernel 0.8.5's
  `fused_linear_cross_entropy_forward` allocation for allocation: `grad_input = zeros_like(input)`,
  `grad_weight` when the head trains, `loss_1d` fp32 [BT], the `target != ignore_index` mask, and per
  chunk of `next_pow2(ceil(BT / ceil(V/H)))` rows the `[chunk, V]` logits (compute dtype; its
  Triton CE kernel overwrites them in place with their gradient) and the `[chunk, H]` product that
  is copied into `grad_input`. The gradients are computed in forward and saved for backward;
  backward only scales them in place. Its `LigerForCausalLMLoss` pads and shifts the labels.
- **Cut Cross-Entropy** (`CutCrossEntropy`): cut-cross-entropy 25.1.1's `cce_linear_cross_entropy`
  with `shift=True`: the valid-position index (`nonzero` int64 -> int32 -> `sum(1)` int64), `lse`
  fp32 [B], the lock array, `logit_avg` fp32 [V] (`filter_eps="auto"` on bf16/fp16), the negative
  dot fp32 [B]; saved: e, c, lse, targets, valids, logit_avg. Backward: the `argsort` vocabulary
  order (int64 -> int32 [V]), `de = zeros_like(e)`, `dc` when the head trains, two lock arrays.
  No logits ever exist.
- **Liger's RMSNorm / RoPE / SwiGLU** (`apply_liger_layer_kernels`): RMSNorm saves its input and an
  fp32 rstd per row and returns one new output (transformers' RMSNorm keeps the fp32 upcast, its
  square, the normalised fp32 tensor and the cast); SwiGLU keeps gate and up and one output, and
  writes its gradients into them in backward (transformers also keeps silu(gate)); RoPE rotates q
  and k into new tensors saving only cos/sin (transformers keeps rotate_half copies).

On real (CPU) tensors every stand-in computes the true values (the loss and gradients equal the
torch reference), with the work the kernel fuses done out of the counter's sight, so a real CPU
step with the stand-ins measures exactly the bytes the dry run counts. On fake tensors the fused
work is skipped (values do not matter there).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

IGNORE_INDEX = -100
# liger-kernel 0.8.5: transient logits bounded to chunk_mem_const * BT * H elements
_LIGER_CHUNK_MEM_CONST = 1


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def liger_chunk_rows(bt: int, hidden: int, vocab: int) -> int:
    """Rows per chunk of Liger's fused linear cross-entropy (its `chunk_size`)."""
    inc = math.ceil(vocab / (_LIGER_CHUNK_MEM_CONST * hidden))
    return max(1, min(_next_pow2(math.ceil(bt / inc)), bt))


def _fake(t) -> bool:
    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def unseen():
    """Run real-tensor work that a GPU kernel fuses away without the storage counter seeing it."""
    with _disable_current_modes():
        yield


def current_tracker():
    """The storage counter running this step (the innermost dispatch mode with a phase), or None."""
    mode = _get_current_dispatch_mode()
    return mode if mode is not None and hasattr(mode, "phase") and hasattr(mode, "seg_peak") else None


def enter_head_phase(*_args) -> None:
    """Mark the start of the output head and loss (allocations from here on are 'logits_loss')."""
    tracker = current_tracker()
    if tracker is not None and tracker.phase == "forward":
        tracker.phase = "forward-head"


# --------------------------------------------------------------------------------------
# trl's fused LM head, as it runs on a CUDA GPU
# --------------------------------------------------------------------------------------


class _AllValidMaskIndex(torch.overrides.TorchFunctionMode):
    """`x[mask]` with a boolean mask over x's leading dims, when every position is valid (the worst-case
    batch: every token has a label): a compact copy of x's rows, without the data-dependent nonzero
    that fake tensors cannot run. On real tensors it checks that the mask is indeed all true."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            x, idx = args
            if (isinstance(idx, torch.Tensor) and idx.dtype == torch.bool and isinstance(x, torch.Tensor)
                    and 0 < idx.ndim <= x.ndim and tuple(idx.shape) == tuple(x.shape[: idx.ndim])):
                if not _fake(idx):
                    with unseen():
                        if not bool(idx.all()):
                            return func(*args, **kwargs)  # a real mask with holes: the real indexing
                return x.flatten(0, idx.ndim - 1).clone() if idx.ndim > 1 else x.clone()
        return func(*args, **kwargs)


def _triton_fold(original):
    """trl's Triton fold kernels write only their pointer outputs (running stats / the tile), in place."""

    def fold(tile, *args, **kwargs):
        if _fake(tile):
            return None
        with unseen():
            return original(tile, *args, **kwargs)

    return fold


def _addmm_fp32_cuda(acc, a, b) -> None:
    """`acc += a @ b` as trl runs it on CUDA: `torch.addmm(..., out_dtype=float32, out=acc)`, no fp32 copies."""
    if _fake(acc):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    with unseen():
        acc.addmm_(a.float(), b.float())


@contextlib.contextmanager
def trl_cuda_path():
    """Make trl's fused LM head take its CUDA path on this CPU (see the module docstring)."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob as clp

    saved = (trl_utils._use_triton, clp._forward_tile, clp._backward_tile, clp._addmm_fp32)
    trl_utils._use_triton = lambda device: True  # score only the positions with a label (compact copy)
    clp._forward_tile = _triton_fold(saved[1])
    clp._backward_tile = _triton_fold(saved[2])
    clp._addmm_fp32 = _addmm_fp32_cuda
    try:
        with _AllValidMaskIndex():
            yield
    finally:
        trl_utils._use_triton, clp._forward_tile, clp._backward_tile, clp._addmm_fp32 = saved


def add_trl_fused_head(base) -> None:
    """`trl.trainer.utils.add_fused_lm_head` as SFTTrainer applies it (outputs log_probs, entropy, is_top1), once."""
    if getattr(base, "_tunepilot_fused_head", False):
        return
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    base._tunepilot_fused_head = True


def sft_fused_loss(model, batch: dict, num_items_in_batch=None):
    """trl 1.16 `SFTTrainer.compute_loss` (default nll branch): `model(**inputs, fused_lm_head=True)`, then
    the per-token loss summed over the labelled tokens, and the entropy / accuracy metrics it logs.
    Returns (loss, outputs). Reusable by other objectives that score with the fused head."""
    outputs = model(**{**batch, "use_cache": False}, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    # the metrics compute_loss logs (entropy, mean token accuracy): tiny reductions, as the trainer runs them
    outputs.entropy.detach().sum()
    outputs.is_top1.sum()
    return loss, outputs


# --------------------------------------------------------------------------------------
# Liger Kernel's fused linear cross-entropy
# --------------------------------------------------------------------------------------


def _ce_chunk_in_place(logits_chunk, target_chunk, loss_slice, n_valid: int, ignore_index: int) -> None:
    """What Liger's Triton CE kernel does to one chunk: per-row loss (mean over n_valid) into loss_slice and
    the logits gradient written over the logits. Real tensors only, out of the counter's sight."""
    z = logits_chunk.float()
    valid = target_chunk != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    tgt = target_chunk.clamp(min=0)
    picked = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    loss_slice.copy_(torch.where(valid, (lse - picked) / max(n_valid, 1), torch.zeros_like(lse)))
    grad = torch.softmax(z, dim=-1)
    grad.scatter_add_(-1, tgt.unsqueeze(-1), -torch.ones_like(picked).unsqueeze(-1))
    grad = grad * (valid.float() / max(n_valid, 1)).unsqueeze(-1)
    logits_chunk.copy_(grad.to(logits_chunk.dtype))


class LigerFusedLinearCrossEntropy(torch.autograd.Function):
    """liger-kernel 0.8.5 `LigerFusedLinearCrossEntropyFunction` (reduction mean, no bias/z-loss/smoothing):
    gradients computed chunk by chunk in forward and saved; backward hands them back."""

    @staticmethod
    def forward(ctx, _input, weight, target, ignore_index: int = IGNORE_INDEX):
        bt, h = _input.shape
        v = weight.shape[0]
        chunk = liger_chunk_rows(bt, h, v)
        grad_input = torch.zeros_like(_input)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        loss_1d = torch.zeros(bt, dtype=torch.float32, device=_input.device)
        target_mask = target != ignore_index
        n_valid = bt
        if not _fake(target):
            with unseen():
                n_valid = int(target_mask.sum())  # liger: total_n_non_ignore = target_mask.sum().item()
        for start in range(0, bt, chunk):
            end = min(start + chunk, bt)
            input_chunk = _input[start:end]
            logits_chunk = input_chunk @ weight.t()  # [chunk, V] in the compute dtype; the CE kernel works in place
            logits_chunk = logits_chunk.contiguous()
            target_chunk = target[start:end].contiguous()
            if not _fake(logits_chunk):
                with unseen():
                    _ce_chunk_in_place(logits_chunk, target_chunk, loss_1d[start:end], n_valid, ignore_index)
            grad_logits_chunk = logits_chunk
            del logits_chunk
            grad_input[start:end] = grad_logits_chunk @ weight
            if grad_weight is not None:
                # CUDA (sm80+): addmm into the low-precision accumulator, no temporary
                if _fake(grad_weight):
                    torch.addmm(grad_weight, grad_logits_chunk.t(), input_chunk.to(grad_weight.dtype), out=grad_weight)
                else:
                    with unseen():
                        grad_weight.addmm_(grad_logits_chunk.t().to(grad_weight.dtype), input_chunk.to(grad_weight.dtype))
            del grad_logits_chunk, input_chunk, target_chunk
        loss = torch.sum(loss_1d)
        del target_mask, loss_1d
        ctx.save_for_backward(grad_input.detach(), grad_weight.detach() if grad_weight is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_weight = ctx.saved_tensors
        # liger: element_mul_kernel scales the saved gradients in place unless grad_output is 1.0
        # (a data-dependent check; in place either way, so nothing to count on fake tensors)
        if not _fake(grad_input):
            with unseen():
                if not torch.equal(grad_output, torch.tensor(1.0, device=grad_output.device)):
                    grad_input.mul_(grad_output.to(grad_input.dtype))
                    if grad_weight is not None:
                        grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_input, grad_weight, None, None


def liger_causal_lm_loss(hidden_states, lm_head_weight, labels, hidden_size: int):
    """liger-kernel's `LigerForCausalLMLoss`: pad+shift the labels, flatten, fused linear cross-entropy (mean)."""
    labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
    shift_labels = labels[..., 1:].contiguous()
    hidden = hidden_states.view(-1, hidden_size)
    return LigerFusedLinearCrossEntropy.apply(hidden, lm_head_weight, shift_labels.view(-1))


# --------------------------------------------------------------------------------------
# Cut Cross-Entropy
# --------------------------------------------------------------------------------------


def _cce_valids(targets):
    """cut-cross-entropy `_build_flat_valids(targets, -100, shift=True)`: flat indices of the labelled positions."""
    t = targets[..., 1:]
    ne = t != IGNORE_INDEX
    if _fake(ne):
        # nonzero is data dependent: every position of the worst-case batch has a label
        nz = torch.empty((t.numel(), t.ndim), dtype=torch.int64, device=t.device)
    else:
        nz = ne.nonzero()
    valids = nz.to(torch.int32)
    del nz
    for i in range(t.ndim - 1):
        valids[:, i] *= t.stride(i)
    return valids.sum(1)


class CutCrossEntropy(torch.autograd.Function):
    """cut-cross-entropy 25.1.1 `LinearCrossEntropyFunction` (shift=True, reduction mean, filter_eps auto)."""

    @staticmethod
    def forward(ctx, e, c, targets, valids, filter_logits: bool):
        b = valids.numel()
        v = c.shape[0]
        lse = e.new_full((b,), -float("inf"), dtype=torch.float32)
        locks = e.new_full((math.ceil(b / 128),), 0, dtype=torch.int32)  # uint32 in CCE: same bytes
        logit_avg = e.new_full((v,), 0.0, dtype=torch.float32) if filter_logits else None
        neg_dot = e.new_zeros((b,), dtype=torch.float32)
        if not _fake(e):
            with unseen():
                rows = e[valids.long()]
                z = rows.float() @ c.float().t()
                lse.copy_(torch.logsumexp(z, dim=-1))
                flat_t = targets.flatten()
                tgt = flat_t[(valids + 1).long()]
                neg_dot.copy_(-z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
                if logit_avg is not None:
                    logit_avg.copy_(z.mean(0))
        del locks
        nll = neg_dot.add_(lse)
        loss = nll.mean()
        ctx.save_for_backward(e, c, lse, targets, valids, logit_avg)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        e, c, lse, targets, valids, logit_avg = ctx.saved_tensors
        vocab_ordering = torch.argsort(logit_avg).to(torch.int32) if logit_avg is not None else None
        h = e.shape[1]
        b = valids.numel()
        de = torch.zeros_like(e)
        dc = torch.zeros_like(c, dtype=e.dtype) if ctx.needs_input_grad[1] else None
        nd_locks = math.ceil(h / 64)
        de_locks = e.new_zeros((math.ceil(b / nd_locks), nd_locks), dtype=torch.int32)
        dc_locks = c.new_zeros((math.ceil(c.shape[0] / nd_locks), nd_locks), dtype=torch.int32)
        if not _fake(e):
            with unseen():
                idx = valids.long()
                rows = e[idx].float()
                z = rows @ c.float().t()
                p = torch.softmax(z, dim=-1)
                tgt = targets.flatten()[(valids + 1).long()]
                p.scatter_add_(-1, tgt.unsqueeze(-1), -torch.ones_like(tgt, dtype=p.dtype).unsqueeze(-1))
                p = p * (grad_out.float() / max(b, 1))
                de.index_add_(0, idx, (p @ c.float()).to(de.dtype))
                if dc is not None:
                    dc.add_((p.t() @ rows).to(dc.dtype))
        del vocab_ordering, de_locks, dc_locks
        return de, (dc.to(c.dtype) if dc is not None else None), None, None, None


def cce_causal_lm_loss(hidden_states, weight, labels):
    """`cut_cross_entropy.linear_cross_entropy(hidden, lm_head.weight, labels, shift=True)` (impl cce, mean)."""
    targets = labels.contiguous()
    e = hidden_states.contiguous()
    valids = _cce_valids(targets)
    e = e.flatten(0, -2)
    filter_logits = e.dtype in (torch.float16, torch.bfloat16)  # filter_eps="auto" -> a threshold for 16-bit
    return CutCrossEntropy.apply(e, weight, targets, valids, filter_logits)


# --------------------------------------------------------------------------------------
# Liger's RMSNorm / RoPE / SwiGLU kernels
# --------------------------------------------------------------------------------------


class _LigerRMSNorm(torch.autograd.Function):
    """liger `LigerRMSNormFunction` (casting mode 'llama', in_place=True): saves X (the input itself) and fp32
    rstd [rows]; one new output. Backward writes dX over dY; dW via per-SM fp32 partial sums."""

    SM_COUNT = 132  # H100 SXM; the [sm_count, hidden] fp32 partial-dW buffer is tiny either way

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):
        shape = x.shape
        x2 = x.view(-1, shape[-1])
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        if not _fake(x):
            with unseen():
                xf = x2.float()
                r = torch.rsqrt(xf.pow(2).mean(-1) + eps)
                rstd.copy_(r)
                y.copy_(((xf * r.unsqueeze(-1)).to(x.dtype) * (offset + weight.float()).to(x.dtype)))
        ctx.eps, ctx.offset = eps, offset
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[-1])
        dx = dy2  # in_place=True: dX overwrites dY
        dw = None
        partial = None
        if ctx.needs_input_grad[1]:
            partial = torch.empty((_LigerRMSNorm.SM_COUNT, x2.shape[-1]), dtype=torch.float32, device=dy.device)
        if not _fake(dy):
            with unseen():
                xf, r = x2.float(), rstd.unsqueeze(-1)
                g = dy2.float() * (ctx.offset + weight.float())
                n = xf * r
                if partial is not None:
                    partial.zero_()
                    partial[0].copy_((dy2.float() * n).sum(0))
                dx.copy_((r * (g - n * (g * n).mean(-1, keepdim=True))).to(dx.dtype))
        if partial is not None:
            dw = partial.sum(0).to(weight.dtype)
            del partial
        return dx.view(dy.shape), dw, None, None


class _LigerSiLUMul(torch.autograd.Function):
    """liger `LigerSiLUMulFunction`: c = silu(a) * b; saves a and b, writes da/db into them in backward."""

    @staticmethod
    def forward(ctx, a, b):
        c = torch.empty_like(a)
        if not _fake(a):
            with unseen():
                c.copy_(torch.nn.functional.silu(a.float()).to(a.dtype) * b)
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        if not _fake(a):
            with unseen():
                af, bf, dcf = a.float(), b.float(), dc.float()
                sig = torch.sigmoid(af)
                silu = af * sig
                db = dcf * silu
                da = dcf * bf * sig * (1 + af * (1 - sig))
                a.copy_(da.to(a.dtype))
                b.copy_(db.to(b.dtype))
        return a, b


class _LigerRope(torch.autograd.Function):
    """liger `LigerRopeFunction`: q and k rotated in place in their physical [b, s, heads, d] layout (a copy
    only where that layout is not contiguous), saving cos/sin only; backward rotates dq/dk the same way."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        qp = q.transpose(1, 2).contiguous()
        kp = k.transpose(1, 2).contiguous()
        if not _fake(q):
            with unseen():
                qp.copy_(_rope_ref(qp.transpose(1, 2), cos, sin).transpose(1, 2))
                kp.copy_(_rope_ref(kp.transpose(1, 2), cos, sin).transpose(1, 2))
        ctx.save_for_backward(cos, sin)
        return qp.transpose(1, 2), kp.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dqp = dq.transpose(1, 2).contiguous()
        dkp = dk.transpose(1, 2).contiguous()
        if not _fake(dq):
            with unseen():
                dqp.copy_(_rope_ref(dqp.transpose(1, 2), cos, -sin).transpose(1, 2))
                dkp.copy_(_rope_ref(dkp.transpose(1, 2), cos, -sin).transpose(1, 2))
        return dqp.transpose(1, 2), dkp.transpose(1, 2), None, None


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope_ref(x, cos, sin):
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * c + _rotate_half(x) * s).to(x.dtype)


def liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return _LigerRope.apply(q, k, cos, sin)


def apply_liger_layer_kernels(model) -> list[str]:
    """Swap in the Liger RMSNorm / SwiGLU / RoPE stand-ins where liger-kernel patches them (RMSNorm and
    gated-SiLU MLP modules, the modeling module's apply_rotary_pos_emb). Returns what was patched."""
    import sys
    import types

    patched: list[str] = []
    norms = mlps = 0
    for mod in model.modules():
        name = type(mod).__name__
        if name.endswith("RMSNorm") and hasattr(mod, "weight") and getattr(mod, "weight", None) is not None:
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
            offset = 1.0 if "Gemma" in name else 0.0

            def norm_forward(self, hidden_states, _eps=eps, _offset=offset):
                return _LigerRMSNorm.apply(hidden_states, self.weight, _eps, _offset)

            mod.forward = types.MethodType(norm_forward, mod)
            norms += 1
        elif name.endswith("MLP") and all(hasattr(mod, n) for n in ("gate_proj", "up_proj", "down_proj")) \
                and getattr(getattr(mod, "config", None), "hidden_act", "silu") in ("silu", "swish"):
            def mlp_forward(self, x):
                return self.down_proj(_LigerSiLUMul.apply(self.gate_proj(x), self.up_proj(x)))

            mod.forward = types.MethodType(mlp_forward, mod)
            mlps += 1
    if norms:
        patched.append(f"{norms} RMSNorm")
    if mlps:
        patched.append(f"{mlps} SwiGLU MLP")
    return patched


@contextlib.contextmanager
def liger_rope_patch(model):
    """liger-kernel replaces the modeling module's `apply_rotary_pos_emb` (module-level, as its monkey patch does)."""
    import sys

    mods = {type(m).__module__ for m in model.modules()}
    saved: list[tuple[Any, Any]] = []
    for name in mods:
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "apply_rotary_pos_emb") and name.startswith("transformers.models."):
            saved.append((mod, mod.apply_rotary_pos_emb))
            mod.apply_rotary_pos_emb = liger_rope
    try:
        yield bool(saved)
    finally:
        for mod, fn in saved:
            mod.apply_rotary_pos_emb = fn
