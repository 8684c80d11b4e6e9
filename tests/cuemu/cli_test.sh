#!/usr/bin/env bash
# The muonforge command line on the emulated CUDA backend (muonforge_cuemu), as a user runs it:
#   cli_test.sh MUONFORGE_CUEMU REPO_ROOT
# - train on "cuda": memory plan, per-step lines, eval, checkpoints;
# - --stop-at 3 then the same command again resumes and ends with the same bytes as one
#   uninterrupted run (model and optimizer state);
# - the same run on the CPU backend: per-step losses within 2e-2 (bf16 vs f32), and within 1e-4
#   with train.precision fp32 on cuda (and torch_parity's PyTorch reference agrees, when present);
# - an MoE model trains on "cuda" and logs expert load, and in fp32 matches the CPU within 1e-4
#   up to the first step whose routing differs (a near-tie: one token at most, or the test fails);
# - bench prints its figures and a region profile; sample reads a CUDA-trained checkpoint on "cuda" and on "cpu".
set -euo pipefail
bin=$(realpath "$1")
root=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL: $*" >&2; exit 1; }
# same_losses LABEL A/metrics.jsonl B/metrics.jsonl STEPS TOL [N]: both runs logged STEPS losses,
# and every step's losses (the first N only, when given) agree within TOL.
same_losses() {
  python3 - "$@" <<'PY' || fail "$1: the losses differ"
import json, sys
label, a, b, steps, tol = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
def losses(p):
    return [r["loss"] for r in map(json.loads, open(p)) if "loss" in r]
g, c = losses(a), losses(b)
assert len(g) == len(c) == steps, (len(g), len(c))
if len(sys.argv) > 6:  # the first N steps only
    g, c = g[:int(sys.argv[6])], c[:int(sys.argv[6])]
worst = max(abs(x - y) for x, y in zip(g, c))
print("%s: worst |loss diff| %.2e over %d steps" % (label, worst, len(g)))
assert worst <= tol, (g, c)
PY
}

python3 "$root/scripts/prepare_data.py" default --out data > /dev/null
common=(--set model.n_heads=2 --set model.n_kv_heads=1 --set train.seq_len=64 --set train.micro_batch=2
        --set train.batch_tokens=256 --set train.max_steps=6 --set schedule.warmup=2 --set train.log_every=1
        --set train.eval_every=3 --set train.eval_batches=1 --set train.ckpt_every=3
        --set 'data.train=data/train_*.bin' --set 'data.val=data/val_*.bin')

echo "== train on cuda, uninterrupted"
"$bin" train "$root/configs/tiny.json" "${common[@]}" --set train.device=cuda --set run.dir=whole > whole.log 2>&1 ||
  { tail -20 whole.log; fail "train on cuda"; }
grep -q "memory plan (cuda" whole.log || fail "no memory plan in whole.log"
grep -q "step 6/6 | loss" whole.log || fail "no step 6 line"
grep -q "val loss" whole.log || fail "no val loss line"
[ -f whole/ckpt-000006/model.safetensors ] || fail "no final checkpoint"

echo "== a bad MF_ATTN_FWD_MTILES is an error that names it"
if MF_ATTN_FWD_MTILES=3 "$bin" train "$root/configs/tiny.json" "${common[@]}" --set train.device=cuda \
    --set run.dir=badenv > badenv.log 2>&1; then fail "MF_ATTN_FWD_MTILES=3 was accepted"; fi
grep -q "MF_ATTN_FWD_MTILES='3': expected 1 or 2" badenv.log || { cat badenv.log; fail "no clear error for MF_ATTN_FWD_MTILES=3"; }

echo "== no GPU, no driver, an old driver, more local ranks than GPUs (CUEMU_DEVICES)"
one=(--set train.max_steps=1 --set schedule.warmup=0 --set train.eval_every=0 --set train.ckpt_every=0)
CUEMU_DEVICES=0 "$bin" train "$root/configs/tiny.json" "${common[@]}" "${one[@]}" --set train.device=auto \
    --set run.dir=nodev > nodev.log 2>&1 || { tail -20 nodev.log; fail "auto without a GPU did not train on the CPU"; }
grep -q "memory plan (cpu" nodev.log || { cat nodev.log; fail "auto without a GPU: no CPU memory plan"; }
CUEMU_DEVICES=no-driver "$bin" train "$root/configs/tiny.json" "${common[@]}" "${one[@]}" --set train.device=auto \
    --set run.dir=nodrv > nodrv.log 2>&1 || { tail -20 nodrv.log; fail "auto without a driver did not train on the CPU"; }
if CUEMU_DEVICES=0 "$bin" train "$root/configs/tiny.json" "${common[@]}" "${one[@]}" --set train.device=cuda \
    --set run.dir=nodev2 > nodev2.log 2>&1; then fail "train.device cuda ran without a GPU"; fi
grep -q 'train.device is "cuda" but no CUDA device is visible' nodev2.log || { cat nodev2.log; fail "no clear error for cuda without a GPU"; }
if CUEMU_DEVICES=old-driver "$bin" train "$root/configs/tiny.json" "${common[@]}" "${one[@]}" --set train.device=auto \
    --set run.dir=olddrv > olddrv.log 2>&1; then fail "auto with a driver too old trained (on the CPU?)"; fi
grep -q "cudaErrorInsufficientDriver.*the driver supports CUDA 12.0, this build needs 13.0" olddrv.log ||
  { cat olddrv.log; fail "no clear error for a driver too old"; }
if CUEMU_DEVICES=2 RANK=2 LOCAL_RANK=2 WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 "$bin" train "$root/configs/tiny.json" \
    "${common[@]}" "${one[@]}" --set train.world_size=3 --set train.batch_tokens=384 --set train.device=cuda --set run.dir=ranks > ranks.log 2>&1; then
  fail "LOCAL_RANK 2 with 2 GPUs was accepted"; fi
grep -q "LOCAL_RANK 2 has no GPU of its own: 2 are visible" ranks.log || { cat ranks.log; fail "no clear error for LOCAL_RANK 2 of 2 GPUs"; }

echo "== train on cuda, stopped at 3 and resumed"
"$bin" train "$root/configs/tiny.json" "${common[@]}" --set train.device=cuda --set run.dir=split --stop-at 3 > split1.log 2>&1 ||
  { tail -20 split1.log; fail "train --stop-at 3"; }
[ -f split/ckpt-000003/model.safetensors ] || fail "no checkpoint at the stop"
[ ! -e split/ckpt-000006 ] || fail "--stop-at 3 ran on"
"$bin" train "$root/configs/tiny.json" "${common[@]}" --set train.device=cuda --set run.dir=split > split2.log 2>&1 ||
  { tail -20 split2.log; fail "resume"; }
grep -qi "resum" split2.log || fail "the second run did not say it resumed"
for f in model.safetensors optimizer.safetensors; do
  cmp -s whole/ckpt-000006/$f split/ckpt-000006/$f || fail "$f after resume differs from the uninterrupted run"
done

echo "== the same run on the cpu backend"
"$bin" train "$root/configs/tiny.json" "${common[@]}" --set train.device=cpu --set run.dir=cpu > cpu.log 2>&1 ||
  { tail -20 cpu.log; fail "train on cpu"; }
same_losses "cuda vs cpu" whole/metrics.jsonl cpu/metrics.jsonl 6 2e-2
python3 - whole/metrics.jsonl <<'PY' || fail "the cuda run did not learn"
import json, sys
g = [r["loss"] for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
assert g[-1] < g[0] - 0.5, g
PY

echo "== train.precision fp32 on cuda: the cpu run's losses, step by step"
"$bin" train "$root/configs/tiny.json" "${common[@]}" --set train.device=cuda --set train.precision=fp32 \
  --set run.dir=fp32 > fp32.log 2>&1 || { tail -20 fp32.log; fail "train on cuda in fp32"; }
same_losses "cuda fp32 vs cpu" fp32/metrics.jsonl cpu/metrics.jsonl 6 1e-4
if "$bin" train "$root/configs/tiny.json" "${common[@]}" --set train.device=cuda --set train.precision=fp32 \
    --set model.attention=cudnn --set run.dir=fp32cudnn > fp32cudnn.log 2>&1; then
  fail "train.precision fp32 with model.attention cudnn was accepted"
fi
grep -q 'cuDNN.s attention takes bf16 only' fp32cudnn.log || { cat fp32cudnn.log; fail "no clear error for fp32 + cudnn"; }
# Against scripts/torch_parity.py's PyTorch reference, where Debian's python3-torch is installed.
tpy=${MF_TORCH_PYTHON:-/usr/bin/python3}
if "$tpy" -c 'import torch' > /dev/null 2>&1; then
  "$tpy" "$root/scripts/torch_parity.py" "$root/configs/tiny.json" --binary "$bin" --work parity \
    --steps 3 --threads 2 "${common[@]}" --set train.max_steps=30 --set train.device=cuda \
    --set train.precision=fp32 > parity.log 2>&1 || { tail -30 parity.log; fail "torch_parity in fp32 on cuda"; }
  grep -q "on muonforge's CUDA (fp32) backend" parity.log || { cat parity.log; fail "torch_parity did not see fp32 CUDA"; }
  grep -a "^torch_parity: PASS" parity.log
  # MoE: the routing read back from the device (train --dump-routing) decides the near-ties.
  "$tpy" "$root/scripts/torch_parity.py" "$root/configs/moe-tiny.json" --binary "$bin" --work parity \
    --steps 3 --threads 2 "${common[@]}" --set train.max_steps=30 --set train.device=cuda \
    --set train.precision=fp32 > parity_moe.log 2>&1 || { tail -30 parity_moe.log; fail "moe torch_parity in fp32 on cuda"; }
  grep -q "on muonforge's CUDA (fp32) backend" parity_moe.log || { cat parity_moe.log; fail "moe torch_parity did not see fp32 CUDA"; }
  grep -q "^routing: .* 0 differ beyond that" parity_moe.log || { cat parity_moe.log; fail "moe torch_parity: no routing line"; }
  grep -a "^torch_parity: PASS" parity_moe.log
else
  echo "no PyTorch in $tpy: torch_parity in fp32 on cuda not run"
fi

echo "== moe on cuda"
"$bin" train "$root/configs/moe-tiny.json" "${common[@]}" --set train.device=cuda --set train.max_steps=3 \
  --set run.dir=moe > moe.log 2>&1 || { tail -20 moe.log; fail "moe train on cuda"; }
grep -q "step 3/3 | loss" moe.log || fail "no moe step 3 line"
python3 - moe/metrics.jsonl <<'PY'
import json, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
assert len(steps) == 3, len(steps)
for r in steps:
    moe = r["moe"]  # expert load per layer, aux loss, drops
    assert moe["layers"] and moe["dropped"] == 0, moe
    for l in moe["layers"]:  # tokens routed, the balancing biases moving
        assert l["load_max"] > 0 and l["load_max"] >= l["load_min"] >= 0 and l["bias_max"] > l["bias_min"], l
print("moe: load_cv_max %s at the last step" % steps[-1]["moe"].get("load_cv_max"))
PY

echo "== moe with train.precision fp32 on cuda: the cpu run's losses (per-expert f32 GEMMs; the"
echo "   routers in the main group, so Muon steps them too: optim.router matrix)"
for dev in cuda cpu; do
  "$bin" train "$root/configs/moe-tiny.json" "${common[@]}" --set train.device=$dev --set train.max_steps=3 \
    --set train.precision=fp32 --set train.eval_every=0 --set optim.router=matrix \
    --set run.dir=moe32$dev --dump-routing routes32$dev.bin > moe32$dev.log 2>&1 ||
    { tail -20 moe32$dev.log; fail "moe fp32 train on $dev"; }
done
# A token whose k-th and (k+1)-th router scores tie within the two backends' rounding may go to
# other experts on each, and the bias update then parts the runs from the next step on: the
# losses are compared up to the first step whose routing differs (the routing files say which).
steps=$(python3 - routes32cuda.bin routes32cpu.bin 3 <<'PY'
import sys
a, b, steps = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read(), int(sys.argv[3])
assert len(a) == len(b) and len(a) % steps == 0, (len(a), len(b))
per = len(a) // steps
same = next((s for s in range(steps) if a[s * per:(s + 1) * per] != b[s * per:(s + 1) * per]), steps)
if same < steps:
    # A near-tie moves one token (top_k entries at most); a broken router or top-k many more.
    import array
    x, y = array.array("i"), array.array("i")
    x.frombytes(a[same * per:(same + 1) * per])
    y.frombytes(b[same * per:(same + 1) * per])
    n = sum(1 for i, j in zip(x, y) if i != j)
    assert n <= 4, "the routing differs in %d entries at step %d: not a near-tie" % (n, same + 1)
    print("moe: the routing first differs at step %d, in %d entries (a near-tie): losses "
          "compared before it" % (same + 1, n), file=sys.stderr)
print(same)
PY
) || fail "the moe routing files"
if [ "$steps" -gt 0 ]; then
  same_losses "moe cuda fp32 vs cpu" moe32cuda/metrics.jsonl moe32cpu/metrics.jsonl 3 1e-4 "$steps"
fi

echo "== bench on cuda"
"$bin" bench "$root/configs/tiny.json" --device cuda --set model.n_heads=2 --set model.n_kv_heads=1 \
  --seq-len 64 --micro-batch 2 --batch-tokens 256 --steps 2 --warmup 1 --gemm-size 64 --profile 1 > bench.log 2>&1 ||
  { tail -20 bench.log; fail "bench on cuda"; }
# --profile times regions with CUDA events (cudaEventElapsedTime between recorded, timed events).
for want in "throughput" "MFU" "time split" "Muon" "peak device used" "region (exclusive time)" \
            "fwd.attention" "bwd.mlp_down" "opt.matrix"; do
  grep -q "$want" bench.log || fail "bench printed no '$want'"
done
grep -Eq "tensors [1-9][0-9]* MiB" bench.log || fail "bench counted no device memory"

echo "== sample a cuda-trained checkpoint"
"$bin" sample whole --device cuda --tokens 20 --greedy --ids > sample_cuda.txt 2> sample_cuda.err ||
  { cat sample_cuda.err; fail "sample on cuda"; }
"$bin" sample whole --device cpu --tokens 20 --greedy --ids > sample_cpu.txt 2> sample_cpu.err ||
  { cat sample_cpu.err; fail "sample on cpu"; }
[ -s sample_cuda.txt ] || fail "sample on cuda printed nothing"
echo "cuda: $(head -c 120 sample_cuda.txt)"
echo "cpu:  $(head -c 120 sample_cpu.txt)"
echo "PASS"
