// Hugging Face interop at the model level: export a checkpoint as a LlamaForCausalLM directory
// (config.json + model.safetensors; MoE models: a "muonforge_moe" config.json with the
// DeepSeek-V3 MoE keys and tensor names, see io/hf.h) and initialise a model from such a
// directory.
#pragma once
#include <map>
#include <string>

#include "backend/backend.h"
#include "config/config.h"
#include "core/tensor.h"
#include "model/params.h"

namespace mf {

// The factors µP's model scalars (logit, residual and attention multipliers) fold into the
// weights on export, by tensor name (empty without µP; tensors not listed keep factor 1). Throws
// for tied embeddings with a logit multiplier other than 1.
std::map<std::string, double> export_weight_factors(const Config& cfg);

// Writes OUTDIR/config.json and OUTDIR/model.safetensors (store_as F32 or BF16) from a checkpoint
// directory of ours, with µP's multipliers folded into the weights (export_weight_factors), so
// the exported model computes the same logits with Hugging Face's plain Llama (or our SP model).
// Returns the number of tensors written.
int export_checkpoint(const std::string& ckpt_dir, const std::string& out_dir, DType store_as);

// Loads weights from a Hugging Face Llama (or muonforge_moe) directory into params after checking
// its config.json against `m` (every mismatch named). Compute copies must be synced by the caller.
void load_hf_model(const std::string& dir, const ModelConfig& m, const ParamList& params,
                   Backend& be);

}  // namespace mf
