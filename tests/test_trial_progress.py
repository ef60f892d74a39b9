"""Trial progress (issue 16): while a real trial of a tiny Llama runs on CPU, the executor reads the
child's log and reports each step with its loss and tokens/s through tools.progress; without a
reporter nothing is read or shown.
"""

from __future__ import annotations

import re

import pytest

from _script_helpers import shared_assets
from tools import progress
from tools.schemas import TrainingSetup
from tools.trial import StepWatcher, run_trial


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.mark.slow
def test_a_real_trial_reports_its_steps_with_tokens_per_second(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir, text, _ = assets
    setup = TrainingSetup(model_id="tiny-llama", method="lora", max_length=32, per_device_train_batch_size=2)
    lines: list = []
    with progress.use(lines.append):
        report = run_trial(setup, steps=3, timeout=300, workdir=tmp_path / "w", model_path=str(model_dir), dataset=str(text))
    assert report.ok, (report.error_kind, report.error_message)
    shown = [x for x in lines if x]
    assert shown[0].startswith("trial run of LoRA")
    steps = [x for x in shown if x.startswith("trial step")]
    # the child's steps seen in order, the last with a rate (the poll may see two steps at once)
    nums = [int(re.match(r"trial step (\d)/3", x).group(1)) for x in steps]
    assert nums == sorted(nums) and nums[-1] == 3, steps
    assert re.search(r"loss \d+\.\d{3}, [\d,]+ tokens/s$", steps[-1]), steps[-1]
    assert lines[-1] is None


def test_step_watcher_reads_whole_lines_only(tmp_path):
    log = tmp_path / "trial.log"
    seen: list = []
    w = StepWatcher(log, steps=2, tokens_per_step=64)
    with progress.use(seen.append), progress.status("trial"):
        log.write_text(" 50%|#####     | 1/2 [00:01<00:01]\r{'loss': '2.5', 'grad_norm': 1.0}\n{'lo", encoding="utf-8")
        w()
        with log.open("a", encoding="utf-8") as f:
            f.write("ss': 2.25, 'epoch': 1.0}\n")
        w()
    steps = [x for x in seen if x and x.startswith("trial step")]
    assert steps[0] == "trial step 1/2, loss 2.500"
    assert steps[1].startswith("trial step 2/2, loss 2.250, ") and steps[1].endswith(" tokens/s")
