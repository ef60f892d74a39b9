"""The bitsandbytes stand-ins, under their old name: the code lives in tools/memory/quant.py."""

from tools.memory._compat import forward_module

forward_module(__name__, ("tools.memory.quant",))
