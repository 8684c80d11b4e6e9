#!/usr/bin/env python3
"""Start the workers of a (multi-process, possibly multi-node) muonforge job; standard library only.

    python3 scripts/launch.py [launcher flags] PROGRAM [ARGS...]

Flags follow torchrun: --nproc-per-node N|gpu|cpu|auto, --nnodes, --node-rank, --master-addr,
--master-port (or --rdzv-endpoint HOST:PORT), --standalone, --max-restarts, --log-dir,
--local-ranks-filter; --rdzv-backend (c10d, static), --rdzv-id, --role and --tee are accepted and
change nothing (underscored spellings work too). Run one launcher per node. Each worker gets RANK
LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK MASTER_ADDR MASTER_PORT,
OMP_NUM_THREADS (the CPUs this process may use // nproc, unless set), MF_RESTART_COUNT
(also TORCHELASTIC_RESTART_COUNT) and MF_LAUNCHER_PID (a muonforge worker whose launcher dies,
killed or lost with its terminal, finishes its step, checkpoints and stops). Rank 0 hosts the
rendezvous store at MASTER_ADDR:MASTER_PORT.

Every line a worker prints appears on the console as "[rank] line" and in LOGDIR/rank_<rank>.log
(appended across restarts; without --log-dir a temporary folder, removed when the job succeeds).
SIGINT/SIGTERM/SIGHUP are forwarded to the workers, which get --stop-timeout seconds to checkpoint
and exit before SIGKILL; a second SIGINT kills them at once, a repeated SIGTERM (Slurm signals
every process of a step) changes nothing. When a worker exits
non-zero the others get SIGTERM (SIGKILL after --grace-period seconds); if restarts remain the group
starts again (the program resumes from its run directory's latest checkpoint), otherwise the
launcher prints the failing rank's last lines and exits with its exit code.

Multi-node restarts are per node: a node whose workers fail restarts them, and the workers on the
other nodes see their peers vanish (store/collective errors), fail and restart too. Workers get
the attempt number in MF_RESTART_COUNT and the rendezvous store only admits ranks of its own
attempt, so a restarted rank waits for the new rank 0 rather than joining the group going down.
Under Slurm, run with srun --kill-on-bad-exit=1 so that a node that gives up ends the whole step.
"""
import argparse
import collections
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

TAIL_LINES = 20


def fail(msg, code=2):
    sys.stderr.write(f"launch.py: error: {msg}\n")
    sys.exit(code)


def note(msg):
    try:
        sys.stderr.write(f"[launch] {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_gpus():
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1", "none", "NoDevFiles"):
        return len([d for d in visible.split(",") if d.strip()])
    if visible is not None:
        return 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def usable_cpus():
    """The CPUs this process may run on (Slurm's and taskset's affinity, cgroup cpusets), not the
    whole machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_nproc(spec):
    if spec == "gpu":
        n = count_gpus()
        if n == 0:
            fail("--nproc-per-node gpu: no GPU found (nvidia-smi -L lists none, or CUDA_VISIBLE_DEVICES "
                 "is empty); give a number or 'cpu'")
        return n
    if spec == "cpu":
        return usable_cpus()
    if spec == "auto":
        return count_gpus() or usable_cpus()
    try:
        n = int(spec)
    except ValueError:
        fail(f"--nproc-per-node '{spec}' must be a positive integer, 'gpu', 'cpu' or 'auto'")
    if n < 1:
        fail(f"--nproc-per-node {n} must be >= 1")
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch.py", allow_abbrev=False,
                                description="Start the workers of a muonforge job (torchrun-compatible flags).")
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="1",
                   help="workers on this node: a number, gpu (one per GPU), cpu (one per core) or auto")
    p.add_argument("--nnodes", default="1", help="number of nodes (one launcher per node)")
    p.add_argument("--node-rank", "--node_rank", type=int, default=None,
                   help="this node's index (default: SLURM_NODEID when --nnodes > 1, else 0)")
    p.add_argument("--master-addr", "--master_addr", default=None,
                   help="host of node 0, where rank 0 hosts the store (default: MASTER_ADDR or 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", type=int, default=None,
                   help="store port (default: MASTER_PORT or 29500)")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None, metavar="HOST[:PORT]",
                   help="torchrun's spelling of --master-addr/--master-port")
    p.add_argument("--rdzv-backend", "--rdzv_backend", default=None,
                   help="accepted for torchrun command lines (c10d or static): rank 0 always hosts "
                   "muonforge's own store at the endpoint")
    p.add_argument("--rdzv-id", "--rdzv_id", default=None, help="accepted and ignored (torchrun)")
    p.add_argument("--role", default=None, help="accepted and ignored (torchrun)")
    p.add_argument("--tee", "-t", default=None,
                   help="accepted and ignored (torchrun): output always goes to the console and "
                   "to LOGDIR/rank_<r>.log")
    p.add_argument("--local-ranks-filter", "--local_ranks_filter", default=None, metavar="LIST",
                   help="show only these local ranks' output on the console, e.g. 0 or 0,1 (all "
                   "ranks still log to LOGDIR)")
    p.add_argument("--standalone", action="store_true",
                   help="single node on 127.0.0.1 with a free port (fresh for every restart)")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0,
                   help="restart the group this many times after a failure")
    p.add_argument("--log-dir", "--log_dir", default=None,
                   help="directory for rank_<r>.log files (default: a new temporary directory)")
    p.add_argument("--grace-period", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the other workers "
                   "after one failed")
    p.add_argument("--stop-timeout", type=float, default=300.0,
                   help="seconds the workers get to checkpoint and exit after a forwarded "
                   "SIGINT/SIGTERM/SIGHUP before SIGKILL (default 300; a second Ctrl-C kills at once)")
    p.add_argument("--monitor-interval", "--monitor_interval", type=float, default=0.1,
                   help="seconds between checks of the workers")
    p.add_argument("--no-python", "--no_python", action="store_true",
                   help="run PROGRAM as is even when it ends in .py")
    p.add_argument("program", help="the worker program (e.g. build/muonforge)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to every worker")
    a = p.parse_args(argv)

    if ":" in a.nnodes:
        fail(f"--nnodes {a.nnodes}: elastic node ranges are not supported; give one number")
    try:
        a.nnodes = int(a.nnodes)
    except ValueError:
        fail(f"--nnodes '{a.nnodes}' must be a positive integer")
    if a.nnodes < 1:
        fail(f"--nnodes {a.nnodes} must be >= 1")
    a.nproc = resolve_nproc(a.nproc_per_node)
    if a.max_restarts < 0:
        fail(f"--max-restarts {a.max_restarts} must be >= 0")
    if a.grace_period < 0:
        fail(f"--grace-period {a.grace_period} must be >= 0")
    if a.stop_timeout < 0:
        fail(f"--stop-timeout {a.stop_timeout} must be >= 0")
    if a.rdzv_backend is not None and a.rdzv_backend not in ("c10d", "static"):
        fail(f"--rdzv-backend {a.rdzv_backend}: only c10d and static are understood (rank 0 hosts "
             f"muonforge's own store at --rdzv-endpoint / --master-addr)")
    if a.rdzv_endpoint is not None:
        host, _, port = a.rdzv_endpoint.rpartition(":") if ":" in a.rdzv_endpoint else (a.rdzv_endpoint, "", "")
        if a.master_addr is not None and a.master_addr != host:
            fail(f"--rdzv-endpoint {a.rdzv_endpoint} and --master-addr {a.master_addr} disagree")
        a.master_addr = host
        if port:
            try:
                a.master_port = int(port)
            except ValueError:
                fail(f"--rdzv-endpoint {a.rdzv_endpoint}: port '{port}' is not an integer")
    a.show_local = None
    if a.local_ranks_filter is not None:
        try:
            a.show_local = {int(x) for x in a.local_ranks_filter.split(",") if x.strip()}
        except ValueError:
            fail(f"--local-ranks-filter '{a.local_ranks_filter}': expected local ranks such as 0 or 0,1")

    if a.standalone:
        if a.nnodes != 1:
            fail(f"--standalone runs on one node but --nnodes is {a.nnodes}")
        a.node_rank = 0
        a.master_addr = "127.0.0.1"
    else:
        if a.node_rank is None:
            slurm_node = os.environ.get("SLURM_NODEID")
            a.node_rank = int(slurm_node) if (a.nnodes > 1 and slurm_node is not None) else 0
        if a.master_addr is None:
            a.master_addr = os.environ.get("MASTER_ADDR")
            if a.master_addr is None:
                if a.nnodes > 1:
                    fail(f"--nnodes {a.nnodes} needs --master-addr (or MASTER_ADDR): the host of node 0")
                a.master_addr = "127.0.0.1"
        if a.master_port is None:
            try:
                a.master_port = int(os.environ.get("MASTER_PORT", "29500"))
            except ValueError:
                fail(f"MASTER_PORT='{os.environ['MASTER_PORT']}' is not an integer")
        if not 1 <= a.master_port <= 65535:
            fail(f"--master-port {a.master_port} is out of range 1..65535")
    if not 0 <= a.node_rank < a.nnodes:
        fail(f"--node-rank {a.node_rank} must be in 0..{a.nnodes - 1} (--nnodes {a.nnodes})")

    cmd = [a.program] + a.args
    if a.program.endswith(".py") and not a.no_python:
        cmd = [sys.executable] + cmd
    if shutil.which(cmd[0]) is None:
        fail(f"cannot find the program '{cmd[0]}' (not a file on PATH or an executable path)")
    a.cmd = cmd
    return a


class Worker:
    def __init__(self, rank, local_rank, proc, log):
        self.rank = rank
        self.local_rank = local_rank
        self.proc = proc
        self.log = log
        self.tail = collections.deque(maxlen=TAIL_LINES)
        self.threads = []
        self.rc = None  # set with `ended` by the waiter thread
        self.ended = None
        t = threading.Thread(target=self.wait, daemon=True)
        t.start()

    def wait(self):
        rc = self.proc.wait()
        self.ended = time.monotonic()
        self.rc = rc


class Launcher:
    def __init__(self, a):
        self.a = a
        self.print_lock = threading.Lock()
        self.signal = None  # the signal that asked us to stop
        self.workers = []
        self.temp_logs = a.log_dir is None  # removed again when the job succeeds
        if a.log_dir is None:
            a.log_dir = tempfile.mkdtemp(prefix="mf_launch_")
        os.makedirs(a.log_dir, exist_ok=True)

    # -- output ------------------------------------------------------------------------------------
    def pump(self, w, pipe, console):
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self.print_lock:
                try:
                    if self.a.show_local is None or w.local_rank in self.a.show_local:
                        console.write(f"[{w.rank}] {text}\n")
                        console.flush()
                except (OSError, ValueError):
                    pass  # console gone (closed pipe, hung-up terminal): keep draining into the log
                w.log.write(text + "\n")
                w.log.flush()
                w.tail.append(text)
        pipe.close()

    # -- process control ---------------------------------------------------------------------------
    def start_group(self, attempt, port):
        a = self.a
        world = a.nnodes * a.nproc
        base_env = dict(os.environ)
        omp = base_env.get("OMP_NUM_THREADS") or str(max(1, usable_cpus() // a.nproc))
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        self.workers = []
        for local in range(a.nproc):
            rank = a.node_rank * a.nproc + local
            env = dict(base_env)
            env.update({
                "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(a.nproc), "GROUP_RANK": str(a.node_rank),
                "NODE_RANK": str(a.node_rank), "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world),
                "MASTER_ADDR": a.master_addr, "MASTER_PORT": str(port), "OMP_NUM_THREADS": omp,
                "MF_RESTART_COUNT": str(attempt), "TORCHELASTIC_RESTART_COUNT": str(attempt),
                "TORCHELASTIC_MAX_RESTARTS": str(a.max_restarts),
                # muonforge workers watch this pid: when the launcher dies they checkpoint and stop
                "MF_LAUNCHER_PID": str(os.getpid()),
            })
            log = open(os.path.join(a.log_dir, f"rank_{rank}.log"), "a", encoding="utf-8")
            log.write(f"=== {stamp} attempt {attempt} (MF_RESTART_COUNT={attempt}) rank {rank}/{world} "
                      f"master {a.master_addr}:{port}: {' '.join(a.cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(a.cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
            except OSError as e:
                log.close()
                self.stop_all(signal.SIGKILL, 0)
                fail(f"cannot start '{a.cmd[0]}': {e}", 1)
            w = Worker(rank, local, proc, log)
            for pipe, console in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=self.pump, args=(w, pipe, console), daemon=True)
                t.start()
                w.threads.append(t)
            self.workers.append(w)

    def send(self, sig, only_running=True):
        for w in self.workers:
            if only_running and w.proc.poll() is not None:
                continue
            try:
                os.killpg(w.proc.pid, sig)  # the worker leads its own session: reach its children too
            except (ProcessLookupError, PermissionError):
                pass

    def stop_all(self, first_sig, grace):
        """first_sig (None: none) to every running worker, SIGKILL to whatever is left after `grace` s."""
        if first_sig is not None:
            self.send(first_sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(w.proc.poll() is None for w in self.workers):
            time.sleep(0.05)
        left = [w.rank for w in self.workers if w.proc.poll() is None]
        if left:
            note(f"rank(s) {', '.join(map(str, left))} still running {grace:g} s after the stop: "
                 f"killing them (SIGKILL){' (see --stop-timeout)' if first_sig is None else ''}")
            self.send(signal.SIGKILL)
        for w in self.workers:
            w.proc.wait()
        self.finish_output()

    def finish_output(self):
        for w in self.workers:
            for t in w.threads:
                t.join(timeout=5)
            w.log.close()

    def on_signal(self, signum, frame):
        if self.signal is not None:
            # A second Ctrl-C: no more patience. A repeated SIGTERM/SIGHUP is the same request
            # (Slurm signals every process of a step); the workers already have it.
            if signum == signal.SIGINT:
                note("second SIGINT: killing the workers (SIGKILL)")
                self.send(signal.SIGKILL)
            return
        self.signal = signum
        note(f"got {signal.Signals(signum).name}; forwarding it to the workers")
        self.send(signum)

    # -- main loop ---------------------------------------------------------------------------------
    def run_group(self):
        """Monitor until all succeed (None), one fails ((worker, code)) or a signal arrives.

        When several have failed by the time we look, the one that exited first is the cause (the
        others usually failed because it vanished)."""
        a = self.a
        while True:
            if self.signal is not None:
                return None
            done = [w for w in self.workers if w.rc is not None]
            failed = [w for w in done if w.rc != 0]
            if failed:
                first = min(failed, key=lambda w: w.ended)
                return (first, first.rc)
            if len(done) == len(self.workers):
                return None
            time.sleep(a.monitor_interval)

    def main(self):
        a = self.a
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        # Workers live in their own sessions: tell them of a SIGHUP, unless it was ignored when
        # the launcher started (nohup): then it and the workers (who inherit that) run on.
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            signal.signal(signal.SIGHUP, self.on_signal)
        world = a.nnodes * a.nproc
        for attempt in range(a.max_restarts + 1):
            port = free_port() if a.standalone else a.master_port
            note(f"starting {a.nproc} worker(s) on node {a.node_rank}/{a.nnodes}: ranks "
                 f"{a.node_rank * a.nproc}..{a.node_rank * a.nproc + a.nproc - 1} of {world}, master "
                 f"{a.master_addr}:{port}, attempt {attempt}, logs in {a.log_dir}")
            self.start_group(attempt, port)
            failed = self.run_group()
            if self.signal is not None:
                # The workers got the signal: they finish the step, checkpoint and exit.
                self.stop_all(None, a.stop_timeout)  # on_signal already forwarded it
                note(f"stopped by {signal.Signals(self.signal).name}")
                return 128 + self.signal
            if failed is None:
                for w in self.workers:
                    w.proc.wait()
                self.finish_output()
                note(f"all {a.nproc} worker(s) finished successfully")
                if self.temp_logs:  # nothing to look into: do not leave one folder per job in /tmp
                    shutil.rmtree(a.log_dir, ignore_errors=True)
                return 0
            w, rc = failed
            self.stop_all(signal.SIGTERM, a.grace_period)
            what = f"exit code {rc}" if rc > 0 else f"signal {signal.Signals(-rc).name}"
            if self.signal is not None:
                # Asked to stop while the failed group was going down: no new group (it would
                # miss the signal and only be SIGKILLed after the grace period).
                note(f"rank {w.rank} failed ({what}); not restarting: stopped by "
                     f"{signal.Signals(self.signal).name}")
                return 128 + self.signal
            if attempt < a.max_restarts:
                note(f"rank {w.rank} failed ({what}); stopped the others; restarting the group "
                     f"(restart {attempt + 1} of {a.max_restarts})")
                continue
            code = rc if rc > 0 else 128 - rc
            log_path = os.path.join(a.log_dir, f"rank_{w.rank}.log")
            lines = "\n".join("    " + l for l in w.tail)
            note(f"rank {w.rank} (local rank {w.local_rank}, pid {w.proc.pid}) failed with {what}"
                 + (f" after {a.max_restarts} restart(s)" if a.max_restarts else "")
                 + f"; last {len(w.tail)} line(s) of its output (full log: {log_path}):\n{lines}")
            return code
        return 1  # not reached


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    sys.exit(Launcher(a).main())


if __name__ == "__main__":
    main()
