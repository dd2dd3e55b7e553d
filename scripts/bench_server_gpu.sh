#!/usr/bin/env bash
# The GPU figures of `mobillm bench server`, as one short run on a machine with CUDA:
#   1. the batched-equals-alone test on CUDA;
#   2. the training alone (taps already decoded on the GPU, B8xT128 rows, every row in the
#      loss) for the SmolLM2-135M and Qwen2.5-1.5B shapes, S=128, batched (TF32, the
#      server's default);
#   3. the whole server path (encoded frames, decode, chunks, acks) with SmolLM2 frames
#      recorded on SST-2 (B16, the template's last token), S=128, batched.
# Usage: scripts/bench_server_gpu.sh OUT [MOBILLM]; MOBILLM is the command that runs the CLI
# ("mobillm", or "python3 -m mobillm.cli.main" with PYTHONPATH=src). Results land in
# OUT/results.jsonl and OUT/server.md (points already there are kept); each step goes on if
# an earlier one failed. Unbatched GPU points take minutes each (one session per pool thread):
# add them with --modes unbatched when the time is there. Where a round's time goes (its CUDA
# kernels, without the devices' host work): scripts/profile_batched_round.py --device cuda.
set -uo pipefail
OUT=${1:?usage: bench_server_gpu.sh OUT [MOBILLM]}
MOBILLM=${2:-mobillm}
FRAMES=results/server/frames-smollm2-135m.safetensors
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/server/test_batching.py -k "model_shaped"
common=(bench server --device cuda --out "$OUT" --doc "$OUT/server.md" --warmup 2 --steps 5
  --round-mb 100000 --modes batched --sessions 128)
$MOBILLM "${common[@]}" --path trainer --shapes smollm2-135m,qwen2.5-1.5b --batch 8 --seq 128 \
  --frames synthetic --max-batch 128
$MOBILLM "${common[@]}" --path server --shapes smollm2-135m --batch 16 --seq 1 --frames "$FRAMES"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
