// `muonforge bench CONFIG [--set k=v]... [--steps N] [--warmup N] [--json]`: throughput, MFU,
// memory and time split of training steps on synthetic tokens (no data files needed).
#include <cstdio>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "config/config.h"
#include "core/error.h"
#include "core/log.h"
#include "train/bench.h"

namespace mf {

namespace {

const char* kBenchUsage =
    "usage: muonforge bench CONFIG.json [--set key.path=value]... [options]\n"
    "\n"
    "Builds the model and optimizer of CONFIG on train.device, trains on synthetic random tokens\n"
    "(no data files needed) and prints tokens/s, MFU, peak memory and the time split of a step.\n"
    "Forward and backward run fused, so forward is timed alone on the same micro-batches and\n"
    "backward is reported as (forward+backward) - forward. Muon's share is timed with a separate\n"
    "Muon-only optimizer over the hidden matrices.\n"
    "\n"
    "options:\n"
    "  --set k=v          override a config value (repeatable), e.g. --set train.micro_batch=8\n"
    "                     (--set=k=v works too)\n"
    "  --steps N          timed steps (default 10)\n"
    "  --warmup N         untimed steps first (default 3)\n"
    "  --seq-len N        shortcut: --set train.seq_len=N --set model.max_seq_len=N\n"
    "  --micro-batch N    shortcut: --set train.micro_batch=N\n"
    "  --batch-tokens N   shortcut: --set train.batch_tokens=N\n"
    "  --device D         shortcut: --set train.device=D (auto | cpu | cuda)\n"
    "  --fwd-reps N       forward passes timed alone (default min(grad_accum, 8))\n"
    "  --gemm-size N      n of the n^3 GEMM rate check (default 8192 on CUDA, 1024 on CPU)\n"
    "  --no-gemm          skip the GEMM rate check\n"
    "  --no-muon-split    skip the separate Muon timing\n"
    "  --no-attn          skip timing attention alone\n"
    "  --profile N        N more steps with the region profiler on: time per model region\n"
    "                     (fwd.qkv, bwd.attention, opt.matrix_batched, ...) on the device's\n"
    "                     own timeline (CUDA events), exclusive of nested regions\n"
    "  --quiet            no per-step lines and no memory plan\n"
    "  --json             also print the result as one JSON object on the last line\n"
    "  -h, --help         show this help\n";

}  // namespace

int cmd_bench(const Args& args) {
  std::string path;
  std::vector<std::string> sets;
  BenchOptions o;
  bool json = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kBenchUsage, stdout);
      return 0;
    } else if (a == "--set" || a.rfind("--set=", 0) == 0) {
      sets.push_back(set_value(args, i, "bench"));
    } else if (a == "--steps") {
      o.steps = next_int_in(args, i, "bench", 1);
    } else if (a == "--warmup") {
      o.warmup = next_int_in(args, i, "bench", 0);
    } else if (a == "--seq-len") {  // range-checked here, so an error names --seq-len
      const std::string v = std::to_string(next_int_in(args, i, "bench", 1));
      sets.push_back("train.seq_len=" + v);
      sets.push_back("model.max_seq_len=" + v);
    } else if (a == "--micro-batch") {
      sets.push_back("train.micro_batch=" + std::to_string(next_int_in(args, i, "bench", 1)));
    } else if (a == "--batch-tokens") {
      sets.push_back("train.batch_tokens=" + std::to_string(next_int_in(args, i, "bench", 1)));
    } else if (a == "--device") {
      sets.push_back("train.device=" + option_value(args, i, "bench"));
    } else if (a == "--fwd-reps") {
      o.fwd_reps = next_int_in(args, i, "bench", 0);
    } else if (a == "--gemm-size") {
      o.gemm_size = next_int_in(args, i, "bench", 1, 1 << 16);  // --no-gemm skips it
    } else if (a == "--no-gemm") {
      o.gemm_size = -1;
    } else if (a == "--no-attn") {
      o.attention = false;
    } else if (a == "--profile") {
      o.profile_steps = next_int_in(args, i, "bench", 0);
    } else if (a == "--no-muon-split") {
      o.muon_split = false;
    } else if (a == "--quiet") {
      o.verbose = false;
    } else if (a == "--json") {
      json = true;
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("bench: unknown option ", a, " (see muonforge bench --help", set_hint(a), ")");
    } else {
      MF_CHECK(path.empty(), "bench: more than one config given (", path, ", ", a, ")");
      path = a;
    }
  }
  if (path.empty()) {
    std::fputs(kBenchUsage, stderr);
    return 2;
  }
  sets.push_back("train.world_size=1");  // one process, whatever WORLD_SIZE says
  const Config cfg = load_config(path, sets);
  const nlohmann::json r = run_bench(cfg, o);
  std::fflush(stdout);
  std::fputs(bench_report(r).c_str(), stdout);
  if (json) std::printf("%s\n", r.dump().c_str());
  return 0;
}

}  // namespace mf
