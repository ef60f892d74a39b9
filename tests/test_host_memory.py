"""Host RAM per node (tools/memory/host.py): the loading path measured on real processes loading a real
safetensors checkpoint, the formula's parts checked against real tensors, and the estimate's verdicts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools.memory.host import (
    ARROW_OFFSET_BYTES,
    ARROW_TOKEN_BYTES,
    host_memory,
    offload_from_step,
)
from tools.schemas import BYTES_PER_GIB, TrainingSetup

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2

# One process: import the training stack, then load the same bf16 checkpoint twice, in its own dtype and
# in fp32, sampling RssAnon (anonymous memory) and checking where the parameters' bytes live.
_LOADER = r'''
import gc, json, os, sys, threading, time

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024

import torch, transformers, peft, trl, datasets, accelerate  # the stack train.py imports
if os.environ.get("WORLD_SIZE"):
    import torch.distributed as dist
    dist.init_process_group("gloo")
from transformers import AutoModelForCausalLM

def load(path, dtype):
    gc.collect()
    before, peak, stop = anon(), [0], []
    def sample():
        while not stop:
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    stop.append(1)
    t.join()
    spans = []
    for line in open("/proc/self/maps"):
        if "model.safetensors" in line:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    inside = sum(p.numel() * p.element_size() for p in m.parameters() if any(lo <= p.data_ptr() < hi for lo, hi in spans))
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    out = {"before": before, "peak": max(peak[0], anon()), "params": total, "in_map": inside}
    del m
    gc.collect()
    return out

stack = anon()
warm = load(sys.argv[1], torch.bfloat16)  # first load also imports the model's code
same = load(sys.argv[1], torch.bfloat16)
fp32 = load(sys.argv[1], torch.float32)
print(json.dumps({"rank": os.environ.get("RANK", "0"), "stack": stack, "warm": warm, "same": same, "fp32": fp32}))
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real ~100 MB bf16 Llama checkpoint written by save_pretrained (safetensors)."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("ckpt")
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def _run_loader(path: Path, world_size: int = 1) -> list[dict]:
    script = path / "loader.py"
    script.write_text(_LOADER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    procs = []
    if world_size > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # what `accelerate launch` exports for an FSDP config with fsdp_cpu_ram_efficient_loading: true
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                   ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    for rank in range(world_size):
        e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank)) if world_size > 1 else env
        procs.append(subprocess.Popen([sys.executable, str(script), str(path)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _spec_and_step(dtype_file: str = "bfloat16", **setup_kw):
    from tools.analytic import analytic_step_memory
    from tools.models import spec_from_config

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=512, intermediate_size=1408,
               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
               tie_word_embeddings=False, torch_dtype=dtype_file)
    spec = spec_from_config(cfg, "tiny-llama", "test")
    setup = TrainingSetup(model_id="tiny-llama", max_length=64, **setup_kw)
    return spec, setup, analytic_step_memory(spec, setup)


@pytest.mark.slow  # a fresh process imports the whole training stack (~10 s here) and loads three times
def test_loading_a_safetensors_checkpoint_measured(checkpoint):
    """Same dtype: the parameters are views of the file's mapping (no anonymous copy); another dtype: one
    anonymous copy of the model, exactly what `checkpoint_copies` counts; the stack's runtime is what
    calibration's host_runtime_gib says."""
    (r,) = _run_loader(checkpoint)
    same, fp32 = r["same"], r["fp32"]
    assert same["in_map"] == same["params"] > 64 * MIB  # every parameter byte lives in the mmap
    assert same["peak"] - same["before"] < 0.1 * same["params"]
    assert fp32["in_map"] == 0
    spec, setup, step = _spec_and_step(method="full", dtype="fp32", bf16=False)
    hm = host_memory(spec, setup, step)
    copies = hm.breakdown["checkpoint_copies"]
    assert copies == fp32["params"]  # the formula's copy is the real tensors' bytes
    grown = fp32["peak"] - fp32["before"]
    assert copies <= grown <= copies + 48 * MIB  # + the in-flight conversions of a few tensors
    # the runtime baseline (CPU build here; CUDA adds host_cuda_runtime_gib on a GPU box)
    from tools.estimator import calibration

    runtime = calibration()["constants"]["host_runtime_gib"]["value"] * BYTES_PER_GIB
    measured = r["warm"]["peak"]  # the stack + the model code the first load imports (its weights are mmap views)
    assert 0.6 * runtime <= measured <= 1.3 * runtime
    assert r["stack"] < measured


@pytest.mark.slow  # two gloo processes, each importing the training stack
def test_fsdp_cpu_ram_efficient_loading_still_loads_on_every_rank(checkpoint):
    """transformers 5 under accelerate's FSDP environment: local rank 1 maps and converts the checkpoint
    exactly like rank 0, so host_memory counts one copy per local rank with the flag too."""
    ranks = _run_loader(checkpoint, world_size=2)
    r0, r1 = sorted(ranks, key=lambda r: r["rank"])
    for r in (r0, r1):
        assert r["same"]["in_map"] == r["same"]["params"]
        assert r["fp32"]["peak"] - r["fp32"]["before"] >= r["fp32"]["params"]
    assert abs((r1["fp32"]["peak"] - r1["fp32"]["before"]) - (r0["fp32"]["peak"] - r0["fp32"]["before"])) < 48 * MIB
    spec, setup, step = _spec_and_step(method="lora", dtype="fp32", bf16=False, num_gpus=2, fsdp="full_shard")
    one = host_memory(spec, setup.model_copy(update={"num_gpus": 1, "fsdp": "none"}), step)
    assert host_memory(spec, setup, step).breakdown["checkpoint_copies"] == 2 * one.breakdown["checkpoint_copies"]


def test_offload_parts_are_the_real_tensors_sizes():
    """ZeRO-Offload / FSDP CPU offload parts against a real fp32 AdamW step on the real peft model."""
    import peft
    import torch
    import transformers

    from tools.models import hf_config

    spec, setup, step = _spec_and_step(method="lora", r=8, num_gpus=2, zero_stage=2, offload="optimizer")
    torch.manual_seed(0)
    net = transformers.AutoModelForCausalLM.from_config(hf_config(spec))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert step.trainable_parameters == sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    pm(input_ids=torch.randint(0, 32000, (1, 8)), labels=torch.randint(0, 32000, (1, 8))).loss.backward()
    opt.step()
    moments = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if v.dim())
    grads = sum(p.grad.numel() * 4 for p in trainable)
    master = sum(p.numel() * 4 for p in trainable)
    zero = offload_from_step(step, setup)
    assert zero["optimizer_states"] * 2 == moments  # fp32 exp_avg + exp_avg_sq, partitioned over 2 ranks
    assert zero["gradients"] * 2 == grads and zero["master_weights"] * 2 == master
    fsdp = offload_from_step(step, setup.model_copy(update={"zero_stage": 0, "fsdp": "full_shard", "offload": "all"}))
    assert fsdp["offloaded_params"] * 2 == step.weights_bytes  # frozen base shards stay in the load dtype
    assert fsdp["master_weights"] * 2 == master and fsdp["gradients"] * 2 == grads


def test_tokenized_dataset_arrow_bytes_per_token():
    """The Arrow cache of a tokenized dataset: int64 token ids plus one offset per row."""
    import datasets

    rows = [list(range(100 + i)) for i in range(50)]
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    tokens = sum(len(r) for r in rows)
    assert ds.data.nbytes == pytest.approx(tokens * ARROW_TOKEN_BYTES + (len(rows) + 1) * ARROW_OFFSET_BYTES, abs=64)


def test_qlora_8b_on_a_free_colab_and_fsdp_full_fine_tuning():
    from tools.estimator import estimate
    from tools.models import lookup_model

    m = lookup_model("meta-llama/Llama-3.1-8B", hub=False)
    q = TrainingSetup(model_id=m.model_id, method="qlora", load_in_4bit=True)
    est = estimate(m, q, fast=True, host_ram_gib=12.0)
    assert est.host_fits is True and est.host_phase == "loading"
    assert sum(est.host_breakdown.values()) == pytest.approx(est.host_ram_gib, abs=0.01)
    assert "checkpoint_copies" not in est.host_breakdown  # quantised on the GPU, one tensor at a time
    assert est.host_page_cache_gib == pytest.approx(m.num_parameters * 2 / BYTES_PER_GIB, rel=0.01)
    full = TrainingSetup(model_id=m.model_id, method="full", num_gpus=8, fsdp="full_shard")
    f = estimate(m, full, fast=True, host_ram_gib=200.0)
    assert f.host_breakdown["fsdp_fp32_upcast"] == pytest.approx(8 * 4 * f.trainable_parameters / BYTES_PER_GIB, rel=1e-3)
    assert f.host_fits is False and any("will be killed" in p for p in f.provenance)
    off = estimate(m, full.model_copy(update={"fsdp": "none", "zero_stage": 3, "offload": "all"}), fast=True)
    assert off.host_phase == "training" and off.host_fits is None
    for part in ("master_weights", "optimizer_states", "gradients", "offloaded_params", "pinned_buffers"):
        assert off.host_breakdown[part] > 0


def test_cli_host_ram_flag_and_json_keys():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "agent.cli", "estimate", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--fast"]
    r = subprocess.run(base + ["--host-ram", "12", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("host_ram_gib", "host_breakdown", "host_phase", "host_page_cache_gib", "host_fits", "host_ram_available_gib"):
        assert key in d
    assert d["host_fits"] is True and d["host_ram_available_gib"] == 12
    bad = subprocess.run(base + ["--host-ram", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "--host-ram" in bad.stderr and "Traceback" not in bad.stderr
    # --local reads this machine's RAM (no GPU here: the host check alone)
    from tools.gpus import host_ram_gib

    loc = subprocess.run(base + ["--local", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert loc.returncode == 0, loc.stderr
    assert json.loads(loc.stdout)["host_ram_available_gib"] == pytest.approx(host_ram_gib(), abs=0.01)


def test_offload_parts_from_the_simulated_sharded_step():
    """The distributed dry run's ledger reports per-rank host bytes by kind; host_memory takes them as parts."""
    from types import SimpleNamespace

    from tools.memory.host import offload_from_sharded_step

    step = SimpleNamespace(world_size=4, offloaded_bytes={"parameters": 10, "gradients": 20, "optimizer_state": 30,
                                                          "optimizer_step": 5, "other": 1})
    assert offload_from_sharded_step(step) == {"offloaded_params": 11, "gradients": 20, "optimizer_states": 30,
                                               "optimizer_step_temporaries": 5}
    assert offload_from_sharded_step(SimpleNamespace(world_size=1, offloaded_bytes={"gradients": 1})) is None
    spec, setup, one = _spec_and_step(method="lora", num_gpus=4, fsdp="full_shard", offload="all")
    hm = host_memory(spec, setup, one, offload=offload_from_sharded_step(step))
    assert hm.breakdown["gradients"] == 4 * 20 and hm.breakdown["optimizer_states"] == 4 * 30  # x local ranks
