#!/usr/bin/env bash
# The GPU-scale µP / Muon-vs-AdamW sweep in device-call-sized sittings (issue "µP hyperparameter
# transfer"; docs/reproduction.md, docs/gpu.md). On the device machine, in the checkout:
#
#   bash scripts/gpu_sweep.sh $OUT                  carry [".devbuild", ".devdata"] (+ ".devsweep")
#
# 1. finds the binaries and libraries (scripts/device_env.sh, from .devbuild);
# 2. tokenises the Gutenberg books carried in .devdata (scripts/pack_device.sh --sweep-data) with
#    GPT-2 BPE into data/gutenberg_gpt2/ (once per machine; ~35M train tokens);
# 3. copies the runs of earlier sittings from .devsweep/runs (finished ones are skipped);
# 4. runs scripts/sweep.py on configs/sweeps/muon_vs_adamw_gpu_sitting.json until the budget is
#    nearly spent, then stops it (SIGINT: the running trainer checkpoints; that run starts over
#    next sitting, since checkpoints are not carried back);
# 5. writes OUT/summary.txt (runs done, the results table), OUT/results.csv,
#    OUT/sweep-runs.tgz (every run without its checkpoints: metrics, logs, status; unpack it
#    into .devsweep/ here and carry it next time), OUT/plots.tgz (when matplotlib is there).
#
# Options: --budget S (default 540), --sweep FILE, --reduced (the sweep file's reduced grid),
#   --set KEY=VALUE (to every run; keep them the same across sittings), --data-src DIR (default
#   .devdata), --data-dir DIR (tokenised shards; default data/gutenberg_gpt2, which the sweep
#   file names), --tokenizer gpt2|byte, --runs-dir DIR (default runs/sweep-NAME), --prev DIR
#   (default .devsweep), --binary PATH (skip device_env.sh: CPU tests).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,/^[^#]/{/^#/p}' "$0"; }  # the comment block above
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
OUTDIR="${1:-}"
[ -n "$OUTDIR" ] && [ "${OUTDIR#-}" = "$OUTDIR" ] || { usage; exit 2; }
shift
BUDGET=540
SWEEP="$REPO/configs/sweeps/muon_vs_adamw_gpu_sitting.json"
REDUCED=()
SETS=()
DATA_SRC="$REPO/.devdata"
PREV="$REPO/.devsweep"
DATA="$REPO/data/gutenberg_gpt2"
TOKENIZER=gpt2
SOUT=""
BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="$2"; shift ;;
    --sweep) SWEEP="$2"; shift ;;
    --reduced) REDUCED=(--reduced) ;;
    --set) SETS+=(--set "$2"); shift ;;
    --data-src) DATA_SRC="$2"; shift ;;
    --prev) PREV="$2"; shift ;;
    --data-dir) DATA="$2"; shift ;;
    --tokenizer) TOKENIZER="$2"; shift ;;
    --runs-dir) SOUT="$2"; shift ;;
    --binary) BIN="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_sweep: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

T0=$(date +%s)
remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$REPO" || exit 1  # the sweep file's data paths are relative to the checkout
DEV_WORK="${MF_SWEEP_WORK:-/tmp/mf_gpu_sweep}"
rm -rf "$DEV_WORK"
mkdir -p "$DEV_WORK"
LOG="$OUTDIR/gpu_sweep.log"
: >"$LOG"
say() { echo "gpu_sweep: $*" | tee -a "$LOG"; }

if [ -z "$BIN" ]; then
  # shellcheck source=device_env.sh
  source "$REPO/scripts/device_env.sh" || exit 1
else
  export MF_BINARY="$BIN" PYTHONUNBUFFERED=1
fi
say "binary $BIN, budget ${BUDGET}s, sweep $SWEEP ${REDUCED[*]:-} ${SETS[*]:-}"

# ---- data ----------------------------------------------------------------------------------------
if ! ls "$DATA"/train_*.bin >/dev/null 2>&1; then
  train=$(ls "$DATA_SRC"/train*.txt* 2>/dev/null | head -1)
  val=$(ls "$DATA_SRC"/val*.txt* 2>/dev/null | head -1)
  if [ -z "$train" ] || [ -z "$val" ] || { [ "$TOKENIZER" = gpt2 ] && [ ! -f "$DATA_SRC/gpt2/encoder.json" ]; }; then
    say "no data: $DATA_SRC must hold train*.txt[.xz], val*.txt[.xz] and gpt2/{encoder.json,vocab.bpe}" \
        "(here: scripts/pack_device.sh --sweep-data, then carry .devdata)"
    exit 1
  fi
  say "tokenising $(basename "$train") and $(basename "$val") ($TOKENIZER, $(nproc) workers)"
  t1=$(date +%s)
  tok_args=(--tokenizer "$TOKENIZER")
  [ "$TOKENIZER" = gpt2 ] && tok_args+=(--gpt2-dir "$DATA_SRC/gpt2")
  python3 "$REPO/scripts/prepare_data.py" text "$train" --val "$val" --out "$DATA" \
    "${tok_args[@]}" --workers "$(nproc)" >>"$LOG" 2>&1 || {
    say "tokenisation failed: see $LOG"; tail -5 "$LOG"; exit 1; }
  say "tokenised in $(( $(date +%s) - t1 ))s: $(ls "$DATA" | tr '\n' ' ')"
fi

# ---- earlier sittings ----------------------------------------------------------------------------
NAME=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$SWEEP") || exit 1
[ -n "$SOUT" ] || SOUT="$REPO/runs/sweep-$NAME"
mkdir -p "$SOUT/runs"
if [ -d "$PREV/runs" ]; then
  n=0
  for d in "$PREV"/runs/*/; do
    [ -d "$d" ] || continue
    r=$(basename "$d")
    [ -e "$SOUT/runs/$r" ] && continue
    cp -r "$d" "$SOUT/runs/$r" && n=$((n + 1))
  done
  say "carried in $n run(s) of earlier sittings from $PREV"
fi

# ---- the sweep -----------------------------------------------------------------------------------
left=$(( $(remaining) - 45 ))  # time to stop the trainer, collect and pack
if [ "$left" -lt 30 ]; then
  say "no time left for training (budget ${BUDGET}s)"
else
  say "sweep for up to ${left}s"
  # SIGINT: sweep.py stops the running trainer, which checkpoints, and exits 130.
  timeout -s INT -k 30 "$left" python3 "$REPO/scripts/sweep.py" "$SWEEP" --out "$SOUT" \
    --binary "$BIN" --jobs 1 "${REDUCED[@]}" "${SETS[@]}" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) say "every run of the sweep is finished" ;;
    124|130) say "stopped at the budget (rc $rc): run this again, carrying the runs back in" ;;
    *) say "sweep.py exited with $rc: see the run logs in sweep-runs.tgz"; tail -5 "$LOG" ;;
  esac
fi

# ---- results -------------------------------------------------------------------------------------
python3 "$REPO/scripts/sweep.py" "$SWEEP" --out "$SOUT" --binary "$BIN" --collect-only \
  "${REDUCED[@]}" "${SETS[@]}" >>"$LOG" 2>&1
[ -f "$SOUT/results.csv" ] && cp "$SOUT/results.csv" "$OUTDIR/results.csv"
tar -C "$SOUT" --exclude='ckpt-*' --exclude='.tmp-ckpt-*' --exclude='latest' -czf "$OUTDIR/sweep-runs.tgz" \
  runs $(cd "$SOUT" && ls -d results.csv sweep.json logs 2>/dev/null)
if python3 -c 'import matplotlib' 2>/dev/null; then
  python3 "$REPO/scripts/plot.py" "$SOUT" --out "$DEV_WORK/plots" >>"$LOG" 2>&1 &&
    tar -C "$DEV_WORK" -czf "$OUTDIR/plots.tgz" plots
fi
{
  echo "gpu_sweep: $NAME, $(( $(date +%s) - T0 ))s of ${BUDGET}s"
  if [ -f "$SOUT/results.csv" ]; then
    python3 - "$SOUT/results.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
done = [r for r in rows if r["status"] == "done"]
print(f"{len(done)} of {len(rows)} runs done")
print(f"{'run':32s} {'status':12s} {'val loss':>9s} {'train loss':>10s} {'wall s':>7s}")
for r in rows:
    v = r.get("final_val_loss") or "-"
    t = r.get("final_train_loss") or "-"
    fmt = lambda x: f"{float(x):.4f}" if x not in ("", "-") else "-"
    print(f"{r['run']:32s} {r['status']:12s} {fmt(v):>9s} {fmt(t):>10s} {r.get('wall_s') or '-':>7s}")
EOF
  fi
} >"$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt"
