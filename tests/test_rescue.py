"""The OOM rescue: the smallest change that makes a setup fit (tools/rescue.py), and the tools that carry it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tools.estimator")

from tools.estimator import estimate  # noqa: E402
from tools.gpus import parse_hardware  # noqa: E402
from tools.models import lookup_model  # noqa: E402
from tools.rescue import smallest_fix  # noqa: E402
from tools.schemas import TrainingSetup  # noqa: E402


def _setup(**kw) -> TrainingSetup:
    base = {"model_id": "meta-llama/Llama-3.1-8B", "method": "lora", "r": 64, "per_device_train_batch_size": 4, "max_length": 4096}
    return TrainingSetup(**(base | kw))


def test_the_gentlest_change_that_fits_wins_and_keeps_the_effective_batch():
    spec, hw = lookup_model("meta-llama/Llama-3.1-8B"), parse_hardware("A10G")
    setup = _setup()
    assert not estimate(spec, setup, hw, fast=True).fits
    fix = smallest_fix(spec, setup, hw, fast=True)
    assert fix is not None and fix.estimate.fits and len(fix.changes) == 1
    # a smaller micro-batch with the same effective batch comes before changing the method, the rank or the data
    assert fix.changes[0].startswith("micro-batch 4 -> ")
    assert fix.setup.method == "lora" and fix.setup.r == 64 and fix.setup.max_length == 4096
    assert fix.setup.effective_batch_size == setup.effective_batch_size
    # it is the largest micro-batch that fits: the next larger one does not
    m = fix.setup.per_device_train_batch_size
    if m < 4:
        bigger = setup.model_copy(update={"per_device_train_batch_size": m * 2, "gradient_accumulation_steps": 4 // (m * 2)})
        assert not estimate(spec, TrainingSetup.model_validate(bigger.model_dump()), hw, fast=True).fits


def test_changes_combine_when_none_fits_alone():
    spec, hw = lookup_model("Qwen/Qwen2.5-14B"), parse_hardware("2x A100 80GB")
    setup = TrainingSetup(model_id="Qwen/Qwen2.5-14B", method="full", max_length=2048, num_gpus=2)
    fix = smallest_fix(spec, setup, hw, fast=True)
    assert fix is not None and fix.estimate.fits
    assert fix.setup.method == "full"  # a full fine-tune stays one: sharding and offload, not LoRA
    assert fix.setup.fsdp == "full_shard" and fix.setup.offload == "optimizer"


def test_nothing_that_fits_is_none():
    spec, hw = lookup_model("meta-llama/Llama-3.1-70B"), parse_hardware("T4")
    setup = TrainingSetup(model_id="meta-llama/Llama-3.1-70B", method="full", max_length=4096, per_device_train_batch_size=8)
    fix = smallest_fix(spec, setup, hw, fast=True)
    assert fix is None or (fix.estimate.fits and fix.changes)


def test_estimate_memory_says_the_smallest_fix_and_plan_compares_methods(tmp_path):
    from tools.agent_tools import ToolContext, estimate_memory_tool, plan_training_tool, tool_context

    text, _art = estimate_memory_tool(model="Llama-3.1-8B", hardware="A10G", seq_len=4096, fast=True,
                                      setup={"method": "lora", "r": 64, "per_device_train_batch_size": 4})
    out = json.loads(text)
    assert out["memory"]["fits"] is False and out["smallest_fix"]["fits"] is True
    assert out["smallest_fix"]["per_gpu_total_gib"] <= out["memory"]["gpu_memory_gib"]
    assert f"Smallest change that fits: {out['smallest_fix']['changes'][0]}" in out["summary"]
    fitting, _ = estimate_memory_tool(model="Llama-3.1-8B", hardware="A100 80GB", seq_len=1024, fast=True, setup={"method": "qlora"})
    assert "smallest_fix" not in json.loads(fitting)

    with tool_context(ToolContext(workdir=tmp_path, thread_id="t", allow_trial=False, messages=[])):
        text, art = plan_training_tool(model="mistral-7b", hardware="RTX 4090", seq_len=1024, exact=False, compare_methods=["lora", "qlora"])
    out = json.loads(text)
    assert [c["method"] for c in out["compared"]] == ["lora", "qlora"] and all("per_gpu_total_gib" in c for c in out["compared"])
    best = out["setup"]["method"]
    assert best in ("lora", "qlora") and out["summary"].endswith(f"recommended: {best}.")
    # the written script is the recommended plan's
    assert art["setup"]["method"] == best and f"method: {best}" in (tmp_path / "t" / "setup.yaml").read_text()
