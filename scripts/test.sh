#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite offline, lint and types included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check shared_core langchain_rain llama_index_rain tests benchmarks examples
.venv/bin/mypy shared_core langchain_rain llama_index_rain
RAIN_LLAMA_SERVER="$(bash scripts/llama_server.sh)"; export RAIN_LLAMA_SERVER  # served tests: built once, cached
.venv/bin/python -m pytest "$@"
