// Hugging Face interop: config.json mapping for dense Llama (LlamaForCausalLM) and for our MoE
// models ("muonforge_moe", see hf_moe_config), model directory resolution (single file or sharded
// index), and a weight reader across shards. Tensor names and shapes are the DESIGN §4 contract
// (weights [out, in]; lm_head absent when tied; MoE layers under the DeepSeek-V3 names).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace mf {

// config.json for LlamaForCausalLM describing `m` (torch_dtype "float32"). Throws for MoE models,
// which have no Llama equivalent.
nlohmann::json hf_llama_config(const ModelConfig& m);

// The model type written for MoE models. Our MoE model is Llama attention (GQA, RoPE, no MLA) with
// a DeepSeek-V3-style MoE MLP; no stock transformers class has exactly that with these tensor
// names (DeepseekV3ForCausalLM uses MLA attention), so the config is our own, documented one.
constexpr const char* kHfMoeModelType = "muonforge_moe";

// config.json for an MoE model (model.moe.n_experts > 0): "architectures":
// ["MuonforgeMoeForCausalLM"], "model_type": "muonforge_moe", every Llama key of hf_llama_config
// (intermediate_size is the width of the first_k_dense_replace dense layers) and the DeepSeek-V3
// MoE keys under their Hugging Face names:
//   n_routed_experts = moe.n_experts, num_experts_per_tok = moe.top_k,
//   n_shared_experts = moe.n_shared, moe_intermediate_size = moe.d_expert,
//   first_k_dense_replace = moe.first_dense, moe_layer_freq = 1, n_group = topk_group = 1,
//   scoring_func = moe.score, norm_topk_prob = moe.norm_topk,
//   routed_scaling_factor = moe.route_scale,
//   topk_method = "noaux_tc" (moe.balance = "bias": the e_score_correction_bias tensors exist)
//                 or "greedy" (aux_loss, none),
//   aux_loss_alpha = moe.aux_coef with balance "aux_loss", else 0.
// Throws for dense models.
nlohmann::json hf_moe_config(const ModelConfig& m);

// hf_llama_config or hf_moe_config, by model.moe.n_experts.
nlohmann::json hf_config(const ModelConfig& m);

// Checks that a Hugging Face config.json (`path` names it in messages) describes the same model as
// `m`: a dense Llama ("llama"), or for MoE models a "muonforge_moe" config whose MoE keys (see
// hf_moe_config) all match model.moe. Collects every mismatch (HF key, HF value, muonforge key and
// value) and throws one mf::Error listing them all. Keys HF treats as optional are compared with
// HF's defaults. Not compared: max_position_embeddings (RoPE weights do not depend on it) and
// aux_loss_alpha (a training hyper-parameter like the learning rate; the weights do not depend
// on it). topk_method is compared because it decides whether the bias tensors exist.
void check_hf_config(const nlohmann::json& hf, const ModelConfig& m, const std::string& path);

// The model section a Hugging Face Llama (or muonforge_moe) config.json describes (the other
// fields keep their defaults). Throws naming `path` and the key for features muonforge does not
// implement (rope_scaling, biases, another activation, head_dim != hidden_size / heads, MoE
// group-limited routing).
ModelConfig model_config_from_hf(const nlohmann::json& hf, const std::string& path);

// Reads `<dir>/config.json`; errors name the directory or file.
nlohmann::json read_hf_config(const std::string& dir);

// The safetensors files of a model directory: `<dir>/model.safetensors`, or the shards listed
// in `<dir>/model.safetensors.index.json` ("weight_map"), sorted. Errors name what is missing:
// the directory, config.json, the weights, a shard named by the index.
std::vector<std::string> hf_model_files(const std::string& dir);

// (name, shape) of every parameter of `m` (dense Llama, or MoE with the DeepSeek-V3 names of
// model/moe.h), in Hugging Face naming and the model's parameter order.
std::vector<std::pair<std::string, Shape>> expected_param_names(const ModelConfig& m);

// Tensors of a Hugging Face model directory, found by name across shards.
class HfWeights {
 public:
  explicit HfWeights(const std::string& dir);               // uses hf_model_files(dir)
  explicit HfWeights(const std::vector<std::string>& files);  // explicit safetensors files

  const std::string& source() const { return source_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const std::string& file_of(const std::string& name) const;
  Shape shape_of(const std::string& name) const;
  // Reads `name` as host f32, checking its shape; errors name the tensor, both shapes and file.
  Tensor read_f32(const std::string& name, const Shape& expected) const;
  // Same into an existing host f32 tensor (its shape is the expected one).
  void read_f32_into(const std::string& name, const Tensor& dst) const;

 private:
  void open_files(const std::vector<std::string>& files);
  const SafetensorsReader& reader(const std::string& name) const;
  std::string source_;  // directory or file list, for messages
  std::vector<std::unique_ptr<SafetensorsReader>> readers_;
  std::map<std::string, size_t> where_;  // tensor name -> reader index
};

}  // namespace mf
