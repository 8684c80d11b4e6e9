#include "io/hf.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "core/error.h"

namespace mf {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// HF LlamaConfig defaults for keys a config.json may leave out.
constexpr double kHfDefaultEps = 1e-6;
constexpr double kHfDefaultTheta = 10000.0;

// Reads config.json keys, collecting problems instead of stopping at the first one.
struct HfKeys {
  const json& hf;
  std::vector<std::string>& problems;

  bool has(const char* key) const { return hf.contains(key) && !hf[key].is_null(); }

  std::optional<int64_t> integer(const char* key, std::optional<int64_t> def = std::nullopt) {
    if (!has(key)) {
      if (!def) problems.push_back(std::string(key) + " is missing");
      return def;
    }
    const json& v = hf[key];
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>())
      return int64_t(v.get<double>());
    problems.push_back(std::string(key) + " should be an integer, found " + v.dump());
    return std::nullopt;
  }

  std::optional<double> number(const char* key, double def) {
    if (!has(key)) return def;
    const json& v = hf[key];
    if (v.is_number()) return v.get<double>();
    problems.push_back(std::string(key) + " should be a number, found " + v.dump());
    return std::nullopt;
  }

  std::optional<bool> boolean(const char* key, bool def) {
    if (!has(key)) return def;
    const json& v = hf[key];
    if (v.is_boolean()) return v.get<bool>();
    problems.push_back(std::string(key) + " should be true or false, found " + v.dump());
    return std::nullopt;
  }

  // Architecture features muonforge's Llama does not implement.
  void check_supported() {
    if (hf.contains("model_type") && hf["model_type"] != "llama")
      problems.push_back("model_type is " + hf["model_type"].dump() + ", expected \"llama\"");
    if (has("hidden_act") && hf["hidden_act"] != "silu")
      problems.push_back("hidden_act is " + hf["hidden_act"].dump() +
                         ", muonforge implements \"silu\" only");
    if (auto b = boolean("attention_bias", false); b && *b)
      problems.push_back("attention_bias is true, muonforge's Llama has no biases");
    if (auto b = boolean("mlp_bias", false); b && *b)
      problems.push_back("mlp_bias is true, muonforge's Llama has no biases");
    if (has("rope_scaling"))
      problems.push_back("rope_scaling is " + hf["rope_scaling"].dump() +
                         ", muonforge implements plain RoPE only (null)");
  }
};

bool close_rel(double a, double b, double tol) {
  return std::fabs(a - b) <= tol * std::max(std::fabs(a), std::fabs(b));
}

std::string join_problems(const std::vector<std::string>& problems) {
  std::string s;
  for (const auto& p : problems) s += "\n  - " + p;
  return s;
}

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

json read_json_file(const fs::path& p, const char* what) {
  std::ifstream in(p);
  MF_CHECK(in, "cannot open ", what, " '", p.string(), "'");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    MF_FAIL("invalid JSON in ", what, " '", p.string(), "': ", e.what());
  }
}

// hf_model_files, also returning the index's weight_map when there is one.
std::vector<std::string> resolve_model_files(const std::string& dir,
                                             std::map<std::string, std::string>* weight_map) {
  std::error_code ec;
  MF_CHECK(fs::exists(dir, ec), "Hugging Face model directory '", dir, "' does not exist");
  MF_CHECK(fs::is_directory(dir, ec), "Hugging Face model path '", dir, "' is not a directory");
  const fs::path d(dir);
  MF_CHECK(is_file(d / "config.json"), "'", dir,
           "' has no config.json (is it a Hugging Face model directory?)");
  if (is_file(d / "model.safetensors")) return {(d / "model.safetensors").string()};

  const fs::path index = d / "model.safetensors.index.json";
  if (!is_file(index)) {
    std::string hint;
    if (is_file(d / "pytorch_model.bin") || is_file(d / "pytorch_model.bin.index.json"))
      hint = " (it has PyTorch .bin weights: muonforge reads safetensors only; re-save with "
             "transformers' save_pretrained(..., safe_serialization=True))";
    MF_FAIL("'", dir, "' has no weights: neither model.safetensors nor ",
            "model.safetensors.index.json", hint);
  }
  const json j = read_json_file(index, "safetensors index");
  MF_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
           "safetensors index '", index.string(), "' has no \"weight_map\" object");
  std::set<std::string> shards;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    MF_CHECK(it.value().is_string(), "safetensors index '", index.string(), "': weight_map['",
             it.key(), "'] is not a file name");
    const std::string shard = it.value().get<std::string>();
    MF_CHECK(!shard.empty() && fs::path(shard).is_relative(), "safetensors index '",
             index.string(), "': weight_map['", it.key(), "'] = '", shard,
             "' is not a file name inside the directory");
    shards.insert(shard);
    if (weight_map) (*weight_map)[it.key()] = shard;
  }
  MF_CHECK(!shards.empty(), "safetensors index '", index.string(), "' has an empty weight_map");
  std::vector<std::string> files;
  for (const auto& s : shards) {
    const fs::path p = d / s;
    MF_CHECK(is_file(p), "shard '", s, "' listed in '", index.string(), "' is missing");
    files.push_back(p.string());
  }
  return files;
}

}  // namespace

// ---- config ------------------------------------------------------------------------------------

json hf_llama_config(const ModelConfig& m) {
  MF_CHECK(m.moe.n_experts == 0, "Hugging Face Llama export supports dense models only; ",
           "model.moe.n_experts is ", m.moe.n_experts);
  MF_CHECK(m.n_heads > 0 && m.d_model % m.n_heads == 0, "model.d_model (", m.d_model,
           ") is not a multiple of model.n_heads (", m.n_heads, ")");
  return json{
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", m.d_model},
      {"intermediate_size", m.d_ff},
      {"num_hidden_layers", m.n_layers},
      {"num_attention_heads", m.n_heads},
      {"num_key_value_heads", m.n_kv_heads},
      {"head_dim", m.head_dim()},
      {"vocab_size", m.vocab_size},
      {"max_position_embeddings", m.max_seq_len},
      {"rms_norm_eps", m.norm_eps},
      {"rope_theta", m.rope_theta},
      {"rope_scaling", nullptr},
      {"tie_word_embeddings", m.tie_embeddings},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"mlp_bias", false},
      {"initializer_range", m.init_std},
      {"pretraining_tp", 1},
      {"use_cache", true},
      {"torch_dtype", "float32"},
      // The tokenizer is not part of the model config; leave the special ids unset.
      {"bos_token_id", nullptr},
      {"eos_token_id", nullptr},
  };
}

void check_hf_config(const json& hf, const ModelConfig& m, const std::string& path) {
  MF_CHECK(hf.is_object(), "Hugging Face config '", path, "' is not a JSON object");
  std::vector<std::string> problems;
  HfKeys k{hf, problems};
  k.check_supported();
  if (m.moe.n_experts != 0)
    problems.push_back("model.moe.n_experts is " + std::to_string(m.moe.n_experts) +
                       " but a Hugging Face Llama is dense");

  auto cmp_int = [&](const char* key, std::optional<int64_t> hf_v, const char* mf_key,
                     int64_t mf_v) {
    if (hf_v && *hf_v != mf_v)
      problems.push_back(std::string(key) + " is " + std::to_string(*hf_v) + " but " + mf_key +
                         " is " + std::to_string(mf_v));
  };
  auto cmp_num = [&](const char* key, std::optional<double> hf_v, const char* mf_key,
                     double mf_v) {
    if (hf_v && !close_rel(*hf_v, mf_v, 1e-6)) {
      std::ostringstream os;
      os << key << " is " << *hf_v << " but " << mf_key << " is " << mf_v;
      problems.push_back(os.str());
    }
  };

  auto heads = k.integer("num_attention_heads");
  auto hidden = k.integer("hidden_size");
  cmp_int("hidden_size", hidden, "model.d_model", m.d_model);
  cmp_int("intermediate_size", k.integer("intermediate_size"), "model.d_ff", m.d_ff);
  cmp_int("num_hidden_layers", k.integer("num_hidden_layers"), "model.n_layers", m.n_layers);
  cmp_int("num_attention_heads", heads, "model.n_heads", m.n_heads);
  cmp_int("num_key_value_heads", k.integer("num_key_value_heads", heads), "model.n_kv_heads",
          m.n_kv_heads);
  cmp_int("vocab_size", k.integer("vocab_size"), "model.vocab_size", m.vocab_size);
  std::optional<int64_t> hf_hd;
  if (hidden && heads && *heads > 0) hf_hd = *hidden / *heads;
  if (k.has("head_dim") || hf_hd)
    cmp_int("head_dim", k.integer("head_dim", hf_hd), "model.d_model / model.n_heads",
            m.n_heads > 0 ? m.head_dim() : 0);
  cmp_num("rms_norm_eps", k.number("rms_norm_eps", kHfDefaultEps), "model.norm_eps", m.norm_eps);
  cmp_num("rope_theta", k.number("rope_theta", kHfDefaultTheta), "model.rope_theta",
          m.rope_theta);
  if (auto tie = k.boolean("tie_word_embeddings", false); tie && *tie != m.tie_embeddings)
    problems.push_back(std::string("tie_word_embeddings is ") + (*tie ? "true" : "false") +
                       " but model.tie_embeddings is " + (m.tie_embeddings ? "true" : "false"));

  MF_CHECK(problems.empty(), "Hugging Face config '", path,
           "' does not match the model config:", join_problems(problems));
}

ModelConfig model_config_from_hf(const json& hf, const std::string& path) {
  MF_CHECK(hf.is_object(), "Hugging Face config '", path, "' is not a JSON object");
  std::vector<std::string> problems;
  HfKeys k{hf, problems};
  k.check_supported();
  ModelConfig m;
  m.arch = "llama";
  auto set_int = [](int& dst, std::optional<int64_t> v) {
    if (v) dst = int(*v);
  };
  auto heads = k.integer("num_attention_heads");
  set_int(m.d_model, k.integer("hidden_size"));
  set_int(m.d_ff, k.integer("intermediate_size"));
  set_int(m.n_layers, k.integer("num_hidden_layers"));
  set_int(m.n_heads, heads);
  set_int(m.n_kv_heads, k.integer("num_key_value_heads", heads));
  set_int(m.vocab_size, k.integer("vocab_size"));
  set_int(m.max_seq_len, k.integer("max_position_embeddings", m.max_seq_len));
  if (auto v = k.number("rms_norm_eps", kHfDefaultEps)) m.norm_eps = *v;
  if (auto v = k.number("rope_theta", kHfDefaultTheta)) m.rope_theta = *v;
  if (auto v = k.boolean("tie_word_embeddings", false)) m.tie_embeddings = *v;
  if (auto v = k.number("initializer_range", m.init_std)) m.init_std = *v;
  if (problems.empty()) {
    if (m.n_heads <= 0 || m.d_model % m.n_heads != 0)
      problems.push_back("hidden_size " + std::to_string(m.d_model) +
                         " is not a multiple of num_attention_heads " +
                         std::to_string(m.n_heads));
    else if (auto hd = k.integer("head_dim", m.head_dim()); hd && *hd != m.head_dim())
      problems.push_back("head_dim is " + std::to_string(*hd) +
                         ", muonforge requires hidden_size / num_attention_heads = " +
                         std::to_string(m.head_dim()));
  }
  MF_CHECK(problems.empty(), "Hugging Face config '", path,
           "' cannot be used:", join_problems(problems));
  return m;
}

json read_hf_config(const std::string& dir) {
  std::error_code ec;
  MF_CHECK(fs::is_directory(dir, ec), "Hugging Face model directory '", dir,
           "' does not exist or is not a directory");
  const fs::path p = fs::path(dir) / "config.json";
  MF_CHECK(is_file(p), "'", dir, "' has no config.json (is it a Hugging Face model directory?)");
  return read_json_file(p, "Hugging Face config");
}

std::vector<std::string> hf_model_files(const std::string& dir) {
  return resolve_model_files(dir, nullptr);
}

std::vector<std::pair<std::string, Shape>> expected_param_names(const ModelConfig& m) {
  MF_CHECK(m.moe.n_experts == 0, "Hugging Face Llama names cover dense models only; ",
           "model.moe.n_experts is ", m.moe.n_experts);
  MF_CHECK(m.n_heads > 0 && m.d_model % m.n_heads == 0, "model.d_model (", m.d_model,
           ") is not a multiple of model.n_heads (", m.n_heads, ")");
  const int64_t V = m.vocab_size, d = m.d_model, ff = m.d_ff, hd = m.head_dim();
  const int64_t q = int64_t(m.n_heads) * hd, kv = int64_t(m.n_kv_heads) * hd;
  std::vector<std::pair<std::string, Shape>> out;
  out.push_back({"model.embed_tokens.weight", {V, d}});
  for (int i = 0; i < m.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back({p + "input_layernorm.weight", {d}});
    out.push_back({p + "self_attn.q_proj.weight", {q, d}});
    out.push_back({p + "self_attn.k_proj.weight", {kv, d}});
    out.push_back({p + "self_attn.v_proj.weight", {kv, d}});
    out.push_back({p + "self_attn.o_proj.weight", {d, q}});
    out.push_back({p + "post_attention_layernorm.weight", {d}});
    out.push_back({p + "mlp.gate_proj.weight", {ff, d}});
    out.push_back({p + "mlp.up_proj.weight", {ff, d}});
    out.push_back({p + "mlp.down_proj.weight", {d, ff}});
  }
  out.push_back({"model.norm.weight", {d}});
  if (!m.tie_embeddings) out.push_back({"lm_head.weight", {V, d}});
  return out;
}

// ---- weights -----------------------------------------------------------------------------------

HfWeights::HfWeights(const std::string& dir) : source_(dir) {
  std::map<std::string, std::string> weight_map;
  open_files(resolve_model_files(dir, &weight_map));
  // The index and the shard headers must agree on where each tensor lives.
  for (const auto& kv : weight_map) {
    auto it = where_.find(kv.first);
    const std::string expected = (fs::path(dir) / kv.second).string();
    MF_CHECK(it != where_.end() && readers_[it->second]->path() == expected,
             "'", dir, "/model.safetensors.index.json' maps tensor '", kv.first, "' to '",
             kv.second, "', but ",
             it == where_.end() ? std::string("no shard holds it")
                                : "it is in '" + readers_[it->second]->path() + "'");
  }
}

HfWeights::HfWeights(const std::vector<std::string>& files) {
  for (const auto& f : files) source_ += (source_.empty() ? "" : ", ") + f;
  open_files(files);
}

void HfWeights::open_files(const std::vector<std::string>& files) {
  MF_CHECK(!files.empty(), "HfWeights: no safetensors files given");
  for (const auto& f : files) {
    readers_.push_back(std::make_unique<SafetensorsReader>(f));
    const size_t idx = readers_.size() - 1;
    for (const auto& name : readers_.back()->names()) {
      auto [it, inserted] = where_.emplace(name, idx);
      MF_CHECK(inserted, "tensor '", name, "' appears in both '", readers_[it->second]->path(),
               "' and '", f, "'");
    }
  }
}

std::vector<std::string> HfWeights::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const SafetensorsReader& HfWeights::reader(const std::string& name) const {
  auto it = where_.find(name);
  MF_CHECK(it != where_.end(), "tensor '", name, "' not found in Hugging Face weights '", source_,
           "' (", where_.size(), " tensors)");
  return *readers_[it->second];
}

const std::string& HfWeights::file_of(const std::string& name) const {
  return reader(name).path();
}

Shape HfWeights::shape_of(const std::string& name) const { return reader(name).entry(name).shape; }

Tensor HfWeights::read_f32(const std::string& name, const Shape& expected) const {
  Tensor t = host_tensor(expected, DType::F32);
  read_f32_into(name, t);
  return t;
}

void HfWeights::read_f32_into(const std::string& name, const Tensor& dst) const {
  const SafetensorsReader& r = reader(name);
  const Shape& found = r.entry(name).shape;
  MF_CHECK(found == dst.shape, "tensor '", name, "' in '", r.path(), "': expected shape ",
           shape_str(dst.shape), " (from the model config), found ", shape_str(found));
  r.read_f32_into(name, dst);
}

}  // namespace mf
