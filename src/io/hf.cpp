#include "io/hf.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/json_file.h"

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

  std::optional<std::string> str(const char* key, std::optional<std::string> def = std::nullopt) {
    if (!has(key)) {
      if (!def) problems.push_back(std::string(key) + " is missing");
      return def;
    }
    const json& v = hf[key];
    if (v.is_string()) return v.get<std::string>();
    problems.push_back(std::string(key) + " should be a string, found " + v.dump());
    return std::nullopt;
  }

  // Architecture features muonforge's Llama does not implement. `model_type`: the one expected.
  void check_supported(const char* model_type = "llama") {
    if (hf.contains("model_type") && hf["model_type"] != model_type)
      problems.push_back("model_type is " + hf["model_type"].dump() + ", expected \"" +
                         model_type + "\"");
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

// The MoE keys of a muonforge_moe config.json (hf_moe_config), read and checked for features
// muonforge does not implement; a key left unset had a problem (already recorded).
struct HfMoe {
  std::optional<int64_t> experts, top_k, shared, d_expert, first_dense;
  std::optional<std::string> score, topk_method;
  std::optional<bool> norm_topk;
  std::optional<double> route_scale, aux_alpha;
};

HfMoe read_moe_keys(HfKeys& k) {
  HfMoe r;
  r.experts = k.integer("n_routed_experts");
  r.top_k = k.integer("num_experts_per_tok");
  r.shared = k.integer("n_shared_experts", 0);
  r.d_expert = k.integer("moe_intermediate_size");
  r.first_dense = k.integer("first_k_dense_replace", 0);
  r.score = k.str("scoring_func");
  r.topk_method = k.str("topk_method");
  if (k.has("norm_topk_prob"))
    r.norm_topk = k.boolean("norm_topk_prob", false);
  else
    k.problems.push_back("norm_topk_prob is missing");
  r.route_scale = k.number("routed_scaling_factor", 1.0);
  r.aux_alpha = k.number("aux_loss_alpha", 0.0);
  if (r.score && *r.score != "softmax" && *r.score != "sigmoid") {
    k.problems.push_back("scoring_func is \"" + *r.score +
                         "\", muonforge implements \"softmax\" and \"sigmoid\"");
    r.score.reset();
  }
  if (r.topk_method && *r.topk_method != "greedy" && *r.topk_method != "noaux_tc") {
    k.problems.push_back("topk_method is \"" + *r.topk_method +
                         "\", muonforge implements \"greedy\" and \"noaux_tc\" (no "
                         "group-limited routing)");
    r.topk_method.reset();
  }
  if (auto f = k.integer("moe_layer_freq", 1); f && *f != 1)
    k.problems.push_back("moe_layer_freq is " + std::to_string(*f) +
                         ", muonforge puts an MoE block in every layer from "
                         "first_k_dense_replace on (1)");
  auto groups = k.integer("n_group", 1), topk_groups = k.integer("topk_group", 1);
  if (groups && topk_groups && *topk_groups < *groups)
    k.problems.push_back("topk_group is " + std::to_string(*topk_groups) + " < n_group " +
                         std::to_string(*groups) +
                         ": group-limited routing is not implemented in muonforge");
  return r;
}

// DeepSeek-V3's topk_method for a balance mode: "noaux_tc" is the bias (aux-loss-free) router.
const char* topk_method_of(const std::string& balance) {
  return balance == "bias" ? "noaux_tc" : "greedy";
}

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
  const json j = read_json_file(index.string(), "safetensors index");
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

namespace {

// The Llama keys of config.json (attention, norms, embeddings, the dense MLP width).
json llama_keys(const ModelConfig& m) {
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

}  // namespace

json hf_llama_config(const ModelConfig& m) {
  MF_CHECK(m.moe.n_experts == 0, "Hugging Face Llama export supports dense models only; ",
           "model.moe.n_experts is ", m.moe.n_experts);
  return llama_keys(m);
}

json hf_moe_config(const ModelConfig& m) {
  const MoeConfig& e = m.moe;
  MF_CHECK(e.n_experts > 0, "hf_moe_config: model.moe.n_experts is ", e.n_experts,
           " (a dense model; use hf_llama_config)");
  json j = llama_keys(m);
  j["architectures"] = {"MuonforgeMoeForCausalLM"};
  j["model_type"] = kHfMoeModelType;
  j["n_routed_experts"] = e.n_experts;
  j["num_experts_per_tok"] = e.top_k;
  j["n_shared_experts"] = e.n_shared;
  j["moe_intermediate_size"] = e.d_expert;
  j["first_k_dense_replace"] = e.first_dense;
  j["moe_layer_freq"] = 1;
  j["n_group"] = 1;
  j["topk_group"] = 1;
  j["scoring_func"] = e.score;
  j["norm_topk_prob"] = e.norm_topk;
  j["routed_scaling_factor"] = e.route_scale;
  j["topk_method"] = topk_method_of(e.balance);
  j["aux_loss_alpha"] = e.balance == "aux_loss" ? e.aux_coef : 0.0;
  return j;
}

json hf_config(const ModelConfig& m) {
  return m.moe.n_experts > 0 ? hf_moe_config(m) : hf_llama_config(m);
}

void check_hf_config(const json& hf, const ModelConfig& m, const std::string& path) {
  MF_CHECK(hf.is_object(), "Hugging Face config '", path, "' is not a JSON object");
  std::vector<std::string> problems;
  HfKeys k{hf, problems};
  const bool hf_moe = hf.contains("model_type") && hf["model_type"] == kHfMoeModelType;
  const bool mf_moe = m.moe.n_experts != 0;
  k.check_supported(hf_moe || mf_moe ? kHfMoeModelType : "llama");
  if (mf_moe && !hf_moe)
    problems.push_back("model.moe.n_experts is " + std::to_string(m.moe.n_experts) +
                       " but a Hugging Face Llama is dense (an MoE export has model_type \"" +
                       kHfMoeModelType + "\")");
  if (hf_moe && !mf_moe) {
    auto E = k.integer("n_routed_experts");
    problems.push_back(std::string("model_type is \"") + kHfMoeModelType +
                       "\" (an MoE model, n_routed_experts " +
                       (E ? std::to_string(*E) : std::string("?")) +
                       ") but model.moe.n_experts is 0 (dense)");
  }

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
  // An MoE model whose every layer is MoE has no dense MLP: its intermediate_size is unused.
  if (!mf_moe || m.moe.first_dense > 0)
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

  if (hf_moe && mf_moe) {
    const MoeConfig& e = m.moe;
    const HfMoe h = read_moe_keys(k);
    cmp_int("n_routed_experts", h.experts, "model.moe.n_experts", e.n_experts);
    cmp_int("num_experts_per_tok", h.top_k, "model.moe.top_k", e.top_k);
    cmp_int("n_shared_experts", h.shared, "model.moe.n_shared", e.n_shared);
    cmp_int("moe_intermediate_size", h.d_expert, "model.moe.d_expert", e.d_expert);
    cmp_int("first_k_dense_replace", h.first_dense, "model.moe.first_dense", e.first_dense);
    if (h.score && *h.score != e.score)
      problems.push_back("scoring_func is \"" + *h.score + "\" but model.moe.score is \"" +
                         e.score + "\"");
    if (h.norm_topk && *h.norm_topk != e.norm_topk)
      problems.push_back(std::string("norm_topk_prob is ") + (*h.norm_topk ? "true" : "false") +
                         " but model.moe.norm_topk is " + (e.norm_topk ? "true" : "false"));
    cmp_num("routed_scaling_factor", h.route_scale, "model.moe.route_scale", e.route_scale);
    if (h.topk_method && *h.topk_method != topk_method_of(e.balance))
      problems.push_back(
          "topk_method is \"" + *h.topk_method + "\" (" +
          (*h.topk_method == "noaux_tc" ? "bias balancing, with e_score_correction_bias tensors"
                                        : "no e_score_correction_bias tensors") +
          ") but model.moe.balance is \"" + e.balance + "\" (expects topk_method \"" +
          topk_method_of(e.balance) + "\")");
  }

  MF_CHECK(problems.empty(), "Hugging Face config '", path,
           "' does not match the model config:", join_problems(problems));
}

ModelConfig model_config_from_hf(const json& hf, const std::string& path) {
  MF_CHECK(hf.is_object(), "Hugging Face config '", path, "' is not a JSON object");
  std::vector<std::string> problems;
  HfKeys k{hf, problems};
  const bool hf_moe = hf.contains("model_type") && hf["model_type"] == kHfMoeModelType;
  k.check_supported(hf_moe ? kHfMoeModelType : "llama");
  ModelConfig m;
  m.arch = "llama";
  if (hf_moe) {
    const HfMoe h = read_moe_keys(k);
    MoeConfig& e = m.moe;
    if (h.experts) e.n_experts = int(*h.experts);
    if (h.top_k) e.top_k = int(*h.top_k);
    if (h.shared) e.n_shared = int(*h.shared);
    if (h.d_expert) e.d_expert = int(*h.d_expert);
    if (h.first_dense) e.first_dense = int(*h.first_dense);
    if (h.score) e.score = *h.score;
    if (h.norm_topk) e.norm_topk = *h.norm_topk;
    if (h.route_scale) e.route_scale = *h.route_scale;
    if (h.topk_method && *h.topk_method == "noaux_tc") {
      e.balance = "bias";
    } else if (h.aux_alpha && *h.aux_alpha > 0) {
      e.balance = "aux_loss";
      e.aux_coef = *h.aux_alpha;
    } else {
      e.balance = "none";
    }
    if (h.experts && *h.experts <= 0)
      problems.push_back("n_routed_experts is " + std::to_string(*h.experts) + ", must be > 0");
  }
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
  // A muonforge checkpoint (or run directory) has our own config.json, whose keys would read as
  // a list of missing Hugging Face ones (and a run directory has none).
  MF_CHECK(!is_file(fs::path(dir) / "state.json") && !is_file(fs::path(dir) / "latest"), "'", dir,
           "' is a muonforge checkpoint or run directory, not a Hugging Face model: continue its "
           "run with `muonforge train CONFIG --resume ", dir, "`, or start a new run from its "
           "weights with `muonforge export ", dir, " OUT_DIR` and train.init_from=OUT_DIR");
  MF_CHECK(is_file(p), "'", dir, "' has no config.json (is it a Hugging Face model directory?)");
  return read_json_file(p.string(), "Hugging Face config");
}

std::vector<std::string> hf_model_files(const std::string& dir) {
  return resolve_model_files(dir, nullptr);
}

std::vector<std::pair<std::string, Shape>> expected_param_names(const ModelConfig& m) {
  MF_CHECK(m.moe.n_experts >= 0, "model.moe.n_experts is ", m.moe.n_experts, ", must be >= 0");
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
    if (m.moe.n_experts > 0 && i >= m.moe.first_dense) {
      // MoE layer: the DeepSeek-V3 names, in the order model/moe.cpp creates them.
      const MoeConfig& e = m.moe;
      const int64_t E = e.n_experts, de = e.d_expert, fs = int64_t(e.n_shared) * e.d_expert;
      out.push_back({p + "mlp.gate.weight", {E, d}});
      if (e.balance == "bias") out.push_back({p + "mlp.gate.e_score_correction_bias", {E}});
      for (int64_t x = 0; x < E; ++x) {
        const std::string q = p + "mlp.experts." + std::to_string(x) + ".";
        out.push_back({q + "gate_proj.weight", {de, d}});
        out.push_back({q + "up_proj.weight", {de, d}});
        out.push_back({q + "down_proj.weight", {d, de}});
      }
      if (fs > 0) {
        out.push_back({p + "mlp.shared_experts.gate_proj.weight", {fs, d}});
        out.push_back({p + "mlp.shared_experts.up_proj.weight", {fs, d}});
        out.push_back({p + "mlp.shared_experts.down_proj.weight", {d, fs}});
      }
      continue;
    }
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
