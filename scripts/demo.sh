#!/usr/bin/env bash
# Install, then run the main job: a server and a device as two processes on localhost fine-tune
# SmolLM2-135M on real tweets over gRPC, printing accuracy before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
. .venv/bin/activate
exec mobillm demo "$@"
