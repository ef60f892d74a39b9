#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then plan a fine-tune of a bundled
# model on a catalog GPU. No network, no LLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/tunepilot plan meta-llama/Llama-3.1-8B --gpu "RTX 4090" --seq-len 2048 \
  --dataset-examples 20000 -o setup.yaml "$@"
.venv/bin/tunepilot script setup.yaml -o train.py
echo "Wrote setup.yaml and train.py (run: python train.py --help)"
