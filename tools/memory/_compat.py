"""Old module names kept working: `tools.simulator` and `tools._fake_bnb` forward to tools.memory.

`forward_module(name, targets)` turns the module `name` into a view of `targets`: reading an
attribute reads it from the first target module that defines it (also under its old `_private`
name: `_make_tracker` -> `make_tracker`), and setting one sets it there, so code (and tests'
monkeypatch, set and undo) written against the old single module still reads and changes the live
state. Each name, once resolved, becomes a property of the shim's class (a data descriptor: what
monkeypatch expects of a live attribute). Target modules are imported on first access (the shims
themselves import no torch).
"""

from __future__ import annotations

import importlib
import sys
import types


def _find(targets: tuple[str, ...], name: str):
    if name.startswith("__"):
        return None
    names = (name, name.lstrip("_")) if name.startswith("_") else (name,)
    for n in names:
        for modname in targets:
            mod = importlib.import_module(modname)
            if n in vars(mod):
                return mod, n
    return None


def _forwarding_property(mod: types.ModuleType, attr: str) -> property:
    return property(lambda self: getattr(mod, attr), lambda self, value: setattr(mod, attr, value),
                    lambda self: delattr(mod, attr), doc=f"{mod.__name__}.{attr}")


def forward_module(name: str, targets: tuple[str, ...]) -> None:
    """Make sys.modules[name] forward attribute reads and writes to the modules `targets` (in order)."""

    class _Forwarding(types.ModuleType):
        def _resolve(self, attr: str) -> bool:
            found = _find(targets, attr)
            if found is None:
                return False
            setattr(_Forwarding, attr, _forwarding_property(*found))
            return True

        def __getattr__(self, attr):  # only called for names not resolved yet
            if not self._resolve(attr):
                raise AttributeError(f"module {name!r} has no attribute {attr!r} (its code lives in {', '.join(targets)})")
            return getattr(self, attr)

        def __setattr__(self, attr, value):
            if attr not in type(self).__dict__:
                self._resolve(attr)
            super().__setattr__(attr, value)  # the property's setter, or the shim's own dict

        def __dir__(self):
            return sorted({n for t in targets for n in vars(importlib.import_module(t))})

    sys.modules[name].__class__ = _Forwarding
