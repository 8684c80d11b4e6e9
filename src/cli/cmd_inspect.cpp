// muonforge inspect FILE.bin [--vocab N] [--top K]: header and token statistics of a shard;
// muonforge inspect CKPT_DIR | RUN_DIR | FILE.safetensors: what a checkpoint or a tensor file holds.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "data/shard.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;

namespace mf {

namespace {

void inspect_usage() {
  std::printf(
      "usage: muonforge inspect FILE.bin [--vocab N] [--top K] [--preview N]\n"
      "       muonforge inspect CKPT_DIR | RUN_DIR | FILE.safetensors [--top K]\n\n"
      "Prints the header (magic, version, token width), token count, file size, smallest and\n"
      "largest id, number of distinct ids and the K most frequent ids of an llm.c token shard.\n"
      "If every id is < 256 (a byte-level shard) it also shows the first bytes as text.\n"
      "For a checkpoint (a run directory: its newest): the step, tokens seen, the version that\n"
      "wrote it, the model and optimizer, the parameter count, the files, and the run's logged\n"
      "losses at that step. For a .safetensors file: tensor count, parameters, dtypes and the K\n"
      "largest tensors.\n\n"
      "options:\n"
      "  --vocab N    shards: also check that every id is < N (error naming the first offender)\n"
      "  --top K      how many of the most frequent ids to list (default 10, 0 = none)\n"
      "  --preview N  bytes of text to preview for byte-level shards (default 240)\n"
      "  (--vocab and --preview apply to token shards only)\n"
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

// Parameters and bytes by dtype of a safetensors file, and its K largest tensors.
void print_safetensors(const std::string& path, int64_t top, const char* indent) {
  MF_CHECK(fs::is_regular_file(path), "inspect: ", path, " is not a file");
  SafetensorsReader r(path);
  std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;  // dtype -> (tensors, elements)
  std::vector<std::pair<int64_t, std::string>> sizes;
  int64_t total = 0;
  for (const std::string& n : r.names()) {
    const SafetensorsEntry& e = r.entry(n);
    by_dtype[e.dtype].first += 1;
    by_dtype[e.dtype].second += e.numel();
    total += e.numel();
    sizes.emplace_back(e.numel(), n);
  }
  std::printf("%stensors:     %zu, %lld values (%.2f M)", indent, sizes.size(), (long long)total,
              double(total) / 1e6);
  for (const auto& [dt, c] : by_dtype)
    std::printf("%s %s x %lld", dt == by_dtype.begin()->first ? ";" : ",", dt.c_str(),
                (long long)c.first);
  std::printf("\n");
  const size_t k = std::min(sizes.size(), size_t(std::max<int64_t>(top, 0)));
  std::partial_sort(sizes.begin(), sizes.begin() + k, sizes.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  for (size_t i = 0; i < k; ++i) {
    const SafetensorsEntry& e = r.entry(sizes[i].second);
    std::string shape;
    for (int64_t d : e.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    std::printf("%s  %-48s %-5s [%s]\n", indent, e.name.c_str(), e.dtype.c_str(), shape.c_str());
  }
}

nlohmann::json json_of(const fs::path& p) { return peek_json_file(p.string()); }

void print_checkpoint(const std::string& path, int64_t top) {
  // A Hugging Face model directory (an export): its config's key figures and its tensors.
  const nlohmann::json hf = json_of(fs::path(path) / "config.json");
  if (hf.is_object() && !hf.contains("model") && hf.contains("model_type") &&
      fs::is_regular_file(fs::path(path) / "model.safetensors")) {
    std::printf("Hugging Face model directory: %s\n", path.c_str());
    std::printf("model:       %s, %lld layers, hidden %lld, %lld heads / %lld kv heads, vocab %lld",
                hf["model_type"].dump().c_str(), (long long)hf.value("num_hidden_layers", 0),
                (long long)hf.value("hidden_size", 0), (long long)hf.value("num_attention_heads", 0),
                (long long)hf.value("num_key_value_heads", 0), (long long)hf.value("vocab_size", 0));
    // DeepSeek-V3 names (our muonforge_moe exports).
    auto count = [&](const char* key) {
      return hf.contains(key) && hf[key].is_number_integer() ? (long long)hf[key].get<int64_t>() : 0LL;
    };
    if (count("n_routed_experts") > 0)
      std::printf(", MoE %lld experts top-%lld (+%lld shared) width %lld from layer %lld",
                  count("n_routed_experts"), count("num_experts_per_tok"),
                  count("n_shared_experts"), count("moe_intermediate_size"),
                  count("first_k_dense_replace"));
    std::printf("\n");
    std::printf("model.safetensors:\n");
    print_safetensors((fs::path(path) / "model.safetensors").string(), top, "  ");
    return;
  }
  const std::string ckpt = resolve_checkpoint_dir(path, "inspect");
  const fs::path dir(ckpt);
  const nlohmann::json st = json_of(dir / "state.json"), cfg = json_of(dir / "config.json");
  std::printf("checkpoint:  %s\n", ckpt.c_str());
  if (st.is_object()) {
    std::printf("step:        %lld", (long long)st.value("step", int64_t(-1)));
    if (cfg.is_object() && cfg.contains("train") && cfg["train"].is_object())
      std::printf(" of %lld (train.max_steps)",
                  (long long)cfg["train"].value("max_steps", int64_t(0)));
    std::printf("\ntokens:      %lld\n", (long long)st.value("tokens", int64_t(0)));
    std::printf("written by:  muonforge %s, world size %lld\n",
                st.value("muonforge", std::string("(version not recorded)")).c_str(),
                (long long)st.value("world_size", int64_t(1)));
  } else {
    std::printf("step:        (no state.json: weights only, e.g. made by muonforge import)\n");
  }
  if (cfg.is_object() && cfg.contains("model") && cfg["model"].is_object()) {
    const nlohmann::json& m = cfg["model"];
    std::printf("model:       %lld layers, d_model %lld, %lld heads / %lld kv heads, d_ff %lld, vocab %lld",
                (long long)m.value("n_layers", 0), (long long)m.value("d_model", 0),
                (long long)m.value("n_heads", 0), (long long)m.value("n_kv_heads", 0),
                (long long)m.value("d_ff", 0), (long long)m.value("vocab_size", 0));
    if (m.contains("moe") && m["moe"].is_object() && m["moe"].value("n_experts", 0) > 0)
      std::printf(", MoE %lld experts top-%lld (+%lld shared)",
                  (long long)m["moe"].value("n_experts", 0), (long long)m["moe"].value("top_k", 0),
                  (long long)m["moe"].value("n_shared", 0));
    std::printf("\n");
  }
  if (st.is_object() && st.contains("optimizer") && st["optimizer"].is_object()) {
    const int shards = st.value("optimizer_shards", 0);
    std::printf("optimizer:   %s, %d step(s) of state%s\n",
                st["optimizer"].value("optimizer", std::string("?")).c_str(),
                st["optimizer"].value("step_count", 0),
                shards > 0 ? (", sharded over " + std::to_string(shards) + " ranks").c_str() : "");
  }
  // The run's log at this step (metrics.jsonl beside the checkpoint directories).
  const fs::path metrics = dir.parent_path() / "metrics.jsonl";
  if (st.is_object() && fs::exists(metrics)) {
    const int64_t step = st.value("step", int64_t(-1));
    std::ifstream in(metrics);
    std::string line;
    std::map<std::string, double> last;  // the last record of each at this step (a resume from
                                         // an earlier checkpoint logs the step again)
    while (std::getline(in, line)) {
      const nlohmann::json rec = nlohmann::json::parse(line, nullptr, false);
      if (!rec.is_object() || rec.value("step", int64_t(-2)) != step) continue;
      for (const char* k : {"loss", "val_loss"})
        if (rec.contains(k) && rec[k].is_number()) last[k] = rec[k].get<double>();
    }
    std::string logged;
    for (const auto& [k, v] : last) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s%s %.4f", logged.empty() ? "" : ", ",
                    k == "loss" ? "train loss" : "val loss", v);
      logged += buf;
    }
    if (!logged.empty()) std::printf("logged:      %s\n", logged.c_str());
  }
  std::printf("files:\n");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const fs::path& f : files)
    std::printf("  %-28s %12lld bytes\n", f.filename().string().c_str(),
                (long long)fs::file_size(f));
  std::printf("model.safetensors:\n");
  print_safetensors((dir / "model.safetensors").string(), top, "  ");
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
  if (fs::is_directory(file) || fs::path(file).filename() == "latest") {
    print_checkpoint(file, top);
    return 0;
  }
  if (file.size() > 12 && file.compare(file.size() - 12, 12, ".safetensors") == 0) {
    MF_CHECK(fs::is_regular_file(file), "inspect: ", file, " is not a file");
    std::printf("file:        %s (%lld bytes)\n", file.c_str(), (long long)fs::file_size(file));
    print_safetensors(file, top, "");
    return 0;
  }

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
