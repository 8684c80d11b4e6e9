#!/usr/bin/env bash
# The main job: set up (idempotent), build the embedded default corpus if missing, and train the
# default config (configs/tiny.json) on it — on the GPU when one is present, else on the CPU.
#   scripts/run.sh                       # default run
#   scripts/run.sh --set train.max_steps=50
#   CONFIG=configs/llama-124m.json scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=${CONFIG:-configs/tiny.json}
PY=$(command -v python3 || command -v python)
if [ "$CONFIG" = configs/tiny.json ] && ! ls data/default/train_*.bin >/dev/null 2>&1; then
  echo "== building the default corpus (data/default) =="
  "$PY" scripts/prepare_data.py default
fi
echo "== training $CONFIG =="
exec "${MUONFORGE_BUILD_DIR:-build}/muonforge" train "$CONFIG" "$@"
