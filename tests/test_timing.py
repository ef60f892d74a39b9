"""The op-roofline time model (tools/memory/timing.py): FLOPs and bytes of the traced step, rates, step time."""

from __future__ import annotations

import itertools
import json
import warnings

import pytest

from tests._simulator_helpers import setup, tiny_spec
from tools.gpus import gpu_catalog, parse_hardware
from tools.memory import timing
from tools.schemas import HardwareSpec


def _real_step_traced(spec, st):
    """One real CPU training step of a tiny model, tracked by the simulator's storage counter with the
    op observer on, inside torch's FlopCounterMode. Returns (trace, FlopCounterMode total)."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from tools.memory.step import make_optimizer
    from tools.memory.tracker import make_tracker

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(spec.model_type, **{k: v for k, v in spec.config.items() if k != "model_type"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=st.attn_implementation)
        if st.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, st, params)
    ids = torch.randint(0, spec.vocab_size, (st.per_device_train_batch_size, st.max_length))
    tracker = make_tracker(fake=False)
    trace = timing.OpTrace()
    tracker.op_observer = trace
    trace.active = True
    with FlopCounterMode(display=False) as fc, tracker:
        tracker.phase = "forward"
        loss = model(input_ids=ids, labels=ids).loss
        tracker.phase = "backward"
        loss.backward()
        tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
    return trace, fc.get_total_flops()


@pytest.mark.parametrize("ckpt", [False, True])
def test_step_flops_equal_flop_counter_mode_on_a_real_cpu_step(ckpt):
    """The traced FLOPs of a real step equal torch's FlopCounterMode, and the dry run of the same setup
    (fake tensors, full depth) traces exactly those FLOPs too."""
    from tools.memory import simulate

    spec = tiny_spec()
    # loss_impl=hf: the real step below computes transformers' own loss (model(labels=...))
    st = setup(method="full", attn_implementation="eager", dtype="fp32", bf16=False, gradient_checkpointing=ckpt, loss_impl="hf")
    trace, counted = _real_step_traced(spec, st)
    assert counted > 0
    assert trace.total_flops() == counted
    sim = simulate(spec, st, extrapolate=False)
    assert sim.op_trace is not None
    assert sum(r[3] * r[8] for r in sim.op_trace) == counted
    if ckpt:  # the recomputed forward is traced as its own phase
        assert any(r[0] == "recompute" and r[3] for r in sim.op_trace)


def test_cpu_flash_attention_counted_like_the_gpu_kernels():
    """The CPU flash-attention ops of the dry run get torch's SDPA formulas (FlopCounterMode has no
    formula for them), causal masks halve the work in time, not in FLOPs."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q = torch.randn(2, 4, 64, 16, requires_grad=True)
    k = torch.randn(2, 4, 64, 16, requires_grad=True)
    v = torch.randn(2, 4, 64, 16, requires_grad=True)
    f = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    out, lse = f(q, k, v, 0.0, True)
    (rec,) = timing.op_records(f, (q, k, v, 0.0, True), {}, (out, lse), "forward")
    assert rec[1] == "attention_fwd" and rec[6] is True
    assert rec[3] == sdpa_flop_count(q.shape, k.shape, v.shape)
    b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    g = torch.ones_like(out)
    grads = b(g, q, k, v, out, lse, 0.0, True)
    (brec,) = timing.op_records(b, (g, q, k, v, out, lse, 0.0, True), {}, grads, "backward")
    assert brec[1] == "attention_bwd" and brec[3] == sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
    rates = timing.gpu_rates(parse_hardware("A100 80GB").gpu)
    big = rec[:3] + (10**12, 10**6) + rec[5:]  # the same kernel at a size where compute dominates
    causal = timing.op_seconds(big, rates)
    full = timing.op_seconds(big[:6] + (False,) + big[7:], rates)
    assert causal == pytest.approx(full / 2)


def test_elementwise_bytes_equal_their_tensors_sizes():
    import torch

    aten = torch.ops.aten
    a = torch.randn(256, 512)
    b = torch.randn(256, 512)
    out = aten.add.Tensor(a, b)
    (r,) = timing.op_records(aten.add.Tensor, (a, b), {}, out, "forward")
    assert r[1] == "elementwise" and r[4] == a.nbytes + b.nbytes + out.nbytes
    # in place: both inputs read, the result written into the first
    c = a.clone()
    res = aten.add_.Tensor(c, b)
    (r,) = timing.op_records(aten.add_.Tensor, (c, b), {}, res, "forward")
    assert r[4] == 3 * a.nbytes
    # a broadcast operand is read once, not once per row
    bias = torch.randn(512)
    out = aten.mul.Tensor(a, bias)
    (r,) = timing.op_records(aten.mul.Tensor, (a, bias), {}, out, "forward")
    assert r[4] == a.nbytes + bias.nbytes + out.nbytes
    # a cast reads one dtype and writes the other
    h = torch.randn(256, 512, dtype=torch.bfloat16)
    f32 = aten._to_copy.default(h, dtype=torch.float32)
    (r,) = timing.op_records(aten._to_copy.default, (h,), {"dtype": torch.float32}, f32, "forward")
    assert r[4] == h.numel() * (2 + 4) and r[2] == "fp32"
    # views and allocations move nothing
    assert timing.op_records(aten.t.default, (a,), {}, a.t(), "forward") == ()
    assert timing.op_records(aten.view.default, (a, [512, 256]), {}, a.view(512, 256), "forward") == ()
    # an embedding lookup reads the rows it gathers, not the table
    table = torch.randn(1000, 64)
    idx = torch.randint(0, 1000, (4, 8))
    emb = aten.embedding.default(table, idx)
    (r,) = timing.op_records(aten.embedding.default, (table, idx), {}, emb, "forward")
    assert r[4] == 2 * emb.nbytes + idx.nbytes
    # a foreach update reads and writes every tensor of the list it updates
    ps, gs = [torch.randn(100), torch.randn(300)], [torch.randn(100), torch.randn(300)]
    aten._foreach_add_.List(ps, gs)
    (r,) = timing.op_records(aten._foreach_add_.List, (ps, gs), {}, None, "optimizer")
    assert r[1] == "optimizer" and r[4] == 3 * 400 * 4


def test_memory_bound_op_time_is_its_bytes_over_bandwidth():
    hw = parse_hardware("H100 SXM")
    rates = timing.gpu_rates(hw.gpu)
    rec = ("forward", "elementwise", "bf16", 0, 10**9, 1.0, False, "add")
    assert timing.op_seconds(rec, rates) == pytest.approx(1e9 / (hw.gpu.memory_bandwidth_gbs * 1e9 * timing.MEMORY_EFF))
    tiny = ("forward", "elementwise", "bf16", 0, 16, 1.0, False, "add")
    assert timing.op_seconds(tiny, rates) == timing.LAUNCH_FLOOR_S


def _dominates(a, b) -> bool:
    """a is at least as fast as b in every rate the time model uses, and faster in one."""
    def rates(g):
        return (g.bf16_tflops if g.bf16 and g.bf16_tflops else 0.0, g.fp16_tflops, g.fp32_tflops or 0.0,
                g.memory_bandwidth_gbs, g.nvlink_gbs or 0.0, (g.pcie_gbs or 32.0) * (1.0 if g.pcie_p2p else 0.5))
    ra, rb = rates(a), rates(b)
    return all(x >= y for x, y in zip(ra, rb)) and ra != rb


def test_a_faster_gpu_in_the_catalog_is_never_slower():
    """For every pair of catalog GPUs where one is at least as fast in every rate, the same traced
    step (single GPU, DDP, FSDP) is never slower on it."""
    from tools.memory import simulate

    spec = tiny_spec(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    setups = [setup(method="lora", max_length=256), setup(method="full", max_length=256),
              setup(method="full", max_length=256, num_gpus=2), setup(method="lora", max_length=256, num_gpus=2, fsdp="full_shard")]
    steps = [(st, simulate(spec, st.model_copy(update={"num_gpus": 1, "fsdp": "none"}))) for st in setups]
    gpus = [g for g in gpu_catalog() if g.bf16]
    pairs = [(a, b) for a, b in itertools.permutations(gpus, 2) if _dominates(a, b)]
    assert len(pairs) > 50
    for st, step in steps:
        for a, b in pairs:
            ta = timing.time_from_step(step, st, HardwareSpec(gpu=a, num_gpus=st.num_gpus)).step_seconds
            tb = timing.time_from_step(step, st, HardwareSpec(gpu=b, num_gpus=st.num_gpus)).step_seconds
            assert ta <= tb * (1 + 1e-9), f"{a.name} slower than {b.name} for {st.short()}"


def test_trace_extrapolates_linearly_in_depth():
    """The trace of k and k+1 blocks extended to k+2 equals the trace simulated at k+2 (time and FLOPs),
    including the optimizer's foreach ops whose size grows with depth."""
    from tools.memory.step import run

    spec = tiny_spec(num_hidden_layers=4)
    st = setup(method="full", gradient_checkpointing=True)
    t1, t2, t3 = (run(spec, st, d).op_counts for d in (1, 2, 3))
    ext = timing.extrapolate(t1, t2, 1, 2, 3)
    hw = parse_hardware("A100 80GB")
    kw = dict(param_bytes=1e6, grad_bytes=1e6, trainable_params=1e5, num_params=1e5)
    got = timing.step_time(ext, st, hw, **kw)
    want = timing.step_time(t3, st, hw, **kw)
    assert got.flops_per_step == pytest.approx(want.flops_per_step, rel=1e-9)
    assert got.step_seconds == pytest.approx(want.step_seconds, rel=1e-6)
    for p in ("forward", "recompute", "backward", "optimizer"):
        assert got.by_phase[p] == pytest.approx(want.by_phase[p], rel=1e-6)


def test_interconnect_from_the_catalog():
    four090 = parse_hardware("2x RTX 4090")
    h100 = parse_hardware("8x H100 SXM")
    assert four090.gpu.nvlink_gbs is None and four090.gpu.pcie_p2p is False
    assert h100.gpu.nvlink_gbs and h100.gpu.nvlink_gbs >= 450
    assert all(g.pcie_gbs for g in gpu_catalog()) and all(g.interconnect_source for g in gpu_catalog())
    st2 = setup(method="full", num_gpus=2)
    bw_4090, how = timing.link_bandwidth(four090, st2)
    bw_h100, _ = timing.link_bandwidth(h100, st2)
    assert "no peer-to-peer" in how and bw_h100 > 10 * bw_4090


def test_communication_and_offload_cost_time():
    """DDP gradients over PCIe without peer-to-peer cost more than over NVLink; FSDP's collectives and a
    CPU optimizer step show up in the breakdown."""
    counts = {("forward", "matmul", "bf16", 10**12, 10**8, 1.0, False, "mm"): 10.0,
              ("backward", "matmul", "bf16", 2 * 10**12, 2 * 10**8, 1.0, False, "mm"): 10.0,
              ("optimizer", "optimizer", "fp32", 0, 10**9, 1.0, False, "_fused_adamw_"): 1.0}
    kw = dict(param_bytes=14e9, grad_bytes=14e9, trainable_params=7e9, num_params=7e9)
    ddp = setup(method="full", num_gpus=2)
    pcie = timing.step_time(counts, ddp, parse_hardware("2x RTX 4090"), **kw)
    nvl = timing.step_time(counts, ddp, parse_hardware("2x A100 SXM 80GB"), **kw)
    single = timing.step_time(counts, setup(method="full"), parse_hardware("A100 SXM 80GB"), **kw)
    assert pcie.by_phase["communication"] > nvl.by_phase["communication"] > 0
    assert single.by_phase["communication"] == 0
    fsdp = timing.step_time(counts, setup(method="full", num_gpus=2, fsdp="full_shard"), parse_hardware("2x A100 SXM 80GB"), **kw)
    assert fsdp.by_op_class["communication"] > 0
    assert fsdp.by_phase["optimizer"] == pytest.approx(single.by_phase["optimizer"] / 2)
    off = timing.step_time(counts, setup(method="full", num_gpus=2, zero_stage=2, offload="optimizer"),
                           parse_hardware("2x A100 SXM 80GB"), **kw)
    assert off.by_phase["optimizer"] > single.by_phase["optimizer"]
    for t in (pcie, nvl, fsdp, off):
        assert t.step_seconds == pytest.approx(sum(t.by_phase.values()), rel=1e-9)
        assert t.step_seconds == pytest.approx(sum(t.by_op_class.values()), rel=1e-9)


def test_estimate_json_has_step_time(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from agent.cli import app

    monkeypatch.setenv("TUNEPILOT_HOME", str(tmp_path))
    cfg = tmp_path / "config.json"
    spec = tiny_spec()
    cfg.write_text(json.dumps({**spec.config, "architectures": ["LlamaForCausalLM"]}))
    res = CliRunner().invoke(app, ["estimate", str(cfg), "--gpu", "A100 80GB", "--seq-len", "128", "--batch-size", "2", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["time_model"] == "op-roofline" and d["time_calibrated"] is False
    assert d["step_seconds"] > 0 and d["tokens_per_second"] > 0
    assert d["tokens_per_second"] * d["step_seconds"] == pytest.approx(2 * 128, rel=1e-3)
    br = d["time_breakdown"]
    assert set(br) == {"by_phase", "by_op_class"}
    assert sum(br["by_phase"].values()) == pytest.approx(d["step_seconds"], rel=1e-3)
    assert br["by_op_class"]["matmul"] > 0


def test_trial_calibration_scales_later_estimates(tmp_path, monkeypatch):
    """A trial run's measured tokens/s, predicted by the same time model, scales later estimates for the
    same GPU and method, and the estimate says so; records of the flat model are not mixed in."""
    from tools.memory import simulate
    from tools.throughput import OP_ROOFLINE, estimate_throughput

    monkeypatch.setenv("TUNEPILOT_HOME", str(tmp_path))
    spec = tiny_spec()
    st = setup(method="lora")
    hw = parse_hardware("RTX 4090")
    step = simulate(spec, st)
    raw = estimate_throughput(spec, st, hw, step=step)
    assert not raw.calibrated
    rows = [
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "lora", "ok": True, "tokens_per_second": 3 * raw.tokens_per_second,
         "predicted_tokens_per_second": raw.tokens_per_second},  # no predictor: the flat model's record
        {"gpu": "NVIDIA GeForce RTX 4090", "method": "lora", "ok": True, "tokens_per_second": 2 * raw.tokens_per_second,
         "predicted_tokens_per_second": raw.tokens_per_second, "predictor": OP_ROOFLINE},
    ]
    (tmp_path / "calibration.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cal = estimate_throughput(spec, st, hw, step=step)
    assert cal.calibrated and cal.tokens_per_second == pytest.approx(2 * raw.tokens_per_second)
    assert cal.step_seconds == pytest.approx(raw.step_seconds / 2)
    assert any("calibrated x2.00" in n for n in cal.notes)
    other = estimate_throughput(spec, st.model_copy(update={"method": "full"}), hw, step=simulate(spec, setup(method="full")))
    assert not other.calibrated


GRID = [
    ("meta-llama/Llama-3.2-1B", dict(method="lora")),
    ("meta-llama/Llama-3.2-1B", dict(method="lora", gradient_checkpointing=False, bf16=False)),
    ("meta-llama/Llama-3.2-1B", dict(method="full")),
    ("meta-llama/Llama-3.2-1B", dict(method="full", optim="adamw_torch", attn_implementation="eager", max_length=256)),
    ("meta-llama/Llama-3.2-1B", dict(method="qlora", load_in_4bit=True)),
    # fp32 weights under 4-bit (fms-acceleration's QLoRA rows): bnb casts each output back to fp32
    ("meta-llama/Llama-3.2-1B", dict(method="qlora", load_in_4bit=True, dtype="fp32", bf16=False, fp16=True,
                                     bnb_4bit_compute_dtype="fp16")),
    ("meta-llama/Llama-3.2-1B", dict(method="lora", torch_compile=True, reentrant_checkpointing=True)),
    ("Qwen/Qwen2.5-0.5B", dict(method="lora", target_modules=["q_proj", "v_proj"], r=64)),
    ("Qwen/Qwen2.5-0.5B", dict(method="full", per_device_train_batch_size=8, gradient_checkpointing=False)),
]


@pytest.mark.parametrize("model_id,kw", GRID, ids=[f"{m.split('/')[1]}-{k['method']}-{i}" for i, (m, k) in enumerate(GRID)])
def test_analytic_time_agrees_with_the_simulated_op_trace(model_id, kw):
    """The analytic tier's closed-form op records (what --fast and the planner's search use) time the
    step within 15% of the dry run's op trace, on a GPU with fast memory and one with slow memory."""
    from tools.memory import simulate
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup

    model = lookup_model(model_id, hub=False)
    # loss_impl=hf: the closed-form records write down transformers' loss head (trl's fused head is not modelled there yet)
    st = TrainingSetup(**{"model_id": model_id, "per_device_train_batch_size": 2, "max_length": 512, "loss_impl": "hf", **kw})
    step = simulate(model, st)
    for gpu in ("A100 80GB", "RTX 4090", "L4"):
        hw = parse_hardware(gpu)
        sim = timing.time_from_step(step, st, hw)
        ana = timing.time_analytic(model, st, hw)
        assert ana.step_seconds == pytest.approx(sim.step_seconds, rel=0.15), gpu
        assert ana.flops_per_step == pytest.approx(sim.flops_per_step, rel=0.05), gpu


def test_flat_factor_fallback_checked_against_the_op_roofline():
    """The flat factors that remain as the stated fallback, next to the op-roofline model on a grid of
    setups and GPUs: recorded here so a change in either shows up (they disagree by up to ~3x: that is
    why the analytic tier uses the roofline over op records and the flat factors only as a fallback)."""
    from tools.models import lookup_model
    from tools.schemas import TrainingSetup
    from tools.throughput import flat_estimate_throughput

    model = lookup_model("meta-llama/Llama-3.1-8B", hub=False)
    ratios = []
    for method, gpu in itertools.product(("full", "lora", "qlora"), ("A100 80GB", "H100 SXM", "RTX 4090", "RTX A6000")):
        st = TrainingSetup(model_id=model.model_id, method=method, load_in_4bit=method == "qlora",
                           per_device_train_batch_size=2, max_length=2048)
        hw = parse_hardware(gpu)
        new = timing.time_analytic(model, st, hw).tokens_per_second
        flat = flat_estimate_throughput(model, st, hw, calibrate=False).tokens_per_second
        ratios.append(flat / new)
    assert all(0.25 < r < 1.5 for r in ratios), ratios


def test_sharded_dry_run_traces_the_local_shards():
    """Under FSDP2 on the fake process group every op on DTensors reaches the tracker twice (the DTensor
    op, the op on the local shards): only the local one is traced, and its optimizer is not sharded again."""
    from tools.memory import simulate

    spec = tiny_spec()
    st = setup(method="full", num_gpus=2, fsdp="full_shard")
    step = simulate(spec, st)
    trace = timing.trace_from_list(step.op_trace)
    assert timing.SHARDED_MARKER in trace
    single = timing.trace_from_list(simulate(spec, setup(method="full")).op_trace)
    assert timing.SHARDED_MARKER not in single

    def adam_bytes(t):
        return sum(r[4] * c for r, c in t.items() if r[7] == "_fused_adamw_")

    # fp32 master shards of half the parameters move what the unsharded bf16 update moves
    assert adam_bytes(trace) == pytest.approx(adam_bytes(single), rel=0.01)
    t = timing.time_from_step(step, st, parse_hardware("2x A100 SXM 80GB"))
    assert any("rank 0's" in n for n in t.notes)
    assert t.by_phase["communication"] > 0


def test_activation_offload_costs_pcie_time():
    counts = {("forward", "matmul", "bf16", 10**12, 10**8, 1.0, False, "mm"): 1.0,
              ("backward", "matmul", "bf16", 2 * 10**12, 2 * 10**8, 1.0, False, "mm"): 1.0}
    kw = dict(param_bytes=1e9, grad_bytes=1e9, trainable_params=1e8, num_params=1e9)
    hw = parse_hardware("RTX 4090")
    st = setup(method="lora")
    base = timing.step_time(counts, st, hw, **kw)
    off = timing.step_time(counts, st, hw, activation_offload_bytes=20e9, **kw)
    assert off.by_phase["offload"] > 0 and base.by_phase["offload"] == 0
    # 20 GB there and back over PCIe 4.0 (~22 GB/s achievable) cannot hide under ~0.03 s of compute
    assert off.step_seconds > base.step_seconds + 1.0


def test_sharded_step_collectives_move_the_whole_model():
    """The sharded dry run holds rank 0's shards; the all-gather / reduce-scatter still move every
    parameter and gradient: the collective sizes equal those of the unsharded step of the same setup."""
    from tools.memory import simulate

    spec = tiny_spec()
    for kw in (dict(method="full", dtype="bf16", bf16=False), dict(method="full"), dict(method="lora", dtype="bf16", bf16=False)):
        st = setup(num_gpus=2, fsdp="full_shard", **kw)
        sharded = simulate(spec, st)
        assert sharded.world_size == 2
        unsharded = simulate(spec, setup(**kw))
        got = timing._collective_bytes(sharded, st)
        want = timing._collective_bytes(unsharded, st)
        assert got[0] == pytest.approx(want[0], rel=0.02), kw
        assert got[1] == pytest.approx(want[1], rel=0.02), kw


def test_paged_optimizer_pages_over_pcie_only_when_states_do_not_fit():
    """paged_adamw_*: the states that do not fit beside the step migrate in and out over PCIe every
    optimizer step (2x the overflow at the pinned-copy rate); when they fit, nothing is charged."""
    from types import SimpleNamespace

    gib = 1 << 30
    st = setup(method="full", optim="paged_adamw_32bit")
    hw = parse_hardware("RTX 4090")  # 24 GiB
    fits = SimpleNamespace(peak_bytes=10 * gib, optimizer_bytes=4 * gib, allocator_overhead_bytes=0)
    over = SimpleNamespace(peak_bytes=60 * gib, optimizer_bytes=50 * gib, allocator_overhead_bytes=0)
    assert timing.paged_overflow(fits, st, hw) == 0
    ov = timing.paged_overflow(over, st, hw)
    assert ov == pytest.approx(60 * gib + timing.PAGED_RESERVE_BYTES - hw.gpu.memory_gib * gib)
    # at most the states themselves page
    huge = SimpleNamespace(peak_bytes=200 * gib, optimizer_bytes=50 * gib, allocator_overhead_bytes=0)
    assert timing.paged_overflow(huge, st, hw) == 50 * gib
    # not paged: never
    assert timing.paged_overflow(over, setup(method="full", optim="adamw_torch"), hw) == 0
    counts = {("forward", "matmul", "bf16", 10**12, 10**8, 1.0, False, "mm"): 1.0,
              ("backward", "matmul", "bf16", 2 * 10**12, 2 * 10**8, 1.0, False, "mm"): 1.0}
    kw = dict(param_bytes=1e9, grad_bytes=1e9, trainable_params=1e8, num_params=1e9)
    base = timing.step_time(counts, st, hw, **kw)
    paged = timing.step_time(counts, st, hw, paged_overflow_bytes=ov, **kw)
    want = 2 * ov / (hw.gpu.pcie_gbs * timing.PCIE_EFF * 1e9)
    assert paged.step_seconds - base.step_seconds == pytest.approx(want, rel=1e-6)
    assert any("paged optimizer" in n for n in paged.notes)
    # a wider PCIe link is never slower
    h100 = parse_hardware("H100 SXM 80GB")
    assert timing.step_time(counts, st, h100, paged_overflow_bytes=ov, **kw).step_seconds < paged.step_seconds


class _Observe:
    """Feed every aten op of a block of real CPU code to an OpTrace (as the tracker does)."""

    def __init__(self, trace):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.trace(func, args, kwargs or {}, out, outer.tag)
                return out

        self.trace, self.tag, self.mode = trace, "forward", Mode()

    def __enter__(self):
        self.trace.active = True
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_compile_fuses_a_pointwise_chain_into_one_kernel():
    """torch.compile: a chain of pointwise ops between two matmuls is one kernel that reads its inputs
    once and writes only what is still alive at the chain's end; eager moves every op's tensors."""
    import torch

    x = torch.randn(64, 128)
    w = torch.randn(128, 128)

    def chain():
        h = x @ w
        y = ((h * 2.0) + 1.0).relu()  # two intermediates, freed inside the chain
        return h, y @ w

    eager, fused = timing.OpTrace(), timing.OpTrace(fuse=True)
    with _Observe(eager):
        chain()
    with _Observe(fused):
        h, _ = chain()
    ew = lambda t: {r: c for r, c in t.result().items() if r[1] == "elementwise"}  # noqa: E731
    e, f = ew(eager), ew(fused)
    nb = 64 * 128 * 4
    assert sum(r[4] * c for r, c in e.items()) == 3 * 2 * nb  # mul, add, relu: each reads and writes [64, 128]
    assert sum(e.values()) == 3
    # fused: one kernel, reads h once, writes y once (the intermediates are gone when the matmul comes)
    assert list(f.values()) == [1]
    assert next(iter(f))[4] == 2 * nb and next(iter(f))[7] == "fused_pointwise"
    # matmuls are untouched
    mm = lambda t: sorted((r, c) for r, c in t.result().items() if r[1] == "matmul")  # noqa: E731
    assert mm(eager) == mm(fused)

    # an intermediate still referenced when the chain ends (saved for later) is written
    keep = []

    def chain_keep():
        h = x @ w
        a = h * 2.0
        keep.append(a)
        return (a + 1.0) @ w

    kept = timing.OpTrace(fuse=True)
    with _Observe(kept):
        chain_keep()
    k = ew(kept)
    assert next(iter(k))[4] == 3 * nb  # read h, write a (alive) and a + 1


def test_compile_setup_is_faster_with_the_same_flops_and_the_tiers_agree():
    from tools.memory import simulate
    from tools.memory.timing_analytic import analytic_counts

    spec = tiny_spec(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    hw = parse_hardware("RTX 4090")
    for kw in (dict(method="lora", max_length=256), dict(method="full", max_length=256, gradient_checkpointing=False)):
        eager_st, comp_st = setup(**kw), setup(torch_compile=True, **kw)
        eager, comp = simulate(spec, eager_st), simulate(spec, comp_st)
        te, tc = timing.time_from_step(eager, eager_st, hw), timing.time_from_step(comp, comp_st, hw)
        assert tc.flops_per_step == pytest.approx(te.flops_per_step, rel=1e-9)
        assert tc.by_op_class["elementwise"] + tc.by_op_class["norm_softmax"] < 0.7 * (te.by_op_class["elementwise"] + te.by_op_class["norm_softmax"])
        assert tc.step_seconds < te.step_seconds
        # the analytic tier's fused records move about what the fused trace moves
        def membytes(counts):
            return sum(r[4] * c for r, c in counts.items() if r[1] in ("elementwise", "norm_softmax") and r[0] != "optimizer")
        traced = membytes(timing.trace_from_list(comp.op_trace))
        written = membytes(analytic_counts(spec, comp_st))
        assert written == pytest.approx(traced, rel=0.35), (kw, written, traced)
    # the generated script passes it to the Trainer (and only when asked)
    from tools.script import render_script

    assert "torch_compile=torch.cuda.is_available()" in render_script(setup(method="lora", torch_compile=True)).train_py
    assert "torch_compile=" not in render_script(setup(method="lora")).train_py


def test_power_limit_lowers_compute_not_bandwidth():
    """A board run below its board power (nvidia-smi -pl) sustains a lower clock: f ~ (P/P_board)^(1/3)
    for matmul and attention; memory bandwidth is unchanged; at or above board power nothing changes."""
    h100 = parse_hardware("H100 SXM 80GB").gpu
    capped = h100.model_copy(update={"power_limit_w": 500})
    full, low = timing.gpu_rates(h100), timing.gpu_rates(capped)
    k = (500 / 700) ** (1 / 3)
    assert low.matmul_eff == pytest.approx(full.matmul_eff * k)
    assert low.attn_fwd_eff == pytest.approx(full.attn_fwd_eff * k)
    assert low.bandwidth == full.bandwidth
    assert timing.gpu_rates(h100.model_copy(update={"power_limit_w": 800})).matmul_eff == full.matmul_eff
    counts = {("forward", "matmul", "bf16", 10**13, 10**8, 1.0, False, "mm"): 1.0,
              ("forward", "elementwise", "bf16", 0, 10**9, 1.0, False, "add"): 1.0}
    kw = dict(param_bytes=1e9, grad_bytes=1e9, trainable_params=1e8, num_params=1e9)
    st = setup(method="full")
    t_full = timing.step_time(counts, st, HardwareSpec(gpu=h100, num_gpus=1), **kw).step_seconds
    t_low = timing.step_time(counts, st, HardwareSpec(gpu=capped, num_gpus=1), **kw).step_seconds
    assert t_low > t_full


def test_reentrant_checkpointing_recomputes_the_whole_block():
    """use_reentrant=True (transformers 4.35-4.5x's default) recomputes every op of a checkpointed block;
    non-reentrant checkpointing stops once the saved tensors are back, skipping the block's last matmul.
    The traced difference is exactly that matmul (down_proj: 2 x tokens x intermediate x hidden per
    block), and the analytic tier writes down the same recompute."""
    from tools.memory import simulate
    from tools.memory.timing_analytic import analytic_counts

    spec = tiny_spec(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    rec = {}
    for re in (False, True):
        st = setup(method="full", max_length=256, reentrant_checkpointing=re)
        tr = timing.trace_from_list(simulate(spec, st).op_trace)
        rec[re] = sum(r[3] * c for r, c in tr.items() if r[0] == "recompute")
        assert rec[re] == sum(r[3] * c for r, c in analytic_counts(spec, st).items() if r[0] == "recompute")
    tokens = st.per_device_train_batch_size * 256
    assert rec[True] - rec[False] == 2 * tokens * 512 * 256 * spec.num_hidden_layers
    from tools.script import render_script

    assert '"use_reentrant": True' in render_script(setup(method="lora", reentrant_checkpointing=True)).train_py
    assert '"use_reentrant": True' not in render_script(setup(method="lora")).train_py
