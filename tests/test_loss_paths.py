"""Each loss path's simulated bytes against a real CPU step of the same path (tiny Llama, 128k vocabulary).

The real step runs the same loss code (`tools.memory.loss`): trl's fused LM head (its CUDA path:
compact positions + Triton-fold / out-dtype GEMM stand-ins, and its plain CPU path), transformers'
`model(labels=...)`, and the Liger / CCE stand-ins, whose values are checked against the torch
reference (the loss and gradients of transformers' own cross-entropy).
"""

from __future__ import annotations

import pytest

from tests._simulator_helpers import TINY_LLAMA, real_step, setup, tiny_spec
from tools.memory import simulate
from tools.memory.extrapolate import combine

BIG_VOCAB = dict(TINY_LLAMA, vocab_size=128256)  # Llama-3's vocabulary on a hidden-64 model: the loss dominates


def _spec():
    return tiny_spec(BIG_VOCAB)


def _st(**kw):
    base = dict(method="lora", optim="adamw_torch_fused", gradient_checkpointing=True, max_length=64,
                per_device_train_batch_size=2)
    base.update(kw)
    return setup(**base)


@pytest.mark.parametrize("impl", ["trl_fused", "hf", "liger", "cce"])
def test_loss_path_simulated_equals_real_cpu_step(impl):
    spec, st = _spec(), _st(loss_impl=impl)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    assert sim.weights_bytes + sim.adapter_bytes == real["param_and_buffer_bytes"]
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01), impl
    assert any(n.startswith("loss: ") for n in sim.notes)


def test_trl_fused_cpu_path_simulated_equals_real_cpu_step():
    """trl's fused head exactly as it runs on this CPU (torch fold, fp32 accumulation copies)."""
    from tools.memory import step

    spec, st = _spec(), _st(loss_impl="trl_fused")
    run = step.run(spec, st, spec.num_hidden_layers, cuda_loss=False)
    sim = combine([run], [spec.num_hidden_layers], spec.num_hidden_layers)
    real = real_step(spec, st, cuda_loss=False)
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)
    cuda = simulate(spec, st, extrapolate=False)
    # the CPU fallback's fp32 temporaries are what a GPU (Triton fold, out-dtype GEMM) never allocates
    assert cuda.peak_bytes < sim.peak_bytes


def test_loss_paths_order_and_logits_share():
    """128k vocabulary: HF's full fp32 logits dominate; every fused path is far below it."""
    spec = _spec()
    peaks = {impl: simulate(spec, _st(loss_impl=impl), extrapolate=False) for impl in ("hf", "trl_fused", "liger", "cce")}
    hf = peaks["hf"]
    vt = 128256 * 2 * 64
    assert hf.peak_breakdown["logits_loss"] >= 4 * vt  # at least the fp32 upcast of the logits
    for impl in ("trl_fused", "liger", "cce"):
        assert peaks[impl].peak_bytes < hf.peak_bytes - 2 * vt, impl
        assert peaks[impl].peak_breakdown["logits_loss"] < 4 * vt, impl


def test_stand_ins_compute_the_reference_loss_and_gradients():
    """On real tensors the stand-ins give transformers' cross-entropy and its gradients (the torch reference)."""
    import torch

    from tools.memory import kernels

    torch.manual_seed(0)
    h = torch.randn(2, 33, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 33))
    labels[0, :5] = -100
    ref = torch.nn.functional.cross_entropy((h.float() @ w.float().t())[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1))
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    for fn in (lambda: kernels.liger_causal_lm_loss(h, w, labels, 16), lambda: kernels.cce_causal_lm_loss(h, w, labels)):
        h.grad = w.grad = None
        loss = fn()
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-2)
        assert torch.allclose(h.grad.float(), gh.float(), atol=2e-3, rtol=5e-2)
        assert torch.allclose(w.grad.float(), gw.float(), atol=2e-3, rtol=5e-2)


def test_liger_chunk_rows_follow_liger_kernel():
    from tools.memory.kernels import liger_chunk_rows

    # liger-kernel's own example: BT = 4096*4, V = 32000, H = 4096 -> inc_factor 8, chunk 2048
    assert liger_chunk_rows(4096 * 4, 4096, 32000) == 2048
    assert liger_chunk_rows(100, 4096, 2048) == 100  # one chunk covers BT when the budget allows


@pytest.mark.parametrize("ckpt", [True, False], ids=["ckpt", "no-ckpt"])
def test_activation_offloading_device_bytes_equal_a_real_cpu_step_with_trls_hooks(ckpt):
    """trl's OffloadActivations hooks on a real CPU step (host copies counted apart) vs the dry run's."""
    spec = tiny_spec(dict(TINY_LLAMA, vocab_size=2048))
    kw = dict(method="lora", optim="adamw_torch_fused", gradient_checkpointing=ckpt, max_length=128, per_device_train_batch_size=2)
    on, off = setup(**kw, activation_offloading=True), setup(**kw)
    sim_on, sim_off = simulate(spec, on, extrapolate=False), simulate(spec, off, extrapolate=False)
    real_on = real_step(spec, on)
    assert sim_on.peak_bytes == pytest.approx(real_on["peak_bytes"], rel=0.01)
    assert sim_on.offload_host_bytes == pytest.approx(real_on["host_peak_bytes"], rel=0.01)
    assert sim_on.offload_host_bytes > 0 and sim_off.offload_host_bytes == 0
    if not ckpt:  # every block's saved activations left the device (with checkpointing the fused-head tile holds the peak)
        assert sim_on.peak_bytes < sim_off.peak_bytes
    assert sim_on.offload_traffic_bytes >= sim_on.offload_host_bytes


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_liger_layer_kernels_simulated_equals_real_cpu_step_and_save_activations(ckpt):
    spec = tiny_spec(dict(TINY_LLAMA, vocab_size=512))
    kw = dict(method="lora", gradient_checkpointing=ckpt, max_length=128, loss_impl="hf")
    on, off = setup(**kw, use_liger_kernel=True), setup(**kw)
    sim_on, sim_off = simulate(spec, on, extrapolate=False), simulate(spec, off, extrapolate=False)
    assert sim_on.peak_bytes == pytest.approx(real_step(spec, on)["peak_bytes"], rel=0.01)
    assert sim_on.peak_breakdown["activations"] < sim_off.peak_breakdown["activations"]
    assert any("Liger kernels" in n for n in sim_on.notes)


def test_liger_layer_stand_ins_equal_transformers_modules():
    """The stand-ins' forward and backward equal transformers' LlamaRMSNorm, LlamaMLP and apply_rotary_pos_emb."""
    import copy

    import torch
    import transformers
    from transformers.models.llama import modeling_llama

    from tools.memory import kernels

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    for module in (modeling_llama.LlamaRMSNorm(32), modeling_llama.LlamaMLP(cfg)):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.2)
        ours = copy.deepcopy(module)
        kernels.apply_liger_layer_kernels(ours)
        x1 = torch.randn(2, 5, 32, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_(True)
        y1, y2 = module(x1), ours(x2)
        assert torch.allclose(y1, y2, atol=1e-5)
        y1.square().sum().backward()
        y2.square().sum().backward()
        assert torch.allclose(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    angles = torch.randn(2, 5, 4)
    emb = torch.cat((angles, angles), dim=-1)  # rotary embeddings repeat their angles over the two halves
    cos, sin = emb.cos(), emb.sin()
    ref = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    q2, k2 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    got = kernels.liger_rope(q2 * 1.0, k2 * 1.0, cos, sin)
    assert torch.allclose(ref[0], got[0], atol=1e-5) and torch.allclose(ref[1], got[1], atol=1e-5)
    qr, kr = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    r = modeling_llama.apply_rotary_pos_emb(qr, kr, cos, sin)
    (r[0].square().sum() + r[1].square().sum()).backward()
    (got[0].square().sum() + got[1].square().sum()).backward()
    assert torch.allclose(qr.grad, q2.grad, atol=1e-4) and torch.allclose(kr.grad, k2.grad, atol=1e-4)


@pytest.mark.parametrize("legacy", ["upcast_in_model", "upcast_in_loss", "no_upcast"])
def test_legacy_hf_losses_simulated_equal_real_cpu_steps_and_cost_their_shifted_copy(legacy):
    """Older transformers' loss (TrainingSetup.legacy_loss): the shifted contiguous copy of the logits."""
    spec = _spec()
    st = _st(loss_impl="hf", legacy_loss=legacy, gradient_checkpointing=False, optim="sgd")
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01), legacy
    today = simulate(spec, _st(loss_impl="hf", gradient_checkpointing=False, optim="sgd"), extrapolate=False)
    V, T, N = 128256, 2 * 64, 2 * 63  # vocabulary, tokens, shifted (scored) tokens
    fwd = sim.segment_breakdowns["forward"]["logits_loss"]
    extra = fwd - today.segment_breakdowns["forward"]["logits_loss"]
    # at the loss, today: 16-bit logits + fp32 upcast + fp32 log-softmax over every token (labels padded) = 10 B per
    # logit. 4.36-4.45: fp32 logits (the 16-bit ones freed), a shifted fp32 copy and its log-softmax; 4.46-4.49: the
    # 16-bit logits too; no upcast, under autocast: 16-bit logits and shifted copy, cross_entropy's fp32 cast of its
    # input and its fp32 log-softmax
    now = 10 * T
    want = {"upcast_in_model": 4 * T + 8 * N, "upcast_in_loss": 6 * T + 8 * N, "no_upcast": 2 * T + 10 * N}[legacy] - now
    assert extra == pytest.approx(want * V, rel=0.02), (legacy, extra / V / T)
    # the analytic tier's loss path says the same
    from tools.analytic import loss_path_bytes

    ana = loss_path_bytes("hf", T=128, N=126, H=64, V=128256, c=2, hb=2, wb=2, head_trainable=False, legacy=legacy)[0]
    assert ana == pytest.approx(fwd, rel=0.05)


def test_legacy_loss_needs_the_hf_loss():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="legacy_loss"):
        _st(loss_impl="trl_fused", legacy_loss="upcast_in_model")


def test_deepspeed_trains_its_16bit_module_without_autocast():
    """accelerate gives DeepSpeed no native AMP: the 16-bit logits' log-softmax stays 16-bit there."""
    spec = _spec()
    kw = dict(loss_impl="hf", legacy_loss="no_upcast", gradient_checkpointing=False, optim="sgd", num_gpus=2)
    ds = simulate(spec, _st(**kw, zero_stage=3), extrapolate=False)
    fsdp = simulate(spec, _st(**kw, fsdp="full_shard"), extrapolate=False)
    assert any("without autocast" in n for n in ds.notes)
    V, T, N = 128256, 2 * 64, 2 * 63
    # DeepSpeed: 16-bit logits, their shifted copy, a 16-bit log-softmax; FSDP under autocast: cross_entropy's
    # fp32 cast of its input and an fp32 log-softmax
    assert ds.segment_breakdowns["forward"]["logits_loss"] == pytest.approx((2 * T + 4 * N) * V, rel=0.02)
    assert fsdp.segment_breakdowns["forward"]["logits_loss"] == pytest.approx((2 * T + 10 * N) * V, rel=0.02)
