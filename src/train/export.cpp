#include "train/export.h"

#include <filesystem>

#include "io/atomic_file.h"
#include "io/hf.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;

namespace mf {

int export_checkpoint(const std::string& ckpt_dir, const std::string& out_dir, DType store_as) {
  const fs::path ck(ckpt_dir);
  MF_CHECK(fs::is_directory(ck), "export: ", ckpt_dir, " is not a directory");
  MF_CHECK(fs::exists(ck / "config.json") && fs::exists(ck / "model.safetensors"), "export: ",
           ckpt_dir, " is not a muonforge checkpoint (needs config.json and model.safetensors)");
  Config cfg = load_config((ck / "config.json").string());
  MF_CHECK(!cfg.mup.enabled, "export: ", ckpt_dir, " was trained with mup.enabled; its logit and "
           "attention multipliers have no Hugging Face Llama equivalent yet");
  const auto expected = expected_param_names(cfg.model);
  SafetensorsReader r((ck / "model.safetensors").string());
  SafetensorsWriter w;
  std::vector<Tensor> keep;
  for (auto& [name, shape] : expected) {
    MF_CHECK(r.contains(name), r.path(), ": tensor ", name, " is missing");
    Tensor t = r.read_f32(name);
    MF_CHECK(t.shape == shape, r.path(), ": tensor ", name, " has shape ", shape_str(t.shape),
             ", expected ", shape_str(shape));
    keep.push_back(t);
    w.add(name, t, store_as);
  }
  fs::create_directories(out_dir);
  nlohmann::json hf = hf_config(cfg.model);  // LlamaForCausalLM, or muonforge_moe for MoE
  hf["torch_dtype"] = store_as == DType::BF16 ? "bfloat16" : "float32";
  w.write((fs::path(out_dir) / "model.safetensors").string());
  atomic_write_text((fs::path(out_dir) / "config.json").string(), hf.dump(2) + "\n");
  return int(expected.size());
}

void load_hf_model(const std::string& dir, const ModelConfig& m, const ParamList& params,
                   Backend& be) {
  nlohmann::json hf = read_hf_config(dir);
  check_hf_config(hf, m, (fs::path(dir) / "config.json").string());
  HfWeights w(dir);
  for (Param* p : params) {
    Tensor h = w.read_f32(p->name, p->shape);
    be.upload(h, p->master);
  }
}

}  // namespace mf
