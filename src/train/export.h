// Hugging Face interop at the model level: export a checkpoint as a LlamaForCausalLM directory
// (config.json + model.safetensors; MoE models: a "muonforge_moe" config.json with the
// DeepSeek-V3 MoE keys and tensor names, see io/hf.h) and initialise a model from such a
// directory.
#pragma once
#include <map>
#include <string>
#include <vector>

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
// its config.json against `m` (every mismatch named). Tensors named in `unfold` are divided by
// their factor: pass export_weight_factors(cfg) so that a µP model starts out computing the
// logits of the Hugging Face model (the inverse of export's folding). Compute copies must be
// synced by the caller.
void load_hf_model(const std::string& dir, const ModelConfig& m, const ParamList& params,
                   Backend& be, const std::map<std::string, double>& unfold = {});

// The config of a Hugging Face model directory: the model section from its config.json
// (model_config_from_hf), every other section from `base_path` (empty: the defaults), and
// train.init_from set to the directory, then `overrides` ("a.b=v") applied and all validated.
Config config_for_hf_model(const std::string& hf_dir, const std::string& base_path,
                           const std::vector<std::string>& overrides);

// `muonforge import`: writes OUT_DIR as a checkpoint of ours at step 0 (config.json = cfg,
// model.safetensors in f32, state.json) from the Hugging Face model in hf_dir, with µP's
// multipliers divided out of the weights when cfg enables µP. eval, sample and export read it;
// `train OUT_DIR/config.json` starts from the same weights through train.init_from. OUT_DIR must
// be new or empty. Returns the number of tensors written.
int import_hf_model(const std::string& hf_dir, const Config& cfg, const std::string& out_dir);

}  // namespace mf
