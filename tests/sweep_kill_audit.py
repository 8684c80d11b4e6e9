#!/usr/bin/env python3
"""Randomized interruption audit of scripts/sweep.py (a dev tool, not a CI test).

    python3 tests/sweep_kill_audit.py [--binary build/muonforge] [--trials 50] [--work DIR]
                                      [--seed S] [--kinds sigint,sigterm,...] [--keep]

Needs a built binary (cmake --build build --target muonforge) and the default corpus
(python3 scripts/prepare_data.py default -> data/default). It writes a tiny sweep (6 runs of
configs/tiny.json's model, 40 steps of 512 tokens, a checkpoint every 5 steps, 2 at a time) into
--work (default a temp dir), runs it once uninterrupted as the reference, then for each trial:

  1. starts the sweep in a fresh output folder (sweep.py in its own process group, as a shell
     job would be) and interrupts it at a random time with one kind of interruption:
       sigint         SIGINT to sweep.py (Ctrl-C)
       sigterm        SIGTERM to sweep.py
       sigkill_sweep  SIGKILL to sweep.py only (its trainers are orphaned)
       sigkill_group  SIGKILL to sweep.py's process group (kill -9 -PGID)
       sigkill_tree   SIGKILL to sweep.py and every trainer at once (a reboot, a cgroup kill)
       sigkill_child  SIGKILL to one running trainer (sweep.py goes on)
  2. reruns the same command at once (as a user would; with probability 0.3 it interrupts that
     sitting too, with a random kind) until it exits 0, at most 12 sittings;
  3. checks: results.csv has the reference's rows (run, status, steps, tokens, losses, FLOPs;
     wall_s may differ), no duplicate or missing rows; every run's metrics.jsonl has one
     training record per step 1..N and one val record per evaluation; no temporary files
     (*.tmp, *.tmp.PID, .tmp-ckpt-*) and no superseded-* folders are left; no trainer log shows
     a fresh start after that run had written a checkpoint (trained twice from scratch); no
     trainer outlives the trial; scripts/plot.py makes its PNGs (when matplotlib is there).
     A trainer refused its run directory because a trainer of an earlier sitting still held it
     (the run marked failed, the sitting exiting 1) also counts as a failure; sittings started
     while such orphans were alive are noted.

Prints one line per trial and a summary per kind; failures keep their output folder (and the
sweep logs) under --work and are listed with evidence. Exit status 1 when any trial failed.
Standard library only.
"""

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = ["sigint", "sigterm", "sigkill_sweep", "sigkill_group", "sigkill_tree", "sigkill_child"]
MAX_STEPS = 40
EVAL_EVERY = 10


def sweep_spec(data):
    return {
        "name": "kill-audit",
        "base": str(REPO / "configs" / "tiny.json"),
        "set": {
            "train.max_steps": MAX_STEPS, "train.seq_len": 64, "train.micro_batch": 4,
            "train.batch_tokens": 512, "train.eval_every": EVAL_EVERY, "train.eval_batches": 2,
            "train.ckpt_every": 5, "train.keep_ckpts": 2, "train.log_every": 1,
            "schedule.warmup": 3,
            "data.train": f"{data}/train_*.bin", "data.val": f"{data}/val_*.bin",
        },
        "grid": [
            {"optim.name": ["muon"], "optim.lr": [0.01, 0.02, 0.04]},
            {"optim.name": ["adamw"],
             "lr": [{"_name": f"lr{x}", "optim.lr": x, "optim.adamw.lr": x}
                    for x in (0.002, 0.004, 0.008)]},
        ],
    }


def descendants(pid):
    """Pids of every live process whose ancestry reaches pid (via /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            parent[int(d)] = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def trainers_of(out):
    """Live (non-zombie) `muonforge train` processes whose config is under out/configs."""
    pids = []
    key = str(out / "configs") + "/"
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] == "Z":
            continue
        if len(cmd) > 2 and cmd[1] == b"train" and cmd[2].decode(errors="replace").startswith(key):
            pids.append(int(d))
    return pids


def kill(pid, sig):
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def interrupt(kind, p, out):
    """Delivers one interruption to the sitting p; returns a short description."""
    if kind == "sigint":
        kill(p.pid, signal.SIGINT)
    elif kind == "sigterm":
        kill(p.pid, signal.SIGTERM)
    elif kind == "sigkill_sweep":
        kill(p.pid, signal.SIGKILL)
    elif kind == "sigkill_group":
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif kind == "sigkill_tree":
        kill(p.pid, signal.SIGSTOP)  # no new trainer between the listing and the kill
        kids = descendants(p.pid)
        for k in kids:
            kill(k, signal.SIGKILL)
        kill(p.pid, signal.SIGKILL)
        for k in trainers_of(out):  # any orphan of an earlier sitting too: the machine went down
            kill(k, signal.SIGKILL)
        t0 = time.time()  # and comes back up once they are all gone (SIGKILL takes a moment)
        while trainers_of(out) and time.time() - t0 < 10:
            time.sleep(0.05)
    elif kind == "sigkill_child":
        t0 = time.time()  # between two runs there may be none for a moment
        kids = []
        while not kids and p.poll() is None and time.time() - t0 < 3:
            kids = [k for k in descendants(p.pid) if k in trainers_of(out)]
            if not kids:
                time.sleep(0.02)
        if not kids:
            return "no trainer to kill"
        victim = random.choice(kids)
        kill(victim, signal.SIGKILL)
        return f"killed trainer {victim}"
    return ""


def metrics_problems(path):
    probs = []
    steps, vals = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        return [f"{path}: {e}"]
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            probs.append(f"{path.name} line {i + 1} is not JSON: {line[:80]!r}")
            continue
        if "loss" in r:
            steps.append(r["step"])
        if "val_loss" in r:
            vals.append(r["step"])
    if steps != list(range(1, MAX_STEPS + 1)):
        probs.append(f"{path}: training steps {steps}")
    want_val = list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
    if vals != want_val:
        probs.append(f"{path}: val steps {vals} (want {want_val})")
    return probs


COMPARE = ["status", "steps", "tokens", "final_train_loss", "final_val_loss", "flops"]


def check_trial(out, ref_rows, plot):
    probs = []
    try:
        rows = list(csv.DictReader(open(out / "results.csv")))
    except OSError as e:
        return [f"results.csv: {e}"]
    names = [r["run"] for r in rows]
    if len(names) != len(set(names)):
        probs.append(f"duplicate rows: {names}")
    if sorted(names) != sorted(ref_rows):
        probs.append(f"row set {sorted(names)} != reference {sorted(ref_rows)}")
    for r in rows:
        ref = ref_rows.get(r["run"])
        if ref is None:
            continue
        diff = {k: (r.get(k), ref.get(k)) for k in COMPARE if r.get(k) != ref.get(k)}
        if diff:
            probs.append(f"{r['run']}: differs from the reference (got, want): {diff}")
    for run in ref_rows:
        rd = out / "runs" / run
        probs += metrics_problems(rd / "metrics.jsonl")
        # A fresh start after this run had written a checkpoint = trained twice from scratch.
        log = out / "logs" / f"{run}.log"
        try:
            text = log.read_text(errors="replace")
        except OSError:
            text = ""
        checkpointed = False
        for sitting in re.split(r"(?m)^\$ ", text)[1:]:
            resumed = "resumed from" in sitting or "run already complete" in sitting
            refused = "is in use by another training process" in sitting
            if checkpointed and not resumed and not refused and "step " in sitting:
                probs.append(f"{run}: a sitting started from scratch after a checkpoint existed")
            if re.search(r"checkpoint \S*ckpt-\d+", sitting):
                checkpointed = True
    for p in out.rglob("*"):
        n = p.name
        if (n.endswith(".tmp") or re.search(r"\.tmp\.\d+$", n) or n.startswith(".tmp-ckpt-")
                or n.startswith("superseded-")):
            probs.append(f"left behind: {p.relative_to(out)}")
    if plot:
        pr = subprocess.run([sys.executable, str(REPO / "scripts" / "plot.py"), str(out),
                             "--out", str(out / "plots")], capture_output=True, text=True)
        if pr.returncode != 0:
            probs.append(f"plot.py rc {pr.returncode}: {(pr.stdout + pr.stderr)[-400:]}")
        else:
            for name in ("loss_curves.png", "lr_transfer.png", "speedup.png"):
                f = out / "plots" / name
                if not (f.is_file() and f.read_bytes()[:4] == b"\x89PNG"):
                    probs.append(f"plot.py made no {name}")
    return probs


def run_trial(i, kind, cmd_for, ref_time, ref_rows, plot, rng, max_sittings=12):
    out = cmd_for.work / f"trial-{i:03d}-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = cmd_for(out)
    notes, sittings = [], []
    lock_refusals = 0
    orphans_at_restart = 0
    for s in range(max_sittings):
        if s > 0:
            alive = trainers_of(out)
            if alive:
                orphans_at_restart += 1
                notes.append(f"sitting {s + 1} started with {len(alive)} orphan trainer(s) alive")
        logf = open(out.parent / f"{out.name}.sitting{s + 1}.log", "w") if out.parent.exists() else None
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                             start_new_session=True)
        k = kind if s == 0 else (rng.choice(KINDS) if rng.random() < 0.3 else None)
        what = ""
        if k:
            delay = rng.uniform(0.05, ref_time * 0.9)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                what = interrupt(k, p, out) or ""
            else:
                what = "ended before it"
        try:
            rc = p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            kill(p.pid, signal.SIGKILL)
            rc = p.wait()
            notes.append(f"sitting {s + 1} hung; killed")
        if logf:
            logf.close()
        sittings.append(f"{k or 'none'}:{rc}" + (f"({what})" if what else ""))
        if rc == 0:  # a sitting that exits 0 claims the sweep is complete
            break
    else:
        notes.append("never completed")
    # Orphans: wait for them (they must not outlive the trial).
    t0 = time.time()
    while trainers_of(out) and time.time() - t0 < 120:
        time.sleep(0.2)
    left = trainers_of(out)
    probs = []
    if left:
        probs.append(f"trainers still running after the sweep completed: {left}")
        for k in left:
            kill(k, signal.SIGKILL)
    if "never completed" in notes:
        probs.append("the sweep never completed")
    for logp in (out / "logs").glob("*.log") if (out / "logs").exists() else []:
        lock_refusals += logp.read_text(errors="replace").count("is in use by another training process")
    if lock_refusals:  # the run was marked failed and its sitting exited 1: not a clean resume
        probs.append(f"{lock_refusals} trainer start(s) refused by the run-dir lock (a trainer "
                     f"of an earlier sitting still held it)")
    probs += check_trial(out, ref_rows, plot)
    return out, sittings, notes, probs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=str(REPO / "build" / "muonforge"))
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--work", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--keep", action="store_true", help="keep passing trials' folders")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    random.seed(seed)
    kinds = args.kinds.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="mf_kill_audit_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = REPO / "data" / "default"
    if not (data / "train_000000.bin").is_file():
        sys.exit(f"no {data}: run python3 scripts/prepare_data.py default")
    spec = work / "sweep.json"
    spec.write_text(json.dumps(sweep_spec(data), indent=1))
    plot = not args.no_plot
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib missing: plots not checked")
            plot = False

    def cmd_for(out):
        return [sys.executable, str(REPO / "scripts" / "sweep.py"), str(spec), "--out", str(out),
                "--jobs", "2", "--binary", args.binary]
    cmd_for.work = work

    ref = work / "reference"
    if not (ref / "results.csv").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        t0 = time.time()
        r = subprocess.run(cmd_for(ref), capture_output=True, text=True, cwd=REPO)
        if r.returncode != 0:
            sys.exit(f"reference sweep failed (rc {r.returncode}):\n{r.stdout}{r.stderr}")
        (work / "reference_time").write_text(f"{time.time() - t0}\n")
    ref_time = float((work / "reference_time").read_text())
    ref_rows = {r["run"]: r for r in csv.DictReader(open(ref / "results.csv"))}
    probs = check_trial(ref, ref_rows, plot)
    if probs:
        sys.exit("the reference itself fails the checks:\n  " + "\n  ".join(probs))
    print(f"audit: seed {seed}, work {work}, reference {len(ref_rows)} runs in {ref_time:.1f}s",
          flush=True)

    stats = defaultdict(lambda: [0, 0])
    failures = []
    for i in range(args.trials):
        kind = kinds[i % len(kinds)]
        out, sittings, notes, probs = run_trial(i, kind, cmd_for, ref_time, ref_rows, plot, rng)
        stats[kind][0] += 1
        ok = not probs
        if not ok:
            stats[kind][1] += 1
            failures.append((out, kind, sittings, probs))
        print(f"trial {i:3d} {kind:14s} {'ok  ' if ok else 'FAIL'} sittings {' '.join(sittings)}"
              + (f" | {'; '.join(notes)}" if notes else ""), flush=True)
        for p in probs:
            print(f"    {p}", flush=True)
        if ok and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            for f in work.glob(f"{out.name}.sitting*.log"):
                f.unlink()
    print("\nsummary (trials, failures):")
    for k in kinds:
        print(f"  {k:14s} {stats[k][0]:3d} {stats[k][1]:3d}")
    for out, kind, sittings, probs in failures:
        print(f"FAILED {out} ({kind}; {' '.join(sittings)}):")
        for p in probs:
            print(f"    {p}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
