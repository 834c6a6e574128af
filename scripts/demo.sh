#!/usr/bin/env bash
# Set up (if needed) and run the demo: vanilla vs RAIN on the embedded SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python examples/demo.py "$@"
