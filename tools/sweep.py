"""The fit map: which micro-batch x sequence-length combinations of a setup fit one GPU (`tunepilot sweep`).

`sweep(model, hardware, setup)` estimates every cell of the grid with the analytic tier (instant),
then confirms the boundary with the simulator: in each row, the largest micro-batch that fits and the
smallest that does not. When the simulator moves the boundary (a confirmed cell changes its verdict)
the neighbour in that direction is simulated too, until the boundary is confirmed on both sides or
`max_simulations` is used up. Memory grows monotonically with micro-batch, so every cell left of a
confirmed fit fits and every cell right of a confirmed misfit does not.
"""

from __future__ import annotations

from typing import Optional

from tools import progress
from tools.schemas import FitCell, FitMap, FitRow, HardwareSpec, ModelSpec, TrainingSetup, TunepilotError

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
MAX_SIMULATIONS = 16


def default_seq_lens(model: ModelSpec) -> list[int]:
    """SEQ_LENS up to the model's context length."""
    cap = model.max_position_embeddings or max(SEQ_LENS)
    return [s for s in SEQ_LENS if s <= cap] or [min(cap, SEQ_LENS[0])]


def sweep(model: ModelSpec, hardware: HardwareSpec, setup: TrainingSetup, *, batch_sizes: Optional[list[int]] = None,
          seq_lens: Optional[list[int]] = None, confirm: bool = True, safety_margin: float = 0.10,
          max_simulations: int = MAX_SIMULATIONS) -> FitMap:
    """Fit map of `setup` on `hardware` over micro-batch x sequence length: analytic everywhere, simulated at each row's boundary."""
    from tools.estimator import estimate

    batches = sorted(set(batch_sizes or BATCH_SIZES))
    seqs = sorted(set(seq_lens or default_seq_lens(model)))
    for name, values in (("batch sizes", batches), ("sequence lengths", seqs)):
        if not values or min(values) < 1:
            raise TunepilotError(f"sweep: {name} must be positive integers, got {values}")
    if not 0.0 <= safety_margin < 0.9:
        raise TunepilotError(f"safety_margin: {safety_margin} must be in [0, 0.9)")
    usable = hardware.gpu.memory_gib * (1.0 - safety_margin)
    notes: list[str] = [f"analytic tier on all {len(batches) * len(seqs)} cells"]

    def cell_setup(b: int, s: int) -> TrainingSetup:
        return TrainingSetup.model_validate({**setup.model_dump(), "per_device_train_batch_size": b, "max_length": s})

    def make(b: int, s: int, fast: bool) -> FitCell:
        est = estimate(model, cell_setup(b, s), hardware, fast=fast, advice=False)
        return FitCell(per_device_train_batch_size=b, max_length=s, device_total_gib=est.device_total_gib,
                       fits=est.device_total_gib <= usable, tier=est.tier)

    grid: list[list[FitCell]] = []
    with progress.status(f"estimating {len(batches) * len(seqs)} cells with the analytic tier"):
        for s in seqs:
            grid.append([make(b, s, True) for b in batches])

    sims = 0
    if confirm:
        with progress.status("confirming the fit boundary with the simulator"):
            for r, s in enumerate(seqs):
                row = grid[r]
                sims = _confirm_row(row, batches, s, lambda b, s=s: make(b, s, False), sims, max_simulations, model)
                if sims >= max_simulations:
                    notes.append(f"simulator budget ({max_simulations} runs) used up at max_length {s}; later rows stay analytic")
                    break
        notes.append(f"simulated {sims} boundary cells (marked tier 'simulated')")
    else:
        notes.append("not confirmed by the simulator (--fast)")
    rows = []
    for s, row in zip(seqs, grid):
        _monotone(row)
        fitting = [c.per_device_train_batch_size for c in row if c.fits]
        rows.append(FitRow(max_length=s, largest_fitting_batch=max(fitting) if fitting else None, cells=row))
    n = hardware.num_gpus
    return FitMap(
        model_id=model.model_id,
        hardware=f"{n}x {hardware.gpu.name} ({hardware.gpu.memory_gib:g} GiB)",
        setup_summary=_summary(setup),
        gpu_memory_gib=hardware.gpu.memory_gib,
        usable_gib=round(usable, 3),
        safety_margin=safety_margin,
        batch_sizes=batches,
        seq_lens=seqs,
        rows=rows,
        simulated_cells=sum(1 for row in grid for c in row if c.tier == "simulated"),
        notes=notes,
    )


def _summary(setup: TrainingSetup) -> str:
    """setup.short() without the micro-batch and sequence length (they are the map's axes)."""
    parts = [p for p in setup.short().split(", ") if not p.startswith("b=") and not p.startswith("seq ")]
    return ", ".join(parts)


def _confirm_row(row: list[FitCell], batches: list[int], s: int, simulate, sims: int, budget: int, model: ModelSpec) -> int:
    """Simulate the row's boundary cells in place; returns the simulator runs used so far."""
    def run(i: int) -> bool:
        nonlocal sims
        if row[i].tier == "simulated":
            return True
        if sims >= budget:
            return False
        progress.note(f"simulating micro-batch {batches[i]} x {s:,} tokens of {model.model_id} ({sims + 1}/{budget} at most)")
        try:
            row[i] = simulate(batches[i])
        except TunepilotError:
            return False
        sims += 1
        return True

    fit = [c.fits for c in row]
    last = max((i for i, f in enumerate(fit) if f), default=None)
    # walk from the analytic boundary until a simulated fit sits next to a simulated misfit (or an edge)
    i = last if last is not None else 0
    seen: set[int] = set()
    while 0 <= i < len(row) and i not in seen:
        seen.add(i)
        if not run(i):
            break
        if row[i].fits:
            if i + 1 >= len(row):
                break
            if not run(i + 1):
                break
            if row[i + 1].fits:
                i += 1  # the boundary is further right
                continue
            break
        # a simulated misfit: the boundary is further left
        if i == 0:
            break
        i -= 1
    return sims


def _monotone(row: list[FitCell]) -> None:
    """Cells left of a simulated fit fit; cells right of a simulated misfit do not (memory grows with micro-batch)."""
    sim_fit = max((i for i, c in enumerate(row) if c.tier == "simulated" and c.fits), default=None)
    sim_miss = min((i for i, c in enumerate(row) if c.tier == "simulated" and not c.fits), default=None)
    for i, c in enumerate(row):
        if c.tier == "simulated":
            continue
        if sim_fit is not None and i < sim_fit and not c.fits:
            row[i] = c.model_copy(update={"fits": True})
        if sim_miss is not None and i > sim_miss and c.fits:
            row[i] = c.model_copy(update={"fits": False})
