#!/usr/bin/env python3
"""What one training step asks of the device, measured on the emulated CUDA backend as a user runs
it: `muonforge_cuemu train` twice, for N and 2N steps, with CUEMU_STATS (tests/cuemu/README.md).
Setup, the final checkpoint and exit are the same in both runs, so their difference is what N
steady-state steps cost.

    step_costs.py MUONFORGE_CUEMU REPO_ROOT

Checks, per step after the first two:
- no cudaMalloc and no cudaFree (every buffer is allocated at setup; a cudaFree also stalls the
  device);
- drains (the host waits for every stream while work is queued, or for an event recorded after
  the last work issued: the device runs dry until the host issues more) are the same for 2 and 4 micro-batches and for 2 and 4 layers, and at most 2
  for a dense model (the loss read back for the log line, the gradient norm for clipping) and 3
  for MoE with bias balancing (at a log step the expert biases are read after the step updated
  them): a read-back added inside the layer or micro-batch loop fails here;
- event waits at most 2 per micro-batch (the upload ring's slot reuse for tokens and targets
  waits for a copy several micro-batches back), plus per MoE layer one per micro-batch (the
  routing plan's read-back, which the host needs for the balance loss) and one per step (the
  bias step's upload).
It prints the table, launches and GEMMs included, for docs/performance.md.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile


def main():
    binary, root = os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2])
    work = tempfile.mkdtemp(prefix="mf_step_costs_")
    try:
        subprocess.run([sys.executable, os.path.join(root, "scripts", "prepare_data.py"), "default",
                        "--out", os.path.join(work, "data")], check=True, stdout=subprocess.DEVNULL)
        base = ["--set", "model.n_heads=2", "--set", "model.n_kv_heads=1", "--set", "train.seq_len=64",
                "--set", "train.micro_batch=2", "--set", "schedule.warmup=1", "--set", "train.log_every=1",
                "--set", "train.eval_every=0", "--set", "train.ckpt_every=0", "--set", "data.val=",
                "--set", "data.train=" + os.path.join(work, "data", "train_*.bin"),
                "--set", "train.device=cuda"]
        # name, config, micro-batches per step, MoE layers, extra settings
        cases = [
            ("muon, 2 micro-batches", "tiny.json", 2, 0, []),
            ("muon, 4 micro-batches", "tiny.json", 4, 0, []),
            ("muon, 2 layers", "tiny.json", 2, 0, ["--set", "model.n_layers=2"]),
            ("adamw", "tiny-adamw.json", 2, 0, []),
            ("moe-tiny (muon)", "moe-tiny.json", 2, 3, []),
            ("moe-tiny, 5 layers", "moe-tiny.json", 2, 4, ["--set", "model.n_layers=5"]),
        ]
        n = 2
        rows = []
        for name, cfg, accum, moe_layers, extra in cases:
            per = {}
            for steps in (n, 2 * n):
                tag = "%s_%d" % (len(rows), steps)
                stats = os.path.join(work, tag + ".json")
                cmd = [binary, "train", os.path.join(root, "configs", cfg), *base,
                       "--set", "train.batch_tokens=%d" % (accum * 2 * 64),
                       "--set", "train.max_steps=%d" % steps,
                       "--set", "run.dir=" + os.path.join(work, "run_" + tag), *extra]
                env = dict(os.environ, CUEMU_STATS=stats)
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit("step_costs: %s (%d steps) failed:\n%s" % (name, steps, r.stdout[-3000:] + r.stderr[-3000:]))
                with open(stats) as f:
                    per[steps] = json.load(f)
            kinds = set(per[n]) | set(per[2 * n])
            d = {k: (per[2 * n].get(k, 0) - per[n].get(k, 0)) / n for k in kinds}
            rows.append((name, accum, moe_layers, d))

        keys = ["launch", "gemm", "malloc", "free", "drain", "stream_sync", "event_sync",
                "pageable_readback"]
        print("per step (steps %d..%d minus steps 1..%d, over %d):" % (n + 1, 2 * n, n, n))
        print("| case | micro-batches | " + " | ".join(keys) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
        for name, accum, _, d in rows:
            print("| %s | %d | %s |" % (name, accum, " | ".join("%g" % d.get(k, 0) for k in keys)))

        bad = []
        drains = {False: set(), True: set()}
        for name, accum, moe_layers, d in rows:
            for k in ("malloc", "free"):
                if d.get(k, 0) != 0:
                    bad.append("%s: %g %s per step (expected none after setup)" % (name, d[k], k))
            moe = moe_layers > 0
            drains[moe].add(d.get("drain", 0))
            limit = 3 if moe else 2
            if d.get("drain", 0) > limit:
                bad.append("%s: %g drains per step, expected at most %d" % (name, d["drain"], limit))
            waits = 2 * accum + moe_layers * (accum + 1)
            if d.get("event_sync", 0) > waits:
                bad.append("%s: %g event waits per step, expected at most %d" % (name, d["event_sync"], waits))
            if d.get("launch", 0) <= 0 or d.get("gemm", 0) <= 0:
                bad.append("%s: no launches or GEMMs counted (%s)" % (name, d))
        for moe, ds in drains.items():
            if len(ds) > 1:
                bad.append("%s: drains per step differ between the cases: %s (they should not depend on "
                           "the micro-batches, the layers or the optimizer)" % ("MoE" if moe else "dense", sorted(ds)))
        if bad:
            sys.exit("step_costs: FAIL\n  " + "\n  ".join(bad))
        print("step_costs: PASS")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
