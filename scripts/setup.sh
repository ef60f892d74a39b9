#!/usr/bin/env bash
# Create or refresh .venv with tunepilot and everything it needs (idempotent).
# torch is pinned *first* to the CPU wheel this machine ships, so the ranges in
# pyproject.toml never pull a multi-GB CUDA build; GPU users keep their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
stamp=.venv/.tunepilot-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".[train,agent,plot,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import agent, tools, prompts, torch, transformers, peft, langchain" 
  touch "$stamp"
fi
