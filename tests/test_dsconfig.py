"""`estimate --ds-config`: a run's own DeepSpeed JSON read into the setup (tools/dsconfig.py)."""

from __future__ import annotations

import json

import pytest

from tests.test_sharding_flags import LLAMA8, _cli, _estimate  # the same CLI runner and `estimate --fast --json`
from tools.schemas import TrainingSetup
# the shape of Qwen's finetune/ds_config_zero2.json: explicit 2e8 buckets, "auto" elsewhere
ZERO2 = {
    "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto",
}


def _write(tmp_path, cfg, name="ds_config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return p


def test_a_zero2_config_sets_stage_and_buckets(tmp_path):
    est = _estimate("--num-gpus", "4", "--ds-config", str(_write(tmp_path, ZERO2)))
    assert "zero2" in est["setup_summary"]
    read = next(p for p in est["provenance"] if p.startswith("--ds-config"))
    assert "zero_stage=2" in read and "zero_reduce_bucket_size=200000000" in read
    # ZeRO-1/2 with overlap_comm: 4.5 x reduce_bucket_size elements in bf16 (DeepSpeed's docs)
    assert est["breakdown"]["zero_buffers"] == pytest.approx(4.5 * 2e8 * 2 / 2**30, rel=0.01)
    auto = _estimate("--num-gpus", "4", "--zero", "2")
    assert auto["breakdown"]["zero_buffers"] < est["breakdown"]["zero_buffers"]


def test_zero3_offload_micro_batch_and_flags_over_the_file(tmp_path):
    cfg = {"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8,
           "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"},
                                 "sub_group_size": 5e8, "stage3_prefetch_bucket_size": 5e7}}
    path = str(_write(tmp_path, cfg))
    est = _estimate("--num-gpus", "2", "--ds-config", path)
    assert "zero3+offload all" in est["setup_summary"]
    read = next(p for p in est["provenance"] if p.startswith("--ds-config"))
    for part in ("offload=all", "per_device_train_batch_size=4", "gradient_accumulation_steps=8",
                 "zero_sub_group_size=500000000", "zero_prefetch_bucket_size=50000000"):
        assert part in read, read
    flag = _estimate("--num-gpus", "2", "--ds-config", path, "--per-device-train-batch-size", "1")
    assert flag["peak_allocated_gib"] < est["peak_allocated_gib"]  # the flag's micro-batch of 1, not the file's 4


def test_the_generated_ds_config_reads_back_to_its_setup(tmp_path):
    from tools.dsconfig import setup_fields
    from tools.script import render_script

    st = TrainingSetup(model_id=LLAMA8, method="full", num_gpus=8, zero_stage=3, offload="optimizer",
                       zero_reduce_bucket_size=300_000_000, zero_sub_group_size=400_000_000)
    path = _write(tmp_path, render_script(st).files["ds_config.json"])
    fields, _ = setup_fields(path)
    for key in ("zero_stage", "offload", "zero_reduce_bucket_size", "zero_sub_group_size"):
        assert fields[key] == getattr(st, key), key
    assert "zero_prefetch_bucket_size" not in fields  # written "auto": the setup's rule stays


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage = 5"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "NVMe offload"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs stage 3"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}, "reduce_bucket_size = 'big'"),
])
def test_bad_ds_configs_are_one_clear_line(tmp_path, content, words):
    path = tmp_path / "missing.json" if content is None else _write(tmp_path, content)
    r = _cli("estimate", LLAMA8, "--fast", "--num-gpus", "2", "--ds-config", str(path))
    assert r.exit_code == 2, r.output
    assert words in r.output and "--ds-config" in r.output and "Traceback" not in r.output
