#!/usr/bin/env python3
"""Plots of finished sweeps (scripts/sweep.py output folders) as PNG files.

    scripts/plot.py runs/sweep-NAME/ [more sweep folders...] [--out DIR] [--metric val|train]

Figures (written to --out, default the first sweep folder's plots/):
  loss_curves.png  training loss vs tokens, one panel per width (model.d_model), one curve per
                   optimizer / parametrisation at its best learning rate (Muon vs AdamW).
  lr_transfer.png  final loss vs learning rate (optim.lr), one panel per optimizer /
                   parametrisation, one line per width: with µP the minimum stays at the same lr
                   as the width grows (the transfer plot).
  speedup.png      per width: tokens AdamW used / tokens Muon needs to reach AdamW's final loss
                   (best lr of each), per parametrisation. On the validation curves (linear
                   interpolation between evaluations) when both runs evaluated at least 5 times,
                   else on training loss averaged over a trailing tenth of the points: a coarse
                   estimate (speedup.csv's "basis" column says which).
  diagnostics.png  when runs logged train.diag_every records: mean SVD entropy of the hidden
                   matrices and the largest max attention logit vs step (best-lr runs).
Also speedup.csv and best.csv (best lr and loss per width and optimizer).

"Final loss" is the last val_loss when the runs evaluated, else the last train loss (--metric
chooses). Runs that did not finish are left out. Needs matplotlib (pip install matplotlib);
everything else is the standard library.
"""

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


class UserError(Exception):
    pass


def log(msg):
    print(f"plot: {msg}", flush=True)


def fnum(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def read_metrics(path):
    recs = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except OSError:
        pass
    return recs


def smooth(xs, frac=0.05):
    """Trailing moving average over ~frac of the points (at least 1)."""
    w = max(1, int(len(xs) * frac))
    out, s = [], 0.0
    for i, x in enumerate(xs):
        s += x
        if i >= w:
            s -= xs[i - w]
        out.append(s / min(i + 1, w))
    return out


def load_runs(folders, metric):
    runs = []
    for folder in folders:
        folder = Path(folder)
        res = folder / "results.csv"
        if not res.is_file():
            raise UserError(f"{folder}: no results.csv (is it a scripts/sweep.py output folder?)")
        with open(res) as f:
            for row in csv.DictReader(f):
                if row.get("status") != "done":
                    continue
                recs = read_metrics(folder / "runs" / row["run"] / "metrics.jsonl")
                train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r and "tokens" in r]
                tok_at = {r["step"]: r["tokens"] for r in recs if "loss" in r and "tokens" in r}
                diag = [r for r in recs if "diag" in r]
                final = fnum(row.get("final_val_loss")) if metric == "val" else math.nan
                if math.isnan(final):
                    final = fnum(row.get("final_train_loss"))
                cfg = {}
                try:
                    cfg = json.loads((folder / "runs" / row["run"] / "config.json").read_text())
                except (OSError, json.JSONDecodeError):
                    pass
                width = int(fnum(row.get("model.d_model")) if row.get("model.d_model")
                            else cfg.get("model", {}).get("d_model", 0))
                lr = fnum(row.get("optim.lr")) if row.get("optim.lr") else \
                    cfg.get("optim", {}).get("lr", math.nan)
                opt = row.get("optim.name") or cfg.get("optim", {}).get("name", "?")
                mup = row.get("mup.enabled")
                if mup in (None, ""):
                    mup = cfg.get("mup", {}).get("enabled", False)
                else:
                    mup = mup.lower() == "true"
                bt = cfg.get("train", {}).get("batch_tokens")
                val = [(tok_at.get(r["step"], r["step"] * bt if bt else math.nan), r["val_loss"])
                       for r in recs if "val_loss" in r and "step" in r]
                val = [(t, l) for t, l in val if math.isfinite(t)]
                runs.append({"name": row["run"], "width": width, "lr": lr, "opt": opt,
                             "param": "µP" if mup else "SP", "final": final, "train": train,
                             "val": val, "diag": diag})
    if not runs:
        raise UserError("no finished runs in " + ", ".join(map(str, folders)))
    return runs


def best_runs(runs):
    """{(param, opt, width): run with the lowest final loss}."""
    best = {}
    for r in runs:
        if not math.isfinite(r["final"]):
            continue
        k = (r["param"], r["opt"], r["width"])
        if k not in best or r["final"] < best[k]["final"]:
            best[k] = r
    return best


def label(param, opt, params):
    return f"{opt} ({param})" if len(params) > 1 else opt


def crossing(curve, target):
    """Tokens at which a (tokens, loss) curve first reaches target, linearly interpolated between
    its points; nan if it never does."""
    prev = None
    for t, l in curve:
        if l <= target:
            if prev is None or prev[1] == l:
                return t
            t0, l0 = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - l)
        prev = (t, l)
    return math.nan


def trailing_mean(curve, w):
    ls = [l for _, l in curve]
    return [(t, sum(ls[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)))
            for i, (t, _) in enumerate(curve)]


MIN_VAL_POINTS = 5


def speedup_basis(a, m):
    """(basis, AdamW's final loss, AdamW's tokens, Muon's tokens to reach it).

    Validation curves when both runs evaluated at least MIN_VAL_POINTS times: the same held-out
    batches at every point, so the crossing is not an artefact of one easy training batch.
    Otherwise the training loss, both curves averaged over a trailing window of a tenth of the
    points (at least 5): a coarse estimate, since the runs see their batches in one order and
    the target is set by the last few of them."""
    if len(a["val"]) >= MIN_VAL_POINTS and len(m["val"]) >= MIN_VAL_POINTS:
        target = a["val"][-1][1]
        return "val", target, a["val"][-1][0], crossing(m["val"], target)
    w = max(5, len(a["train"]) // 10)
    sa, sm = trailing_mean(a["train"], w), trailing_mean(m["train"], w)
    target = sa[-1][1]
    return f"train (window {w})", target, a["train"][-1][0], crossing(sm, target)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="scripts/sweep.py output folders")
    ap.add_argument("--out", help="output folder (default FIRST_FOLDER/plots)")
    ap.add_argument("--metric", choices=["val", "train"], default="val",
                    help="final loss: last val_loss (default, falls back to train) or last train loss")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed: pip install matplotlib "
                        "(scripts/setup.sh tries to)")

    runs = load_runs(args.folders, args.metric)
    out = Path(args.out) if args.out else Path(args.folders[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    widths = sorted({r["width"] for r in runs})
    params = sorted({r["param"] for r in runs})
    opts = sorted({r["opt"] for r in runs})
    best = best_runs(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    # Loss curves per width at the best lr.
    fig, axes = plt.subplots(1, len(widths), figsize=(4.5 * len(widths), 3.6), squeeze=False)
    for ax, w in zip(axes[0], widths):
        i = 0
        for p in params:
            for o in opts:
                r = best.get((p, o, w))
                if not r or not r["train"]:
                    continue
                ax.plot([t for t, _ in r["train"]], smooth([l for _, l in r["train"]]),
                        color=colors[i % len(colors)], linestyle="-" if p == params[0] else "--",
                        label=f"{label(p, o, params)} lr {r['lr']:g}")
                i += 1
        ax.set_title(f"d_model {w}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("train loss (smoothed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Muon vs AdamW: training loss at the best learning rate")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    written.append("loss_curves.png")

    # LR transfer: final loss vs lr per width.
    panels = [(p, o) for p in params for o in opts if any(r["param"] == p and r["opt"] == o for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (p, o) in zip(axes[0], panels):
        for wi, w in enumerate(widths):
            pts = sorted((r["lr"], r["final"]) for r in runs
                         if r["param"] == p and r["opt"] == o and r["width"] == w
                         and math.isfinite(r["final"]) and math.isfinite(r["lr"]))
            if not pts:
                continue
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    color=colors[wi % len(colors)], label=f"d_model {w}")
            bx, by = min(pts, key=lambda t: t[1])
            ax.plot([bx], [by], marker="*", markersize=12, color=colors[wi % len(colors)])
        ax.set_xscale("log")
        ax.set_title(label(p, o, params) if len(params) > 1 else o)
        ax.set_xlabel("optim.lr")
        ax.set_ylabel(f"final {args.metric} loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Learning-rate transfer across widths (star = best lr)")
    fig.tight_layout()
    fig.savefig(out / "lr_transfer.png", dpi=110)
    plt.close(fig)
    written.append("lr_transfer.png")

    # Speedup: tokens AdamW used / tokens Muon needs to match AdamW's final (smoothed) loss.
    rows = []
    for p in params:
        for w in widths:
            a, m = best.get((p, "adamw", w)), best.get((p, "muon", w))
            if not a or not m or not a["train"] or not m["train"]:
                continue
            basis, target, a_tokens, need = speedup_basis(a, m)
            first = (m["val"] if basis == "val" else m["train"])[0][0]
            if need == first:  # already there at Muon's first point: the true crossing is earlier
                basis += ", lower bound"
            rows.append({"param": p, "width": w, "adamw_run": a["name"], "muon_run": m["name"],
                         "basis": basis, "adamw_final_loss": target, "adamw_tokens": a_tokens,
                         "muon_tokens_to_match": need,
                         "speedup": a_tokens / need if need and math.isfinite(need) else math.nan})
    with open(out / "speedup.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["param", "width", "adamw_run", "muon_run", "basis",
                                           "adamw_final_loss", "adamw_tokens",
                                           "muon_tokens_to_match", "speedup"])
        wr.writeheader()
        wr.writerows(rows)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for pi, p in enumerate(params):
        pts = [(r["width"], r["speedup"]) for r in rows if r["param"] == p]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    color=colors[pi % len(colors)], label=p)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("d_model")
    ax.set_ylabel("AdamW tokens / Muon tokens to match")
    ax.set_title("Muon speedup over AdamW (best lr each)")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)
    written.append("speedup.png")

    with open(out / "best.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["param", "optimizer", "width", "best_lr", "final_loss", "run"])
        for (p, o, w), r in sorted(best.items()):
            wr.writerow([p, o, w, r["lr"], r["final"], r["name"]])

    # Diagnostics of the best runs.
    diag_runs = [r for r in best.values() if r["diag"]]
    if diag_runs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for i, r in enumerate(sorted(diag_runs, key=lambda r: (r["param"], r["opt"], r["width"]))):
            steps = [d["step"] for d in r["diag"]]
            ent = [fnum(d["diag"].get("sv_entropy_mean")) for d in r["diag"]]
            mx = [max((fnum(x) for x in d["diag"].get("max_attn_logit", [])), default=math.nan)
                  for d in r["diag"]]
            style = dict(color=colors[i % len(colors)], marker=".",
                         label=f"{label(r['param'], r['opt'], params)} d{r['width']}")
            axes[0].plot(steps, ent, **style)
            axes[1].plot(steps, mx, **style)
        axes[0].set_ylabel("mean SVD entropy (hidden matrices)")
        axes[1].set_ylabel("max attention logit")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "diagnostics.png", dpi=110)
        plt.close(fig)
        written.append("diagnostics.png")

    log(f"{len(runs)} finished runs, widths {widths}: wrote {', '.join(written)}, speedup.csv, "
        f"best.csv in {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"plot: error: {e}", file=sys.stderr)
        sys.exit(2)
