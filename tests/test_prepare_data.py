#!/usr/bin/env python3
"""Tests of scripts/prepare_data.py (standard library only; run directly or via test_data).

The GPT-2 checks need encoder.json / vocab.bpe and llama.cpp's test vectors from
../shared/data/tokenizers/gpt2 (next to the repository) or $MF_GPT2_DIR; they are skipped when
that folder is absent (users do not have it; CI does).
"""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import prepare_data as pd  # noqa: E402

GPT2_DIR = pd.default_gpt2_dir()
HAVE_GPT2 = (GPT2_DIR / "encoder.json").is_file() and (GPT2_DIR / "ggml-vocab-gpt-2.gguf.inp").is_file()


def load_vectors():
    inp = (GPT2_DIR / "ggml-vocab-gpt-2.gguf.inp").read_text(encoding="utf-8")
    out = (GPT2_DIR / "ggml-vocab-gpt-2.gguf.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]  # every input is followed by the marker
    ids = [[int(x) for x in line.split()] for line in out.split("\n")[: len(texts)]]
    return texts, ids


class ShardFormat(unittest.TestCase):
    def test_round_trip_u16_u32(self):
        with tempfile.TemporaryDirectory() as d:
            for width, toks in ((2, [0, 1, 65535, 7]), (4, [0, 65536, 2**32 - 1])):
                p = os.path.join(d, f"s{width}.bin")
                pd.write_shard(p, toks, width)
                self.assertEqual(os.path.getsize(p), 1024 + width * len(toks))
                magic, version, body = pd.read_shard(p)
                self.assertEqual((magic, version), (20240520, 1) if width == 2 else (20240801, 7))
                self.assertEqual(list(body), toks)

    def test_writer_keeps_last_shard_large(self):
        with tempfile.TemporaryDirectory() as d:
            w = pd.ShardWriter(d, "", "train", 100, 2)
            for i in range(23):
                w.add(list(range(i * 11, i * 11 + 11)))  # 253 tokens in odd pieces
            w.close()
            sizes = [n for _, n in w.files]
            self.assertEqual(sizes, [100, 100, 53])  # the last one >= shard_tokens / 2
            toks = []
            for p, _ in w.files:
                toks += list(pd.read_shard(p)[2])
            self.assertEqual(toks, list(range(253)))


class TextRecipe(unittest.TestCase):
    def test_split_tail(self):
        head, tail = pd.split_tail("a\nbb\nccc\ndddd\n", 0.5)
        self.assertEqual(head + tail, "a\nbb\nccc\ndddd\n")
        self.assertEqual(tail, "dddd\n")
        self.assertEqual(pd.split_tail("abc", 0.0), ("abc", ""))
        # No newline after the cut point: the cut moves to just after the next space, not into a
        # word ("gamma" would have become "ga" + "mma").
        self.assertEqual(pd.split_tail("alpha beta gamma delta", 0.5), ("alpha beta gamma ", "delta"))
        self.assertEqual(pd.split_tail("abcdefgh", 0.5), ("abcd", "efgh"))  # no space either
        # The default corpus keeps the exact cut its published figures were measured with.
        self.assertEqual(pd.split_tail("alpha beta gamma delta", 0.5, at_space=False),
                         ("alpha beta ", "gamma delta"))
        self.assertEqual(pd.split_tail("alpha beta gamma delta", 0.4, at_space=False),
                         ("alpha beta ga", "mma delta"))

    def test_val_documents_are_spread_evenly(self):
        picked = [i for i in range(100) if pd.is_val_document(i, 0.05)]
        self.assertEqual(picked, [19, 39, 59, 79, 99])
        self.assertEqual(sum(pd.is_val_document(i, 0.1) for i in range(1000)), 100)
        self.assertEqual(sum(pd.is_val_document(i, 0.07) for i in range(1000)), 70)
        self.assertFalse(any(pd.is_val_document(i, 0.0) for i in range(100)))

    def test_val_split_documents_cli(self):
        script = str(REPO / "scripts" / "prepare_data.py")
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "docs.txt"
            src.write_text("\n<|endoftext|>\n".join(f"doc {i:02d} text\nmore of doc {i:02d}"
                                                    for i in range(30)), encoding="utf-8")
            out = Path(d) / "out"
            r = subprocess.run([sys.executable, script, "text", str(src), "--out", str(out),
                                "--val-frac", "0.1", "--val-split", "documents"],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            tr = bytes(list(pd.read_shard(out / "train_000000.bin")[2])).decode()
            va = bytes(list(pd.read_shard(out / "val_000000.bin")[2])).decode()
            # Documents 9, 19 and 29 whole, each ending with the byte tokenizer's blank line.
            self.assertEqual(va, "".join(f"doc {i:02d} text\nmore of doc {i:02d}\n\n" for i in (9, 19, 29)))
            self.assertEqual(tr.count("more of doc"), 27)
            self.assertNotIn("doc 19", tr)
            # Too few documents for one to reach val: a warning that says what to use instead.
            r = subprocess.run([sys.executable, script, "text", str(src), "--out", str(out),
                                "--val-frac", "0.01", "--val-split", "documents"],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertIn("30 document(s) are fewer than the 100", r.stderr)
            self.assertIn("--val-split tail", r.stderr)
            self.assertFalse((out / "val_000000.bin").exists())
            r = subprocess.run([sys.executable, script, "text", str(src), "--out", str(out),
                                "--val-split", "random"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 2)
            self.assertIn("--val-split", r.stderr)

    def test_documents(self):
        self.assertEqual(pd.split_documents("one\n<|endoftext|>\ntwo<|endoftext|>\n\n"), ["one", "two"])

    def test_text_folder_xz_and_byte_tokens(self):
        import lzma
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "src"
            (src / "sub").mkdir(parents=True)
            (src / "a.txt").write_text("first file\n" * 20, encoding="utf-8")
            with lzma.open(src / "sub" / "b.txt.xz", "wt", encoding="utf-8") as f:
                f.write("second file, compressed\n" * 20)
            (src / "ignored.md").write_text("not text input", encoding="utf-8")
            out = Path(d) / "out"
            r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "text",
                                str(src), "--out", str(out), "--val-frac", "0.1", "--name", "mini"],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertEqual(sorted(p.name for p in out.iterdir()),
                             ["mini_shards.json", "mini_train_000000.bin", "mini_val_000000.bin"])
            # The record of what the shards are, found from a data.train glob as sample.py does.
            rec = pd.shards_record_of(str(out / "mini_train_*.bin"))
            self.assertEqual(rec, out / "mini_shards.json")
            self.assertEqual(pd.shards_record_of("d/pretrain_val_*.bin"), Path("d/pretrain_shards.json"))
            self.assertIsNone(pd.shards_record_of("d/tokens.bin"))
            import json
            r = json.loads(rec.read_text())
            self.assertEqual((r["tokenizer"], r["vocab_size"], r["eot"]), ("byte", 256, None))
            self.assertEqual([f["path"] for f in r["splits"]["train"]["files"]],
                             [str(out / "mini_train_000000.bin")])
            self.assertEqual(r["splits"]["val"]["files"][0]["sha256"],
                             pd.sha256_file(out / "mini_val_000000.bin"))
            tr = bytes(list(pd.read_shard(out / "mini_train_000000.bin")[2])).decode()
            va = bytes(list(pd.read_shard(out / "mini_val_000000.bin")[2])).decode()
            self.assertTrue(tr.startswith("first file\n"))
            self.assertIn("second file, compressed\n", tr)
            self.assertNotIn("not text input", tr + va)
            self.assertEqual(tr.count("first file") + va.count("first file"), 20)
            self.assertEqual(va.count("first file"), 2)

    def test_empty_splits(self):
        # --val-frac 0 writes no val shard (a 0-token shard is one training rejects) and says how to
        # train without one; an input with no text at all is an error; a stream is a valid input.
        script = str(REPO / "scripts" / "prepare_data.py")
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "a.txt"
            src.write_text("some text\n" * 30, encoding="utf-8")
            out = Path(d) / "out"
            r = subprocess.run([sys.executable, script, "text", str(src), "--out", str(out),
                                "--val-frac", "0"], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertEqual(sorted(p.name for p in out.iterdir()), ["shards.json", "train_000000.bin"])
            self.assertIn("no val shard was written", r.stdout + r.stderr)
            self.assertIn("--set data.val=", r.stdout + r.stderr)
            r = subprocess.run([sys.executable, script, "text", "/dev/null", "--out", str(out)],
                               capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("the train split is empty", r.stderr)
            self.assertNotIn("does not exist", r.stderr)
            r = subprocess.run([sys.executable, script, "text", "/dev/stdin", "--out", str(out),
                                "--val-frac", "0.2"], input="from a pipe\n" * 40,
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertEqual(sorted(p.name for p in out.iterdir()),
                             ["shards.json", "train_000000.bin", "val_000000.bin"])
            r = subprocess.run([sys.executable, script, "text", str(Path(d) / "missing.txt"),
                                "--out", str(out)], capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("missing.txt' does not exist", r.stderr)

    def test_offline_message(self):
        try:
            pd.download("http://127.0.0.1:9/nothing.txt", Path(tempfile.gettempdir()) / "mf_never.txt",
                        timeout=2)
        except pd.UserError as e:
            self.assertIn("cannot reach http://127.0.0.1:9/nothing.txt", str(e))
            self.assertIn("prepare_data.py text FILE", str(e))
        else:
            self.fail("download from a closed port succeeded")

    def run_script(self, *args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py")] +
                              [str(a) for a in args], capture_output=True, text=True)

    def test_folders_skip_archives_and_binaries_are_refused(self):
        import lzma
        import tarfile
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "src"
            src.mkdir()
            (src / "book.txt").write_text("a real book\n" * 30, encoding="utf-8")
            with tarfile.open(src / "books.tar.xz", "w:xz") as t:  # an archive in the folder
                t.add(src / "book.txt", arcname="inner.txt")
            (src / "prog").write_bytes(b"\x7fELF\x02\x01\x00\x00binary")
            out = Path(d) / "out"
            r = self.run_script("text", src, "--out", out, "--val-frac", "0")
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertIn("skipped 2 file(s) that are not *.txt or *.txt.xz", r.stdout + r.stderr)
            toks = bytes(list(pd.read_shard(out / "train_000000.bin")[2]))
            self.assertEqual(toks, ("a real book\n" * 30 + "\n").encode())
            # Named explicitly, binary content is refused by what it holds.
            for f in (src / "books.tar.xz", src / "prog"):
                r = self.run_script("text", f, "--out", Path(d) / "out2")
                self.assertNotEqual(r.returncode, 0)
                self.assertIn("holds a NUL byte", r.stderr)
                self.assertNotIn("Traceback", r.stderr)
            # A compressed text named *.xz is still read when named.
            with lzma.open(src / "notes.xz", "wt", encoding="utf-8") as f:
                f.write("compressed notes\n" * 10)
            r = self.run_script("text", src / "notes.xz", "--out", Path(d) / "out3", "--val-frac", "0")
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)

    def test_invalid_utf8_is_counted_and_bytes_kept_by_the_byte_tokenizer(self):
        with tempfile.TemporaryDirectory() as d:
            raw = b"Hello \xff\xfe world caf\xc3 ok\n" * 10
            (Path(d) / "bad.txt").write_bytes(raw)
            out = Path(d) / "out"
            r = self.run_script("text", Path(d) / "bad.txt", "--out", out, "--val-frac", "0")
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertIn("30 byte(s) that are not UTF-8 (the first at byte 6), kept as they are",
                          r.stdout + r.stderr)
            toks = bytes(list(pd.read_shard(out / "train_000000.bin")[2]))
            self.assertEqual(toks, raw + b"\n")  # the very bytes, and the document's blank line
            # A reader that replaces says how many sequences it replaced.
            self.assertEqual(pd.read_text(Path(d) / "bad.txt").count("\ufffd"), 30)

    def test_a_failed_run_keeps_the_old_shards(self):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "a.txt").write_text("good text\n" * 40, encoding="utf-8")
            (Path(d) / "empty.txt").write_text("", encoding="utf-8")
            out = Path(d) / "out"
            r = self.run_script("text", Path(d) / "a.txt", "--out", out)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            before = {p.name: p.read_bytes() for p in out.iterdir()}
            self.assertEqual(sorted(before), ["shards.json", "train_000000.bin", "val_000000.bin"])
            r = self.run_script("text", Path(d) / "empty.txt", "--out", out)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("the train split is empty", r.stderr)
            self.assertNotIn("removed", r.stdout + r.stderr)
            self.assertEqual({p.name: p.read_bytes() for p in out.iterdir()}, before)  # no staging left
            # A second good run replaces them (an old extra shard included).
            (out / "train_000001.bin").write_bytes(before["train_000000.bin"])
            (Path(d) / "b.txt").write_text("other text\n" * 40, encoding="utf-8")
            r = self.run_script("text", Path(d) / "b.txt", "--out", out)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            self.assertIn("removed 3 old shard(s)", r.stdout + r.stderr)
            self.assertEqual(sorted(p.name for p in out.iterdir()),
                             ["shards.json", "train_000000.bin", "val_000000.bin"])
            self.assertIn(b"other text", bytes(list(pd.read_shard(out / "train_000000.bin")[2])))

    def test_unwritable_output_and_bad_tokenizer_files_are_errors_not_tracebacks(self):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "a.txt").write_text("text\n" * 40, encoding="utf-8")
            (Path(d) / "file").write_text("", encoding="utf-8")
            r = self.run_script("text", Path(d) / "a.txt", "--out", Path(d) / "file" / "out")
            self.assertEqual(r.returncode, 1)
            self.assertIn("error: ", r.stderr)
            self.assertIn("file/out", r.stderr)
            self.assertNotIn("Traceback", r.stderr)
            tokdir = Path(d) / "tok"
            tokdir.mkdir()
            (tokdir / "encoder.json").write_text('{"h": 0', encoding="utf-8")  # cut short
            (tokdir / "vocab.bpe").write_text("#version: 0.2\nh i\n", encoding="utf-8")
            with self.assertRaisesRegex(pd.UserError, "not GPT-2's tokenizer files"):
                pd.Gpt2BpeTokenizer(tokdir)
            (tokdir / "encoder.json").write_text('{"h": 0, "<|endoftext|>": 1}', encoding="utf-8")
            with self.assertRaisesRegex(pd.UserError, "do not belong together"):
                pd.Gpt2BpeTokenizer(tokdir)

    def test_default_corpus_is_large_and_deterministic(self):
        docs = pd.default_corpus()
        total = sum(len(t.encode("utf-8")) for _, t in docs)
        self.assertGreater(total, 300_000)
        self.assertEqual(docs, pd.default_corpus())


@unittest.skipUnless(HAVE_GPT2, f"GPT-2 tokenizer files not found in {GPT2_DIR}")
class Gpt2Bpe(unittest.TestCase):
    def check(self, tok):
        texts, ids = load_vectors()
        self.assertEqual(len(texts), len(ids))
        self.assertGreater(len(texts), 40)
        for text, want in zip(texts, ids):
            self.assertEqual(tok.encode(text), want, f"input {text!r}")

    def test_vectors_pure_python(self):
        tok = pd.Gpt2BpeTokenizer(GPT2_DIR)
        self.assertEqual((tok.vocab_size, tok.eot), (50257, 50256))
        self.check(tok)

    def test_decode_round_trip(self):
        # scripts/sample.py prints tokens through decode_bytes: every vector text comes back.
        tok = pd.Gpt2BpeTokenizer(GPT2_DIR)
        texts, ids = load_vectors()
        for text, want in zip(texts, ids):
            self.assertEqual(tok.decode_bytes(want), text.encode("utf-8"), f"input {text!r}")
        with self.assertRaises(pd.UserError):
            tok.decode_bytes([50257])

    def test_vectors_re_fallback(self):
        # The `re` approximation agrees on every vector (it differs only for non-decimal numerals
        # glued to letters).
        self.check(pd.Gpt2BpeTokenizer(GPT2_DIR, force_re=True))

    def test_text_recipe_gpt2(self):
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "t.txt"
            src.write_text("Hello world\n<|endoftext|>\n Hello World!\n", encoding="utf-8")
            out = Path(d) / "out"
            r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "text",
                                str(src), "--out", str(out), "--val-frac", "0",
                                "--tokenizer", "gpt2", "--gpt2-dir", str(GPT2_DIR)],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
            magic, _, toks = pd.read_shard(out / "train_000000.bin")
            self.assertEqual(magic, 20240520)
            # <|endoftext|> starts each document; "Hello world" = 15496 995, " Hello World!" =
            # 18435 2159 0 (llama.cpp's vectors).
            self.assertEqual(list(toks), [50256, 15496, 995, 50256, 18435, 2159, 0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
