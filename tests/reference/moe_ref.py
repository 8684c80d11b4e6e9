#!/usr/bin/python3
"""Writes tests/fixtures/moe_ref.{safetensors,json}: two tiny Mixture-of-Experts Llamas in PyTorch.

Run with Debian's interpreter, which has python3-torch:  /usr/bin/python3 tests/reference/moe_ref.py

Variant "a": softmax scores, no top-k renormalisation, Switch-style balance loss (added to the
loss), a capacity factor of 1.0 that drops overflow, one shared expert, first layer dense.
Variant "b": sigmoid scores, top-k renormalised, route_scale 2.5, DeepSeek-V3 bias balancing
(random non-zero initial bias, updated after each step), two shared experts, every layer MoE.

For each variant: initial weights, a token batch, logits, the loss (cross-entropy + balance
loss), every gradient, the expert loads of the batch, then the losses of 5 Muon steps (AdamW for
embeddings, norms, lm_head and routers; Muon for every 2-D hidden matrix, each expert separately;
the bias is not optimized but moved by the balancing rule), the final bias and one final expert
matrix. The routing semantics follow src/model/moe.h and backend/backend.h (moe_* entries);
everything in float32. The safetensors file is written with the standard library.
"""
import json
import math
import os

import torch

from ref_common import newton_schulz, rmsnorm as _rmsnorm, rope as _rope, write_safetensors

torch.manual_seed(4321)
torch.set_num_threads(1)

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
            max_seq_len=16, rope_theta=10000.0, norm_eps=1e-5, init_std=0.2)
VARIANTS = {
    "a": dict(n_experts=6, top_k=2, n_shared=1, d_expert=16, first_dense=1, score="softmax",
              norm_topk=False, route_scale=1.0, balance="aux_loss", aux_coef=0.05,
              bias_rate=0.0, capacity_factor=1.0),
    "b": dict(n_experts=8, top_k=3, n_shared=2, d_expert=12, first_dense=0, score="sigmoid",
              norm_topk=True, route_scale=2.5, balance="bias", aux_coef=0.0, bias_rate=0.01,
              capacity_factor=0.0),
}
B, T, STEPS = 2, 16, 5
V, D, L, H, HKV, F = (BASE[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                        "n_kv_heads", "d_ff"))
HD = D // H
N = B * T

MUON = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, wd=0.1)
MUON_ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, wd=0.0)
CLIP = 1.0


def is_moe(m, i):
    return m["n_experts"] > 0 and i >= m["first_dense"]


def param_table(m):
    """(name, shape, kind) in the order the C++ model builds them."""
    E, DE, FS = m["n_experts"], m["d_expert"], m["n_shared"] * m["d_expert"]
    t = [("model.embed_tokens.weight", (V, D), "embedding")]
    for i in range(L):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", (D,), "norm"),
              (p + "self_attn.q_proj.weight", (H * HD, D), "hidden"),
              (p + "self_attn.k_proj.weight", (HKV * HD, D), "hidden"),
              (p + "self_attn.v_proj.weight", (HKV * HD, D), "hidden"),
              (p + "self_attn.o_proj.weight", (D, H * HD), "hidden"),
              (p + "post_attention_layernorm.weight", (D,), "norm")]
        if not is_moe(m, i):
            t += [(p + "mlp.gate_proj.weight", (F, D), "hidden"),
                  (p + "mlp.up_proj.weight", (F, D), "hidden"),
                  (p + "mlp.down_proj.weight", (D, F), "hidden")]
            continue
        t += [(p + "mlp.gate.weight", (E, D), "router")]
        if m["balance"] == "bias":
            t += [(p + "mlp.gate.e_score_correction_bias", (E,), "bias")]
        for e in range(E):
            q = p + f"mlp.experts.{e}."
            t += [(q + "gate_proj.weight", (DE, D), "hidden"),
                  (q + "up_proj.weight", (DE, D), "hidden"),
                  (q + "down_proj.weight", (D, DE), "hidden")]
        if FS:
            q = p + "mlp.shared_experts."
            t += [(q + "gate_proj.weight", (FS, D), "hidden"),
                  (q + "up_proj.weight", (FS, D), "hidden"),
                  (q + "down_proj.weight", (D, FS), "hidden")]
    t += [("model.norm.weight", (D,), "norm"), ("lm_head.weight", (V, D), "lm_head")]
    return t


def init_weights(m):
    w = {}
    for name, shape, kind in param_table(m):
        if kind == "norm":  # not all ones, so the gain gradients matter
            w[name] = 1.0 + 0.1 * torch.randn(shape)
        elif kind == "bias":  # non-zero so the bias visibly steers the selection
            w[name] = 0.05 * torch.randn(shape)
        elif kind == "router":  # larger, so the routing is far from uniform
            w[name] = 0.5 * torch.randn(shape)
        else:
            w[name] = BASE["init_std"] * torch.randn(shape)
    return w




def rmsnorm(x, g):
    return _rmsnorm(x, g, BASE["norm_eps"])


def rope(x):
    return _rope(x, BASE["rope_theta"])


def swiglu(x, wg, wu, wd):
    return (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def moe_block(m, w, p, x):
    """x (N,D) normed -> (out (N,D), aux loss, counts (E,))."""
    E, K = m["n_experts"], m["top_k"]
    logits = x @ w[p + "gate.weight"].T  # (N,E)
    probs = logits.sigmoid() if m["score"] == "sigmoid" else logits.softmax(-1)
    sel = probs.detach()
    if m["balance"] == "bias":
        sel = sel + w[p + "gate.e_score_correction_bias"].detach()
    idx = sel.topk(K, dim=-1).indices  # (N,K), best first
    a = probs.gather(1, idx)
    wts = a / (a.sum(-1, keepdim=True) + 1e-20) if m["norm_topk"] else a
    wts = wts * m["route_scale"]
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    # capacity: each expert keeps its first `cap` (token, slot) pairs in token order
    cap = math.ceil(m["capacity_factor"] * N * K / E) if m["capacity_factor"] > 0 else 0
    keep = torch.ones(N, K, dtype=torch.bool)
    if cap:
        seen = [0] * E
        for n in range(N):
            for j in range(K):
                e = int(idx[n, j])
                keep[n, j] = seen[e] < cap
                seen[e] += 1
    out = torch.zeros_like(x)
    for e in range(E):
        q = p + f"experts.{e}."
        y = swiglu(x, w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"])
        coef = (wts * ((idx == e) & keep)).sum(-1, keepdim=True)  # (N,1)
        out = out + coef * y
    if m["n_shared"]:
        q = p + "shared_experts."
        out = out + swiglu(x, w[q + "gate_proj.weight"], w[q + "up_proj.weight"],
                           w[q + "down_proj.weight"])
    aux = torch.zeros(())
    if m["balance"] == "aux_loss":
        pn = probs if m["score"] == "softmax" else probs / probs.sum(-1, keepdim=True)
        f = counts.float() / (N * K)
        aux = m["aux_coef"] * E * (f * pn.mean(0)).sum()
    return out, aux, counts, int((~keep).sum())


def forward(m, w, tokens):
    """tokens (B, T+1) -> logits (N, V), loss (CE + aux), per-layer counts, dropped."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    x = w["model.embed_tokens.weight"][inp]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    aux_total = torch.zeros(())
    counts, dropped = {}, 0
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
        if is_moe(m, i):
            out, aux, c, dr = moe_block(m, w, p + "mlp.", h.reshape(N, D))
            x = x + out.view(B, T, D)
            aux_total = aux_total + aux
            counts[i] = c
            dropped += dr
        else:
            x = x + swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"],
                           w[p + "mlp.down_proj.weight"])
    x = rmsnorm(x, w["model.norm.weight"])
    logits = (x @ w["lm_head.weight"].T).reshape(N, V)
    ce = torch.nn.functional.cross_entropy(logits, tgt.reshape(-1))
    return logits, ce + aux_total, aux_total, counts, dropped



def train(m, w0, batches):
    kinds = {n: k for n, _, k in param_table(m)}
    w = {k: v.clone().requires_grad_(kinds[k] != "bias") for k, v in w0.items()}
    hidden = [w[n] for n in w if kinds[n] == "hidden"]
    other = [w[n] for n in w if kinds[n] not in ("hidden", "bias")]
    o = torch.optim.AdamW(other, lr=MUON_ADAMW["lr"], betas=MUON_ADAMW["betas"],
                          eps=MUON_ADAMW["eps"], weight_decay=MUON_ADAMW["wd"])
    bufs = [torch.zeros_like(p) for p in hidden]
    trained = hidden + other
    losses = []
    for tokens in batches:
        for p in trained:
            p.grad = None
        _, loss, _, counts, _ = forward(m, w, tokens)
        loss.backward()
        losses.append(loss.item())
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trained))
        f = min(1.0, CLIP / (float(norm) + 1e-6))
        for p in trained:
            p.grad.mul_(f)
        with torch.no_grad():
            o.step()
            for p, mb in zip(hidden, bufs):
                mb.mul_(MUON["momentum"]).add_(p.grad)
                upd = p.grad + MUON["momentum"] * mb if MUON["nesterov"] else mb
                out = newton_schulz(upd, MUON["ns_steps"])
                s = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))  # scale mode "shape"
                p.mul_(1 - MUON["lr"] * MUON["wd"]).add_(out, alpha=-MUON["lr"] * s)
            if m["balance"] == "bias":  # DeepSeek-V3 auxiliary-loss-free update
                for i, c in counts.items():
                    b = w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
                    mean = c.double().mean()
                    b.add_(m["bias_rate"] * torch.sign(mean - c.double()).float())
    return losses, {k: v.detach() for k, v in w.items()}



def main():
    out, meta = {}, dict(config=BASE, B=B, T=T, steps=STEPS, muon=MUON, muon_adamw=MUON_ADAMW,
                         clip=CLIP, torch_version=torch.__version__, variants={})
    for name, m in VARIANTS.items():
        w0 = init_weights(m)
        tokens = torch.randint(0, V, (B, T + 1))
        batches = [torch.randint(0, V, (B, T + 1)) for _ in range(STEPS)]
        kinds = {n: k for n, _, k in param_table(m)}
        w = {k: v.clone().requires_grad_(kinds[k] != "bias") for k, v in w0.items()}
        logits, loss, aux, counts, dropped = forward(m, w, tokens)
        loss.backward()
        losses, final = train(m, w0, batches)
        pre = name + "."
        for k, v in w0.items():
            out[pre + "init." + k] = v
            if kinds[k] != "bias":
                out[pre + "grad." + k] = w[k].grad
        out[pre + "logits"] = logits
        out[pre + "tokens"] = tokens.float()
        out[pre + "batches"] = torch.stack(batches).float()
        last = L - 1
        probe = f"model.layers.{last}.mlp.experts.1.down_proj.weight"
        out[pre + "final." + probe] = final[probe]
        bias_name = f"model.layers.{last}.mlp.gate.e_score_correction_bias"
        if bias_name in final:
            out[pre + "final." + bias_name] = final[bias_name]
        meta["variants"][name] = dict(
            moe=m, loss=loss.item(), aux_loss=aux.item(), dropped=dropped,
            counts={str(i): c.tolist() for i, c in counts.items()}, muon_losses=losses,
            probe=probe, bias_probe=bias_name if bias_name in final else None)
        print(name, "loss", loss.item(), "aux", aux.item(), "dropped", dropped, "muon", losses)
    here = os.path.dirname(os.path.abspath(__file__))
    fix = os.path.join(here, "..", "fixtures")
    os.makedirs(fix, exist_ok=True)
    write_safetensors(os.path.join(fix, "moe_ref.safetensors"), out)
    with open(os.path.join(fix, "moe_ref.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
