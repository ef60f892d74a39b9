"""Real multi-process sharded training steps on this CPU (gloo), rank by rank, for tests/test_distributed.py.

Every rank builds the same tiny model the dry run builds (tools.memory.step.build on meta, then real
uninitialised storage with `to_empty`), wraps it with the same `tools.memory.distributed.shard` the
dry run uses (accelerate's FSDP2 wrapping), and runs two REAL training steps with the same step
functions (`train_step`: forward, loss, backward, clipping, optimizer step) over a real gloo
process group. The second step is tracked by the storage counter's real mode
(`tools.memory.tracker.make_tracker(fake=False)`) and measured by `tools.memory.step.measure`, so the
dry run on fake tensors and the real step are counted the same way.
"""

from __future__ import annotations

import os
import socket
import warnings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_sharded_step(spec, st, depth: int, mesh) -> dict:
    """One rank's measured second step of a real sharded run (this process must be in a process group)."""
    import torch

    from tools.memory import distributed
    from tools.memory import step as S
    from tools.memory.build import retie
    from tools.memory.tracker import make_tracker

    torch.manual_seed(0)
    plan = distributed.plan_for(st)
    prep = S.build(spec, st, depth)
    tracker = make_tracker(fake=False)
    ledger = distributed.FsdpLedger(tracker, host=plan.offload)
    with warnings.catch_warnings(), S.TrainingMaskPolicy(False), S.CudaLikeDropout(), tracker, ledger:
        warnings.simplefilter("ignore")
        prep.pm.to_empty(device="cpu")
        retie(prep.base)
        with torch.no_grad():  # finite values (to_empty leaves whatever the allocator had)
            for p in prep.pm.parameters():
                p.normal_(0, 0.02) if p.is_floating_point() else p.zero_()
            del p  # the loop variable would keep the last unsharded parameter alive
        if st.load_in_4bit:
            S.quantize(prep, st)
        if prep.is_peft and st.gradient_checkpointing:
            prep.pm.enable_input_require_grads()
        prep.pm.train()
        S.count_parameters(prep, st)
        S.instrument(prep, tracker)
        distributed.shard(prep, st, mesh, plan, ledger)
        optimizer = S.make_optimizer(prep.pm, st, prep.params)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if st.bf16 else torch.autocast("cpu", enabled=False)
        S.train_step(prep, optimizer, st, tracker, amp)  # step 1, complete and real
        optimizer.zero_grad(set_to_none=True)
        if plan.offload:
            ledger.optimizer_to_host(optimizer)
        tracker.phase = "forward"
        for t in list(prep.pm.parameters()) + list(prep.pm.buffers()):
            tracker.add(t)  # storages made before the counter started (buffers): resident from the start
        tracker.reset_peak()
        S.train_step(prep, optimizer, st, tracker, amp)  # step 2, measured
        measured = S.measure(prep, optimizer, tracker)
        host = ledger.offloaded()
    segments = measured.pop("segments")
    return {**measured, "peak": max(sum(b.values()) for b in segments.values()), "breakdowns": segments,
            "segments": {k: sum(v.values()) for k, v in segments.items()}, "offloaded": host}


def _worker(rank: int, world: int, port: int, cases: list, queue, fsdp1: bool = False) -> None:
    """One gloo rank: every case's real step (FSDP2 over a CPU mesh, or torch's FSDP1 when `fsdp1`)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        if fsdp1:
            for name, spec, st, depth in cases:
                out[name] = real_fsdp1_step(spec, st, depth)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            for name, spec, st, depth in cases:
                out[name] = real_sharded_step(spec, st, depth, mesh)
        queue.put((rank, out, None))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        import traceback

        queue.put((rank, out, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_real(world: int, cases: list, timeout: float = 120.0, *, fsdp1: bool = False) -> dict:
    """{case name: [rank 0 result, rank 1 result, ...]} from `world` real processes (gloo, spawn)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cases, queue, fsdp1)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    errors = []
    try:
        for _ in procs:
            rank, out, err = queue.get(timeout=timeout)
            results[rank] = out
            if err:
                errors.append(f"rank {rank}: {err}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("; ".join(errors))
    return {name: [results[r][name] for r in range(world)] for name, *_ in cases}


def real_fsdp1_step(spec, st, depth: int, _mesh=None) -> dict:
    """One rank's measured second step under torch's own FSDP1 (FullyShardedDataParallel, which runs on CPU with
    gloo and device_id=cpu), wrapped as transformers' Trainer of 2024 had accelerate wrap a LoRA model: peft's
    `fsdp_auto_wrap_policy` (every trainable leaf its own unit, the decoder layers units, the rest the root),
    FULL_SHARD, BACKWARD_PRE, use_orig_params, limit_all_gathers; and checkpointed as transformers 4.40 did:
    `checkpoint(decoder_layer.__call__, hidden_states, ...)` with torch's reentrant default around the FSDP1
    unit (transformers 5 checkpoints the layer's forward inside it). FSDP1's in-place storage resizes are
    followed by the same ledger; the step functions and the counter are the dry run's."""
    import functools

    import torch
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from peft.utils.other import fsdp_auto_wrap_policy
    from tools.memory import distributed
    from tools.memory import step as S
    from tools.memory.build import retie
    from tools.memory.tracker import make_tracker

    torch.manual_seed(0)
    prep = S.build(spec, st, depth)
    tracker = make_tracker(fake=False)
    ledger = distributed.FsdpLedger(tracker)
    # FSDP1's in-place storage resizes: followed by the ledger (FsdpLedger patches _flat_param's)

    class Checkpointed2024(torch.nn.Module):
        def __init__(self, unit):
            super().__init__()
            self.unit = unit

        def forward(self, hidden_states, **kwargs):
            return torch.utils.checkpoint.checkpoint(functools.partial(self.unit, **kwargs), hidden_states, use_reentrant=True)

    try:
        with warnings.catch_warnings(), S.TrainingMaskPolicy(False), S.CudaLikeDropout(), tracker, ledger:
            warnings.simplefilter("ignore")
            prep.pm.to_empty(device="cpu")
            retie(prep.base)
            with torch.no_grad():
                for p in prep.pm.parameters():
                    p.normal_(0, 0.02) if p.is_floating_point() else p.zero_()
                del p
            prep.pm.enable_input_require_grads()
            prep.pm.train()
            S.count_parameters(prep, st)
            S.instrument(prep, tracker)
            model = FSDP(prep.pm, sharding_strategy=ShardingStrategy.FULL_SHARD, auto_wrap_policy=fsdp_auto_wrap_policy(prep.pm),
                         backward_prefetch=BackwardPrefetch.BACKWARD_PRE, use_orig_params=True, limit_all_gathers=True,
                         device_id=torch.device("cpu"))
            layers = prep.base.model.layers
            for i, unit in enumerate(layers):
                unit._fsdp_wrapped_module.gradient_checkpointing = False  # transformers 5's checkpoint inside the unit: off
                layers[i] = Checkpointed2024(unit)
            prep.pm, prep.params = model, [p for p in model.parameters() if p.requires_grad]
            optimizer = S.make_optimizer(model, st, prep.params)
            amp = torch.autocast("cpu", enabled=False)
            S.train_step(prep, optimizer, st, tracker, amp)
            optimizer.zero_grad(set_to_none=True)
            tracker.phase = "forward"
            for t in list(model.parameters()) + list(model.buffers()):
                tracker.add(t)
            tracker.reset_peak()
            S.train_step(prep, optimizer, st, tracker, amp)
            tracker.finish()
            segments = {k: v for k, v in tracker.seg_peak.items()}
    finally:
        pass
    return {"peak": max(segments.values()), "segments": segments}


def run_real_fsdp1(world: int, cases: list, timeout: float = 180.0) -> dict:
    """{case name: [rank results]} of real FSDP1 steps (`real_fsdp1_step`) in `world` gloo processes."""
    return run_real(world, cases, timeout, fsdp1=True)
