"""`simulate()`: validation, the in-process result cache, and the two depths of an extrapolated dry run.

The two dry runs of an extrapolated simulation (`tools.memory.extrapolate`) are independent; where
it is safe the shallower one runs in a forked child while this process runs the deeper one (see
"Two depths side by side" below). Each run is `tools.memory.step.run`. No torch at import.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import threading
import time

from tools import progress
from tools.memory import SimulationError, step
from tools.memory.build import QuietTransformers
from tools.memory.extrapolate import OFFLOAD_STASH_BLOCKS, combine, depths_to_simulate
from tools.schemas import ModelSpec, StepMemory, TrainingSetup, TunepilotError

# Fields of TrainingSetup that cannot change the memory of one simulated training step (the cache
# ignores them). Not here, on purpose: lora_dropout (0 -> peft's Identity, no mask and no dropped
# copy), weight_decay (foreach SGD/Adagrad/RMSprop add it out of place: a copy of every gradient),
# max_grad_norm (clipping temporaries), and every shape/dtype/kernel field. Sharding and offload
# (num_gpus, zero_stage, fsdp, offload) change a sharded dry run (tools.memory.distributed.plan_for),
# whose key adds them; otherwise tools.estimator applies them to the one-replica step.
# lora_alpha/use_rslora only change a scalar. packing is simulated (trl flattens the packed batch into
# one row; with sdpa/eager transformers then builds a block-diagonal [1,1,b*s,b*s] mask).
_IRRELEVANT = {
    "model_id", "learning_rate", "num_train_epochs", "warmup_steps", "lr_scheduler_type",
    "seed", "eval_steps", "num_gpus", "num_nodes", "zero_stage", "fsdp", "offload", "gpu", "dataset",
    "dataset_text_field", "use_chat_template", "streaming", "output_dir", "save_steps", "save_total_limit",
    "logging_steps", "merge_adapter", "lora_alpha", "use_rslora",
}
_CACHE: dict[str, StepMemory] = {}
_LOCK = threading.RLock()
_CACHE_MAX = 256


def simulate(model: ModelSpec, setup: TrainingSetup, *, extrapolate: bool = True) -> StepMemory:
    """Exact raw memory of one training step of one model replica, by running the real step on fake tensors.

    Builds the real transformers model (and peft adapter, 4-bit stand-ins, optimizer) for `setup`,
    runs two training steps (and an eval step when setup.eval_strategy != 'no') under FakeTensorMode
    and returns the steady-state peak with its breakdown (weights, adapters, gradients,
    optimizer_state, activations, logits_loss, temporaries) in bytes. Depth is extrapolated from
    1-2 simulated blocks unless extrapolate=False. No sharding and no CUDA-only overheads.
    Raises SimulationError (a TunepilotError) for combinations it cannot simulate.
    """
    _check_supported(model, setup)
    key = _cache_key(model, setup, extrapolate)
    t0 = time.perf_counter()
    hit = _CACHE.get(key)
    if hit is not None:
        result = hit.model_copy(deep=True)
        result.seconds = round(time.perf_counter() - t0, 3)
        result.notes.append(f"served from the in-process cache (first simulation took {hit.seconds:.2f} s)")
        return result
    try:
        # the dry run patches a few library functions process-wide while it runs
        with _LOCK, QuietTransformers():
            from tools.memory.distributed import SHARDED_MIN_BLOCKS, plan_for

            min_blocks = max(OFFLOAD_STASH_BLOCKS if setup.activation_offloading else 1,
                             SHARDED_MIN_BLOCKS if plan_for(setup) else 1)
            total, depths = depths_to_simulate(model, extrapolate, min_blocks=min_blocks)
            with progress.status(f"simulating {'+'.join(str(d) for d in depths)} of {total} blocks of {model.model_id} "
                                 f"({setup.method}, b={setup.per_device_train_batch_size}, seq {setup.max_length:,})"):
                runs = _run_depths(model, setup, depths)
    except TunepilotError:
        raise
    except Exception as e:  # noqa: BLE001 - a model/library combination we cannot run: say so, the caller falls back
        raise SimulationError(
            f"model: the dry run of {model.model_id} ({model.model_type}, {setup.short()}) failed in "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; use --fast (analytic)"
        ) from e
    plan = plan_for(setup)
    result = combine(runs, depths, total, gathered_per_block=bool(plan and not plan.reshard_after_forward))
    result.seconds = round(time.perf_counter() - t0, 3)
    if len(depths) == 2:
        result.notes.append(
            f"simulated {depths[0]} and {depths[1]} of {total} blocks and extrapolated every category linearly "
            f"(slope per block {result.per_layer_bytes / 2**20:.1f} MiB)"
        )
    else:
        result.notes.append(f"simulated all {total} blocks")
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = result.model_copy(deep=True)
    return result


# --------------------------------------------------------------------------------------
# Two depths side by side
# --------------------------------------------------------------------------------------

# The two dry runs of an extrapolated simulation are independent: where it is safe, the shallower
# one runs in a forked child while this process runs the deeper one, so a 70B estimate costs one
# run's time on a machine with two cores. "Safe": Linux, at least two usable cores, and no other
# Python thread in the process (forking a threaded process can leave the child stuck on a lock
# another thread held; the Slack bot and anything else threaded simply run the two in turn). A
# child that fails, or has not answered long after the parent's own run, is killed and its depth
# is simulated in-process, so the result never depends on the fork. TUNEPILOT_SIM_PARALLEL=0
# switches this off.
_PARALLEL = os.environ.get("TUNEPILOT_SIM_PARALLEL", "1") != "0"
_CHILD_MIN_WAIT = 10.0  # seconds the parent waits for the child at least (and 3x its own run)
_fork_broken = False


def _single_threaded() -> bool:
    return threading.active_count() == 1


def _fork_ok() -> bool:
    if not _PARALLEL or _fork_broken or not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return False
    if not _single_threaded():
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus >= 2


def _run_depths(model: ModelSpec, setup: TrainingSetup, depths: list[int]) -> list[step.RunResult]:
    child = _fork_run(model, setup, depths[0]) if len(depths) == 2 and _fork_ok() else None
    if child is None:
        return [step.run(model, setup, d) for d in depths]
    pid, fd = child
    t0 = time.perf_counter()
    try:
        deep = step.run(model, setup, depths[1])
    except BaseException:
        _collect(pid, fd, deadline=0.0)
        raise
    shallow = _collect(pid, fd, deadline=max(_CHILD_MIN_WAIT, 3 * (time.perf_counter() - t0)))
    if shallow is None:
        shallow = step.run(model, setup, depths[0])
    return [shallow, deep]


def _fork_run(model: ModelSpec, setup: TrainingSetup, depth: int) -> tuple[int, int] | None:
    """Start the dry run of `depth` in a forked child: (its pid, the pipe its result comes on), or None."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid:
        os.close(w)
        return pid, r
    try:  # the child: simulate, send the result back, leave without any clean-up
        os.close(r)
        try:
            import torch

            torch.set_num_threads(1)  # never enter the parent's OpenMP pool after a fork
            payload = pickle.dumps(("ok", step.run(model, setup, depth)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which re-runs in-process
            payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
    finally:
        os._exit(0)


def _collect(pid: int, fd: int, deadline: float) -> step.RunResult | None:
    """The child's result, or None (failed, or killed after `deadline` seconds without an answer)."""
    global _fork_broken
    import select
    import signal

    chunks: list[bytes] = []
    end = time.monotonic() + deadline
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                if deadline > 0:
                    _fork_broken = True  # a stuck child: do not fork again in this process
                return None
            data = os.read(fd, 1 << 20)
            if not data:
                break
            chunks.append(data)
    except OSError:
        return None
    finally:
        os.close(fd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    try:
        status, value = pickle.loads(b"".join(chunks))
    except Exception:  # noqa: BLE001 - a truncated or garbled answer: simulate in-process instead
        return None
    return value if status == "ok" else None


# --------------------------------------------------------------------------------------
# Validation and caching
# --------------------------------------------------------------------------------------


def _check_supported(model: ModelSpec, setup: TrainingSetup) -> None:
    if not model.config:
        raise SimulationError(
            f"model.config: {model.model_id} has no config.json dict; the simulator builds the model from it "
            "(look the model up with tools.models.lookup_model, or use the analytic tier with --fast)"
        )
    if setup.optim in ("adamw_torch_8bit", "adamw_torch_4bit"):
        raise SimulationError(f"optim: {setup.optim} (torchao) is not simulated yet; use adamw_bnb_8bit / paged_adamw_8bit or --fast")
    if setup.method in ("prompt-tuning", "prefix-tuning", "p-tuning") and setup.task != "causal-lm":
        raise SimulationError(f"method: {setup.method} is simulated for task causal-lm only")
    if setup.method == "prefix-tuning" and setup.gradient_checkpointing:
        raise SimulationError("gradient_checkpointing: peft's prefix-tuning does not work with gradient checkpointing; set gradient_checkpointing=false or use prompt-tuning/p-tuning")
    if (setup.load_in_4bit or setup.load_in_8bit) and setup.method not in ("qlora", "lora", "dora"):
        raise SimulationError(f"method: {setup.method} on a quantized (4/8-bit) base is not simulated; use qlora/lora/dora")


def _cache_key(model: ModelSpec, setup: TrainingSetup, extrapolate: bool) -> str:
    s = setup.model_dump(mode="json", exclude=_IRRELEVANT)
    from tools.memory.distributed import fsdp1_runs, plan_for

    plan = plan_for(setup)
    if plan is not None:  # a sharded dry run (tools.memory.distributed): its bytes are one rank's
        s["_shard"] = [plan.engine, plan.world_size, plan.reshard_after_forward, plan.offload, plan.zero_stage, setup.offload]
        if plan.engine == "fsdp1":  # the real FSDP1 or the FSDP2 units that model it
            s["_shard"].append(fsdp1_runs(setup) is None)
    s["gradient_accumulation_steps"] = min(setup.gradient_accumulation_steps, 2)
    if setup.objective == "grpo":  # the generation batch follows the accumulation (trl's default)
        s["generation_batch_size"] = setup.grpo_generation_batch
        s["gradient_accumulation_steps"] = setup.gradient_accumulation_steps  # decides whether old log-probs are computed
    s["lora_dropout"] = setup.lora_dropout > 0  # a dropped copy of the input exists or not; the rate is irrelevant
    s["weight_decay"] = setup.weight_decay > 0  # only whether the optimizer runs the decay term
    if setup.eval_strategy != "no":
        s["eval_strategy"] = "yes"
    else:
        s.pop("per_device_eval_batch_size")
        s.pop("prediction_loss_only")
    return json.dumps([model.model_type, model.config, s, extrapolate], sort_keys=True, default=str)


def clear_cache() -> None:
    """Forget cached simulations (tests, benchmarks)."""
    _CACHE.clear()
