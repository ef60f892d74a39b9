"""GPU knowledge: the catalog, tolerant name matching, hardware strings and local detection.

The catalog (`gpu_catalog.json`, beside this module) holds one `GPUSpec` per GPU model with
its source. `find_gpu` maps what people type ("4090", "rtx4090", "A100 40GB",
"NVIDIA GeForce RTX 4090") or what a driver reports ("NVIDIA A100-SXM4-80GB") to a catalog
entry; `parse_hardware` adds counts ("2x A100 80GB", "A100:2") and bare sizes ("24GB");
`detect_hardware` reads this machine's GPUs (torch.cuda, then NVML, then `nvidia-smi`).

No torch import at module level: listing and matching GPUs must stay instant.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from functools import lru_cache
from pathlib import Path

from tools.schemas import GPUSpec, HardwareSpec, TunepilotError

CATALOG_PATH = Path(__file__).with_name("gpu_catalog.json")

# A bare family name picks one variant, deterministically. Say the memory (or PCIe/SXM)
# to get another: "A100 40GB", "H100 PCIe", "V100 32GB".
DEFAULT_VARIANT = {
    "a100": "NVIDIA A100 SXM 80GB",
    "h100": "NVIDIA H100 SXM 80GB",
    "v100": "NVIDIA V100 SXM2 16GB",
}

# A GPU known only by its memory ("24GB"): conservative compute figures, stated in its source.
GENERIC_TFLOPS = 50.0
GENERIC_BANDWIDTH_GBS = 450.0

_VENDOR_WORDS = re.compile(r"\b(nvidia|geforce|tesla|quadro|amd|instinct|radeon|graphics|card)\b|\b(rtx|gtx)(?=\b|\d|a\d)")
# "80GB", "80 GB", "80G", "80GiB" after a separator (so "A10G" stays a name).
_MEMORY = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*(?:gib|gb|g)\b")
# Form-factor words: "A100 SXM 40GB" also belongs to the family "A100".
_FORM_FACTOR = re.compile(r"\b(sxm\d?|pcie|nvl|hbm\d?e?|oam)\b")
# "24GB", "24 GiB", "generic 24 GiB GPU", "24GB VRAM"
_GENERIC = re.compile(r"^\s*(generic\s+)?(\d+(?:\.\d+)?)\s*(gib|gb|g)?\s*(?:of\s+)?(?:vram|memory)?\s*(?:gpu)?\s*(?:vram|memory)?\s*$")


class UnknownGPUError(TunepilotError):
    """The GPU name matches nothing in the catalog; the message lists the closest names."""


class NoGPUError(TunepilotError):
    """No GPU is visible on this machine."""


# --------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _load_catalog() -> tuple[GPUSpec, ...]:
    data = json.loads(CATALOG_PATH.read_text(encoding="utf-8"))
    return tuple(GPUSpec.model_validate(entry) for entry in data["gpus"])


def gpu_catalog() -> list[GPUSpec]:
    """Every GPU tunepilot knows: memory as the driver reports it, dense bf16/fp16 TFLOPs, bandwidth, source."""
    return list(_load_catalog())


def _split_memory(text: str) -> tuple[str, float | None]:
    """Lower-cased text without vendor words, and the memory size it states (GB), if any."""
    t = text.lower().replace("×", "x")
    m = _MEMORY.search(t)
    mem = float(m.group(1)) if m else None
    if m:
        t = t[: m.start()] + " " + t[m.end():]
    t = _VENDOR_WORDS.sub(" ", t)
    return t, mem


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text)


@lru_cache(maxsize=1)
def _index() -> tuple[dict[str, GPUSpec], dict[str, list[tuple[GPUSpec, bool]]]]:
    """Exact keys (with memory) -> GPU; family keys (memory, and form factor, stripped) -> [(GPU, direct)].

    'direct' marks a GPU that has a spelling with exactly that key ('A100' for the A100 SXM 80GB),
    as opposed to one that only belongs to the family ('A100 SXM 40GB' in family 'a100').
    """
    exact: dict[str, GPUSpec] = {}
    family: dict[str, list[tuple[GPUSpec, bool]]] = {}

    def add(key: str, gpu: GPUSpec, direct: bool) -> None:
        bucket = family.setdefault(key, [])
        for i, (g, d) in enumerate(bucket):
            if g is gpu:
                bucket[i] = (g, d or direct)
                return
        bucket.append((gpu, direct))

    for gpu in _load_catalog():
        for spelling in [gpu.name, *gpu.aliases]:
            t, mem = _split_memory(spelling)
            base = _key(t)
            exact.setdefault(base + (f"{mem:g}gb" if mem is not None else ""), gpu)
            add(base, gpu, True)
            bare = _key(_FORM_FACTOR.sub(" ", t))
            if bare and bare != base:
                add(bare, gpu, False)
    return exact, family


def _pick(base: str, candidates: list[tuple[GPUSpec, bool]], mem: float | None, text: str) -> GPUSpec:
    """One GPU of a family: the variant whose memory matches the stated size, else the default."""
    if mem is not None:
        close = [(g, d) for g, d in candidates if abs(g.memory_gib - mem) <= 0.1 * mem]
        if not close:
            have = ", ".join(sorted({g.name for g, _ in candidates}))
            raise UnknownGPUError(f"no {text.strip()!r} in the GPU catalog: known variants are {have}; "
                                  "fix the memory size or pass a generic size like '24GB'")
        candidates = sorted(close, key=lambda c: abs(c[0].memory_gib - mem))
    default = DEFAULT_VARIANT.get(base)
    for g, _ in candidates:
        if g.name == default:
            return g
    for g, direct in candidates:
        if direct:
            return g
    return candidates[0][0]


def generic_gpu(memory_gib: float) -> GPUSpec:
    """A stand-in GPU known only by its memory, with conservative compute figures."""
    if memory_gib <= 0 or memory_gib > 4096:
        raise UnknownGPUError(f"GPU memory {memory_gib:g} GB is not plausible; give a size like '24GB' or a GPU name like 'RTX 4090'")
    return GPUSpec(
        name=f"generic {memory_gib:g} GiB GPU",
        aliases=[],
        vendor="unknown",
        memory_gib=float(memory_gib),
        compute_capability=None,
        bf16=True,
        fp16_tflops=GENERIC_TFLOPS,
        bf16_tflops=GENERIC_TFLOPS,
        fp32_tflops=GENERIC_TFLOPS / 4,
        memory_bandwidth_gbs=GENERIC_BANDWIDTH_GBS,
        source=(f"not a catalog GPU: {memory_gib:g} GiB as stated; assumes bf16 support (Ampere or newer) and a "
                f"conservative {GENERIC_TFLOPS:g} dense TFLOPs / {GENERIC_BANDWIDTH_GBS:g} GB/s; name the GPU for real figures"),
    )


def _suggestions(text: str, n: int = 3) -> list[str]:
    exact, _ = _index()
    t, _mem = _split_memory(text)
    q = _key(t) or _key(text.lower())
    by_key: dict[str, str] = {}
    for k, g in exact.items():
        by_key.setdefault(k, g.name)
    names: list[str] = []
    for k in difflib.get_close_matches(q, list(by_key), n=8, cutoff=0.5):
        if by_key[k] not in names:
            names.append(by_key[k])
    if len(names) < n and q:
        for k, name in by_key.items():
            if (q in k or k in q) and name not in names:
                names.append(name)
    return names[:n]


def find_gpu(text: str) -> GPUSpec:
    """The catalog GPU for a name as typed or as a driver reports it ('4090', 'A100 40GB', 'NVIDIA H100 80GB HBM3').

    A bare family name picks one variant: 'A100' -> A100 SXM 80GB, 'H100' -> H100 SXM 80GB,
    'V100' -> V100 SXM2 16GB; add the memory or form factor for another. A bare size
    ('24GB') gives a generic GPU of that memory with conservative compute figures.
    Raises UnknownGPUError with the closest catalog names.
    """
    if not isinstance(text, str) or not text.strip():
        raise UnknownGPUError("GPU name is empty: give a GPU like 'RTX 4090', 'A100 80GB' or a memory size like '24GB'")
    exact, family = _index()
    generic = _GENERIC.match(text.lower())
    if generic and (generic.group(1) or generic.group(3)):
        return generic_gpu(float(generic.group(2)))
    t, mem = _split_memory(text)
    base = _key(t)
    full = base + (f"{mem:g}gb" if mem is not None else "")
    if full in exact:
        return exact[full]
    if base in family:
        return _pick(base, family[base], mem, text)
    # plural ("A100s") and trailing words ("4090 founders edition", "H100 SXM5 HBM3"):
    if base.endswith("s") and base[:-1] in family:
        return _pick(base[:-1], family[base[:-1]], mem, text)
    # ...but a laptop/mobile part is a different, slower GPU than the desktop card it is named after
    inside = [k for k in family if len(k) >= 3 and base.startswith(k) and not base[len(k):][:1].isdigit()
              and not base[len(k):].startswith(("laptop", "mobile", "maxq", "notebook"))]
    if inside:
        k = max(inside, key=len)
        return _pick(k, family[k], mem, text)
    hint = _suggestions(text)
    did_you_mean = f"; did you mean {', '.join(repr(s) for s in hint)}?" if hint else ""
    raise UnknownGPUError(f"unknown GPU {text.strip()!r}{did_you_mean} "
                          "(`tunepilot gpus` lists all; a bare size like '24GB' also works)")


# --------------------------------------------------------------------------------------
# Hardware strings
# --------------------------------------------------------------------------------------

_COUNT_PREFIX = re.compile(r"^\s*(\d{1,4})\s*(?:x|×|\*)\s*(.+?)\s*$", re.IGNORECASE)
_COUNT_PREFIX_WORD = re.compile(r"^\s*(\d{1,3})\s+([a-z].*?)\s*$", re.IGNORECASE)
_COUNT_SUFFIX = re.compile(r"^\s*(.+?)\s*(?:x|×|\*|:)\s*(\d{1,4})\s*$", re.IGNORECASE)
_NODES = re.compile(r"[\s,;(]*(?:on|across|over|x)?\s*(\d{1,4})\s*(?:nodes?|machines?|hosts?)\b[\s)]*", re.IGNORECASE)
_PER_NODE = re.compile(r"\s*(?:per|/|each)\s*(?:node|machine|host)\b", re.IGNORECASE)


def _is_gpu(text: str) -> bool:
    try:
        find_gpu(text)
    except UnknownGPUError:
        return False
    return True


def parse_hardware(text: str) -> HardwareSpec:
    """Hardware from a string: '2x A100 80GB', '2 x 4090', '4xH100', '8*H100', 'A100:2', 'RTX 4090', '24GB', '2x24GB'.

    Nodes: '16x H100 on 2 nodes' (total count) or '8x H100 per node, 2 nodes' (per-node count).
    Raises UnknownGPUError (did-you-mean) or TunepilotError naming the part it cannot read.
    """
    if not isinstance(text, str) or not text.strip():
        raise TunepilotError("hardware is empty: give e.g. 'RTX 4090', '2x A100 80GB' or '24GB'")
    rest = text.strip()
    nodes = 1
    m = _NODES.search(rest)
    if m:
        nodes = int(m.group(1))
        rest = (rest[: m.start()] + " " + rest[m.end():]).strip(" ,;")
    per_node = bool(_PER_NODE.search(rest))
    rest = _PER_NODE.sub(" ", rest).strip(" ,;")
    count = 1
    readings = []  # (count, gpu text): "2x A100" and "5090x2" read both ways, keep the one naming a GPU
    m = _COUNT_PREFIX.match(rest)
    if m:
        readings.append((int(m.group(1)), m.group(2)))
    m = _COUNT_SUFFIX.match(rest)
    if m:
        readings.append((int(m.group(2)), m.group(1)))
    if not readings:
        m = _COUNT_PREFIX_WORD.match(rest)
        if m and not _is_gpu(rest):  # "2 A100", but "3090 Ti" is one GPU
            readings.append((int(m.group(1)), m.group(2)))
    if readings:
        good = [r for r in readings if _is_gpu(r[1])]
        if good:
            count, rest = good[0]
        elif not _is_gpu(rest):  # "RTX 4090" also reads as "RT" x 4090: the whole text wins
            count, rest = readings[0]
    if count < 1:
        raise TunepilotError(f"hardware {text!r}: GPU count must be at least 1")
    if nodes < 1:
        raise TunepilotError(f"hardware {text!r}: node count must be at least 1")
    total = count * nodes if per_node else count
    if nodes > total:
        raise TunepilotError(f"hardware {text!r}: {nodes} nodes but only {total} GPUs; give the total GPU count, e.g. '16x H100 on 2 nodes'")
    gpu = find_gpu(rest)
    return HardwareSpec(gpu=gpu, num_gpus=total, num_nodes=nodes)


# --------------------------------------------------------------------------------------
# Local detection
# --------------------------------------------------------------------------------------


def host_ram_gib() -> float:
    """Total host RAM in GiB (from /proc/meminfo, else sysconf); 0.0 when it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 2)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 2)
    except (AttributeError, ValueError, OSError):
        return 0.0


def _visible(rows: list[tuple[str, float, float | None]]) -> list[tuple[str, float, float | None]]:
    """Apply CUDA_VISIBLE_DEVICES (integer indices only) to rows listed by the driver."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return rows
    picked = []
    for part in cvd.split(","):
        part = part.strip()
        if not part.isdigit():  # UUIDs / MIG names: cannot map, keep everything
            return rows if part else picked
        if int(part) < len(rows):
            picked.append(rows[int(part)])
    return picked


# Device nodes a GPU driver creates (NVIDIA, AMD ROCm, WSL). Without any of them, importing
# torch only to hear "no CUDA" costs seconds, so detection skips it.
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg", "/proc/driver/nvidia")


def _from_torch() -> list[tuple[str, float, float | None]] | None:
    import importlib.util
    import sys

    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_DEVICE_NODES):
        return None
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    rows = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, _total = torch.cuda.mem_get_info(i)
        rows.append((props.name, props.total_memory / 1024**3, free / 1024**3))
    return rows


def _from_nvml() -> list[tuple[str, float, float | None]] | None:
    try:
        import pynvml  # provided by the nvidia-ml-py package
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: try the next source
        return None
    try:
        rows = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            if isinstance(name, bytes):
                name = name.decode()
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            rows.append((name, mem.total / 1024**3, mem.free / 1024**3))
        return _visible(rows)
    finally:
        pynvml.nvmlShutdown()


def _from_nvidia_smi(timeout: float) -> list[tuple[str, float, float | None]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            continue
        name, total, free = parts
        try:
            rows.append((name, float(total) / 1024, float(free) / 1024))
        except ValueError:  # "[N/A]" and the like
            continue
    return _visible(rows)


def _spec_for_detected(name: str, total_gib: float) -> GPUSpec:
    """Catalog entry for a driver-reported name, carrying the measured total memory."""
    try:
        gpu = find_gpu(name)
    except UnknownGPUError:
        t, _mem = _split_memory(name)
        try:
            gpu = find_gpu(t) if _key(t) else generic_gpu(round(total_gib, 2))
        except UnknownGPUError:
            gpu = generic_gpu(round(total_gib, 2)).model_copy(update={"name": f"{name} (not in catalog)"})
    return gpu.model_copy(update={"memory_gib": round(total_gib, 2)})


def detect_hardware(*, sources: tuple[str, ...] = ("torch", "nvml", "nvidia-smi"), timeout: float = 5.0) -> HardwareSpec:
    """The GPUs of this machine (torch.cuda, else NVML, else nvidia-smi), mapped to the catalog, with free memory and host RAM.

    With different GPU models, the most common model is reported (HardwareSpec assumes identical GPUs).
    Raises NoGPUError when none is visible.
    """
    readers = {"torch": _from_torch, "nvml": _from_nvml, "nvidia-smi": lambda: _from_nvidia_smi(timeout)}
    rows = None
    for source in sources:
        if source not in readers:
            raise TunepilotError(f"sources: unknown GPU detection source {source!r}; use torch, nvml or nvidia-smi")
        rows = readers[source]()
        if rows:
            break
    if not rows:
        raise NoGPUError("no GPU found on this machine; pass --gpu like 'RTX 4090' or '2x A100 80GB'")
    name = Counter(r[0] for r in rows).most_common(1)[0][0]
    mine = [r for r in rows if r[0] == name]
    gpu = _spec_for_detected(name, min(r[1] for r in mine))
    free = [round(r[2], 2) for r in mine] if all(r[2] is not None for r in mine) else None
    ram = host_ram_gib()
    return HardwareSpec(gpu=gpu, num_gpus=len(mine), num_nodes=1, free_memory_gib=free,
                        host_ram_gib=ram or None, detected=True)


# --------------------------------------------------------------------------------------
# GPUs named in free text
# --------------------------------------------------------------------------------------

_WORD_NUMBERS = {"one": 1, "a single": 1, "single": 1, "two": 2, "three": 3, "four": 4, "six": 6, "eight": 8, "sixteen": 16,
                 "한": 1, "두": 2, "세": 3, "네": 4, "여덟": 8}


def hardware_in_text(text: str) -> tuple[Optional[str], Optional[str], Optional[int]]:
    """The GPUs a person's message (or a model's argument) names: the longest catalog name or alias found as whole words, its memory
    size when written next to it ("A100 40GB"), and the count before or after it ("2x", "two", "x4",
    "4 GPUs", "두 장"). A message naming two different GPUs ("an A100 or my 4090?") names no one
    hardware: (None, None, None)."""
    low = text.lower()
    hits: list[tuple[int, int, int, str]] = []
    for g in gpu_catalog():
        for name in [g.name, *g.aliases]:
            words = re.findall(r"[a-z0-9]+", name.lower())
            if not words:
                continue
            pattern = r"(?<![a-z0-9])" + r"[\s\-]*".join(map(re.escape, words)) + r"(?:s|es)?(?![a-z0-9])"
            for m in re.finditer(pattern, low):
                hits.append((m.end() - m.start(), m.start(), m.end(), g.name))
    if not hits:
        return None, None, None
    taken: list[tuple[int, int, int, str]] = []
    for hit in sorted(hits, key=lambda h: (-h[0], h[1])):  # longest first, no overlaps
        if not any(hit[1] < t[2] and t[1] < hit[2] for t in taken):
            taken.append(hit)
    if len({t[3] for t in taken}) > 1:
        return None, None, None
    _length, start, end, name = min(taken, key=lambda t: t[1])
    size = re.match(r"\s*(?:sxm\d?|pcie|nvl)?\s*\(?\s*(\d{2,3})\s*gb", low[end:])
    if size:
        try:
            name = parse_hardware(f"{low[start:end]} {size.group(1)}GB").gpu.name
        except UnknownGPUError:
            pass
        end += size.end()
    words = "|".join(sorted((re.escape(w) for w in _WORD_NUMBERS), key=len, reverse=True))
    before, after = low[max(0, start - 40):start], low[end:end + 40]
    n = 1
    m = (re.search(r"(\d{1,3})\s*[x×*]\s*(?:nvidia\s+|geforce\s+|rtx\s+)*$", before)
         or re.search(rf"(?<![a-z])({words})\s+(?:nvidia\s+|geforce\s+|rtx\s+)*$", before)
         or re.match(r"\s*(?:s\b|gpus?\b|cards?\b)?\s*[x×*]\s*(\d{1,3})\b", after)
         or re.match(rf"\s*(?:gpu|카드)?\s*(\d{{1,2}}|{words})\s*(?:장|대|개)", after))
    if m is None:
        m = re.search(r"(?<![\w.])(\d{1,3})\s*(?:gpus|cards)\b", low)
    if m:
        word = m.group(1)
        n = int(word) if word.isdigit() else _WORD_NUMBERS.get(word, 1)
    n = max(1, min(n, 1024))
    return (f"{n}x {name}" if n > 1 else name), name, n
