"""The sharded dry run (tools.memory.distributed) against REAL multi-process sharded steps on this CPU.

Each case runs twice: simulated (fake tensors, fake process group, rank 0) and for real (2 or 4
processes, gloo, real tensors: tests/_distributed_helpers.py), both counted by the same storage
counter. Per-rank resident bytes (sharded parameters and buffers, gradients, optimizer states, what
CPU offload keeps in host RAM) must agree byte for byte, and the step's peak within 2% of the worst
real rank. Models: tiny Llama (untied head, vocabulary not divisible by 4: uneven shards) and tiny
Qwen2 (q/k/v biases, tied embeddings), full fine-tuning, LoRA and QLoRA, FSDP2 full_shard and
shard_grad_op, with and without CPU offload, and DeepSpeed ZeRO-2/3 through the shared partitioning (the step
`simulate` runs; DeepSpeed's own gradient partition and buckets are modelled on top by tools.estimator).
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tests._distributed_helpers import run_real
from tests._simulator_helpers import setup, tiny_spec

LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=250, max_position_embeddings=256, tie_word_embeddings=False)
QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True)
# loss_impl=hf: the real gloo ranks (tests/_distributed_helpers.py) run train_step with transformers' own loss
_BASE = dict(max_length=32, per_device_train_batch_size=2, bf16=True, loss_impl="hf")

CASES = {
    2: [
        ("llama-full-full_shard", LLAMA, dict(method="full", fsdp="full_shard")),
        ("llama-full-shard_grad_op", LLAMA, dict(method="full", fsdp="shard_grad_op", gradient_checkpointing=False)),
        ("llama-lora-full_shard", LLAMA, dict(method="lora", fsdp="full_shard")),
        ("qwen2-lora-shard_grad_op", QWEN2, dict(method="lora", fsdp="shard_grad_op", target_modules=["q_proj", "v_proj"])),
        ("llama-full-full_shard-offload", LLAMA, dict(method="full", fsdp="full_shard", offload="all")),
        ("llama-qlora-full_shard", LLAMA, dict(method="qlora", load_in_4bit=True, fsdp="full_shard", bnb_4bit_quant_storage="bf16")),
        ("qwen2-full-zero3", QWEN2, dict(method="full", zero_stage=3)),
        # ZeRO-2: the 16-bit weights stay gathered through the step, frozen weights whole on every rank
        ("llama-full-zero2", LLAMA, dict(method="full", zero_stage=2)),
        ("qwen2-lora-zero2", QWEN2, dict(method="lora", zero_stage=2)),
        # FSDP1 (fsdp_version 1): the real FullyShardedDataParallel in both (fake group / gloo), as accelerate 1.x wraps
        ("llama-lora-full_shard-fsdp1", LLAMA, dict(method="lora", fsdp="full_shard", fsdp_version=1)),
        ("llama-full-full_shard-fsdp1", LLAMA, dict(method="full", fsdp="full_shard", fsdp_version=1)),
        ("llama-full-shard_grad_op-fsdp1", LLAMA, dict(method="full", fsdp="shard_grad_op", fsdp_version=1, gradient_checkpointing=False)),
        ("qwen2-lora-shard_grad_op-fsdp1", QWEN2, dict(method="lora", fsdp="shard_grad_op", fsdp_version=1, target_modules=["q_proj", "v_proj"])),
        ("llama-qlora-full_shard-fsdp1", LLAMA, dict(method="qlora", load_in_4bit=True, fsdp="full_shard", fsdp_version=1,
                                                      bnb_4bit_quant_storage="bf16")),
    ],
    4: [
        ("qwen2-full-shard_grad_op-offload", QWEN2, dict(method="full", fsdp="shard_grad_op", offload="all")),
        ("llama-lora-full_shard-offload", LLAMA, dict(method="lora", fsdp="full_shard", offload="all")),
    ],
}


def _cases(world):
    out = []
    for name, cfg, kw in CASES[world]:
        spec = tiny_spec(cfg)
        st = setup(num_gpus=world, **{**_BASE, **kw})
        out.append((name, spec, st, cfg["num_hidden_layers"]))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def compared(request):
    """(world, [(name, simulated StepMemory, [real rank results])]) for one world size."""
    from tools.memory import simulate

    world = request.param
    cases = _cases(world)
    with real_fsdp1():  # the -fsdp1 cases: the real FSDP1 in the dry run and in the gloo ranks (opt-in)
        real = run_real(world, cases)
        return world, [(name, simulate(spec, st, extrapolate=False), real[name]) for name, spec, st, _ in cases]


@contextlib.contextmanager
def real_fsdp1():
    """TUNEPILOT_FSDP1=real within (this process and the ranks it spawns)."""
    from tools.memory import distributed

    old_env, old_flag = os.environ.get("TUNEPILOT_FSDP1"), distributed.FSDP1_REAL
    os.environ["TUNEPILOT_FSDP1"], distributed.FSDP1_REAL = "real", True
    try:
        yield
    finally:
        distributed.FSDP1_REAL = old_flag
        if old_env is None:
            os.environ.pop("TUNEPILOT_FSDP1", None)
        else:
            os.environ["TUNEPILOT_FSDP1"] = old_env


def test_resident_bytes_equal_every_rank_byte_for_byte(compared):
    world, rows = compared
    for name, sim, ranks in rows:
        assert sim.world_size == world and sim.rank == 0, name
        r0 = ranks[0]
        got = (sim.weights_bytes, sim.adapter_bytes, sim.gradient_bytes, sim.optimizer_bytes)
        want = (r0["weights_bytes"], r0["adapter_bytes"], r0["gradient_bytes"], r0["optimizer_bytes"])
        assert got == want, f"{name} (world {world}): simulated {got} != real rank 0 {want}"
        for kind in ("offloaded_params", "master_weights", "gradients", "optimizer_states"):
            assert sim.offloaded_bytes.get(kind, 0) == r0["offloaded"].get(kind, 0), f"{name}: offloaded {kind}"
        # the host optimizer step's transient peak (clipping scalars differ by a few bytes): within 2% + 1 KiB
        tmp_sim, tmp_real = sim.offloaded_bytes.get("optimizer_step_temporaries", 0), r0["offloaded"].get("optimizer_step_temporaries", 0)
        assert abs(tmp_sim - tmp_real) <= 0.02 * tmp_real + 1024, f"{name}: host optimizer temporaries {tmp_sim} vs {tmp_real}"
        if name.endswith("-fsdp1"):  # the dry run wrapped with the real FSDP1, not the FSDP2 units that model it
            assert any("FSDP1 (FullyShardedDataParallel, the real one)" in n for n in sim.notes), (name, sim.notes)
        # rank 0 holds the largest shard of every parameter (FSDP1: every rank's padded chunk of a FlatParameter is
        # the same size, the padding on the last rank): no rank has more resident bytes
        for r, res in enumerate(ranks):
            total = res["weights_bytes"] + res["adapter_bytes"] + res["gradient_bytes"] + res["optimizer_bytes"]
            assert total <= sum(want), f"{name}: rank {r} holds more than rank 0"


# QLoRA's peak is compared for residents only: on this CPU bitsandbytes runs its CPU 4-bit kernels in the
# real step and its CUDA-shaped fake kernels in the dry run (the dequantisation transients differ), so
# the peak gap there is the stand-in's, not the sharding's
_PEAK_SKIP = {"llama-qlora-full_shard", "llama-qlora-full_shard-fsdp1"}


def test_peak_within_2_percent_of_worst_real_rank(compared):
    world, rows = compared
    for name, sim, ranks in rows:
        if name in _PEAK_SKIP:
            continue
        worst = max(r["peak"] for r in ranks)
        err = abs(sim.peak_bytes - worst) / worst
        assert err <= 0.02, f"{name} (world {world}): simulated peak {sim.peak_bytes:,} vs worst real rank {worst:,} ({err:.2%})"


def test_sharding_cuts_per_rank_state():
    """The sharded dry run really shards: per-rank optimizer states at world 4 are a quarter (rounded up per tensor) of world 1's."""
    from tools.memory import simulate

    spec = tiny_spec(LLAMA)
    one = simulate(spec, setup(num_gpus=1, **_BASE, method="full"), extrapolate=False)
    four = simulate(spec, setup(num_gpus=4, **_BASE, method="full", fsdp="full_shard"), extrapolate=False)
    # fp32 master moments under FSDP mixed precision vs bf16 moments of plain bf16 training: 2x bytes, / 4 ranks
    assert four.rank == 0 and four.world_size == 4
    assert 0.49 * one.optimizer_bytes <= four.optimizer_bytes <= 0.56 * one.optimizer_bytes
    assert four.peak_breakdown["fsdp_all_gather"] > 0 and four.peak_bytes < one.peak_bytes


def test_fsdp1_reentrant_checkpointing_keeps_each_frozen_units_input_and_its_gradient():
    """transformers 4.40's Trainer + accelerate's FSDP1 + peft's wrap policy + torch's reentrant checkpoint default:
    every frozen decoder-layer unit keeps its recomputed input and that input's gradient until backward ends (FSDP1's
    reshard-only multi-grad hook holds the detached input's AccumulateGrad). A REAL FSDP1 step (torch's
    FullyShardedDataParallel, 2 gloo ranks) at depth 4 and 6 against the dry run of fsdp_version 1 with
    reentrant_checkpointing: the backward peak's growth per block is the same to 1% and the peaks within 3%; without
    the two kept tensors per block the dry run's growth falls short of the real one by more than one of them (the
    peak then moves to the last block's backward, where the inputs of the blocks below are alive anyway)."""
    from tests._distributed_helpers import run_real_fsdp1
    from tools.memory import distributed
    from tools.memory import step as S

    cfg = dict(LLAMA, hidden_size=256, intermediate_size=512, vocab_size=256)
    st = setup(num_gpus=2, method="lora", dtype="bf16", bf16=False, optim="adamw_torch", loss_impl="hf", lora_dropout=0.0,
               max_length=128, per_device_train_batch_size=2, fsdp="full_shard", fsdp_version=1,
               reentrant_checkpointing=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    cases = [(f"L{d}", tiny_spec(dict(cfg, num_hidden_layers=d)), st, d) for d in (4, 6)]
    real = run_real_fsdp1(2, cases)
    sim = {name: S.run(spec, st, d) for name, spec, _, d in cases}

    def backward(r):
        return r["segments"]["backward"] if isinstance(r, dict) else sum(r.segments["backward"].values())

    real_slope = (backward(real["L6"][0]) - backward(real["L4"][0])) / 2
    sim_slope = (backward(sim["L6"]) - backward(sim["L4"])) / 2
    assert sim_slope == pytest.approx(real_slope, rel=0.01)
    for name in ("L4", "L6"):
        assert backward(sim[name]) == pytest.approx(backward(real[name][0]), rel=0.03)
    hidden_bytes = st.per_device_train_batch_size * st.max_length * cfg["hidden_size"] * 2  # one [b, s, h] bf16
    distributed.FSDP1_KEEPS_RECOMPUTED_INPUTS = False
    try:
        bare = {name: S.run(spec, st, d) for name, spec, _, d in cases}
    finally:
        distributed.FSDP1_KEEPS_RECOMPUTED_INPUTS = True
    bare_slope = (backward(bare["L6"]) - backward(bare["L4"])) / 2
    assert real_slope - bare_slope > 1.2 * hidden_bytes


def test_fsdp1_dry_run_runs_the_real_fsdp1_and_falls_back_to_the_fsdp2_units_when_it_fails(monkeypatch):
    """fsdp_version 1: the fake-group dry run wraps with torch's FullyShardedDataParallel (flat parameters: its
    all-gather output is tagged fsdp_all_gather) for Llama, Qwen2 and Mistral; should FSDP1 fail under fake tensors,
    the same step runs on the FSDP2 units that model it and the notes say so; setups the real FSDP1 does not cover
    (CPU offload) say which model stands in."""
    from tools.memory import distributed, simulate
    from tools.memory.runner import clear_cache

    monkeypatch.setattr(distributed, "FSDP1_REAL", True)
    mistral = dict(LLAMA, model_type="mistral", sliding_window=None)
    for cfg in (LLAMA, QWEN2, mistral):
        for kw in (dict(method="full"), dict(method="lora"), dict(method="qlora", load_in_4bit=True, bnb_4bit_quant_storage="bf16")):
            sim = simulate(tiny_spec(cfg), setup(num_gpus=2, **_BASE, fsdp="full_shard", fsdp_version=1, **kw), extrapolate=False)
            assert any("FSDP1 (FullyShardedDataParallel, the real one)" in n for n in sim.notes), (cfg["model_type"], kw)
            assert sim.peak_breakdown["fsdp_all_gather"] > 0
    st = setup(num_gpus=2, **_BASE, method="lora", fsdp="full_shard", fsdp_version=1)
    real = simulate(tiny_spec(LLAMA), st, extrapolate=False)

    def broken(*a, **k):
        raise RuntimeError("no FSDP1 here")

    shard_fsdp1 = distributed.shard_fsdp1
    monkeypatch.setattr(distributed, "shard_fsdp1", broken)
    clear_cache()
    modelled = simulate(tiny_spec(LLAMA), st, extrapolate=False)
    assert any("failed under fake tensors: RuntimeError: no FSDP1 here" in n for n in modelled.notes), modelled.notes
    assert not any("the real one" in n for n in modelled.notes)
    assert modelled.peak_bytes != real.peak_bytes  # another model of the step, not the same run
    monkeypatch.setattr(distributed, "shard_fsdp1", shard_fsdp1)
    clear_cache()
    off = simulate(tiny_spec(LLAMA), setup(num_gpus=2, **_BASE, method="lora", fsdp="full_shard", fsdp_version=1, offload="all"),
                   extrapolate=False)
    assert any("modelled by the FSDP2 step" in n and "CPUOffload" in n for n in off.notes), off.notes
    monkeypatch.setattr(distributed, "FSDP1_REAL", False)  # the default: the FSDP2-units model, and it says so
    clear_cache()
    default = simulate(tiny_spec(LLAMA), st, extrapolate=False)
    assert any("modelled by the FSDP2 step" in n and "TUNEPILOT_FSDP1=real" in n for n in default.notes), default.notes
