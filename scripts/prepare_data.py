#!/usr/bin/env python3
"""Turn text into llm.c token shards for muonforge.

Recipes (run `prepare_data.py RECIPE --help` for the options of each):

  default          the embedded default corpus: real English text every Debian machine has
                   offline (/usr/share/common-licenses + Python's own pydoc topics), byte-level
                   tokens (vocab 256) -> data/default/{train,val}_000000.bin
  text PATH...     local text files (any name) or folders (recursively: *.txt, *.txt.xz)
  tinyshakespeare  downloads the 1.1 MB char-rnn Shakespeare file, then `text`
  tinystories      downloads TinyStoriesV2-GPT4 train/valid text files, then `text`
  fineweb-edu      downloads N documents of FineWeb-Edu (sample-10BT) through the Hugging Face
                   datasets-server rows API, then `text`

Shard format (see data/README.md): 256 x int32 header, magic 20240520 / version 1 with uint16
tokens when the vocabulary has <= 65535 ids, otherwise magic 20240801 / version 7 with uint32.

Documents: input text is split into documents at every literal "<|endoftext|>" (and at file
boundaries). GPT-2 shards start each document with the <|endoftext|> token (50256), as llm.c
does; byte-level shards end each document with a blank line instead (bytes have no spare id).
Validation split (deterministic), unless --val files are given: with --val-split tail (the
default, and the only sensible one for a single long text), the last --val-frac of every
document goes to val, cut after the first newline at or after that point (after a space when no
newline follows; the `default` recipe keeps an exact cut there, as its published figures were
measured); in GPT-2 shards each tail, like each document, starts with <|endoftext|>. With
--val-split documents (fineweb-edu's default), every 1/val-frac-th document goes to val whole.

Standard library only; tiktoken is used for GPT-2 when it is installed (and can load its
tables) and no --gpt2-dir is given, otherwise a pure-Python byte-level BPE reading
encoder.json + vocab.bpe.
"""

import argparse
import array
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7
HEADER_INTS = 256
EOT_TEXT = "<|endoftext|>"
DEFAULT_SHARD_TOKENS = 100_000_000
INT32_MAX = 2**31 - 1


def log(msg):
    print(msg, flush=True)


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class UserError(Exception):
    """A problem the user must fix; printed without a traceback."""


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

class ByteTokenizer:
    name = "byte"
    vocab_size = 256
    eot = None  # no spare id: documents are separated by a blank line instead

    # Bytes of the input that are not UTF-8 arrive as surrogate escapes (read_text) and are
    # written back as the very bytes they were.
    read_errors = "surrogateescape"

    def encode(self, text):
        return text.encode("utf-8", "surrogateescape")

    def decode_bytes(self, ids):
        return bytes(ids)


def gpt2_byte_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters:
    printable Latin-1 bytes map to themselves, the others to 256, 257, ... in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
            + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# GPT-2's pre-tokenizer. \p{L} / \p{N} need the third-party `regex` module.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Approximation with the standard `re` module: letters = word characters that are not decimal
# digits or '_'; numbers = decimal digits only (so e.g. '½' or '²' count as letters here).
GPT2_PATTERN_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


def default_gpt2_dir():
    env = os.environ.get("MF_GPT2_DIR")
    if env:
        return Path(env)
    return (REPO / ".." / "shared" / "data" / "tokenizers" / "gpt2").resolve()


class Gpt2BpeTokenizer:
    """GPT-2 byte-level BPE in pure Python, from encoder.json + vocab.bpe."""
    name = "gpt2"

    def __init__(self, gpt2_dir, force_re=False):
        d = Path(gpt2_dir)
        self.gpt2_dir = d
        enc_path, bpe_path = d / "encoder.json", d / "vocab.bpe"
        missing = [str(p) for p in (enc_path, bpe_path) if not p.is_file()]
        if missing:
            raise UserError(
                f"GPT-2 tokenizer files not found: {', '.join(missing)}. Install tiktoken "
                f"(pip install tiktoken), or put encoder.json and vocab.bpe in a folder and pass "
                f"--gpt2-dir DIR (or set MF_GPT2_DIR)")
        try:
            with open(enc_path, encoding="utf-8") as f:
                self.encoder = json.load(f)
            with open(bpe_path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except ValueError as e:  # bad JSON, or not UTF-8
            raise UserError(f"{enc_path} / {bpe_path}: not GPT-2's tokenizer files ({e})")
        merges = [tuple(l.split()) for l in lines[1:] if l.strip()]  # line 0 is "#version"
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_map = gpt2_byte_to_unicode()
        # Every byte and every merge result must have an id, or encoding fails mid-file.
        if not isinstance(self.encoder, dict) or EOT_TEXT not in self.encoder:
            raise UserError(f"{enc_path}: no '{EOT_TEXT}' entry: not GPT-2's encoder.json")
        bad = [c for c in self.byte_map.values() if c not in self.encoder]
        bad += [a + b for a, b in (m for m in merges if len(m) == 2) if a + b not in self.encoder]
        if bad or any(len(m) != 2 for m in merges):
            raise UserError(f"{enc_path} and {bpe_path} do not belong together (e.g. no id for "
                            f"'{bad[0] if bad else '?'}'): not GPT-2's tokenizer files")
        self.eot = self.encoder[EOT_TEXT]
        self.vocab_size = max(self.encoder.values()) + 1
        self.cache = {}
        self.exact = False
        if not force_re:
            try:
                import regex  # noqa: F401
                self.pat = regex.compile(GPT2_PATTERN)
                self.exact = True
            except ImportError:
                warn("the `regex` module is not installed: using an approximation of GPT-2's "
                     "pre-tokenizer with `re` (numbers other than 0-9 such as '½' split "
                     "differently); `pip install regex` for exact GPT-2 tokens")
        if not self.exact:
            self.pat = re.compile(GPT2_PATTERN_RE)

    def bpe(self, word):
        """Applies the merges to one pre-token (a string of byte-map characters)."""
        hit = self.cache.get(word)
        if hit is not None:
            return hit
        parts = list(word)
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            a, b = parts[best], parts[best + 1]
            merged = []
            i = 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder[p] for p in parts]
        if len(self.cache) < 500_000:
            self.cache[word] = ids
        return ids

    def encode(self, text):
        out = []
        bm = self.byte_map
        for piece in self.pat.findall(text):
            out.extend(self.bpe("".join(bm[b] for b in piece.encode("utf-8"))))
        return out

    def decode_bytes(self, ids):
        """The bytes of token ids (a token may end inside a UTF-8 character)."""
        if not hasattr(self, "decoder"):
            self.decoder = {i: t for t, i in self.encoder.items()}
            self.byte_of = {c: b for b, c in self.byte_map.items()}
        out = bytearray()
        for i in ids:
            t = self.decoder.get(i)
            if t is None:
                raise UserError(f"token id {i} is not in the GPT-2 vocabulary")
            out.extend(self.byte_of[c] for c in t)
        return bytes(out)


class TiktokenGpt2:
    name = "gpt2"

    def __init__(self, enc):
        self.enc = enc
        self.eot = enc.eot_token
        self.vocab_size = enc.n_vocab
        self.exact = True

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)


def make_tokenizer(name, gpt2_dir=None, quiet=False):
    if name == "byte":
        return ByteTokenizer()
    if name != "gpt2":
        raise UserError(f"--tokenizer must be 'byte' or 'gpt2', got '{name}'")
    if gpt2_dir:
        # Local tables asked for: never let tiktoken try the network (offline machines can hang
        # on it); the pure-Python BPE gives the same tokens.
        tok = Gpt2BpeTokenizer(gpt2_dir)
        if not quiet:
            log(f"tokenizer: gpt2 (pure-Python BPE from {gpt2_dir})")
        return tok
    try:
        import tiktoken
        try:
            tok = TiktokenGpt2(tiktoken.get_encoding("gpt2"))
            if not quiet:
                log("tokenizer: gpt2 (tiktoken)")
            return tok
        except Exception as e:  # usually: offline and the tables are not cached
            warn(f"tiktoken could not load 'gpt2' ({e.__class__.__name__}); using the pure-Python BPE")
    except ImportError:
        pass
    tok = Gpt2BpeTokenizer(gpt2_dir or default_gpt2_dir())
    if not quiet:
        log(f"tokenizer: gpt2 (pure-Python BPE from {gpt2_dir or default_gpt2_dir()})")
    return tok


# Worker-process plumbing for parallel encoding (the pure-Python BPE is slow).
_WORKER_TOK = None


def _worker_init(name, gpt2_dir):
    global _WORKER_TOK
    _WORKER_TOK = make_tokenizer(name, gpt2_dir, quiet=True)


def _worker_encode(text):
    return _WORKER_TOK.encode(text)


# --------------------------------------------------------------------------------------------
# Shard writing
# --------------------------------------------------------------------------------------------

def write_shard(path, tokens, token_bytes):
    """Writes one shard atomically: temp file in the same folder, fsync, rename."""
    n = len(tokens)
    if n > INT32_MAX:
        raise UserError(f"{path}: {n} tokens do not fit the int32 header field")
    header = [0] * HEADER_INTS
    header[0], header[1] = (MAGIC_U16, VERSION_U16) if token_bytes == 2 else (MAGIC_U32, VERSION_U32)
    header[2] = n
    body = array.array("H" if token_bytes == 2 else "I", tokens)
    assert body.itemsize == token_bytes
    if sys.byteorder != "little":
        body.byteswap()
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack(f"<{HEADER_INTS}i", *header))
        f.write(body.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_shard(path):
    """Reads a shard back (used by the tests): returns (magic, version, tokens)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER_INTS * 4:
        raise UserError(f"{path}: shorter than the 1024-byte header")
    magic, version, count = struct.unpack("<3i", data[:12])
    width = {MAGIC_U16: 2, MAGIC_U32: 4}.get(magic)
    if width is None:
        raise UserError(f"{path}: bad magic {magic}")
    if len(data) != HEADER_INTS * 4 + count * width:
        raise UserError(f"{path}: size {len(data)} does not match {count} tokens of {width} bytes")
    body = array.array("H" if width == 2 else "I")
    body.frombytes(data[HEADER_INTS * 4:])
    if sys.byteorder != "little":
        body.byteswap()
    return magic, version, body


class ShardWriter:
    """Streams tokens of one split into {out}/{prefix}{split}_{index:06d}.bin.

    A shard is written once the buffer holds shard_tokens + shard_tokens/2 tokens, so the last
    shard of a split is never a tiny remainder: it holds between shard_tokens/2 and
    1.5*shard_tokens tokens (or everything, when the split is smaller than one shard)."""

    def __init__(self, out_dir, prefix, split, shard_tokens, token_bytes, shown_dir=None):
        self.out_dir, self.prefix, self.split = Path(out_dir), prefix, split
        self.shown_dir = Path(shown_dir) if shown_dir else self.out_dir  # for the log
        self.shard_tokens, self.token_bytes = shard_tokens, token_bytes
        self.buf = array.array("H" if token_bytes == 2 else "I")
        self.index = 0
        self.total = 0
        self.files = []

    def add(self, tokens):
        self.buf.extend(tokens)
        self.total += len(tokens)
        limit = self.shard_tokens + self.shard_tokens // 2
        while len(self.buf) >= limit:
            self._flush(self.buf[: self.shard_tokens])
            del self.buf[: self.shard_tokens]

    def _flush(self, tokens):
        path = self.out_dir / f"{self.prefix}{self.split}_{self.index:06d}.bin"
        write_shard(path, tokens, self.token_bytes)
        self.files.append((path, len(tokens)))
        self.index += 1
        log(f"  wrote {self.shown_dir / path.name} ({len(tokens):,} tokens)")

    def close(self):
        # An empty split writes no file: a 0-token shard is one training would only reject.
        if len(self.buf):
            self._flush(self.buf)
            self.buf = self.buf[:0]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def find_text_files(paths):
    """Expands files and folders (recursively: *.txt, *.txt.xz) into a sorted, de-duplicated
    list. Other files in a folder are skipped, and counted in the log: an archive or a binary
    read as text would fill the shards with its bytes. A file named explicitly is read whatever
    its name (read_text still refuses binary content)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            is_text = [q.name.endswith((".txt", ".txt.xz")) for q in files]
            found = [q for q, t in zip(files, is_text) if t]
            other = [q for q, t in zip(files, is_text) if not t and not q.name.startswith(".")]
            if other:
                log(f"  {p}: skipped {len(other)} file(s) that are not *.txt or *.txt.xz (e.g. "
                    f"{other[0]}); name a file to read it anyway")
            if not found:
                raise UserError(f"folder '{p}' contains no *.txt or *.txt.xz files")
            out.extend(found)
        elif p.exists():
            out.append(p)  # a file, or a stream such as /dev/stdin
        else:
            raise UserError(f"input '{p}' does not exist")
    seen, uniq = set(), []
    for p in out:
        k = p.resolve()
        if k not in seen:
            seen.add(k)
            uniq.append(p)
    return uniq


def read_text(path, errors="replace"):
    """The UTF-8 text of a file (.xz: decompressed). Bytes that are not UTF-8 are decoded with
    `errors` ("replace": U+FFFD; "surrogateescape": kept, for the byte tokenizer) and counted in
    a warning; NUL bytes mean binary content (an archive, a program, UTF-16), refused."""
    path = Path(path)
    try:
        if path.name.endswith(".xz"):
            with lzma.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except lzma.LZMAError as e:
        raise UserError(f"'{path}': not a valid .xz file ({e})")
    except OSError as e:
        raise UserError(f"'{path}': cannot read ({e.strerror})")
    nul = data.find(b"\x00")
    if nul != -1:
        raise UserError(f"'{path}' holds a NUL byte (at byte {nul:,}): binary data, not text (an "
                        f"archive to unpack first? UTF-16 text to convert to UTF-8?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors)
        if errors == "surrogateescape":
            n = sum(1 for c in text if "\udc80" <= c <= "\udcff")
            what = f"{n:,} byte(s) that are not UTF-8"
            fate = "kept as they are (the byte tokenizer)"
        else:
            n = text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))
            what = f"{n:,} invalid UTF-8 sequence(s)"
            fate = "each replaced by U+FFFD"
        warn(f"'{path}': {what} (the first at byte {e.start:,}), {fate}")
        return text


def split_documents(text):
    """Documents are separated by literal <|endoftext|> markers; empty ones are dropped."""
    return [d for d in (p.strip("\n") for p in text.split(EOT_TEXT)) if d.strip()]


def split_tail(doc, val_frac, at_space=True):
    """(train_part, val_part): the val part starts after the first newline at or after
    len*(1-val_frac); when no newline follows, after the first whitespace there (so no word is
    cut in two; at_space=False cuts exactly there instead, the default corpus's frozen rule);
    when neither follows, exactly there."""
    if val_frac <= 0:
        return doc, ""
    cut = int(len(doc) * (1.0 - val_frac))
    nl = doc.find("\n", cut)
    if nl != -1:
        return doc[: nl + 1], doc[nl + 1:]
    ws = re.compile(r"\s").search(doc, cut) if at_space else None
    if ws:
        cut = ws.end()
    return doc[:cut], doc[cut:]


def is_val_document(index, val_frac):
    """--val-split documents: whether 0-based document `index` goes to val whole. The val
    documents are spread evenly: one whenever floor(n * val_frac) steps up (with val_frac 0.05,
    the 20th, 40th, ... document), so the split does not depend on how many documents follow."""
    if val_frac <= 0:
        return False
    # The small epsilon keeps products like 20 * 0.05 = 0.9999... on the right side.
    return int((index + 1) * val_frac + 1e-9) > int(index * val_frac + 1e-9)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

SHARDS_RECORD = "shards.json"  # DIR/[PREFIX_]shards.json: build()'s summary


def shards_record_of(glob):
    """The [PREFIX_]shards.json that describes the shards a glob such as data/x/mini_train_*.bin
    names (None when the glob does not look like prepare_data.py's names)."""
    m = re.match(r"^(.*)(train|val)_[^/]*$", os.path.basename(glob))  # the last train_ / val_
    if not m:
        return None
    return Path(os.path.dirname(glob) or ".") / f"{m.group(1)}{SHARDS_RECORD}"


def clear_old_shards(out_dir, prefix):
    """Removes shards a previous run left under the same names, so a glob such as
    train_*.bin never mixes two runs. Called once the new shards are complete (build)."""
    old = sorted(out_dir.glob(f"{prefix}train_*.bin")) + sorted(out_dir.glob(f"{prefix}val_*.bin"))
    for p in old:
        p.unlink()
    if old:
        log(f"removed {len(old)} old shard(s) from {out_dir}")


def doc_text(doc, tok):
    # Byte-level: each document ends with a blank line (there is no end-of-text id).
    return doc + "\n\n" if tok.eot is None else doc


def build(docs_train, docs_val, out_dir, tok, shard_tokens, prefix="", workers=1, gpt2_dir=None,
          source=""):
    """docs_*: iterables of document strings. Writes the shards and returns a summary dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_tokens < 1 or shard_tokens + shard_tokens // 2 > INT32_MAX:
        raise UserError(f"--shard-tokens must be in [1, {INT32_MAX * 2 // 3}], got {shard_tokens}")
    token_bytes = 2 if tok.vocab_size <= 65535 else 4
    # The shards are written to a staging folder and moved in at the end, replacing the old
    # ones: an error, a bad input or Ctrl-C part-way leaves the previous shards as they were.
    stage = out_dir / f".prepare-{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write there ({e.strerror})")
    log(f"writing {'uint16 (v1)' if token_bytes == 2 else 'uint32 (v7)'} shards of "
        f"{shard_tokens:,} tokens to {out_dir}/ (tokenizer {tok.name}, vocab {tok.vocab_size})")

    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(
            workers, initializer=_worker_init, initargs=(tok.name, gpt2_dir))

    summary = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot,
               "token_bytes": token_bytes, "source": source, "splits": {}}
    if getattr(tok, "gpt2_dir", None):  # the pure-Python BPE's files, for scripts/sample.py
        summary["gpt2_dir"] = str(Path(tok.gpt2_dir).resolve())
    t0 = time.time()
    try:
        for split, docs in (("train", docs_train), ("val", docs_val)):
            w = ShardWriter(stage, prefix, split, shard_tokens, token_bytes, shown_dir=out_dir)
            texts = (doc_text(d, tok) for d in docs)
            encoded = pool.imap(_worker_encode, texts, chunksize=4) if pool else map(tok.encode, texts)
            ndocs = 0
            last = time.time()
            for ids in encoded:
                if tok.eot is not None:
                    w.add([tok.eot])
                w.add(ids)
                ndocs += 1
                if time.time() - last > 5:
                    last = time.time()
                    log(f"  {split}: {ndocs:,} documents, {w.total:,} tokens "
                        f"({w.total / max(last - t0, 1e-9):,.0f} tok/s)")
            w.close()
            if w.total == 0 and split == "train":
                raise UserError("the train split is empty: the inputs hold no text")
            if w.total == 0:
                warn("the val split is empty, so no val shard was written: train with "
                     "--set data.val= (no evaluation), or give the val text with --val FILES")
            summary["splits"][split] = {
                "documents": ndocs, "tokens": w.total,
                "files": [{"path": str(out_dir / p.name), "tokens": n, "sha256": sha256_file(p)}
                          for p, n in w.files]}
        if pool:
            pool.close()
            pool.join()
            pool = None
        clear_old_shards(out_dir, prefix)
        for p in sorted(stage.iterdir()):
            os.replace(p, out_dir / p.name)
        # What the shards are (tokenizer, files, checksums), beside them: scripts/sample.py reads
        # the tokenizer from it through the run's data.train.
        rec = out_dir / f"{prefix}{SHARDS_RECORD}"
        tmp = rec.with_name(rec.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, rec)
    finally:
        if pool:
            pool.terminate()
            pool.join()
        shutil.rmtree(stage, ignore_errors=True)
    dt = time.time() - t0
    log("summary:")
    for split, s in summary["splits"].items():
        log(f"  {split:5s}: {s['tokens']:>12,} tokens in {len(s['files'])} file(s), "
            f"{s['documents']:,} documents")
        for f in s["files"]:
            log(f"         {f['path']}  ({f['tokens']:,} tokens, sha256 {f['sha256'][:16]}...)")
    log(f"  done in {dt:.1f} s")
    return summary


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_docs(files, what, errors="replace"):
    for p in files:
        text = read_text(p, errors)
        log(f"  reading {p} ({len(text):,} characters) for {what}")
        yield from split_documents(text)


VAL_SPLITS = ("tail", "documents")


def run_text(files, val_files, out, tokenizer, val_frac, shard_tokens, prefix, workers, gpt2_dir,
             source, val_split="tail"):
    if not (0.0 <= val_frac < 1.0):
        raise UserError(f"--val-frac must be in [0, 1), got {val_frac}")
    if val_split not in VAL_SPLITS:
        raise UserError(f"--val-split must be one of {', '.join(VAL_SPLITS)}, got {val_split!r}")
    tok = make_tokenizer(tokenizer, gpt2_dir)
    files = find_text_files(files)
    errors = getattr(tok, "read_errors", "replace")
    if val_files:
        val_files = find_text_files(val_files)
        train_docs = iter_docs(files, "train", errors)
        val_docs = iter_docs(val_files, "val", errors)
    else:
        # Each document's tail (or every 1/val_frac-th document) goes to val; documents are read
        # once and the val part kept in memory (val_frac of the data).
        held = []
        seen = [0]

        def train_docs_gen():
            for i, d in enumerate(iter_docs(files, "train + val", errors)):
                seen[0] = i + 1
                if val_split == "documents":
                    if is_val_document(i, val_frac):
                        held.append(d)
                    else:
                        yield d
                    continue
                head, tail = split_tail(d, val_frac)
                if tail.strip():
                    held.append(tail)
                if head.strip():
                    yield head

        def val_docs_gen():  # runs after the train split is consumed (train is written first)
            if val_split == "documents" and not held and val_frac > 0:
                warn(f"--val-split documents: {seen[0]} document(s) are fewer than the "
                     f"{round(1 / val_frac)} it takes to give one to val at --val-frac {val_frac}; "
                     f"use --val-split tail (the end of every document) or a larger --val-frac")
            yield from held

        train_docs = train_docs_gen()
        val_docs = val_docs_gen()
    return build(train_docs, val_docs, out, tok, shard_tokens, prefix, workers, gpt2_dir, source)


# --------------------------------------------------------------------------------------------
# The embedded default corpus
# --------------------------------------------------------------------------------------------

LICENSES_DIR = Path("/usr/share/common-licenses")
DEFAULT_VAL_FRAC = 0.1


def default_corpus():
    """[(name, text)] in a fixed order: the license texts of Debian's base-files package
    (regular files only: GPL -> GPL-3 style links are skipped), then every topic of Python's
    pydoc_data (the language reference text `help()` shows), sorted by topic name."""
    docs = []
    if LICENSES_DIR.is_dir():
        for p in sorted(LICENSES_DIR.iterdir()):
            if p.is_file() and not p.is_symlink():
                docs.append((str(p), p.read_text(encoding="utf-8", errors="replace")))
    else:
        warn(f"{LICENSES_DIR} not found (not a Debian system?): using Python's pydoc topics only")
    try:
        from pydoc_data.topics import topics
        for k in sorted(topics):
            docs.append((f"pydoc_data.topics[{k!r}]", topics[k]))
    except ImportError:
        warn("pydoc_data is not available in this Python: the default corpus is smaller")
    total = sum(len(t.encode("utf-8")) for _, t in docs)
    if total < 100_000:
        raise UserError(f"the default corpus has only {total:,} bytes (needs "
                        f"{LICENSES_DIR} and Python's pydoc_data); use `prepare_data.py text FILE`")
    return docs


def run_default(out, val_frac=DEFAULT_VAL_FRAC):
    docs = default_corpus()
    total = sum(len(t.encode("utf-8")) for _, t in docs)
    log(f"default corpus: {len(docs)} documents, {total:,} bytes "
        f"({sum(1 for n, _ in docs if n.startswith('/'))} license texts from {LICENSES_DIR}, "
        f"{sum(1 for n, _ in docs if n.startswith('pydoc'))} pydoc topics from Python "
        f"{sys.version.split()[0]})")
    heads, tails = [], []
    for _, text in docs:
        d = text.strip("\n")
        # The default shards back the CPU figures in docs/ (reproduction.md, optimizers.md,
        # performance.md): their split keeps the exact cut of the recipe they were measured with
        # (a space-aligned cut moves 7 of the 93 documents' tails and every figure's last digits).
        head, tail = split_tail(d, val_frac, at_space=False)
        if head.strip():
            heads.append(head)
        if tail.strip():
            tails.append(tail)
    return build(heads, tails, out, ByteTokenizer(), DEFAULT_SHARD_TOKENS, source="default corpus")


# --------------------------------------------------------------------------------------------
# Online recipes
# --------------------------------------------------------------------------------------------

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSTORIES_URLS = {
    "train": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
    "val": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
}
FINEWEB_ROWS_URL = ("https://datasets-server.huggingface.co/rows?dataset=HuggingFaceFW/fineweb-edu"
                    "&config=sample-10BT&split=train&offset={offset}&length={length}")
CACHE = REPO / "data" / "cache"


def offline_error(url, e):
    return UserError(f"cannot reach {url}: no network? download it yourself and run "
                     f"`prepare_data.py text FILE` ({e})")


def download(url, dest, timeout=15):
    """Downloads url to dest (kept as a cache; skipped when dest exists)."""
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        log(f"using cached {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0)
            got, last = 0, time.time()
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                if time.time() - last > 5:
                    last = time.time()
                    log(f"  {got / 1e6:,.1f} MB" + (f" of {size / 1e6:,.1f} MB" if size else ""))
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise offline_error(url, e)
    os.replace(part, dest)
    log(f"  saved {dest} ({dest.stat().st_size:,} bytes)")
    return dest


def fetch_fineweb(n_docs, dest, timeout=15):
    """N documents of FineWeb-Edu sample-10BT as one text file, <|endoftext|>-separated."""
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        log(f"using cached {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    got = 0
    with open(part, "w", encoding="utf-8") as f:
        while got < n_docs:
            length = min(100, n_docs - got)  # the rows API serves at most 100 rows per request
            url = FINEWEB_ROWS_URL.format(offset=got, length=length)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    rows = json.load(r)["rows"]
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                part.unlink(missing_ok=True)
                raise offline_error(url, e)
            if not rows:
                break
            for row in rows:
                f.write(row["row"]["text"].replace(EOT_TEXT, ""))
                f.write(f"\n{EOT_TEXT}\n")
            got += len(rows)
            if got % 2000 < 100:
                log(f"  {got:,} / {n_docs:,} documents")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_common(p, tokenizer_default, val_split_default="tail", val_given=False):
    p.add_argument("--tokenizer", choices=["byte", "gpt2"], default=tokenizer_default,
                   help=f"byte: vocab 256; gpt2: GPT-2 BPE, vocab 50257 (default {tokenizer_default})")
    ignored = " (unused: this recipe has its own val text)" if val_given else ""
    p.add_argument("--val-frac", type=float, default=0.05,
                   help="fraction that goes to val: of every document (its tail) or of the "
                        "documents, as --val-split says (default 0.05)" + ignored)
    p.add_argument("--val-split", choices=VAL_SPLITS, default=val_split_default,
                   help="tail: the end of every document goes to val, cut after a newline (or a "
                        "space); documents: every 1/val-frac-th document goes to val whole "
                        f"(default {val_split_default})" + ignored)
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}; the last shard of a "
                        f"split may hold up to 1.5x)")
    p.add_argument("--name", default="", help="file-name prefix: DIR/PREFIX_train_000000.bin")
    p.add_argument("--gpt2-dir", default=None,
                   help="folder with encoder.json + vocab.bpe for the pure-Python GPT-2 BPE "
                        "(default $MF_GPT2_DIR or ../shared/data/tokenizers/gpt2 next to the repo)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes for tokenization (useful with the pure-Python BPE)")


def prefix_of(name):
    return f"{name}_" if name and not name.endswith("_") else name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = ap.add_subparsers(dest="recipe", required=True, metavar="RECIPE")

    p = sub.add_parser("default", help="byte-level shards of the embedded default corpus")
    p.add_argument("--out", default=str(REPO / "data" / "default"),
                   help="output folder (default data/default in the repository)")
    p.add_argument("--val-frac", type=float, default=DEFAULT_VAL_FRAC,
                   help=f"tail fraction of every document that goes to val (default {DEFAULT_VAL_FRAC})")

    p = sub.add_parser("text", help="local text files or folders (*.txt, *.txt.xz) to shards")
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val", nargs="+", default=None,
                   help="files or folders used as the val split (then --val-frac and "
                        "--val-split are ignored)")
    add_common(p, "byte")

    for name, what in (("tinyshakespeare", "the 1.1 MB tiny Shakespeare text (char-rnn)"),
                       ("tinystories", "TinyStoriesV2-GPT4 train + valid (about 2.2 GB of text)"),
                       ("fineweb-edu", "documents of FineWeb-Edu sample-10BT")):
        p = sub.add_parser(name, help=f"download {what}, then tokenize")
        p.add_argument("--out", default=str(REPO / "data" / name.replace("-", "_")),
                       help=f"output folder (default data/{name.replace('-', '_')})")
        # FineWeb-Edu's documents are many and independent web pages: whole ones go to val.
        add_common(p, "gpt2", "documents" if name == "fineweb-edu" else "tail",
                   val_given=name == "tinystories")
        if name == "fineweb-edu":
            p.add_argument("--docs", type=int, default=20000, help="documents to fetch (default 20000)")

    a = ap.parse_args(argv)
    try:
        if a.recipe == "default":
            run_default(a.out, a.val_frac)
        elif a.recipe == "text":
            run_text(a.paths, a.val, a.out, a.tokenizer, a.val_frac, a.shard_tokens,
                     prefix_of(a.name), a.workers, a.gpt2_dir, "text: " + " ".join(a.paths),
                     a.val_split)
        elif a.recipe == "tinyshakespeare":
            f = download(TINYSHAKESPEARE_URL, CACHE / "tinyshakespeare" / "input.txt")
            run_text([f], None, a.out, a.tokenizer, a.val_frac, a.shard_tokens, prefix_of(a.name),
                     a.workers, a.gpt2_dir, TINYSHAKESPEARE_URL, a.val_split)
        elif a.recipe == "tinystories":
            tr = download(TINYSTORIES_URLS["train"], CACHE / "tinystories" / "train.txt")
            va = download(TINYSTORIES_URLS["val"], CACHE / "tinystories" / "valid.txt")
            run_text([tr], [va], a.out, a.tokenizer, a.val_frac, a.shard_tokens, prefix_of(a.name),
                     a.workers, a.gpt2_dir, "TinyStoriesV2-GPT4")
        elif a.recipe == "fineweb-edu":
            f = fetch_fineweb(a.docs, CACHE / "fineweb_edu" / f"sample10bt_{a.docs}.txt")
            run_text([f], None, a.out, a.tokenizer, a.val_frac, a.shard_tokens, prefix_of(a.name),
                     a.workers, a.gpt2_dir, "FineWeb-Edu sample-10BT", a.val_split)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output folder that cannot be written, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (shards are replaced only once the new ones are complete)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
