#!/usr/bin/env python3
"""Tiny worker for the launcher tests (tests/test_launcher.cpp). Standard library only.

    dist_worker.py env                 print the distributed variables and exit 0
    dist_worker.py fail-once R CODE    rank R exits CODE on the first attempt (MF_RESTART_COUNT=0)
    dist_worker.py fail R CODE         rank R prints 30 numbered lines then exits CODE; others hang
    dist_worker.py signal FILE         print "ready", wait for SIGINT/SIGTERM, append it to FILE.R, exit 0
    dist_worker.py slow-stop R CODE F  print "attempt A"; rank R exits CODE after 0.5 s on attempt 0; the
                                       others, on SIGTERM, create F.R and take 5 s to exit
    dist_worker.py checkpoint S FILE   print "ready"; on SIGINT/SIGTERM (any number of them) take S s
                                       (a checkpoint), then write "saved" to FILE.R and exit 0
"""
import os
import signal
import sys
import time

NAMES = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
         "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "MF_RESTART_COUNT"]


def main():
    mode = sys.argv[1]
    rank = int(os.environ["RANK"])
    attempt = int(os.environ["MF_RESTART_COUNT"])
    if mode == "env":
        print("ENV " + " ".join(f"{n}={os.environ.get(n, '<unset>')}" for n in NAMES), flush=True)
        sys.stderr.write(f"stderr line from rank {rank}\n")
        return 0
    if mode == "fail-once":
        bad, code = int(sys.argv[2]), int(sys.argv[3])
        if rank == bad and attempt == 0:
            print(f"rank {rank} failing on attempt {attempt}", flush=True)
            return code
        if attempt == 0:
            time.sleep(60)  # must be stopped by the launcher
        print(f"rank {rank} ok on attempt {attempt}", flush=True)
        return 0
    if mode == "fail":
        bad, code = int(sys.argv[2]), int(sys.argv[3])
        if rank == bad:
            time.sleep(0.5)
            for i in range(30):
                print(f"line {i} of rank {rank}", flush=True)
            return code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn hang: needs SIGKILL
        print(f"rank {rank} hanging", flush=True)
        time.sleep(600)
        return 0
    if mode == "signal":
        got = []

        def handler(signum, frame):
            got.append(signum)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        print("ready", flush=True)
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.05)
        with open(f"{sys.argv[2]}.{rank}", "a") as f:
            f.write(f"{signal.Signals(got[0]).name if got else 'none'}\n")
        print(f"rank {rank} got {signal.Signals(got[0]).name if got else 'nothing'}", flush=True)
        return 0
    if mode == "slow-stop":
        bad, code, marker = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        print(f"rank {rank} attempt {attempt}", flush=True)
        if rank == bad and attempt == 0:
            time.sleep(0.5)
            return code

        def slow_exit(signum, frame):
            open(f"{marker}.{rank}", "w").close()
            time.sleep(5)
            sys.exit(1)

        signal.signal(signal.SIGTERM, slow_exit)
        time.sleep(60)
        return 0
    if mode == "checkpoint":
        took, out = float(sys.argv[2]), sys.argv[3]
        got = []
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: got.append(signum))
        print("ready", flush=True)
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(took)
        with open(f"{out}.{rank}", "w") as f:
            f.write(f"saved after {len(got)} signal(s)\n")
        return 0
    print(f"unknown mode {mode}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
