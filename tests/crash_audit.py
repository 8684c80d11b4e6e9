#!/usr/bin/env python3
"""Randomized SIGKILL audit of checkpoint/resume (a dev tool, not a CI test; standard library only).

    python3 tests/crash_audit.py --trials 100 --variant single          # one process
    python3 tests/crash_audit.py --trials 20 --variant noresume         # kills during --no-resume
    python3 tests/crash_audit.py --trials 20 --variant branch           # kills during --resume CKPT
                                                 # (--branch-rerun same|plain|mixed: the rerun)
    python3 tests/crash_audit.py --trials 10 --variant dist             # 2 ranks via scripts/launch.py
    options: --bin build/muonforge --work /tmp/mf_crash_audit --seed S --steps 30 --keep-going

It first runs an uninterrupted reference (configs/tiny.json shrunk so a step takes ~0.1 s and
checkpoint writes, every 2 steps, are a good share of the time), timing its `checkpoint` lines.
Each trial then starts the same run in a fresh run directory, SIGKILLs it 1-3 times at random
moments (uniform over the reference's duration, early during setup, or just before a checkpoint
line), reruns the same command after each kill and finally lets it finish. It then checks: exit
code 0; every *.safetensors and state.json of the final checkpoint byte-identical to the
reference's; one train-loss record per step 1..N in metrics.jsonl equal to the reference's (and the
same val-loss records); no .tmp-* directory or *.tmp.PID file left; `latest` naming the final
checkpoint; only the newest keep_ckpts checkpoint directories left; no superseded-N (single).
Each failure is printed with its trial seed and kill times (rerun one with --seed S --trials 1).
Runs use OMP_NUM_THREADS=1 (results are bit-exact for a fixed thread count). Variants: noresume
copies a finished reference run and kills `--no-resume` restarts of it (every original checkpoint
must survive intact in some superseded-N); branch resumes from ckpt-000010 (of this run directory or
of another) and reruns either the same `--resume CKPT` command or the plain one after a kill; dist
runs 2 ranks through scripts/launch.py (--max-restarts 0 or 1) and SIGKILLs the launcher, one
worker or both, waiting for orphaned workers to checkpoint and exit before the rerun.

Known: `--branch-rerun same` fails when the branch point is a checkpoint of the same run directory
that the branch has pruned since (keep_ckpts): the rerun stops with "--resume ... does not exist: it
was probably pruned ... drop --resume" (by design: the plain command continues the branch).
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sets(steps, run_dir, keep=2):
    kv = {
        "train.max_steps": steps, "train.ckpt_every": 2, "train.keep_ckpts": keep,
        "train.eval_every": 5, "train.eval_batches": 2, "train.log_every": 1,
        "train.seq_len": 64, "train.micro_batch": 4, "train.batch_tokens": 512,
        "train.device": "cpu", "schedule.warmup": 5, "run.dir": run_dir,
    }
    out = []
    for k, v in kv.items():
        out += ["--set", f"{k}={v}"]
    return out


def env_for():
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    e.pop("MF_FAULT_KILL_AT", None)
    return e


class Proc:
    """A started command whose merged output goes to a file; times of `checkpoint` lines kept."""

    def __init__(self, cmd, log_path, new_session=True):
        self.t0 = time.monotonic()
        self.log = open(log_path, "ab")
        self.log.write(("\n=== " + " ".join(cmd) + "\n").encode())
        self.log.flush()
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=new_session)
        self.ckpt_times = []
        self.first_step = None
        self.th = threading.Thread(target=self._pump, daemon=True)
        self.th.start()

    def _pump(self):
        for raw in iter(self.p.stdout.readline, b""):
            t = time.monotonic() - self.t0
            self.log.write(raw)
            s = raw.decode("utf-8", "replace")
            if "] checkpoint " in s or s.startswith("checkpoint ") or " checkpoint /" in s:
                self.ckpt_times.append(t)
            if self.first_step is None and re.search(r"step +1/", s):
                self.first_step = t
        self.p.stdout.close()

    def wait(self, timeout=None):
        rc = self.p.wait(timeout=timeout)
        self.th.join(timeout=10)
        self.log.flush()
        self.log.close()
        return rc


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            ppid = int(st[st.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rfind(")") + 2] != "Z"
    except OSError:
        return False


def read_metrics(run_dir):
    train, val = {}, {}
    dup = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None, None, ["no metrics.jsonl"]
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        try:
            j = json.loads(line)
        except ValueError:
            dup.append(f"unparsable line {line[:60]!r}")
            continue
        if "loss" in j:
            if j["step"] in train:
                dup.append(f"duplicate train record step {j['step']}")
            train[j["step"]] = j["loss"]
        if "val_loss" in j:
            if j["step"] in val:
                dup.append(f"duplicate val record step {j['step']}")
            val[j["step"]] = j["val_loss"]
    return train, val, dup


def ckpt_name(step):
    return "ckpt-%06d" % step


def check_run(run_dir, ref_dir, steps, keep, allow_superseded):
    """Problems (strings) with a finished run directory compared with the reference."""
    probs = []
    final = os.path.join(run_dir, ckpt_name(steps))
    rfinal = os.path.join(ref_dir, ckpt_name(steps))
    if not os.path.isdir(final):
        probs.append(f"no final checkpoint {final}")
    else:
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(rfinal, "*.safetensors")))
        names.append("state.json")
        got = sorted(os.path.basename(p) for p in glob.glob(os.path.join(final, "*.safetensors")))
        if got + ["state.json"] != names:
            probs.append(f"final checkpoint files {got} != reference {names[:-1]}")
        for n in names:
            a, b = os.path.join(final, n), os.path.join(rfinal, n)
            if not os.path.exists(a):
                probs.append(f"missing {n}")
            elif open(a, "rb").read() != open(b, "rb").read():
                probs.append(f"{n} differs from the reference")
    train, val, dup = read_metrics(run_dir)
    rtrain, rval, _ = read_metrics(ref_dir)
    probs += dup
    if train is not None:
        if sorted(train) != list(range(1, steps + 1)):
            missing = sorted(set(range(1, steps + 1)) - set(train))
            extra = sorted(set(train) - set(range(1, steps + 1)))
            probs.append(f"train-loss steps: missing {missing} extra {extra}")
        bad = [s for s in train if s in rtrain and train[s] != rtrain[s]]
        if bad:
            probs.append(f"train losses differ from the reference at steps {bad[:10]}")
        if val != rval:
            probs.append(f"val records differ: {sorted(val.items())} vs {sorted(rval.items())}")
    try:
        latest = open(os.path.join(run_dir, "latest")).read()
    except OSError:
        latest = None
    if latest != ckpt_name(steps) + "\n":
        probs.append(f"latest is {latest!r}")
    entries = os.listdir(run_dir)
    tmpdirs = [e for e in entries if e.startswith(".tmp-")]
    if tmpdirs:
        probs.append(f"leftover temp directories {tmpdirs}")
    tmpfiles = [e for e in entries if re.search(r"\.tmp\.\d+$", e)]
    if tmpfiles:
        probs.append(f"leftover atomic-write temp files {tmpfiles}")
    ckpts = sorted(e for e in entries if e.startswith("ckpt-"))
    want = [ckpt_name(s) for s in range(steps, 0, -2)][:keep][::-1]
    if ckpts != want:
        detail = []
        for c in set(ckpts) - set(want):
            detail.append(f"{c}: {sorted(os.listdir(os.path.join(run_dir, c)))}")
        probs.append(f"checkpoint dirs {ckpts}, expected {want} ({'; '.join(detail)})")
    sup = [e for e in entries if e.startswith("superseded-")]
    if sup and not allow_superseded:
        probs.append(f"unexpected set-aside directories {sup} "
                     f"({ {s: sorted(os.listdir(os.path.join(run_dir, s))) for s in sup} })")
    return probs


class Audit:
    def __init__(self, a):
        self.a = a
        self.bin = os.path.abspath(a.bin)
        self.work = a.work
        self.failures = []
        self.kill_log = []  # (variant, kind, t)

    def cmd(self, run_dir, extra=(), dist=False, keep=2):
        base = [self.bin, "train", os.path.join(ROOT, "configs/tiny.json")] + sets(
            self.a.steps, run_dir, keep) + list(extra)
        if dist:
            base += ["--set", "train.world_size=2"]
            return [sys.executable, os.path.join(ROOT, "scripts/launch.py"), "--standalone",
                    "--nproc-per-node", "2", "--max-restarts", str(self.max_restarts),
                    "--grace-period", "5", "--log-dir", run_dir + ".launchlogs"] + base
        return base

    def reference(self, name, dist=False):
        d = os.path.join(self.work, name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d + ".launchlogs", ignore_errors=True)
        self.max_restarts = 0
        p = Proc(self.cmd(d, dist=dist), d + ".log")
        rc = p.wait()
        dur = time.monotonic() - p.t0
        if rc != 0:
            sys.exit(f"reference run {name} failed (rc {rc}); see {d}.log")
        print(f"reference {name}: {dur:.2f} s, first step at {p.first_step}, "
              f"{len(p.ckpt_times)} checkpoint lines", flush=True)
        return {"dir": d, "dur": dur, "ckpt": p.ckpt_times, "setup": p.first_step or 0.5 * dur}

    def sample_kill(self, rng, ref):
        r = rng.random()
        if r < 0.15:
            kind, t = "setup", rng.uniform(0.0, ref["setup"])
        elif r < 0.55 and ref["ckpt"]:
            # a checkpoint line is printed right after the write: aim at the write itself
            kind, t = "ckpt", max(0.0, rng.choice(ref["ckpt"]) - rng.uniform(0.0, 0.08))
        else:
            kind, t = "uniform", rng.uniform(0.0, ref["dur"])
        return kind, t

    def run_killed(self, cmd, log, t, dist_target=None, rng=None):
        """Start cmd, SIGKILL it (or, dist, a worker / the launcher) after t seconds; wait for all."""
        p = Proc(cmd, log)
        deadline = p.t0 + t
        while time.monotonic() < deadline and p.p.poll() is None:
            time.sleep(0.005)
        workers = children_of(p.p.pid) if dist_target else []
        what = "process"
        if p.p.poll() is None:
            if dist_target == "launcher" or dist_target is None:
                os.kill(p.p.pid, signal.SIGKILL)
                what = "launcher" if dist_target else "process"
            else:
                victims = workers if dist_target == "all" else [rng.choice(workers)] if workers else []
                for w in victims:
                    try:
                        os.kill(w, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                what = f"worker(s) {victims}" if victims else "nothing (no workers yet)"
                if not victims:
                    os.kill(p.p.pid, signal.SIGKILL)
                    what = "launcher (no workers yet)"
        else:
            what = "nothing (already exited)"
        try:
            rc = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.kill(p.p.pid, signal.SIGKILL)
            rc = p.wait()
            what += " [launcher hung 120 s]"
        # orphaned workers of a killed launcher finish their step and checkpoint: wait for them
        t_end = time.monotonic() + 120
        while any(pid_alive(w) for w in workers) and time.monotonic() < t_end:
            time.sleep(0.05)
        for w in workers:
            if pid_alive(w):
                os.kill(w, signal.SIGKILL)
                what += f" [worker {w} still alive after 120 s]"
        return rc, what

    def trial(self, variant, i, seed, ref, extra_ref=None):
        rng = random.Random(seed)
        d = os.path.join(self.work, f"{variant}-{i}")
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(d + ".launchlogs", ignore_errors=True)
        if os.path.exists(d + ".log"):
            os.remove(d + ".log")
        extra = []
        dist = variant == "dist"
        self.max_restarts = rng.choice([0, 0, 1]) if dist else 0
        originals = {}
        if variant == "noresume":
            shutil.copytree(ref["dir"], d, ignore=shutil.ignore_patterns(".lock"))
            for c in glob.glob(os.path.join(d, "ckpt-*")):
                originals[os.path.basename(c)] = open(os.path.join(c, "model.safetensors"), "rb").read()
            extra = ["--no-resume"]
        elif variant == "branch":
            shutil.copytree(ref["dir"], d, ignore=shutil.ignore_patterns(".lock"))
            src = extra_ref["dir"]
            bstep = extra_ref["step"]
            if rng.random() < 0.5:
                # branch from a checkpoint of this run directory
                shutil.copytree(os.path.join(src, ckpt_name(bstep)), os.path.join(d, ckpt_name(bstep)))
                extra = ["--resume", os.path.join(d, ckpt_name(bstep))]
            else:
                extra = ["--resume", os.path.join(src, ckpt_name(bstep))]
        cmd = self.cmd(d, extra, dist=dist)
        rerun = cmd
        if variant == "branch":
            # after a kill, rerun the same --resume CKPT command, or the plain one (no --resume)
            mode = self.a.branch_rerun
            if mode == "mixed":
                mode = rng.choice(["same", "plain"])
            if mode == "plain":
                rerun = self.cmd(d, [])
            extra_note = f"rerun={mode}"
        nkill = rng.randint(1, 3)
        kills, rcs = [], []
        if variant == "branch":
            kills.append(extra_note)
        for k in range(nkill):
            kind, t = self.sample_kill(rng, ref)
            target = None
            if dist:
                target = rng.choice(["launcher", "worker", "worker", "all"])
            rc, what = self.run_killed(cmd if k == 0 else rerun, d + ".log", t, target, rng)
            kills.append(f"{kind}@{t:.3f}s->{what} rc={rc}")
            self.kill_log.append((variant, kind, t))
            rcs.append(rc)
        # finish: rerun the same command until it exits 0 (at most 3 tries)
        final_rc = None
        for _ in range(3):
            p = Proc(rerun, d + ".log")
            final_rc = p.wait(timeout=600)
            if final_rc == 0:
                break
        probs = []
        if final_rc != 0:
            probs.append(f"final run exit code {final_rc} (3 tries)")
        probs += check_run(d, ref["dir"], self.a.steps, 2, allow_superseded=variant != "single")
        if variant == "noresume":
            found = {}
            for s in glob.glob(os.path.join(d, "superseded-*", "ckpt-*")):
                mp = os.path.join(s, "model.safetensors")
                if os.path.exists(mp):
                    found.setdefault(os.path.basename(s), []).append(
                        (os.path.basename(os.path.dirname(s)), open(mp, "rb").read()))
            for name, data in originals.items():
                hits = [sd for sd, b in found.get(name, []) if b == data]
                if not hits:
                    probs.append(f"original {name} is in no superseded-N (intact)")
            sups = sorted(os.path.basename(x) for x in glob.glob(os.path.join(d, "superseded-*")))
            if sups and not os.path.exists(os.path.join(d, sups[0], "metrics.jsonl")):
                kills.append(f"note: {sups[0]} has no metrics.jsonl")
        status = "ok" if not probs else "FAIL"
        print(f"[{variant} {i}] seed {seed} {status}: kills {kills}" +
              ("" if not probs else "\n    " + "\n    ".join(probs)), flush=True)
        if probs:
            self.failures.append((variant, i, seed, kills, probs))
            if not self.a.keep_going:
                return
        if not probs and not self.a.keep_dirs:
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(d + ".launchlogs", ignore_errors=True)

    def main(self):
        a = self.a
        os.makedirs(self.work, exist_ok=True)
        master = random.Random(a.seed)
        variants = ["single", "noresume", "branch", "dist"] if a.variant == "all" else [a.variant]
        refs = {}
        for v in variants:
            dist = v == "dist"
            key = "ref2" if dist else "ref1"
            if key not in refs:
                refs[key] = self.reference(key, dist=dist)
            extra = None
            if v == "branch":
                # the source of the branch: the same run stopped at an early even step
                bstep = 10
                bd = os.path.join(self.work, "branchsrc")
                shutil.rmtree(bd, ignore_errors=True)
                self.max_restarts = 0
                rc = Proc(self.cmd(bd, ["--stop-at", str(bstep)], keep=100), bd + ".log").wait()
                assert rc == 0, f"branch source run failed, see {bd}.log"
                extra = {"dir": bd, "step": bstep}
            for i in range(a.trials):
                seed = master.randrange(1 << 30) if a.trial_seed is None else a.trial_seed
                self.trial(v, i, seed, refs[key], extra)
        kinds = {}
        for v, k, t in self.kill_log:
            kinds.setdefault((v, k), []).append(t)
        print("\nkill times:")
        for (v, k), ts in sorted(kinds.items()):
            print(f"  {v:9s} {k:8s} n={len(ts):4d} min {min(ts):.3f} s median "
                  f"{sorted(ts)[len(ts) // 2]:.3f} s max {max(ts):.3f} s")
        print(f"\n{len(self.failures)} failing trial(s)")
        for v, i, seed, kills, probs in self.failures:
            print(f"  {v} {i} seed {seed}: {kills}: {probs}")
        return 1 if self.failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", default=os.path.join(ROOT, "build/muonforge"))
    p.add_argument("--work", default="/tmp/mf_crash_audit")
    p.add_argument("--variant", default="single", choices=["single", "noresume", "branch", "dist", "all"])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trial-seed", type=int, default=None, help="rerun one trial with this seed")
    p.add_argument("--branch-rerun", default="mixed", choices=["same", "plain", "mixed"],
                   help="branch variant: after a kill, rerun the same --resume CKPT command or "
                        "the plain one")
    p.add_argument("--keep-going", action="store_true", default=True)
    p.add_argument("--keep-dirs", action="store_true", help="keep the run dirs of passing trials")
    sys.exit(Audit(p.parse_args()).main())


if __name__ == "__main__":
    main()
