#!/usr/bin/env python3
"""Plots of finished sweeps (scripts/sweep.py output folders) as PNG files.

    scripts/plot.py runs/sweep-NAME/ [more sweep folders...] [--out DIR] [--metric val|train]

Figures (written to --out, default the first sweep folder's plots/):
  loss_curves.png  training loss vs tokens, one panel per width (model.d_model), one curve per
                   optimizer / parametrisation at its best learning rate.
  lr_transfer.png  final loss vs learning rate (optim.lr), one panel per optimizer /
                   parametrisation, one line per width: with µP the minimum stays at the same lr
                   as the width grows (the transfer plot).
  speedup.png      per width: tokens AdamW used / tokens Muon (and every other optimizer in the
                   sweep) needs to reach AdamW's final loss (best lr of each), per
                   parametrisation. On the validation curves (linear
                   interpolation between evaluations) when both runs evaluated at least 5 times,
                   else on training loss averaged over a trailing tenth of the points: a coarse
                   estimate (speedup.csv's "basis" column says which).
  diagnostics.png  when runs logged train.diag_every records: mean SVD entropy of the hidden
                   matrices and the largest max attention logit vs step (best-lr runs).
Also speedup.csv and best.csv (best lr and loss per width and optimizer).

Seeds (train.seed): runs that differ only in their seed are one cell. A cell's final loss is the
mean over its seeds (lr_transfer.png draws the min..max range as an error bar), the best lr is
the one with the lowest mean over the seeds every lr of that width has (so extra seeds run only
at the best lr do not change which lr is best), and the speedup is computed per seed, pairing AdamW's and Muon's
runs of the same seed, then averaged (speedup.csv lists every seed's value, min and max).
Other keys that vary between runs (model.init_std, optim.wd, ...) split the parametrisation
label ("SP, init_std=0.04"), so such runs are never mixed into another cell's lr curve.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402  (KEY=VALUE parsing, shared with sweep files' --set)


class UserError(Exception):
    pass


def log(msg):
    print(f"plot: {msg}", flush=True)


def warn(msg):
    print(f"plot: warning: {msg}", file=sys.stderr, flush=True)


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


def load_runs(folders, metric, only=None):
    runs = []
    for folder in folders:
        folder = Path(folder)
        res = folder / "results.csv"
        if not res.is_file():
            raise UserError(f"{folder}: no results.csv (is it a scripts/sweep.py output folder?)")
        with open(res) as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            keys = fields[fields.index("status") + 1:fields.index("steps")] \
                if "status" in fields and "steps" in fields else []
            for row in reader:
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
                seed = row.get("train.seed") or cfg.get("train", {}).get("seed", "")
                extra = {k: (row.get(k) or json.dumps(lookup(cfg, k)))
                         for k in keys if k not in STRUCTURAL_KEYS}
                runs.append({"name": row["run"], "width": width, "lr": lr, "opt": opt,
                             "param": "µP" if mup else "SP", "final": final, "train": train,
                             "val": val, "diag": diag, "seed": str(seed), "extra": extra,
                             "cfg": cfg})
    if not runs:
        raise UserError("no finished runs in " + ", ".join(map(str, folders)))
    try:
        wanted = sweep.parse_sets(only, "--only")  # the sweep file's KEY=VALUE rules
    except sweep.UserError as e:
        raise UserError(str(e))
    for key, want in wanted.items():
        if all(lookup(r["cfg"], key) is None for r in runs):
            raise UserError(f"--only {key}: no run's config.json has the key {key!r}")
        runs = [r for r in runs if lookup(r["cfg"], key) == want]
        if not runs:
            raise UserError(f"--only {key}: no finished run has {key} = {json.dumps(want)}")
    label_variants(runs)
    return runs


# Grid keys that plot.py reads itself (width, parametrisation, optimizer, lr, seed); any other
# key that varies splits the parametrisation label.
STRUCTURAL_KEYS = {"model.d_model", "model.n_heads", "model.n_kv_heads", "model.d_ff",
                   "mup.enabled", "optim.scale", "optim.name", "optim.lr", "optim.adamw.lr",
                   "train.seed"}


def lookup(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def label_variants(runs):
    """Appends ", key=value" to each run's "param" for every extra key whose value differs between
    runs (keys shortened to their last part), so cells never mix, e.g., two init_stds."""
    keys = sorted({k for r in runs for k in r.get("extra", {})})
    varying = [k for k in keys if len({str(r.get("extra", {}).get(k)) for r in runs}) > 1]
    for r in runs:
        parts = [f"{k.split('.')[-1]}={r['extra'].get(k)}" for k in varying]
        if parts:
            r["param"] = r["param"] + ", " + ", ".join(parts)
    return varying


def cells(runs):
    """{(param, opt, width, lr): [runs]}: one cell per configuration, its runs the seeds."""
    out = defaultdict(list)
    for r in runs:
        out[(r["param"], r["opt"], r["width"], r["lr"])].append(r)
    for k in out:
        out[k].sort(key=lambda r: (r["seed"], r["name"]))
    return out


def cell_stats(rs):
    """(mean, min, max) of the finite final losses of a cell's runs; nan when none is finite."""
    xs = [r["final"] for r in rs if math.isfinite(r["final"])]
    if not xs:
        return math.nan, math.nan, math.nan
    return sum(xs) / len(xs), min(xs), max(xs)


def best_cells(runs):
    """{(param, opt, width): the runs (seeds) of the best lr}. The lrs are compared on the seeds
    they all have (a mean over three seeds against one seed's loss would favour the noisier
    cell), or on their own means when they share none; the chosen cell keeps all its seeds. A
    cell counts only when every one of its seeds has a finite loss (a diverged seed is a bad
    lr)."""
    cands = defaultdict(list)
    for (p, o, w, _), rs in cells(runs).items():
        if all(math.isfinite(r["final"]) for r in rs):
            cands[(p, o, w)].append(rs)
    best = {}
    for k, group in cands.items():
        common = set.intersection(*({r["seed"] for r in rs} for rs in group))

        def score(rs):
            xs = [r["final"] for r in rs if not common or r["seed"] in common]
            return sum(xs) / len(xs)
        best[k] = min(group, key=score)
    return best


def speedup_row(adamw_runs, muon_runs):
    """The speedup of one optimizer (Muon or another) over AdamW for one parametrisation and
    width, from the best-lr cells: per seed present in both (AdamW's and the other optimizer's
    runs of the same seed paired; without a common seed the first runs), then the mean of the
    finite ones. Returns a dict for speedup.csv."""
    by_seed_a = {r["seed"]: r for r in adamw_runs}
    pairs = [(by_seed_a[m["seed"]], m) for m in muon_runs if m["seed"] in by_seed_a]
    if not pairs:
        pairs = [(adamw_runs[0], muon_runs[0])]
    per = []
    for a, m in pairs:
        if not a["train"] or not m["train"]:
            continue
        basis, target, a_tokens, need = speedup_basis(a, m)
        first = (m["val"] if basis == "val" else m["train"])[0][0]
        if need == first:  # already there at Muon's first point: the true crossing is earlier
            basis += ", lower bound"
        sp = a_tokens / need if need and math.isfinite(need) else math.nan
        per.append({"seed": a["seed"], "a": a, "m": m, "basis": basis, "target": target,
                    "a_tokens": a_tokens, "need": need, "speedup": sp})
    if not per:
        return None
    fin = [x["speedup"] for x in per if math.isfinite(x["speedup"])]

    def mean(xs):
        xs = [x for x in xs if math.isfinite(x)]
        return sum(xs) / len(xs) if xs else math.nan
    return {"adamw_run": " ".join(x["a"]["name"] for x in per),
            "run": " ".join(x["m"]["name"] for x in per),
            "basis": "; ".join(sorted({x["basis"] for x in per})),
            "adamw_final_loss": mean([x["target"] for x in per]),
            "adamw_tokens": mean([x["a_tokens"] for x in per]),
            "tokens_to_match": mean([x["need"] for x in per]),
            "speedup": mean(fin) if fin else math.nan,
            "seeds": " ".join(x["seed"] for x in per),
            "speedup_per_seed": " ".join(f"{x['speedup']:.4g}" for x in per),
            "speedup_min": min(fin) if fin else math.nan,
            "speedup_max": max(fin) if fin else math.nan}


def speedup_rows(best_all, params, widths, opts):
    """speedup.csv's rows: every optimizer but AdamW against AdamW, per parametrisation and
    width where both have a best-lr cell."""
    rows = []
    for p in params:
        for o in challengers(opts):
            for w in widths:
                a, m = best_all.get((p, "adamw", w)), best_all.get((p, o, w))
                if not a or not m:
                    continue
                row = speedup_row(a, m)
                if row:
                    rows.append({"param": p, "width": w, "optimizer": o, **row})
    return rows


def label(param, opt, params):
    return f"{opt} ({param})" if len(params) > 1 else opt


NAMES = {"adamw": "AdamW", "muon": "Muon", "normuon": "NorMuon", "soap": "SOAP", "asgo": "ASGO"}


def pretty(opt):
    return NAMES.get(opt, opt.capitalize())


def challengers(opts):
    """The optimizers whose speedup over AdamW is measured: all but AdamW, Muon first."""
    return sorted((o for o in opts if o != "adamw"), key=lambda o: (o != "muon", o))


def comparison_title(opts):
    """'Muon vs AdamW' for the classic pair, else every optimizer named (AdamW last)."""
    names = [pretty(o) for o in challengers(opts)] + (["AdamW"] if "adamw" in opts else [])
    return " vs ".join(names) if len(names) <= 3 else f"{len(names)} optimizers"


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
    ap.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                    help="keep the runs whose resolved config has KEY = VALUE (JSON value; "
                         "repeatable), e.g. --only mup.enabled=true")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed: pip install matplotlib "
                        "(scripts/setup.sh tries to)")

    runs = load_runs(args.folders, args.metric, args.only)
    out = Path(args.out) if args.out else Path(args.folders[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    widths = sorted({r["width"] for r in runs})
    params = sorted({r["param"] for r in runs})
    opts = sorted({r["opt"] for r in runs})
    best_all = best_cells(runs)
    best = {k: rs[0] for k, rs in best_all.items()}
    n_seeds = max(len(rs) for rs in cells(runs).values())
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
    fig.suptitle(f"{comparison_title(opts)}: training loss at the best learning rate")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    written.append("loss_curves.png")

    # LR transfer: final loss vs lr per width.
    panels = [(p, o) for p in params for o in opts if any(r["param"] == p and r["opt"] == o for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (p, o) in zip(axes[0], panels):
        for wi, w in enumerate(widths):
            pts = sorted((lr, *cell_stats(rs)) for (cp, co, cw, lr), rs in cells(runs).items()
                         if cp == p and co == o and cw == w and math.isfinite(lr)
                         and math.isfinite(cell_stats(rs)[0]))
            if not pts:
                continue
            xs, ys = [t[0] for t in pts], [t[1] for t in pts]
            if n_seeds > 1:  # the range over seeds
                ax.errorbar(xs, ys, yerr=[[t[1] - t[2] for t in pts], [t[3] - t[1] for t in pts]],
                            marker="o", capsize=3, color=colors[wi % len(colors)],
                            label=f"d_model {w}")
            else:
                ax.plot(xs, ys, marker="o", color=colors[wi % len(colors)], label=f"d_model {w}")
            bx, by = min(((t[0], t[1]) for t in pts), key=lambda t: t[1])
            ax.plot([bx], [by], marker="*", markersize=12, color=colors[wi % len(colors)])
        ax.set_xscale("log")
        ax.set_title(label(p, o, params) if len(params) > 1 else o)
        ax.set_xlabel("optim.lr")
        ax.set_ylabel(f"final {args.metric} loss" + (f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Learning-rate transfer across widths (star = best lr)")
    fig.tight_layout()
    fig.savefig(out / "lr_transfer.png", dpi=110)
    plt.close(fig)
    written.append("lr_transfer.png")

    # Speedup: tokens AdamW used / tokens another optimizer needs to match AdamW's final loss.
    rows = speedup_rows(best_all, params, widths, opts)
    with open(out / "speedup.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["param", "width", "optimizer", "adamw_run", "run",
                                           "basis", "adamw_final_loss", "adamw_tokens",
                                           "tokens_to_match", "speedup", "seeds",
                                           "speedup_per_seed", "speedup_min", "speedup_max"])
        wr.writeheader()
        wr.writerows(rows)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    lines = sorted({(r["param"], r["optimizer"]) for r in rows},
                   key=lambda k: (params.index(k[0]), challengers(opts).index(k[1])))
    only_muon = {o for _, o in lines} <= {"muon"}
    for li, (p, o) in enumerate(lines):
        pr = [r for r in rows if r["param"] == p and r["optimizer"] == o]
        xs, ys = [r["width"] for r in pr], [r["speedup"] for r in pr]
        name = p if only_muon else label(p, o, params)
        if n_seeds > 1:
            ax.errorbar(xs, ys, yerr=[[max(0.0, r["speedup"] - r["speedup_min"]) for r in pr],
                                      [max(0.0, r["speedup_max"] - r["speedup"]) for r in pr]],
                        marker="o", capsize=3, color=colors[li % len(colors)], label=name)
        else:
            ax.plot(xs, ys, marker="o", color=colors[li % len(colors)], label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("d_model")
    who = "Muon" if only_muon else "optimizer"
    ax.set_ylabel(f"AdamW tokens / {who} tokens to match")
    ax.set_title(f"{who.capitalize()} speedup over AdamW (best lr each)" +
                 (f", mean of {n_seeds} seeds" if n_seeds > 1 else ""))
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    # An empty figure says why, on itself and in the log.
    empty_why = ""
    if not rows:
        empty_why = ("no speedup to plot: the sweep needs AdamW and another optimizer at the "
                     "same width")
    elif not any(math.isfinite(r["speedup"]) for r in rows):
        empty_why = ("no speedup to plot: no optimizer reached AdamW's final loss at any width "
                     "(speedup.csv holds NaN); longer runs or a wider lr grid may")
    if empty_why:
        ax.text(0.5, 0.5, empty_why.split(":")[0], transform=ax.transAxes, ha="center",
                va="center", color="gray")
        warn(f"speedup.png is empty: {empty_why.split(': ', 1)[1]}")
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)
    written.append("speedup.png")

    with open(out / "best.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["param", "optimizer", "width", "best_lr", "final_loss", "run", "seeds",
                     "final_loss_min", "final_loss_max"])
        for (p, o, w), rs in sorted(best_all.items()):
            mean, lo, hi = cell_stats(rs)
            wr.writerow([p, o, w, rs[0]["lr"], mean, rs[0]["name"], len(rs), lo, hi])

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
