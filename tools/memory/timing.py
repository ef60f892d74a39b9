"""Step time from the dry run's op trace: a per-op roofline over FLOPs and bytes moved.

The memory tracker (`MemoryTracker`) sees every top-level aten op of the simulated training
step with its real shapes and dtypes. With its op observer switched on (`OpTrace`), each op is
turned into one GPU-independent cost record:

    (phase, op class, dtype, FLOPs, bytes moved, tile efficiency, causal)

and identical records are counted, so a trace is a few hundred entries however deep the model.
FLOPs come from `torch.utils.flop_counter`'s formula registry (the same numbers
`FlopCounterMode` reports: mm/addmm/bmm/baddbmm, SDPA flash/efficient forward and backward),
plus the CPU flash-attention ops the dry run dispatches (counted with the same SDPA formulas).
Bytes moved are the bytes of every tensor an op reads and every tensor it writes (broadcast
dimensions counted once, in-place arguments read and written); gathers (embedding,
index_select, nll_loss) read only the rows they gather. Views and allocations cost nothing.

Time per op on a given GPU (`op_seconds`):

    max(FLOPs / (peak(dtype) x eff(op class, GPU) x tile),  bytes / (bandwidth x MEMORY_EFF),  LAUNCH_FLOOR_S)

summed over forward, recompute (gradient checkpointing), backward and the optimizer step, then
extrapolated over the blocks like memory (k and k+1 blocks -> linear in depth). Communication
(DDP all-reduce, ZeRO/FSDP all-gather and reduce-scatter) runs over NVLink or PCIe as the GPU
catalog says, with the overlap the engines achieve; offloaded parameters and optimizer steps
cross PCIe. Every factor is stated below with its source; none is fitted to the benchmark
(bench/bench_throughput.py reports the error honestly, with a held-out split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

# --------------------------------------------------------------------------------------
# Efficiency factors (stated, with sources). Fractions of the catalog's dense peak / bandwidth.
# --------------------------------------------------------------------------------------

# Tensor-core GEMMs: the Maximum Achievable Matmul FLOPS (MAMF) of large BF16 matmuls, measured
# per accelerator (Stas Bekman, "Machine Learning Engineering", compute/accelerator, MAMF
# comparison table: mean of 100 iterations at the best shape found by mamf-finder.py).
MAMF_BY_GPU: dict[str, float] = {
    "NVIDIA A100 SXM 80GB": 271.2 / 312,   # 86.9%
    "NVIDIA A100 SXM 40GB": 271.2 / 312,
    "NVIDIA A100 PCIe 80GB": 252.9 / 312,  # 81.1%
    "NVIDIA A100 PCIe 40GB": 252.9 / 312,
    "NVIDIA H100 SXM 80GB": 794.5 / 989,   # 80.3%
    "NVIDIA H200 SXM 141GB": 794.5 / 989,  # "H200 is the same"
    "NVIDIA GH200 96GB": 828.6 / 989,      # 83.8%
    "NVIDIA B200": 1745.0 / 2250,          # 77.6%
    "AMD Instinct MI300X": 668.4 / 1300,   # 51.4% (PyTorch TunableOp on)
}
MAMF_SOURCE = ("MAMF table (Stas Bekman, ml-engineering, compute/accelerator/README.md): BF16 matmul A100 SXM 271.2/312, "
               "A100 PCIe 252.9/312, H100 SXM 794.5/989 (H200 the same), GH200 828.6/989, B200 1745/2250, MI300X 668.4/1300")
# A second, independent set of measurements: the torch-performance-test-data table (zzc0721 on GitHub,
# database.md: torch.matmul of square bf16/fp16/fp32 matrices up to 10240, best size, one row per
# contributed machine). Where it has a GPU the MAMF table lacks, its median over the machines is used
# (TFLOPs measured / dense spec TFLOPs of the catalog):
#   RTX 4090 bf16 170.06, 173.31, 162.39, 163.09 -> 166.6 / 165.2;  RTX 3090 76.34, 76.68, 76.58 -> 76.58 / 71;
#   RTX 5090 236.03, 242.18 -> 239.1 / 209.5;  RTX A6000 123.34 / 154.8;  L40S 269.15 / 362.05;
#   T4 fp16 41.91, 42.71 -> 42.31 / 65;  V100S fp16 88.92 / 130 (the Volta class below).
# GeForce boards exceed their spec-sheet rate: NVIDIA rates them at the base boost clock and GPU Boost
# runs them above it while power allows; professional and datacenter boards at a fixed power limit
# fall short of theirs (A6000 80%, L40S 74%).
MEASURED_MATMUL_EFF: dict[str, float] = {
    "NVIDIA RTX 4090": 166.6 / 165.2,
    "NVIDIA RTX 3090": 76.58 / 71.0,
    "NVIDIA RTX 5090": 239.1 / 209.5,
    "NVIDIA RTX A6000": 123.34 / 154.8,
    "NVIDIA L40S": 269.15 / 362.05,
    "NVIDIA T4": 42.31 / 65.0,
}
MEASURED_SOURCE = ("torch-performance-test-data (github.com/zzc0721/torch-performance-test-data, database.md): torch.matmul "
                   "bf16 (fp16 on T4/V100) best of square sizes <= 10240, median over contributed machines")
# GPUs neither table has a row for: the class default (stated): GeForce boards at the lowest GeForce
# ratio measured there (RTX 4060 Ti 16GB bf16 42.65 / 44.1 = 0.97); workstation/pro Ampere at the
# A6000's, pro Ada at the L40S's; PCIe Hopper below the SXM part (75%, assumed); Volta at the V100S's;
# 70-75 W cards (L4) throttle their clocks under sustained tensor load (55%, assumed); MI300X as measured.
GEFORCE_MATMUL_EFF = 0.97
# Datacenter boards whose FP16/BF16 tensor rate with FP32 accumulate is half the FP16-accumulate rate,
# like GeForce (L40 datasheet: 181.05 vs 362.1 dense): training GEMMs draw about half the tensor-core
# power of a full-rate part at the same clock, so the board's power limit does not pull its clock below
# the rated boost (unlike the full-rate L40S, 74% measured): taken at the GeForce ratio (assumed).
HALF_RATE_ACCUMULATE = {"NVIDIA L40"}
MATMUL_EFF_BY_CLASS: dict[str, float] = {
    "blackwell": 1745.0 / 2250, "hopper": 0.75, "ampere_dc": 252.9 / 312, "ampere": 123.34 / 154.8,
    "ada": 269.15 / 362.05, "blackwell_consumer": GEFORCE_MATMUL_EFF, "volta": 88.92 / 130, "turing": 0.75,
    "low_power": 0.55, "pascal": 0.60, "cdna3": 668.4 / 1300, "generic": 0.70,
}
# Non-tensor-core FP32 (fp32 training without TF32, which PyTorch leaves off for matmuls): SGEMM
# reaches most of the FP32 rate on datacenter parts (A100 19.18 / 19.5, V100S 13.55 / 16.4 in the table
# above: 0.85 taken); GA10x/AD10x/GB20x count a second FP32 datapath that GEMMs rarely fill (half of it
# shared with INT32): RTX 4090 55 / 82.6, RTX 3090 24.6 / 35.6, RTX 5090 68 / 104.8 measured -> 0.65.
FP32_MATMUL_EFF: dict[str, float] = {"ampere": 0.65, "ada": 0.65, "blackwell_consumer": 0.65}
FP32_MATMUL_EFF_DEFAULT = 0.85

# Flash attention (PyTorch SDPA's flash kernels = FlashAttention-2; transformers' flash_attention_2):
# FlashAttention-2 paper (Dao 2023): forward 50-73% of the A100's peak, backward lower (up to 63%)
# -> 0.60 / 0.50 on Ampere/Ada; FlashAttention-3 paper (Shah et al. 2024): "FlashAttention-2
# achieving only 35% utilization on the H100" -> 0.35 / 0.30 on Hopper/Blackwell (FA2 kernels).
# Pre-Ampere GPUs have no FA2: SDPA runs the memory-efficient kernel, assumed 0.35 / 0.25.
ATTENTION_EFF_BY_CLASS: dict[str, tuple[float, float]] = {
    "ampere_dc": (0.60, 0.50), "ampere": (0.60, 0.50), "ada": (0.60, 0.50), "blackwell_consumer": (0.60, 0.50),
    "hopper": (0.35, 0.30), "blackwell": (0.35, 0.30), "cdna3": (0.35, 0.25),
    "volta": (0.35, 0.25), "turing": (0.35, 0.25), "low_power": (0.35, 0.25), "pascal": (0.20, 0.15),
    "generic": (0.40, 0.30),
}
# Memory-bound kernels (elementwise, norms, softmax, reductions, casts, optimizer updates, 4-bit
# dequantisation): device-local copies reach ~90% of the spec bandwidth (RTX 4090: 918-924 GB/s of
# 1008 on the diagonal of p2pBandwidthLatencyTest, tinygrad/open-gpu-kernel-modules issue #6, and
# 921 GB/s in clpeak, krrishnarraj/clpeak issue #106; A800 PCIe 1727 of 1935 GB/s,
# mli/transformers-benchmarks issue #4); PyTorch's elementwise, reduction and broadcast kernels stream
# less regularly than a copy: taken as 80% (assumed).
MEMORY_EFF = 0.80
# The shortest a kernel takes on the GPU (launch latency and ramp-up), assumed 3 us.
LAUNCH_FLOOR_S = 3e-6
# Host time to dispatch one op in eager PyTorch: the GPU waits when the host cannot feed it.
# Measured in this repo (bench/bench_throughput.py --host-overhead: a tiny Llama on this CPU) at
# ~20 us per forward op (Python modules + autograd recording) and ~12 us per backward op (the C++
# autograd engine); taken as 15 / 8 us for the faster host CPUs of GPU servers. A phase takes the
# longer of its GPU time and its host time (the host runs ahead of the GPU while it can).
HOST_OVERHEAD_S: dict[str, float] = {"forward": 15e-6, "recompute": 15e-6, "backward": 8e-6, "optimizer": 8e-6}
# GEMM tiles: cuBLAS computes in output tiles of up to 128x128, narrower (down to 16) for thin
# dimensions; a partial tile at the edge does a full tile's work.
TILE = 128
MIN_TILE = 16

# Communication: achievable NCCL bus bandwidth as a fraction of the link's per-direction rate
# (nccl-tests all_reduce on NVLink A100/H100 nodes reach ~75-80% of it; PCIe peer copies ~70%).
NVLINK_EFF = 0.80
PCIE_EFF = 0.70
# GeForce cards have no PCIe peer-to-peer: NCCL stages through host memory (two PCIe hops). Measured:
# 3x RTX 4090 on PCIe 4.0 x16, p2pBandwidthLatencyTest bidirectional 25.6-26.2 GB/s with P2P disabled
# (~13 GB/s per direction, vs 41.4 with the P2P-enabled driver; tinygrad/open-gpu-kernel-modules
# issue #6): half the P2P rate.
NO_P2P_FACTOR = 0.5
# Between nodes: one 200 Gb/s InfiniBand HDR NIC per GPU (25 GB/s), when nothing else is known.
INTERNODE_GBS = 25.0
# How much of a collective the engines hide under compute: DDP overlaps bucketed all-reduce with
# the backward (Li et al., VLDB 2020); FSDP/ZeRO-3 prefetch the next block's all-gather during the
# current block's compute. Taken as 80% hidden at most, and only under compute of that phase.
COMM_OVERLAP = 0.80
# Offload: DeepSpeed prefetches offloaded parameters; half of the shorter of transfer and compute hidden.
OFFLOAD_OVERLAP = 0.50
# DeepSpeed CPU Adam (ZeRO-Offload paper, Ren et al. 2021): the host optimizer step streams
# ~16 bytes of fp32 master/moments/gradient per parameter; at an assumed 40 GB/s of host memory
# bandwidth available to it.
HOST_OPTIMIZER_BYTES_PER_PARAM = 16.0
HOST_MEMORY_GBS = 40.0
# Paged optimizers (bitsandbytes paged_adamw_*: states in CUDA unified memory). When the states do not
# fit beside everything else, the driver migrates the non-resident pages to the GPU for the update
# and evicts them again when the next forward allocates: 2x the overflow crosses PCIe per optimizer
# step. bitsandbytes prefetches the pages of each state before its update (cudaMemPrefetchAsync),
# which migrates at close to the copy rate (NVIDIA, "Maximizing Unified Memory Performance in CUDA",
# 2017: prefetching reaches near the PCIe copy bandwidth, on-demand faults far less): taken at the
# pinned-copy rate (PCIE_EFF). The CUDA context and the allocator's slack also take device memory:
# PAGED_RESERVE_BYTES (assumed 1 GiB) are not available to the pages.
PAGED_RESERVE_BYTES = 1 << 30

PHASES = ("forward", "recompute", "backward", "optimizer")
OP_CLASSES = ("matmul", "attention", "elementwise", "norm_softmax", "optimizer", "dequant")
_TAG_PHASE = {"forward": "forward", "forward-head": "forward", "backward-loss": "backward", "backward": "backward",
              "backward-tail": "backward", "recompute": "recompute", "optimizer": "optimizer"}


# --------------------------------------------------------------------------------------
# GPU classes and rates
# --------------------------------------------------------------------------------------


def gpu_class(gpu) -> str:
    """Architecture class of a GPUSpec (picks the efficiency factors)."""
    if (gpu.vendor or "").upper() == "AMD":
        return "cdna3"
    try:
        cc = float(gpu.compute_capability) if gpu.compute_capability else None
    except ValueError:
        cc = None
    if gpu.tdp_w is not None and gpu.tdp_w < 100 and (cc is None or cc >= 7.5):
        return "low_power"
    if cc is None:
        return "generic"
    if cc >= 12.0:
        return "blackwell_consumer"
    if cc >= 10.0:
        return "blackwell"
    if cc >= 9.0:
        return "hopper"
    if cc >= 8.9:
        return "ada"
    if cc >= 8.6:
        return "ampere"
    if cc >= 8.0:
        return "ampere_dc"
    if cc >= 7.5:
        return "turing"
    if cc >= 7.0:
        return "volta"
    return "pascal"


def is_geforce(gpu) -> bool:
    """A GeForce board (RTX 2060..5090): rated at its base boost clock, runs above it under load."""
    import re

    return bool(re.match(r"^NVIDIA RTX [2-5]0[5-9]0\b", gpu.name or ""))


@dataclass(frozen=True)
class GpuRates:
    """What one GPU achieves per op class (FLOP/s and byte/s), derived from the catalog and the factors above."""

    name: str
    cls: str
    peak: dict  # dtype -> dense FLOP/s
    matmul_eff: float
    fp32_matmul_eff: float
    attn_fwd_eff: float
    attn_bwd_eff: float
    bandwidth: float  # achievable bytes/s
    floor: float
    source: str

    def describe(self) -> str:
        pk = ", ".join(f"{k} {v / 1e12:g}" for k, v in self.peak.items())
        return (f"{self.name} ({self.cls}): peak TFLOPs {pk}; matmul {self.matmul_eff:.0%} of peak ({self.source}); "
                f"flash attention fwd {self.attn_fwd_eff:.0%} / bwd {self.attn_bwd_eff:.0%}; memory-bound ops at "
                f"{self.bandwidth / 1e9:,.0f} GB/s ({MEMORY_EFF:.0%} of spec); {self.floor * 1e6:g} us floor per op")


def power_limit_clock(gpu) -> float:
    """Sustained compute clock under a power limit below the board power, as a fraction of the clock at
    board power: dynamic power ~ f V^2 with the voltage tracking the clock over the DVFS range, so
    P ~ f^3 and f ~ (P_limit / P_board)^(1/3) (assumed: the whole board power treated as dynamic, which
    understates the loss). Matmul and attention rates scale with it; memory bandwidth does not."""
    pl, tdp = getattr(gpu, "power_limit_w", None), getattr(gpu, "tdp_w", None)
    if not pl or not tdp or pl >= tdp:
        return 1.0
    return (float(pl) / float(tdp)) ** (1.0 / 3.0)


def gpu_rates(gpu) -> GpuRates:
    cls = gpu_class(gpu)
    fp16 = float(gpu.fp16_tflops) * 1e12
    bf16 = float(gpu.bf16_tflops) * 1e12 if (gpu.bf16 and gpu.bf16_tflops) else fp16  # no bf16: the fp16 path
    fp32 = float(gpu.fp32_tflops or gpu.fp16_tflops / 8) * 1e12
    if cls == "pascal":  # no tensor cores: fp16 at the vector rate
        bf16 = fp16
    if gpu.name in MAMF_BY_GPU:
        eff, src = MAMF_BY_GPU[gpu.name], "measured MAMF"
    elif gpu.name in MEASURED_MATMUL_EFF:
        eff, src = MEASURED_MATMUL_EFF[gpu.name], "measured torch.matmul (torch-performance-test-data)"
    elif is_geforce(gpu):
        eff, src = GEFORCE_MATMUL_EFF, "GeForce default (boost above the spec clock)"
    elif gpu.name in HALF_RATE_ACCUMULATE:
        eff, src = GEFORCE_MATMUL_EFF, "half-rate FP32-accumulate part, not power-bound (GeForce ratio, assumed)"
    else:
        eff, src = MATMUL_EFF_BY_CLASS.get(cls, MATMUL_EFF_BY_CLASS["generic"]), f"class {cls} default"
    fwd, bwd = ATTENTION_EFF_BY_CLASS.get(cls, ATTENTION_EFF_BY_CLASS["generic"])
    fp32_eff = FP32_MATMUL_EFF.get(cls, FP32_MATMUL_EFF_DEFAULT)
    clock = power_limit_clock(gpu)
    if clock < 1.0:
        eff, fp32_eff, fwd, bwd = eff * clock, fp32_eff * clock, fwd * clock, bwd * clock
        src += f", x{clock:.3f} sustained clock at a {gpu.power_limit_w:g} W power limit"
    return GpuRates(
        name=gpu.name, cls=cls, peak={"bf16": bf16, "fp16": fp16, "fp32": fp32, "int8": 2 * fp16},
        matmul_eff=eff, fp32_matmul_eff=fp32_eff,
        attn_fwd_eff=fwd, attn_bwd_eff=bwd, bandwidth=float(gpu.memory_bandwidth_gbs) * 1e9 * MEMORY_EFF,
        floor=LAUNCH_FLOOR_S, source=src,
    )


# --------------------------------------------------------------------------------------
# One op's cost
# --------------------------------------------------------------------------------------

# A cost record: GPU-independent, hashable; a trace maps records to how often they occur.
# (phase, op class, dtype, flops, bytes, tile efficiency, causal, op name)
Record = tuple
RECORD_FIELDS = ("phase", "kind", "dtype", "flops", "bytes", "tile", "causal", "op")


def op_seconds(rec: Record, rates: GpuRates) -> float:
    """Roofline time of one op on a GPU: the larger of its compute time and its memory time, at least the floor."""
    _phase, kind, dtype, flops, nbytes, tile, causal = rec[:7]
    mem = nbytes / rates.bandwidth
    compute = 0.0
    if flops:
        peak = rates.peak.get(dtype, rates.peak["fp32"])
        if kind == "matmul":
            eff = rates.fp32_matmul_eff if dtype == "fp32" else rates.matmul_eff
            compute = flops / (peak * eff * max(tile, 1e-3))
        elif kind == "attention_fwd" or kind == "attention_bwd":
            eff = rates.attn_fwd_eff if kind == "attention_fwd" else rates.attn_bwd_eff
            if dtype == "fp32":
                eff = rates.fp32_matmul_eff * 0.5  # no fp32 flash kernel: SDPA's math/efficient path
            # causal masks: flash kernels skip the fully masked tiles, half of the score matrix
            compute = flops * (0.5 if causal else 1.0) / (peak * eff)
    return max(compute, mem, rates.floor)


def op_class(kind: str) -> str:
    return "attention" if kind.startswith("attention") else kind


# --------------------------------------------------------------------------------------
# The observer: the tracker calls it for every top-level op
# --------------------------------------------------------------------------------------

_DTYPE_KEYS: dict = {}
_FUNC_INFO: dict = {}


def _dtype_key(dt) -> str:
    k = _DTYPE_KEYS.get(dt)
    if k is None:
        import torch

        k = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp32",
             torch.int8: "int8"}.get(dt, "other")
        _DTYPE_KEYS[dt] = k
    return k


def _tensors(x, out: list) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    return out


def tensor_bytes(t) -> int:
    """Bytes a kernel touches to read or write all of `t`: its elements, broadcast (stride-0) dimensions once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= int(size)
    return n * t.element_size()


_GATHER = {"embedding", "index_select", "gather", "index", "take", "embedding_bag", "_embedding_bag"}
_NLL = {"nll_loss_forward", "nll_loss2d_forward", "nll_loss_nd"}
_NLL_BWD = {"nll_loss_backward", "nll_loss2d_backward"}
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "lift_fresh",
         "_unsafe_view", "view", "_reshape_alias", "alias", "as_strided", "detach", "t", "transpose", "permute",
         "expand", "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "chunk",
         "set_", "resize_", "_has_compatible_shallow_copy_type", "is_same_size", "sym_size", "sym_stride", "sym_numel",
         "sym_storage_offset", "_to_copy_meta", "record_stream", "_version", "is_nonzero", "equal"}
_NORM_WORDS = ("norm", "softmax", "nll_loss", "cross_entropy", "rsqrt", "var_mean", "logsumexp")
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm", "addbmm", "mv", "dot", "addmv", "_addmm_activation",
           "addmm_", "baddbmm_", "addbmm_", "addmv_"}
# matmuls whose two matrix operands are args[0], args[1] / args[1], args[2]: FLOPs 2 x (elements of the
# first operand) x (columns of the second), which is torch's formula for mm/addmm/bmm/baddbmm and also
# covers the overloads it has no formula for (in place, out=, out_dtype=)
_MM_OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "baddbmm": (1, 2), "baddbmm_": (1, 2),
                "addbmm": (1, 2), "addbmm_": (1, 2), "_addmm_activation": (1, 2)}
_ATTN_FWD = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward"}
_ATTN_BWD = {n + "_backward" for n in _ATTN_FWD} | {"_flash_attention_backward", "_efficient_attention_backward"}


def _func_info(func) -> tuple:
    """(name, kind or None for free ops, indices of written arguments, is a view op) per OpOverload, cached."""
    info = _FUNC_INFO.get(func)
    if info is not None:
        return info
    name = getattr(getattr(func, "_overloadpacket", None), "__name__", None) or str(func)
    ns = getattr(func, "namespace", "aten")
    schema = getattr(func, "_schema", None)
    writes: list[int] = []
    view = False
    if schema is not None:
        for i, a in enumerate(schema.arguments):
            ai = a.alias_info
            if ai is not None and ai.is_write and not a.kwarg_only:
                writes.append(i)
        for r in schema.returns:
            ai = r.alias_info
            if ai is not None and not ai.is_write:
                view = True
    if ns == "bitsandbytes":
        kind = "dequant"
    elif name in _MATMUL:
        kind = "matmul"
    elif name in _ATTN_FWD:
        kind = "attention_fwd"
    elif name in _ATTN_BWD:
        kind = "attention_bwd"
    elif name in _FREE or name.startswith("sym_"):
        kind = None
    elif any(w in name for w in _NORM_WORDS):
        kind = "norm_softmax"
    else:
        kind = "elementwise"
    if view and not writes:
        kind = None
    info = (name, kind, tuple(writes), view)
    _FUNC_INFO[func] = info
    return info


_FLOP_MEMO: dict = {}


def _flops(func, name: str, args, kwargs, out) -> int:
    """FLOPs of a matmul / attention op (torch's formulas), memoised by the op and its tensors' shapes."""
    import torch

    key = (func, tuple(a.shape if isinstance(a, torch.Tensor) else None for a in args),
           tuple(o.shape for o in _tensors(out, [])) if out is not None else ())
    f = _FLOP_MEMO.get(key)
    if f is None:
        if len(_FLOP_MEMO) > 20000:
            _FLOP_MEMO.clear()
        f = _FLOP_MEMO[key] = _flops_uncached(func, name, args, kwargs, out)
    return f


def _flops_uncached(func, name: str, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    ops = _MM_OPERANDS.get(name)
    if ops is not None and len(args) > ops[1]:
        a, b = args[ops[0]], args[ops[1]]
        if hasattr(a, "shape") and hasattr(b, "shape") and a.dim() >= 2 and b.dim() >= 2:
            return 2 * a.numel() * int(b.shape[-1])

    packet = func._overloadpacket
    f = flop_registry.get(packet)
    if f is not None and not getattr(f, "_get_raw", False):
        try:
            return int(f(*args, **(kwargs or {}), out_val=out))
        except Exception:  # noqa: BLE001 - a formula that does not take these arguments: count by shapes below
            pass
    if name == "_scaled_dot_product_flash_attention_for_cpu":
        q, k, v = args[0], args[1], args[2]
        return int(sdpa_flop_count(q.shape, k.shape, v.shape))
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward":
        g, q, k, v = args[0], args[1], args[2], args[3]
        return int(sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape))
    if f is not None:
        try:
            return int(f(*args, **(kwargs or {}), out_val=out))
        except Exception:  # noqa: BLE001
            return 0
    return 0


def _causal(name: str, args, kwargs) -> bool:
    if kwargs and kwargs.get("is_causal") is not None:
        return bool(kwargs["is_causal"])
    idx = {"_scaled_dot_product_flash_attention_for_cpu": 4, "_scaled_dot_product_flash_attention": 4,
           "_scaled_dot_product_efficient_attention": 6, "_scaled_dot_product_flash_attention_for_cpu_backward": 7,
           "_scaled_dot_product_flash_attention_backward": 9}.get(name)
    if idx is not None and len(args) > idx and isinstance(args[idx], bool):
        return args[idx]
    return False


def tile_efficiency(m: int, n: int) -> float:
    """Fraction of useful work in the output tiles of an [M, N] matmul result (tile per dimension:
    128, or the next power of two >= the dimension, at least 16, when the dimension is thinner)."""
    eff = 1.0
    for d in (m, n):
        if d <= 0:
            return 1.0
        t = TILE if d >= TILE else max(MIN_TILE, 1 << (int(d) - 1).bit_length())
        eff *= d / (math.ceil(d / t) * t)
    return round(eff, 4)


def _tile(args, out) -> float:
    import torch

    o = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(o, torch.Tensor) or o.dim() < 1:
        return 1.0
    n = int(o.shape[-1])
    m = int(o.shape[-2]) if o.dim() >= 2 else 1
    return tile_efficiency(m, n)


def _gemm_4bit(name: str, args, kwargs, out, phase: str) -> tuple:
    """bitsandbytes' gemm_4bit: on CUDA for training-sized inputs (M above ~1.5k rows) the weight is
    dequantised to the input dtype and multiplied by cuBLAS (bitsandbytes backends/cuda/ops.py
    _gemm_4bit_use_custom_cuda); below that a fused kernel streams the packed weight. The CPU dry run
    dispatches the op itself: split it into the GPU's dequantisation and matmul."""
    a, b = args[0], args[1]
    n, k = int(args[2][0]), int(args[2][1])
    es = a.element_size()
    m = a.numel() // max(k, 1)
    packed = tensor_bytes(b) + sum(tensor_bytes(t) for t in _tensors(list(args[3:]) + list((kwargs or {}).values()), []))
    dt = _dtype_key(a.dtype)
    o = tensor_bytes(out)
    flops = 2 * m * k * n
    if m <= 1536:  # the fused kernel: one pass over the packed weight
        return ((phase, "matmul", dt, flops, packed + tensor_bytes(a) + o, tile_efficiency(m, n), False, name),)
    return ((phase, "dequant", dt, 0, packed + n * k * es, 1.0, False, "dequantize_4bit"),
            (phase, "matmul", dt, flops, tensor_bytes(a) + n * k * es + o, tile_efficiency(m, n), False, "mm"))


def op_record(func, args, kwargs, out, phase: str) -> Record | None:
    """The cost record of one op (None for views, allocations and metadata queries)."""
    recs = op_records(func, args, kwargs, out, phase)
    return recs[0] if recs else None


def op_records(func, args, kwargs, out, phase: str) -> tuple:
    """The cost records of one op (empty for views, allocations and metadata queries)."""
    name, kind, writes, _view = _func_info(func)
    if kind is None:
        return ()
    if name == "gemm_4bit":
        return _gemm_4bit(name, args, kwargs, out, phase)
    ins = _tensors(args, [])
    if kwargs:
        _tensors(kwargs, ins)
    outs = _tensors(out, []) if out is not None else []
    in_ids = {id(t) for t in ins}
    if name in _GATHER:
        # reads the gathered rows (as many as it writes) and the indices, not the whole table
        nbytes = 2 * sum(tensor_bytes(t) for t in outs) + sum(tensor_bytes(t) for t in ins if not t.is_floating_point())
    elif name in _NLL:
        nbytes = sum(tensor_bytes(t) for t in outs) + sum(tensor_bytes(t) for t in ins if not t.is_floating_point()) * 3
    elif name in _NLL_BWD:
        nbytes = sum(tensor_bytes(t) for t in outs) + sum(tensor_bytes(t) for t in ins if not t.is_floating_point())
    else:
        nbytes = sum(tensor_bytes(t) for t in ins)
        # results that are not the (already counted) in-place arguments are written once
        nbytes += sum(tensor_bytes(t) for t in outs if id(t) not in in_ids)
        # in-place / out= arguments are written as well as read
        for i in writes:
            if i < len(args):
                nbytes += sum(tensor_bytes(t) for t in _tensors(args[i], []))
    dts = [t.dtype for t in (outs or ins) if t.is_floating_point()]
    dtype = _dtype_key(dts[0]) if dts else "other"
    flops = 0
    tile = 1.0
    causal = False
    if kind == "matmul":
        flops = _flops(func, name, args, kwargs, out)
        tile = _tile(args, out)
        ops = _MM_OPERANDS.get(name)
        if ops is not None and len(args) > ops[0] and hasattr(args[ops[0]], "dtype"):
            dtype = _dtype_key(args[ops[0]].dtype)  # the tensor cores run at the inputs' dtype (out_dtype=fp32 accumulates)
    elif kind in ("attention_fwd", "attention_bwd"):
        flops = _flops(func, name, args, kwargs, out)
        causal = _causal(name, args, kwargs)
        q = args[0] if kind == "attention_fwd" else args[1]
        dtype = _dtype_key(q.dtype)
    if phase == "optimizer" and kind != "matmul":
        kind = "optimizer"
    return ((phase, kind, dtype, int(flops), int(nbytes), tile, causal, name),)


_FUSABLE = ("elementwise", "norm_softmax")
_FUSE_PHASES = ("forward", "recompute", "backward")


# states of a fused kernel's output
_PENDING, _NEEDED, _RECOMPUTED = 0, 1, 2


class OpTrace:
    """The tracker's op observer: counts the cost record of every op of the traced step.

    Call it as observer(func, args, kwargs, out, tag) where tag is the tracker's tag of the moment
    (forward, forward-head, backward-loss, backward, backward-tail, recompute, optimizer); other
    tags (setup, eval) are not part of the training step and are ignored. `active` switches
    recording on and off (the first, state-creating optimizer step is not traced).

    fuse=True (a `torch_compile` setup): TorchInductor fuses pointwise and reduction ops into kernels
    and leaves matmuls, attention, 4-bit dequantisation and gathers to library kernels (Ansel et al.,
    "PyTorch 2", ASPLOS 2024: the scheduler fuses pointwise/reduction nodes along the dataflow;
    extern kernels stay separate). Modelled along the dataflow: a pointwise op that reads the output of
    another pointwise op of the same pass joins its kernel (that value never goes to memory); a kernel
    reads each tensor from memory once and writes the values something else needs: a matmul, attention
    or gather (also in backward), another pass, or a reference still held when the step ends. A
    forward value that only backward pointwise kernels read is not written: AOTAutograd's min-cut
    partitioner recomputes such cheap values inside the backward kernel instead of saving them, and
    that read is not charged either (the inputs it is recomputed from are read there anyway, not
    counted again). Each kernel is one record. The model's forward and backward fuse (AOTAutograd
    compiles both); the optimizer step (not compiled by TrainingArguments.torch_compile) does not.
    """

    __slots__ = ("counts", "active", "ops", "errors", "sharded", "fuse", "_parent", "_kernels", "_virt", "_entries")

    def __init__(self, fuse: bool = False):
        self.counts: dict[Record, int] = {}
        self.active = False
        self.ops = 0
        self.errors = 0
        self.sharded = False
        self.fuse = fuse
        self._parent: list[int] = []  # union-find over the fused ops: ops joined by an in-register value
        self._kernels: list[tuple] = []  # per fused op: (phase, dtype, {id: bytes} of the tensors it reads from memory)
        self._virt: dict[int, list] = {}  # id(tensor) -> its entry: [weakref, bytes, state, op index, phase]
        self._entries: list[list] = []

    def __call__(self, func, args, kwargs, out, tag: str) -> None:
        if not self.active:
            return
        phase = _TAG_PHASE.get(tag)
        if phase is None:
            return
        if args:
            # a sharded (FSDP2) step: an op on DTensors reaches the mode twice, as the DTensor op (global
            # shapes) and as the op on the local shards DTensor runs; only the local one is GPU work
            a = args[0]
            if type(a) in (list, tuple) and a:
                a = a[0]
            if type(a).__name__ == "DTensor":
                self.sharded = True
                return
        try:
            recs = op_records(func, args, kwargs, out, phase)
            if self.fuse:
                ins = _tensors(args, [])
                if kwargs:
                    _tensors(kwargs, ins)
                if (len(recs) == 1 and recs[0][1] in _FUSABLE and phase in _FUSE_PHASES
                        and recs[0][7] not in _GATHER and recs[0][7] not in _NLL and recs[0][7] not in _NLL_BWD):
                    self._fuse(func, args, ins, out, phase, recs[0])
                    return
                for t in ins:  # a library kernel reads these from memory: they are written
                    v = self._lookup(t)
                    if v is not None:
                        v[2] = _NEEDED
        except Exception:  # noqa: BLE001 - a cost model must never break the memory simulation
            self.errors += 1
            return
        counts = self.counts
        for rec in recs:
            self.ops += 1
            counts[rec] = counts.get(rec, 0) + 1

    def _lookup(self, t):
        v = self._virt.get(id(t))
        if v is None:
            return None
        if v[0]() is not t:  # a dead tensor's id reused
            del self._virt[id(t)]
            return None
        return v

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def _fuse(self, func, args, ins: list, out, phase: str, rec: Record) -> None:
        import weakref

        idx = len(self._parent)
        self._parent.append(idx)
        reads: dict[int, int] = {}
        for t in ins:
            v = self._lookup(t)
            if v is not None and v[4] == phase:
                a, b = self._find(idx), self._find(v[3])  # the producer's kernel: one kernel
                if a != b:
                    self._parent[a] = b
                continue
            if v is not None and phase == "backward" and v[4] in ("forward", "recompute") and v[2] != _NEEDED:
                v[2] = _RECOMPUTED  # recomputed inside this backward kernel, neither saved nor read
                continue
            if v is not None:
                v[2] = _NEEDED
            reads[id(t)] = tensor_bytes(t)
        self._kernels.append((phase, rec[2], reads))
        written = _tensors(out, []) if out is not None else []
        for i in _func_info(func)[2]:  # in-place / out= arguments are written
            if i < len(args):
                written.extend(_tensors(args[i], []))
        for t in written:
            try:
                ref = weakref.ref(t)
            except TypeError:  # not weak-referenceable: keep it as written
                ref = (lambda t=t: t)
            entry = [ref, tensor_bytes(t), _PENDING, idx, phase]
            self._virt[id(t)] = entry
            self._entries.append(entry)

    def _flush(self) -> None:
        """One record per fused kernel: the tensors it reads from memory plus the values it must write."""
        if not self._parent:
            return
        import gc

        gc.collect()  # what is still referenced must not depend on when the cycle collector last ran
        groups: dict[int, list] = {}
        for idx, (phase, dtype, reads) in enumerate(self._kernels):
            g = groups.setdefault(self._find(idx), [phase, dtype, {}, 0])
            g[2].update(reads)
        for ref, nbytes, state, idx, _phase in self._entries:
            if state == _NEEDED or (state == _PENDING and ref() is not None):
                groups[self._find(idx)][3] += nbytes
        for phase, dtype, reads, writes in groups.values():
            rec = (phase, "elementwise", dtype, 0, int(sum(reads.values()) + writes), 1.0, False, "fused_pointwise")
            self.ops += 1
            self.counts[rec] = self.counts.get(rec, 0) + 1
        self._parent, self._kernels, self._virt, self._entries = [], [], {}, []

    def total_flops(self, phases: Iterable[str] = PHASES) -> int:
        ph = set(phases)
        return sum(r[3] * c for r, c in self.counts.items() if r[0] in ph)

    def result(self) -> dict[Record, int]:
        """The counts, with a marker record when the step was sharded (its optimizer ran on the local shards)."""
        self._flush()
        out = dict(self.counts)
        if self.sharded:
            out[SHARDED_MARKER] = 1
        return out


# Marks a trace of a sharded step (FSDP2 / ZeRO through the fake process group): the optimizer
# records are already those of this rank's shard.
SHARDED_MARKER: Record = ("optimizer", "marker", "other", 0, 0, 1.0, False, "sharded")


# --------------------------------------------------------------------------------------
# Traces: serialise, extrapolate over depth
# --------------------------------------------------------------------------------------


def trace_to_list(counts: dict[Record, float]) -> list[list]:
    return [list(r) + [c] for r, c in counts.items()]


def trace_from_list(rows: Iterable[list]) -> dict[Record, float]:
    out: dict[Record, float] = {}
    n = len(RECORD_FIELDS)
    for row in rows:
        rec = tuple(row[:n])
        out[rec] = out.get(rec, 0.0) + float(row[n])
    return out


def extrapolate(a: dict[Record, float], b: dict[Record, float], k1: int, k2: int, total: int) -> dict[Record, float]:
    """The trace at `total` blocks from the traces at k1 and k2 blocks, linear in depth.

    A record present at both depths (a block's op: same shapes at every depth) grows in count.
    Ops whose size grows with depth instead (the optimizer's foreach ops over all parameters, a
    gradient-norm over all gradients) appear once at each depth with different sizes: those are
    paired by (phase, class, dtype, op) in order of size, and their FLOPs and bytes extrapolated.
    """
    steps = (total - k1) / (k2 - k1)
    out: dict[Record, float] = {}

    def put(rec, c):
        if c > 1e-9:
            out[rec] = out.get(rec, 0.0) + c

    only_a: dict[tuple, list] = {}
    only_b: dict[tuple, list] = {}
    for rec in set(a) | set(b):
        x, y = a.get(rec, 0.0), b.get(rec, 0.0)
        if x and y:
            if y >= x:
                put(rec, x + (y - x) * steps)
                continue
            put(rec, y)  # fewer at the deeper run: the surplus of the shallow one is paired below
            x, y = x - y, 0.0
        group = (rec[0], rec[1], rec[2], rec[7])
        if x:
            only_a.setdefault(group, []).extend([rec] * int(round(x)))
        if y:
            only_b.setdefault(group, []).extend([rec] * int(round(y)))
    for group in set(only_a) | set(only_b):
        la = sorted(only_a.get(group, []), key=lambda r: (r[4], r[3]))
        lb = sorted(only_b.get(group, []), key=lambda r: (r[4], r[3]))
        for ra, rb in zip(la, lb):
            fl = max(0.0, ra[3] + (rb[3] - ra[3]) * steps)
            by = max(0.0, ra[4] + (rb[4] - ra[4]) * steps)
            put((ra[0], ra[1], ra[2], int(round(fl)), int(round(by)), rb[5], rb[6], rb[7]), 1.0)
        for rb in lb[len(la):]:  # new at the deeper run: grows with depth
            put(rb, steps)
        for ra in la[len(lb):]:  # gone at the deeper run: shrinks (kept if the extrapolation says so)
            put(ra, 1.0 - steps)
    return out


# --------------------------------------------------------------------------------------
# The step: phases, communication, offload, accumulation
# --------------------------------------------------------------------------------------


@dataclass
class StepTime:
    """Wall time of one optimizer step (all micro-batches of an accumulation window)."""

    step_seconds: float
    tokens_per_step: int
    tokens_per_second: float
    by_phase: dict[str, float]
    by_op_class: dict[str, float]
    flops_per_step: float  # per GPU, all micro-batches
    notes: list[str] = field(default_factory=list)

    def breakdown(self) -> dict[str, dict[str, float]]:
        r = lambda d: {k: round(v, 6) for k, v in d.items() if v > 0}  # noqa: E731
        return {"by_phase": r(self.by_phase), "by_op_class": r(self.by_op_class)}


def link_bandwidth(hardware, setup) -> tuple[float, str]:
    """Achievable collective bus bandwidth per GPU (bytes/s) and what it is."""
    gpu = hardware.gpu
    nv = getattr(gpu, "nvlink_gbs", None)
    pcie = getattr(gpu, "pcie_gbs", None) or 32.0
    p2p = getattr(gpu, "pcie_p2p", True)
    if setup.num_nodes > 1:
        intra = nv * NVLINK_EFF if nv else pcie * PCIE_EFF * (1.0 if p2p is not False else NO_P2P_FACTOR)
        inter = INTERNODE_GBS * 0.9
        return min(intra, inter) * 1e9, f"{setup.num_nodes} nodes: {INTERNODE_GBS:g} GB/s per GPU between nodes (assumed 200 Gb/s IB per GPU)"
    if nv:
        return nv * NVLINK_EFF * 1e9, f"NVLink {nv:g} GB/s per direction x {NVLINK_EFF:.0%}"
    f = PCIE_EFF * (1.0 if p2p is not False else NO_P2P_FACTOR)
    return pcie * f * 1e9, (f"PCIe {pcie:g} GB/s per direction x {PCIE_EFF:.0%}"
                            + ("" if p2p is not False else f", no peer-to-peer (through host memory, x{NO_P2P_FACTOR})"))


def pcie_seconds(nbytes: float, gpu) -> float:
    """Seconds to move nbytes between host and GPU over its PCIe link (pinned memory, one direction)."""
    pcie = getattr(gpu, "pcie_gbs", None) or 32.0
    return nbytes / (pcie * PCIE_EFF * 1e9)


def _exposed(comm: float, compute: float, overlap: float = COMM_OVERLAP) -> float:
    """Communication left after hiding what can run under `compute`: at most `overlap` of it hides."""
    if comm <= 0:
        return 0.0
    return max((1 - overlap) * comm, comm - overlap * compute)


def step_time(counts: dict[Record, float], setup, hardware, *, param_bytes: float, grad_bytes: float,
              trainable_params: float, num_params: float, activation_offload_bytes: float = 0.0,
              paged_overflow_bytes: float = 0.0) -> StepTime:
    """Time of one optimizer step of `setup` on `hardware` from a (full-depth) trace of one micro-batch step.

    param_bytes: bytes of the (unsharded) model weights as the collectives move them; grad_bytes:
    bytes of all gradients of one replica as they are reduced. The trace is of one replica's step;
    ZeRO/FSDP shard the optimizer work by the world size. paged_overflow_bytes: bytes of a paged
    optimizer's states that do not fit in GPU memory (they migrate in and out once per optimizer step).
    """
    rates = gpu_rates(hardware.gpu)
    # per phase: GPU time by op class, host dispatch time, FLOPs
    cls = {p: dict.fromkeys(OP_CLASSES, 0.0) for p in PHASES}
    host = dict.fromkeys(PHASES, 0.0)
    flops = dict.fromkeys(PHASES, 0.0)
    sharded_trace = SHARDED_MARKER in counts
    for rec, c in counts.items():
        if rec[1] == "marker":
            continue
        p = rec[0]
        cls[p][op_class(rec[1])] += op_seconds(rec, rates) * c
        host[p] += HOST_OVERHEAD_S[p] * c
        flops[p] += rec[3] * c
    phase_t = {}
    for p in PHASES:  # a phase takes the longer of its GPU time and its host dispatch time
        gpu_t = sum(cls[p].values())
        cls[p]["host_overhead"] = max(0.0, host[p] - gpu_t)
        phase_t[p] = gpu_t + cls[p]["host_overhead"]
    n = max(1, setup.num_gpus)
    ga = max(1, setup.gradient_accumulation_steps)
    stage = setup.zero_stage
    if setup.fsdp == "full_shard":
        stage = 3
    elif setup.fsdp == "shard_grad_op":
        stage = 2
    notes = [f"per-op roofline on {rates.describe()}"]
    if getattr(setup, "torch_compile", False):
        fused = sum(c for r, c in counts.items() if r[7] == "fused_pointwise")
        notes.append(f"torch.compile: pointwise/reduction chains fused into {fused:,.0f} kernels per micro-batch (Inductor, "
                     "forward and backward; the optimizer step is not compiled); the one-off compile time of the first steps "
                     "is not included")
    if getattr(setup, "reentrant_checkpointing", False) and setup.gradient_checkpointing:
        notes.append("reentrant checkpointing: the whole block is recomputed in backward")
    micro = phase_t["forward"] + phase_t["recompute"] + phase_t["backward"]
    opt_scale = 1.0
    if sharded_trace:
        notes.append(f"the traced step is rank 0's of the sharded step over {n} GPUs: its optimizer updates this rank's shard")
    elif stage >= 1 and n > 1:
        opt_scale = 1.0 / n
        notes.append(f"optimizer step sharded over {n} GPUs (ZeRO-{stage} / FSDP)")
    offload_step = offload_micro = 0.0
    if setup.offload != "none":
        # the optimizer step runs on the host (DeepSpeed CPU Adam / FSDP CPU offload); gradients
        # go down and updated parameters come back over PCIe
        opt_scale = 0.0
        shard = 1.0 / n
        host_opt = trainable_params * shard * HOST_OPTIMIZER_BYTES_PER_PARAM / (HOST_MEMORY_GBS * 1e9)
        xfer = pcie_seconds(grad_bytes * shard, hardware.gpu) + pcie_seconds(trainable_params * shard * 2.0, hardware.gpu)
        offload_step = host_opt + xfer
        notes.append(f"optimizer offloaded: host step {host_opt:.3f} s ({HOST_OPTIMIZER_BYTES_PER_PARAM:g} B/param at "
                     f"{HOST_MEMORY_GBS:g} GB/s of host memory) + gradients and parameters over PCIe {xfer:.3f} s")
        if setup.offload == "all":
            passes = 3 if setup.gradient_checkpointing else 2  # forward, (recompute,) backward
            traffic = param_bytes * shard * passes
            t = pcie_seconds(traffic, hardware.gpu)
            offload_micro = max(t, micro) - micro + (1 - OFFLOAD_OVERLAP) * min(t, micro)
            notes.append(f"parameters offloaded: {traffic / 1e9:.1f} GB over PCIe per micro-batch ({t:.3f} s; "
                         f"{OFFLOAD_OVERLAP:.0%} of the shorter of transfer and compute hidden)")
    if activation_offload_bytes > 0:
        # activation offloading: saved activations go to the host in the forward and come back for the
        # backward, over PCIe on a side stream, overlapped with compute like parameter offload
        t = 2 * pcie_seconds(activation_offload_bytes, hardware.gpu)
        exposed = max(t, micro) - micro + (1 - OFFLOAD_OVERLAP) * min(t, micro)
        offload_micro += exposed
        notes.append(f"activation offload: {activation_offload_bytes / 1e9:.2f} GB to the host and back per micro-batch "
                     f"({t:.3f} s over PCIe, {exposed:.3f} s exposed)")
    if paged_overflow_bytes > 0:
        t = 2 * pcie_seconds(paged_overflow_bytes, hardware.gpu)
        offload_step += t
        notes.append(f"paged optimizer: {paged_overflow_bytes / 1e9:.1f} GB of its states do not fit in GPU memory and "
                     f"migrate in and out over PCIe every optimizer step ({t:.2f} s)")
    opt = phase_t["optimizer"] * opt_scale
    comm_micro = comm_step = 0.0
    if n > 1:
        bw, link = link_bandwidth(hardware, setup)
        ring = (n - 1) / n
        if stage == 0:  # DDP: gradients all-reduced once per optimizer step (no_sync while accumulating)
            t = 2 * ring * grad_bytes / bw
            comm_step = _exposed(t, phase_t["backward"])
            what = f"DDP all-reduce of {grad_bytes / 1e9:.2f} GB of gradients: {t:.3f} s, {comm_step:.3f} s exposed"
        elif stage in (1, 2):
            rs = ring * grad_bytes / bw
            ag = ring * param_bytes / bw
            if stage == 2:  # gradients reduce-scattered every micro-batch
                comm_micro = _exposed(rs, phase_t["backward"])
                comm_step = ag * (1 - COMM_OVERLAP)
            else:
                comm_step = _exposed(rs, phase_t["backward"]) + ag * (1 - COMM_OVERLAP)
            what = (f"ZeRO-{stage}: reduce-scatter of {grad_bytes / 1e9:.2f} GB of gradients ({rs:.3f} s) + all-gather of "
                    f"the updated {param_bytes / 1e9:.2f} GB of parameters ({ag:.3f} s)")
        else:  # ZeRO-3 / FSDP full_shard: parameters all-gathered in forward and backward, gradients reduce-scattered
            t_ag = 2 * ring * param_bytes / bw
            t_rs = ring * grad_bytes / bw
            comm_micro = _exposed(t_ag + t_rs, micro)
            what = (f"{'FSDP' if setup.fsdp != 'none' else 'ZeRO-3'}: all-gather of {param_bytes / 1e9:.2f} GB of parameters x2 "
                    f"({t_ag:.3f} s) + reduce-scatter of {grad_bytes / 1e9:.2f} GB of gradients ({t_rs:.3f} s) per micro-batch, "
                    f"{comm_micro:.3f} s exposed")
        notes.append(f"communication over {link}: {what} (at most {COMM_OVERLAP:.0%} hidden under compute)")
    step = ga * (micro + comm_micro + offload_micro) + opt + comm_step + offload_step
    by_phase = {
        "forward": ga * phase_t["forward"], "recompute": ga * phase_t["recompute"], "backward": ga * phase_t["backward"],
        "optimizer": opt + offload_step, "communication": ga * comm_micro + comm_step, "offload": ga * offload_micro,
    }
    by_class = dict.fromkeys(OP_CLASSES + ("host_overhead",), 0.0)
    for p in PHASES:
        f = opt_scale if p == "optimizer" else ga
        for k, v in cls[p].items():
            by_class[k] += v * f
    by_class["optimizer"] += offload_step
    by_class["communication"] = by_phase["communication"]
    by_class["offload"] = by_phase["offload"]
    tokens = ga * setup.per_device_train_batch_size * setup.max_length * n
    fl = ga * (flops["forward"] + flops["recompute"] + flops["backward"]) + flops["optimizer"] * opt_scale
    return StepTime(step_seconds=step, tokens_per_step=tokens, tokens_per_second=tokens / step if step > 0 else 0.0,
                    by_phase=by_phase, by_op_class=by_class, flops_per_step=fl, notes=notes)


# --------------------------------------------------------------------------------------
# From a StepMemory (simulated op trace) to the step time of a setup on a hardware
# --------------------------------------------------------------------------------------


def _collective_bytes(step, setup) -> tuple[float, float]:
    """(parameter bytes, gradient bytes) one replica's collectives move.

    ZeRO-3/FSDP all-gather the parameters in the compute dtype under mixed precision (FSDP
    MixedPrecision param_dtype, DeepSpeed's bf16/fp16 partitions), else as stored (4-bit packed
    weights for QLoRA); gradients are reduced in the compute dtype under mixed precision.
    A sharded dry run (`step.world_size` > 1) holds rank 0's shards: its weight and gradient bytes
    are 1/world_size of what the collectives gather and reduce, so they are scaled back up.
    """
    mixed = setup.bf16 or setup.fp16
    quant = setup.load_in_4bit or setup.load_in_8bit
    ws = max(1, int(getattr(step, "world_size", 1) or 1))
    if mixed and not quant:
        params = 2.0 * step.num_parameters
    else:
        params = float(step.weights_bytes + step.adapter_bytes) * ws
    grads = 2.0 * step.trainable_parameters if mixed else float(step.gradient_bytes) * ws
    return params, grads


def paged_overflow(step, setup, hardware) -> float:
    """Bytes of a paged optimizer's states that do not fit in one GPU's memory beside the rest of the
    step (0 for other optimizers): the peak live bytes plus the allocator's overhead plus
    PAGED_RESERVE_BYTES over the GPU's memory, at most the states themselves."""
    if not str(setup.optim).startswith("paged_"):
        return 0.0
    cap = float(hardware.gpu.memory_gib) * (1 << 30)
    need = float(step.peak_bytes) + float(getattr(step, "allocator_overhead_bytes", 0) or 0) + PAGED_RESERVE_BYTES
    return float(min(float(step.optimizer_bytes), max(0.0, need - cap)))


def flash_causal(counts: dict[Record, float], setup) -> dict[Record, float]:
    """flash_attention_2 runs a causal LM's attention with its causal flag (and any sliding window) on the
    GPU, whatever mask the CPU dry run's SDPA stand-in was given: mark those attention records causal."""
    if setup.attn_implementation != "flash_attention_2" or setup.task == "sequence-classification":
        return counts
    out: dict[Record, float] = {}
    for rec, c in counts.items():
        if rec[1] in ("attention_fwd", "attention_bwd") and not rec[6]:
            rec = rec[:6] + (True,) + rec[7:]
        out[rec] = out.get(rec, 0.0) + c
    return out


def time_from_step(step, setup, hardware) -> StepTime:
    """StepTime of `setup` on `hardware` from the StepMemory's op trace (simulated tier)."""
    if step.op_trace is None:
        raise ValueError("this StepMemory carries no op trace (analytic tier)")
    counts = flash_causal(trace_from_list(step.op_trace), setup)
    params, grads = _collective_bytes(step, setup)
    act = float(getattr(step, "offload_traffic_bytes", 0) or getattr(step, "offload_host_bytes", 0) or 0) if getattr(setup, "activation_offloading", False) else 0.0
    return step_time(counts, setup, hardware, param_bytes=params, grad_bytes=grads,
                     trainable_params=float(step.trainable_parameters), num_params=float(step.num_parameters),
                     activation_offload_bytes=act, paged_overflow_bytes=paged_overflow(step, setup, hardware))


def analytic_collective_bytes(model, setup) -> tuple[float, float, float]:
    """(parameter bytes, gradient bytes, trainable parameters) of one replica, from the model's shapes."""
    from tools.memory.timing_analytic import _trainable

    mixed = setup.bf16 or setup.fp16
    n = float(model.num_parameters)
    trainable = _trainable(model, setup)
    if setup.load_in_4bit:
        params = n * (0.5 + 1 / 64) + model.vocab_size * model.hidden_size * 2 * (1 if model.tie_word_embeddings else 2)
    elif setup.load_in_8bit:
        params = n * 1.02
    elif mixed:
        params = 2.0 * n
    else:
        params = n * {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[setup.dtype]
    grads = trainable * (2.0 if mixed else 4.0 if setup.method != "full" else {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[setup.dtype])
    return params, grads, trainable


def time_analytic(model, setup, hardware) -> StepTime:
    """StepTime of `setup` on `hardware` from the analytic tier's closed-form op records (no torch)."""
    from tools.memory.timing_analytic import analytic_counts

    counts = analytic_counts(model, setup)
    params, grads, trainable = analytic_collective_bytes(model, setup)
    act = paged = 0.0
    if getattr(setup, "activation_offloading", False) or str(setup.optim).startswith("paged_"):
        # the same PCIe traffic the traced step is charged (the saved activations to the host and back;
        # a paged optimizer's states that do not fit)
        from tools.analytic import analytic_step_memory

        mem = analytic_step_memory(model, setup)
        if getattr(setup, "activation_offloading", False):
            act = float(mem.offload_traffic_bytes or 0)
        paged = paged_overflow(mem, setup, hardware)
    st = step_time(counts, setup, hardware, param_bytes=params, grad_bytes=grads, trainable_params=trainable,
                   num_params=float(model.num_parameters), activation_offload_bytes=act, paged_overflow_bytes=paged)
    st.notes.insert(0, "op records written down from the model's shapes (analytic tier, tools/memory/timing_analytic.py)")
    return st
