#!/usr/bin/env python3
"""The PyTorch baseline of `muonforge bench`: the same Llama, batch and optimizer in PyTorch.

    python3 scripts/bench_torch.py configs/llama-124m.json [--set k=v]... [--steps N] [--json]

Model (DESIGN §4): RMSNorm, rotate-half RoPE (rope_theta), causal GQA through
F.scaled_dot_product_attention(is_causal=True) (PyTorch >= 2; a plain softmax attention on older
versions), SwiGLU MLP, untied lm head unless model.tie_embeddings; init normal(0, init_std) with
o_proj / down_proj at init_std / sqrt(2 n_layers), norm gains 1. Batch: micro_batch x seq_len with
gradient accumulation to batch_tokens. On CUDA: bf16 autocast (fp32 weights, like muonforge's
fp32 masters) and torch.compile when available (--no-compile to skip). On the CPU: fp32, eager.

Optimizer: optim.name = adamw -> torch.optim.AdamW (fused=True on CUDA) for everything, hidden
matrices with optim.{lr,betas,eps,wd}, the rest with optim.adamw.*. optim.name = muon ->
torch.optim.Muon (PyTorch >= 2.9) for the hidden matrices when optim.scale is shape or rms, else a
reference Muon in this file (momentum, nesterov, NS5 quintic with (3.4445, -4.7750, 2.0315), the
same scale modes), plus AdamW for embeddings, norms and the lm head. Gradient clipping as
configured. The LR schedule is not applied (constant peak lr): it costs nothing measurable.

Data: uniform random tokens (like muonforge bench). Timing: warm-up steps, then timed steps with
torch.cuda.synchronize() around each phase; forward is also timed alone (no_grad) on the same
micro-batches and backward = (forward+backward) - forward, as muonforge reports it.

The config is resolved by `muonforge config FILE --json` when the binary is found (--binary, env
MF_BINARY, build/muonforge, newest build*/muonforge), else by this script (deep merge of "base"
files, the schema defaults below, --set applied as JSON-or-string values).

Output: a human summary and, with --json, one JSON object on the last line.
"""
import argparse
import glob
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 (datasheet), as muonforge uses

# Schema defaults (src/config/config.h) for the self-contained resolver.
DEFAULTS = {
    "model": {"arch": "llama", "vocab_size": 50304, "d_model": 768, "n_layers": 12, "n_heads": 12,
              "d_ff": 2048, "max_seq_len": 1024, "rope_theta": 10000.0,
              "norm_eps": 1e-5, "tie_embeddings": False, "init_std": 0.02},
    "mup": {"enabled": False},
    "optim": {"name": "muon", "lr": 0.02, "wd": 0.0, "momentum": 0.95, "nesterov": True,
              "ns_steps": 5, "scale": "shape", "betas": [0.9, 0.95], "eps": 1e-8,
              "adamw": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "wd": 0.0},
              "grad_clip": 1.0},
    "train": {"seq_len": 1024, "micro_batch": 16, "batch_tokens": 524288, "seed": 1337,
              "device": "auto"},
}


# ---- config ------------------------------------------------------------------------------------

def deep_merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_json_with_base(path, seen=()):
    path = os.path.abspath(path)
    if path in seen:
        sys.exit(f"error: {path}: \"base\" inheritance loops back to itself")
    with open(path) as f:
        j = json.load(f)
    base = j.pop("base", None)
    if base:
        j = deep_merge(load_json_with_base(os.path.join(os.path.dirname(path), base), seen + (path,)), j)
    return j


def apply_set(cfg, kv):
    if "=" not in kv:
        sys.exit(f"error: --set {kv}: expected KEY=VALUE")
    key, val = kv.split("=", 1)
    try:
        v = json.loads(val)
    except ValueError:
        v = val
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = v


def find_binary(arg):
    cands = [arg, os.environ.get("MF_BINARY"), os.environ.get("MUONFORGE_BINARY"),
             os.path.join(REPO, "build", "muonforge")]
    cands += sorted(glob.glob(os.path.join(REPO, "build*", "muonforge")), key=os.path.getmtime,
                    reverse=True)
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def resolve_config(path, sets, binary):
    if binary:
        cmd = [binary, "config", path, "--json"]
        for s in sets:
            cmd += ["--set", s]
        env = dict(os.environ)
        env.pop("WORLD_SIZE", None)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed:\n{p.stderr.strip() or p.stdout.strip()}")
        return json.loads(p.stdout), "muonforge config"
    cfg = deep_merge(DEFAULTS, load_json_with_base(path))
    for s in sets:
        apply_set(cfg, s)
    cfg["model"].setdefault("n_kv_heads", cfg["model"]["n_heads"])  # left out: n_heads (MHA)
    return cfg, "bench_torch.py (deep merge)"


# ---- model -------------------------------------------------------------------------------------

def sdpa_takes_gqa(torch):
    """Does F.scaled_dot_product_attention take enable_gqa (PyTorch >= 2.5)? It is a builtin, so
    inspect.signature cannot tell on every version: try it on a tiny input."""
    F = torch.nn.functional
    q = torch.zeros(1, 2, 1, 8)
    kv = torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


def build(torch, cfg):
    nn = torch.nn
    F = torch.nn.functional
    m = cfg["model"]
    V, d, L = m["vocab_size"], m["d_model"], m["n_layers"]
    H, Hkv, f = m["n_heads"], m["n_kv_heads"], m["d_ff"]
    hd = d // H
    eps, theta = m["norm_eps"], m["rope_theta"]
    has_sdpa = hasattr(F, "scaled_dot_product_attention")
    sdpa_gqa = has_sdpa and sdpa_takes_gqa(torch)

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            if hasattr(F, "rms_norm"):
                return F.rms_norm(x, (d,), self.weight, eps)
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            return (y * self.weight.float()).to(x.dtype)

    def rotate_half(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat((-x2, x1), dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(d, H * hd, bias=False)
            self.k_proj = nn.Linear(d, Hkv * hd, bias=False)
            self.v_proj = nn.Linear(d, Hkv * hd, bias=False)
            self.o_proj = nn.Linear(H * hd, d, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)
            k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if has_sdpa and sdpa_gqa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=(H != Hkv))
            else:
                if H != Hkv:
                    k = k.repeat_interleave(H // Hkv, dim=1)
                    v = v.repeat_interleave(H // Hkv, dim=1)
                if has_sdpa:
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                else:  # PyTorch 1.x: explicit T x T scores (smoke tests only)
                    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
                    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
                    o = torch.softmax(s.masked_fill(mask, float("-inf")).float(), -1).to(q.dtype) @ v
            return self.o_proj(o.transpose(1, 2).reshape(B, T, H * hd))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(d, f, bias=False)
            self.up_proj = nn.Linear(d, f, bias=False)
            self.down_proj = nn.Linear(f, d, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm()
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm()
            self.mlp = MLP()

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(V, d)
            self.layers = nn.ModuleList([Block() for _ in range(L)])
            self.norm = RMSNorm()
            self.lm_head = nn.Linear(d, V, bias=False)
            if m["tie_embeddings"]:
                self.lm_head.weight = self.embed_tokens.weight
            T = m["max_seq_len"]
            inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
            emb = torch.cat((ang, ang), dim=-1)
            self.register_buffer("cos", emb.cos().float(), persistent=False)
            self.register_buffer("sin", emb.sin().float(), persistent=False)

        def forward(self, idx, targets):
            T = idx.shape[1]
            cos, sin = self.cos[:T], self.sin[:T]
            x = self.embed_tokens(idx)
            for blk in self.layers:
                x = blk(x, cos, sin)
            logits = self.lm_head(self.norm(x))
            return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))

    model = Llama()
    std = m["init_std"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * L))
            else:
                p.normal_(0.0, std)
    return model


def flops_per_token(model, cfg):
    """muonforge's LlamaModel::flops_per_token: 6 x matmul weights (lm head included, embedding
    lookup excluded; tied: the shared matrix counted once as the head) + 12 L d T."""
    m = cfg["model"]
    n = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.startswith("embed_tokens"):
            n += p.numel()
    if m["tie_embeddings"]:
        n += model.embed_tokens.weight.numel()
    return 6.0 * n + 12.0 * m["n_layers"] * m["d_model"] * cfg["train"]["seq_len"]


# ---- optimizers --------------------------------------------------------------------------------

def zeropower_ns5(torch, G, steps, dtype):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    X = X / (X.norm() + 1e-7)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.T
    return X


def make_ref_muon(torch, params, lr, wd, momentum, nesterov, ns_steps, scale_mode, ns_dtype):
    class RefMuon(torch.optim.Optimizer):
        def __init__(self):
            super().__init__(params, dict(lr=lr, wd=wd))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if "buf" not in st:
                        st["buf"] = torch.zeros_like(p)
                    buf = st["buf"]
                    buf.mul_(momentum).add_(p.grad)
                    u = p.grad.add(buf, alpha=momentum) if nesterov else buf
                    o = zeropower_ns5(torch, u, ns_steps, ns_dtype)
                    r, c = p.shape
                    s = {"shape": math.sqrt(max(1.0, r / c)), "rms": 0.2 * math.sqrt(max(r, c)),
                         "spectral": math.sqrt(r / c)}[scale_mode]
                    p.mul_(1 - group["lr"] * group["wd"])
                    p.add_(o.to(p.dtype), alpha=-group["lr"] * s)

    return RefMuon()


def make_optimizers(torch, model, cfg, device, muon_impl):
    o = cfg["optim"]
    aw = o["adamw"]
    hidden, other = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        is_hidden = p.dim() == 2 and name.startswith("layers.")
        (hidden if is_hidden else other).append(p)
    fused = {}
    if device == "cuda":
        import inspect
        if "fused" in inspect.signature(torch.optim.AdamW).parameters:
            fused = {"fused": True}
    notes = []
    adam_other = dict(params=other, lr=aw["lr"], betas=tuple(aw["betas"]), eps=aw["eps"],
                      weight_decay=aw["wd"])
    if o["name"] == "adamw":
        opt = torch.optim.AdamW([dict(params=hidden, lr=o["lr"], betas=tuple(o["betas"]),
                                      eps=o["eps"], weight_decay=o["wd"]), adam_other], **fused)
        return None, opt, "AdamW" + (" fused" if fused else ""), notes
    adam = torch.optim.AdamW([adam_other], **fused)
    has_torch_muon = hasattr(torch.optim, "Muon")
    use_torch = muon_impl == "torch" or (muon_impl == "auto" and has_torch_muon)
    if use_torch and not has_torch_muon:
        sys.exit("error: --muon-impl torch but this PyTorch has no torch.optim.Muon (>= 2.9)")
    if use_torch and o["scale"] not in ("shape", "rms"):
        notes.append(f"optim.scale={o['scale']} has no torch.optim.Muon equivalent: reference Muon")
        use_torch = False
    if use_torch:
        kw = dict(lr=o["lr"], weight_decay=o["wd"], momentum=o["momentum"], nesterov=o["nesterov"],
                  ns_steps=o["ns_steps"])
        if o["scale"] == "rms":
            kw["adjust_lr_fn"] = "match_rms_adamw"
        muon = torch.optim.Muon(hidden, **kw)
        name = "torch.optim.Muon"
        notes.append("torch.optim.Muon keeps an EMA momentum (lerp), muonforge a sum: same cost")
    else:
        ns_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        muon = make_ref_muon(torch, hidden, o["lr"], o["wd"], o["momentum"], o["nesterov"],
                             o["ns_steps"], o["scale"], ns_dtype)
        name = "reference Muon (this script, NS in %s)" % str(ns_dtype).replace("torch.", "")
    return muon, adam, name + " + AdamW" + (" fused" if fused else ""), notes


def time_attention(torch, cfg, B, T, device, sync):
    """Causal SDPA alone at the model's shape (k, v expanded to all heads), per backend."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_dot_product_attention"):
        return None
    m = cfg["model"]
    H, hd = m["n_heads"], m["d_model"] // m["n_heads"]
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(7)
    mk = lambda: (torch.rand(B, H, T, hd, generator=g) * 2 - 1).to(device=device, dtype=dt)
    q, k, v, dout = mk(), mk(), mk(), mk()
    backends = {"default": None}
    if device == "cuda":
        try:
            from torch.nn.attention import SDPBackend
            backends.update({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                             "efficient": SDPBackend.EFFICIENT_ATTENTION})
        except ImportError:
            pass
    fwd_flops = 2.0 * B * H * T * T * hd
    out = {"B": B, "T": T, "H": H, "hd": hd, "backends": {}}
    reps, warm = (10, 3) if device == "cuda" else (2, 1)
    for name, be in backends.items():
        try:
            import contextlib
            if be is None:
                ctx = contextlib.nullcontext
            else:
                from torch.nn.attention import sdpa_kernel
                ctx = lambda: sdpa_kernel(be)
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            tf, tb = [], []
            for i in range(warm + reps):
                sync()
                t0 = time.perf_counter()
                with ctx():
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                sync()
                t1 = time.perf_counter()
                o.backward(dout)
                sync()
                t2 = time.perf_counter()
                if i >= warm:
                    tf.append(t1 - t0)
                    tb.append(t2 - t1)
            f, b = statistics.median(tf), statistics.median(tb)
            out["backends"][name] = {"fwd_ms": 1e3 * f, "bwd_ms": 1e3 * b,
                                     "fwd_tflops": fwd_flops / f / 1e12,
                                     "bwd_tflops": 2.5 * fwd_flops / b / 1e12}
        except Exception as e:  # a backend that does not support this shape / GPU
            out["backends"][name] = {"error": str(e).splitlines()[0][:200] if str(e) else type(e).__name__}
    return out


# ---- bench -------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int, help="sets train.seq_len and model.max_seq_len")
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--batch-tokens", type=int)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--compile", action="store_true", help="torch.compile on the CPU too")
    ap.add_argument("--muon-impl", choices=["auto", "torch", "ref"], default="auto")
    ap.add_argument("--fwd-reps", type=int, default=0)
    ap.add_argument("--gemm-size", type=int, default=0, help="0: 8192 on CUDA, 1024 on CPU; <0 skips")
    ap.add_argument("--no-attn", action="store_true", help="skip timing SDPA alone")
    ap.add_argument("--binary", help="muonforge binary used to resolve the config")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on the CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    sets = list(args.set)
    if args.seq_len:
        sets += [f"train.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}"]
    if args.micro_batch:
        sets.append(f"train.micro_batch={args.micro_batch}")
    if args.batch_tokens:
        sets.append(f"train.batch_tokens={args.batch_tokens}")
    cfg, resolved_by = resolve_config(args.config, sets, find_binary(args.binary))

    import torch
    tv = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = []
    if cfg.get("mup", {}).get("enabled"):
        notes.append("mup.enabled: µP multipliers are NOT reproduced here (standard parametrisation)")
    if cfg["model"].get("moe", {}).get("n_experts", 0) > 0:
        sys.exit("error: MoE configs are not supported by bench_torch.py")

    t = cfg["train"]
    B, T = t["micro_batch"], t["seq_len"]
    if t["batch_tokens"] % (B * T):
        sys.exit(f"error: train.batch_tokens {t['batch_tokens']} is not a multiple of "
                 f"micro_batch x seq_len = {B * T}")
    accum = t["batch_tokens"] // (B * T)
    V = cfg["model"]["vocab_size"]
    torch.manual_seed(t.get("seed", 1337))

    model = build(torch, cfg).to(device)
    fpt = flops_per_token(model, cfg)
    nparams = sum(p.numel() for p in model.parameters())
    muon, adam, opt_name, onotes = make_optimizers(torch, model, cfg, device, args.muon_impl)
    notes += onotes
    compiled = False
    fwd_model = model
    if device == "cuda" and not args.no_compile or args.compile:
        if tv >= (2, 0) and hasattr(torch, "compile"):
            fwd_model = torch.compile(model)
            compiled = True
        else:
            notes.append(f"torch {torch.__version__} < 2: no torch.compile (eager)")
    amp = device == "cuda"
    clip = cfg["optim"]["grad_clip"]
    params = list(model.parameters())

    nb = max(1, min(accum, 4))
    g = torch.Generator(device="cpu").manual_seed(t.get("seed", 1337))
    xs = [torch.randint(0, V, (B, T), generator=g).to(device) for _ in range(nb)]
    ys = [torch.randint(0, V, (B, T), generator=g).to(device) for _ in range(nb)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd(i):
        if amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fwd_model(xs[i % nb], ys[i % nb])
        return fwd_model(xs[i % nb], ys[i % nb])

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_step, t_fb, t_clip, t_muon, t_adam, losses = [], [], [], [], [], []
    for s in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        for o in (muon, adam):
            if o is not None:
                o.zero_grad(set_to_none=True)
        loss_acc = 0.0
        for mi in range(accum):
            try:
                loss = fwd(mi)
            except Exception as e:  # torch.compile failing on this machine: measure eager instead
                if not compiled or s > 0 or mi > 0:
                    raise
                notes.append(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); eager")
                fwd_model, compiled = model, False
                loss = fwd(mi)
            (loss / accum).backward()
            loss_acc += loss.detach()
        sync()
        t1 = time.perf_counter()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        sync()
        t2 = time.perf_counter()
        if muon is not None:
            muon.step()
        sync()
        t3 = time.perf_counter()
        adam.step()
        sync()
        t4 = time.perf_counter()
        lv = float(loss_acc) / accum
        if not math.isfinite(lv):
            sys.exit(f"error: non-finite loss {lv} at step {s + 1}")
        losses.append(lv)
        if s >= args.warmup:
            t_step.append(t4 - t0)
            t_fb.append(t1 - t0)
            t_clip.append(t2 - t1)
            t_muon.append(t3 - t2)
            t_adam.append(t4 - t3)
        print(f"step {s + 1}/{args.warmup + args.steps}{'' if s >= args.warmup else ' (warm-up)'}"
              f" | loss {lv:.4f} | {1e3 * (t4 - t0):.1f} ms", file=sys.stderr)

    fwd_reps = args.fwd_reps or min(accum, 8)
    t_fwd = []
    with torch.no_grad():
        fwd(0)
        sync()
        for r in range(fwd_reps):
            t0 = time.perf_counter()
            fwd(r)
            sync()
            t_fwd.append(time.perf_counter() - t0)

    mem = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        mem["peak_allocated"] = torch.cuda.max_memory_allocated()
        mem["peak_reserved"] = torch.cuda.max_memory_reserved()
        free, total = torch.cuda.mem_get_info()
        mem["device_total"] = total

    gn = args.gemm_size or (8192 if device == "cuda" else 1024)
    gemm = None
    if gn > 0:
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        a = torch.rand(gn, gn, device=device, dtype=torch.float32).mul_(2).sub_(1).to(dt)
        w = torch.rand(gn, gn, device=device, dtype=torch.float32).mul_(2).sub_(1).to(dt)
        for _ in range(3 if device == "cuda" else 1):
            a @ w.T
        sync()
        ts = []
        for _ in range(10 if device == "cuda" else 3):
            t0 = time.perf_counter()
            a @ w.T
            sync()
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        gemm = {"n": gn, "dtype": str(dt).replace("torch.", ""), "median_ms": 1e3 * med,
                "tflops": 2 * gn ** 3 / med / 1e12}
        del a, w

    attn = None if args.no_attn else time_attention(torch, cfg, B, T, device, sync)

    step_med = statistics.median(t_step)
    step_mean = statistics.mean(t_step)
    tokens = B * T * accum
    tps = tokens / step_mean
    fb = statistics.median(t_fb)
    fw = statistics.median(t_fwd) * accum
    peak = PEAK_BF16 if device == "cuda" else 0
    muon_ms = 1e3 * statistics.median(t_muon) if muon is not None else None
    opt_ms = 1e3 * (statistics.median(t_muon) + statistics.median(t_adam))
    r = {
        "impl": "pytorch", "torch": torch.__version__, "config": args.config,
        "resolved_by": resolved_by, "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "dtype": "bf16 autocast" if amp else "fp32", "compiled": compiled, "optimizer": opt_name,
        "params": nparams, "flops_per_token": fpt, "micro_batch": B, "seq_len": T,
        "grad_accum": accum, "batch_tokens": tokens, "warmup": args.warmup, "steps": args.steps,
        "step_ms_mean": 1e3 * step_mean, "step_ms_median": 1e3 * step_med,
        "step_ms_min": 1e3 * min(t_step), "tok_per_s": tps,
        "tok_per_s_median_step": tokens / step_med, "achieved_tflops": fpt * tps / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "mfu": fpt * tps / peak if peak else None,
        "gemm": gemm, "mfu_vs_gemm": fpt * tps / (gemm["tflops"] * 1e12) if gemm else None,
        "time_ms": {"fwd_bwd": 1e3 * fb, "fwd": 1e3 * fw, "bwd": 1e3 * (fb - fw), "bwd_derived": True,
                    "fwd_reps": fwd_reps, "grad_norm": 1e3 * statistics.median(t_clip),
                    "optimizer": opt_ms, "muon": muon_ms},
        "share": {"fwd": fw / step_med, "bwd": (fb - fw) / step_med,
                  "optimizer": opt_ms / 1e3 / step_med,
                  "muon": muon_ms / 1e3 / step_med if muon_ms is not None else None},
        "attention": attn, "memory": mem, "loss_first": losses[0], "loss_last": losses[-1], "notes": notes,
    }

    mib = 1 / 2 ** 20
    print(f"bench_torch: {args.config} on {device} ({r['dtype']}, torch {torch.__version__}, "
          f"{'compiled' if compiled else 'eager'}), {nparams / 1e6:.1f}M params, micro-batch "
          f"{B} x {T} x {accum} accumulation = {tokens} tokens/step, {opt_name}")
    print(f"  step         {1e3 * step_med:.2f} ms median, {1e3 * step_mean:.2f} mean "
          f"({args.steps} timed after {args.warmup} warm-up)")
    print(f"  throughput   {tps:.0f} tokens/s ({fpt * tps / 1e12:.2f} TFLOP/s)")
    if peak:
        print(f"  MFU          {100 * r['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s dense bf16")
    if gemm:
        print(f"  GEMM         {gn}^3 {gemm['dtype']}: {gemm['tflops']:.2f} TFLOP/s; model at "
              f"{100 * r['mfu_vs_gemm']:.1f}% of that rate")
    print(f"  time split   fwd {r['time_ms']['fwd']:.2f} ms, bwd {r['time_ms']['bwd']:.2f} ms "
          f"(derived), clip {r['time_ms']['grad_norm']:.2f} ms, optimizer {opt_ms:.2f} ms"
          + (f" (Muon {muon_ms:.2f} ms = {100 * r['share']['muon']:.1f}% of the step)"
             if muon_ms is not None else ""))
    if attn:
        for name, a in attn["backends"].items():
            if "error" in a:
                print(f"  attention    {name}: unavailable ({a['error']})")
            else:
                print(f"  attention    {name}: fwd {a['fwd_ms']:.3f} ms ({a['fwd_tflops']:.1f} TFLOP/s), "
                      f"bwd {a['bwd_ms']:.3f} ms ({a['bwd_tflops']:.1f} TFLOP/s)")
    if device == "cuda":
        print(f"  memory       max_memory_allocated {mem['peak_allocated'] * mib:.0f} MiB, "
              f"max_memory_reserved {mem['peak_reserved'] * mib:.0f} MiB")
    print(f"  host         peak RSS {mem['peak_rss'] * mib:.0f} MiB")
    for n in notes:
        print(f"  note: {n}")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
