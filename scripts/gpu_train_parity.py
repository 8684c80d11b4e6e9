#!/usr/bin/env python3
"""Training-loop parity on a GPU machine (called by scripts/gpu_check.sh, part 1).

Writes synthetic llm.c token shards (a learnable affine-successor stream), then trains the same
small Llama for 20 steps three ways with `muonforge train` and compares the per-step losses
from metrics.jsonl:

  cuda         train.device=cuda, one plain process
  launch_ws1   the same through scripts/launch.py --nproc-per-node 1 (WORLD_SIZE=1: the launcher,
               environment and rendezvous path; at world size 1 the trainer uses the single
               communicator, so NCCL itself is exercised by test_gpu_e2e's [nccl] case instead)
  cpu          train.device=cpu (fp32 reference)

Pass: launch_ws1 == cuda exactly at every step, and |cuda - cpu| <= 2e-2 at every step (bf16 vs
fp32; the same tolerance as test_gpu_e2e). Standard library only.
"""
import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-2
STEPS = 20


def write_shard(path, n, vocab, seed):
    rng = random.Random(seed)
    t = rng.randrange(vocab)
    toks = []
    for _ in range(n):
        toks.append(t)
        t = (5 * t + 3) % vocab if rng.random() < 0.8 else rng.randrange(vocab)
    header = [0] * 256
    header[0], header[1], header[2] = 20240520, 1, n
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack("<%dH" % n, *toks))


def losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "loss" in j:
                out[j["step"]] = j["loss"]
    return [out.get(s) for s in range(1, STEPS + 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--gpu-device", default="cuda",
                    help="device of the first two runs (cpu: a dry run of this script without a GPU)")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    data = os.path.join(args.work, "data")
    os.makedirs(data)
    V = 512
    write_shard(os.path.join(data, "train_000000.bin"), 60000, V, 1)
    sets = [f"model.vocab_size={V}", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2",
            "model.d_ff=688", "model.max_seq_len=128", "train.seq_len=128", "train.micro_batch=8",
            "train.batch_tokens=2048", f"train.max_steps={STEPS}", "train.eval_every=0",
            "train.ckpt_every=0", "train.keep_ckpts=1", "train.log_every=1", "train.seed=7",
            # bitwise launcher == plain needs deterministic kernels (auto attention -> flash)
            "train.deterministic=true",
            f"data.train={data}/train_*.bin", "data.val=", "data.shuffle=false"]
    cfg = os.path.join(REPO, "configs", "tiny.json")
    runs = {}
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ok = True
    for name, device, launch in (("cuda", args.gpu_device, False), ("launch_ws1", args.gpu_device, True),
                                 ("cpu", "cpu", False)):
        run_dir = os.path.join(args.work, "runs", name)
        cmd = [args.binary, "train", cfg, "--no-resume", "--quiet"]
        for s in sets + [f"train.device={device}", f"run.dir={run_dir}", f"run.name={name}"]:
            cmd += ["--set", s]
        if launch:
            cmd = [args.python, os.path.join(REPO, "scripts", "launch.py"), "--nproc-per-node", "1",
                   "--standalone", "--log-dir", os.path.join(args.work, "launch_logs")] + cmd
        t0 = time.time()
        print("$ " + " ".join(cmd), flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            rc, out = "timeout", ""
        print(out[-3000:], flush=True)
        print(f"[{name}] rc={rc} in {time.time() - t0:.1f} s", flush=True)
        if rc != 0:
            ok = False
            runs[name] = [None] * STEPS
            continue
        runs[name] = losses(run_dir)

    print(f"\n step  {'cuda':>10s} {'launch_ws1':>10s} {'cpu':>10s}  |cuda-cpu|")
    worst_cpu, launch_same = 0.0, True
    f = lambda x: f"{x:10.6f}" if x is not None else f"{'-':>10s}"
    for i in range(STEPS):
        c, l, r = runs["cuda"][i], runs["launch_ws1"][i], runs["cpu"][i]
        d = abs(c - r) if c is not None and r is not None else None
        if d is not None:
            worst_cpu = max(worst_cpu, d)
        if c is None or l is None or c != l:
            launch_same = False
        print(f" {i + 1:4d}  {f(c)} {f(l)} {f(r)}  {d if d is not None else '-'}")
    cpu_ok = all(runs[k][i] is not None for k in ("cuda", "cpu") for i in range(STEPS)) and worst_cpu <= TOL
    ok = ok and launch_same and cpu_ok
    print(f"KEY: launch==plain {'yes' if launch_same else 'NO'}; cuda-cpu worst {worst_cpu:.2e} "
          f"(tol {TOL:.0e}) {'ok' if cpu_ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
