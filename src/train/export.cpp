#include "train/export.h"

#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "core/log.h"
#include "io/atomic_file.h"
#include "io/hf.h"
#include "io/safetensors.h"
#include "optim/mup.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;

namespace mf {

namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// Host f32 t multiplied by factors[name] (export's folding) or divided by it (import's
// unfolding); tensors not listed keep factor 1.
void apply_factor(Tensor& t, const std::string& name, const std::map<std::string, double>& factors,
                  bool divide) {
  auto it = factors.find(name);
  if (it == factors.end()) return;
  const float x = float(divide ? 1.0 / it->second : it->second);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] *= x;
}

}  // namespace

// µP's model scalars have no place in a Hugging Face Llama, but each multiplies a linear map, so
// it folds into that map's weight: logits x logit_mult -> lm_head; every residual branch x
// residual_mult -> the branch's last projection (o_proj, and down_proj of the dense MLP, of each
// routed expert and of the shared experts, since the MoE output is linear in all of them);
// attention scale s instead of 1/sqrt(head_dim) -> q_proj x s sqrt(head_dim) (RoPE is a rotation,
// so it commutes with scaling q).
std::map<std::string, double> export_weight_factors(const Config& cfg) {
  std::map<std::string, double> f;
  if (!cfg.mup.enabled) return f;
  const ModelScales s = mup_model_scales(cfg);
  const double q = s.attn_scale > 0 ? s.attn_scale * std::sqrt(double(cfg.model.head_dim())) : 1.0;
  for (auto& [name, shape] : expected_param_names(cfg.model)) {
    double x = 1.0;
    if (name == "lm_head.weight") x = s.logit_mult;
    if (is_residual_out_proj(name)) x = s.residual_mult;
    if (ends_with(name, "q_proj.weight")) x = q;
    if (x != 1.0) f[name] = x;
  }
  if (cfg.model.tie_embeddings && s.logit_mult != 1.0)
    MF_FAIL("export: µP logit multiplier ", s.logit_mult, " (d_model ", cfg.model.d_model,
            " vs mup.base_width ", cfg.mup.base_width, ") cannot be folded into tied embeddings: "
            "the lm head is the embedding table, which must stay unscaled. Train with "
            "model.tie_embeddings = false to export a µP model");
  return f;
}

int export_checkpoint(const std::string& ckpt_dir, const std::string& out_dir, DType store_as) {
  const fs::path ck(ckpt_dir);
  MF_CHECK(fs::is_directory(ck), "export: ", ckpt_dir, " is not a directory");
  MF_CHECK(fs::exists(ck / "config.json") && fs::exists(ck / "model.safetensors"), "export: ",
           ckpt_dir, " is not a muonforge checkpoint (needs config.json and model.safetensors)");
  Config cfg = load_config((ck / "config.json").string());
  const std::map<std::string, double> fold = export_weight_factors(cfg);
  const auto expected = expected_param_names(cfg.model);
  SafetensorsReader r((ck / "model.safetensors").string());
  SafetensorsWriter w;
  std::vector<Tensor> keep;
  for (auto& [name, shape] : expected) {
    MF_CHECK(r.contains(name), r.path(), ": tensor ", name, " is missing");
    Tensor t = r.read_f32(name);
    MF_CHECK(t.shape == shape, r.path(), ": tensor ", name, " has shape ", shape_str(t.shape),
             ", expected ", shape_str(shape));
    apply_factor(t, name, fold, false);
    keep.push_back(t);
    // The router's bias stays f32 (as in DeepSeek-V3's own checkpoints): it moves by bias_rate
    // steps (1e-3 in moe-moonlight-small), about bf16's spacing near 0.2, and bf16 rounding
    // would change close top-k choices.
    const bool keep_f32 = name.find("e_score_correction_bias") != std::string::npos;
    w.add(name, t, keep_f32 ? DType::F32 : store_as);
  }
  fs::create_directories(out_dir);
  nlohmann::json hf = hf_config(cfg.model);  // LlamaForCausalLM, or muonforge_moe for MoE
  hf["torch_dtype"] = store_as == DType::BF16 ? "bfloat16" : "float32";
  w.write((fs::path(out_dir) / "model.safetensors").string());
  atomic_write_text((fs::path(out_dir) / "config.json").string(), hf.dump(2) + "\n");
  return int(expected.size());
}

void load_hf_model(const std::string& dir, const ModelConfig& m, const ParamList& params,
                   Backend& be, const std::map<std::string, double>& unfold) {
  nlohmann::json hf = read_hf_config(dir);
  check_hf_config(hf, m, (fs::path(dir) / "config.json").string());
  HfWeights w(dir);
  for (Param* p : params) {
    Tensor h = w.read_f32(p->name, p->shape);
    check_finite_weights(h, p->name, dir);
    apply_factor(h, p->name, unfold, true);
    be.upload(h, p->master);
  }
}

Config config_for_hf_model(const std::string& hf_dir, const std::string& base_path,
                           const std::vector<std::string>& overrides) {
  const nlohmann::json hf = read_hf_config(hf_dir);
  Config c = base_path.empty() ? Config{} : load_config(base_path);
  const ModelConfig base_model = c.model;
  c.model = model_config_from_hf(hf, (fs::path(hf_dir) / "config.json").string());
  // What config.json does not carry (how the model is run, and MoE balancing hyper-parameters)
  // stays BASE's, as with train.init_from and BASE, instead of falling back to the defaults.
  c.model.attention = base_model.attention;
  c.model.recompute = base_model.recompute;
  c.model.moe.bias_rate = base_model.moe.bias_rate;
  c.model.moe.capacity_factor = base_model.moe.capacity_factor;
  if (c.model.moe.balance != "aux_loss") c.model.moe.aux_coef = base_model.moe.aux_coef;
  c.train.init_from = fs::absolute(hf_dir).lexically_normal().string();
  // A training length past the model's context (the default 1024 on a small model) is lowered to
  // the context, unless the overrides set it.
  bool seq_set = false;
  for (const std::string& o : overrides) seq_set = seq_set || o.rfind("train.seq_len=", 0) == 0;
  if (!seq_set && c.train.seq_len > c.model.max_seq_len) {
    spdlog::info("import: train.seq_len {} lowered to the model's context, model.max_seq_len {}",
                 c.train.seq_len, c.model.max_seq_len);
    c.train.seq_len = c.model.max_seq_len;
  }
  // Through JSON so that the overrides are type-checked and the whole config validated, with
  // the Hugging Face directory named as its origin.
  return config_from_json(config_to_json(c), "import of " + hf_dir, ".", overrides);
}

int import_hf_model(const std::string& hf_dir, const Config& cfg, const std::string& out_dir) {
  const fs::path out(out_dir);
  MF_CHECK(!fs::exists(out) || (fs::is_directory(out) && fs::is_empty(out)), "import: ", out_dir,
           " already exists and is not an empty directory; give a new one");
  // The weights as our model holds them: under µP the multipliers export folds in are divided
  // out, so the checkpoint computes the Hugging Face model's logits with cfg's µP scalars.
  const std::map<std::string, double> unfold = export_weight_factors(cfg);
  HfWeights w(hf_dir);
  SafetensorsWriter sw;
  std::vector<Tensor> keep;
  const auto expected = expected_param_names(cfg.model);
  for (auto& [name, shape] : expected) {
    Tensor t = w.read_f32(name, shape);  // names the tensor and file when missing or misshapen
    apply_factor(t, name, unfold, true);
    keep.push_back(t);
    sw.add(name, t, DType::F32);
  }
  fs::create_directories(out);
  sw.set_metadata("muonforge_imported_from", cfg.train.init_from.value_or(hf_dir));
  sw.write((out / "model.safetensors").string());
  atomic_write_text((out / "config.json").string(), config_to_string(cfg) + "\n");
  // state.json last: its presence marks a complete checkpoint.
  nlohmann::json st = {{"step", 0}, {"imported_from", cfg.train.init_from.value_or(hf_dir)}};
  atomic_write_text((out / "state.json").string(), st.dump(2) + "\n");
  return int(expected.size());
}

}  // namespace mf
