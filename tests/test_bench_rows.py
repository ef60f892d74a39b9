"""bench/measurements.csv: every published row builds its model and its TrainingSetup.

The accuracy benchmark (bench/bench_accuracy.py) estimates every row; a row whose `extra` names a
field TrainingSetup does not have, whose config is neither in the catalog nor in the bench's INLINE
configs, or whose setup fails validation would only surface there, minutes into a benchmark run.
This checks the rows themselves (no estimate is run), so it takes a second or two.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "bench_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BENCH = _bench()
ROWS = BENCH.load_rows(ROOT / "bench" / "measurements.csv")


def test_row_ids_are_unique_and_every_row_names_its_source():
    ids = [r["id"] for r in ROWS]
    assert len(ids) == len(set(ids))
    for r in ROWS:
        assert r["source"].startswith("https://"), r["id"]
        assert r["where"].strip(), r["id"]
        assert float(r["measured_gib"]) > 0, r["id"]
        assert r["quantity"] in {"allocated", "reserved", "nvidia-smi", "unspecified"}, r["id"]


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_row_builds_its_model_and_setup(row):
    spec = BENCH.model_for(row["config"])
    setup = BENCH.setup_for(row, spec.model_id)
    assert setup.num_gpus == int(row["num_gpus"])
    assert setup.per_device_train_batch_size == int(row["batch"])
    assert setup.max_length == int(row["seq_len"])
    if BENCH.is_sharded(row):
        # a sharded row really asks for ZeRO, FSDP or offload (or the summary would put it among the sharded ones wrongly)
        assert setup.zero_stage or setup.fsdp != "none" or setup.offload != "none", row["id"]
    if row["config"].startswith("inline:") and row["config"].split(":", 1)[1] in BENCH.INLINE:
        cfg = BENCH.INLINE[row["config"].split(":", 1)[1]]
        assert spec.num_parameters > 0 and spec.num_parameters_method != "formula", row["id"]
        assert spec.num_hidden_layers == cfg["num_hidden_layers"] and spec.hidden_size == cfg["hidden_size"]


def test_qwen_72b_inline_config_has_the_published_size():
    # Qwen-72B is published as a 72B model (hidden 8192, 80 layers, untied 152064 vocab); the meta-device count of
    # the inline Qwen2 config with 24576 per MLP branch must land there, not at the 49152 of v1's fused field
    spec = BENCH.model_for("inline:qwen-72b")
    assert 71.5e9 < spec.num_parameters < 73.0e9
