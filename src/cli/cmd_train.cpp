// `muonforge train` and `muonforge eval`.
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cli/args.h"
#include "cli/commands.h"
#include "config/config.h"
#include "core/error.h"
#include "core/log.h"
#include "data/loader.h"
#include "dist/env.h"
#include "model/llama.h"
#include "optim/mup.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace mf {

namespace {

const char* kTrainUsage =
    "usage: muonforge train CONFIG.json [--set key.path=value]... [--resume [CKPT_DIR] | --no-resume]\n"
    "\n"
    "Trains the model described by CONFIG.json (see docs/config.md). The run directory\n"
    "(run.dir, default runs/{name}) receives config.json, log.txt, metrics.jsonl, mup_table.csv,\n"
    "ckpt-NNNNNN/ and latest (the newest checkpoint's name); see README.md.\n"
    "When it already holds a checkpoint the run resumes from the latest one. One training\n"
    "process per run directory (run.dir/.lock): a second one is refused.\n"
    "\n"
    "options:\n"
    "  --set k=v      override a config value, e.g. --set optim.lr=0.01 --set train.max_steps=50\n"
    "                 (repeatable; --set=k=v works too)\n"
    "  --resume DIR   resume from this checkpoint directory (or a run directory's latest)\n"
    "  --resume       (no value) resume from run.dir's latest checkpoint, as without the option,\n"
    "                 but it is an error when there is none rather than a fresh start\n"
    "  --no-resume    start from scratch even if the run directory has checkpoints; they are\n"
    "                 moved to run.dir/superseded-N/, not deleted (the same for checkpoints\n"
    "                 past the one --resume names). A launcher restart resumes regardless.\n"
    "  --stop-at N    checkpoint and exit after step N (continue later with a larger N or\n"
    "                 without it); a run already at step N or past it exits at once\n"
    "  --quiet        no per-step lines, tables or config on the console (log.txt keeps the\n"
    "                 step lines and tables, config.json the config); val losses, checkpoints\n"
    "                 and warnings are still shown\n"
    "  --init-only    write the initial weights as ckpt-000000 and exit (a reference to start from)\n"
    "  --dump-batches FILE  write every micro-batch's inputs then targets (int32, B x T each)\n"
    "  --dump-routing FILE  MoE: write every micro-batch's expert choices (int32, per MoE layer\n"
    "                 in order, B x T x top_k each) for a reference to route by\n"
    "  -h, --help     show this help\n"
    "Ctrl-C (SIGINT), SIGTERM or SIGHUP finishes the current step, writes a checkpoint and\n"
    "exits with 128 + the signal's number (130, 143, 129); a second Ctrl-C exits at once (a\n"
    "repeated SIGTERM or SIGHUP does not: Slurm and the launcher may both send one). SIGHUP\n"
    "ignored at start (nohup) stays ignored.\n";

const char* kEvalUsage =
    "usage: muonforge eval CKPT_DIR|RUN_DIR [--data GLOB] [--batches N] [--device auto|cpu|cuda]\n"
    "\n"
    "Evaluates the weights of a checkpoint (a run directory: its latest) on token shards\n"
    "(default: the run's data.val) and prints the mean cross-entropy loss and perplexity.\n"
    "\n"
    "options:\n"
    "  --data GLOB    token shards to evaluate on (default: the checkpoint's data.val)\n"
    "  --batches N    micro-batches of train.micro_batch x train.seq_len tokens, or all\n"
    "                 (default train.eval_batches, where 0 is all; fewer, each read once, when\n"
    "                 the shards hold fewer)\n"
    "  --device D     auto | cpu | cuda (default: the checkpoint's train.device)\n"
    "  -h, --help     show this help\n";


}  // namespace

int cmd_train(const Args& args) {
  std::string path;
  std::vector<std::string> sets;
  TrainOptions opts;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kTrainUsage, stdout);
      return 0;
    } else if (a == "--set" || a.rfind("--set=", 0) == 0) {
      sets.push_back(set_value(args, i, "train"));
    } else if (a == "--resume") {
      // Bare (last, or before another option): the run directory's latest checkpoint, which
      // must exist; with a value: that checkpoint or run directory.
      if (i + 1 >= args.size() || (!args[i + 1].empty() && args[i + 1][0] == '-'))
        opts.must_resume = true;
      else
        opts.resume = option_value(args, i, "train");
    } else if (a == "--no-resume") {
      opts.no_resume = true;
    } else if (a == "--stop-at") {
      opts.stop_at = next_int_in(args, i, "train", 1);
    } else if (a == "--quiet") {
      opts.quiet = true;
    } else if (a == "--init-only") {
      opts.init_only = true;
    } else if (a == "--dump-batches") {
      opts.dump_batches = option_value(args, i, "train");
    } else if (a == "--dump-routing") {
      opts.dump_routing = option_value(args, i, "train");
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("train: unknown option ", a, " (see muonforge train --help", set_hint(a), ")");
    } else {
      MF_CHECK(path.empty(), "train: more than one config given (", path, ", ", a, ")");
      path = a;
    }
  }
  if (path.empty()) {
    std::fputs(kTrainUsage, stderr);
    if (!opts.resume.empty())  // `train --resume CONFIG`: --resume took the config as its value
      std::fprintf(stderr, "\nerror: train: no CONFIG given (--resume took '%s' as the checkpoint "
                   "to resume); give the config first: muonforge train CONFIG --resume [CKPT]\n",
                   opts.resume.c_str());
    else
      std::fputs("\nerror: train: no CONFIG given\n", stderr);
    return 2;
  }
  MF_CHECK((opts.resume.empty() && !opts.must_resume) || !opts.no_resume,
           "train: --resume and --no-resume contradict each other; give one");
  Config cfg = load_config(path, sets);
  // Rank 0 alone: every rank runs the same config (the trainer checks that), and a dump per rank would
  // fill the launcher's tail of a failing rank with config lines instead of its error.
  // --quiet leaves it out: it is in the run directory's config.json (and each checkpoint's).
  if (read_dist_env().rank == 0 && !opts.quiet)
    spdlog::info("config {} resolved:\n{}", path, config_to_string(cfg));
  Trainer t(cfg, opts);
  TrainResult r = t.run();
  // Stopped by a signal, with a checkpoint: 128 + its number, as the shell reports a process
  // the signal ended (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), so schedulers see the interruption.
  return r.interrupted && stop_requested() ? 128 + stop_signal() : 0;
}

int cmd_eval(const Args& args) {
  std::string ckpt, data, device;
  int batches = -1;  // -1: train.eval_batches; 0 (--batches all): every micro-batch
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kEvalUsage, stdout);
      return 0;
    } else if (a == "--data") {
      data = option_value(args, i, "eval");
    } else if (a == "--batches") {
      if (i + 1 < args.size() && args[i + 1] == "all") {
        ++i;
        batches = 0;
      } else {
        batches = next_int_in(args, i, "eval", 1);
      }
    } else if (a == "--device") {
      device = option_value(args, i, "eval");
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("eval: unknown option ", a, " (see muonforge eval --help)");
    } else {
      MF_CHECK(ckpt.empty(), "eval: more than one checkpoint given (", ckpt, ", ", a, ")");
      ckpt = a;
    }
  }
  if (ckpt.empty()) {
    std::fputs(kEvalUsage, stderr);
    return 2;
  }
  ckpt = resolve_checkpoint_dir(ckpt, "eval");  // a run directory: its newest checkpoint
  const std::string cpath = (fs::path(ckpt) / "config.json").string();
  Config cfg = load_config(cpath);
  if (!device.empty()) cfg.train.device = device;
  const bool data_given = !data.empty();
  if (!data_given) data = cfg.data.val;
  MF_CHECK(!data.empty(), "eval: the run has no data.val; pass --data GLOB");
  if (batches < 0) batches = cfg.train.eval_batches;
  auto be = make_backend(cfg.train.device);
  be->set_precision(cfg.train.precision);  // a fp32 run evaluates in fp32 on CUDA too
  be->set_loss_chunk_mb(cfg.train.loss_chunk_mb);
  LlamaModel model(cfg.model, *be, cfg.train.micro_batch, cfg.train.seq_len,
                   mup_model_scales(cfg));  // µP logit / attention / residual scalars
  load_checkpoint(ckpt, model.params(), *be, nullptr);
  model.sync_weights();
  DataLoaderOptions lo;
  lo.B = cfg.train.micro_batch;
  lo.T = cfg.train.seq_len;
  lo.vocab_size = cfg.model.vocab_size;
  lo.vocab_fixed_by = "the checkpoint " + ckpt;
  lo.label = data_given ? "--data" : "data.val of " + cpath + " (or pass --data GLOB)";
  DataLoader loader(data, lo);
  const int reading = loader.eval_batches(batches);  // each micro-batch once, as training's
  if (batches > reading)
    std::fprintf(stderr, "eval: %s holds %d micro-batch(es) of %lld x %lld tokens, fewer than "
                 "the %d asked for: the loss is the mean over those, each read once\n",
                 data.c_str(), reading, (long long)lo.B, (long long)lo.T, batches);
  batches = reading;
  const int64_t N = lo.B * lo.T;
  std::vector<int32_t> in(N), tg(N);
  double s = 0;
  for (int i = 0; i < batches; ++i) {
    loader.next(in.data(), tg.data());
    s += model.forward(in.data(), tg.data());
  }
  s /= batches;
  std::printf("eval %s: loss %.6f  perplexity %.3f  (%d x %lld tokens from %s)\n", ckpt.c_str(), s,
              std::exp(s), batches, (long long)N, data.c_str());
  // Finite weights (load_checkpoint checks) can still overflow: not a loss to report as one.
  MF_CHECK(std::isfinite(s), "eval: the loss of ", ckpt, " is not finite (", s, ")");
  return 0;
}

}  // namespace mf
