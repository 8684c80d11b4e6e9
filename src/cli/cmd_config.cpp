// `muonforge config FILE [--set k=v ...] [--json]`: resolve, validate and print a config.
#include <cstdio>
#include <string>

#include "backend/backend.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "config/config.h"
#include "core/error.h"
#include "model/llama.h"
#include "optim/mup.h"

namespace mf {
namespace {

void config_usage() {
  std::printf(
      "usage: muonforge config FILE [--set KEY=VALUE ...] [--json] [--params]\n\n"
      "Resolves FILE (following \"base\" inheritance), applies the overrides, validates the result\n"
      "and prints the full config with every default filled in.\n\n"
      "options:\n"
      "  --set KEY=VALUE  override one key, e.g. --set optim.lr=3e-3, --set model.tie_embeddings=true,\n"
      "                   --set optim.adamw.betas=[0.9,0.99], --set train.init_from=null\n"
      "                   (VALUE is read as JSON when it parses, else as a string; repeatable;\n"
      "                   --set=KEY=VALUE works too)\n"
      "  --json           print only the JSON (no summary lines), for scripts\n"
      "  --params         also print the per-parameter table training prints and saves as\n"
      "                   mup_table.csv: kind, shape, optimizer, lr, wd, their µP multipliers,\n"
      "                   init std (builds the model's parameter list on the CPU; writes nothing)\n"
      "  -h, --help       show this help\n\n"
      "The world size comes from the WORLD_SIZE environment variable (under srun without it,\n"
      "SLURM_NTASKS; default 1); preview another one with --set train.world_size=N.\n"
      "Exit status: 0 valid, 1 error.\n");
}

}  // namespace

int cmd_config(const Args& args) {
  std::string file;
  std::vector<std::string> overrides;
  bool json_only = false, params = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      config_usage();
      return 0;
    } else if (a == "--json") {
      json_only = true;
    } else if (a == "--params") {
      params = true;
    } else if (a == "--set" || a.rfind("--set=", 0) == 0) {
      overrides.push_back(set_value(args, i, "config"));
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("config: unknown option '", a, "' (see muonforge config --help", set_hint(a), ")");
    } else {
      MF_CHECK(file.empty(), "config: more than one FILE given ('", file, "' and '", a, "')");
      file = a;
    }
  }
  MF_CHECK(!file.empty(),
           "config: missing FILE (usage: muonforge config FILE [--set KEY=VALUE ...] [--json] [--params])");

  MF_CHECK(!(json_only && params), "config: --json prints only the JSON; give --params without it");
  Config c = load_config(file, overrides);
  std::printf("%s\n", config_to_string(c).c_str());
  if (!json_only) {
    const double n = c.model.param_count(), active = c.model.active_param_count();
    std::printf("# parameters: %.0f (%.2fM)", n, n / 1e6);
    if (c.model.moe.n_experts > 0)
      std::printf(", %.0f (%.2fM) active per token (top_k %d of %d routed experts)", active,
                  active / 1e6, c.model.moe.top_k, c.model.moe.n_experts);
    std::printf("\n");
    std::printf(
        "# valid: %s\n# world_size %d, grad_accum %d (batch_tokens %lld = micro_batch %d x seq_len %d "
        "x world_size %d x grad_accum %d)\n# run dir: %s\n",
        file.c_str(), c.train.world_size, c.grad_accum(), c.train.batch_tokens, c.train.micro_batch,
        c.train.seq_len, c.train.world_size, c.grad_accum(), c.run_dir().c_str());
  }
  if (params) {
    // The trainer's own path: the model's parameter list, then apply_mup. One token of
    // activations; the host pages of the weights are mapped lazily and never written here, so
    // even a large model costs little memory.
    auto be = make_backend("cpu");
    LlamaModel model(c.model, *be, 1, 1, mup_model_scales(c));
    const MupResult r = apply_mup(c, model.params());
    std::printf("%s", r.table().c_str());
  }
  return 0;
}

}  // namespace mf
