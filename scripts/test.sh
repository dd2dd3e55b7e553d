#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests on tiny models + real SmolLM2 integration).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
. .venv/bin/activate
ruff check src tests scripts examples
python -m pytest -q "$@"
