"""The fit map (tools/sweep.py) and the engine's progress reports (tools/progress.py): the analytic
grid is confirmed by the real simulator exactly at each row's fit boundary, and the engine says what
it is doing through the progress callback only when a front end installed one.
"""

from __future__ import annotations

from tools import progress
from tools.gpus import parse_hardware
from tools.models import lookup_model
from tools.schemas import TrainingSetup
from tools.sweep import sweep

QWEN = "Qwen/Qwen2.5-0.5B"


def test_boundary_cells_are_simulated_and_the_rest_follow_monotonically():
    spec = lookup_model(QWEN)
    lines: list = []
    setup = TrainingSetup(model_id=QWEN, method="lora")
    with progress.use(lines.append):
        fm = sweep(spec, parse_hardware("8GB"), setup, batch_sizes=[1, 4, 16, 64], seq_lens=[512, 4096])
    assert fm.simulated_cells >= 2
    assert any(0 < sum(c.fits for c in r.cells) < len(r.cells) for r in fm.rows)  # a boundary inside the grid
    for row in fm.rows:
        fits = [c.fits for c in row.cells]
        # fits is a prefix: memory grows with the micro-batch
        assert fits == sorted(fits, reverse=True), fits
        k = sum(fits)
        assert row.largest_fitting_batch == (fm.batch_sizes[k - 1] if k else None)
        sim = [i for i, c in enumerate(row.cells) if c.tier == "simulated"]
        if 0 < k < len(fits):
            # both sides of the boundary were run by the simulator
            assert k - 1 in sim and k in sim, (row.max_length, sim, fits)
        for i in sim:
            c = row.cells[i]
            assert c.fits == (c.device_total_gib <= fm.usable_gib)
    # the engine reported its phases to the installed callback
    text = [x for x in lines if x]
    assert any("analytic tier" in x for x in text)
    assert any(x.startswith("simulating") and "of 24 blocks of Qwen/Qwen2.5-0.5B" in x for x in text), text
    assert lines[-1] is None  # the line is cleared at the end


def test_progress_is_a_no_op_without_a_reporter_and_nests():
    with progress.status("outer"):
        progress.note("nobody listens")  # no reporter: nothing happens, nothing fails
    seen: list = []
    with progress.use(seen.append):
        with progress.status("outer"):
            with progress.status("inner"):
                progress.note("inner 2/3")
            progress.note("outer 2/2")
    assert seen == ["outer", "inner", "inner 2/3", "outer", "outer 2/2", None, None]

    def broken(line):
        raise RuntimeError("terminal gone")

    with progress.use(broken), progress.status("still works"):
        pass
