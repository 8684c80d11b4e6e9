"""Loads an exported muonforge model with transformers and compares its logits with ours.

usage: python hf_check.py HF_DIR OURS.safetensors B
OURS.safetensors holds "tokens" (B*T, as float) and "logits" (B*T, V) computed by muonforge.
Exit 0 when the max relative difference is below 1e-4. Needs torch and transformers.
"""
import json
import struct
import sys

import torch
from transformers import AutoModelForCausalLM


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, e2 = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[b:e2]), dtype=torch.float32)
        out[name] = t.reshape(e["shape"])
    return out


def main():
    hf_dir, ours, B = sys.argv[1], sys.argv[2], int(sys.argv[3])
    o = read_safetensors(ours)
    tokens = o["tokens"].long().reshape(B, -1)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(tokens).logits.reshape(-1, o["logits"].shape[-1])
    err = (logits - o["logits"]).abs().max().item() / o["logits"].abs().max().item()
    print(f"max relative logits difference vs transformers: {err:.3e}")
    sys.exit(0 if err < 1e-4 else 1)


if __name__ == "__main__":
    main()
