"""The trial executor: a real QLoRA trial of a tiny Llama on CPU through run_trial, an OOM forced with an
address-space limit through the `tunepilot trial` CLI, timeout and Ctrl-C killing the child's process
group, the calibration record, and the batch search. A CUDA trial runs only with a GPU (marker `gpu`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _script_helpers import run_env, shared_assets
from tools.schemas import TrainingSetup
from tools.trial import (
    CPU_NOT_COMPARABLE, TrialError, _classify_log, calibration_path, oom_advice, rebatch, run_trial, search_batch,
)

ROOT = Path(__file__).resolve().parents[1]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEPILOT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    return tmp_path / "home"


# ---- real runs ---------------------------------------------------------------------------


def test_qlora_trial_on_cpu_reports_and_records(tmp_path, assets, home):
    """QLoRA (bitsandbytes nf4 + paged_adamw_8bit) trains on CPU here, so the executor's real run uses it."""
    model_dir, text, _ = assets
    setup = TrainingSetup(model_id="tiny-llama", method="qlora", load_in_4bit=True, optim="paged_adamw_8bit", r=8,
                          lora_alpha=16, max_length=32, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    report = run_trial(setup, steps=2, timeout=300, workdir=tmp_path / "w", model_path=str(model_dir), dataset=str(text))
    assert report.ok, (report.error_kind, report.error_message, Path(report.log_path).read_text()[-2000:])
    assert report.device == "cpu" and report.return_code == 0 and report.error_kind is None
    assert len(report.loss_per_step) == 2 and all(math.isfinite(x) for x in report.loss_per_step)
    assert report.tokens_per_second > 0 and report.cpu_peak_rss_gib > 0.05
    assert report.comparison["note"] == CPU_NOT_COMPARABLE and CPU_NOT_COMPARABLE in report.verdict
    assert (tmp_path / "w" / "train.py").is_file() and (tmp_path / "w" / "trial.log").is_file()
    assert report.estimated is None and any("no GPU estimate" in n for n in report.notes)
    # one calibration line for this trial, in $TUNEPILOT_HOME
    assert calibration_path() == home / "calibration.jsonl"
    rows = [json.loads(line) for line in calibration_path().read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["method"] == "qlora" and row["ok"] is True and row["device"] == "cpu"
    assert row["setup"]["per_device_train_batch_size"] == 2 and row["setup_short"] == setup.short()
    assert row["tokens_per_second"] == report.tokens_per_second
    assert {"measured_allocated_gib", "estimated_allocated_gib", "predicted_tokens_per_second", "timestamp"} <= set(row)


def test_oom_trial_cli_exits_1_with_advice_and_no_traceback(tmp_path, assets):
    """Eager attention at 4096 tokens x 8 needs GiBs per layer: under a 3 GiB address-space limit it must OOM."""
    model_dir, _, _ = assets
    setup = TrainingSetup(model_id="tiny-llama", method="lora", max_length=4096, per_device_train_batch_size=8,
                          attn_implementation="eager", gradient_checkpointing=False)
    setup_path = setup.save(tmp_path / "setup.yaml")
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "trial", str(setup_path), "--model", str(model_dir), "--steps", "1",
         "--memory-limit-gib", "3", "--workdir", str(tmp_path / "w"), "--json"],
        cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 1, (res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is False and report["error_kind"] == "oom", report
    assert "out of memory" in report["verdict"] and "3 GiB" in report["verdict"]
    advice = " ".join(report["advice"])
    assert "gradient_checkpointing" in advice and "gradient_accumulation_steps: 8" in advice and "sdpa" in advice


def _trial_child_pid(workdir: Path) -> int | None:
    """Pid of a live process running this workdir's train.py (none should survive a kill)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if b"train.py" in cmd and cwd == str(workdir):
            status = (proc / "status").read_text()
            if "State:\tZ" not in status:
                return int(proc.name)
    return None


def test_timeout_kills_the_process_group(tmp_path, assets, home):
    model_dir, _, _ = assets
    setup = TrainingSetup(model_id="tiny-llama", max_length=32)
    report = run_trial(setup, steps=1, timeout=2, workdir=tmp_path / "w", model_path=str(model_dir), estimate=False)
    assert not report.ok and report.error_kind == "timeout"
    assert report.return_code is not None and report.return_code < 0  # ended by our signal
    assert "timeout" in report.advice[0]
    assert _trial_child_pid(tmp_path / "w") is None
    assert json.loads(calibration_path().read_text())["error_kind"] == "timeout"


def test_ctrl_c_during_a_trial_returns_interrupted(tmp_path, assets, home):
    from tools.script import render_script

    render_script(TrainingSetup(model_id="warm-up"))  # imports done before the timer starts
    import time

    model_dir, _, _ = assets
    workdir = tmp_path / "w"
    stop = threading.Event()
    sent = []

    def ctrl_c_once_the_child_runs():
        # not a fixed delay: on a loaded machine the child may start late, on an idle one finish early;
        # the signal goes when the trial's own process is alive (it is still importing torch then)
        while not stop.is_set():
            if _trial_child_pid(workdir) is not None:
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=ctrl_c_once_the_child_runs, daemon=True)
    watcher.start()
    try:
        report = run_trial(TrainingSetup(model_id="tiny-llama", max_length=32), steps=20, timeout=120,
                           workdir=workdir, model_path=str(model_dir))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped run_trial")
    finally:
        stop.set()
        watcher.join(5)
    assert sent, "the trial child never started"
    assert report.error_kind == "interrupted" and not report.ok
    assert _trial_child_pid(tmp_path / "w") is None
    assert not calibration_path().exists()  # an interrupted trial measured nothing


def test_sigterm_to_the_cli_stops_the_trial_cleanly(tmp_path, assets):
    """`timeout`/systemd send SIGTERM to tunepilot: the trial's process group must not outlive it."""
    import time

    model_dir, _, _ = assets
    setup_path = TrainingSetup(model_id="tiny-llama", max_length=32).save(tmp_path / "setup.yaml")
    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "trial", str(setup_path), "--model", str(model_dir), "--steps", "1",
         "--workdir", str(workdir), "--json"],
        cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while _trial_child_pid(workdir) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _trial_child_pid(workdir) is not None, "the trial child never started"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err
    assert json.loads(out)["error_kind"] == "interrupted"
    assert _trial_child_pid(workdir) is None


# ---- pure parts ---------------------------------------------------------------------------


def test_rebatch_keeps_the_effective_batch():
    setup = TrainingSetup(model_id="m", per_device_train_batch_size=4, gradient_accumulation_steps=4, num_gpus=2,
                          zero_stage=2)
    new, note = rebatch(setup, 8)
    assert new.per_device_train_batch_size == 8 and new.gradient_accumulation_steps == 2
    assert new.effective_batch_size == 32 and "not divisible" not in note
    new, note = rebatch(setup, 3)
    assert new.gradient_accumulation_steps == 5 and new.effective_batch_size == 30 and "not divisible" in note
    new, _ = rebatch(setup, 64)
    assert new.gradient_accumulation_steps == 1  # never below one micro-batch


@pytest.mark.parametrize(("limit", "seed", "expect", "tried"), [
    (5, 4, 4, [4, 8]),          # seed fits, one step up fails
    (5, 16, 4, [16, 8, 4]),     # seed too big: halve until it fits
    (64, 8, 64, [8, 16, 32, 64]),  # capped by max_batch
    (0, 2, None, [2, 1]),       # nothing fits
])
def test_search_batch_steps_by_powers_of_two(limit, seed, expect, tried):
    calls = []

    def attempt(b):
        calls.append(b)
        return b <= limit

    assert search_batch(seed, 64, attempt) == expect
    assert calls == tried


def test_search_batch_stops_on_a_non_memory_failure():
    calls = []
    assert search_batch(4, 64, lambda b: calls.append(b) or None) is None
    assert calls == [4]


def test_classify_log():
    assert _classify_log(1, "loading\nMemoryError\n")[0] == "oom"
    assert _classify_log(1, "OSError: libtorch_cpu.so: failed to map segment: Cannot allocate memory")[0] == "oom"
    assert _classify_log(-signal.SIGKILL, "step 1\n")[0] == "oom"
    kind, msg = _classify_log(1, "Traceback...\nValueError: bad thing\n")
    assert kind == "error" and msg == "ValueError: bad thing"


def test_oom_advice_fits_the_setup():
    lean = TrainingSetup(model_id="m", method="qlora", load_in_4bit=True, optim="paged_adamw_8bit", max_length=256)
    assert oom_advice(lean) == []  # nothing left to cut but the model
    fat = TrainingSetup(model_id="m", method="full", per_device_train_batch_size=4, max_length=4096,
                        gradient_checkpointing=False, num_gpus=2)
    text = " ".join(oom_advice(fat))
    assert "gradient_checkpointing" in text and "max_length: 2048" in text and "zero_stage: 3" in text


def test_bad_arguments_are_one_clear_error(tmp_path):
    setup = TrainingSetup(model_id="m")
    with pytest.raises(TrialError, match="steps"):
        run_trial(setup, steps=0)
    with pytest.raises(TrialError, match="model_path"):
        run_trial(setup, model_path=str(tmp_path / "missing"))
    with pytest.raises(TrialError, match="dataset"):
        run_trial(setup, dataset=str(tmp_path / "missing.jsonl"))


@pytest.mark.skipif(_cuda(), reason="checks the refusal on a machine without enough GPUs")
def test_multi_gpu_trial_needs_the_gpus():
    with pytest.raises(TrialError, match="num_gpus"):
        run_trial(TrainingSetup(model_id="m", num_gpus=2, zero_stage=3))


# ---- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_trial_on_cuda_measures_gpu_memory(tmp_path, assets, home):
    model_dir, text, _ = assets
    setup = TrainingSetup(model_id="tiny-llama", method="lora", max_length=256, per_device_train_batch_size=4)
    report = run_trial(setup, steps=3, workdir=tmp_path / "w", model_path=str(model_dir), dataset=str(text))
    assert report.ok, report.error_message
    assert report.device == "cuda" and report.gpu_name
    assert 0 < report.max_memory_allocated_gib <= report.max_memory_reserved_gib
    assert report.estimated is not None and report.estimated["peak_allocated_gib"] > 0, report.notes
    assert report.comparison["allocated_gib"]["measured"] == report.max_memory_allocated_gib
    row = json.loads(calibration_path().read_text().splitlines()[-1])
    assert row["gpu"] == report.gpu_name and row["measured_reserved_gib"] == report.max_memory_reserved_gib
