// `muonforge export CKPT OUTDIR`: a checkpoint as a Hugging Face LlamaForCausalLM directory.
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
#include "train/export.h"

namespace mf {

namespace {
const char* kUsage =
    "usage: muonforge export CKPT_DIR OUTDIR [--dtype f32|bf16]\n"
    "\n"
    "Writes OUTDIR/config.json (LlamaForCausalLM) and OUTDIR/model.safetensors from a checkpoint\n"
    "directory (runs/NAME/ckpt-NNNNNN). Load it with transformers:\n"
    "  AutoModelForCausalLM.from_pretrained(\"OUTDIR\")\n"
    "MoE models get a \"muonforge_moe\" config.json (Llama keys + DeepSeek-V3 MoE keys, tensors\n"
    "under the DeepSeek-V3 names) that train.init_from reads; transformers has no class for it.\n";
}

int cmd_export(const Args& args) {
  std::vector<std::string> pos;
  DType dt = DType::F32;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--dtype") {
      MF_CHECK(i + 1 < args.size(), "export: --dtype needs a value (f32 or bf16)");
      const std::string v = args[++i];
      MF_CHECK(v == "f32" || v == "bf16", "export: --dtype ", v, ": expected f32 or bf16");
      dt = v == "bf16" ? DType::BF16 : DType::F32;
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("export: unknown option ", a, " (see muonforge export --help)");
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  int n = export_checkpoint(pos[0], pos[1], dt);
  std::printf("exported %d tensors from %s to %s (config.json + model.safetensors)\n", n,
              pos[0].c_str(), pos[1].c_str());
  return 0;
}

}  // namespace mf
