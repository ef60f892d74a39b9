"""Library chatter that does not concern the person running tunepilot, kept off the screen at its source.

`silence_library_chatter()` (idempotent, stdlib only) installs logging filters for the few library
messages tunepilot's own work triggers and that say nothing about the user's setup:

- bitsandbytes (`bitsandbytes.backends.cpu.ops`, at import on CPUs with AVX512-BF16): "Failed to load
  CPU gemm_4bit_forward from kernels-community: No module named 'kernels' ...". It is about bnb's
  optional *CPU* 4-bit matmul kernel; the dry run never runs a real 4-bit matmul (fake tensors) and
  training runs on CUDA, so it is dropped. With no handler configured the record would reach stderr
  through logging's last-resort handler, once per process (twice with the simulator's forked child).

Every other record of those loggers still passes. transformers' config advice during a dry run is
handled where the dry run runs (`tools.memory.build.QuietTransformers`), peft's warnings where the
adapter is built (`warnings.catch_warnings` in tools.memory.build / tools.peft_config).
"""

from __future__ import annotations

import logging

# logger name -> substrings of messages to drop
_DROP: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("kernels-community",),
}
_installed = False


class _DropMessages(logging.Filter):
    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = str(record.msg)
        except Exception:  # noqa: BLE001
            return True
        return not any(n in text for n in self.needles)


def silence_library_chatter() -> None:
    """Install the filters (safe to call many times, before or after the libraries are imported)."""
    global _installed
    if _installed:
        return
    for name, needles in _DROP.items():
        logging.getLogger(name).addFilter(_DropMessages(needles))
    _installed = True
