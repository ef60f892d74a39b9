"""Shared pytest set-up: opt-in markers and an isolated user directory.

- `@pytest.mark.gpu` tests run only when CUDA is available.
- `@pytest.mark.network` tests run only with TUNEPILOT_LIVE_NETWORK=1.
- Every test gets its own TUNEPILOT_HOME (history, chat/slack databases, calibration
  record), so nothing leaks into the developer's ~/.cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cuda_available() -> bool:
    try:
        import torch
    except Exception:  # noqa: BLE001 - no torch means no CUDA
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    live = os.environ.get("TUNEPILOT_LIVE_NETWORK") == "1"
    has_gpu = None
    for item in items:
        if "gpu" in item.keywords:
            if has_gpu is None:
                has_gpu = _cuda_available()
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "network" in item.keywords and not live:
            item.add_marker(pytest.mark.skip(reason="live network test: set TUNEPILOT_LIVE_NETWORK=1"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("tunepilot_home")
    monkeypatch.setenv("TUNEPILOT_HOME", str(home))
    # Never wait on a real LLM or Hub from a test unless it sets these itself.
    for var in ("TUNEPILOT_LLM", "OPENAI_API_KEY", "OPENAI_BASE_URL", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield home
