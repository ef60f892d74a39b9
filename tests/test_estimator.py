"""The estimator: sharding and offload math on a known StepMemory, CUDA terms, fits/headroom,
advice, and `tunepilot estimate` end to end (aliases, JSON keys, errors with exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.estimator import calibration, estimate
from tools.schemas import BYTES_PER_GIB, GPUSpec, HardwareSpec, ModelSpec, StepMemory, TrainingSetup

ROOT = Path(__file__).resolve().parents[1]
GIB = BYTES_PER_GIB

SPEC = ModelSpec(
    model_id="meta-llama/Llama-2-7b-hf", architecture="LlamaForCausalLM", model_type="llama", num_hidden_layers=32,
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128, intermediate_size=11008,
    vocab_size=32000, tie_word_embeddings=False, num_parameters=6738415616, source="test",
)


def step(**kw) -> StepMemory:
    """A hand-made full fine-tuning step: 10 GiB weights, 10 grads, 20 optimizer, 4 activations (bytes exact)."""
    bd = dict(weights=10 * GIB, adapters=0, gradients=10 * GIB, optimizer_state=20 * GIB, activations=4 * GIB,
              logits_loss=0, temporaries=0)
    bd.update(kw)
    return StepMemory(
        tier="analytic", num_parameters=5 * GIB, trainable_parameters=5 * GIB, weights_bytes=10 * GIB, adapter_bytes=0,
        gradient_bytes=10 * GIB, optimizer_bytes=20 * GIB, peak_bytes=sum(bd.values()), peak_breakdown=bd,
        peak_phase="backward", largest_layer_param_bytes=GIB // 4,
    )


def full(**kw) -> TrainingSetup:
    return TrainingSetup(model_id=SPEC.model_id, method="full", **kw)


def gpu(mem: float, bf16: bool = True) -> GPUSpec:
    return GPUSpec(name=f"test {mem} GiB", memory_gib=mem, bf16=bf16, fp16_tflops=100, memory_bandwidth_gbs=1000)


# --------------------------------------------------------------------------------------
# sharding and offload
# --------------------------------------------------------------------------------------

def test_ddp_replicates_everything():
    e = estimate(SPEC, full(num_gpus=4), step=step(), advice=False, reshard_moments=False)
    assert e.breakdown["weights"] == pytest.approx(10)
    assert e.breakdown["gradients"] == pytest.approx(10)
    assert e.breakdown["optimizer_state"] == pytest.approx(20)
    assert any("DDP" in p for p in e.provenance)


def test_zero_stages_shard_what_they_should():
    n = 4
    master = calibration()["constants"]["mixed_precision_master_bytes"]["value"]
    # ZeRO under bf16: fp32 master (4 B) + fp32 Adam moments (8 B) per trainable parameter, sharded
    opt_full = (master + 8) * 5  # GiB
    z1 = estimate(SPEC, full(num_gpus=n, zero_stage=1), step=step(), advice=False, reshard_moments=False).breakdown
    z2 = estimate(SPEC, full(num_gpus=n, zero_stage=2), step=step(), advice=False, reshard_moments=False).breakdown
    z3 = estimate(SPEC, full(num_gpus=n, zero_stage=3), step=step(), advice=False, reshard_moments=False).breakdown
    assert z1["optimizer_state"] == pytest.approx(opt_full / n, rel=1e-3)
    assert z1["gradients"] == pytest.approx(10) and z1["weights"] == pytest.approx(10)
    assert z2["gradients"] == pytest.approx(10 / n, rel=1e-3) and z2["weights"] == pytest.approx(10)
    assert z3["weights"] == pytest.approx(10 / n, rel=1e-3)
    assert z3["zero_buffers"] == pytest.approx(2 * 0.25, rel=1e-3)  # two gathered blocks
    assert z3["activations"] == pytest.approx(4)  # activations are per micro-batch, never sharded
    fsdp = estimate(SPEC, full(num_gpus=n, fsdp="full_shard"), step=step(), advice=False, reshard_moments=False).breakdown
    assert fsdp["weights"] == pytest.approx(z3["weights"])
    sgo = estimate(SPEC, full(num_gpus=n, fsdp="shard_grad_op"), step=step(), advice=False, reshard_moments=False).breakdown
    assert sgo["gradients"] == pytest.approx(z2["gradients"]) and sgo["weights"] == pytest.approx(10)


def test_offload_moves_optimizer_bytes_to_host():
    on_gpu = estimate(SPEC, full(num_gpus=2, zero_stage=2), step=step(), advice=False, reshard_moments=False)
    off = estimate(SPEC, full(num_gpus=2, zero_stage=2, offload="optimizer"), step=step(), advice=False, reshard_moments=False)
    # without offload the host holds only the processes' runtime (the checkpoint is memory-mapped, same dtype)
    assert set(on_gpu.host_breakdown) <= {"runtime", "checkpoint_copies", "adapters"}
    assert off.breakdown.get("optimizer_state", 0) == 0
    moved = on_gpu.breakdown["optimizer_state"] * 2  # both GPUs' partitions live on the one host
    offloaded = sum(v for k, v in off.host_breakdown.items() if k in ("master_weights", "optimizer_states", "gradients"))
    assert offloaded >= moved
    assert off.host_ram_gib >= on_gpu.host_ram_gib + moved
    assert off.device_total_gib < on_gpu.device_total_gib - on_gpu.breakdown["optimizer_state"] * 0.9
    everything = estimate(SPEC, full(num_gpus=1, zero_stage=3, offload="all"), step=step(), advice=False, reshard_moments=False)
    assert everything.breakdown.get("weights", 0) == 0
    assert everything.host_ram_gib > off.host_ram_gib


# --------------------------------------------------------------------------------------
# CUDA terms, totals, fits
# --------------------------------------------------------------------------------------

def test_cuda_terms_are_named_and_ordered():
    e = estimate(SPEC, full(), step=step(), advice=False, reshard_moments=False)
    for k in ("cuda_context", "cublas_workspace", "allocator_overhead"):
        assert e.breakdown[k] > 0
    assert e.peak_allocated_gib == pytest.approx(44 + e.breakdown["cublas_workspace"], abs=0.01)
    assert e.peak_allocated_gib < e.peak_reserved_gib < e.device_total_gib
    assert e.device_total_gib == pytest.approx(e.peak_reserved_gib + e.breakdown["cuda_context"], abs=0.01)
    assert e.uncertainty.low_gib < e.device_total_gib < e.uncertainty.high_gib
    assert any("cuda_context_gib" in p and "source" in p for p in e.provenance)
    assert "nccl_buffers" not in e.breakdown
    assert estimate(SPEC, full(num_gpus=2), step=step(), advice=False, reshard_moments=False).breakdown["nccl_buffers"] > 0


def test_nccl_buffers_follow_the_link_and_the_ranks():
    from tools.gpus import parse_hardware

    def nccl(n, hw=None):
        e = estimate(SPEC, full(num_gpus=n), parse_hardware(hw) if hw else None, step=step(), advice=False, reshard_moments=False)
        return e.breakdown["nccl_buffers"], e.provenance

    mib = 2**20 / 2**30
    # NVIDIA/nccl #964 (PyTorch, A100 NVLink): 544 MB for a 2-GPU communicator, 688 MB for more GPUs
    assert nccl(2)[0] == pytest.approx(544 * mib, abs=0.002) and nccl(4)[0] == pytest.approx(688 * mib, abs=0.002)
    assert nccl(2, "2x H100")[0] == pytest.approx(544 * mib, abs=0.002)
    pcie, notes = nccl(2, "2x RTX 4090")  # no NVLink: two PCIe channels
    assert pcie == pytest.approx(0.25, abs=0.002) and any("PCIe" in p for p in notes)


def test_fits_and_headroom():
    e = estimate(SPEC, full(), HardwareSpec(gpu=gpu(80)), step=step(), advice=False, reshard_moments=False)
    assert e.fits is True
    assert e.headroom_gib == pytest.approx(80 - e.device_total_gib, abs=0.01)
    small = estimate(SPEC, full(), HardwareSpec(gpu=gpu(40)), step=step(), advice=False, reshard_moments=False)
    assert small.fits is False and small.headroom_gib < 0
    tight = estimate(SPEC, full(), HardwareSpec(gpu=gpu(e.device_total_gib + 1)), step=step(), advice=False, safety_margin=0.1, reshard_moments=False)
    assert tight.fits is False and tight.headroom_gib > 0


def test_hardware_gpu_count_disagreeing_with_setup_is_noted():
    e = estimate(SPEC, full(), HardwareSpec(gpu=gpu(80), num_gpus=8), step=step(), advice=False, reshard_moments=False)
    assert any("setup.num_gpus=1" in p for p in e.provenance)
    assert "nccl_buffers" not in e.breakdown  # the setup's single GPU is what is estimated


def test_advice_quantifies_checkpointing():
    st = TrainingSetup(model_id=SPEC.model_id, method="lora", gradient_checkpointing=False, max_length=4096,
                       per_device_train_batch_size=2)
    e = estimate(SPEC, st, fast=True)
    assert e.dominant == "activations"
    assert "gradient checkpointing cuts ~" in e.advice
    cut = float(e.advice.split("cuts ~")[1].split(" GiB")[0])
    ck = estimate(SPEC, st.model_copy(update={"gradient_checkpointing": True}), fast=True, advice=False)
    assert cut == pytest.approx(e.device_total_gib - ck.device_total_gib, abs=0.15)


def test_uncertainty_wider_for_analytic_and_qlora():
    lora = TrainingSetup(model_id=SPEC.model_id, method="lora")
    q = TrainingSetup(model_id=SPEC.model_id, method="qlora", load_in_4bit=True)
    assert estimate(SPEC, q, fast=True, advice=False).uncertainty.pct > estimate(SPEC, lora, fast=True, advice=False).uncertainty.pct


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "agent.cli", "estimate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_fast_json_keys_and_aliases():
    a = cli("meta-llama/Llama-2-7b-hf", "--method", "lora", "--batch-size", "2", "--seq-len", "1024", "--gpu", "RTX 4090", "--fast", "--json")
    assert a.returncode == 0, a.stderr
    d = json.loads(a.stdout)
    for k in ("num_parameters", "trainable_parameters", "peak_allocated_gib", "peak_reserved_gib", "device_total_gib",
              "host_ram_gib", "breakdown", "fits", "headroom_gib", "tier", "uncertainty"):
        assert k in d, k
    assert d["tier"] == "analytic"
    assert "b=2x1, seq 1024" in d["setup_summary"]
    b = cli("meta-llama/Llama-2-7b-hf", "--method", "lora", "--per-device-train-batch-size", "2", "--max-seq-length", "1024",
            "--gpu", "RTX 4090", "--fast", "--json")
    assert json.loads(b.stdout)["device_total_gib"] == d["device_total_gib"]


def test_cli_human_view_and_fp16_switch():
    r = cli("meta-llama/Llama-2-7b-hf", "--method", "qlora", "--gpu", "T4", "--fast")
    assert r.returncode == 0, r.stderr
    assert "activations" in r.stdout and "device total" in r.stdout and "headroom" in r.stdout
    assert "no bf16" in r.stderr and "fp16" in r.stderr


def test_cli_setup_file_is_the_base(tmp_path):
    f = tmp_path / "s.yaml"
    TrainingSetup(model_id="x", method="full", max_length=512, num_gpus=2, zero_stage=3).save(f)
    r = cli("meta-llama/Llama-2-7b-hf", "--setup", str(f), "--seq-len", "256", "--fast", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "Full FT" in d["setup_summary"] and "seq 256" in d["setup_summary"] and "zero3" in d["setup_summary"]


@pytest.mark.parametrize("args,field", [
    (["--optim", "adamx"], "optim"),
    (["--r", "0"], "--r"),
    (["--num-gpus", "0"], "--num-gpus"),
    (["--batch-size", "0"], "--per-device-train-batch-size"),
    (["--gpu", "quantum-9000"], "GPU"),
    (["--method", "qlora", "--setup", "QLORA_FP32"], "bnb_4bit_compute_dtype"),
    (["--zero", "3"], "zero_stage"),
])
def test_cli_bad_input_exit_2_naming_the_field(tmp_path, args, field):
    if "QLORA_FP32" in args:
        f = tmp_path / "q.yaml"
        f.write_text("model_id: x\nmethod: qlora\nload_in_4bit: true\nbnb_4bit_compute_dtype: fp32\n")
        args = ["--setup", str(f)]
    r = cli("meta-llama/Llama-2-7b-hf", *args, "--fast")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert field in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) <= 2


def test_cli_zero_on_one_gpu_with_offload_is_allowed():
    r = cli("meta-llama/Llama-2-7b-hf", "--method", "full", "--zero", "3", "--offload", "all", "--fast", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["host_ram_gib"] > 10


def test_default_tier_is_the_simulator():
    pytest.importorskip("tools.memory")
    from tools.models import spec_from_config

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               tie_word_embeddings=False, max_position_embeddings=512)
    tiny = spec_from_config(cfg, "tiny-llama", "test")
    st = TrainingSetup(model_id="tiny-llama", method="lora", max_length=64)
    e = estimate(tiny, st, advice=False)
    assert e.tier == "simulated"
    assert e.uncertainty.pct == calibration()["tier_uncertainty_pct"]["simulated"]
    fast = estimate(tiny, st, fast=True, advice=False)
    assert fast.tier == "analytic"
    assert fast.trainable_parameters == e.trainable_parameters
    raw = lambda x: x.peak_allocated_gib - x.breakdown["cublas_workspace"]  # noqa: E731
    assert raw(fast) == pytest.approx(raw(e), rel=0.15)


def test_unsupported_by_simulator_falls_back_to_analytic_with_a_note():
    pytest.importorskip("tools.memory")
    # no config.json: the simulator cannot build the real model, the closed form still can
    st = TrainingSetup(model_id=SPEC.model_id, method="lora", max_length=256)
    e = estimate(SPEC, st, advice=False)
    assert e.tier == "analytic"
    assert any("simulator does not support" in p for p in e.provenance)


def test_sharding_can_move_the_peak_to_another_moment():
    # full fine-tuning peaks at the optimizer step on one GPU; with ZeRO-3 + optimizer offload over
    # 8 GPUs that moment shrinks 8x and the activation-heavy backward moment becomes the peak
    st = TrainingSetup(model_id=SPEC.model_id, method="full", gradient_checkpointing=False, max_length=2048,
                       per_device_train_batch_size=4, num_gpus=8, zero_stage=3, offload="optimizer")
    e = estimate(SPEC, st, fast=True, advice=False)
    assert e.breakdown["activations"] > 10
    assert any("moment" in p for p in e.provenance)


def test_no_dropout_correction_on_top_of_a_step():
    """Both tiers count CUDA's 1-byte dropout masks already: the estimator must not correct LoRA activations again."""
    lora = TrainingSetup(model_id=SPEC.model_id, method="lora", lora_dropout=0.1, gradient_checkpointing=False)
    st = step(gradients=GIB // 8, optimizer_state=GIB // 4)
    e = estimate(SPEC, lora, step=st, advice=False)
    assert e.breakdown["activations"] == pytest.approx(4.0, abs=1e-3)
    assert not any("dropout" in p.lower() for p in e.provenance)


# --------------------------------------------------------------------------------------
# loss paths and memory levers (issue 12)
# --------------------------------------------------------------------------------------


def test_cli_loss_impl_offloading_and_packing_flags():
    """--loss-impl / --activation-offloading / --packing reach the setup; the human view names the loss path."""
    import json

    hf = json.loads(cli("meta-llama/Llama-3.1-8B", "--method", "qlora", "--loss-impl", "hf", "--fast", "--json").stdout)
    fused = json.loads(cli("meta-llama/Llama-3.1-8B", "--method", "qlora", "--fast", "--json").stdout)
    assert hf["loss_impl"] == "hf" and fused["loss_impl"] == "trl_fused"
    # 128k vocabulary: HF's full fp32 logits are gigabytes; trl's fused head is a fraction of that
    assert hf["breakdown"]["logits_loss"] > 2.5 and fused["breakdown"].get("logits_loss", 0.0) < 0.5
    assert fused["device_total_gib"] < hf["device_total_gib"] - 2.0
    off = json.loads(cli("meta-llama/Llama-3.1-8B", "--method", "qlora", "--no-gradient-checkpointing", "--activation-offloading",
                         "--packing", "--fast", "--json").stdout)
    on_gpu = json.loads(cli("meta-llama/Llama-3.1-8B", "--method", "qlora", "--no-gradient-checkpointing", "--packing",
                            "--fast", "--json").stdout)
    assert off["host_ram_gib"] > 1.0 and off["device_total_gib"] < on_gpu["device_total_gib"] - 1.0
    assert "act-offload" in off["setup_summary"]
    human = cli("meta-llama/Llama-3.1-8B", "--method", "qlora", "--loss-impl", "liger", "--fast")
    assert human.returncode == 0 and "loss path: liger" in human.stdout
    bad = cli("meta-llama/Llama-3.1-8B", "--loss-impl", "chunked", "--fast")
    assert bad.returncode == 2 and "--loss-impl" in bad.stderr and "Traceback" not in bad.stderr
