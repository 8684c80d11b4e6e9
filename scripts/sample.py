#!/usr/bin/env python3
"""Text in, text out around `muonforge sample`, for models with a GPT-2 (or byte) vocabulary.

    scripts/sample.py CKPT_OR_RUN_DIR [--prompt TEXT] [--tokenizer auto|byte|gpt2]
                      [--gpt2-dir DIR] [--binary PATH] [muonforge sample options...]

Encodes the prompt with the tokenizer of the run's training data (--tokenizer auto: the one
scripts/prepare_data.py recorded in [PREFIX_]shards.json beside the shards data.train names, with
its --gpt2-dir; for shards without that record, byte for a vocabulary of 256 ids and GPT-2
otherwise) through scripts/prepare_data.py's (GPT-2: tiktoken when installed, else the
pure-Python BPE from encoder.json + vocab.bpe), runs
`muonforge sample --prompt-ids ... --ids` and prints the continuation as text while it is
generated. Every other option (--tokens, --temperature, --greedy, --top-k, --seed, --context,
--device) goes to `muonforge sample` as it is. Standard library only.
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


def config_of(path):
    """The config.json of a checkpoint directory, or of a run directory's newest checkpoint."""
    cfg = os.path.join(path, "config.json")
    latest = os.path.join(path, "latest")
    if not os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(latest):
        cfg = os.path.join(path, open(latest).read().strip(), "config.json")
    if not os.path.isfile(cfg):
        raise pd.UserError(f"{path}: no checkpoint config.json found (give runs/NAME or "
                           f"runs/NAME/ckpt-NNNNNN, or pass --tokenizer)")
    with open(cfg) as f:
        return json.load(f)


def tokenizer_of(cfg):
    """(name, gpt2_dir or None, how it was found): the tokenizer of the run's data.train shards
    as prepare_data.py recorded it ([PREFIX_]shards.json beside them), else by the vocabulary
    size: byte for 256 ids, GPT-2 otherwise."""
    glob = cfg.get("data", {}).get("train") or ""
    rec = pd.shards_record_of(glob) if glob else None
    if rec is not None and rec.is_file():
        try:
            r = json.loads(rec.read_text(encoding="utf-8"))
            if r.get("tokenizer") in ("byte", "gpt2"):
                return r["tokenizer"], r.get("gpt2_dir"), f"recorded in {rec}"
        except (ValueError, OSError):
            pass
    v = cfg["model"]["vocab_size"]
    return ("byte" if v == 256 else "gpt2"), None, f"vocab_size {v}"


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
                    help="auto (default): the one recorded beside the run's data.train shards, "
                    "else byte for a vocabulary of 256 and gpt2 otherwise")
    ap.add_argument("--gpt2-dir", help="folder with encoder.json + vocab.bpe (default: "
                    "$MF_GPT2_DIR or ../shared/data/tokenizers/gpt2)")
    ap.add_argument("--binary", help="muonforge binary (default: $MF_BINARY, $MUONFORGE_BINARY, "
                    "build/muonforge, else the newest build*/muonforge)")
    args, rest = ap.parse_known_args(argv)
    for r in rest:
        if r in ("--prompt-ids", "--ids"):
            raise pd.UserError(f"{r} is set by this script; call muonforge sample directly for ids")
    name, gpt2_dir = args.tokenizer, None
    if name == "auto":
        name, gpt2_dir, how = tokenizer_of(config_of(args.path))
        print(f"tokenizer: {name} ({how})", file=sys.stderr)
    tok = pd.make_tokenizer(name, args.gpt2_dir or os.environ.get("MF_GPT2_DIR") or gpt2_dir,
                            quiet=True)
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
