// muonforge: pretraining Llama-style dense and MoE models with Muon and AdamW.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "core/version.h"

namespace {

struct Command {
  std::function<int(const mf::Args&)> fn;
  const char* summary;
};

const std::map<std::string, Command>& commands() {
  static const std::map<std::string, Command> c = {
      {"train", {mf::cmd_train, "train a model from a JSON config (resumes automatically)"}},
      {"eval", {mf::cmd_eval, "evaluate a checkpoint on the validation shards"}},
      {"export", {mf::cmd_export, "export a checkpoint as a Hugging Face model directory"}},
      {"import", {mf::cmd_import, "turn a Hugging Face model directory into a checkpoint"}},
      {"inspect", {mf::cmd_inspect, "what a token shard, a checkpoint or a .safetensors file holds"}},
      {"config", {mf::cmd_config, "resolve, validate and print a config"}},
      {"sample", {mf::cmd_sample, "generate text from a checkpoint (prompt continuation)"}},
      {"bench", {mf::cmd_bench, "time training steps on synthetic tokens: tokens/s, MFU, memory"}},
  };
  return c;
}

void usage() {
  std::printf(
      "usage: muonforge <command> [options]\n\n"
      "Pretrain Llama-style dense and Mixture-of-Experts models with Muon and AdamW.\n\n"
      "commands:\n");
  for (auto& [name, c] : commands()) std::printf("  %-9s %s\n", name.c_str(), c.summary);
  std::printf("\nRun 'muonforge <command> --help' for the options of a command, 'muonforge "
              "--version' for the version and commit.\n");
}

}  // namespace

int main(int argc, char** argv) {
  mf::setup_logging();
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  if (!std::strcmp(argv[1], "--version") || !std::strcmp(argv[1], "version")) {
    std::printf("muonforge %s (commit %s, CUDA backend %s)\n", mf::version(), mf::build_commit(),
#ifdef MF_HAS_CUDA
                "built in"
#else
                "not built"
#endif
    );
    return 0;
  }
  auto it = commands().find(argv[1]);
  if (it == commands().end()) {
    std::fprintf(stderr, "muonforge: unknown command '%s'\n\n", argv[1]);
    usage();
    return 2;
  }
  mf::Args args(argv + 2, argv + argc);
  try {
    return it->second.fn(args);
  } catch (const std::exception& e) {  // mf::Error and the rest: one line, exit 1
    // The source location is for bug reports: log.txt keeps it, the console shows it on request.
    const char* src = std::getenv("MF_ERROR_SOURCE");
    const bool with_source = src && std::string(src) == "1";
    std::fprintf(stderr, "error: %s\n",
                 (with_source ? std::string(e.what()) : mf::without_source(e.what())).c_str());
    mf::log_file_only(std::string("error: ") + e.what());  // the run's log.txt, if it has one
    return 1;
  }
}
