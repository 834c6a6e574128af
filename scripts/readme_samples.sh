#!/usr/bin/env bash
# Regenerate the README's Demo and Command line samples on the current engine:
# docs/samples/demo.txt (the demo's stdout) and docs/samples/cli.txt (the CLI's
# stdout and summary line). tests/test_demo.py checks that every line the README
# quotes from them is in these files, so a README sample is always one this script
# printed. About 5 minutes on a shared 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p docs/samples
.venv/bin/python examples/demo.py > docs/samples/demo.txt
.venv/bin/python -m shared_core "Continue this movie review in one sentence: The dialogue is stiff, the lighting is flat, and" \
  --fast --compare --max-new-tokens 24 > docs/samples/cli.txt 2> docs/samples/cli.stderr.txt
# The summary line (stderr) without the progress bar's carriage-return frames.
tr '\r' '\n' < docs/samples/cli.stderr.txt | grep -v '^ *$' | grep -v 'it/s\|tok/s\|%|' \
  >> docs/samples/cli.txt || true
rm -f docs/samples/cli.stderr.txt
echo "wrote docs/samples/demo.txt and docs/samples/cli.txt"
