"""GPU catalog, name matching, hardware strings, local detection and the `gpus` command."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tools.gpus import (
    NoGPUError,
    UnknownGPUError,
    detect_hardware,
    find_gpu,
    gpu_catalog,
    host_ram_gib,
    parse_hardware,
)
from tools.schemas import GPUSpec, TunepilotError

REPO = Path(__file__).resolve().parents[1]


def _has_gpu() -> bool:
    """A driver is installed (cheap check: no torch import at collection time)."""
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg", "/proc/driver/nvidia")
    return bool(shutil.which("nvidia-smi")) or any(os.path.exists(p) for p in nodes)


# --------------------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------------------


def test_catalog_is_large_and_every_entry_is_sane():
    cat = gpu_catalog()
    assert len(cat) >= 30
    names = [g.name for g in cat]
    assert len(names) == len(set(names)), "duplicate GPU names"
    for g in cat:
        assert 4 <= g.memory_gib <= 256, g.name
        assert 10 <= g.fp16_tflops <= 5000, g.name
        assert g.memory_bandwidth_gbs > 100, g.name
        assert g.source and len(g.source) > 20, f"{g.name}: source must say where the figures come from"
        assert (g.bf16_tflops is not None) == g.bf16, f"{g.name}: bf16_tflops must be set exactly when bf16 is supported"
        if g.vendor == "NVIDIA":
            assert g.compute_capability and re.fullmatch(r"\d+\.\d", g.compute_capability), g.name
            cc = float(g.compute_capability)
            assert g.bf16 == (cc >= 8.0), f"{g.name}: bf16 support follows compute capability 8.0+"
        # a "NNGB" in the name is the marketed size; the driver total is a little below or equal
        m = re.search(r"(\d+)GB", g.name)
        if m:
            assert 0.9 * int(m.group(1)) <= g.memory_gib <= int(m.group(1)) + 0.01, g.name


@pytest.mark.parametrize("name", ["T4", "V100", "V100 32GB", "P100", "RTX 2080 Ti"])
def test_pre_ampere_gpus_have_no_bf16(name):
    assert find_gpu(name).bf16 is False


def test_dense_not_sparse_tflops_for_known_datasheets():
    # datasheet dense figures (the sparse ones are exactly twice these)
    assert find_gpu("H100").bf16_tflops == pytest.approx(989.4)
    assert find_gpu("A100").bf16_tflops == pytest.approx(312)
    assert find_gpu("4090").bf16_tflops == pytest.approx(165.2)  # FP32-accumulate rate
    assert find_gpu("T4").fp16_tflops == pytest.approx(65)


@pytest.mark.parametrize("name,mib", [("A100 80GB", 81920), ("H100", 81559), ("4090", 24564), ("T4", 15360),
                                      ("A10G", 23028), ("L4", 23034), ("H200", 143771)])
def test_memory_is_what_nvidia_smi_reports(name, mib):
    assert find_gpu(name).memory_gib == pytest.approx(mib / 1024, abs=0.01)


def test_every_alias_finds_its_own_gpu():
    for g in gpu_catalog():
        for spelling in [g.name, *g.aliases]:
            found = find_gpu(spelling)
            # a bare family alias like "A100" may pick the family default, which must carry it too
            assert found.name == g.name or spelling in found.aliases, (spelling, g.name, found.name)


# --------------------------------------------------------------------------------------
# find_gpu / parse_hardware
# --------------------------------------------------------------------------------------

FIND = [
    ("4090", "NVIDIA RTX 4090"),
    ("rtx4090", "NVIDIA RTX 4090"),
    ("RTX 4090", "NVIDIA RTX 4090"),
    ("nvidia geforce rtx 4090", "NVIDIA RTX 4090"),
    ("NVIDIA GeForce RTX 4090", "NVIDIA RTX 4090"),
    ("a100", "NVIDIA A100 SXM 80GB"),
    ("A100 40GB", "NVIDIA A100 SXM 40GB"),
    ("A100-40G", "NVIDIA A100 SXM 40GB"),
    ("a100 pcie", "NVIDIA A100 PCIe 80GB"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM 80GB"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 PCIe 80GB"),
    ("H100", "NVIDIA H100 SXM 80GB"),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM 80GB"),
    ("h100 pcie", "NVIDIA H100 PCIe 80GB"),
    ("H100 NVL", "NVIDIA H100 NVL 94GB"),
    ("a10g", "NVIDIA A10G"),
    ("A10", "NVIDIA A10"),
    ("t4", "NVIDIA T4"),
    ("Tesla T4", "NVIDIA T4"),
    ("Tesla V100-SXM2-16GB", "NVIDIA V100 SXM2 16GB"),
    ("V100 32GB", "NVIDIA V100 SXM2 32GB"),
    ("3090", "NVIDIA RTX 3090"),
    ("3090 Ti", "NVIDIA RTX 3090 Ti"),
    ("RTX A6000", "NVIDIA RTX A6000"),
    ("NVIDIA RTX 6000 Ada Generation", "NVIDIA RTX 6000 Ada"),
    ("L40S", "NVIDIA L40S"),
    ("l40", "NVIDIA L40"),
    ("L4", "NVIDIA L4"),
    ("NVIDIA GH200 480GB", "NVIDIA GH200 96GB"),
    ("mi300x", "AMD Instinct MI300X"),
    ("B200", "NVIDIA B200"),
    ("A100s", "NVIDIA A100 SXM 80GB"),
]


@pytest.mark.parametrize("text,name", FIND)
def test_find_gpu_spellings(text, name):
    assert find_gpu(text).name == name


HARDWARE = [
    ("2x A100 80GB", "NVIDIA A100 SXM 80GB", 2, 1),
    ("2 x 4090", "NVIDIA RTX 4090", 2, 1),
    ("4xH100", "NVIDIA H100 SXM 80GB", 4, 1),
    ("8*H100", "NVIDIA H100 SXM 80GB", 8, 1),
    ("A100:2", "NVIDIA A100 SXM 80GB", 2, 1),
    ("RTX 4090 x2", "NVIDIA RTX 4090", 2, 1),
    ("5090x2", "NVIDIA RTX 5090", 2, 1),
    ("4 × L40S", "NVIDIA L40S", 4, 1),
    ("2 A100 40GB", "NVIDIA A100 SXM 40GB", 2, 1),
    ("RTX 4090", "NVIDIA RTX 4090", 1, 1),
    ("3090 Ti", "NVIDIA RTX 3090 Ti", 1, 1),
    ("16x H100 on 2 nodes", "NVIDIA H100 SXM 80GB", 16, 2),
    ("8x H100 per node, 2 nodes", "NVIDIA H100 SXM 80GB", 16, 2),
    ("24GB", "generic 24 GiB GPU", 1, 1),
    ("2x24GB", "generic 24 GiB GPU", 2, 1),
    ("48 GB", "generic 48 GiB GPU", 1, 1),
]


@pytest.mark.parametrize("text,name,count,nodes", HARDWARE)
def test_parse_hardware(text, name, count, nodes):
    hw = parse_hardware(text)
    assert (hw.gpu.name, hw.num_gpus, hw.num_nodes, hw.detected) == (name, count, nodes, False)


def test_generic_gpu_has_stated_memory_and_conservative_compute():
    g = parse_hardware("24GB").gpu
    assert g.memory_gib == 24.0
    assert "generic" in g.name and "conservative" in g.source
    assert g.fp16_tflops < find_gpu("RTX 4090").fp16_tflops
    # the generic name round-trips (a setup stores it in `gpu`)
    assert find_gpu(g.name) == g


@pytest.mark.parametrize("text,suggested", [("rtx 4900", "NVIDIA RTX 4090"), ("mi300", "AMD Instinct MI300X"),
                                            ("H10", "NVIDIA H100 SXM 80GB")])
def test_unknown_gpu_suggests_the_closest(text, suggested):
    with pytest.raises(UnknownGPUError) as e:
        find_gpu(text)
    msg = str(e.value)
    assert "did you mean" in msg and suggested in msg and "\n" not in msg


def test_wrong_memory_variant_lists_the_real_ones():
    with pytest.raises(UnknownGPUError, match="A100 SXM 40GB.*A100 SXM 80GB|A100 PCIe 40GB"):
        find_gpu("A100 24GB")


@pytest.mark.parametrize("text", ["", "   ", "0x A100", "gtx 9999 turbo", "RTX 4090 Laptop GPU"])
def test_bad_hardware_strings_raise_one_clear_error(text):
    with pytest.raises(TunepilotError) as e:
        parse_hardware(text)
    assert str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------
# detection (real subprocess against a fake nvidia-smi placed first on PATH)
# --------------------------------------------------------------------------------------


def _fake_smi(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return tmp_path


def test_detect_hardware_reads_nvidia_smi(tmp_path, monkeypatch):
    args = tmp_path / "args.txt"
    _fake_smi(tmp_path, f'echo "$@" > {args}\n'
                        'echo "NVIDIA A100-SXM4-80GB, 81920, 80000"\n'
                        'echo "NVIDIA A100-SXM4-80GB, 81920, 40960"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hw = detect_hardware(sources=("nvidia-smi",))
    assert "--query-gpu=name,memory.total,memory.free" in args.read_text()
    assert hw.detected and hw.num_gpus == 2 and hw.gpu.name == "NVIDIA A100 SXM 80GB"
    assert hw.gpu.memory_gib == pytest.approx(80.0)
    assert hw.free_memory_gib == [pytest.approx(78.12, abs=0.01), pytest.approx(40.0, abs=0.01)]
    assert hw.host_ram_gib and hw.host_ram_gib > 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    hw = detect_hardware(sources=("nvidia-smi",))
    assert hw.num_gpus == 1 and hw.free_memory_gib == [pytest.approx(40.0, abs=0.01)]


def test_detect_hardware_uncatalogued_and_mixed_gpus(tmp_path, monkeypatch):
    _fake_smi(tmp_path, 'echo "NVIDIA GeForce RTX 4090, 24564, 20000"\n'
                        'echo "Quadro RTX 8000, 46080, 46000"\n'
                        'echo "Quadro RTX 8000, 46080, 46000"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hw = detect_hardware(sources=("nvidia-smi",))
    # the most common model wins; an uncatalogued GPU keeps its real name and measured memory
    assert hw.num_gpus == 2 and "Quadro RTX 8000" in hw.gpu.name and "not in catalog" in hw.gpu.name
    assert hw.gpu.memory_gib == pytest.approx(45.0)


def test_detect_hardware_failing_nvidia_smi_means_no_gpu(tmp_path, monkeypatch):
    _fake_smi(tmp_path, 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver" >&2\nexit 9\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(NoGPUError, match="no GPU found on this machine; pass --gpu"):
        detect_hardware(sources=("nvidia-smi",))


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_detect_hardware_without_gpu_raises_no_gpu_error():
    with pytest.raises(NoGPUError) as e:
        detect_hardware()
    assert "--gpu" in str(e.value)


def test_unknown_detection_source_is_named():
    with pytest.raises(TunepilotError, match="sources"):
        detect_hardware(sources=("rocm-smi",))


def test_host_ram_is_read():
    assert 0.5 < host_ram_gib() < 65536


@pytest.mark.gpu
def test_detect_hardware_on_a_real_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    hw = detect_hardware()
    total = torch.cuda.get_device_properties(0).total_memory / 1024**3
    assert hw.detected and hw.num_gpus == torch.cuda.device_count()
    assert hw.gpu.memory_gib == pytest.approx(total, abs=0.05)
    print(hw.gpu.name, hw.gpu.memory_gib, hw.free_memory_gib)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_gpus_json_lists_the_catalog():
    r = _cli("gpus", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data) >= 25
    specs = [GPUSpec.model_validate(d) for d in data]
    mem = [s.memory_gib for s in specs]
    assert mem == sorted(mem, reverse=True)


def test_cli_gpus_table():
    r = _cli("gpus")
    assert r.returncode == 0, r.stderr
    assert "NVIDIA RTX 4090" in r.stdout and "NVIDIA T4" in r.stdout and "989.4" in r.stdout


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_cli_gpus_local_without_gpu_is_one_line_exit_2():
    r = _cli("gpus", "--local")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no GPU found" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""
