#!/usr/bin/env python3
"""scripts/gpu_sweep.sh on the CPU: the sitting-by-sitting flow a GPU session uses for the
GPU-scale sweep, with a tiny model, byte tokens of two Debian licence texts and this build's
binary (--binary skips the device library setup).

    python3 tests/test_gpu_sweep_script.py BUILD/muonforge

Checks: tokenisation, a first sitting that finishes, its sweep-runs.tgz carried into a second
sitting whose grid has grown (finished runs skipped, only the new ones run), a sitting stopped by
its budget (the run is marked interrupted and no checkpoint comes back), and the shipped sitting
sweep file expanding as documented. Prints "ok: ..." lines; exits non-zero on the first failure.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_sweep.sh")


def fail(msg, log=""):
    print("FAIL:", msg)
    if log:
        print(log[-4000:])
    sys.exit(1)


def sitting(binary, work, out, sweep, runs, prev, budget=200, extra=()):
    cmd = ["bash", SCRIPT, out, "--sweep", sweep, "--data-src", os.path.join(work, "src"),
           "--data-dir", os.path.join(work, "data"), "--tokenizer", "byte", "--runs-dir", runs,
           "--prev", prev, "--binary", binary, "--budget", str(budget), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MF_SWEEP_WORK=os.path.join(work, "scratch"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=budget + 120)
    log = p.stdout + p.stderr
    full = os.path.join(out, "gpu_sweep.log")
    if os.path.exists(full):
        log += "\n--- gpu_sweep.log ---\n" + open(full).read()
    return p.returncode, log


def rows(out):
    return {r["run"]: r for r in csv.DictReader(open(os.path.join(out, "results.csv")))}


def main():
    if len(sys.argv) != 2:
        fail("usage: test_gpu_sweep_script.py MUONFORGE_BINARY")
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="mf_gpu_sweep_test_")
    try:
        os.makedirs(os.path.join(work, "src"))
        lic = "/usr/share/common-licenses"
        shutil.copy(os.path.join(lic, "GPL-3"), os.path.join(work, "src", "train.txt"))
        shutil.copy(os.path.join(lic, "Apache-2.0"), os.path.join(work, "src", "val.txt"))
        base = {"name": "gs-test", "base": os.path.join(REPO, "configs", "mup-gpu.json"),
                "set": {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 1,
                        "model.n_kv_heads": 1, "model.d_ff": 192, "mup.base_width": 64,
                        "mup.base_depth": 2, "train.seq_len": 64, "train.micro_batch": 2,
                        "train.batch_tokens": 128, "train.max_steps": 3, "schedule.warmup": 1,
                        "train.eval_every": 3, "train.eval_batches": 2, "train.device": "cpu",
                        "data.train": os.path.join(work, "data", "train_*.bin"),
                        "data.val": os.path.join(work, "data", "val_*.bin")},
                "grid": [{"optim.name": ["muon", "adamw"], "optim.lr": [0.01]}]}
        s1 = os.path.join(work, "sweep1.json")
        json.dump(base, open(s1, "w"))
        grown = json.loads(json.dumps(base))
        grown["grid"][0]["optim.lr"] = [0.01, 0.02]
        s2 = os.path.join(work, "sweep2.json")
        json.dump(grown, open(s2, "w"))

        # Sitting 1: tokenises, runs both, packs them without checkpoints.
        out1 = os.path.join(work, "out1")
        rc, log = sitting(binary, work, out1, s1, os.path.join(work, "runs1"), os.path.join(work, "none"))
        if rc != 0:
            fail(f"sitting 1 exited {rc}", log)
        if "tokenising train.txt and val.txt" not in log:
            fail("sitting 1 did not tokenise", log)
        r1 = rows(out1)
        if sorted(r1) != ["adamw-lr0.01", "muon-lr0.01"] or any(r["status"] != "done" for r in r1.values()):
            fail(f"sitting 1 results: {r1}", log)
        for f in ("summary.txt", "results.csv", "sweep-runs.tgz"):
            if not os.path.exists(os.path.join(out1, f)):
                fail(f"sitting 1 wrote no {f}", log)
        summary = open(os.path.join(out1, "summary.txt")).read()
        if "2 of 2 runs done" not in summary:
            fail("summary.txt does not count the runs", summary)
        print("ok: sitting 1 finished 2 runs")

        # Sitting 2 (another machine, another runs folder): the grid grew; the two finished runs
        # come back in through --prev and are skipped.
        prev = os.path.join(work, "prev")
        with tarfile.open(os.path.join(out1, "sweep-runs.tgz")) as t:
            names = t.getnames()
            if any("ckpt-" in n for n in names):
                fail(f"checkpoints were packed: {[n for n in names if 'ckpt-' in n][:3]}")
            t.extractall(prev)
        out2 = os.path.join(work, "out2")
        rc, log = sitting(binary, work, out2, s2, os.path.join(work, "runs2"), prev)
        if rc != 0:
            fail(f"sitting 2 exited {rc}", log)
        if "carried in 2 run(s)" not in log or "4 runs (2 finished, 2 to run)" not in log:
            fail("sitting 2 did not skip the carried runs", log)
        r2 = rows(out2)
        if len(r2) != 4 or any(r["status"] != "done" for r in r2.values()):
            fail(f"sitting 2 results: {r2}", log)
        if r2["muon-lr0.01"]["final_val_loss"] != r1["muon-lr0.01"]["final_val_loss"]:
            fail("a carried run's result changed", log)
        print("ok: sitting 2 skipped the carried runs and ran the new ones")

        # A sitting that runs out of budget: the trainer is stopped, the run is "interrupted",
        # and the summary still comes back.
        out3 = os.path.join(work, "out3")
        rc, log = sitting(binary, work, out3, s1, os.path.join(work, "runs3"), os.path.join(work, "none"),
                          budget=80, extra=["--set", "train.max_steps=1000000", "--set", "train.eval_every=0"])
        if rc != 0:
            fail(f"sitting 3 exited {rc}", log)
        if "stopped at the budget" not in log:
            fail("sitting 3 was not stopped by its budget", log)
        r3 = rows(out3)
        if r3["muon-lr0.01"]["status"] != "interrupted":
            fail(f"sitting 3 results: {r3}", log)
        print("ok: a sitting stops at its budget")

        # The shipped sitting sweep: 18 runs, w256 first, data under data/gutenberg_gpt2.
        p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sweep.py"),
                            os.path.join(REPO, "configs", "sweeps", "muon_vs_adamw_gpu_sitting.json"),
                            "--dry-run", "--out", os.path.join(work, "dry")],
                           capture_output=True, text=True)
        if p.returncode != 0 or "18 runs" not in p.stdout + p.stderr:
            fail("the sitting sweep file does not expand to 18 runs", p.stdout + p.stderr)
        listed = [l.split()[0] for l in p.stdout.splitlines() if l.startswith("  ")]
        if not listed or not listed[0].startswith("w256-mup-muon") or not all(
                n.startswith("w256") for n in listed[:6]):
            fail(f"the sitting sweep does not start with width 256: {listed[:8]}")
        cfg = json.load(open(os.path.join(work, "dry", "configs", listed[0] + ".json")))
        if not cfg["data"]["train"].startswith("data/gutenberg_gpt2/"):
            fail(f"the sitting sweep reads {cfg['data']['train']}")
        print("ok: the sitting sweep file expands to 18 runs")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
