// Hugging Face interop for dense Llama (LlamaForCausalLM): config.json mapping, model directory
// resolution (single file or sharded index), and a weight reader across shards. Tensor names and
// shapes are the DESIGN §4 contract (weights [out, in]; lm_head absent when tied).
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

// Checks that a Hugging Face config.json (`path` names it in messages) describes the same dense
// Llama as `m`. Collects every mismatch (HF key, HF value, muonforge key and value) and throws one
// mf::Error listing them all. Keys HF treats as optional are compared with HF's defaults.
// max_position_embeddings is not compared (RoPE weights do not depend on it).
void check_hf_config(const nlohmann::json& hf, const ModelConfig& m, const std::string& path);

// The model section a Hugging Face Llama config.json describes (the other fields keep their
// defaults). Throws naming `path` and the key for features muonforge does not implement
// (rope_scaling, biases, another activation, head_dim != hidden_size / heads).
ModelConfig model_config_from_hf(const nlohmann::json& hf, const std::string& path);

// Reads `<dir>/config.json`; errors name the directory or file.
nlohmann::json read_hf_config(const std::string& dir);

// The safetensors files of a model directory: `<dir>/model.safetensors`, or the shards listed
// in `<dir>/model.safetensors.index.json` ("weight_map"), sorted. Errors name what is missing:
// the directory, config.json, the weights, a shard named by the index.
std::vector<std::string> hf_model_files(const std::string& dir);

// (name, shape) of every parameter of the dense Llama `m`, in Hugging Face naming and order.
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
