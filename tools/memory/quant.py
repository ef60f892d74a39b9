"""Stand-ins for bitsandbytes 4-bit and 8-bit layers that work on fake tensors (used by tools.memory.step).

`bnb.nn.Params4bit` cannot wrap a FakeTensor, so `Fake4bitLinear` holds the same storage a real
`bnb.nn.Linear4bit` holds after `from_pretrained(..., load_in_4bit=True)`: the packed weight
(uint8 [(out*in)/2, 1], or the quant_storage dtype), the absmax per 64-element block (uint8 with
double quantization plus the fp32 nested absmax/code, fp32 without) and the 16-entry code table.
Its forward is bitsandbytes' own: `bnb.matmul_4bit`, which dequantises the whole weight to the
compute dtype for the matmul (and again in backward), exactly as on the GPU.

`Fake8bitLinear` holds what a real `bnb.nn.Linear8bitLt` holds after `load_in_8bit=True`: the int8
weight [out, in] and its fp32 row scales SCB [out], and runs bitsandbytes' own `bnb.matmul`
(LLM.int8: the input quantised to int8 per row, int8 matmul; in backward the weight is dequantised
to the input dtype). Outlier decomposition (llm_int8_threshold=6.0) depends on the data, so the
stand-in runs with threshold 0: the few outlier columns' fp16 sub-matrix is not counted.
"""

from __future__ import annotations

import torch
from torch import nn

_WARMED = False


def import_bitsandbytes():
    """Import bitsandbytes without torch.compile-ing its CPU default kernels (~2 s of dynamo/inductor imports).

    bnb wraps its default (CPU) ops in `_try_torch_compile`, which falls back to the plain function when
    torch.compile raises: the dry run (fake tensors, fake kernels) and the one tiny real quantize_4bit
    warm-up need no compiled CPU kernels. Memory is unaffected; only the import gets cheaper.
    """
    import sys

    mod = sys.modules.get("bitsandbytes")
    if mod is not None:
        return mod
    from tools.quiet import silence_library_chatter

    silence_library_chatter()  # bnb's note about its optional CPU kernel (see tools.quiet)
    sys.modules.pop("bitsandbytes", None)
    orig = torch.compile

    def _no_compile(*args, **kwargs):
        raise RuntimeError("tunepilot dry run: bitsandbytes' CPU default ops run eagerly")

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    torch.compile = _no_compile
    try:
        # never under a fake mode: bnb creates module-level tensors at import (the NF4/FP4 tables)
        with unset_fake_temporarily():
            import bitsandbytes
    finally:
        torch.compile = orig
    return bitsandbytes


_STORAGE = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def warm_bitsandbytes() -> None:
    """Run one real tiny quantize_4bit so bnb builds its lazy lookup tables outside fake mode."""
    global _WARMED
    if _WARMED:
        return
    import_bitsandbytes()
    import bitsandbytes.functional as F

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        for qt in ("nf4", "fp4"):
            F.quantize_4bit(torch.zeros(64, 64, dtype=torch.bfloat16), compress_statistics=True, quant_type=qt)
            F.quantize_4bit(torch.zeros(64, 64, dtype=torch.bfloat16), compress_statistics=False, quant_type=qt)
    _WARMED = True


class _FakeQuantLinear(nn.Module):
    """What both stand-ins share: the logical parameter count and peft's quantized-weight hook."""

    @property
    def logical_numel(self) -> int:
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 - peft's hook for "dequantize me via .dequantize()"
        return self.weight


class Fake4bitLinear(_FakeQuantLinear):
    """A bnb Linear4bit look-alike: packed 4-bit weight + quantization state, forward via bnb.matmul_4bit."""

    def __init__(self, linear: nn.Linear, *, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                 quant_storage: str = "uint8", blocksize: int = 64):
        super().__init__()
        import bitsandbytes.functional as F

        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = compute_dtype
        packed, qs = F.quantize_4bit(
            linear.weight.detach().to(compute_dtype), blocksize=blocksize, compress_statistics=double_quant,
            quant_type=quant_type, quant_storage=_STORAGE[quant_storage],
        )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = qs
        # register every tensor of the quantization state so model.buffers() sees (and counts) it
        self.register_buffer("absmax", qs.absmax, persistent=False)
        self.register_buffer("code", qs.code, persistent=False)
        if qs.nested:
            self.register_buffer("nested_absmax", qs.state2.absmax, persistent=False)
            self.register_buffer("nested_code", qs.state2.code, persistent=False)
            self.register_buffer("offset", qs.offset, persistent=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The full weight in the compute dtype, as peft's DoRA gets it from a real Params4bit."""
        import bitsandbytes.functional as F

        return F.dequantize_4bit(self.weight, self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=self.quant_state).to(inp_dtype)


class Fake8bitLinear(_FakeQuantLinear):
    """A bnb Linear8bitLt look-alike: int8 weight + fp32 row scales, forward via bnb.matmul (LLM.int8)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from bitsandbytes.autograd._functions import MatmulLtState

        self.in_features = linear.in_features
        self.out_features = linear.out_features
        dev = linear.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=dev),
                                   requires_grad=False)
        self.register_buffer("SCB", torch.empty(self.out_features, dtype=torch.float32, device=dev), persistent=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.state = MatmulLtState()
        self.state.CB, self.state.SCB = self.weight, self.SCB
        self.state.has_fp16_weights = False
        self.state.threshold = 0.0

    def dequantize(self) -> torch.Tensor:
        """The full weight in fp16, as peft's DoRA gets it from a real Int8Params."""
        return self.weight.to(torch.float16) * (self.SCB.unsqueeze(1) / 127.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        self.state.is_training = self.training
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul(x, self.weight, bias=bias, state=self.state)


def quantize_linears_8bit(model: nn.Module, *, skip: set[int]) -> int:
    """Swap every nn.Linear except those in `skip` for Fake8bitLinear (transformers' load_in_8bit)."""
    warm_bitsandbytes()
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and id(child) not in skip]
    for parent, name, child in swaps:
        setattr(parent, name, Fake8bitLinear(child))
    return len(swaps)


def quantize_linears_4bit(model: nn.Module, *, skip: set[int], quant_type: str, double_quant: bool,
                          compute_dtype: torch.dtype, quant_storage: str) -> int:
    """Swap every nn.Linear (peft LoRA base layers included) except those in `skip` for Fake4bitLinear.

    Returns the number of layers swapped. Mirrors transformers' load_in_4bit, which quantizes every
    linear layer except the output head (and peft adapters, which are created after loading).
    """
    warm_bitsandbytes()
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and id(child) not in skip:
                swaps.append((parent, name, child))
    shared_code = None
    with _FakeCodeTables():
        for parent, name, child in swaps:
            new = Fake4bitLinear(child, quant_type=quant_type, double_quant=double_quant,
                                 compute_dtype=compute_dtype, quant_storage=quant_storage)
            if new.quant_state.nested:
                # bnb caches the 256-entry dynamic map once per device and every nested state points at it
                if shared_code is None:
                    shared_code = new.quant_state.state2.code
                new.quant_state.state2.code = shared_code
                new.nested_code = shared_code
            setattr(parent, name, new)
    return len(swaps)


class _FakeCodeTables:
    """While the dry run quantizes: bnb's code tables as fake tensors, made once instead of once per layer.

    bnb builds the 16-entry 4-bit table from a Python list on every quantize_4bit call and passes its
    real 256-entry dynamic map (module-level, so it must stay real) to every double quantization;
    under the fake mode each is a real-to-fake conversion (~1 ms per linear layer). The same tensors
    result: a fresh 16-entry table per layer, one shared dynamic map on the device (counted once).
    """

    def __enter__(self):
        import bitsandbytes.functional as F
        from torch._subclasses.fake_tensor import FakeTensor

        self._F = F
        self._get = get = F.get_4bit_type
        self._dynamic = F.name2qmap.get("dynamic")
        mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
        if mode is None:
            return self
        tables: dict = {}

        def get_4bit_type(typename, device=None, blocksize=64):
            key = (typename, blocksize)
            if key not in tables:
                tables[key] = get(typename, device=device, blocksize=blocksize)
            return tables[key].clone()

        F.get_4bit_type = get_4bit_type
        if self._dynamic is not None and not isinstance(self._dynamic, FakeTensor):
            fake = mode.from_tensor(self._dynamic)
            if hasattr(mode, "add"):  # the dry run's tracking mode: the device copy is memory
                mode.add(fake)
            F.name2qmap["dynamic"] = fake
        return self

    def __exit__(self, *exc):
        self._F.get_4bit_type = self._get
        if self._dynamic is not None:
            self._F.name2qmap["dynamic"] = self._dynamic
        return False
