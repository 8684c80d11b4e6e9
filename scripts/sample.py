#!/usr/bin/env python3
"""Text in, text out around `muonforge sample`, for models with a GPT-2 (or byte) vocabulary.

    scripts/sample.py CKPT_OR_RUN_DIR [--prompt TEXT] [--tokenizer auto|byte|gpt2]
                      [--gpt2-dir DIR] [--binary PATH] [muonforge sample options...]

Encodes the prompt with the tokenizer the model's vocabulary implies (--tokenizer auto: byte for
256 ids, GPT-2 otherwise; neither the shards nor the checkpoint record the tokenizer, so give
--tokenizer for anything else) through scripts/prepare_data.py's (GPT-2: tiktoken when
installed, else the pure-Python BPE from encoder.json + vocab.bpe), runs
`muonforge sample --prompt-ids ... --ids` and prints the continuation as text while it is
generated. Every other option (--tokens, --temperature, --greedy, --top-k, --seed, --context,
--device) goes to `muonforge sample` as it is. --tokenizer auto picks byte for a vocabulary of
256 and gpt2 otherwise. Standard library only.
"""
import argparse
import codecs
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_torch  # noqa: E402  (the binary lookup)
import prepare_data as pd  # noqa: E402


def find_binary(explicit):
    b = bench_torch.find_binary(explicit)
    if not b:
        raise pd.UserError("no muonforge binary: build it (scripts/setup.sh) or pass --binary PATH")
    return b


def vocab_size_of(path):
    """model.vocab_size from a checkpoint directory, or from a run directory's newest one."""
    cfg = os.path.join(path, "config.json")
    latest = os.path.join(path, "latest")
    if not os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(latest):
        cfg = os.path.join(path, open(latest).read().strip(), "config.json")
    if not os.path.isfile(cfg):
        raise pd.UserError(f"{path}: no checkpoint config.json found (give runs/NAME or "
                           f"runs/NAME/ckpt-NNNNNN, or pass --tokenizer)")
    with open(cfg) as f:
        return json.load(f)["model"]["vocab_size"]


def main(argv=None):
    ap = argparse.ArgumentParser(
        allow_abbrev=False,  # the rest goes to muonforge sample: --token 3 is not --tokenizer
        description=__doc__.split("\n\n")[0],
        epilog="Every other option (--tokens, --temperature, --greedy, --top-k, --seed, --context, "
        "--no-kv-cache, --device) goes to `muonforge sample` as it is; --prompt-ids and --ids are "
        "set by this script.")
    ap.add_argument("path", help="checkpoint directory or run directory")
    ap.add_argument("--prompt", default="\n", help="prompt text (default a newline)")
    ap.add_argument("--tokenizer", choices=["auto", "byte", "gpt2"], default="auto",
                    help="auto (default): byte for a vocabulary of 256, else gpt2")
    ap.add_argument("--gpt2-dir", help="folder with encoder.json + vocab.bpe (default: "
                    "$MF_GPT2_DIR or ../shared/data/tokenizers/gpt2)")
    ap.add_argument("--binary", help="muonforge binary (default: $MF_BINARY, $MUONFORGE_BINARY, "
                    "build/muonforge, else the newest build*/muonforge)")
    args, rest = ap.parse_known_args(argv)
    for r in rest:
        if r in ("--prompt-ids", "--ids"):
            raise pd.UserError(f"{r} is set by this script; call muonforge sample directly for ids")
    name = args.tokenizer
    if name == "auto":
        name = "byte" if vocab_size_of(args.path) == 256 else "gpt2"
    tok = pd.make_tokenizer(name, args.gpt2_dir or os.environ.get("MF_GPT2_DIR"), quiet=True)
    ids = list(tok.encode(args.prompt))
    if not ids:
        raise pd.UserError("the prompt encodes to no tokens")
    cmd = [find_binary(args.binary), "sample", args.path, "--prompt-ids", ",".join(map(str, ids)),
           "--ids"] + rest
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    out = sys.stdout
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    seen_bar, word = False, b""
    while True:
        c = proc.stdout.read(1)
        if not c:
            break
        if not seen_bar:
            seen_bar = c == b"|"  # the prompt's ids come first, then " | "
            if seen_bar:  # the checkpoint loaded (its header is on stderr): the prompt, then the text
                out.write(args.prompt)
                out.flush()
            continue
        if c in b" \n":
            if word:
                out.write(dec.decode(tok.decode_bytes([int(word)])))
                out.flush()
                word = b""
        else:
            word += c
    if seen_bar:
        out.write(dec.decode(b"", final=True) + "\n")
    rc = proc.wait()
    if rc != 0:
        sys.exit(rc)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pd.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
