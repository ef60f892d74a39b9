"""The trial executor: run the generated script's trial mode in a subprocess and compare what it measured to the estimate.

`run_trial` writes train.py for the setup into a work directory, starts
`python train.py --trial-steps N --trial-report trial_report.json` in its own process
group with a timeout (and an optional address-space limit), reads the JSON report,
compares measured memory and speed to `tools.estimator.estimate` /
`tools.throughput.estimate_throughput`, gives advice when it failed, and appends one
line to the calibration record `$TUNEPILOT_HOME/calibration.jsonl`.
An OOM, a crash, a timeout or Ctrl-C in the child never takes tunepilot down: it
becomes a report with `ok=False` and an `error_kind`.

`find_max_batch` searches the largest micro-batch that fits, seeded by the estimate.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from tools import progress
from tools.schemas import BYTES_PER_GIB, TrainingSetup, TunepilotError  # noqa: F401 - BYTES_PER_GIB for readers

ErrorKind = Literal["oom", "cuda_error", "timeout", "data_error", "error", "interrupted"]
CPU_NOT_COMPARABLE = "cpu run: memory not comparable to a GPU estimate"


class TrialError(TunepilotError):
    """The trial cannot be started as asked (bad arguments, not enough GPUs)."""


class TrialReport(BaseModel):
    """What a trial run measured, how it compares to the estimate, and what to do next."""

    ok: bool = Field(description="True when every trial step (and the evaluation step, if any) ran.")
    setup_summary: str = Field(default="", description="One-line description of the setup trial-run.")
    model: str = Field(default="", description="Model weights actually loaded (the setup's model_id or the --model override).")
    steps: int = Field(default=0, description="Optimizer steps asked for.")
    device: Optional[str] = Field(default=None, description="'cuda' or 'cpu' (a CPU run uses process RSS, not GPU memory).")
    gpu_name: Optional[str] = Field(default=None, description="GPU the trial ran on.")
    world_size: int = Field(default=1, description="Processes (GPUs) in the trial.")
    max_memory_allocated_gib: Optional[float] = Field(default=None, description="torch.cuda.max_memory_allocated, GiB (GPU runs).")
    max_memory_reserved_gib: Optional[float] = Field(default=None, description="torch.cuda.max_memory_reserved, GiB (GPU runs).")
    device_total_gib: Optional[float] = Field(default=None, description="Device memory used by the process as NVML / nvidia-smi shows it, GiB.")
    cpu_peak_rss_gib: Optional[float] = Field(default=None, description="Peak resident memory of the training process, GiB.")
    tokens_per_second: Optional[float] = Field(default=None, description="Measured training tokens/s across all GPUs (first step excluded).")
    loss_per_step: list[float] = Field(default_factory=list, description="Training loss of each trial step.")
    loss_impl: Optional[str] = Field(default=None, description="The loss path the trial's script ran (its LOSS_IMPL: trl_fused, hf, liger or cce).")
    eval_loss: Optional[float] = Field(default=None, description="Loss of the evaluation step, when the setup evaluates.")
    wall_seconds: Optional[float] = Field(default=None, description="Seconds from start to report, model loading included.")
    error_kind: Optional[ErrorKind] = Field(default=None, description="oom, cuda_error, timeout, data_error, error or interrupted.")
    error_message: Optional[str] = Field(default=None, description="The error's message (one line where possible).")
    estimated: Optional[dict[str, Any]] = Field(default=None, description="The MemoryEstimate of this setup (as a dict), or None when no estimate could be made.")
    predicted_tokens_per_second: Optional[float] = Field(default=None, description="tools.throughput's uncalibrated prediction for this setup.")
    predictor: Optional[str] = Field(default=None, description="The time model that made the prediction: 'op-roofline' (simulated op trace) or 'flat-factors'.")
    comparison: dict[str, Any] = Field(default_factory=dict, description="Per quantity: measured, estimated and error_pct ((estimated - measured) / measured); or a 'note' when not comparable.")
    verdict: str = Field(default="", description="One line: did it fit, and how close was the estimate.")
    advice: list[str] = Field(default_factory=list, description="What to change when it failed (smallest changes first).")
    notes: list[str] = Field(default_factory=list, description="How the trial was run and what could not be compared.")
    workdir: Optional[str] = Field(default=None, description="Directory holding train.py, the report and the log.")
    log_path: Optional[str] = Field(default=None, description="Captured stdout/stderr of the trial process.")
    return_code: Optional[int] = Field(default=None, description="Exit status of the trial process (negative = killed by that signal).")


# --------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------


def tunepilot_home() -> Path:
    """$TUNEPILOT_HOME, default ~/.cache/tunepilot."""
    return Path(os.environ.get("TUNEPILOT_HOME") or Path.home() / ".cache" / "tunepilot")


def calibration_path() -> Path:
    """The calibration record: one JSON line per trial run."""
    return tunepilot_home() / "calibration.jsonl"


# --------------------------------------------------------------------------------------
# running the child
# --------------------------------------------------------------------------------------


def _limit_memory(limit_bytes: int):
    def _apply() -> None:  # runs in the child between fork and exec
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return _apply


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _local_gpu_count() -> int:
    try:
        from tools.gpus import detect_hardware

        return detect_hardware().num_gpus
    except Exception:  # noqa: BLE001 - no GPU, or detection unavailable
        return 0


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def _classify_log(rc: int | None, log: str) -> tuple[ErrorKind, str]:
    """Error kind and message for a child that died without writing its report."""
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    low = log.lower()
    if "memoryerror" in low or "out of memory" in low or "cannot allocate memory" in low or "can't allocate memory" in low:
        return "oom", last or "out of memory"
    if rc == -signal.SIGKILL:
        return "oom", "the trial process was killed (SIGKILL), most likely by the kernel's out-of-memory killer"
    if "cuda" in low and "error" in low:
        return "cuda_error", last
    return "error", last or f"the trial process exited with status {rc} without a report"


class _Terminated(Exception):
    """tunepilot itself received SIGTERM while a trial was running."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


class StepWatcher:
    """Reads the trial log while the child runs and reports 'trial step 2/3, loss 2.31, 1,234 tokens/s'.

    The generated script logs every trial step (logging_steps=1: a "{'loss': ...}" line per optimizer
    step); tokens/s is measured between the first and the latest step seen, as the report does (the
    first step, with its warm-up, excluded)."""

    _LOSS = re.compile(r"""['"]loss['"]:\s*['"]?(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)""")

    def __init__(self, log_path: Path, steps: int, tokens_per_step: int) -> None:
        self.log_path, self.steps, self.tokens_per_step = log_path, steps, tokens_per_step
        self.offset, self.seen, self.times, self.buffer = 0, 0, [], ""

    def __call__(self) -> None:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        self.offset += len(chunk)
        text = self.buffer + chunk.decode("utf-8", errors="replace")
        lines = re.split(r"[\r\n]", text)
        self.buffer = lines.pop()  # an unfinished line waits for the next poll
        for line in lines:
            m = self._LOSS.search(line)
            if not m:
                continue
            self.seen += 1
            self.times.append(time.monotonic())
            line = f"trial step {min(self.seen, self.steps)}/{self.steps}, loss {float(m.group(1)):.3f}"
            if len(self.times) >= 2 and self.times[-1] > self.times[0]:
                tps = (len(self.times) - 1) * self.tokens_per_step / (self.times[-1] - self.times[0])
                line += f", {tps:,.0f} tokens/s"
            progress.note(line)


def _execute(cmd: list[str], *, cwd: Path, log_path: Path, timeout: float, memory_limit_gib: float | None,
             watch=None) -> tuple[int | None, str | None]:
    """Run cmd in its own session; returns (return code, 'timeout'/'interrupted'/None).

    `watch` (optional) is called about twice a second while the child runs (progress from its log)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    preexec = _limit_memory(int(memory_limit_gib * 1024**3)) if memory_limit_gib else None
    # The child has its own session, so Ctrl-C at the terminal reaches only us: we stop it ourselves.
    # SIGTERM to tunepilot (e.g. `timeout`, systemd) is turned into the same clean stop when we can.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=preexec,
            )
            try:
                if watch is None:
                    return proc.wait(timeout=timeout), None
                end = time.monotonic() + timeout
                while True:
                    try:
                        return proc.wait(timeout=max(0.0, min(0.5, end - time.monotonic()))), None
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= end:
                            raise
                        watch()
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return proc.returncode, "timeout"
            except (KeyboardInterrupt, _Terminated):
                _kill_group(proc, grace=2.0)
                return proc.returncode, "interrupted"
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------
# estimate and comparison
# --------------------------------------------------------------------------------------


def _estimates(setup: TrainingSetup, model_ref: str, device: str | None, notes: list[str]) -> tuple[dict | None, float | None]:
    """(MemoryEstimate dict, predicted tokens/s); each None with a note when it cannot be made."""
    hardware = None
    if device == "cuda":
        try:
            from tools.gpus import detect_hardware

            hardware = detect_hardware()
            if hardware.num_gpus != setup.num_gpus:
                hardware = hardware.model_copy(update={"num_gpus": setup.num_gpus, "free_memory_gib": None})
        except Exception as e:  # noqa: BLE001 - estimate without a GPU to check against
            notes.append(f"local GPU not detected ({e}); estimate not checked against a GPU")
    try:
        from tools.models import lookup_model

        spec = lookup_model(model_ref, hub=False)
    except Exception as e:  # noqa: BLE001 - e.g. a Hub id with nothing cached
        notes.append(f"no estimate: model {model_ref!r} not found offline ({e})")
        return None, None
    estimated = None
    try:
        from tools.estimator import estimate

        est = estimate(spec, setup, hardware)
        estimated = est.model_dump(mode="json")
    except ImportError:
        notes.append("no estimate: tools.estimator is not available in this checkout")
    except Exception as e:  # noqa: BLE001 - keep the measurement even when the estimate fails
        notes.append(f"no estimate: {e}")
    predicted = None
    if hardware is not None:
        try:
            from tools.estimator import step_memory
            from tools.throughput import estimate_throughput

            step = step_memory(spec, setup)[0]  # the dry run's step (cached by the estimate above): its op trace
            thr = estimate_throughput(spec, setup, hardware, calibrate=False, step=step)
            predicted = (thr.tokens_per_second, thr.time_model)
        except Exception as e:  # noqa: BLE001
            notes.append(f"no throughput prediction: {e}")
    return estimated, predicted


def _pct(measured: float | None, estimated: float | None) -> float | None:
    if measured is None or estimated is None or measured <= 0:
        return None
    return round((estimated - measured) / measured * 100, 1)


def compare(report: TrialReport) -> dict[str, Any]:
    """Measured vs estimated for allocated, reserved, device total and tokens/s, with error in percent."""
    if report.device != "cuda":
        return {"note": CPU_NOT_COMPARABLE, "cpu_peak_rss_gib": report.cpu_peak_rss_gib}
    est = report.estimated or {}
    out: dict[str, Any] = {}
    for name, m_key, e_key in (
        ("allocated_gib", "max_memory_allocated_gib", "peak_allocated_gib"),
        ("reserved_gib", "max_memory_reserved_gib", "peak_reserved_gib"),
        ("device_total_gib", "device_total_gib", "device_total_gib"),
    ):
        measured, estimated = getattr(report, m_key), est.get(e_key)
        out[name] = {"measured": measured, "estimated": estimated, "error_pct": _pct(measured, estimated)}
    out["tokens_per_second"] = {
        "measured": report.tokens_per_second,
        "estimated": report.predicted_tokens_per_second,
        "error_pct": _pct(report.tokens_per_second, report.predicted_tokens_per_second),
    }
    return out


def oom_advice(setup: TrainingSetup) -> list[str]:
    """The smallest changes that cut training memory for this setup, most effective first."""
    advice: list[str] = []
    micro, accum = setup.per_device_train_batch_size, setup.gradient_accumulation_steps
    if not setup.gradient_checkpointing:
        advice.append("gradient_checkpointing: true — recompute activations in backward (far less activation memory, ~33% more compute)")
    if micro > 1:
        advice.append(f"per_device_train_batch_size: 1 with gradient_accumulation_steps: {micro * accum} — same effective batch, 1/{micro} of the activations")
    if setup.max_length > 512:
        advice.append(f"max_length: {setup.max_length // 2} — activations and logits shrink with the sequence (check your data's length first)")
    if setup.method in ("lora", "dora") and not setup.load_in_4bit:
        advice.append("method: qlora (load_in_4bit) — base weights in 4 bit, about a quarter of the bf16 weight memory")
    if setup.method == "full" and setup.num_gpus == 1:
        advice.append("method: lora or qlora — no gradients or optimizer states for the frozen base weights")
    if "8bit" not in setup.optim and setup.optim not in ("sgd", "adafactor"):
        advice.append("optim: paged_adamw_8bit — 8-bit optimizer states, paged to the host under pressure")
    if setup.attn_implementation == "eager":
        advice.append("attn_implementation: sdpa — no seq x seq attention matrix")
    if setup.num_gpus > 1 and setup.zero_stage < 3 and setup.fsdp != "full_shard":
        advice.append("zero_stage: 3 (or fsdp: full_shard) — shard weights, gradients and optimizer states across the GPUs")
    elif (setup.zero_stage or setup.fsdp != "none") and setup.offload == "none":
        advice.append("offload: optimizer — keep optimizer states in host RAM (slower, much less GPU memory)")
    return advice


def _verdict(r: TrialReport, setup: TrainingSetup, memory_limit_gib: float | None) -> str:
    if r.ok:
        losses = f"loss {r.loss_per_step[0]:.3f} -> {r.loss_per_step[-1]:.3f}" if r.loss_per_step else "no loss logged"
        if r.device == "cuda":
            est = (r.estimated or {}).get("peak_allocated_gib")
            versus = f" (estimated {est:.2f} GiB, {_pct(r.max_memory_allocated_gib, est):+.1f}%)" if est and r.max_memory_allocated_gib else ""
            total = f", {r.device_total_gib:.2f} GiB on the device" if r.device_total_gib else ""
            return f"fits: {r.steps} steps ran on {r.gpu_name}, peak {r.max_memory_allocated_gib:.2f} GiB allocated{versus}{total}; {losses}"
        return f"ran {r.steps} steps on CPU (no GPU): peak RSS {r.cpu_peak_rss_gib or 0:.2f} GiB, {losses}; {CPU_NOT_COMPARABLE}"
    where = f" under a {memory_limit_gib:g} GiB memory limit" if memory_limit_gib else ""
    return {
        "oom": f"out of memory{where}: this setup does not fit ({setup.short()})",
        "timeout": "timed out before the trial steps finished",
        "interrupted": "interrupted: the trial was stopped and its processes killed",
        "data_error": "the dataset could not be turned into training batches",
        "cuda_error": "CUDA error during the trial",
    }.get(r.error_kind or "error", "the trial failed")


def _record(r: TrialReport, setup: TrainingSetup) -> None:
    """Append this trial to the calibration record (best effort)."""
    est = r.estimated or {}
    row = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_id": r.model or setup.model_id,
        "setup_short": setup.short(),
        "setup": setup.model_dump(mode="json"),
        "gpu": r.gpu_name or r.device or "unknown",
        "device": r.device,
        "method": setup.method,
        "loss_impl": r.loss_impl or setup.loss_impl,
        "ok": r.ok,
        "error_kind": r.error_kind,
        "measured_allocated_gib": r.max_memory_allocated_gib,
        "measured_reserved_gib": r.max_memory_reserved_gib,
        "measured_device_total_gib": r.device_total_gib,
        "cpu_peak_rss_gib": r.cpu_peak_rss_gib,
        "estimated_allocated_gib": est.get("peak_allocated_gib"),
        "estimated_reserved_gib": est.get("peak_reserved_gib"),
        "estimated_device_total_gib": est.get("device_total_gib"),
        "estimate_tier": est.get("tier"),
        "tokens_per_second": r.tokens_per_second,
        "predicted_tokens_per_second": r.predicted_tokens_per_second,
        "predictor": r.predictor,  # which time model predicted it (tools.throughput compares like with like)
    }
    try:
        path = calibration_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        r.notes.append(f"calibration record not written: {e}")


# --------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------


def run_trial(
    setup: TrainingSetup,
    *,
    steps: int = 3,
    timeout: float = 900,
    workdir: Path | None = None,
    model_path: str | None = None,
    dataset: str | None = None,
    memory_limit_gib: float | None = None,
    python: str | None = None,
    estimate: bool = True,
    record: bool = True,
) -> TrialReport:
    """Trial-run a setup: its generated script runs `steps` optimizer steps on worst-case batches in a subprocess; returns measured vs estimated memory, a verdict and advice."""
    from tools.script import needs_accelerate, write_script

    if steps < 1 or steps > 100:
        raise TrialError(f"steps: give 1-100 trial steps, got {steps}")
    if timeout <= 0:
        raise TrialError(f"timeout: must be positive seconds, got {timeout}")
    if memory_limit_gib is not None and memory_limit_gib <= 0:
        raise TrialError(f"memory_limit_gib: must be positive, got {memory_limit_gib}")
    if model_path and not Path(model_path).exists():
        raise TrialError(f"model_path: {model_path} does not exist (give a local model directory)")
    if dataset and Path(dataset).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") and not Path(dataset).is_file():
        raise TrialError(f"dataset: file {dataset} not found")
    if dataset is None and setup.dataset and Path(setup.dataset).exists():
        dataset = setup.dataset  # a local path in the setup is relative to here, not to the trial's work directory
    launcher = needs_accelerate(setup)
    if launcher:
        have = _local_gpu_count()
        if have < setup.num_gpus:
            raise TrialError(
                f"num_gpus: this setup runs on {setup.num_gpus} GPUs ({setup.sharding}) but this machine has {have}; "
                "run the trial on the training machine"
            )

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tunepilot-trial-"))
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "train.py"
    write_script(setup, script, dataset=dataset)
    report_path, log_path = workdir / "trial_report.json", workdir / "trial.log"
    report_path.unlink(missing_ok=True)
    py = python or sys.executable
    cmd = [py, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml"] if launcher else [py]
    cmd += [script.name, "--trial-steps", str(steps), "--trial-report", str(report_path), "--output-dir", str(workdir / "outputs")]
    if model_path:
        cmd += ["--model", str(Path(model_path).resolve())]
    if dataset:
        cmd += ["--dataset", str(Path(dataset).resolve()) if Path(dataset).exists() else dataset]

    notes = [f"command: {' '.join(cmd)} (in {workdir})"]
    if memory_limit_gib:
        notes.append(f"child address space limited to {memory_limit_gib:g} GiB (RLIMIT_AS)")
    started = time.perf_counter()
    watch = None
    if progress.active():
        rows = setup.per_device_train_batch_size * setup.gradient_accumulation_steps * setup.num_gpus
        watch = StepWatcher(log_path, steps, rows * setup.max_length)
    with progress.status(f"trial run of {setup.short()}: loading the model"):
        rc, stopped = _execute(cmd, cwd=workdir, log_path=log_path, timeout=timeout, memory_limit_gib=memory_limit_gib,
                               watch=watch)

    data: dict[str, Any] = {}
    if stopped is None and report_path.is_file():
        try:
            data = json.loads(report_path.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
    fields = set(TrialReport.model_fields)
    report = TrialReport(
        ok=bool(data.get("ok")) and stopped is None,
        **{k: v for k, v in data.items() if k in fields and k != "ok" and v is not None},
    )
    report.setup_summary, report.model, report.steps = setup.short(), model_path or setup.model_id, steps
    report.workdir, report.log_path, report.return_code = str(workdir), str(log_path), rc
    report.notes = notes
    if stopped:
        report.error_kind = stopped
        report.error_message = (
            f"no report after {timeout:g} s; the process group was killed" if stopped == "timeout" else "stopped by Ctrl-C; the process group was killed"
        )
        report.wall_seconds = round(time.perf_counter() - started, 3)
    elif not data:
        report.error_kind, report.error_message = _classify_log(rc, _tail(log_path))
        report.wall_seconds = round(time.perf_counter() - started, 3)

    if estimate and stopped != "interrupted" and report.device == "cuda":
        report.estimated, predicted = _estimates(setup, model_path or setup.model_id, report.device, report.notes)
        if predicted is not None:
            report.predicted_tokens_per_second, report.predictor = predicted
    elif estimate and report.device != "cuda":
        report.notes.append("no GPU estimate computed: this trial did not run on a GPU")
    report.comparison = compare(report)
    report.verdict = _verdict(report, setup, memory_limit_gib)
    if report.error_kind == "oom":
        report.advice = oom_advice(setup)
    elif report.error_kind == "timeout":
        report.advice = [f"timeout: raise it above {timeout:g} s (the first step includes loading the model) or use fewer steps"]
    elif report.error_kind == "data_error":
        report.advice = ["dataset: check the path/id and the column (text field or 'messages' with --chat)"]
    elif not report.ok:
        report.advice = [f"see the log: {log_path}"]
    if record and stopped != "interrupted":
        _record(report, setup)
    return report


def rebatch(setup: TrainingSetup, micro_batch: int) -> tuple[TrainingSetup, str]:
    """The setup with a new micro-batch and the accumulation that keeps micro x accum x GPUs closest to the original effective batch."""
    target = setup.effective_batch_size
    per_step = micro_batch * setup.num_gpus
    accum = max(1, round(target / per_step))
    new = TrainingSetup.model_validate(
        {**setup.model_dump(), "per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": accum}
    )
    got = new.effective_batch_size
    note = f"effective batch {got} (= {micro_batch} x {accum} x {setup.num_gpus})"
    if got != target:
        note += f"; {target} is not divisible by {per_step}, closest is {got}"
    return new, note


def _seed_batch(setup: TrainingSetup, max_batch: int, model_ref: str, notes: list[str]) -> int:
    """Largest power-of-two micro-batch the estimator predicts fits on the local (or planned) GPU; the setup's own when it cannot tell."""
    try:
        from tools.estimator import estimate
        from tools.gpus import detect_hardware, parse_hardware
        from tools.models import lookup_model

        try:
            hardware = detect_hardware()
        except TunepilotError:
            if not setup.gpu:
                raise
            hardware = parse_hardware(setup.gpu)
        spec = lookup_model(model_ref, hub=False)
        best, b = 0, 1
        while b <= max_batch:
            est = estimate(spec, rebatch(setup, b)[0], hardware, fast=True)
            if not est.fits:
                break
            best, b = b, b * 2
        if best:
            notes.append(f"estimator predicts micro-batch {best} is the largest power of two that fits on {hardware.gpu.name}")
            return best
        notes.append("estimator predicts even micro-batch 1 does not fit; trying 1")
        return 1
    except Exception as e:  # noqa: BLE001 - no estimator or no hardware: start from the setup
        notes.append(f"no estimate to seed the search ({e}); starting from the setup's micro-batch")
        return min(setup.per_device_train_batch_size, max_batch)


def search_batch(seed: int, max_batch: int, attempt) -> int | None:
    """Powers-of-two search from `seed`: up while `attempt(b)` is True, down while it reports OOM (False); None stops early.

    `attempt(b)` returns True (ran), False (out of memory) or None (failed for another reason).
    Returns the largest micro-batch that ran, or None.
    """
    tried: dict[int, bool | None] = {}
    best = None
    b = max(1, min(seed, max_batch))
    while 1 <= b <= max_batch and b not in tried:
        ok = tried[b] = attempt(b)
        if ok is None:
            break  # not a memory problem: more trials would not help
        if ok:
            best = b
            b *= 2
        else:
            b //= 2
    return best


def find_max_batch(setup: TrainingSetup, *, max_batch: int = 64, **run_kw) -> tuple[TrainingSetup, list[TrialReport]]:
    """Largest micro-batch that trial-runs without OOM: seeded by the estimate, then up/down by powers of two; accumulation keeps the effective batch."""
    if max_batch < 1:
        raise TrialError(f"max_batch: must be at least 1, got {max_batch}")
    notes: list[str] = []
    seed = _seed_batch(setup, max_batch, run_kw.get("model_path") or setup.model_id, notes)
    reports: list[TrialReport] = []

    def attempt(b: int) -> bool | None:
        candidate, note = rebatch(setup, b)
        r = run_trial(candidate, **run_kw)
        r.notes = [f"find_max_batch: micro-batch {b}, {note}"] + (notes if not reports else []) + r.notes
        reports.append(r)
        return True if r.ok else (False if r.error_kind == "oom" else None)

    best = search_batch(seed, max_batch, attempt)
    if best is None:
        return setup, reports
    chosen, note = rebatch(setup, best)
    reports[-1].notes.append(f"find_max_batch: largest micro-batch that ran: {best}; {note}")
    return chosen, reports
