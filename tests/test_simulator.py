"""The memory engine (tools.memory) against real CPU training steps of tiny real transformers/peft models."""

from __future__ import annotations

import pytest

from tests._simulator_helpers import real_step, setup, tiny_spec
from tools.memory import simulate
from tools.schemas import STEP_CATEGORIES, TunepilotError


def _check_shape(mem):
    assert mem.tier == "simulated"
    assert set(mem.peak_breakdown) == set(STEP_CATEGORIES)
    assert sum(mem.peak_breakdown.values()) == mem.peak_bytes
    assert mem.peak_phase in ("forward", "backward", "optimizer")


# full + adamw (foreach), LoRA + fused adamw, full + sgd, LoRA + bnb 8-bit; checkpointing on and off
REAL_CASES = [
    dict(method="full", optim="adamw_torch", gradient_checkpointing=False),
    dict(method="lora", optim="adamw_torch_fused", gradient_checkpointing=True),
    dict(method="full", optim="sgd", gradient_checkpointing=True, dtype="fp32", bf16=False),
    dict(method="lora", optim="adamw_bnb_8bit", gradient_checkpointing=False, r=64),
    # fp16 mixed precision: fp32 weights, fp16 autocast, GradScaler (scaled loss, in-place unscale)
    dict(method="lora", optim="adamw_torch_fused", gradient_checkpointing=True, dtype="fp32", bf16=False, fp16=True),
]


@pytest.mark.parametrize("kw", REAL_CASES, ids=lambda kw: f"{kw['method']}-{kw['optim']}-ckpt{int(kw['gradient_checkpointing'])}")
def test_simulated_step_matches_real_cpu_step(kw):
    spec = tiny_spec()
    st = setup(**kw)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    _check_shape(sim)
    # resident state: exact, byte for byte
    assert sim.weights_bytes + sim.adapter_bytes == real["param_and_buffer_bytes"]
    assert sim.gradient_bytes == real["trainable_bytes"] == real["gradient_bytes"]
    assert sim.optimizer_bytes == real["optimizer_bytes"]
    assert sim.trainable_parameters == real["trainable_parameters"]
    if kw["method"] == "lora":
        assert sim.adapter_bytes == real["trainable_bytes"]
        assert sim.weights_bytes == real["param_and_buffer_bytes"] - real["trainable_bytes"]
    # the whole step peak (activations, logits, temporaries on top) agrees with the real step
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)


TINY_QWEN2_TIED = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True,
)


@pytest.mark.parametrize("kw", [dict(method="full", optim="adamw_torch", gradient_checkpointing=False),
                                dict(method="lora", optim="adamw_torch_fused")], ids=["full", "lora"])
def test_tied_embeddings_counted_once(kw):
    """A tied LM head shares the embedding matrix: one tensor, counted once (as in the real model)."""
    spec = tiny_spec(TINY_QWEN2_TIED)
    st = setup(**kw)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    assert sim.num_parameters == real["num_parameters"]
    assert sim.weights_bytes + sim.adapter_bytes == real["param_and_buffer_bytes"]
    assert sim.gradient_bytes == real["gradient_bytes"]
    assert sim.optimizer_bytes == real["optimizer_bytes"]
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)
    if kw["method"] == "full":  # extrapolated over depth too: the shared matrix is not a per-block quantity
        deep = tiny_spec(TINY_QWEN2_TIED, num_hidden_layers=4)
        assert simulate(deep, st).num_parameters == simulate(deep, st, extrapolate=False).num_parameters


TINY_BERT = dict(model_type="bert", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=8192, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
BERT_SETUP = dict(task="sequence-classification", method="full", dtype="fp32", bf16=False, attn_implementation="eager",
                  gradient_checkpointing=False, optim="adamw_torch_fused", max_length=128)


def test_bert_sequence_classification_matches_real_cpu_step():
    """Encoder, eager attention (s^2 probabilities + their dropout masks), pooler and classifier head."""
    spec = tiny_spec(TINY_BERT)
    st = setup(**BERT_SETUP)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    assert sim.num_parameters == real["num_parameters"]
    assert sim.weights_bytes == real["param_and_buffer_bytes"]
    assert sim.optimizer_bytes == real["optimizer_bytes"]
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)


@pytest.mark.parametrize("ga", [1, 2])
def test_bert_extrapolation_equals_full_simulation(ga):
    """The embedding backward is its own segment: a 1-block model's backward peak is not the deep model's kind of moment."""
    spec = tiny_spec(TINY_BERT, num_hidden_layers=6)
    st = setup(**BERT_SETUP, per_device_train_batch_size=1, gradient_accumulation_steps=ga)
    ext = simulate(spec, st)
    full = simulate(spec, st, extrapolate=False)
    assert ext.layers_simulated == [1, 2]
    assert ext.peak_bytes == pytest.approx(full.peak_bytes, rel=0.01)
    assert ext.peak_breakdown["activations"] == pytest.approx(full.peak_breakdown["activations"], rel=0.01)


def test_extrapolation_equals_full_simulation():
    spec = tiny_spec(num_hidden_layers=4)
    for kw in (dict(gradient_checkpointing=True), dict(gradient_checkpointing=False, method="full", optim="adamw_torch")):
        st = setup(**kw)
        ext = simulate(spec, st)
        full = simulate(spec, st, extrapolate=False)
        assert ext.layers_simulated == [1, 2] and full.layers_simulated == [4]
        assert ext.per_layer_bytes > 0
        assert ext.peak_bytes == pytest.approx(full.peak_bytes, rel=0.01)
        for cat in STEP_CATEGORIES:
            assert ext.peak_breakdown[cat] == pytest.approx(full.peak_breakdown[cat], rel=0.01, abs=4096)
        assert ext.num_parameters == full.num_parameters
        assert ext.optimizer_bytes == full.optimizer_bytes


def test_checkpointing_lowers_activation_peak():
    spec = tiny_spec(num_hidden_layers=4)
    on = simulate(spec, setup(gradient_checkpointing=True), extrapolate=False)
    off = simulate(spec, setup(gradient_checkpointing=False), extrapolate=False)
    assert on.peak_breakdown["activations"] * 2 < off.peak_breakdown["activations"]
    assert on.peak_bytes < off.peak_bytes


def test_eager_attention_grows_with_seq_squared():
    spec = tiny_spec(num_hidden_layers=1)
    extra = {}
    for s in (512, 1024):
        kw = dict(gradient_checkpointing=False, max_length=s, per_device_train_batch_size=1, lora_dropout=0.0)
        eager = simulate(spec, setup(attn_implementation="eager", **kw), extrapolate=False)
        sdpa = simulate(spec, setup(attn_implementation="sdpa", **kw), extrapolate=False)
        extra[s] = eager.peak_bytes - sdpa.peak_bytes
        # eager keeps at least the bf16 attention probabilities of every head: heads * s^2 * 2 bytes
        assert extra[s] >= 4 * s * s * 2
    assert extra[1024] / extra[512] == pytest.approx(4.0, rel=0.2)  # quadratic, not linear


def test_qlora_weights_are_half_a_byte_per_param():
    spec = tiny_spec(hidden_size=128, intermediate_size=512, num_hidden_layers=1)
    st = setup(method="qlora", load_in_4bit=True, optim="paged_adamw_8bit")
    q = simulate(spec, st, extrapolate=False)
    plain = simulate(spec, setup(method="lora", optim="paged_adamw_8bit"), extrapolate=False)
    _check_shape(q)
    # linear weights of the block: q,k,v,o + gate,up,down
    h, i, kv = 128, 512, 2 * 32
    linear = h * h * 2 + h * kv * 2 + 3 * h * i
    other_bf16 = plain.weights_bytes - 2 * linear  # embeddings, head, norms stay in bf16
    four_bit = q.weights_bytes - other_bf16
    per_param = four_bit / linear
    # 0.5 byte packed + 1 byte uint8 absmax per 64 (double quant) + fp32 nested absmax per 256 blocks + code tables
    assert 0.5 + 1 / 64 <= per_param < 0.5 + 1 / 64 + 0.01
    assert q.num_parameters == plain.num_parameters
    assert any("4-bit" in n for n in q.notes)


def test_llm_int8_weights_are_one_byte_per_param():
    spec = tiny_spec(hidden_size=128, intermediate_size=512, num_hidden_layers=1)
    q8 = simulate(spec, setup(method="lora", load_in_8bit=True), extrapolate=False)
    plain = simulate(spec, setup(method="lora"), extrapolate=False)
    _check_shape(q8)
    h, i, kv = 128, 512, 2 * 32
    linear = h * h * 2 + h * kv * 2 + 3 * h * i
    rows = h + kv + kv + h + i + i + h  # q, k, v, o, gate, up, down output rows: one fp32 scale each
    other_bf16 = plain.weights_bytes - 2 * linear
    assert q8.weights_bytes - other_bf16 == linear + 4 * rows
    assert q8.adapter_bytes == plain.adapter_bytes // 2  # trl casts adapters of a quantized model to bf16


def test_8bit_adam_state_is_a_quarter_of_fp32_adam():
    spec = tiny_spec(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=512)
    kw = dict(method="full", dtype="fp32", bf16=False, gradient_checkpointing=True)
    a8 = simulate(spec, setup(optim="adamw_bnb_8bit", **kw), extrapolate=False)
    a32 = simulate(spec, setup(optim="adamw_torch", **kw), extrapolate=False)
    n = a8.trainable_parameters
    assert a32.optimizer_bytes / n == pytest.approx(8.0, abs=0.01)
    # 2 x uint8 + fp32 absmax per 256 elements; norm weights (< 4096 elements) keep fp32 states
    assert 2.0 < a8.optimizer_bytes / n < 2.2


@pytest.mark.parametrize("kw", [dict(method="ia3"), dict(method="prompt-tuning"),
                                dict(method="prefix-tuning", gradient_checkpointing=False),
                                dict(method="lora", task="sequence-classification", r=4)], ids=lambda kw: f"{kw['method']}-{kw.get('task', 'causal-lm')}")
def test_peft_methods_and_tasks_run(kw):
    spec = tiny_spec()
    mem = simulate(spec, setup(**kw), extrapolate=False)
    _check_shape(mem)
    share = 10 if kw["method"] != "lora" else 2  # prompt/IA3 vectors are tiny; LoRA r=16 on a 64-wide toy is not
    assert 0 < mem.adapter_bytes < mem.weights_bytes / share
    assert 0 < mem.trainable_parameters < mem.num_parameters / share
    # fp32 adapters, two fp32 Adam moments (+ a 4-byte step counter per tensor for fused AdamW)
    assert 2 * mem.adapter_bytes <= mem.optimizer_bytes <= 2 * mem.adapter_bytes + 4 * 32


def test_moe_model_runs():
    cfg = dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=256, num_experts=4, num_experts_per_tok=2)
    spec = tiny_spec(cfg)
    ext = simulate(spec, setup(method="full", optim="adamw_torch_fused"))
    _check_shape(ext)
    assert ext.layers_simulated == [1, 2]
    assert any("MoE experts" in n for n in ext.notes)
    # full FT in bf16: AdamW moments in the parameter dtype (bf16), 2 x the weights (+ step counters)
    assert ext.optimizer_bytes == pytest.approx(2 * ext.weights_bytes, rel=1e-3)


def test_eval_peak_reported_only_when_evaluating():
    spec = tiny_spec()
    assert simulate(spec, setup(), extrapolate=False).eval_peak_bytes is None
    mem = simulate(spec, setup(eval_strategy="epoch", prediction_loss_only=False), extrapolate=False)
    assert mem.weights_bytes + mem.adapter_bytes + mem.optimizer_bytes < mem.eval_peak_bytes < mem.peak_bytes


def test_unsupported_setups_raise_one_clear_error():
    spec = tiny_spec()
    with pytest.raises(TunepilotError, match="optim"):
        simulate(spec, setup(optim="adamw_torch_8bit"))
    with pytest.raises(TunepilotError, match="method"):
        simulate(spec, setup(method="ia3", load_in_8bit=True))
    with pytest.raises(TunepilotError, match="gradient_checkpointing"):
        simulate(spec, setup(method="prefix-tuning", gradient_checkpointing=True))
    with pytest.raises(TunepilotError, match="model.config"):
        simulate(spec.model_copy(update={"config": {}}), setup())


def test_cache_returns_equal_result_fast():
    spec = tiny_spec()
    # HF's loss: on this tiny model trl's fused-head tile (a fixed [N, 32768] buffer) would hold the peak
    st = setup(optim="sgd", loss_impl="hf")
    first = simulate(spec, st, extrapolate=False)
    again = simulate(spec, st.model_copy(update={"learning_rate": 1e-5, "output_dir": "x"}), extrapolate=False)
    assert again.peak_breakdown == first.peak_breakdown
    assert any("cache" in n for n in again.notes) and again.seconds < 0.1  # served from the cache, not re-run
    other = simulate(spec, st.model_copy(update={"lora_dropout": 0.0}), extrapolate=False)
    assert not any("cache" in n for n in other.notes)
    assert other.peak_bytes < first.peak_bytes  # no dropped copy of the LoRA input


def test_cache_key_keeps_fields_that_change_memory():
    """lora_dropout 0 (peft's Identity: no mask, no dropped copy) vs 0.1, and weight decay under foreach SGD."""
    spec = tiny_spec()
    kw = dict(gradient_checkpointing=False, optim="sgd", loss_impl="hf")  # keep the fused-head tile off the peak
    d0 = simulate(spec, setup(lora_dropout=0.0, **kw), extrapolate=False)
    d1 = simulate(spec, setup(lora_dropout=0.1, **kw), extrapolate=False)
    assert not any("cache" in n for n in d1.notes)
    assert d1.peak_breakdown["activations"] > d0.peak_breakdown["activations"]
    st = setup(method="full", dtype="fp32", bf16=False, max_length=8, per_device_train_batch_size=1, **kw)
    no_wd = simulate(spec, st, extrapolate=False)
    wd = simulate(spec, st.model_copy(update={"weight_decay": 0.01}), extrapolate=False)
    assert not any("cache" in n for n in wd.notes)
    # foreach SGD adds the decay out of place: one more copy of the decayed gradients at the step
    assert wd.peak_bytes > no_wd.peak_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(method="lora", optim="adamw_torch_fused"),
                                dict(method="full", optim="adamw_torch", gradient_checkpointing=False)],
                         ids=["lora-fused-ckpt", "full-foreach-nockpt"])
def test_simulated_peak_matches_cuda_max_memory_allocated(kw):
    """On a real GPU: the raw simulated peak vs torch.cuda.max_memory_allocated of the same step."""
    cfg = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
    spec = tiny_spec(cfg)
    st = setup(max_length=1024, **kw)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st, device="cuda")
    assert sim.gradient_bytes == real["gradient_bytes"]
    assert sim.optimizer_bytes == pytest.approx(real["optimizer_bytes"], rel=1e-3)
    # CUDA-only extras (cuBLAS workspace, attention kernels' logsumexp, 512-byte rounding) are small here
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.10)


# --- speed machinery: the op cache and the forked second depth must not change a single byte -----

_SPEED_CASES = [
    dict(method="lora", gradient_checkpointing=True, lora_dropout=0.1),
    dict(method="full", optim="adamw_torch", gradient_checkpointing=False, eval_strategy="epoch"),
    dict(method="qlora", load_in_4bit=True, optim="paged_adamw_8bit", r=8),
    dict(method="dora", gradient_checkpointing=True, optim="adafactor"),
]


def _comparable(mem) -> dict:
    return mem.model_dump(exclude={"seconds", "notes"})


@pytest.mark.parametrize("kw", _SPEED_CASES, ids=lambda kw: kw["method"])
def test_op_cache_gives_the_same_result_as_fake_tensor_mode(kw, monkeypatch):
    """The tracker's own op cache (replayed outputs) vs FakeTensorMode's full path on every op."""
    import tools.memory.runner as sim_mod
    import tools.memory.tracker as tracker_mod

    spec = tiny_spec(num_hidden_layers=3)
    st = setup(**kw)
    monkeypatch.setattr(sim_mod, "_PARALLEL", False)
    monkeypatch.setattr(tracker_mod, "_FAST_PATH", False)
    sim_mod.clear_cache()
    slow = simulate(spec, st)
    monkeypatch.setattr(tracker_mod, "_FAST_PATH", True)
    sim_mod.clear_cache()
    tracker_mod._OP_CACHE.clear()
    fast_first = simulate(spec, st)  # fills the op cache
    sim_mod.clear_cache()
    fast_replayed = simulate(spec, st)  # answered from it
    assert _comparable(fast_first) == _comparable(slow)
    assert _comparable(fast_replayed) == _comparable(slow)


def _fork_available() -> bool:
    """Linux with two cores (the suite itself may have left idle server threads: the tests allow them)."""
    import os
    import sys

    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2


@pytest.mark.skipif(not _fork_available(), reason="needs Linux and two cores")
def test_forked_depth_gives_the_same_result_as_in_process(monkeypatch):
    import tools.memory.runner as sim_mod

    monkeypatch.setattr(sim_mod, "_single_threaded", lambda: True)
    spec = tiny_spec(num_hidden_layers=5)
    st = setup(method="lora", gradient_checkpointing=True)
    monkeypatch.setattr(sim_mod, "_PARALLEL", False)
    sim_mod.clear_cache()
    alone = simulate(spec, st)
    forks = []
    real_fork = sim_mod.os.fork

    def counting_fork():
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(sim_mod, "_PARALLEL", True)
    monkeypatch.setattr(sim_mod.os, "fork", counting_fork)
    sim_mod.clear_cache()
    side_by_side = simulate(spec, st)
    assert forks, "the shallower depth was not forked"
    assert side_by_side.layers_simulated == [1, 2]
    assert _comparable(side_by_side) == _comparable(alone)


@pytest.mark.skipif(not _fork_available(), reason="needs Linux and two cores")
@pytest.mark.parametrize("failure", ["raises", "dies", "hangs"])
def test_a_failing_child_falls_back_to_in_process(failure, monkeypatch):
    """Whatever happens to the forked child, the result is the one an in-process run gives."""
    import os
    import time

    import tools.memory.runner as sim_mod
    import tools.memory.step as step_mod

    spec = tiny_spec(num_hidden_layers=4)
    st = setup(method="full", optim="sgd", gradient_checkpointing=False)
    monkeypatch.setattr(sim_mod, "_PARALLEL", False)
    sim_mod.clear_cache()
    expected = simulate(spec, st)
    parent = os.getpid()
    real_run = step_mod.run

    def flaky_run(model, setup_, depth):
        if os.getpid() != parent:
            if failure == "raises":
                raise RuntimeError("boom in the child")
            if failure == "dies":
                os._exit(3)
            time.sleep(60)
        return real_run(model, setup_, depth)

    monkeypatch.setattr(step_mod, "run", flaky_run)
    monkeypatch.setattr(sim_mod, "_single_threaded", lambda: True)
    monkeypatch.setattr(sim_mod, "_PARALLEL", True)
    monkeypatch.setattr(sim_mod, "_CHILD_MIN_WAIT", 1.0)
    monkeypatch.setattr(sim_mod, "_fork_broken", False)
    sim_mod.clear_cache()
    t = time.perf_counter()
    got = simulate(spec, st)
    assert _comparable(got) == _comparable(expected)
    assert time.perf_counter() - t < 30
    if failure == "hangs":
        assert sim_mod._fork_broken  # a stuck child: no more forking in this process


def test_no_fork_in_a_threaded_process(monkeypatch):
    """With another Python thread alive (the Slack bot's workers), both depths run in this process."""
    import threading

    import tools.memory.runner as sim_mod

    monkeypatch.setattr(sim_mod, "_PARALLEL", True)
    monkeypatch.setattr(sim_mod.os, "fork", lambda: pytest.fail("forked a threaded process"))
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=True)
    worker.start()
    try:
        sim_mod.clear_cache()
        mem = simulate(tiny_spec(num_hidden_layers=4), setup(method="full", optim="sgd"))
    finally:
        stop.set()
        worker.join()
    assert mem.layers_simulated == [1, 2]


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_packing_matches_a_real_padding_free_step(ckpt):
    """trl's packing: one row of b*s tokens with restarting position_ids; SDPA gets transformers' block mask."""
    spec = tiny_spec()
    st = setup(method="lora", optim="adamw_torch_fused", packing=True, gradient_checkpointing=ckpt,
               max_length=128, per_device_train_batch_size=4)
    sim = simulate(spec, st, extrapolate=False)
    real = real_step(spec, st)
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)
    unpacked = simulate(spec, st.model_copy(update={"packing": False}), extrapolate=False)
    tokens = st.per_device_train_batch_size * st.max_length
    assert sim.peak_bytes >= unpacked.peak_bytes + tokens * tokens  # at least the [1,1,T,T] bool mask
    # flash-attention runs the packed row as variable-length sequences: no mask
    flash = simulate(spec, st.model_copy(update={"attn_implementation": "flash_attention_2"}), extrapolate=False)
    assert flash.peak_bytes < sim.peak_bytes


def test_package_import_loads_no_torch():
    """`import tools.memory` (and the old `tools.simulator` name) must stay light: --fast and --help never load torch."""
    import json
    import subprocess
    import sys

    code = ("import sys, json, tools.memory, tools.simulator, tools._fake_bnb\n"
            "from tools.memory import SimulationError\n"
            "print(json.dumps([m for m in ('torch', 'transformers', 'peft') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_old_module_names_forward_to_the_package(monkeypatch):
    """tools.simulator / tools._fake_bnb read and write the live state of tools.memory's modules."""
    import tools._fake_bnb as old_bnb
    import tools.memory.quant as quant
    import tools.memory.runner as runner
    import tools.memory.step as step
    import tools.memory.tracker as tracker
    import tools.simulator as old

    assert old.simulate is runner.simulate and old.SimulationError is runner.SimulationError
    assert old._run is step.run and old._make_tracker is tracker.make_tracker and old._OP_CACHE is tracker._OP_CACHE
    assert old_bnb.Fake4bitLinear is quant.Fake4bitLinear
    monkeypatch.setattr(old, "_PARALLEL", False)
    monkeypatch.setattr(old, "_FAST_PATH", False)
    assert runner._PARALLEL is False and tracker._FAST_PATH is False
    monkeypatch.undo()
    assert tracker._FAST_PATH is True
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


TINY_MIXTRAL = dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=256)


def test_fp16_moe_runs_transformers_grouped_mm_as_cuda_does():
    """fp16 Mixtral experts: transformers 5's grouped_mm path, which CUDA runs for fp16 (ATen's per-group
    fallback into the same output) and torch's bf16-only meta kernel refused: simulated, and equal to a
    real CPU step (whose CPU kernel takes fp16) counted by the same storage counter."""
    spec = tiny_spec(TINY_MIXTRAL)
    st = setup(method="lora", dtype="fp16", bf16=False, optim="adamw_torch", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               lora_dropout=0.0, loss_impl="hf", gradient_checkpointing=True)
    sim = simulate(spec, st, extrapolate=False)
    _check_shape(sim)
    real = real_step(spec, st)
    assert sim.weights_bytes + sim.adapter_bytes == real["param_and_buffer_bytes"]
    assert sim.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)
    # outside the dry run torch's own meta kernel is back (the patch is scoped)
    import torch

    a = torch.empty(8, 64, dtype=torch.float16, device="meta")
    b = torch.empty(4, 64, 32, dtype=torch.float16, device="meta")
    with pytest.raises(RuntimeError, match="BF16"):
        torch._grouped_mm(a, b, offs=torch.tensor([2, 4, 6, 8], dtype=torch.int32, device="meta"))


class _RotaryEmbedding2024:
    """transformers 4.40.2's MistralRotaryEmbedding.__init__ (modeling_mistral.py; Llama's and Mixtral's build the
    same tables): the cos/sin of every position up to max_position_embeddings, as buffers in torch's default dtype,
    which from_pretrained sets to the load dtype. Today's transformers has no such table."""

    @staticmethod
    def attach(attn, dim: int, max_pos: int, dtype, base: float = 10000.0):
        import torch

        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        t = torch.arange(max_pos, dtype=torch.int64).type_as(inv_freq)
        emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
        attn.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        attn.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)


def test_legacy_rope_caches_match_a_real_step_holding_transformers_4_40_tables():
    """legacy_rope_cache: the per-layer rotary tables of early-2024 transformers (every attention layer's
    RotaryEmbedding with [max_position_embeddings, head_dim] cos/sin buffers) are resident bytes of the step,
    byte for byte what a real CPU step holding those tables has, and the peak follows them; the default
    (today's transformers) has none."""
    import torch

    cfg = dict(TINY_MISTRAL_2024)
    spec = tiny_spec(cfg)
    kw = dict(method="lora", dtype="bf16", bf16=False, optim="adamw_torch", loss_impl="hf", lora_dropout=0.0,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], gradient_checkpointing=True)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]

    def tables_2024(model):
        for layer in model.model.layers:
            _RotaryEmbedding2024.attach(layer.self_attn, head_dim, cfg["max_position_embeddings"], torch.bfloat16)

    real = real_step(spec, setup(**kw), prepare=tables_2024)
    today = simulate(spec, setup(**kw), extrapolate=False)
    old = simulate(spec, setup(legacy_rope_cache="bf16", **kw), extrapolate=False)
    tables = cfg["num_hidden_layers"] * 2 * cfg["max_position_embeddings"] * head_dim * 2
    assert old.weights_bytes - today.weights_bytes == tables
    assert old.weights_bytes + old.adapter_bytes == real["param_and_buffer_bytes"]
    assert old.peak_bytes == pytest.approx(real["peak_bytes"], rel=0.01)
    assert old.peak_bytes - today.peak_bytes == tables  # resident from the first to the last op
    # extrapolated over depth like any per-block buffer
    deep = tiny_spec(cfg, num_hidden_layers=6)
    ext = simulate(deep, setup(legacy_rope_cache="bf16", **kw))
    full = simulate(deep, setup(legacy_rope_cache="bf16", **kw), extrapolate=False)
    assert ext.weights_bytes == full.weights_bytes and ext.peak_bytes == full.peak_bytes


def test_legacy_rope_caches_are_whole_on_every_rank_and_in_the_analytic_tier():
    """FSDP shards parameters, never buffers: under full_shard each rank keeps the whole tables (the simulated
    FSDP2 step and the analytic tier's sharding agree), and the analytic tier counts the same bytes."""
    from tools.estimator import estimate

    # a long position table (128 MiB of tables) so that the GiB figures of the breakdown resolve it
    cfg = dict(TINY_MISTRAL_2024, max_position_embeddings=1 << 20)
    spec = tiny_spec(cfg)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    tables = cfg["num_hidden_layers"] * 2 * cfg["max_position_embeddings"] * head_dim * 2
    kw = dict(method="lora", dtype="fp16", bf16=False, optim="adamw_torch", loss_impl="hf", lora_dropout=0.0,
              num_gpus=2, fsdp="full_shard", fsdp_version=1)
    today = simulate(spec, setup(**kw), extrapolate=False)
    old = simulate(spec, setup(legacy_rope_cache="fp16", **kw), extrapolate=False)
    assert old.world_size == 2 and old.weights_bytes - today.weights_bytes == tables
    gib = 2 ** 30
    for fast in (False, True):
        a = estimate(spec, setup(**kw), fast=fast, advice=False).breakdown["weights"]
        b = estimate(spec, setup(legacy_rope_cache="fp16", **kw), fast=fast, advice=False).breakdown["weights"]
        assert (b - a) * gib == pytest.approx(tables, rel=0.02), fast


TINY_MISTRAL_2024 = dict(model_type="mistral", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
                         tie_word_embeddings=False)
