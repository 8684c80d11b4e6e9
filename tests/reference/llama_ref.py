#!/usr/bin/python3
"""Writes tests/fixtures/llama_ref.{safetensors,json}: a tiny Llama (GQA, untied) in PyTorch.

Run with Debian's interpreter, which has python3-torch:  /usr/bin/python3 tests/reference/llama_ref.py

Recorded: initial weights, a token batch, logits, the mean cross-entropy loss, every gradient, and
the losses of 5 AdamW steps and of 5 Muon steps (fresh batch each step, global-norm clipping 1.0).
The math follows DESIGN.md §4 (Hugging Face Llama: RMSNorm, rotate-half RoPE, GQA, SwiGLU) and the
optimizer formulas there; everything in float32 so the C++ CPU reference can match to ~1e-5.
The safetensors file is written with the standard library (no safetensors package needed).
"""
import json
import math
import os

import torch

from ref_common import clip_, newton_schulz, rmsnorm as _rmsnorm, rope as _rope, write_safetensors

torch.manual_seed(1234)
torch.set_num_threads(1)

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
           max_seq_len=16, rope_theta=10000.0, norm_eps=1e-5, init_std=0.2)
B, T, STEPS = 2, 16, 5
V, D, L, H, HKV, F = (CFG[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                       "n_kv_heads", "d_ff"))
HD = D // H

ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, wd=0.1)
MUON = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, wd=0.1)
MUON_ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, wd=0.0)
CLIP = 1.0


def param_table():
    """(name, shape, kind) in the Hugging Face order the C++ model uses."""
    t = [("model.embed_tokens.weight", (V, D), "embedding")]
    for i in range(L):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", (D,), "norm"),
              (p + "self_attn.q_proj.weight", (H * HD, D), "hidden"),
              (p + "self_attn.k_proj.weight", (HKV * HD, D), "hidden"),
              (p + "self_attn.v_proj.weight", (HKV * HD, D), "hidden"),
              (p + "self_attn.o_proj.weight", (D, H * HD), "hidden"),
              (p + "post_attention_layernorm.weight", (D,), "norm"),
              (p + "mlp.gate_proj.weight", (F, D), "hidden"),
              (p + "mlp.up_proj.weight", (F, D), "hidden"),
              (p + "mlp.down_proj.weight", (D, F), "hidden")]
    t += [("model.norm.weight", (D,), "norm"), ("lm_head.weight", (V, D), "lm_head")]
    return t


def init_weights():
    w = {}
    for name, shape, kind in param_table():
        if kind == "norm":  # not all ones, so the gain gradients matter
            w[name] = 1.0 + 0.1 * torch.randn(shape)
        else:
            w[name] = CFG["init_std"] * torch.randn(shape)
    return w




def rmsnorm(x, g):
    return _rmsnorm(x, g, CFG["norm_eps"])


def rope(x):
    return _rope(x, CFG["rope_theta"])


def forward(w, tokens):
    """tokens (B, T+1) -> logits (B*T, V), mean CE loss."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    x = w["model.embed_tokens.weight"][inp]  # (B,T,D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"model.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, HD)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, HKV, HD)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, HKV, HD)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // HKV, dim=2)
        v = v.repeat_interleave(H // HKV, dim=2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HD)
        s = s.masked_fill(~mask, float("-inf"))
        o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(B, T, H * HD)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["model.norm.weight"])
    logits = (x @ w["lm_head.weight"].T).reshape(B * T, V)
    return logits, torch.nn.functional.cross_entropy(logits, tgt.reshape(-1))




def train(w0, batches, opt):
    w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    kinds = {n: k for n, _, k in param_table()}
    hidden = [w[n] for n in w if kinds[n] == "hidden"]
    other = [w[n] for n in w if kinds[n] != "hidden"]
    if opt == "adamw":
        # RMSNorm gains are not decayed (muonforge, like nanoGPT and Megatron-LM).
        decayed = [w[n] for n in w if kinds[n] != "norm"]
        norms = [w[n] for n in w if kinds[n] == "norm"]
        o = torch.optim.AdamW([{"params": decayed}, {"params": norms, "weight_decay": 0.0}],
                              lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"],
                              weight_decay=ADAMW["wd"])
    else:
        o = torch.optim.AdamW(other, lr=MUON_ADAMW["lr"], betas=MUON_ADAMW["betas"],
                              eps=MUON_ADAMW["eps"], weight_decay=MUON_ADAMW["wd"])
        bufs = [torch.zeros_like(p) for p in hidden]
    losses = []
    for tokens in batches:
        for p in w.values():
            p.grad = None
        _, loss = forward(w, tokens)
        loss.backward()
        losses.append(loss.item())
        clip_(list(w.values()), CLIP)
        with torch.no_grad():
            o.step()
            if opt == "muon":
                for p, m in zip(hidden, bufs):
                    m.mul_(MUON["momentum"]).add_(p.grad)
                    upd = p.grad + MUON["momentum"] * m if MUON["nesterov"] else m
                    out = newton_schulz(upd, MUON["ns_steps"])
                    s = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))  # scale mode "shape"
                    p.mul_(1 - MUON["lr"] * MUON["wd"]).add_(out, alpha=-MUON["lr"] * s)
    return losses, {k: v.detach() for k, v in w.items()}



def main():
    w0 = init_weights()
    tokens = torch.randint(0, V, (B, T + 1))
    batches = [torch.randint(0, V, (B, T + 1)) for _ in range(STEPS)]

    w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    logits, loss = forward(w, tokens)
    loss.backward()

    adamw_losses, adamw_final = train(w0, batches, "adamw")
    muon_losses, muon_final = train(w0, batches, "muon")

    out = {}
    for k, v in w0.items():
        out["init." + k] = v
        out["grad." + k] = w[k].grad
    out["logits"] = logits
    out["tokens"] = tokens.float()
    out["batches"] = torch.stack(batches).float()
    out["adamw_final.model.layers.1.mlp.down_proj.weight"] = adamw_final["model.layers.1.mlp.down_proj.weight"]
    out["muon_final.model.layers.1.mlp.down_proj.weight"] = muon_final["model.layers.1.mlp.down_proj.weight"]
    here = os.path.dirname(os.path.abspath(__file__))
    fix = os.path.join(here, "..", "fixtures")
    os.makedirs(fix, exist_ok=True)
    write_safetensors(os.path.join(fix, "llama_ref.safetensors"), out)
    meta = dict(config=CFG, B=B, T=T, steps=STEPS, loss=loss.item(), adamw=ADAMW, muon=MUON,
                muon_adamw=MUON_ADAMW, clip=CLIP, adamw_losses=adamw_losses,
                muon_losses=muon_losses, torch_version=torch.__version__)
    with open(os.path.join(fix, "llama_ref.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("loss", loss.item(), "adamw", adamw_losses, "muon", muon_losses)


if __name__ == "__main__":
    main()
