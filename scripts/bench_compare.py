#!/usr/bin/env python3
"""muonforge vs PyTorch, side by side: runs `muonforge bench` and scripts/bench_torch.py on the
same configs and writes a Markdown report (docs/benchmarks.md).

    scripts/bench_compare.py run [--out DIR] [--seq 1024|2048|all] [--cases NAME,...]
                                 [--moe] [--moe-case-spec NAME=CONFIG:SEQ:MB:BT[:PARTNER]]
                                 [--impl both|muonforge|torch] [--steps N] [--warmup N]
                                 [--binary PATH] [--python PATH] [--timeout S] [--report FILE]
    scripts/bench_compare.py report RESULTS.jsonl... [-o docs/benchmarks.md]
    scripts/bench_compare.py cases

`run` appends one JSON line per measurement to DIR/results.jsonl (plus one "env" line: GPU name,
driver, CUDA, PyTorch) and writes DIR/benchmarks.md; `report` rebuilds the Markdown from one or
more results files (e.g. the two halves of a GPU session, fetched from the device). Standard
library only. Nothing here invents a figure: a case that failed or was not run shows "-".
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config, seq_len, micro_batch, batch_tokens). Micro-batches sized to fit an 80 GB card
# comfortably in both implementations; batch_tokens keeps 16-32 accumulation steps (124M at the
# 0.5M-token batch of the Muon-share target).
CASES = {
    "124m-1024": ("configs/llama-124m.json", 1024, 16, 524288),
    "124m-2048": ("configs/llama-124m.json", 2048, 8, 524288),
    "350m-1024": ("configs/llama-350m.json", 1024, 16, 262144),
    "350m-2048": ("configs/llama-350m.json", 2048, 8, 262144),
    "1b-1024": ("configs/llama-1b.json", 1024, 8, 131072),
    "1b-2048": ("configs/llama-1b.json", 2048, 4, 131072),
}

# MoE benchmark (`run --moe`, muonforge only: bench_torch.py has no MoE model): each MoE case is
# measured beside a dense model of the same active size in the same run. name: (config, seq_len,
# micro_batch, batch_tokens, dense partner or None). moe-moonlight-small's active MLP is
# (top_k 6 + 2 shared) x d_expert 256 = 2048 wide, the 124M model's d_ff, so the 124M config is its
# dense partner (the MoE model's first, dense layer is 3072 wide: 2% more active weights).
MOE_CASES = {
    "moe-small-1024": ("configs/moe-moonlight-small.json", 1024, 16, 524288, "moe-dense-1024"),
    "moe-dense-1024": ("configs/llama-124m.json", 1024, 16, 524288, None),
}

TARGETS = """\
| target (issue "CUDA backend") | how it is read from the table |
| --- | --- |
| tokens/s >= 1.0x PyTorch, every config | column "ratio" >= 1.00 |
| MFU >= 50% for 1B at seq 2048 | column "MFU mf" of 1b-2048 |
| Muon step <= 5% of step time, 124M at 0.5M tokens | column "Muon share mf" of 124m-1024 |
| flash attention >= 70% of cuDNN SDPA | column "attn vs cuDNN" (fwd+bwd time ratio cuDNN/ours) >= 0.70 |
| peak memory <= PyTorch's | "peak mem mf" (tensors + workspace) <= "peak mem torch" (max_memory_allocated) |
"""


def find_binary(arg):
    for c in [arg, os.environ.get("MF_BINARY"), os.path.join(REPO, "build", "muonforge")]:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("error: no muonforge binary (pass --binary or set MF_BINARY)")


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        return ""


def env_info(python):
    q = sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader")
    gpu, driver, mem = (q.split(", ") + ["", "", ""])[:3] if q else ("", "", "")
    nvcc = sh("nvcc --version | tail -2 | head -1")
    torch_v = sh(f"{shlex.quote(python)} -c 'import torch; print(torch.__version__, torch.version.cuda)'")
    smi_cuda = sh("nvidia-smi | grep -o 'CUDA Version: [0-9.]*'")
    return {"kind": "env", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "gpu": gpu or "none (CPU)", "driver": driver, "gpu_memory": mem,
            "cuda_driver": smi_cuda.replace("CUDA Version: ", ""), "nvcc": nvcc, "torch": torch_v,
            "host": sh("uname -n")}


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def run_one(impl, case, args, binary, logdir, table=None):
    cfg, T, mb, bt = (table or CASES)[case][:4]
    common = ["--seq-len", str(T), "--micro-batch", str(mb), "--batch-tokens", str(bt),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--json"]
    if impl == "muonforge":
        cmd = [binary, "bench", os.path.join(REPO, cfg), "--quiet"] + common
        if args.device:
            cmd += ["--device", args.device]
        if getattr(args, "profile", 0):
            cmd += ["--profile", str(args.profile)]
    else:
        cmd = [args.python, os.path.join(REPO, "scripts", "bench_torch.py"), os.path.join(REPO, cfg),
               "--binary", binary] + common
        if args.device:
            cmd += ["--device", args.device]
    t0 = time.time()
    rec = {"kind": "result", "impl": impl, "case": case, "config": cfg, "seq_len": T,
           "micro_batch": mb, "batch_tokens": bt, "cmd": " ".join(shlex.quote(c) for c in cmd)}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = "timeout"
    rec["wall_s"] = round(time.time() - t0, 1)
    if logdir:
        with open(os.path.join(logdir, f"bench_{impl}_{case}.log"), "w") as f:
            f.write(rec["cmd"] + "\n\n" + out)
    j = last_json(out) if rc == 0 else None
    if j is None:
        tail = [l for l in out.strip().splitlines() if l.strip()][-3:]
        rec["error"] = f"rc={rc}: " + " | ".join(tail)[-400:]
    else:
        rec["data"] = j
    return rec


def fmt(x, spec, scale=1.0):
    return "-" if x is None else format(x * scale, spec)


def g(rec, *path):
    x = rec.get("data") if rec else None
    for p in path:
        if not isinstance(x, dict) or x.get(p) is None:
            return None
        x = x[p]
    return x


def moe_report(records):
    """The MoE section: each MoE case beside its dense partner, measured in the same run."""
    res = {}
    for r in records:
        if r.get("kind") == "result" and r.get("group") == "moe":
            res[r["case"]] = r
            if r["case"] not in MOE_CASES:
                MOE_CASES[r["case"]] = (r["config"], r["seq_len"], r["micro_batch"], r["batch_tokens"],
                                        r.get("partner"))
    if not res:
        return []
    lines = ["", "## MoE beside a dense model of the same active size", "",
             "muonforge only (`bench_compare.py run --moe`; scripts/bench_torch.py has no MoE model). "
             "Active parameters: the weights multiplied per token (routed experts at top_k / "
             "n_experts, lm head included, embedding lookup not); MFU is computed on them. (`muonforge "
             "config` quotes active parameters the usual way instead: every parameter a token "
             "uses, embeddings included.)", "",
             "| case | config | experts (top-k + shared) | params | active params | mb x accum | tok/s | "
             "MFU (active) | peak mem (MiB) | tok/s vs dense partner |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    errors = []
    for case, spec in MOE_CASES.items():
        r = res.get(case)
        if not r:
            continue
        if "error" in r:
            errors.append(f"- {case}: {r['error']}")
        partner = res.get(spec[4]) if len(spec) > 4 and spec[4] else None
        tm, tp = g(r, "tok_per_s"), g(partner, "tok_per_s")
        moe = g(r, "moe")
        ex = f"{moe['n_experts']} ({moe['top_k']} + {moe['n_shared']})" if moe else "dense"
        accum = r["batch_tokens"] // (r["micro_batch"] * r["seq_len"])
        lines.append(
            f"| {case} | {r['config']} | {ex} | {fmt(g(r, 'params'), '.1f', 1e-6)}M | "
            f"{fmt(g(r, 'active_params'), '.1f', 1e-6)}M | {r['micro_batch']} x {accum} | "
            f"{fmt(tm, '.0f')} | {fmt(g(r, 'mfu'), '.1%')} | "
            f"{fmt(g(r, 'memory', 'peak_allocated'), '.0f', 2 ** -20)} | "
            f"{fmt(tm / tp if tm and tp else None, '.2f') if partner else ''} |")
    if errors:
        lines += ["", "Failed or timed-out MoE runs:", ""] + errors
    return lines


def profile_report(records, top=8):
    """Where muonforge's step goes: the largest regions of each case's profiled step."""
    rows = []
    for r in records:
        p = g(r, "profile") if r.get("kind") == "result" and r.get("impl") == "muonforge" else None
        if not p:
            continue
        regs = sorted(p["regions"], key=lambda x: -x["ms"])[:top]
        cells = ", ".join(f"{x['region']} {x['ms']:.2f} ({x['share']:.0%})" for x in regs)
        rows.append(f"| {r['case']} | {p['step_ms']:.1f} | {p['regions_ms'] / p['step_ms']:.0%} | {cells} |")
    if not rows:
        return []
    return ["", "## Where muonforge's step goes", "",
            f"`muonforge bench --profile`: one more step after the timed ones, with a CUDA event at every "
            f"region boundary; exclusive ms per step of the {top} largest regions (share of that step). "
            "`fwd.*`/`bwd.*` are the model's ops, `opt.*` the optimizer by kind of update, "
            "`bwd.recompute/...` activation recompute, `fwd.moe/...` MoE sub-steps. "
            "\"covered\" is the part of the step inside some region (the rest: the host between them).", "",
            "| case | step (ms) | covered | largest regions: ms (share) |", "| --- | --- | --- | --- |"] + rows


def report(records):
    for r in records:  # cases added with --case-spec travel in the results
        if r.get("kind") == "result" and r.get("group") != "moe" and r["case"] not in CASES:
            CASES[r["case"]] = (r["config"], r["seq_len"], r["micro_batch"], r["batch_tokens"])
    env = next((r for r in records if r.get("kind") == "env"), None)
    res = {}
    for r in records:
        if r.get("kind") == "result" and r.get("group") != "moe":
            res[(r["case"], r["impl"])] = r  # later lines win (re-runs)
    moe_lines = moe_report(records)
    lines = ["# Benchmarks: muonforge vs PyTorch", ""]
    if not any("data" in r for r in res.values()):
        lines += ["**No GPU figures exist yet.** No benchmark has run on a GPU. This file is written by "
                  "`scripts/bench_compare.py` from the results of `scripts/gpu_check.sh --part 2/3`; "
                  "docs/gpu.md gives the exact device calls. The cases it will measure:", "",
                  "| case | config | seq_len | micro_batch | batch_tokens (accumulation) |",
                  "| --- | --- | --- | --- | --- |"]
        for k, (c, T, mb, bt) in CASES.items():
            lines.append(f"| {k} | {c} | {T} | {mb} | {bt} ({bt // (mb * T)}) |")
        lines += ["", "and, with `--moe` (`scripts/gpu_check.sh --part 4`), muonforge only:", "",
                  "| case | config | seq_len | micro_batch | batch_tokens (accumulation) | dense partner |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for k, (c, T, mb, bt, partner) in MOE_CASES.items():
            lines.append(f"| {k} | {c} | {T} | {mb} | {bt} ({bt // (mb * T)}) | {partner or ''} |")
        lines += moe_lines
        lines += profile_report(records)
        lines += ["", "## Targets", "", TARGETS]
        return "\n".join(lines) + "\n"
    if env:
        lines += [f"- date: {env['date']}", f"- GPU: {env['gpu']} ({env['gpu_memory']}), driver "
                  f"{env['driver']}, CUDA (driver) {env['cuda_driver']}", f"- nvcc: {env['nvcc']}",
                  f"- PyTorch: {env['torch']}", ""]
    lines += ["Synthetic random tokens; `muonforge bench` and `scripts/bench_torch.py` with the same "
              "model, micro-batch, accumulation and optimizer (Muon + AdamW per the config). "
              "tokens/s = batch tokens / mean step time after warm-up. MFU against 989 TFLOP/s "
              "dense bf16; \"vs GEMM\" against the 8192^3 bf16 GEMM each side measured in the same "
              "process. Backward = (forward+backward) - forward. Peak memory: muonforge tensors + "
              "workspace (cudaMalloc'd by the backend), PyTorch `max_memory_allocated`.", ""]
    hdr = ("| case | mb x accum | tok/s mf | tok/s torch | ratio | MFU mf | MFU torch | vs GEMM mf | "
           "Muon share mf | Muon share torch | peak mem mf (MiB) | peak mem torch (MiB) | "
           "attn fwd+bwd mf (ms) | cuDNN (ms) | flash (ms) | attn vs cuDNN |")
    lines += [hdr, "|" + " --- |" * (hdr.count("|") - 1)]
    errors = []
    for case in CASES:
        mf, pt = res.get((case, "muonforge")), res.get((case, "torch"))
        if not mf and not pt:
            continue
        for r in (mf, pt):
            if r and "error" in r:
                errors.append(f"- {case} {r['impl']}: {r['error']}")
        base = mf or pt
        tm, tt = g(mf, "tok_per_s"), g(pt, "tok_per_s")
        ratio = tm / tt if tm and tt else None
        mem_mf = g(mf, "memory", "peak_allocated")
        mem_pt = g(pt, "memory", "peak_allocated")
        a_mf = None
        if g(mf, "attention", "fwd_ms") is not None:
            a_mf = g(mf, "attention", "fwd_ms") + g(mf, "attention", "bwd_ms")

        def attn_pt(name):
            b = g(pt, "attention", "backends", name)
            return b["fwd_ms"] + b["bwd_ms"] if b and "fwd_ms" in b else None
        a_cudnn, a_flash = attn_pt("cudnn"), attn_pt("flash")
        accum = base["batch_tokens"] // (base["micro_batch"] * base["seq_len"])
        lines.append(
            f"| {case} | {base['micro_batch']} x {accum} | {fmt(tm, '.0f')} | {fmt(tt, '.0f')} | "
            f"{fmt(ratio, '.2f')} | {fmt(g(mf, 'mfu'), '.1%')} | {fmt(g(pt, 'mfu'), '.1%')} | "
            f"{fmt(g(mf, 'mfu_vs_gemm'), '.1%')} | {fmt(g(mf, 'share', 'muon'), '.1%')} | "
            f"{fmt(g(pt, 'share', 'muon'), '.1%')} | {fmt(mem_mf, '.0f', 2 ** -20)} | "
            f"{fmt(mem_pt, '.0f', 2 ** -20)} | {fmt(a_mf, '.2f')} | {fmt(a_cudnn, '.2f')} | "
            f"{fmt(a_flash, '.2f')} | {fmt(a_cudnn / a_mf if a_cudnn and a_mf else None, '.2f')} |")
    lines += ["", "Time split (medians, ms per optimizer step):", "",
              "| case | impl | step | fwd | bwd (derived) | grad norm | optimizer | Muon | GEMM TFLOP/s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case in CASES:
        for impl in ("muonforge", "torch"):
            r = res.get((case, impl))
            if not r or "data" not in r:
                continue
            lines.append(
                f"| {case} | {impl} | {fmt(g(r, 'step_ms_median'), '.1f')} | "
                f"{fmt(g(r, 'time_ms', 'fwd'), '.1f')} | {fmt(g(r, 'time_ms', 'bwd'), '.1f')} | "
                f"{fmt(g(r, 'time_ms', 'grad_norm'), '.1f')} | {fmt(g(r, 'time_ms', 'optimizer'), '.1f')} | "
                f"{fmt(g(r, 'time_ms', 'muon'), '.1f')} | {fmt(g(r, 'gemm', 'tflops'), '.1f')} |")
    if errors:
        lines += ["", "Failed or timed-out runs:", ""] + errors
    lines += moe_lines
    lines += profile_report(records)
    notes = sorted({n for r in res.values() for n in (g(r, "notes") or [])})
    if notes:
        lines += ["", "Notes from bench_torch.py:", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Targets", "", TARGETS]
    return "\n".join(lines) + "\n"


def add_case_specs(specs):
    for spec in specs or []:
        try:
            name, rest = spec.split("=", 1)
            cfg, T, mb, bt = rest.rsplit(":", 3)
            CASES[name] = (cfg, int(T), int(mb), int(bt))
        except ValueError:
            sys.exit(f"error: --case-spec {spec}: expected NAME=CONFIG:SEQ:MICRO_BATCH:BATCH_TOKENS")


def add_moe_case_specs(specs):
    for spec in specs or []:
        try:
            name, rest = spec.split("=", 1)
            parts = rest.split(":")
            partner = None
            if len(parts) == 5:
                partner = parts.pop()
            cfg, T, mb, bt = parts
            MOE_CASES[name] = (cfg, int(T), int(mb), int(bt), partner or None)
        except ValueError:
            sys.exit(f"error: --moe-case-spec {spec}: expected NAME=CONFIG:SEQ:MICRO_BATCH:BATCH_TOKENS[:PARTNER]")
    for name, spec in MOE_CASES.items():
        if spec[4] and spec[4] not in MOE_CASES:
            sys.exit(f"error: MoE case {name} names the dense partner {spec[4]}, which is not a MoE-group "
                     f"case (known: {', '.join(MOE_CASES)})")


def cmd_run(args):
    binary = find_binary(args.binary)
    add_case_specs(args.case_spec)
    add_moe_case_specs(args.moe_case_spec)
    table = MOE_CASES if args.moe else CASES
    cases = list(table) if not args.cases else args.cases.split(",")
    for c in cases:
        if c not in table:
            sys.exit(f"error: unknown {'MoE ' if args.moe else ''}case {c}; known: {', '.join(table)}")
    if args.moe and args.impl == "torch":
        sys.exit("error: --moe runs muonforge only (scripts/bench_torch.py has no MoE model)")
    if args.seq != "all" and not args.cases:
        cases = [c for c in cases if table[c][1] == int(args.seq)]
    os.makedirs(args.out, exist_ok=True)
    logdir = os.path.join(args.out, "logs")
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    impls = ["muonforge", "torch"] if args.impl == "both" and not args.moe else [
        "muonforge" if args.moe else args.impl]
    t_start = time.time()
    with open(path, "a") as f:
        f.write(json.dumps(env_info(args.python)) + "\n")
        for case in cases:
            for impl in impls:
                left = args.budget - (time.time() - t_start) if args.budget else None
                if left is not None and left < 30:
                    rec = {"kind": "result", "impl": impl, "case": case, "config": table[case][0],
                           "seq_len": table[case][1], "micro_batch": table[case][2],
                           "batch_tokens": table[case][3], "wall_s": 0,
                           "error": "skipped: --budget spent"}
                else:
                    run_args = argparse.Namespace(**vars(args))
                    if left is not None:
                        run_args.timeout = int(max(20, min(args.timeout, left - 5)))
                    rec = run_one(impl, case, run_args, binary, logdir, table)
                if args.moe:
                    rec["group"] = "moe"
                    rec["partner"] = table[case][4]
                f.write(json.dumps(rec) + "\n")
                f.flush()
                d = rec.get("data") or {}
                status = "ok" if "data" in rec else rec["error"][:120]
                print(f"{case:10s} {impl:9s} {rec['wall_s']:6.1f}s  "
                      f"tok/s {fmt(d.get('tok_per_s'), '.0f'):>9s}  "
                      f"MFU {fmt(d.get('mfu'), '.1%'):>6s}  {status}", flush=True)
    records = [json.loads(l) for l in open(path) if l.strip()]
    md = report(records)
    out_md = args.report or os.path.join(args.out, "benchmarks.md")
    with open(out_md, "w") as f:
        f.write(md)
    print(f"results: {path}\nreport:  {out_md}")


def cmd_report(args):
    records = []
    for p in args.results:
        records += [json.loads(l) for l in open(p) if l.strip()]
    md = report(records)
    if args.o:
        with open(args.o, "w") as f:
            f.write(md)
        print(f"wrote {args.o}")
    else:
        sys.stdout.write(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="bench-out")
    r.add_argument("--seq", choices=["1024", "2048", "all"], default="all",
                   help="only the cases at this sequence length (ignored with --cases)")
    r.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    r.add_argument("--case-spec", action="append", metavar="NAME=CONFIG:SEQ:MB:BATCH_TOKENS",
                   help="add a case (e.g. tiny=configs/tiny.json:128:8:2048 for a CPU smoke test)")
    r.add_argument("--moe", action="store_true",
                   help="the MoE cases, each beside its dense partner (muonforge only): " + ", ".join(MOE_CASES))
    r.add_argument("--moe-case-spec", action="append", metavar="NAME=CONFIG:SEQ:MB:BATCH_TOKENS[:PARTNER]",
                   help="add a MoE-group case (PARTNER: the name of its dense case in the group)")
    r.add_argument("--impl", choices=["both", "muonforge", "torch"], default="both")
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--profile", type=int, default=1,
                   help="profiled muonforge steps after the timed ones (region table; 0: none)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"])
    r.add_argument("--binary")
    r.add_argument("--python", default=os.environ.get("MF_TORCH_PYTHON", "python3"))
    r.add_argument("--timeout", type=int, default=240, help="seconds per single bench run")
    r.add_argument("--budget", type=int, default=0,
                   help="seconds for the whole run: later runs get what is left or are skipped")
    r.add_argument("--report", help="Markdown output (default OUT/benchmarks.md)")
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+")
    p.add_argument("-o")
    sub.add_parser("cases")
    args = ap.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "report":
        cmd_report(args)
    else:
        for k, (c, T, mb, bt) in CASES.items():
            print(f"{k:10s} {c} seq {T} micro-batch {mb} batch_tokens {bt} (accum {bt // (mb * T)})")
        print("with --moe (muonforge only):")
        for k, (c, T, mb, bt, partner) in MOE_CASES.items():
            print(f"{k:14s} {c} seq {T} micro-batch {mb} batch_tokens {bt} (accum {bt // (mb * T)})"
                  + (f", beside {partner}" if partner else ""))


if __name__ == "__main__":
    main()
