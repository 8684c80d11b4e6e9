// muonforge inspect FILE.bin [--vocab N] [--top K]: header and token statistics of a shard.
#include <algorithm>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "data/shard.h"

namespace mf {

namespace {

void inspect_usage() {
  std::printf(
      "usage: muonforge inspect FILE.bin [--vocab N] [--top K] [--preview N]\n\n"
      "Prints the header (magic, version, token width), token count, file size, smallest and\n"
      "largest id, number of distinct ids and the K most frequent ids of an llm.c token shard.\n"
      "If every id is < 256 (a byte-level shard) it also shows the first bytes as text.\n\n"
      "options:\n"
      "  --vocab N    also check that every id is < N (error naming the first offender)\n"
      "  --top K      how many of the most frequent ids to list (default 10, 0 = none)\n"
      "  --preview N  bytes of text to preview for byte-level shards (default 240)\n"
      "  -h, --help   this help\n");
}

int64_t parse_int(const std::string& flag, const std::string& v, int64_t lo) {
  size_t pos = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &pos);
  } catch (...) {
    pos = 0;
  }
  MF_CHECK(pos == v.size() && !v.empty(), "inspect: ", flag, " expects an integer, got '", v, "'");
  MF_CHECK(x >= lo, "inspect: ", flag, " must be >= ", lo, ", got ", x);
  return x;
}

// Printable rendering of byte tokens: ASCII as is, newline as "\n" plus a real line break,
// everything else as \xHH.
std::string render_bytes(const TokenShard& sh, int64_t n) {
  std::string out;
  for (int64_t i = 0; i < n; ++i) {
    unsigned c = sh[i];
    if (c == '\n') {
      out += "\\n\n    ";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\\') {
      out += "\\\\";
    } else if (c >= 32 && c < 127) {
      out += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

}  // namespace

int cmd_inspect(const Args& args) {
  std::string file;
  int64_t vocab = 0, top = 10, preview = 240;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string& {
      MF_CHECK(i + 1 < args.size(), "inspect: ", a, " needs a value");
      return args[++i];
    };
    if (a == "-h" || a == "--help") {
      inspect_usage();
      return 0;
    } else if (a == "--vocab") {
      vocab = parse_int(a, value(), 1);
    } else if (a == "--top") {
      top = parse_int(a, value(), 0);
    } else if (a == "--preview") {
      preview = parse_int(a, value(), 0);
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("inspect: unknown option '", a, "' (see 'muonforge inspect --help')");
    } else {
      MF_CHECK(file.empty(), "inspect: one file at a time (got '", file, "' and '", a, "')");
      file = a;
    }
  }
  MF_CHECK(!file.empty(), "inspect: missing FILE.bin (see 'muonforge inspect --help')");

  TokenShard sh(file, vocab);
  const ShardInfo& info = sh.info();
  const int64_t n = sh.size();

  std::printf("file:        %s\n", file.c_str());
  std::printf("file size:   %lld bytes\n", (long long)info.file_bytes);
  std::printf("magic:       %d\n", info.magic);
  std::printf("version:     %d\n", info.version);
  std::printf("token width: %d bytes (uint%d)\n", info.token_bytes, info.token_bytes * 8);
  std::printf("tokens:      %lld\n", (long long)n);
  if (n == 0) {
    std::printf("(no tokens)\n");
    return 0;
  }

  // Counting: a dense table while ids are small, a hash map beyond that.
  uint32_t mn = 0xffffffffu, mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t t = sh[i];
    mn = std::min(mn, t);
    mx = std::max(mx, t);
  }
  std::vector<std::pair<uint32_t, int64_t>> freq;  // (id, count) for ids that occur
  if (mx < (1u << 24)) {
    std::vector<int64_t> counts(size_t(mx) + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++counts[sh[i]];
    for (size_t id = 0; id < counts.size(); ++id)
      if (counts[id]) freq.emplace_back(uint32_t(id), counts[id]);
  } else {
    std::unordered_map<uint32_t, int64_t> counts;
    for (int64_t i = 0; i < n; ++i) ++counts[sh[i]];
    freq.assign(counts.begin(), counts.end());
  }
  std::printf("min id:      %u\n", mn);
  std::printf("max id:      %u\n", mx);
  std::printf("distinct:    %zu ids\n", freq.size());
  if (vocab > 0) std::printf("vocab check: every id < %lld\n", (long long)vocab);

  if (top > 0) {
    // Most frequent first; ties by smaller id so the output is stable.
    const size_t k = std::min(freq.size(), size_t(top));
    std::partial_sort(freq.begin(), freq.begin() + k, freq.end(), [](const auto& a, const auto& b) {
      return a.second != b.second ? a.second > b.second : a.first < b.first;
    });
    const bool bytes = mx < 256;
    std::printf("top %zu ids:\n", k);
    for (size_t i = 0; i < k; ++i) {
      auto [id, c] = freq[i];
      std::printf("  %10u %12lld  %6.2f%%", id, (long long)c, 100.0 * double(c) / double(n));
      if (bytes) {
        if (id >= 32 && id < 127) std::printf("  '%c'", char(id));
        else if (id == '\n') std::printf("  '\\n'");
        else std::printf("  0x%02x", id);
      }
      std::printf("\n");
    }
  }
  if (mx < 256 && preview > 0) {
    const int64_t m = std::min<int64_t>(n, preview);
    std::printf("preview (first %lld tokens as bytes):\n    %s\n", (long long)m,
                render_bytes(sh, m).c_str());
  }
  return 0;
}

}  // namespace mf
