#!/usr/bin/env python3
"""Data-parallel training on the emulated CUDA backend with the emulated NCCL (tests/cuemu):
the NCCL communicator (src/dist/nccl_comm.cpp) and the trainer's device-side data parallelism
run here with 2 and 3 ranks started by scripts/launch.py, as a user starts them on GPUs.

    dist_test.py MUONFORGE_CUEMU REPO_ROOT

Checks:
- 2 and 3 ranks follow one process (AdamW and Muon; ZeRO-1; the distributed matrix optimizer):
  every step's loss within 2e-3 and gradient norm within 1% (bf16 weights: the reduction order
  differs from one process's gradient accumulation, so not bit for bit);
- arrangements that change only how the same sums travel give the same bits: one bucket
  overlapping backward, many small buckets after backward;
- --stop-at then resume on 2 ranks ends with the bytes of the uninterrupted run (model and every
  rank's optimizer shard);
- a rank killed with SIGKILL mid-run: its peer's collectives fail (ncclRemoteError), the NCCL
  watchdog ends it, the launcher restarts both and the job ends with the uninterrupted run's bytes.
Collectives run late on the emulator (CUEMU_COMM_DELAY_MS), so a missing stream wait shows as
ranks that disagree.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BIN = os.path.realpath(sys.argv[1])
ROOT = os.path.realpath(sys.argv[2])
WORK = tempfile.mkdtemp(prefix="mf_cuemu_dist_")
LAUNCH = [sys.executable, os.path.join(ROOT, "scripts", "launch.py"), "--standalone"]
COMMON = ["--set", "model.n_heads=2", "--set", "model.n_kv_heads=1", "--set", "model.n_layers=2",
          "--set", "train.seq_len=32", "--set", "train.micro_batch=2", "--set", "train.batch_tokens=384",
          "--set", "train.max_steps=6", "--set", "schedule.warmup=2", "--set", "train.log_every=1",
          "--set", "train.eval_every=3", "--set", "train.eval_batches=2", "--set", "train.ckpt_every=2",
          "--set", "train.keep_ckpts=5", "--set", "train.device=cuda", "--set", "data.shuffle=false",
          "--set", "data.train=data/train_*.bin", "--set", "data.val=data/val_*.bin", "--quiet"]
OPTS = {"adamw": ["--set", "optim.name=adamw", "--set", "optim.lr=3e-3"],
        "muon": ["--set", "optim.name=muon"]}


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def command(name, nproc, extra, max_restarts=0):
    """launch.py ... muonforge_cuemu train tiny.json with the test's settings, into run dir `name`."""
    return LAUNCH + ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                     BIN, "train", os.path.join(ROOT, "configs", "tiny.json")] + COMMON + extra + \
        ["--set", "run.dir=" + name]


def train(name, nproc, extra):
    """Runs the job to its end; fails the test unless it exits 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(command(name, nproc, extra), cwd=WORK, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    with open(os.path.join(WORK, name + ".log"), "w") as f:
        f.write(r.stdout)
    if r.returncode != 0:
        print(r.stdout[-4000:])
        fail("%s: exit code %d" % (name, r.returncode))
    return r


def metrics(name):
    steps, val = {}, {}
    with open(os.path.join(WORK, name, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "loss" in j:
                steps[j["step"]] = (j["loss"], j["grad_norm"])
            if "val_loss" in j:
                val[j["step"]] = j["val_loss"]
    if sorted(steps) != list(range(1, 7)) or sorted(val) != [3, 6]:
        fail("%s: metrics.jsonl has steps %s and val steps %s" % (name, sorted(steps), sorted(val)))
    return steps, val


def close(ref, name):
    (rs, rv), (gs, gv) = metrics(ref), metrics(name)
    worst_l = max(abs(rs[s][0] - gs[s][0]) for s in rs)
    worst_g = max(abs(rs[s][1] - gs[s][1]) / rs[s][1] for s in rs)
    worst_v = max(abs(rv[s] - gv[s]) for s in rv)
    print("  %-18s vs %-10s worst |loss diff| %.2e, |val diff| %.2e, grad norm %.2e relative"
          % (name, ref, worst_l, worst_v, worst_g))
    if worst_l > 2e-3 or worst_v > 2e-3 or worst_g > 1e-2:
        fail("%s does not follow %s: %s vs %s" % (name, ref, gs, rs))


def same_bits(a, b):
    if metrics(a) != metrics(b):
        fail("%s and %s should give the same bits: %s vs %s" % (a, b, metrics(a), metrics(b)))
    print("  %-18s == %s (bitwise losses and gradient norms)" % (b, a))


def same_files(a, b, step):
    da, db = (os.path.join(WORK, x, "ckpt-%06d" % step) for x in (a, b))
    names = sorted(os.listdir(da))
    if names != sorted(os.listdir(db)):
        fail("%s and %s checkpoints hold different files" % (da, db))
    for n in names:
        if n.endswith(".safetensors"):
            with open(os.path.join(da, n), "rb") as fa, open(os.path.join(db, n), "rb") as fb:
                if fa.read() != fb.read():
                    fail("%s differs between %s and %s" % (n, a, b))
    print("  %s == %s: %s" % (b, a, ", ".join(n for n in names if n.endswith(".safetensors"))))


def main():
    try:
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "default",
                        "--out", os.path.join(WORK, "data")], check=True, stdout=subprocess.DEVNULL)
        print("== 2 and 3 ranks follow one process")
        for opt in ("adamw", "muon"):
            o = OPTS[opt]
            train(opt + "_w1", 1, o)
            r = train(opt + "_w2", 2, o)
            if "overlapping backward (nccl)" not in r.stdout:
                fail("the 2-rank run did not use the NCCL communicator overlapping backward:\n" + r.stdout[-3000:])
            close(opt + "_w1", opt + "_w2")
            train(opt + "_w3_z1", 3, o + ["--set", "train.zero=1"])
            close(opt + "_w1", opt + "_w3_z1")
            if not os.path.exists(os.path.join(WORK, opt + "_w3_z1", "ckpt-000006", "optimizer-rank2.safetensors")):
                fail("the ZeRO-1 run wrote no optimizer shard for rank 2")
        print("== the same sums, arranged differently, give the same bits; ZeRO-1 on 2 ranks")
        train("adamw_w2_small", 2, OPTS["adamw"] + ["--set", "train.bucket_mb=0.01",
                                                    "--set", "train.overlap_comm=false"])
        r = open(os.path.join(WORK, "adamw_w2_small.log")).read()
        if "after backward" not in r or "gradient all-reduce: 1 bucket" in r:
            fail("adamw_w2_small did not use many buckets after backward")
        same_bits("adamw_w2", "adamw_w2_small")
        train("muon_w2_z1", 2, OPTS["muon"] + ["--set", "train.zero=1"])
        close("muon_w1", "muon_w2_z1")  # the sharded gradient norm adds in another order: not bitwise
        print("== stop at step 3 and resume on 2 ranks")
        train("muon_w2_split", 2, OPTS["muon"] + ["--stop-at", "3"])
        if os.path.exists(os.path.join(WORK, "muon_w2_split", "ckpt-000006")):
            fail("--stop-at 3 ran on")
        r = train("muon_w2_split", 2, OPTS["muon"])
        if "resumed from" not in r.stdout:
            fail("the second sitting did not resume")
        same_files("muon_w2", "muon_w2_split", 6)
        print("== SIGKILL to rank 1 mid-run, --max-restarts 1")
        kill_test()
        print("PASS")
    finally:
        if os.environ.get("CUEMU_DIST_KEEP"):
            print("kept " + WORK)
        else:
            shutil.rmtree(WORK, ignore_errors=True)


def kill_test():
    name = "muon_w2_kill"
    cmd = command(name, 2, OPTS["muon"], max_restarts=1)
    # A short watchdog: the surviving rank's collective fails at once, MF_COMM_TIMEOUT only bounds
    # a hang if it did not.
    env = dict(os.environ, OMP_NUM_THREADS="1", MF_COMM_TIMEOUT="60")
    log = open(os.path.join(WORK, name + ".log"), "w")
    p = subprocess.Popen(cmd, cwd=WORK, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    # Find the rank-1 worker, wait until step 2's checkpoint exists (it is then training step 3 or
    # later), and kill it.
    deadline = time.time() + 300
    victims = []
    while not victims and time.time() < deadline and p.poll() is None:
        victims = rank1_workers(name)
        time.sleep(0.02)
    while not os.path.exists(os.path.join(WORK, name, "ckpt-000002")) and time.time() < deadline \
            and p.poll() is None:
        time.sleep(0.02)
    if len(victims) != 1:
        p.kill()
        fail("expected one rank-1 worker to kill, found %s" % victims)
    try:
        os.kill(victims[0], signal.SIGKILL)
    except ProcessLookupError:
        p.kill()
        fail("rank 1 ended before it could be killed (the machine is unusually slow or fast?)")
    rc = p.wait(timeout=600)
    log.close()
    text = open(os.path.join(WORK, name + ".log")).read()
    if rc != 0:
        print(text[-4000:])
        fail("the job with a killed rank ended with exit code %d" % rc)
    if "restart" not in text.lower():
        print(text[-4000:])
        fail("the launcher did not restart the group")
    same_files("muon_w2", name, 6)


def rank1_workers(name):
    """Pids of this test's muonforge_cuemu processes of run `name` whose environment says RANK=1."""
    out = subprocess.run(["pgrep", "-f", "run.dir=" + name], stdout=subprocess.PIPE, text=True).stdout
    found = []
    for pid in (int(x) for x in out.split()):
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                env_vars = f.read().split(b"\0")
            if b"RANK=1" in env_vars and os.path.basename(os.readlink("/proc/%d/exe" % pid)) == os.path.basename(BIN) \
                    and os.path.realpath("/proc/%d/cwd" % pid) == os.path.realpath(WORK):
                found.append(pid)
        except OSError:
            pass
    return found


if __name__ == "__main__":
    main()
