// Token shards, the distributed loader contract, `muonforge inspect`, and prepare_data.py.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "data/loader.h"
#include "data/shard.h"
#include "test_util.h"

namespace fs = std::filesystem;
using mf::DataLoader;
using mf::DataLoaderOptions;
using mf::LoaderState;
using mf::TokenShard;

namespace {

using mf::test::TempDir;
using mf::test::run_capture;

std::vector<uint32_t> random_tokens(int64_t n, uint32_t vocab, uint64_t seed) {
  mf::Rng rng(seed);
  std::vector<uint32_t> v(static_cast<size_t>(n));
  for (auto& t : v) t = uint32_t(rng.below(vocab));
  return v;
}


// Raw file writer for malformed inputs: header ints then body bytes.
void write_raw(const std::string& path, std::array<int32_t, 3> head, size_t body_bytes) {
  std::vector<int32_t> h(256, 0);
  h[0] = head[0];
  h[1] = head[1];
  h[2] = head[2];
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(h.data()), 1024);
  std::vector<char> body(body_bytes, 7);
  f.write(body.data(), std::streamsize(body.size()));
}

using mf::test::error_of;

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// ---- the independent expectation of the loader contract -------------------------------------
// The global list of runs (shard, first token) of one pass in exact mode; rank r at micro-step k
// reads element (k*W + r) mod size.
struct Run {
  int shard;
  int64_t offset;
  bool operator<(const Run& o) const {
    return shard != o.shard ? shard < o.shard : offset < o.offset;
  }
  bool operator==(const Run& o) const { return shard == o.shard && offset == o.offset; }
};

std::vector<Run> exact_run_list(const std::vector<std::vector<uint32_t>>& shards, int64_t BT,
                                int W) {
  std::vector<Run> list;
  for (int s = 0; s < int(shards.size()); ++s) {
    const int64_t N = int64_t(shards[size_t(s)].size());
    int64_t runs = 0;
    while (runs * BT + BT + 1 <= N) ++runs;  // counted, not divided: independent of the loader
    const int64_t used = runs - runs % W;
    for (int64_t j = 0; j < used; ++j) list.push_back({s, j * BT});
  }
  return list;
}

void expect_batch(const std::vector<std::vector<uint32_t>>& shards, const Run& run, int64_t BT,
                  const std::vector<int32_t>& in, const std::vector<int32_t>& tg) {
  const auto& tok = shards[size_t(run.shard)];
  for (int64_t i = 0; i < BT; ++i) {
    if (in[size_t(i)] != int32_t(tok[size_t(run.offset + i)]) ||
        tg[size_t(i)] != int32_t(tok[size_t(run.offset + i + 1)])) {
      FAIL("batch mismatch at shard " << run.shard << " offset " << run.offset << " position "
                                      << i);
    }
  }
}

// Which run a batch came from, found by content (the tokens are random, so runs are unique).
Run locate(const std::vector<std::vector<uint32_t>>& shards, int64_t BT,
           const std::vector<int32_t>& in) {
  for (int s = 0; s < int(shards.size()); ++s)
    for (int64_t off = 0; off + BT + 1 <= int64_t(shards[size_t(s)].size()); off += BT) {
      bool same = true;
      for (int64_t i = 0; i < BT && same; ++i)
        same = in[size_t(i)] == int32_t(shards[size_t(s)][size_t(off + i)]);
      if (same) return {s, off};
    }
  return {-1, -1};
}

// Three shards of awkward lengths in a temp dir; returns their tokens.
struct ShardSet {
  TempDir dir;
  std::vector<std::vector<uint32_t>> tokens;
  std::string glob;
  ShardSet(const std::vector<int64_t>& lengths, uint32_t vocab, int token_bytes, uint64_t seed) {
    for (size_t i = 0; i < lengths.size(); ++i) {
      tokens.push_back(random_tokens(lengths[i], vocab, seed + i));
      char name[64];
      std::snprintf(name, sizeof(name), "train_%06zu.bin", i);
      mf::write_shard(dir / name, tokens.back(), token_bytes);
    }
    glob = dir / "train_*.bin";
  }
};

DataLoaderOptions opts(int64_t B, int64_t T, int rank, int W, bool shuffle, uint64_t seed = 7,
                       int64_t vocab = 0) {
  DataLoaderOptions o;
  o.B = B;
  o.T = T;
  o.rank = rank;
  o.world_size = W;
  o.shuffle = shuffle;
  o.seed = seed;
  o.vocab_size = vocab;
  o.label = "data.train";
  return o;
}

bool have_python() { return std::system("python3 --version > /dev/null 2>&1") == 0; }


const std::string kRepo = fs::path(MF_TEST_DIR).parent_path().string();

}  // namespace

// ============================================================================================
TEST_CASE("shard round trip, uint16 (v1) and uint32 (v7)", "[data][shard]") {
  TempDir dir;
  for (int width : {2, 4}) {
    const uint32_t vocab = width == 2 ? 65536u : 3000000000u;
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(7), int64_t(4099)}) {
      auto tok = random_tokens(n, vocab, 11 + uint64_t(n));
      if (n > 2) tok[1] = vocab - 1;  // the largest id that fits
      const std::string p = dir / ("s" + std::to_string(width) + "_" + std::to_string(n) + ".bin");
      mf::write_shard(p, tok, width);
      REQUIRE(fs::file_size(p) == 1024 + uint64_t(n) * uint64_t(width));

      mf::ShardInfo info = mf::read_shard_info(p);
      CHECK(info.magic == (width == 2 ? 20240520 : 20240801));
      CHECK(info.version == (width == 2 ? 1 : 7));
      CHECK(info.token_bytes == width);
      CHECK(info.count == n);

      TokenShard sh(p);
      REQUIRE(sh.size() == n);
      CHECK(sh.to_vector() == tok);
      for (int64_t i = 0; i < n; ++i) REQUIRE(sh[i] == tok[size_t(i)]);
      // No temp file left behind.
      int files = 0;
      for (auto& e : fs::directory_iterator(dir.path))
        files += e.path().string().find(".tmp.") != std::string::npos;
      CHECK(files == 0);
    }
  }
  // The header layout itself, byte by byte (little-endian int32s, zeros after [2]).
  const std::string p = dir / "layout.bin";
  mf::write_shard(p, std::vector<uint32_t>{1, 2, 65535}, 2);
  std::ifstream f(p, std::ios::binary);
  std::vector<unsigned char> b((std::istreambuf_iterator<char>(f)), {});
  REQUIRE(b.size() == 1030);
  auto i32 = [&](size_t k) {
    return int32_t(b[4 * k] | (b[4 * k + 1] << 8) | (b[4 * k + 2] << 16) | (b[4 * k + 3] << 24));
  };
  CHECK(i32(0) == 20240520);
  CHECK(i32(1) == 1);
  CHECK(i32(2) == 3);
  for (size_t k = 3; k < 256; ++k) REQUIRE(i32(k) == 0);
  CHECK(b[1024] == 1);
  CHECK(b[1028] == 0xff);
  CHECK(b[1029] == 0xff);

  // A uint16 shard cannot hold 65536; copy() widens to int32.
  CHECK(contains(error_of([&] { mf::write_shard(dir / "big.bin", {1, 65536}, 2); }),
                 "does not fit uint16"));
  TokenShard sh(p);
  std::vector<int32_t> out(2);
  sh.copy(1, 2, out.data());
  CHECK(out == std::vector<int32_t>{2, 65535});
  CHECK(contains(error_of([&] { sh.copy(2, 2, out.data()); }), "outside"));
}

TEST_CASE("malformed shards give clear errors naming the file", "[data][shard]") {
  TempDir dir;
  auto err_open = [](const std::string& p, int64_t vocab = 0) {
    return error_of([&] { TokenShard s(p, vocab); });
  };

  const std::string trunc = dir / "truncated.bin";
  write_raw(trunc, {20240520, 1, 100}, 50 * 2);
  std::string e = err_open(trunc);
  CHECK(contains(e, trunc));
  CHECK(contains(e, "truncated"));
  CHECK(contains(e, "100 tokens"));

  const std::string trailing = dir / "trailing.bin";
  write_raw(trailing, {20240801, 7, 10}, 12 * 4);
  e = err_open(trailing);
  CHECK(contains(e, trailing));
  CHECK(contains(e, "trailing"));

  const std::string magic = dir / "magic.bin";
  write_raw(magic, {12345, 1, 0}, 0);
  e = err_open(magic);
  CHECK(contains(e, magic));
  CHECK(contains(e, "bad magic number 12345"));

  const std::string version = dir / "version.bin";
  write_raw(version, {20240520, 7, 0}, 0);
  e = err_open(version);
  CHECK(contains(e, version));
  CHECK(contains(e, "version 7"));
  write_raw(version, {20240801, 3, 0}, 0);
  CHECK(contains(err_open(version), "version 3"));

  const std::string odd = dir / "odd.bin";
  write_raw(odd, {20240520, 1, 10}, 21);
  e = err_open(odd);
  CHECK(contains(e, odd));
  CHECK(contains(e, "odd byte count"));

  const std::string negative = dir / "negative.bin";
  write_raw(negative, {20240520, 1, -4}, 0);
  CHECK(contains(err_open(negative), "negative token count"));

  const std::string empty = dir / "empty.bin";
  std::ofstream(empty).close();
  e = err_open(empty);
  CHECK(contains(e, empty));
  CHECK(contains(e, "empty file"));

  const std::string shorthdr = dir / "short.bin";
  std::ofstream(shorthdr) << "hello";
  CHECK(contains(err_open(shorthdr), "shorter than the 1024-byte header"));

  const std::string missing = dir / "missing.bin";
  e = err_open(missing);
  CHECK(contains(e, missing));
  CHECK(contains(e, "no such file"));
  CHECK(contains(error_of([&] { mf::read_shard_info(missing); }), "no such file"));

  // Token id >= vocab_size: names file, position and id.
  const std::string vocab = dir / "vocab.bin";
  auto tok = random_tokens(50, 256, 5);
  tok[37] = 300;
  mf::write_shard(vocab, tok, 2);
  e = err_open(vocab, 256);
  CHECK(contains(e, vocab));
  CHECK(contains(e, "token id 300 at position 37 is >= vocab_size 256"));
  CHECK(contains(e, "this shard's largest id is 300: set model.vocab_size to at least 301)"));
  CHECK_NOTHROW(TokenShard(vocab, 301));
  CHECK_NOTHROW(TokenShard{vocab});  // no vocab given: no check

  // The loader reports the same errors, and its own.
  CHECK(contains(error_of([&] { DataLoader(vocab, opts(1, 4, 0, 1, false, 0, 256)); }),
                 "token id 300 at position 37"));
  CHECK(contains(error_of([&] { DataLoader(trunc, opts(1, 4, 0, 1, false)); }), "truncated"));
}

TEST_CASE("glob expansion: sorted matches, clear error when nothing matches", "[data][shard]") {
  TempDir dir;
  for (const char* n : {"train_000002.bin", "train_000000.bin", "train_000010.bin", "val_000000.bin"})
    mf::write_shard(dir / n, std::vector<uint32_t>{1, 2, 3}, 2);
  fs::create_directories(dir.path / "train_dir.bin");  // folders never match
  auto m = mf::expand_glob(dir / "train_*.bin", "data.train");
  REQUIRE(m.size() == 3);
  CHECK(m[0] == dir / "train_000000.bin");
  CHECK(m[1] == dir / "train_000002.bin");
  CHECK(m[2] == dir / "train_000010.bin");
  CHECK(mf::expand_glob(dir / "val_000000.bin", "data.val").size() == 1);

  const std::string pat = dir / "nothing_*.bin";
  std::string e = error_of([&] { mf::expand_glob(pat, "data.train"); });
  CHECK(contains(e, "data.train: glob '" + pat + "' matched no files"));
  CHECK_FALSE(contains(e, "working directory"));  // an absolute path
  // A relative one is read from the working directory: said, as the cause is often a `cd`.
  e = error_of([&] { mf::expand_glob("no/such/dir/x_*.bin", "data.train"); });
  CHECK(contains(e, "matched no files (a relative path: read from the working directory, " +
                        fs::current_path().string() + ")"));
  e = error_of([&] { mf::expand_glob(dir / "absent.bin", "data.val"); });
  CHECK(contains(e, "data.val: file '" + (dir / "absent.bin") + "' does not exist"));
  e = error_of([&] { DataLoader(pat, opts(1, 1, 0, 1, false)); });
  CHECK(contains(e, "data.train: glob '" + pat + "' matched no files"));

  // Several patterns: concatenated, duplicates dropped.
  auto both = mf::expand_globs({dir / "val_*.bin", dir / "train_00000[02].bin", dir / "val_000000.bin"}, "x");
  REQUIRE(both.size() == 3);
  CHECK(both[0] == dir / "val_000000.bin");
  CHECK(both[2] == dir / "train_000002.bin");
}

TEST_CASE("loader rejects shards shorter than B*T+1 and other bad settings", "[data][loader]") {
  ShardSet set({200, 40}, 1000, 2, 3);
  // B*T = 40 needs 41 tokens; shard 1 has 40.
  std::string e = error_of([&] { DataLoader(set.glob, opts(4, 10, 0, 1, false)); });
  CHECK(contains(e, set.dir / "train_000001.bin"));
  CHECK(contains(e, "fewer than B*T+1"));
  CHECK(contains(e, "41"));
  // 39 = B*T fits shard 1 once; 2 ranks need 2 runs.
  e = error_of([&] { DataLoader(set.glob, opts(3, 13, 1, 2, false)); });
  CHECK(contains(e, "train_000001.bin"));
  CHECK(contains(e, "2 ranks need one run each"));
  CHECK(contains(error_of([&] { DataLoader(set.glob, opts(1, 4, 2, 2, false)); }), "rank 2"));
  CHECK(contains(error_of([&] { DataLoader(set.glob, opts(0, 4, 0, 1, false)); }), "B must be"));
  CHECK_NOTHROW(DataLoader(set.glob, opts(3, 13, 0, 1, false)));
}

TEST_CASE("exact mode follows the contract for 1 and 3 ranks, across shards and wrap",
          "[data][loader]") {
  // B*T = 2*5 = 10. Lengths chosen so shards have runs left over for W=3 and tokens left over.
  //   shard 0: 95 tokens -> 9 runs (3 groups of 3), shard 1: 41 -> 4 runs (1 group, 1 skipped),
  //   shard 2: 73 -> 7 runs (2 groups, 1 skipped).
  ShardSet set({95, 41, 73}, 50000, 2, 100);
  const int64_t B = 2, T = 5, BT = B * T;
  std::vector<int32_t> in(BT), tg(BT);
  for (int W : {1, 3}) {
    const auto list = exact_run_list(set.tokens, BT, W);
    REQUIRE(list.size() == size_t(W == 1 ? 9 + 4 + 7 : 9 + 3 + 6));
    const int64_t steps = 3 * int64_t(list.size()) / W + 2;  // three passes and a bit
    for (int r = 0; r < W; ++r) {
      DataLoader dl(set.glob, opts(B, T, r, W, false));
      CHECK(dl.num_shards() == 3);
      CHECK(dl.steps_per_epoch() == int64_t(list.size()) / W);
      for (int64_t k = 0; k < steps; ++k) {
        const Run want = list[size_t((k * W + r) % int64_t(list.size()))];
        const mf::RunRef ref = dl.peek();
        REQUIRE(ref.shard == want.shard);
        REQUIRE(ref.offset == want.offset);
        dl.next(in.data(), tg.data());
        expect_batch(set.tokens, want, BT, in, tg);
      }
      CHECK(dl.state().epoch == 3);
    }
  }
}

TEST_CASE("exact mode: the ranks together read what one process reads", "[data][loader]") {
  // Run counts divisible by 3, so a single W=1 process uses exactly the same runs.
  ShardSet set({61, 31, 91}, 4096, 4, 200);  // B*T = 10: 6, 3, 9 runs
  const int64_t BT = 10;
  const int W = 3;
  DataLoader single(set.glob, opts(2, 5, 0, 1, false));
  std::vector<DataLoader> ranks;
  for (int r = 0; r < W; ++r) ranks.emplace_back(set.glob, opts(2, 5, r, W, false));
  std::vector<int32_t> in(BT), tg(BT), in1(BT), tg1(BT);
  std::set<Run> seen;
  const int64_t steps = ranks[0].steps_per_epoch();
  REQUIRE(steps == 6);
  for (int64_t k = 0; k < 2 * steps; ++k) {
    for (int r = 0; r < W; ++r) {
      ranks[size_t(r)].next(in.data(), tg.data());
      single.next(in1.data(), tg1.data());
      REQUIRE(in == in1);
      REQUIRE(tg == tg1);
      if (k < steps) {
        Run run = locate(set.tokens, BT, in);
        REQUIRE(run.shard >= 0);
        CHECK(seen.insert(run).second);  // no run twice within a pass
      }
    }
  }
  CHECK(seen.size() == 18);
}

TEST_CASE("shuffle mode: each pass is a permutation of the runs, disjoint across ranks",
          "[data][loader]") {
  ShardSet set({95, 41, 73, 130}, 50000, 2, 300);  // B*T = 10: 9, 4, 7, 12 runs
  const int64_t BT = 10;
  std::vector<int32_t> in(BT), tg(BT);
  for (int W : {1, 3}) {
    const auto list = exact_run_list(set.tokens, BT, W);  // for W=1: every run
    std::vector<DataLoader> ranks;
    for (int r = 0; r < W; ++r) ranks.emplace_back(set.glob, opts(2, 5, r, W, true, 1234));
    const int64_t steps = ranks[0].steps_per_epoch();
    CHECK(steps * W == int64_t(list.size()));
    std::vector<std::vector<Run>> passes;
    for (int epoch = 0; epoch < 3; ++epoch) {
      std::vector<Run> order;
      std::map<int, int> per_shard;
      for (int64_t k = 0; k < steps; ++k)
        for (int r = 0; r < W; ++r) {
          ranks[size_t(r)].next(in.data(), tg.data());
          Run run = locate(set.tokens, BT, in);
          REQUIRE(run.shard >= 0);
          expect_batch(set.tokens, run, BT, in, tg);
          order.push_back(run);
          ++per_shard[run.shard];
        }
      std::vector<Run> sorted = order;
      std::sort(sorted.begin(), sorted.end());
      CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());  // no repeats
      if (W == 1) CHECK(sorted == list);  // every run exactly once
      for (int s = 0; s < 4; ++s) CHECK(per_shard[s] == int(ranks[0].groups_in_shard(s)) * W);
      CHECK(order != list);  // not the exact order
      for (auto& prev : passes) CHECK(order != prev);  // a new order every epoch
      passes.push_back(order);
      for (auto& d : ranks) CHECK(d.state().epoch == uint64_t(epoch + 1));
    }
  }
  // Same seed, same order; another seed, another order.
  DataLoader a(set.glob, opts(2, 5, 0, 1, true, 99)), b(set.glob, opts(2, 5, 0, 1, true, 99)),
      c(set.glob, opts(2, 5, 0, 1, true, 100));
  std::vector<int32_t> ia(BT), ib(BT), ic(BT);
  bool differs = false;
  for (int k = 0; k < 20; ++k) {
    a.next(ia.data(), tg.data());
    b.next(ib.data(), tg.data());
    c.next(ic.data(), tg.data());
    REQUIRE(ia == ib);
    differs |= ia != ic;
  }
  CHECK(differs);
}

TEST_CASE("state save/restore continues identically in both modes", "[data][loader]") {
  ShardSet set({95, 41, 73}, 50000, 4, 400);
  const int64_t BT = 10;
  for (bool shuffle : {false, true}) {
    for (int W : {1, 3}) {
      for (int64_t split : {int64_t(0), int64_t(1), int64_t(4), int64_t(11)}) {
        for (int r = 0; r < W; ++r) {
          DataLoader a(set.glob, opts(2, 5, r, W, shuffle, 77));
          std::vector<int32_t> in(BT), tg(BT), in2(BT), tg2(BT);
          for (int64_t k = 0; k < split; ++k) a.next(in.data(), tg.data());
          // Through JSON, as a checkpoint would store it.
          nlohmann::json j = a.state();
          const std::string text = j.dump();
          LoaderState s = nlohmann::json::parse(text).get<LoaderState>();
          CHECK(s == a.state());
          CHECK(s.step == uint64_t(split));

          DataLoader b(set.glob, opts(2, 5, r, W, shuffle, 77));
          b.next(in2.data(), tg2.data());  // move it somewhere else first
          b.restore(s);
          CHECK(b.state() == a.state());
          for (int64_t k = 0; k < 25; ++k) {  // past shard ends and the epoch wrap
            a.next(in.data(), tg.data());
            b.next(in2.data(), tg2.data());
            REQUIRE(in == in2);
            REQUIRE(tg == tg2);
          }
        }
      }
    }
  }
  // Restoring under other settings is refused, naming the field.
  DataLoader a(set.glob, opts(2, 5, 0, 1, true, 77));
  LoaderState s = a.state();
  CHECK(contains(error_of([&] { DataLoader(set.glob, opts(1, 10, 0, 1, true, 77)).restore(s); }),
                 "saved with B = 2"));
  CHECK(contains(error_of([&] { DataLoader(set.glob, opts(2, 5, 0, 1, true, 78)).restore(s); }),
                 "seed"));
  CHECK(contains(error_of([&] { DataLoader(set.glob, opts(2, 5, 0, 1, false, 77)).restore(s); }),
                 "shuffle"));
  LoaderState bad = s;
  bad.group = 1000;
  CHECK(contains(error_of([&] { a.restore(bad); }), "saved group 1000"));
  CHECK(contains(error_of([] { nlohmann::json::object({{"epoch", 1}}).get<LoaderState>(); }),
                 "missing key"));
}

TEST_CASE("restore() on another world size continues the global order of runs", "[data][loader]") {
  // Runs of 10 tokens: the shards have 9, 4 and 7. Inside a shard, W ranks read runs g*W + r of
  // the order a world-size-1 loader reads. After W_old ranks used u = group*W_old runs of the
  // current shard, W_new ranks continue at group u / W_new (u % W_new runs are read again), or
  // at the next shard when the rest is too short for W_new ranks.
  ShardSet set({95, 41, 73}, 50000, 4, 400);
  const int64_t BT = 10;
  const int64_t runs_of[3] = {9, 4, 7};
  int checked = 0, rereads = 0, moved_on = 0;
  for (bool shuffle : {false, true})
    for (int w_old : {1, 2, 3})
      for (int w_new : {1, 2, 3})
        for (int groups = 0; groups <= 12; ++groups) {
          if (w_old == w_new) continue;
          DataLoader old_rank0(set.glob, opts(2, 5, 0, w_old, shuffle, 77));
          std::vector<int32_t> in(BT), tg(BT), want(BT), wt(BT);
          for (int k = 0; k < groups; ++k) old_rank0.next(in.data(), tg.data());
          const LoaderState s = old_rank0.state();
          if (s.epoch > 0) continue;  // past the first epoch: the reference below walks epoch 0
          const int shard = old_rank0.peek().shard;
          const int64_t used = int64_t(s.group) * w_old;
          int64_t group = used / w_new;
          uint64_t pos = s.shard_pos;
          if (group >= runs_of[shard] / w_new) {
            group = 0;
            ++pos;
            ++moved_on;
          }
          if (pos >= 3) continue;  // the epoch wraps: not what this test is about
          for (int r = 0; r < w_new; ++r) {
            INFO("W " << w_old << " -> " << w_new << " after " << groups << " groups, shuffle "
                      << shuffle << ", rank " << r);
            DataLoader now(set.glob, opts(2, 5, r, w_new, shuffle, 77));
            const int64_t rr = now.restore(s);
            CHECK(rr == (pos == s.shard_pos ? used % w_new : 0));
            rereads += rr > 0;
            // The world-size-1 loader at the same shard of the same order, run group*W_new + r.
            DataLoader ref(set.glob, opts(2, 5, 0, 1, shuffle, 77));
            while (ref.state().shard_pos < pos) ref.next(want.data(), wt.data());
            for (int64_t k = 0; k < group * w_new + r; ++k) ref.next(want.data(), wt.data());
            CHECK(now.peek().shard == ref.peek().shard);
            ref.next(want.data(), wt.data());
            now.next(in.data(), tg.data());
            CHECK(in == want);
            CHECK(tg == wt);
            ++checked;
          }
        }
  CHECK(checked > 100);
  CHECK(rereads > 0);   // some cases re-read runs
  CHECK(moved_on > 0);  // and some move on to the next shard
}

TEST_CASE("reset() starts over (evaluation loaders)", "[data][loader]") {
  ShardSet set({95, 41}, 300, 2, 500);
  for (bool shuffle : {false, true}) {
    DataLoader dl(set.glob, opts(2, 5, 0, 1, shuffle, 5, 300));
    std::vector<int32_t> first(10), in(10), tg(10), t0(10);
    dl.next(first.data(), t0.data());
    for (int k = 0; k < 17; ++k) dl.next(in.data(), tg.data());
    dl.reset();
    CHECK(dl.state().step == 0);
    CHECK(dl.state().epoch == 0);
    dl.next(in.data(), tg.data());
    CHECK(in == first);
    CHECK(tg == t0);
  }
}

TEST_CASE("muonforge inspect prints header and statistics", "[data][cli]") {
  TempDir dir;
  const std::string p = dir / "bytes.bin";
  std::string text = "hello world\naaa";
  std::vector<uint32_t> tok(text.begin(), text.end());
  mf::write_shard(p, tok, 2);
  int rc = 0;
  std::string out = run_capture(std::string(MF_BINARY) + " inspect " + p + " --top 3", &rc);
  INFO(out);
  CHECK(rc == 0);
  CHECK(contains(out, "magic:       20240520"));
  CHECK(contains(out, "version:     1"));
  CHECK(contains(out, "tokens:      15"));
  CHECK(contains(out, "file size:   1054 bytes"));
  CHECK(contains(out, "min id:      10"));
  CHECK(contains(out, "max id:      119"));
  CHECK(contains(out, "distinct:    10 ids"));
  CHECK(contains(out, "top 3 ids:"));
  // 'a' and 'l' 3 times each (ties by id), then 'o' twice.
  const size_t pa = out.find(" 97            3   20.00%  'a'");
  const size_t pl = out.find(" 108            3   20.00%  'l'");
  const size_t po = out.find(" 111            2   13.33%  'o'");
  CHECK(pa != std::string::npos);
  CHECK(pl != std::string::npos);
  CHECK(po != std::string::npos);
  CHECK((pa < pl && pl < po));
  CHECK(contains(out, "hello world\\n"));

  const std::string big = dir / "wide.bin";
  mf::write_shard(big, std::vector<uint32_t>{70000, 5, 70000, 123456}, 4);
  out = run_capture(std::string(MF_BINARY) + " inspect " + big, &rc);
  CHECK(rc == 0);
  CHECK(contains(out, "token width: 4 bytes (uint32)"));
  CHECK(contains(out, "version:     7"));
  CHECK(contains(out, "max id:      123456"));
  CHECK_FALSE(contains(out, "preview"));
  out = run_capture(std::string(MF_BINARY) + " inspect " + big + " --vocab 100000", &rc);
  CHECK(rc == 1);
  CHECK(contains(out, "token id 123456 at position 3"));
  out = run_capture(std::string(MF_BINARY) + " inspect " + (dir / "none.bin"), &rc);
  CHECK(rc == 1);
  CHECK(contains(out, "no such file"));
  out = run_capture(std::string(MF_BINARY) + " inspect --help", &rc);
  CHECK(rc == 0);
  CHECK(contains(out, "usage: muonforge inspect"));
  out = run_capture(std::string(MF_BINARY) + " inspect " + p + " --top x", &rc);
  CHECK(rc == 1);
  CHECK(contains(out, "--top expects an integer"));
}

TEST_CASE("prepare_data.py text builds shards the loader reads back", "[data][python]") {
  if (!have_python()) {
    WARN("python3 not found: skipping the prepare_data.py test");
    return;
  }
  TempDir dir;
  // Two documents (split at <|endoftext|>), non-ASCII text, several lines each.
  std::string doc1, doc2;
  for (int i = 0; i < 40; ++i) doc1 += "line " + std::to_string(i) + " of the first document\n";
  for (int i = 0; i < 30; ++i) doc2 += "zweite Datei, Zeile " + std::to_string(i) + ": \xc3\xa4\xc3\xb6\xc3\xbc\n";
  {
    std::ofstream f(dir / "corpus.txt", std::ios::binary);
    f << doc1 << "<|endoftext|>\n" << doc2;
  }
  const std::string out = dir / "shards";
  int rc = 0;
  std::string log = run_capture("python3 " + kRepo + "/scripts/prepare_data.py text " +
                                    (dir / "corpus.txt") + " --out " + out + " --val-frac 0.2",
                                &rc);
  INFO(log);
  REQUIRE(rc == 0);
  TokenShard train(out + "/train_000000.bin", 256), val(out + "/val_000000.bin", 256);
  CHECK(train.token_bytes() == 2);
  auto as_text = [](const TokenShard& s) {
    std::string t;
    for (int64_t i = 0; i < s.size(); ++i) t += char(s[i]);
    return t;
  };
  const std::string tr = as_text(train), va = as_text(val);
  // Per document: the head (80%, cut at a newline) to train, the tail to val, each followed by a
  // blank line.
  auto strip = [](std::string s) {
    while (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
  };
  const std::string d1 = strip(doc1), d2 = strip(doc2);
  const size_t c1 = d1.find('\n', size_t(double(d1.size()) * 0.8)) + 1;
  const size_t c2 = d2.find('\n', size_t(double(d2.size()) * 0.8)) + 1;
  CHECK(tr == d1.substr(0, c1) + "\n\n" + d2.substr(0, c2) + "\n\n");
  CHECK(va == d1.substr(c1) + "\n\n" + d2.substr(c2) + "\n\n");
  CHECK(double(va.size()) / double(tr.size() + va.size()) == Approx(0.2).margin(0.03));
  // The loader takes them.
  DataLoader dl(out + "/train_*.bin", opts(4, 16, 0, 1, false, 0, 256));
  std::vector<int32_t> in(64), tg(64);
  dl.next(in.data(), tg.data());
  CHECK(std::string(in.begin(), in.begin() + 8) == "line 0 o");

  // A second run with fewer files removes stale shards; an error exits 1 with a message.
  log = run_capture("python3 " + kRepo + "/scripts/prepare_data.py text " + (dir / "absent.txt") +
                        " --out " + out,
                    &rc);
  CHECK(rc == 1);
  CHECK(contains(log, "absent.txt"));
}

TEST_CASE("tests/test_prepare_data.py (GPT-2 BPE vectors skip without ../shared)",
          "[data][python]") {
  if (!have_python()) {
    WARN("python3 not found: skipping tests/test_prepare_data.py");
    return;
  }
  int rc = 0;
  std::string log = run_capture("python3 " + std::string(MF_TEST_DIR) + "/test_prepare_data.py", &rc);
  INFO(log);
  CHECK(rc == 0);
}
