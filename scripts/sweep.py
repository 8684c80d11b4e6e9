#!/usr/bin/env python3
"""Run a hyper-parameter sweep of `muonforge train` and collect the results.

    scripts/sweep.py SWEEP.json [--out DIR] [--jobs N] [--binary PATH] [--set key=value]...
                     [--reduced] [--dry-run] [--collect-only]

A sweep file (see configs/sweeps/) names a base run config and a grid:

    {
      "name": "cpu-muon-vs-adamw",
      "base": "../mup-cpu.json",          # relative to the sweep file
      "out": "runs/sweep-{name}",          # default output folder (relative to the cwd)
      "set": {"train.max_steps": 300},     # fixed config values for every run
      "grid": [                            # one grid, or a list of grids (their union)
        {"width": [{"_name": "w64", "model.d_model": 64, "model.n_heads": 4},
                   {"_name": "w128", "model.d_model": 128, "model.n_heads": 8}],
         "optim.name": ["muon"], "optim.lr": [0.01, 0.02], "train.seed": [1]}
      ],
      "reduced": {"set": {...}, "grid": [...]}   # what --reduced runs instead (CI)
    }

Every grid axis is a config key path with a list of values, or a label with a list of objects
whose keys are config paths set together (an optional "_name" names the value in run names).
Each run gets OUT/configs/RUN.json ({"base": ..., the values, "run": {"dir", "name"}}) and the
run directory OUT/runs/RUN/; runs go N at a time (--jobs; default one per GPU that nvidia-smi
lists, else 1), each on its own GPU (CUDA_VISIBLE_DEVICES) or with cores/N OpenMP threads.
Precedence of values: sweep "set" < "reduced"."set" < grid < --set.

Before any run starts, every config to run is checked with `muonforge config` (one call per
run, a few at a time), so a typo in a key or value (the sweep file, --set) stops the sweep at once
with the binary's message instead of failing every run; --dry-run checks every config the same
way, lists the invalid ones with the binary's message and exits 2 (without a binary it says that
the configs were not checked). A run that fails is reported with the reason its log gives (the
last "error:" line and the indented lines that continue it, else the last line of output).

Re-running the same command skips finished runs and resumes interrupted or failed ones (the
trainer resumes from the run's latest checkpoint). A run whose config changed since it was
started is an error (use another --out or delete that run). Ctrl-C stops the running trainers
(each writes a checkpoint) and exits; run again to continue. If sweep.py dies without stopping
them (SIGKILL, the OOM killer), its trainers notice within a second (MF_LAUNCHER_PID), finish
their step, write a checkpoint and exit; a sitting started meanwhile waits for a run directory
a trainer still holds (its .lock) before starting that run.

Results: OUT/results.csv with one line per run: run, status, each grid key, steps, tokens,
final_train_loss, final_val_loss, flops (tokens x the model's training FLOPs per token, the
6N + 12 L d T of LlamaModel::flops_per_token), wall_s (summed over attempts). OUT/sweep.json
records the expanded runs for scripts/plot.py.

Standard library only. Exit status: 0 when every run finished, 1 when some failed, 2 on usage
errors and invalid run configs, 130 when interrupted.
"""

import signal
import sys


def _interrupted(signum, frame):  # noqa: ARG001
    print("sweep: interrupted", file=sys.stderr)
    sys.exit(130)


# Ctrl-C before the run loop installs its own handler (imports, expanding the grid): exit 130
# quietly, as the loop does, rather than with a KeyboardInterrupt traceback.
signal.signal(signal.SIGINT, _interrupted)

import argparse  # noqa: E402
import csv
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A problem the user must fix; printed without a traceback."""


def log(msg):
    print(f"sweep: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Sweep file -> runs
# ---------------------------------------------------------------------------------------------

def parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items, what):
    out = {}
    for s in items or []:
        if "=" not in s or s.startswith("="):
            raise UserError(f"{what}: expected key=value, got {s!r}")
        k, v = s.split("=", 1)
        out[k] = parse_value(v)
    return out


def select_runs(runs, fixed, cli, only):
    """The runs whose resolved values (the sweep's set, the grid's, --set) match every --only
    KEY=VALUE; `run=NAME` matches the run's name. Raises UserError naming a condition no run
    meets."""
    picked = list(runs)
    for key, want in only.items():
        if key == "run":
            keep = [r for r in picked if r["name"] == str(want)]
        else:
            def value(r):
                return {**fixed, **r["values"], **cli}.get(key, None)
            if all(value(r) is None for r in runs):
                raise UserError(f"--only {key}: no run of this sweep sets {key} (the sweep's "
                                f"keys: {', '.join(sorted(set(fixed) | {k for r in runs for k in r['values']}))})")
            keep = [r for r in picked if value(r) == want or
                    (isinstance(want, (int, float)) and isinstance(value(r), (int, float))
                     and not isinstance(want, bool) and float(value(r)) == float(want))]
        if not keep:
            raise UserError(f"--only {key}={json.dumps(want)}: no run matches "
                            f"({len(picked)} run(s) left by the conditions before it)")
        picked = keep
    return picked


def check_key(key, where):
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise UserError(f"{where}: {key!r} is not a config key path like optim.lr")
    if key.startswith("run."):
        raise UserError(f"{where}: {key} is set by the sweep (each run gets its own run.dir/name)")


def fmt_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


SHORT = {"d_model": "d", "lr": "lr", "seed": "s", "wd": "wd", "n_layers": "L", "enabled": "mup"}


def value_label(key, value):
    """Name fragment of one axis value."""
    if isinstance(value, dict):
        if "_name" in value:
            return str(value["_name"])
        return "-".join(value_label(k, v) for k, v in value.items())
    last = key.split(".")[-1]
    if isinstance(value, str):
        return value
    return SHORT.get(last, last) + fmt_value(value)


def sanitize(name):
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def expand_grid(grid, where):
    """[(name, {key: value})] for one grid object."""
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{where}: a grid must be a non-empty object of axis -> list of values")
    axes = []
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: axis {axis!r} needs a non-empty list of values")
        for v in values:
            if isinstance(v, dict):
                for k in v:
                    if k != "_name":
                        check_key(k, f"{where}: axis {axis!r}")
            else:
                check_key(axis, f"{where}: axis {axis!r}")
        axes.append((axis, values))
    runs = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        values, parts = {}, []
        for (axis, _), v in zip(axes, combo):
            parts.append(value_label(axis, v))
            if isinstance(v, dict):
                values.update({k: x for k, x in v.items() if k != "_name"})
            else:
                values[axis] = v
        runs.append((sanitize("-".join(parts)), values))
    return runs


def load_sweep(path, reduced):
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such sweep file")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON: {e}")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: the top level must be an object")
    known = {"name", "description", "base", "out", "set", "grid", "reduced", "jobs"}
    for k in spec:
        if k not in known:
            raise UserError(f"{path}: unknown key {k!r} (valid: {', '.join(sorted(known))})")
    for k in ("name", "base", "grid"):
        if k not in spec:
            raise UserError(f"{path}: missing key {k!r}")
    base = (path.parent / spec["base"]).resolve()
    if not base.is_file():
        raise UserError(f"{path}: base: {base} does not exist")
    fixed = dict(spec.get("set", {}))
    grid = spec["grid"]
    if reduced:
        red = spec.get("reduced")
        if not isinstance(red, dict):
            raise UserError(f"{path}: --reduced needs a \"reduced\" object in the sweep file")
        fixed.update(red.get("set", {}))
        grid = red.get("grid", grid)
    for k in fixed:
        check_key(k, f"{path}: set")
    grids = grid if isinstance(grid, list) else [grid]
    runs, seen, keys = [], set(), []
    for i, g in enumerate(grids):
        for name, values in expand_grid(g, f"{path}: grid[{i}]"):
            if name in seen:
                raise UserError(f"{path}: two runs are both named {name!r}; give the axis values "
                                f"a \"_name\" that tells them apart")
            seen.add(name)
            for k in values:
                if k not in keys:
                    keys.append(k)
            runs.append({"name": name, "values": values})
    return spec, base, fixed, runs, keys


def nested(flat):
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out = {}
    for key, v in flat.items():
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise UserError(f"config key {key}: {p} is set both as a value and as a section")
        d[parts[-1]] = v
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def count_gpus():
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def read_status(run_dir):
    p = run_dir / "sweep_status.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_atomic(path, text):
    """Writes text to path through a temporary file and a rename, so a kill never leaves a torn
    file behind (readers see the old version or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_status(run_dir, st):
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "sweep_status.json", json.dumps(st, indent=1) + "\n")


def lock_holder(run_dir):
    """The pid (text, "?" when unknown) of the process holding run_dir/.lock, the trainer's flock
    on its run directory, or None when it is free. A trainer that an earlier sitting left behind
    (sweep.py killed with SIGKILL) holds it until it has written its checkpoint and exited; a
    trainer started meanwhile would be refused the directory and the run marked failed."""
    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only tests: released by the close below
        return None
    except OSError:
        try:
            return path.read_text().strip() or "?"
        except OSError:
            return "?"
    finally:
        os.close(fd)


REASON_WIDTH = 300  # characters of one reported log line
REASON_LINES = 4    # an error line and up to 3 indented lines that continue it


def failure_reason(text):
    """The lines of a failed command's output `text` that say why, as scripts/launch.py shows a
    failed rank's last lines: the last line starting with "error:" (muonforge prints one on any
    error and exits 1) with the indented lines that follow it (hints such as "(make token shards
    with ...)"), else the last non-empty line (an abort, an uncaught exception); each cut to
    REASON_WIDTH characters. [] when there was no output."""
    lines = [l.rstrip() for l in text.splitlines()]
    at = next((i for i in range(len(lines) - 1, -1, -1)
               if re.match(r"(\[[^\]]*\]\s*)?error:", lines[i].lstrip())), None)
    if at is None:
        out = [l.strip() for l in lines if l.strip()][-1:]
    else:
        out = [lines[at].strip()]
        for l in lines[at + 1:at + REASON_LINES]:
            if not l.strip() or not l[0].isspace():
                break
            out.append(l)  # keeps its indentation under the error line
    return [l if len(l) <= REASON_WIDTH else l[:REASON_WIDTH - 3] + "..." for l in out]


def read_from(path, start, limit=1 << 16):
    """Text of `path` from byte `start` on (at most its last `limit` bytes): one attempt's part
    of a run log that the attempts append to."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(start, end - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def rc_text(rc):
    if rc < 0:
        try:
            return f"rc {rc}, {signal.Signals(-rc).name}"
        except ValueError:
            pass
    return f"rc {rc}"


def binary_usable(binary):
    return binary.is_file() and os.access(binary, os.X_OK)


def validate_configs(binary, runs, jobs):
    """{run name: lines of the error} for the runs whose config `muonforge config` refuses (the
    binary's own validation: unknown keys, bad values, inconsistent settings). `jobs` at a
    time; each call takes a tenth of a second or so."""
    bad, pending, active = {}, list(runs), []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                try:
                    proc = subprocess.Popen([str(binary), "config", str(run["config"]), "--json"],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
                except OSError as e:
                    bad[run["name"]] = [f"cannot run {binary}: {e}"]
                    continue
                active.append((run, proc))
            if not active:
                continue
            run, proc = active.pop(0)
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                bad[run["name"]] = [f"{binary} config {run['config']} did not answer in 120 s"]
                continue
            if proc.returncode != 0:
                bad[run["name"]] = (failure_reason(err.decode("utf-8", errors="replace"))
                                    or [f"{binary} config exited with {rc_text(proc.returncode)}"])
    finally:
        for _, proc in active:  # interrupted (Ctrl-C): no checker outlives sweep.py
            proc.kill()
            proc.wait()
    return bad


def invalid_configs_message(bad, runs, binary):
    """The report of the runs `validate_configs` refused: runs with the same message (up to the
    path of their own config file) are listed together, under the first one's message."""
    groups = {}
    for run in runs:
        if run["name"] in bad:
            key = tuple(l.replace(str(run["config"]), "{config}") for l in bad[run["name"]])
            groups.setdefault(key, []).append(run["name"])
    text = (f"{len(bad)} of {len(runs)} run config(s) are invalid; `{binary} config` says:")
    for names in groups.values():
        text += f"\n  {', '.join(names)}" + (f" ({len(names)} runs, the same message):" if
                                               len(names) > 1 else ":")
        text += "".join(f"\n      {l}" for l in bad[names[0]])
    return text


class Job:
    def __init__(self, run, slot, proc, logf, t0, start):
        self.run, self.slot, self.proc, self.logf, self.t0 = run, slot, proc, logf, t0
        self.start = start  # where this attempt's output begins in the (appended) log


def run_all(todo, out, binary, jobs, use_gpus, threads):
    """Runs `todo` (list of run dicts) `jobs` at a time. Returns (failed names, interrupted)."""
    stop = {"sig": 0}

    def on_signal(sig, _frame):
        if stop["sig"]:
            return
        stop["sig"] = sig
        log(f"signal {sig}: stopping the running trainers (each writes a checkpoint)...")
        for j in running:
            try:
                j.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass

    running, failed = [], []
    free = list(range(jobs))
    queue = list(todo)
    waiting = set()  # runs whose directory a trainer of an earlier sitting still holds
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            while queue and free and not stop["sig"]:
                pick = None
                for i, r in enumerate(queue):
                    holder = lock_holder(out / "runs" / r["name"])
                    if holder is None:
                        pick = i
                        break
                    if r["name"] not in waiting:
                        waiting.add(r["name"])
                        log(f"{r['name']}: its run directory is still held by pid {holder}, a "
                            f"trainer of an earlier sitting; starting it once that one has exited")
                if pick is None:
                    break
                run = queue.pop(pick)
                slot = free.pop(0)
                env = dict(os.environ)
                if use_gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot)
                env.setdefault("OMP_NUM_THREADS", str(threads))
                # The trainer watches this process: if sweep.py dies without stopping it (SIGKILL,
                # the OOM killer), it finishes its step, writes a checkpoint and exits instead of
                # training on unsupervised while the next sitting waits for its run directory.
                env["MF_LAUNCHER_PID"] = str(os.getpid())
                run_dir = out / "runs" / run["name"]
                run_dir.mkdir(parents=True, exist_ok=True)
                st = read_status(run_dir)
                st.update({"status": "running", "config_sha": run["sha"]})
                write_status(run_dir, st)
                logf = open(out / "logs" / f"{run['name']}.log", "a")
                cmd = [str(binary), "train", str(run["config"])]
                logf.write(f"$ {' '.join(cmd)}\n")
                logf.flush()
                start = logf.tell()
                log(f"start {run['name']}" + (f" on GPU {slot}" if use_gpus else ""))
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                running.append(Job(run, slot, proc, logf, time.time(), start))
            if not running and (stop["sig"] or not queue):
                break
            time.sleep(0.2)
            for j in list(running):
                rc = j.proc.poll()
                if rc is None:
                    continue
                running.remove(j)
                free.append(j.slot)
                j.logf.close()
                run_dir = out / "runs" / j.run["name"]
                st = read_status(run_dir)
                wall = st.get("wall_s", 0.0) + (time.time() - j.t0)
                if rc == 0 and not stop["sig"]:
                    status = "done"
                elif stop["sig"]:
                    status = "interrupted"
                else:
                    status = "failed"
                    failed.append(j.run["name"])
                st.update({"status": status, "rc": rc, "wall_s": wall,
                           "attempts": st.get("attempts", 0) + 1})
                st.pop("error", None)
                log_path = out / "logs" / (j.run["name"] + ".log")
                if status == "failed":
                    why = failure_reason(read_from(log_path, j.start)) or ["(no output)"]
                    st["error"] = "\n".join(why)
                write_status(run_dir, st)
                log(f"{status} {j.run['name']} ({rc_text(rc)}, {wall:.1f}s)" +
                    ("" if status != "failed" else f"; see {log_path}" +
                     "".join(f"\n    {l}" for l in why)))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return failed, bool(stop["sig"])


# ---------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------

def flops_per_token(cfg):
    """LlamaModel::flops_per_token: 6 x (multiplied weights) + 12 L d T (dense models)."""
    m, t = cfg["model"], cfg["train"]
    d, L, V, f = m["d_model"], m["n_layers"], m["vocab_size"], m["d_ff"]
    hd = d // m["n_heads"]
    qd, kvd = m["n_heads"] * hd, m["n_kv_heads"] * hd
    n = L * (2 * qd * d + 2 * kvd * d + 3 * d * f) + V * d
    return 6.0 * n + 12.0 * L * d * t["seq_len"]


def read_metrics(path):
    recs = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a torn last line
    except OSError:
        pass
    return recs


def collect(out, runs, keys):
    rows = []
    for run in runs:
        run_dir = out / "runs" / run["name"]
        st = read_status(run_dir)
        recs = read_metrics(run_dir / "metrics.jsonl")
        train = [r for r in recs if "loss" in r]
        val = [r for r in recs if "val_loss" in r]
        row = {"run": run["name"], "status": st.get("status", "pending")}
        for k in keys:
            v = run["values"].get(k, "")
            row[k] = json.dumps(v) if isinstance(v, (dict, list, bool)) else v
        row["steps"] = train[-1]["step"] if train else 0
        row["tokens"] = train[-1].get("tokens", "") if train else 0
        row["final_train_loss"] = train[-1]["loss"] if train else ""
        row["final_val_loss"] = val[-1]["val_loss"] if val else ""
        flops = ""
        try:
            cfg = json.loads((run_dir / "config.json").read_text())
            if train and cfg["model"].get("moe", {}).get("n_experts", 0) == 0:
                flops = f"{flops_per_token(cfg) * float(row['tokens']):.6g}"
        except (OSError, json.JSONDecodeError, KeyError, ZeroDivisionError):
            pass
        row["flops"] = flops
        row["wall_s"] = f"{st['wall_s']:.2f}" if "wall_s" in st else ""
        rows.append(row)
    fields = ["run", "status"] + keys + ["steps", "tokens", "final_train_loss", "final_val_loss",
                                         "flops", "wall_s"]
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "results.csv")
    return rows


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (head of this file) and "
                                        "docs/reproduction.md for the sweep file format.")
    ap.add_argument("sweep", help="sweep file (configs/sweeps/*.json)")
    ap.add_argument("--out", help="output folder (default: the sweep's \"out\", "
                                  "runs/sweep-{name})")
    ap.add_argument("--jobs", type=int, help="runs at a time (default: #GPUs, else 1)")
    ap.add_argument("--binary", default=None,
                    help="muonforge binary (default: $MUONFORGE_BINARY or build/muonforge)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config value for every run (after the grid), e.g. train.max_steps=30")
    ap.add_argument("--reduced", action="store_true",
                    help="run the sweep file's \"reduced\" grid (the CI form)")
    ap.add_argument("--dry-run", action="store_true",
                    help="write the configs, list the runs and check each config with "
                         "`muonforge config` (exit 2 when one is invalid)")
    ap.add_argument("--collect-only", action="store_true", help="only rebuild results.csv")
    ap.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                    help="run (or list, with --dry-run) only the runs with this config value, "
                         "e.g. --only optim.name=muon --only model.d_model=64; run=NAME picks "
                         "one run by name (repeatable; every condition must hold)")
    args = ap.parse_args(argv)

    spec, base, fixed, runs, keys = load_sweep(args.sweep, args.reduced)
    cli = parse_sets(args.set, "--set")
    for k in cli:
        check_key(k, "--set")
    out = Path(args.out or spec.get("out", "runs/sweep-{name}").replace("{name}", spec["name"]))
    out = out.resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    binary = Path(args.binary or os.environ.get("MUONFORGE_BINARY") or "build/muonforge")
    if not args.dry_run and not args.collect_only and not binary_usable(binary):
        raise UserError(f"muonforge binary {binary} not found; build it (scripts/setup.sh) or "
                        f"pass --binary PATH")

    # One config per run.
    conflicts = []
    for run in runs:
        flat = dict(fixed)
        flat.update(run["values"])
        flat.update(cli)
        cfg = nested(flat)
        cfg["base"] = str(base)
        cfg.setdefault("run", {})
        run_dir = out / "runs" / run["name"]
        cfg["run"]["dir"] = str(run_dir)
        cfg["run"]["name"] = run["name"]
        text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
        # The fingerprint leaves out where OUT is, so a sweep folder can move (scripts/gpu_sweep.sh
        # carries finished runs from one device machine to the next); older folders recorded the
        # absolute path, which is still accepted.
        legacy = hashlib.sha256((text + base.read_text()).encode()).hexdigest()[:16]
        moved = json.loads(text)
        moved["run"]["dir"] = "runs/" + run["name"]
        moved["base"] = os.path.basename(str(base))
        sha = hashlib.sha256((json.dumps(moved, indent=2, sort_keys=True) + base.read_text())
                             .encode()).hexdigest()[:16]
        run["config"] = out / "configs" / f"{run['name']}.json"
        run["sha"] = sha
        st = read_status(run_dir)
        if st.get("config_sha") == legacy:
            st["config_sha"] = sha
            write_status(run_dir, st)
        if st.get("config_sha") and st["config_sha"] != sha:
            conflicts.append(run["name"])
            continue
        write_atomic(run["config"], text)
    if conflicts:
        raise UserError(f"{len(conflicts)} run(s) in {out} were started with a different config "
                        f"(sweep file, --set, --reduced or the base config changed): "
                        f"{', '.join(conflicts[:5])}{' ...' if len(conflicts) > 5 else ''}. "
                        f"Use another --out, or delete those run folders to redo them.")
    write_atomic(out / "sweep.json", json.dumps(
        {"name": spec["name"], "sweep_file": str(Path(args.sweep).resolve()), "base": str(base),
         "reduced": args.reduced, "set": {**fixed, **cli}, "keys": keys,
         "runs": [{"name": r["name"], "values": r["values"]} for r in runs]}, indent=1) + "\n")

    picked = select_runs(runs, {**fixed}, cli, parse_sets(args.only, "--only"))
    done = [r for r in runs if read_status(out / "runs" / r["name"]).get("status") == "done"]
    todo = [r for r in picked if r not in done]
    log(f"{spec['name']}: {len(runs)} runs ({len(done)} finished, {len(todo)} to run"
        + (f"; --only keeps {len(picked)}" if args.only else "") + f") in {out}")
    checks = max(1, min(8, os.cpu_count() or 1))
    if args.dry_run:
        runs = picked
        for r in runs:
            print(f"  {r['name']:40s} {json.dumps(r['values'])}", flush=True)
        if not binary_usable(binary):
            print(f"sweep: warning: the {len(runs)} run configs were NOT validated: muonforge "
                  f"binary {binary} not found (build it with scripts/setup.sh, or pass --binary "
                  f"PATH or set MUONFORGE_BINARY)", file=sys.stderr, flush=True)
            return 0
        bad = validate_configs(binary, runs, checks)
        if bad:
            raise UserError(invalid_configs_message(bad, runs, binary) +
                            f"\n(the configs are in {out / 'configs'}; fix the sweep file or --set)")
        log(f"all {len(runs)} run configs are valid ({binary} config)")
        return 0
    failed, interrupted = [], False
    if todo and not args.collect_only:
        # One `muonforge config` per run before any starts: a typo fails here, not in every run.
        log(f"checking {len(todo)} run config(s) with {binary} config")
        bad = validate_configs(binary, todo, checks)
        if bad:
            raise UserError(invalid_configs_message(bad, todo, binary) +
                            f"\nno run was started (the configs are in {out / 'configs'}; fix "
                            f"the sweep file or --set)")
        gpus = count_gpus()
        device = str(cli.get("train.device", fixed.get("train.device", "auto")))
        use_gpus = gpus > 0 and device != "cpu"
        jobs = args.jobs or spec.get("jobs") or (gpus if use_gpus else 1)
        if use_gpus and jobs > gpus:
            raise UserError(f"--jobs {jobs} exceeds the {gpus} GPU(s) nvidia-smi lists")
        jobs = max(1, min(jobs, len(todo)))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        # The trainers get OMP_NUM_THREADS from the environment when it is set (run_all).
        given = os.environ.get("OMP_NUM_THREADS")
        shown = (f"{given} thread(s) each, from OMP_NUM_THREADS" if given
                 else f"{threads} thread(s) each")
        log(f"running {len(todo)} run(s), {jobs} at a time" +
            (f" (one GPU each)" if use_gpus else f" on the CPU ({shown})"))
        failed, interrupted = run_all(todo, out, binary, jobs, use_gpus, threads)
    rows = collect(out, runs, keys)
    log(f"results: {out / 'results.csv'} ({sum(r['status'] == 'done' for r in rows)}/{len(rows)} done)")
    if interrupted:
        log("interrupted; run the same command again to resume")
        return 130
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs in {out / 'logs'}); "
            f"run the same command again to retry them")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
