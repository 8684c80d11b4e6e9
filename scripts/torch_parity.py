#!/usr/bin/env python3
"""Checks a muonforge training run step by step against an independent PyTorch implementation.

    scripts/torch_parity.py CONFIG [--set KEY=VALUE]... [--steps N] [--tol X] [--work DIR]
                            [--torch-set KEY=VALUE]... [--binary PATH] [--threads N]

What it does:
  1. `muonforge config` resolves CONFIG (with the --set overrides).
  2. `muonforge train --init-only` writes the initial weights (ckpt-000000).
  3. `muonforge train --stop-at N --dump-batches F` trains the first N steps of the real run (the
     schedule still spans train.max_steps) and writes every micro-batch it trained on.
  4. This script trains the same N steps in PyTorch (float32) from those weights on those batches:
     its own Llama forward (RMSNorm, rotate-half RoPE, GQA, SwiGLU), autograd for the backward,
     and its own Muon / AdamW, lr schedule, clipping, weight decay and µP rules, all written from
     docs/config.md, not from muonforge's code. The per-parameter lr, wd and Muon scale it derives
     are also compared with the run's mup_table.csv.
  5. It prints, for every step, both losses and both gradient norms, then the largest relative
     difference of each weight tensor after step N, and exits 1 when a loss differs by more than
     --tol (default 1e-4 against muonforge's fp32 CPU backend or CUDA with train.precision fp32,
     2e-2 against bf16 CUDA) or a weight tensor by more than --wtol (default 1e-3 in fp32; only
     reported against bf16 CUDA).

Supported: dense and MoE Llama (softmax or sigmoid router, top-k renormalisation, route scale,
shared experts, leading dense layers, aux-loss or bias balancing, capacity drops), every
optim.name (muon with quintic or Polar Express Newton-Schulz, normuon, freon, kaon, shampoo,
soap, asgo, adamw; the µP rule of each), cautious wd, QK-clip (heads clipped compared per step),
every schedule, grad clipping, both weight-decay modes, SP / µP / rms scaling, tied or untied
embeddings. SOAP takes muonforge's eigenbases (from a checkpoint per step) once it has verified
them against its own statistics (Optim.soap_refresh); MoE routing follows muonforge's choice
(`train --dump-routing`) where the selection scores nearly tie (Routes); shampoo, soap, asgo and freon need an eps
above fp32 rounding to agree over several steps (docs/optimizers.md). Anything else stops with
a message naming the key. Needs PyTorch (Debian's
python3-torch works: run with /usr/bin/python3). Work files go to --work (default
runs/parity-NAME), which is replaced. --torch-set changes the config of the PyTorch side only: a
what-if (would the losses match if muonforge used another rule?) and a way to see the check fail.
"""
import argparse
import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench_torch  # noqa: E402  (the binary lookup)
import sweep  # noqa: E402  (KEY=VALUE parsing)


class UserError(Exception):
    pass


def find_binary(explicit):
    b = bench_torch.find_binary(explicit)
    if not b:
        raise UserError("no muonforge binary: build it (scripts/setup.sh) or pass --binary PATH")
    return b


def set_key(cfg, kv):
    try:
        (key, value), = sweep.parse_sets([kv], "--torch-set").items()
    except sweep.UserError as e:
        raise UserError(str(e))
    node, parts = cfg, key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise UserError(f"--torch-set {kv!r}: no config section {p!r}")
        node = node[p]
    if parts[-1] not in node:
        raise UserError(f"--torch-set {kv!r}: no config key {key!r}")
    node[parts[-1]] = value


def run(cmd, what):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n".join((p.stderr.strip() or p.stdout.strip()).splitlines()[-15:])
        raise UserError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")
    return p.stdout


# ---- files -------------------------------------------------------------------------------------

def read_safetensors(torch, path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] != "F32":
            raise UserError(f"{path}: tensor {name} is {e['dtype']}, expected F32 master weights")
        a, b = e["data_offsets"]
        buf = bytearray(data[8 + n + a:8 + n + b])
        out[name] = torch.frombuffer(buf, dtype=torch.float32).reshape(e["shape"]).clone()
    return out


def read_metrics(run_dir):
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "loss" in j and "step" in j:
                rows[j["step"]] = j
    return rows


# ---- the rules, from docs/config.md --------------------------------------------------------------

MATRIX_OPTS = ("muon", "normuon", "freon", "kaon", "shampoo", "soap", "asgo")
MUON_LIKE = ("muon", "normuon", "freon", "kaon")


def check_supported(cfg):
    o, t = cfg["optim"], cfg["train"]
    bad = []
    if o["name"] not in MATRIX_OPTS + ("adamw",):
        bad.append(f"optim.name {o['name']!r}")
    if o.get("ns", "quintic") not in ("quintic", "polar_express"):
        bad.append(f"optim.ns {o['ns']!r} (quintic or polar_express)")
    if t.get("init_from"):
        bad.append("train.init_from (the check starts from muonforge's own init)")
    if bad:
        raise UserError("torch_parity.py does not model: " + "; ".join(bad))


def lr_multiplier(s, max_steps, step):
    if step < s["warmup"]:
        return (step + 1) / s["warmup"]
    r = s["min_lr_ratio"]

    def progress(start):
        span = max_steps - start
        return 1.0 if span <= 0 else min(max((step - start) / span, 0.0), 1.0)

    if s["decay"] == "constant":
        return 1.0
    if s["decay"] == "cosine":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress(s["warmup"])))
    if s["decay"] == "linear":
        return 1 - (1 - r) * progress(s["warmup"])
    start = max(s["warmup"], max_steps - round(s["wsd_decay_frac"] * max_steps))  # wsd
    return 1.0 if step < start else 1 - (1 - r) * progress(start)


def muon_scale(mode, rows, cols):
    if mode == "shape":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "rms":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(rows / cols)  # spectral


def kind_of(name):
    if name.endswith("mlp.gate.weight"):
        return "router"
    if name.endswith("e_score_correction_bias"):
        return "bias"
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("norm.weight"):
        return "norm"
    return "hidden"


def preconditioned_mup(o, shape, m):
    """docs/optimizers.md, µP table: soap and grafted shampoo take AdamW's 1/m; ungrafted
    shampoo (exponent e_L + e_R) and asgo (1/2) take (nb_base / nb)^e, the base shape being
    shape / m rounded."""
    if o["name"] == "soap" or (o["name"] == "shampoo" and o["shampoo"]["graft"] == "adam"):
        return 1.0 / m
    sub = o[o["name"]]
    e = sub["exp_l"] + sub["exp_r"] if o["name"] == "shampoo" else 0.5
    b = sub["block_size"]

    def nb(r, c):
        return 1 if b <= 0 else math.ceil(r / b) * math.ceil(c / b)

    rows, cols = shape[-2], shape[-1]
    base = nb(max(1, math.floor(rows / m + 0.5)), max(1, math.floor(cols / m + 0.5)))
    return (base / nb(rows, cols)) ** e


def param_rules(cfg, name, shape):
    """lr, wd (with its multiplier), optimizer and Muon scale of one parameter."""
    o, mup = cfg["optim"], cfg["mup"]
    m = cfg["model"]["d_model"] / mup["base_width"] if mup["enabled"] else 1.0
    independent = o["wd_mode"] == "independent"
    # The main group: hidden matrices, and the router with optim.router "matrix".
    if kind_of(name) == "hidden" or (kind_of(name) == "router" and o.get("router") == "matrix"):
        if o["name"] in MUON_LIKE:
            lr_mult = 1.0
        elif o["name"] in ("shampoo", "soap", "asgo"):
            lr_mult = preconditioned_mup(o, shape, m)
        else:
            lr_mult = 1 / m
        # Under µP the decay per step shrinks as 1/m: independent wd directly, coupled wd
        # (lr * wd) through the lr where it carries the 1/m (AdamW), else through wd.
        wd = o["wd"] * ((1 / m if independent else 1 / (m * lr_mult)) if mup["enabled"] else 1.0)
        if o["name"] in MUON_LIKE:
            return dict(opt=o["name"], lr=o["lr"], wd=wd, scale=muon_scale(o["scale"], *shape))
        if o["name"] in ("shampoo", "soap", "asgo"):
            return dict(opt=o["name"], lr=o["lr"] * lr_mult, wd=wd, scale=1.0)
        return dict(opt="adamw", lr=o["lr"] * lr_mult, wd=wd, betas=o["betas"], eps=o["eps"],
                    cautious=bool(o.get("cautious_wd")))
    a = o["adamw"]
    if kind_of(name) == "bias":  # moved by the balancing rule, never by an optimizer
        return dict(opt="none", lr=0.0, wd=0.0)
    if kind_of(name) == "router":  # the adamw group, with the hidden-matrix µP multipliers
        return dict(opt="adamw", lr=a["lr"] / m, wd=a["wd"] * (1 / m if mup["enabled"] and
                    independent else 1.0), betas=a["betas"], eps=a["eps"])
    return dict(opt="adamw", lr=a["lr"], wd=0.0 if kind_of(name) == "norm" else a["wd"],
                betas=a["betas"], eps=a["eps"])  # norm gains are never decayed


def model_scalars(cfg):
    md, mup = cfg["model"], cfg["mup"]
    hd = md["d_model"] // md["n_heads"]
    if not mup["enabled"]:
        return 1.0, 1.0 / math.sqrt(hd), 1.0
    m = md["d_model"] / mup["base_width"]
    base_hd = mup.get("base_head_dim", 0) or hd
    return 1.0 / m, math.sqrt(base_hd) / hd, mup["base_depth"] / md["n_layers"]


def compare_mup_table(cfg, path, names_shapes):
    if not os.path.exists(path):
        return []
    issues = []
    with open(path) as f:
        table = {r["param"]: r for r in csv.DictReader(f)}
    for name, shape in names_shapes:
        r, want = table.get(name), param_rules(cfg, name, shape)
        if r is None:
            issues.append(f"{name}: missing from mup_table.csv")
            continue
        got = dict(opt=r["optimizer"], lr=float(r["lr"]), wd=float(r["wd"]),
                   scale=float(r["muon_scale"]))
        if got["opt"] != want["opt"]:
            issues.append(f"{name}: optimizer {got['opt']} (mup_table) vs {want['opt']} (here)")
        if want["opt"] == "none":
            continue
        for k in ("lr", "wd") + (("scale",) if want["opt"] != "adamw" else ()):
            if not math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-12):
                issues.append(f"{name}: {k} {got[k]:g} (mup_table) vs {want[k]:g} (here)")
    return issues


# ---- the model and optimizers in PyTorch ---------------------------------------------------------

class Routes:
    """muonforge's expert choices (`train --dump-routing`), one (N, top_k) block per MoE layer
    per micro-batch. Two correct fp32 implementations compute the selection scores to a few ulps,
    and among thousands of tokens some have their k-th and (k+1)-th scores that close: there the
    choice is a coin toss, and one token routed differently changes the expert loads, so the bias
    update (+/- bias_rate) and every later step. So where the two top-k sets differ this script
    takes muonforge's choice if it is a near-tie here (each of muonforge's experts scores within
    `tol` of this side's k-th score), and reports the difference as a mismatch otherwise."""

    def __init__(self, torch, path, blocks, N, K, tol):
        raw = open(path, "rb").read()
        if len(raw) != blocks * N * K * 4:
            raise UserError(f"{path}: {len(raw)} bytes, expected {blocks * N * K * 4} ({blocks} "
                            f"micro-batch x MoE-layer blocks of {N} tokens x top_k {K}, int32)")
        self.idx = torch.frombuffer(bytearray(raw), dtype=torch.int32).long().view(blocks, N, K)
        self.at, self.tol, self.torch = 0, tol, torch
        self.tokens = self.ties = 0
        self.worst = 0.0  # the largest score gap of a tie taken
        self.issues = []

    def choose(self, sel, idx, where):
        """sel [N, E] selection scores here, idx [N, K] this side's top-k -> the indices to use."""
        torch = self.torch
        mine = self.idx[self.at]
        self.at += 1
        self.tokens += idx.shape[0]
        same = (mine.sort(-1).values == idx.sort(-1).values).all(-1)
        if bool(same.all()):
            return idx
        kth = sel.gather(1, idx).min(-1).values  # this side's k-th score
        gap = (kth - sel.gather(1, mine).min(-1).values).clamp(min=0)  # 0 where mine ranks as high
        for n in (~same).nonzero().flatten().tolist():
            g = float(gap[n])
            if g > self.tol:
                self.issues.append(
                    f"{where}, token {n}: muonforge routes to experts {sorted(mine[n].tolist())}, "
                    f"torch to {sorted(idx[n].tolist())}: a score gap of {g:.2e} here, not a "
                    f"near-tie (--route-tol {self.tol:g})")
            else:
                self.ties += 1
                self.worst = max(self.worst, g)
        return mine


def moe_mlp(torch, mc, W, p, x, routes=None, where=""):
    """x [N, d] (normed) -> (out [N, d], aux loss, expert counts [E]); semantics of
    docs/config.md (model.moe) and DeepSeek-V3 / Switch routing. With routes (Routes), near-ties
    are resolved as muonforge resolved them."""
    F = torch.nn.functional
    E, K, N = mc["n_experts"], mc["top_k"], x.shape[0]
    logits = x @ W[p + "gate.weight"].T
    probs = logits.sigmoid() if mc["score"] == "sigmoid" else logits.softmax(-1)
    sel = probs.detach()
    if mc["balance"] == "bias":
        sel = sel + W[p + "gate.e_score_correction_bias"].detach()
    idx = sel.topk(K, dim=-1).indices
    if routes is not None:
        idx = routes.choose(sel, idx, where)
    a = probs.gather(1, idx)
    wts = (a / (a.sum(-1, keepdim=True) + 1e-20) if mc["norm_topk"] else a) * mc["route_scale"]
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    keep = torch.ones(N, K, dtype=torch.bool)
    if mc.get("capacity_factor", 0) > 0:  # each expert keeps its first pairs in token order
        cap, seen = math.ceil(mc["capacity_factor"] * N * K / E), [0] * E
        for n, row in enumerate(idx.tolist()):
            for j, e in enumerate(row):
                keep[n, j] = seen[e] < cap
                seen[e] += 1
    out = torch.zeros_like(x)
    for e in range(E):
        q = p + f"experts.{e}."
        coef = (wts * ((idx == e) & keep)).sum(-1, keepdim=True)
        y = (F.silu(x @ W[q + "gate_proj.weight"].T) * (x @ W[q + "up_proj.weight"].T))
        out = out + coef * (y @ W[q + "down_proj.weight"].T)
    if mc["n_shared"]:
        q = p + "shared_experts."
        y = F.silu(x @ W[q + "gate_proj.weight"].T) * (x @ W[q + "up_proj.weight"].T)
        out = out + y @ W[q + "down_proj.weight"].T
    aux = torch.zeros(())
    if mc["balance"] == "aux_loss":
        pn = probs if mc["score"] == "softmax" else probs / probs.sum(-1, keepdim=True)
        aux = mc["aux_coef"] * E * ((counts.float() / (N * K)) * pn.mean(0)).sum()
    return out, aux, counts


def forward_loss(torch, cfg, W, inp, tgt, scalars, loads=None, qk=None, routes=None, where=""):
    """Cross-entropy plus the MoE balance loss; adds each MoE layer's expert counts to loads and
    puts each layer's rotated q and k of the first sequence into qk (for QK-clip). routes: see
    Routes (None: this side's own top-k)."""
    F = torch.nn.functional
    md = cfg["model"]
    d, L, H, Hkv = md["d_model"], md["n_layers"], md["n_heads"], md["n_kv_heads"]
    hd, eps = d // H, md["norm_eps"]
    logit_mult, attn_scale, rmult = scalars
    B, T = inp.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv = 1.0 / (md["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()

    def rope(x):  # [B, heads, T, hd], rotate-half
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    mc, aux = md.get("moe", {}), torch.zeros(())
    x = W["model.embed_tokens.weight"][inp]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = (h @ W[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        if qk is not None:
            qk[i] = (q[0].detach(), k[0].detach())
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        s = (q @ k.transpose(-1, -2)) * attn_scale
        a = torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ v
        o = a.transpose(1, 2).reshape(B, T, d) @ W[p + "self_attn.o_proj.weight"].T
        x = x + rmult * o
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        if mc.get("n_experts", 0) > 0 and i >= mc["first_dense"]:
            out, a, counts = moe_mlp(torch, mc, W, p + "mlp.", h.reshape(B * T, d), routes,
                                     f"{where}layer {i}")
            x = x + rmult * out.view(B, T, d)
            aux = aux + a
            if loads is not None:
                loads[i] = loads.get(i, 0) + counts
            continue
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        x = x + rmult * ((F.silu(g) * u) @ W[p + "mlp.down_proj.weight"].T)
    head = W["model.embed_tokens.weight"] if md["tie_embeddings"] else W["lm_head.weight"]
    logits = (rms(x, W["model.norm.weight"]) @ head.T) * logit_mult
    return F.cross_entropy(logits.view(B * T, -1), tgt.reshape(-1)) + aux


def qk_clip(torch, W, qk, attn_scale, tau):
    """Kimi K2's MuonClip as docs/reproduction.md states it: a head whose max logit S (first
    sequence of the step's last micro-batch, pre-step weights) exceeds tau gets the factor
    gamma = tau / S on its logits; with GQA the shared Wk rows take sqrt of the group's smallest
    gamma and each Wq head the rest. Returns the number of heads clipped and how many of them,
    clipped or not, have S within 1e-4 of tau: a clip sets a head's max logit to tau on that
    batch, so heads hover at the threshold and two correct fp32 implementations may decide one
    of them differently (at a factor tau/S within 1e-4 of 1, which moves no weight measurably)."""
    clipped = near = 0
    with torch.no_grad():
        for i, (q, k) in sorted(qk.items()):
            H, T, hd = q.shape
            group = H // k.shape[0]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            gamma = []
            for h in range(H):
                s = (q[h] @ k[h // group].T) * attn_scale
                mx = s.masked_fill(~causal, float("-inf")).max().item()
                gamma.append(tau / mx if mx > tau else 1.0)
                clipped += mx > tau
                near += abs(mx / tau - 1) < 1e-4
            wq = W[f"model.layers.{i}.self_attn.q_proj.weight"]
            wk = W[f"model.layers.{i}.self_attn.k_proj.weight"]
            for g in range(k.shape[0]):
                gmin = min(gamma[g * group:(g + 1) * group])
                if gmin >= 1.0:
                    continue
                wk[g * hd:(g + 1) * hd] *= math.sqrt(gmin)
                for h in range(g * group, (g + 1) * group):
                    wq[h * hd:(h + 1) * hd] *= gamma[h] / math.sqrt(gmin)
    return clipped, near


# Newton-Schulz coefficient lists (docs/optimizers.md): Muon's quintic, Polar Express's five
# per-step tuples (the last repeated beyond five), Kaon's map 4.1 (I - X X^T)^2 X.
QUINTIC = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def newton_schulz(U, coeffs, norm_mult):
    X = U / (norm_mult * U.norm() + 1e-7)
    tall = U.shape[0] > U.shape[1]
    if tall:
        X = X.T
    for a, b, c in coeffs:
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


def sym_fn(torch, S, f):
    """Q diag(f(lambda)) Q^T for symmetric S, in float64."""
    lam, Q = torch.linalg.eigh(S.double())
    return (Q * f(lam.clamp(min=0))) @ Q.T


def eigvecs_descending(torch, S):
    """Eigenvectors of S as columns, eigenvalues descending (SOAP keeps its second moment in
    place when the basis is refreshed, so the order matters; the signs do not)."""
    _, Q = torch.linalg.eigh(S.double())
    return Q.flip(-1)


def blocks(rows, cols, b):
    br, bc = (min(b, rows), min(b, cols)) if b > 0 else (rows, cols)
    return [(slice(r, r + br), slice(c, c + bc)) for r in range(0, rows, br)
            for c in range(0, cols, bc)]


class Optim:
    """The optimizers of docs/optimizers.md. State in float64 where the rule is statistics and
    eigendecompositions (shampoo, soap, asgo, freon), float32 otherwise."""

    def __init__(self, torch, cfg, W, soap_bases=None):
        self.torch, self.cfg, self.t = torch, cfg, 0
        self.rules = {n: param_rules(cfg, n, tuple(w.shape)) for n, w in W.items()}
        self.state = {n: {} for n in W}
        # SOAP: soap_bases(t, name) -> (QL, QR) flat arrays of muonforge's bases after step t.
        self.soap_bases, self.issues, self.name = soap_bases, [], None

    def muon_direction(self, r, st, g):
        torch, o = self.torch, self.cfg["optim"]
        M = st.setdefault("m", torch.zeros_like(g))
        M.mul_(o["momentum"]).add_(g)
        U = g + o["momentum"] * M if o["nesterov"] else M.clone()
        if r["opt"] == "kaon":
            return newton_schulz(U, [(4.1, -8.2, 4.1)] * o["kaon"]["steps"], 1.0) / 1.175
        if r["opt"] == "freon":  # (U U^T + eps lmax I)^-c U / ||U||_{S_q}^(1-2c), q = 2 - 2c
            c, eps = o["freon"]["c"], o["freon"]["eps"]
            Ud = U.double()
            left = U.shape[0] <= U.shape[1]
            S = Ud @ Ud.T if left else Ud.T @ Ud
            lam = torch.linalg.eigvalsh(S).clamp(min=0)
            q = 2 - 2 * c
            norm_q = lam.pow(q / 2).sum().pow(1 / q)
            e = eps * lam.max()
            P = sym_fn(torch, S, lambda l: torch.where(l + e > 0, (l + e).pow(-c), 0.0))
            P = P / norm_q ** (1 - 2 * c)
            return (P @ Ud if left else Ud @ P).float()
        if o["ns"] == "polar_express":
            O = newton_schulz(U, [POLAR_EXPRESS[min(i, 4)] for i in range(o["ns_steps"])], 1.02)
        else:
            O = newton_schulz(U, [QUINTIC] * o["ns_steps"], 1.0)
        if r["opt"] == "normuon":  # per-row second moment, Frobenius norm kept
            v = st.setdefault("v", torch.zeros(g.shape[0]))
            v.mul_(o["normuon_beta2"]).add_((1 - o["normuon_beta2"]) *
                                            O.double().pow(2).mean(1).float())
            before = O.double().pow(2).sum()
            O = O / (v.sqrt() + 1e-8)[:, None]
            O = O * float((before / O.double().pow(2).sum()).sqrt())
        return O

    def shampoo_direction(self, st, g):
        torch, c, t = self.torch, self.cfg["optim"]["shampoo"], self.t
        b1, b2 = c["beta1"], c["beta2"]
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        M = st.setdefault("m", torch.zeros_like(g))
        M.mul_(b1).add_(g, alpha=1 - b1)
        if c["graft"] == "adam":
            V = st.setdefault("v", torch.zeros_like(g))
            V.mul_(b2).addcmul_(g, g, value=1 - b2)
            A = (M / bc1) / ((V / bc2).sqrt() + c["graft_eps"])
        D = torch.empty_like(g)
        gd, Md = g.double(), M.double()
        for i, (rs, cs) in enumerate(blocks(*g.shape, c["block_size"])):
            gb = gd[rs, cs]
            L = st.setdefault(f"L{i}", torch.zeros(gb.shape[0], gb.shape[0], dtype=torch.float64))
            R = st.setdefault(f"R{i}", torch.zeros(gb.shape[1], gb.shape[1], dtype=torch.float64))
            L.mul_(b2).add_(gb @ gb.T, alpha=1 - b2)
            R.mul_(b2).add_(gb.T @ gb, alpha=1 - b2)
            if (t - 1) % c["precond_every"] == 0:  # stale inverse roots in between
                st[f"PL{i}"] = sym_fn(torch, L / bc2, lambda l: (l + c["eps"]).pow(-c["exp_l"]))
                st[f"PR{i}"] = sym_fn(torch, R / bc2, lambda l: (l + c["eps"]).pow(-c["exp_r"]))
            d = st[f"PL{i}"] @ Md[rs, cs] @ st[f"PR{i}"]
            if c["graft"] == "adam":  # Shampoo's direction, Adam's norm, per block
                d = d * (A[rs, cs].double().norm() / d.norm())
            else:
                d = d / bc1
            D[rs, cs] = d.float()
        return D

    def soap_direction(self, st, g):
        torch, c = self.torch, self.cfg["optim"]["soap"]
        b1, b2 = c["beta1"], c["beta2"]
        D = torch.zeros_like(g)
        gd = g.double()
        bl = blocks(*g.shape, c["block_size"])
        if self.t == 1:  # the first gradient only builds the statistics and the bases
            for i, (rs, cs) in enumerate(bl):
                gb = gd[rs, cs]
                st[f"L{i}"] = (1 - b2) * gb @ gb.T
                st[f"R{i}"] = (1 - b2) * gb.T @ gb
            self.soap_refresh(st, bl)
            return D
        ta = self.t - 1  # Adam's step count
        bc1, bc2 = 1 - b1 ** ta, 1 - b2 ** ta
        M = st.setdefault("m", torch.zeros_like(g))
        M.mul_(b1).add_(g, alpha=1 - b1)
        V = st.setdefault("v", torch.zeros_like(gd))
        Md = M.double()
        for i, (rs, cs) in enumerate(bl):
            QL, QR, gb = st[f"QL{i}"], st[f"QR{i}"], gd[rs, cs]
            gr = QL.T @ gb @ QR
            mr = QL.T @ Md[rs, cs] @ QR
            v = V[rs, cs]
            v.mul_(b2).add_(gr * gr, alpha=1 - b2)
            n = (mr / bc1) / ((v / bc2).sqrt() + c["eps"])
            D[rs, cs] = (QL @ n @ QR.T).float()
            st[f"L{i}"].mul_(b2).add_(gb @ gb.T, alpha=1 - b2)
            st[f"R{i}"].mul_(b2).add_(gb.T @ gb, alpha=1 - b2)
        if ta % c["precond_every"] == 0:
            self.soap_refresh(st, bl)
        return D

    def soap_refresh(self, st, bl):
        """New eigenbases of L and R. Where eigenvalues (nearly) coincide the eigenvectors are
        not unique, and early gradients are close to low rank, so the bases of two correct
        implementations differ in near-null subspaces, where SOAP's elementwise Adam then moves
        the weights differently. So with soap_bases the check takes muonforge's bases after
        verifying that they are an eigenbasis (eigenvalues descending) of the statistics here."""
        torch = self.torch
        if self.soap_bases is None:
            for i in range(len(bl)):
                st[f"QL{i}"] = eigvecs_descending(torch, st[f"L{i}"])
                st[f"QR{i}"] = eigvecs_descending(torch, st[f"R{i}"])
            return
        QLf, QRf = self.soap_bases(self.t, self.name)
        ol = orr = 0
        for i in range(len(bl)):
            for side, flat, off in (("L", QLf, ol), ("R", QRf, orr)):
                S = st[f"{side}{i}"]
                k = S.shape[0]
                Q = flat[off:off + k * k].view(k, k).double()
                lam = torch.linalg.eigvalsh(S)
                top = max(float(lam.abs().max()), 1e-30)
                R = Q.T @ S @ Q
                d = R.diagonal()
                ortho = float((Q.T @ Q - torch.eye(k, dtype=torch.float64)).abs().max())
                off_diag = float((R - torch.diag(d)).abs().max()) / top
                order = float((d[1:] - d[:-1]).clamp(min=0).max()) / top if k > 1 else 0.0
                if max(ortho, off_diag, order) > 1e-4:
                    self.issues.append(
                        f"step {self.t}: muonforge's SOAP basis Q{side} of {self.name} block {i} "
                        f"is not a descending eigenbasis here (|Q^T Q - I| {ortho:.1e}, "
                        f"off-diagonal {off_diag:.1e}, order {order:.1e} of lambda_max)")
                st[f"Q{side}{i}"] = Q
            ol += st[f"L{i}"].shape[0] ** 2
            orr += st[f"R{i}"].shape[0] ** 2

    def asgo_direction(self, st, g):
        torch, c, t = self.torch, self.cfg["optim"]["asgo"], self.t
        b1, b2 = c["beta1"], c["beta2"]
        bc1 = 1 - b1 ** t if b1 > 0 else 1.0
        bc2 = 1.0 if b2 >= 1 else 1 - b2 ** t
        M = st.setdefault("m", torch.zeros_like(g))
        M.mul_(b1).add_(g, alpha=1 - b1)
        D = torch.empty_like(g)
        gd, Md = g.double(), M.double()
        for i, (rs, cs) in enumerate(blocks(*g.shape, c["block_size"])):
            gb = gd[rs, cs]
            left = gb.shape[0] <= gb.shape[1]  # the statistic lives on the smaller side
            S = gb @ gb.T if left else gb.T @ gb
            n = S.shape[0]
            V = st.setdefault(f"V{i}", torch.zeros(n, n, dtype=torch.float64))
            if b2 >= 1:
                V.add_(S)
            else:
                V.mul_(b2).add_(S, alpha=1 - b2)
            if (t - 1) % c["precond_every"] == 0:
                # sqrt(l) + eps floored at 2^-24 sqrt(lambda_max) (muonforge's kAsgoFloorRel)
                floor = 2.0 ** -24 * float(torch.linalg.eigvalsh(V / bc2).clamp(min=0).max().sqrt())
                st[f"P{i}"] = sym_fn(torch, V / bc2,
                                     lambda l: 1.0 / (l.sqrt() + c["eps"]).clamp(min=floor))
            P = st[f"P{i}"]
            D[rs, cs] = ((P @ Md[rs, cs] if left else Md[rs, cs] @ P) / bc1).float()
        return D

    def step(self, W, grads, step, grad_scale):
        torch, o = self.torch, self.cfg["optim"]
        sched = lr_multiplier(self.cfg["schedule"], self.cfg["train"]["max_steps"], step)
        self.t += 1
        with torch.no_grad():
            for n, w in W.items():
                r, st = self.rules[n], self.state[n]
                self.name = n
                if r["opt"] == "none":
                    continue
                g = grads[n] * grad_scale
                lr = r["lr"] * sched
                decay = sched * r["wd"] if o["wd_mode"] == "independent" else lr * r["wd"]
                if r["opt"] in MUON_LIKE + ("shampoo", "soap", "asgo"):
                    if r["opt"] in MUON_LIKE:
                        D = self.muon_direction(r, st, g)
                    else:
                        D = getattr(self, r["opt"] + "_direction")(st, g)
                        if r["opt"] == "soap" and self.t == 1:
                            continue  # statistics only: no update and no weight decay
                    if decay and o.get("cautious_wd"):  # only where weight and update agree
                        w.mul_(torch.where(w * D >= 0, 1 - decay, 1.0))
                    elif decay:
                        w.mul_(1 - decay)
                    w.add_(D, alpha=-lr * r["scale"])
                else:
                    (b1, b2), eps = r["betas"], r["eps"]
                    m = st.setdefault("m", torch.zeros_like(w))
                    v = st.setdefault("v", torch.zeros_like(w))
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    mhat, vhat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
                    if r.get("cautious"):  # hidden matrices only: where weight and step agree
                        w.mul_(torch.where(w * mhat >= 0, 1 - decay, 1.0))  # step's sign: mhat's
                    else:
                        w.mul_(1 - decay)
                    w.sub_(lr * mhat / (vhat.sqrt() + eps))


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="muonforge config file (e.g. configs/tiny.json)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config value for both sides (repeatable)")
    ap.add_argument("--steps", type=int, default=10,
                    help="steps to compare (default 10; the schedule still spans train.max_steps)")
    ap.add_argument("--tol", type=float, help="largest allowed |loss difference| (default 1e-4 "
                    "in fp32: the CPU backend, or CUDA with train.precision fp32; 2e-2 against "
                    "bf16 CUDA)")
    ap.add_argument("--wtol", type=float, help="largest allowed relative weight difference after "
                    "the last step, per tensor (default 1e-3 in fp32; against bf16 CUDA only "
                    "reported)")
    ap.add_argument("--route-tol", type=float, help="MoE: the largest selection-score gap at "
                    "which muonforge's choice of experts counts as a near-tie and is followed "
                    "(default 1e-5 in fp32, 3e-2 against bf16 CUDA; see Routes)")
    ap.add_argument("--work", help="work folder, replaced (default runs/parity-NAME)")
    ap.add_argument("--binary", help="muonforge binary (default: $MF_BINARY, $MUONFORGE_BINARY, "
                    "build/muonforge, else the newest build*/muonforge)")
    ap.add_argument("--torch-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config value for the PyTorch side only (e.g. optim.lr=0.03)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0: PyTorch's own)")
    args = ap.parse_args(argv)
    binary = find_binary(args.binary)
    sets = []
    for s in args.set:
        sets += ["--set", s]
    cfg = json.loads(run([binary, "config", args.config, "--json"] + sets, "muonforge config"))
    check_supported(cfg)
    tcfg = json.loads(json.dumps(cfg))  # the PyTorch side's copy
    for kv in args.torch_set:
        set_key(tcfg, kv)
    check_supported(tcfg)
    try:
        import torch
    except ImportError:
        raise UserError(f"{sys.executable} has no PyTorch; run with a Python that has it "
                        f"(on Debian: /usr/bin/python3 with python3-torch)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t = cfg["train"]
    if not 1 <= args.steps <= t["max_steps"]:
        raise UserError(f"--steps {args.steps} must be in 1..train.max_steps ({t['max_steps']})")
    work = os.path.abspath(args.work or os.path.join(REPO, "runs", "parity-" + cfg["run"]["name"]))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    run_dir = os.path.join(work, "muonforge")
    # Logging, eval and checkpoint cadence do not change what is trained.
    quiet = sets + ["--set", f"run.dir={run_dir}", "--set", "train.log_every=1",
                    "--set", "train.eval_every=0", "--set", "train.diag_every=0",
                    "--set", f"train.ckpt_every={t['max_steps']}", "--quiet"]
    run([binary, "train", args.config, "--no-resume", "--init-only"] + quiet, "muonforge --init-only")
    # Read now: train.keep_ckpts may retire ckpt-000000 once step N is written.
    W = read_safetensors(torch, os.path.join(run_dir, "ckpt-000000", "model.safetensors"))
    batches = os.path.join(work, "batches.bin")
    soap = tcfg["optim"]["name"] == "soap"
    if soap:  # every step's optimizer state, for the eigenbases (Optim.soap_refresh)
        quiet += ["--set", "train.ckpt_every=1", "--set", f"train.keep_ckpts={args.steps + 1}"]
    mc, tmc = cfg["model"].get("moe", {}), tcfg["model"].get("moe", {})
    moe = mc.get("n_experts", 0) > 0
    routes_path = os.path.join(work, "routes.bin")
    run([binary, "train", args.config, "--stop-at", str(args.steps), "--dump-batches", batches] +
        (["--dump-routing", routes_path] if moe else []) + quiet, "muonforge train")
    log = open(os.path.join(run_dir, "log.txt")).read()
    on_cuda = "backend cuda" in log
    bf16 = on_cuda and cfg["train"]["precision"] != "fp32"  # CUDA computes in train.precision
    tol = args.tol if args.tol is not None else (2e-2 if bf16 else 1e-4)
    wtol = args.wtol if args.wtol is not None else (math.inf if bf16 else 1e-3)
    rtol = args.route_tol if args.route_tol is not None else (3e-2 if bf16 else 1e-5)

    trainable_names = [n for n in W if kind_of(n) != "bias"]
    trainable = [W[n] for n in trainable_names]
    for w in trainable:
        w.requires_grad_(True)
    issues = compare_mup_table(tcfg, os.path.join(run_dir, "mup_table.csv"),
                               [(n, tuple(w.shape)) for n, w in W.items()])
    B, T = t["micro_batch"], t["seq_len"]
    accum = t["batch_tokens"] // (B * T)
    raw = open(batches, "rb").read()
    need = args.steps * accum * 2 * B * T * 4
    if len(raw) != need:
        raise UserError(f"{batches}: {len(raw)} bytes, expected {need} ({args.steps} steps x "
                        f"{accum} micro-batches x inputs+targets x {B}x{T} int32)")
    toks = torch.frombuffer(bytearray(raw), dtype=torch.int32).long().view(-1, 2, B, T)
    routes = None
    # Followed only when both sides have the same experts (a --torch-set what-if may change them).
    if moe and all(tmc.get(k) == mc.get(k) for k in ("n_experts", "top_k", "first_dense")) and \
            tcfg["model"]["n_layers"] == cfg["model"]["n_layers"]:
        n_moe = cfg["model"]["n_layers"] - mc["first_dense"]
        routes = Routes(torch, routes_path, args.steps * accum * n_moe, B * T, mc["top_k"], rtol)
    scalars = model_scalars(tcfg)
    cache = {}

    def soap_bases(step, name):
        path = os.path.join(run_dir, f"ckpt-{step:06d}", "optimizer.safetensors")
        if step not in cache:
            if not os.path.exists(path):
                raise UserError(f"{path} is missing (SOAP's bases are read from every step)")
            cache.clear()
            cache[step] = read_safetensors(torch, path)
        st = cache[step]
        if name + ".soap_QL" not in st:
            raise UserError(f"{path}: no {name}.soap_QL in muonforge's optimizer state")
        return st[name + ".soap_QL"].reshape(-1), st[name + ".soap_QR"].reshape(-1)

    opt = Optim(torch, tcfg, W, soap_bases if soap and cfg["optim"]["name"] == "soap" else None)
    mf = read_metrics(run_dir)
    clip = tcfg["optim"]["grad_clip"]
    print(f"torch_parity: {args.config} on muonforge's {('CUDA (bf16)' if bf16 else 'CUDA (fp32)') if on_cuda else 'CPU (fp32)'} "
          f"backend vs PyTorch {torch.__version__} fp32, {args.steps} steps of {accum} x {B}x{T} "
          f"tokens, tolerance {tol:g}")
    tau = tcfg["optim"].get("qk_clip_tau", 0)
    print(f"{'step':>5} {'loss muonforge':>15} {'loss torch':>12} {'|diff|':>9} "
          f"{'gnorm muonforge':>16} {'gnorm torch':>12}" + ("  heads clipped" if tau > 0 else ""))
    worst = 0.0
    for step in range(args.steps):
        grads = {n: torch.zeros_like(w) for n, w in W.items()}
        loss_sum, loads, qk = 0.0, {}, {}
        for k in range(accum):
            inp, tgt = toks[step * accum + k]
            loss = forward_loss(torch, tcfg, W, inp, tgt, scalars, loads, qk, routes,
                                f"step {step + 1}, micro-batch {k + 1}, ")
            g = torch.autograd.grad(loss / accum, trainable)
            for n, gi in zip(trainable_names, g):
                grads[n] += gi
            loss_sum += loss.item()
        loss = loss_sum / accum
        gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        scale = min(1.0, clip / (gnorm + 1e-6)) if clip > 0 else 1.0
        opt.step(W, grads, step, scale)
        clipped, near = qk_clip(torch, W, qk, scalars[1], tau) if tau > 0 else (0, 0)
        mc = tcfg["model"].get("moe", {})
        if mc.get("balance") == "bias" and mc.get("bias_rate", 0) > 0:
            with torch.no_grad():  # DeepSeek-V3: under-loaded experts up, over-loaded down
                for i, c in loads.items():
                    b = W[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
                    c = c.double()
                    b += (mc["bias_rate"] * torch.sign(c.mean() - c)).float()
        rec = mf.get(step + 1, {})
        ml, mg = rec.get("loss", float("nan")), rec.get("grad_norm", float("nan"))
        diff = abs(ml - loss)
        worst = max(worst, diff if diff == diff else math.inf)
        line = f"{step + 1:>5} {ml:>15.7f} {loss:>12.7f} {diff:>9.2e} {mg:>16.6f} {gnorm:>12.6f}"
        if tau > 0:
            mclip = rec.get("qk_clipped")
            line += f"  {mclip} / {clipped}"
            if mclip is None or abs(mclip - clipped) > near:
                issues.append(f"step {step + 1}: muonforge clipped {mclip} heads, torch {clipped}"
                              f" ({near} within 1e-4 of tau, relative)")
        print(line)

    final = os.path.join(run_dir, f"ckpt-{args.steps:06d}", "model.safetensors")
    Wm = read_safetensors(torch, final)
    print(f"weights after step {args.steps}: largest |muonforge - torch| / max|torch| per tensor")
    rel = []
    for n, w in W.items():
        ref = w.detach()
        rel.append(((Wm[n] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30), n))
    for r, n in sorted(rel, reverse=True)[:5]:
        print(f"  {r:9.2e}  {n}")
    issues += opt.issues
    n_issues = len(issues) + (len(routes.issues) if routes is not None else 0)
    if routes is not None:
        print(f"routing: {routes.ties} of {routes.tokens} token choices were near-ties decided "
              f"as muonforge decided them (largest score gap {routes.worst:.1e}, --route-tol "
              f"{routes.tol:g}); {len(routes.issues)} differ beyond that")
        issues += routes.issues[:20] + ([f"... and {len(routes.issues) - 20} more routing "
                                         f"differences"] if len(routes.issues) > 20 else [])
    if issues:
        print("per-parameter hyper-parameters (mup_table.csv), QK-clip counts, SOAP bases or MoE routing differ:")
        for i in issues:
            print("  " + i)
    wworst = max(rel)[0]
    ok = worst <= tol and wworst <= wtol and not issues
    print(f"torch_parity: {'PASS' if ok else 'FAIL'}: largest loss difference {worst:.2e} "
          f"(tolerance {tol:g}), largest weight difference {wworst:.2e} (tolerance {wtol:g})"
          f"{'; ' + str(n_issues) + ' other mismatch(es)' if issues else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
