"""Shared pieces of the PyTorch fixture scripts (llama_ref.py, moe_ref.py).

The math follows DESIGN.md §4: RMSNorm, rotate-half RoPE, Muon's quintic Newton-Schulz and the
global-norm clip factor; everything in float32 so the C++ CPU reference can match to ~1e-5.
"""
import json
import struct

import torch


def rmsnorm(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def rope(x, theta):
    """x (B, T, heads, HD), rotate-half form, positions 0..T-1."""
    T, HD = x.shape[1], x.shape[3]
    inv = theta ** (-torch.arange(0, HD, 2, dtype=torch.float64) / HD)
    f = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # (T, HD/2)
    cos = torch.cat([f.cos(), f.cos()], -1).float()[None, :, None, :]
    sin = torch.cat([f.sin(), f.sin()], -1).float()[None, :, None, :]
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def newton_schulz(u, steps):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u / (u.norm() + 1e-7)
    tr = x.shape[0] > x.shape[1]
    if tr:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tr else x


def clip_(params, max_norm):
    """Global-norm clipping with the factor min(1, max_norm / (norm + 1e-6))."""
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    f = min(1.0, max_norm / (float(norm) + 1e-6))
    for p in params:
        p.grad.mul_(f)


def write_safetensors(path, tensors):
    """F32 safetensors with the standard library (no safetensors package needed)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().float().contiguous()
        data = struct.pack(f"<{t.numel()}f", *t.reshape(-1).tolist())
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
