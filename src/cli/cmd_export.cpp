// `muonforge export CKPT OUTDIR`: a checkpoint as a Hugging Face LlamaForCausalLM directory.
// `muonforge import HF_DIR OUTDIR`: the reverse, a Hugging Face model as a checkpoint of ours.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "config/config.h"
#include "io/atomic_file.h"
#include "io/json_file.h"
#include "train/checkpoint.h"
#include "train/export.h"

namespace fs = std::filesystem;

namespace mf {

namespace {
const char* kUsage =
    "usage: muonforge export CKPT_DIR OUTDIR [--dtype f32|bf16] [--eos-id N] [--bos-id N]\n"
    "\n"
    "Writes OUTDIR/config.json (LlamaForCausalLM) and OUTDIR/model.safetensors from a checkpoint\n"
    "directory (runs/NAME/ckpt-NNNNNN; a run directory runs/NAME: its latest). Load it with\n"
    "transformers:\n"
    "  AutoModelForCausalLM.from_pretrained(\"OUTDIR\")\n"
    "MoE models get a \"muonforge_moe\" config.json (Llama keys + DeepSeek-V3 MoE keys, tensors\n"
    "under the DeepSeek-V3 names) that train.init_from reads; transformers has no class for it.\n"
    "\n"
    "options:\n"
    "  --dtype f32|bf16  dtype of the tensors in model.safetensors (default f32; an MoE router's\n"
    "                    e_score_correction_bias stays f32, as in DeepSeek-V3)\n"
    "  --eos-id N, --bos-id N  the tokenizer's end / start token ids for config.json (default\n"
    "                    unset: the checkpoint does not know its tokenizer). GPT-2 tokens\n"
    "                    (scripts/prepare_data.py --tokenizer gpt2): --eos-id 50256 --bos-id\n"
    "                    50256, so that transformers' generate() stops at <|endoftext|>\n"
    "  -h, --help        show this help\n";

const char* kImportUsage =
    "usage: muonforge import HF_DIR OUTDIR [--config BASE.json] [--set KEY=VALUE]...\n"
    "\n"
    "Turns a Hugging Face Llama model directory (config.json + model.safetensors, or shards with\n"
    "model.safetensors.index.json; or a muonforge_moe export) into a muonforge checkpoint\n"
    "directory at step 0: OUTDIR/config.json, model.safetensors (f32) and state.json.\n"
    "The config's model section comes from HF_DIR/config.json; the other sections from\n"
    "--config BASE.json (default: the built-in defaults), then --set. train.init_from is set to\n"
    "HF_DIR and run.name to OUTDIR's name (unless --set gives one), and under µP (mup.enabled)\n"
    "the multipliers are divided out of the weights, so the checkpoint computes the Hugging Face\n"
    "model's logits. Then, for example:\n"
    "  muonforge eval OUTDIR --data 'data/x/val_*.bin'\n"
    "  muonforge sample OUTDIR --prompt 'Once upon a time'\n"
    "  muonforge train OUTDIR/config.json   (a fine-tune from HF_DIR's weights in runs/<OUTDIR's name>)\n"
    "\n"
    "options:\n"
    "  --config BASE.json  the non-model sections from BASE.json (default: the built-in defaults)\n"
    "  --set KEY=VALUE     override a key (repeatable; --set=KEY=VALUE works too)\n"
    "  -h, --help          show this help\n";
}

int cmd_export(const Args& args) {
  std::vector<std::string> pos;
  DType dt = DType::F32;
  int64_t eos = -1, bos = -1;
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
    } else if (a == "--eos-id" || a == "--bos-id") {
      (a == "--eos-id" ? eos : bos) = next_int_in(args, i, "export", 0);
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
  const std::string ckpt = resolve_checkpoint_dir(pos[0], "export");  // a run dir: its latest
  const fs::path out(pos[1]);
  MF_CHECK(!fs::exists(out) || fs::is_directory(out), "export: OUTDIR ", pos[1],
           " exists and is not a directory");
  // Like save_pretrained, an existing Hugging Face directory is written over; one of our
  // checkpoints or run directories is not (its config.json and weights would be replaced).
  MF_CHECK(!fs::exists(out / "state.json"), "export: OUTDIR ", pos[1], " holds a muonforge "
           "checkpoint (state.json); exporting there would replace its weights and config: give "
           "another directory");
  MF_CHECK(find_latest_checkpoint(pos[1]).empty(), "export: OUTDIR ", pos[1], " is a muonforge "
           "run directory (it holds ckpt-NNNNNN checkpoints): give another directory");
  std::vector<std::string> replaced;
  for (const char* f : {"config.json", "model.safetensors"})
    if (fs::exists(out / f)) replaced.push_back(f);
  // The special ids are checked against the checkpoint's vocabulary before anything is written.
  int64_t vocab = 0;
  {
    const nlohmann::json c = peek_json_file((fs::path(ckpt) / "config.json").string());
    if (c.is_object() && c.contains("model") && c["model"].is_object())
      vocab = c["model"].value("vocab_size", int64_t(0));
  }
  for (auto [name, id] : {std::pair<const char*, int64_t>{"--eos-id", eos}, {"--bos-id", bos}})
    MF_CHECK(id < 0 || vocab <= 0 || id < vocab, "export: ", name, " ", id,
             " is not below the model's vocab_size ", vocab);
  int n = export_checkpoint(ckpt, pos[1], dt);
  if (eos >= 0 || bos >= 0) {
    const std::string cfg_path = (out / "config.json").string();
    nlohmann::json hf = read_json_file(cfg_path, "exported config");  // just written
    if (eos >= 0) hf["eos_token_id"] = eos;
    if (bos >= 0) hf["bos_token_id"] = bos;
    atomic_write_text(cfg_path, hf.dump(2) + "\n");
  }
  std::printf("exported %d tensors from %s to %s (config.json + model.safetensors)\n", n,
              ckpt.c_str(), pos[1].c_str());
  if (eos < 0 && vocab >= 50257)
    std::printf("config.json has no eos_token_id: for GPT-2 tokens give --eos-id 50256 --bos-id "
                "50256 (transformers' generate() stops at it)\n");
  if (!replaced.empty())
    std::printf("replaced the %s already in %s\n",
                replaced.size() == 2 ? "config.json and model.safetensors" : replaced[0].c_str(),
                pos[1].c_str());
  return 0;
}

int cmd_import(const Args& args) {
  std::vector<std::string> pos, sets;
  std::string base;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kImportUsage, stdout);
      return 0;
    } else if (a == "--config") {
      base = option_value(args, i, "import");
    } else if (a == "--set" || a.rfind("--set=", 0) == 0) {
      sets.push_back(set_value(args, i, "import"));
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("import: unknown option ", a, " (see muonforge import --help", set_hint(a), ")");
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) {
    std::fputs(kImportUsage, stderr);
    return 2;
  }
  // A run name of its own (OUTDIR's name) unless one is given: BASE's would make
  // `train OUTDIR/config.json` resume BASE's run instead of fine-tuning from these weights.
  bool named = false;
  for (auto& s : sets) named = named || s.rfind("run.name=", 0) == 0;
  if (!named) {
    std::string name = fs::path(pos[1]).lexically_normal().filename().string();
    if (name.empty() || name == "." || name == "..")
      name = fs::absolute(pos[1]).lexically_normal().parent_path().filename().string();
    sets.push_back("run.name=" + name);
  }
  const Config cfg = config_for_hf_model(pos[0], base, sets);
  const int n = import_hf_model(pos[0], cfg, pos[1]);
  std::printf("imported %d tensors from %s into %s (config.json + model.safetensors + state.json)%s\n"
              "next: muonforge eval %s --data GLOB | muonforge sample %s | muonforge train "
              "%s/config.json (fine-tunes in %s)\n",
              n, pos[0].c_str(), pos[1].c_str(),
              cfg.mup.enabled ? "; µP multipliers divided out of the weights" : "", pos[1].c_str(),
              pos[1].c_str(), pos[1].c_str(), cfg.run_dir().c_str());
  return 0;
}

}  // namespace mf
