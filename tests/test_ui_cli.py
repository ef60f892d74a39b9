"""The terminal (issue 16) through the real CLI in a subprocess: a QLoRA estimate prints nothing but
tunepilot's own output, the plan table keeps each setup on at most two lines at 80 columns (one at 160),
`--plot` writes the pictures, `sweep` prints a fit map and pure JSON with --json, and the progress line
appears on a terminal's stderr but never when stderr is not a terminal or in --json output.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LLAMA8 = "meta-llama/Llama-3.1-8B"
QWEN = "Qwen/Qwen2.5-0.5B"


def cli(*args: str, columns: int = 120, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS=str(columns))
    env.pop("TUNEPILOT_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_qlora_estimate_prints_only_tunepilots_output(tmp_path):
    """The simulated QLoRA path imports bitsandbytes (its 'kernels-community' note) and builds transformers
    and peft models (their config advice and warnings): none of it may reach the screen."""
    png = tmp_path / "qlora.png"
    r = cli("estimate", QWEN, "--method", "qlora", "--gpu", "T4", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    # stderr: only tunepilot's own notes (the T4 has no bf16), nothing from a library
    for line in r.stderr.splitlines():
        assert line.startswith("note: "), f"library chatter on stderr: {line!r}"
    out = r.stdout.splitlines()
    assert out[0] == QWEN
    assert out[1].startswith("QLoRA nf4")
    assert out[-1] == f"wrote {png}"
    for needle in ("kernels", "Failed to load", "Warning", "warn(", "deprecated", "bitsandbytes"):
        assert needle not in r.stdout + r.stderr, needle
    assert png.stat().st_size > 10_000


def _table_rows(stdout: str) -> list[list[str]]:
    """The plan table's rows: lines from a '  N  ' row start to the next one, inside the table body."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "───" in line) + 1
    rows: list[list[str]] = []
    for line in lines[start:]:
        if not line.strip():
            break
        if re.match(r"^\s{1,3}\d+\s", line):
            rows.append([line])
        else:
            rows[-1].append(line)
    return rows


@pytest.mark.parametrize("columns, max_lines", [(80, 2), (160, 1)])
def test_plan_table_fits_the_terminal(columns, max_lines, tmp_path):
    svg = tmp_path / "plan.svg"
    r = cli("plan", LLAMA8, "--gpu", "4090", "--fast", "--dataset-tokens", "10000000", "--plot", str(svg), columns=columns)
    assert r.returncode == 0, r.stderr
    rows = _table_rows(r.stdout)
    assert len(rows) >= 3
    for row in rows:
        assert len(row) <= max_lines, "\n".join(row)
    assert all(len(line) <= columns for line in r.stdout.splitlines())
    # the full description of every candidate follows the table
    assert "#1 " in r.stdout and "adamw_torch_fused" in r.stdout
    assert svg.is_file() and svg.read_text().lstrip().startswith("<?xml")


def test_estimate_fits_80_columns():
    r = cli("estimate", LLAMA8, "--method", "lora", "--gpu", "4090", "--fast", columns=80)
    assert r.returncode == 0, r.stderr
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    assert "device total (nvidia-smi)" in r.stdout


def test_sweep_table_json_and_plot(tmp_path):
    png = tmp_path / "map.png"
    r = cli("sweep", QWEN, "--gpu", "T4", "--method", "lora", "--fast", "--batch-sizes", "1,4,16,64",
            "--seq-lens", "512,2048,8192", "--plot", str(png), columns=80)
    assert r.returncode == 0, r.stderr
    assert "Fit map" in r.stdout and "max" in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    assert png.read_bytes()[:4] == b"\x89PNG"
    j = cli("sweep", QWEN, "--gpu", "T4", "--method", "lora", "--fast", "--batch-sizes", "1,4,16,64",
            "--seq-lens", "512,2048,8192", "--json")
    assert j.returncode == 0, j.stderr
    data = json.loads(j.stdout)  # nothing but JSON on stdout
    assert data["batch_sizes"] == [1, 4, 16, 64] and data["seq_lens"] == [512, 2048, 8192]
    assert [row["max_length"] for row in data["rows"]] == [512, 2048, 8192]
    for row in data["rows"]:
        fitting = [c["per_device_train_batch_size"] for c in row["cells"] if c["fits"]]
        assert row["largest_fitting_batch"] == (max(fitting) if fitting else None)
        # memory grows with the micro-batch along a row
        totals = [c["device_total_gib"] for c in row["cells"]]
        assert totals == sorted(totals)


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes: give whole numbers"),
    (["--seq-lens", "0"], "--seq-lens: give positive"),
    (["--plot", "map.pdf"], ".png or .svg"),
])
def test_sweep_errors_are_one_line(args, message):
    r = cli("sweep", QWEN, "--gpu", "T4", "--fast", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _run_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); returns (rc, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COLUMNS="100", TERM="xterm")
    env.pop("TUNEPILOT_PROGRESS", None)
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = p.stdout.read().decode()
    rc = p.wait(timeout=120)
    os.close(master)
    return rc, out, b"".join(chunks).decode(errors="replace")


def test_progress_line_on_a_terminal_only():
    rc, out, term = _run_on_a_terminal("plan", LLAMA8, "--gpu", "4090", "--fast")
    assert rc == 0
    assert "searching setups of meta-llama/Llama-3.1-8B with the analytic tier" in term
    assert "searching" not in out  # the status line never lands on stdout
    # with --json: not even on a terminal's stderr, and stdout is pure JSON
    rc, out, term = _run_on_a_terminal("plan", LLAMA8, "--gpu", "4090", "--fast", "--json")
    assert rc == 0 and json.loads(out)["fits"] is True
    assert "searching" not in term
    # stderr not a terminal: nothing
    r = cli("plan", LLAMA8, "--gpu", "4090", "--fast")
    assert r.returncode == 0 and r.stderr == ""
