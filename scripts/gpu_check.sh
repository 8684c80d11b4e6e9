#!/usr/bin/env bash
# The GPU checks of muonforge, for the lent device machine (one H200). docs/gpu.md says when and
# how to call it; in short, here (no GPU): scripts/pack_device.sh, then one device call per part:
#
#   bash scripts/gpu_check.sh $OUT --part 1     # environment, [gpu] tests, e2e, launcher, sanitizer
#   bash scripts/gpu_check.sh $OUT --part 2     # muonforge vs PyTorch benchmarks at seq 1024
#   bash scripts/gpu_check.sh $OUT --part 3     # ... at seq 2048
#   bash scripts/gpu_check.sh $OUT --part 4     # MoE (moe-moonlight-small) beside the dense 124M
#   bash scripts/gpu_check.sh $OUT --quick      # part 1 without the sanitizer + 124m-1024 bench
#
# Every step runs under a timeout and the whole call stays inside --budget seconds (default 540,
# under the device's 10-minute limit per command). Logs go to a work folder and come back as
# OUTDIR/logs.tgz (the device returns at most 8 files); OUTDIR/summary.txt holds the table that
# is also printed last (step, status, seconds, key figure); benchmark parts add
# OUTDIR/results.jsonl and OUTDIR/benchmarks.md.
#
# The binaries come from .devbuild/devbuild.tar.xz (scripts/pack_device.sh) or, failing that,
# from build-device/ or build/ built on the device itself (scripts/device_env.sh; docs/gpu.md).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,/^[^#]/{/^#/p}' "$0"; }  # the comment block above
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
OUTDIR="${1:-}"
[ -n "$OUTDIR" ] && [ "${OUTDIR#-}" = "$OUTDIR" ] || { usage; exit 2; }
shift
PART=1
QUICK=0
BUDGET=540
BENCH_STEPS=4
BENCH_WARMUP=2
while [ $# -gt 0 ]; do
  case "$1" in
    --part) PART="$2"; shift ;;
    --quick) QUICK=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --bench-steps) BENCH_STEPS="$2"; shift ;;
    --bench-warmup) BENCH_WARMUP="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$PART" in 1|2|3|4) ;; *) echo "gpu_check: --part must be 1, 2, 3 or 4" >&2; exit 2 ;; esac

T0=$(date +%s)
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="${MF_GPU_WORK:-/tmp/mf_gpu_check}"
rm -rf "$WORK"
mkdir -p "$WORK/logs"
LOGS="$WORK/logs"
SUMMARY="$WORK/summary.tsv"
: >"$SUMMARY"
NSTEP=0

remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# step NAME TIMEOUT_S COMMAND: runs COMMAND (bash) with its output in logs/NN_NAME.log. Status:
# PASS (rc 0), FAIL rc=N, TIMEOUT, SKIP (budget spent). Key figure: the last "KEY: " line of the
# log, else Catch2's result line.
step() {
  local name="$1" tmo="$2" cmd="$3"
  NSTEP=$((NSTEP + 1))
  local log
  log="$LOGS/$(printf '%02d' "$NSTEP")_${name}.log"
  local left
  left=$(( $(remaining) - 20 ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tSKIP\t0\tbudget spent\n' "$name" >>"$SUMMARY"
    echo "== $name: SKIP (budget spent)"
    return
  fi
  [ "$tmo" -gt "$left" ] && tmo="$left"
  echo "== $name (timeout ${tmo}s)"
  local t1 rc status key
  t1=$(date +%s)
  { echo "\$ $cmd"; echo; } >"$log"
  timeout -k 10 "$tmo" bash -c "$cmd" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL rc=$rc" ;;
  esac
  key=$(grep -a '^KEY: ' "$log" | tail -1 | cut -c6-)
  [ -z "$key" ] && key=$(grep -aE 'All tests passed|Passed all|Passed [0-9]+ test|test cases:|No tests ran' "$log" | tail -1)
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t1 ))" "${key:0:110}" >>"$SUMMARY"
  echo "   -> $status ($(( $(date +%s) - t1 )) s) $key"
  tail -n 4 "$log" | sed 's/^/      /'
}

finish() {
  {
    printf 'gpu_check part %s%s on %s, %s s of %s budget\n' "$PART" "$([ $QUICK = 1 ] && echo ' (quick)')" \
      "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" \
      "$(( $(date +%s) - T0 ))" "$BUDGET"
    printf '%-22s %-12s %5s  %s\n' STEP STATUS SEC "KEY FIGURE"
    while IFS=$'\t' read -r n s t k; do printf '%-22s %-12s %5s  %s\n' "$n" "$s" "$t" "$k"; done <"$SUMMARY"
    # model.attention "auto" goes on with flash when cuDNN fails or disagrees with flash (a
    # warning in some log): the first thing to look into, so the table names it.
    local cudnn
    cudnn=$(grep -rahoE 'model.attention = "auto": cuDNN[^;]*' "$WORK" 2>/dev/null | sort | uniq -c | head -5)
    [ -n "$cudnn" ] && printf 'cuDNN attention fell back to flash:\n%s\n' "$cudnn"
  } >"$OUTDIR/summary.txt"
  tar -C "$WORK" -czf "$OUTDIR/logs.tgz" logs 2>/dev/null
  [ -f "$WORK/bench/results.jsonl" ] && cp "$WORK/bench/results.jsonl" "$OUTDIR/results.jsonl"
  [ -f "$WORK/bench/benchmarks.md" ] && cp "$WORK/bench/benchmarks.md" "$OUTDIR/benchmarks.md"
  echo
  cat "$OUTDIR/summary.txt"
}
trap finish EXIT

# ---- binaries and libraries --------------------------------------------------------------------
DEV_WORK="$WORK"
# shellcheck source=device_env.sh
source "$REPO/scripts/device_env.sh" || exit 1
echo "gpu_check: part $PART, binaries $BIN_DIR"
echo "gpu_check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ---- part 1: correctness -----------------------------------------------------------------------
part1() {
  step env 60 "
    nvidia-smi -L || { echo 'KEY: NO GPU VISIBLE (nvidia-smi -L failed)'; exit 1; }
    nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    nvcc --version | tail -2
    python3 -c 'import torch; print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.is_available(), \"cudnn\", torch.backends.cudnn.version(), \"nccl\", torch.cuda.nccl.version())' || echo 'KEY: torch cannot report its CUDA libraries'
    python3 -c 'import torch; a = torch.randn(256, 256, device=\"cuda\", dtype=torch.bfloat16); print(\"torch cuda matmul ok\", float((a @ a).float().abs().sum()) > 0)' || echo 'KEY: TORCH CUDA MATMUL FAILS with this LD_LIBRARY_PATH (torch steps will fail)'
    command -v compute-sanitizer && compute-sanitizer --version | tail -1
    cat '$REPO/.devbuild/MANIFEST.txt' 2>/dev/null | head -6
    echo; echo 'ldd muonforge:'; ldd '$BIN'
    miss=\$(for b in '$BIN' '$TESTS'/test_*; do ldd \"\$b\"; done | grep 'not found' | sort -u)
    if [ -n \"\$miss\" ]; then echo \"KEY: MISSING LIBRARIES: \$miss\" | tr '\n' ' '; echo; exit 1; fi
    '$BIN' --help >/dev/null || exit 1
    echo \"KEY: \$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1); all libraries resolve\""

  step test_cuda_smoke 240 "'$TESTS/test_cuda_smoke' --order decl -r compact"
  step test_ops_gpu 300 "'$TESTS/test_ops' '[gpu]' --order decl -r compact"
  step test_gpu_e2e 300 "'$TESTS/test_gpu_e2e' --order decl 2>&1 | tee '$WORK/e2e.out'; rc=\${PIPESTATUS[0]}
    echo \"KEY: \$(grep -a -E '^e2e (adamw|muon): worst|^e2e determinism (adamw|muon)|^e2e nccl' '$WORK/e2e.out' | cut -c5- | cut -c1-36 | tr '\n' ';')\"
    exit \$rc"

  for t in "$TESTS"/test_*; do
    case "$(basename "$t")" in test_cuda_smoke|test_ops|test_gpu_e2e) continue ;; esac
    step "$(basename "$t")_gpu" 120 "'$t' '[gpu]' --order decl -r compact"
  done

  step train_parity 240 "python3 '$REPO/scripts/gpu_train_parity.py' --binary '$BIN' --work '$WORK/train'"
  # The CUDA run against scripts/torch_parity.py's PyTorch reference (fp32 on the host), on the
  # shard train_parity just wrote: 20 steps, every loss within 2e-2.
  step torch_parity 240 "python3 '$REPO/scripts/torch_parity.py' '$REPO/configs/tiny.json' \
    --binary '$BIN' --work '$WORK/torch_parity' --steps 20 --threads 8 --set train.device=cuda \
    --set model.vocab_size=512 --set 'data.train=$WORK/train/data/train_*.bin' --set data.val= \
    2>&1 | tee '$WORK/torch_parity.out'; rc=\${PIPESTATUS[0]}
    echo \"KEY: \$(grep -a '^torch_parity: \(PASS\|FAIL\)' '$WORK/torch_parity.out' | cut -c15-90)\"
    exit \$rc"
  # train.precision fp32 (f32 GEMMs without TF32, f32 attention and cross-entropy kernels, Muon's
  # Newton-Schulz in f32): the PyTorch fp32 reference's tolerances, 1e-4 per loss and 1e-3 per
  # weight tensor. Then the CUDA matrix-optimizer primitives in a whole run: NorMuon with Polar
  # Express and cautious wd (newton_schulz_coeffs, normuon_normalize, cautious_decay), then
  # blocked Shampoo (block_copy, gemm, cuSOLVER sym_func, adam_precond; eps above fp32 rounding,
  # docs/optimizers.md).
  for fam in "fp32:--set train.precision=fp32" \
             "normuon:--set optim.name=normuon --set optim.ns=polar_express --set optim.cautious_wd=true --set optim.wd=0.1" \
             "shampoo:--set optim.name=shampoo --set optim.lr=0.004 --set optim.shampoo.block_size=48 --set optim.shampoo.eps=1e-4 --set optim.shampoo.precond_every=2"; do
    name=${fam%%:*}
    step "torch_parity_$name" 180 "python3 '$REPO/scripts/torch_parity.py' '$REPO/configs/tiny.json' \
      --binary '$BIN' --work '$WORK/torch_parity_$name' --steps 10 --threads 8 --set train.device=cuda \
      --set model.vocab_size=512 --set 'data.train=$WORK/train/data/train_*.bin' --set data.val= \
      ${fam#*:} 2>&1 | tee '$WORK/torch_parity_$name.out'; rc=\${PIPESTATUS[0]}
      echo \"KEY: \$(grep -a '^torch_parity: \(PASS\|FAIL\)' '$WORK/torch_parity_$name.out' | cut -c15-90)\"
      exit \$rc"
  done
  # MoE in fp32 (configs/moe-tiny.json: sigmoid router, bias balancing): the expert choices read
  # back from the GPU (train --dump-routing) decide the near-ties of the PyTorch side's top-k.
  step torch_parity_moe 180 "python3 '$REPO/scripts/torch_parity.py' '$REPO/configs/moe-tiny.json' \
    --binary '$BIN' --work '$WORK/torch_parity_moe' --steps 10 --threads 8 --set train.device=cuda \
    --set model.vocab_size=512 --set 'data.train=$WORK/train/data/train_*.bin' --set data.val= \
    --set train.precision=fp32 2>&1 | tee '$WORK/torch_parity_moe.out'; rc=\${PIPESTATUS[0]}
    echo \"KEY: \$(grep -a '^torch_parity: \(PASS\|FAIL\)' '$WORK/torch_parity_moe.out' | cut -c15-90)\"
    exit \$rc"

  # The hd-64 attention forward with 1 and 2 m-tiles per warp (MF_ATTN_FWD_MTILES; kernels/
  # attention.cu; the default, 2, is FA2's shape and unmeasured until this step runs): four
  # one-step benches of the 124M model (seq 1024 and 2048, each with 1 and 2) on flash attention
  # (its config says "auto", which may pick cuDNN), printing each one's "attention alone" line
  # (forward and backward); the key figure is the forward times.
  step attention_mtiles 180 "keys=''; for T in 1024 2048; do for mt in 1 2; do
      out=\"$WORK/attn_mt\${mt}_\$T.out\"
      MF_ATTN_FWD_MTILES=\$mt '$BIN' bench '$REPO/configs/llama-124m.json' --seq-len \$T --micro-batch 8 --batch-tokens \$((8 * T)) \
        --set model.attention=flash --steps 1 --warmup 1 --no-gemm --no-muon-split >\"\$out\" 2>&1
      grep -a 'attention    alone' \"\$out\" || tail -5 \"\$out\"
      keys=\"\$keys T\$T mt\$mt \$(grep -a -o 'fwd [0-9.]* ms' \"\$out\" | head -1);\"
    done; done
    echo \"KEY:\$keys\"; grep -q 'attention    alone' '$WORK/attn_mt1_1024.out' && grep -q 'attention    alone' '$WORK/attn_mt2_1024.out'"
  # compute-sanitizer refuses the device under some runtimes (gVisor: "Device not supported";
  # docs of the device tool): probe once on one small test instead of failing three steps.
  local san_probe=""
  if [ "$QUICK" = 0 ] && command -v compute-sanitizer >/dev/null; then
    san_probe=$(timeout -k 5 60 compute-sanitizer --tool memcheck "$TESTS/test_cuda_smoke" \
      'cuda: upload/download round trips and casts' 2>&1 | grep -a -m1 -E 'Device not supported|not supported on this device|error 999')
  fi
  if [ -n "$san_probe" ]; then
    printf 'compute-sanitizer\tSKIP\t0\trefuses this device: %s\n' "${san_probe:0:60}" >>"$SUMMARY"
    echo "== compute-sanitizer: SKIP ($san_probe)"
  elif [ "$QUICK" = 0 ] && command -v compute-sanitizer >/dev/null; then
    step memcheck_smoke 420 "compute-sanitizer --tool memcheck --error-exitcode 3 \
      '$TESTS/test_cuda_smoke' --order decl -r compact; rc=\$?; echo \"KEY: memcheck rc=\$rc\"; exit \$rc"
    step racecheck_attention 240 "compute-sanitizer --tool racecheck --error-exitcode 3 \
      '$TESTS/test_cuda_smoke' '*attention*' --order decl -r compact; rc=\$?; echo \"KEY: racecheck rc=\$rc\"; exit \$rc"
    step memcheck_moe 120 "compute-sanitizer --tool memcheck --error-exitcode 3 \
      '$TESTS/test_cuda_moe' --order decl -r compact; rc=\$?; echo \"KEY: memcheck rc=\$rc\"; exit \$rc"
  elif [ "$QUICK" = 0 ]; then
    printf 'compute-sanitizer\tSKIP\t0\tnot installed\n' >>"$SUMMARY"
  fi
  # q/k/v and gate/up as stacked GEMMs (model.stack_projections, sessions 29-30; docs/cuda.md
  # "Stacked projections"), unmeasured until these steps run: two short benches at seq 1024,
  # stacked and separate, one after the other; the key figure is each one's tokens/s. The dense
  # 124M model, then the MoE one (experts' and shared experts' gate/up). Last in part 1: skipped
  # when the budget is spent.
  step stacked_projections 150 "$(stack_pair llama-124m 16)"
  step stacked_projections_moe 150 "$(stack_pair moe-moonlight-small 8)"
}

# The command of a stacked_projections step: CONFIG (configs/CONFIG.json) benched with
# model.stack_projections true, then false, at micro-batch MB x 1024.
stack_pair() {
  local cfg="$1" mb="$2"
  echo "keys=''; for st in true false; do
      out=\"$WORK/stack_${cfg}_\$st.out\"
      '$BIN' bench '$REPO/configs/$cfg.json' --seq-len 1024 --micro-batch $mb --batch-tokens $((mb * 1024)) \
        --set model.stack_projections=\$st --steps 3 --warmup 1 --no-gemm --no-muon-split >\"\$out\" 2>&1
      grep -a 'throughput' \"\$out\" || tail -5 \"\$out\"
      keys=\"\$keys stack=\$st \$(grep -a -o '[0-9]* tokens/s' \"\$out\" | head -1);\"
    done
    echo \"KEY:\$keys\"; grep -q 'throughput' '$WORK/stack_${cfg}_true.out' && grep -q 'throughput' '$WORK/stack_${cfg}_false.out'"
}

# ---- parts 2 and 3: benchmarks -----------------------------------------------------------------
bench() {
  local args="$1"
  local left=$(( $(remaining) - 40 ))
  step "bench_$2" "$left" "python3 '$REPO/scripts/bench_compare.py' run --out '$WORK/bench' \
     --binary '$BIN' --python python3 --steps $BENCH_STEPS --warmup $BENCH_WARMUP \
     --timeout 200 --budget $(( left - 10 )) $args ${MF_BENCH_ARGS:-}; rc=\$?
     ok=\$(grep -c '\"data\"' '$WORK/bench/results.jsonl' 2>/dev/null); all=\$(grep -c '\"kind\": \"result\"' '$WORK/bench/results.jsonl' 2>/dev/null)
     echo \"KEY: \$ok of \$all bench runs measured\"; exit \$rc"
  cp "$WORK/bench/logs/"*.log "$LOGS/" 2>/dev/null || true
}

if [ "$QUICK" = 1 ]; then
  part1
  BENCH_STEPS=2 BENCH_WARMUP=1
  bench "--cases 124m-1024" quick
elif [ "$PART" = 1 ]; then
  part1
elif [ "$PART" = 2 ]; then
  bench "--seq 1024" seq1024
elif [ "$PART" = 3 ]; then
  bench "--seq 2048" seq2048
else
  bench "--moe" moe
fi
