"""The dry-run simulator, under its old name: the code lives in the package tools/memory/.

`tools.memory.simulate` (runner), the training step (step), the model build (build), the storage
counter and its op cache (tracker), the bitsandbytes stand-ins (quant) and the extrapolation in
depth (extrapolate): see tools/memory/__init__.py. Every old name still resolves here, and
setting one (a test's monkeypatch of `_PARALLEL`, `_run`, ...) sets it in the module that uses it.
"""

from tools.memory._compat import forward_module

forward_module(__name__, (
    "tools.memory.runner", "tools.memory.step", "tools.memory.build", "tools.memory.extrapolate",
    "tools.memory.segments", "tools.memory.tracker", "tools.memory.quant",
))
