// `muonforge sample CKPT_OR_RUN_DIR`: generate text from a checkpoint.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "config/config.h"
#include "core/error.h"
#include "model/llama.h"
#include "optim/mup.h"
#include "train/checkpoint.h"
#include "train/sample.h"

namespace fs = std::filesystem;

namespace mf {

namespace {

const char* kUsage =
    "usage: muonforge sample CKPT_OR_RUN_DIR [--prompt TEXT | --prompt-ids 1,2,3] [--tokens N]\n"
    "                        [--temperature T | --greedy] [--top-k K] [--seed S] [--context N]\n"
    "                        [--ids] [--no-kv-cache] [--device auto|cpu|cuda]\n"
    "\n"
    "Continues a prompt with the weights of a checkpoint (runs/NAME/ckpt-NNNNNN, or a run\n"
    "directory runs/NAME for its newest checkpoint) and prints the result.\n"
    "\n"
    "options:\n"
    "  --prompt TEXT      prompt as text; byte-level models only (vocab_size 256). Default \"\\n\"\n"
    "  --prompt-ids LIST  prompt as comma-separated token ids (any vocabulary, e.g. GPT-2's:\n"
    "                     encode with the tokenizer the data was prepared with)\n"
    "  --tokens N         tokens to generate (default 200)\n"
    "  --temperature T    softmax temperature (default 1.0); 0 is greedy\n"
    "  --greedy           same as --temperature 0\n"
    "  --top-k K          sample among the K most likely tokens only (default 0: all)\n"
    "  --seed S           sampling seed (default 1337): same seed, same text\n"
    "  --context N        context window in tokens (default train.seq_len; at most\n"
    "                     model.max_seq_len). A full cache is refilled with the newest N/2.\n"
    "  --no-kv-cache      rerun the model's forward over the newest N tokens for every token\n"
    "                     (slower; the reference the key/value cache is tested against)\n"
    "  --ids              print token ids (the default when the vocabulary is not bytes)\n"
    "  --device D         auto | cpu | cuda for loading the model (default: the checkpoint's\n"
    "                     train.device); decoding with the cache always runs on the CPU\n"
    "  -h, --help         show this help\n"
    "The text goes to stdout as it is generated; a header line goes to stderr.\n";

std::vector<int32_t> parse_ids(const std::string& list) {
  std::vector<int32_t> ids;
  std::istringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) {
    std::istringstream one(item);
    long long x = 0;
    one >> x;
    MF_CHECK(one && (one >> std::ws).peek() == EOF && x >= 0 && x <= INT32_MAX,
             "sample: --prompt-ids: '", item, "' is not a token id (expected e.g. 464,2068,7586)");
    ids.push_back(int32_t(x));
  }
  return ids;
}

}  // namespace

int cmd_sample(const Args& args) {
  std::string path, prompt_text, prompt_ids, device;
  bool have_text = false, have_ids = false, print_ids = false, have_temp = false, greedy = false;
  int context = 0;
  SampleOptions o;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--prompt") {
      prompt_text = option_value(args, i, "sample");
      have_text = true;
    } else if (a == "--prompt-ids") {
      prompt_ids = option_value(args, i, "sample");
      have_ids = true;
    } else if (a == "--tokens") {
      o.max_new_tokens = next_int_in(args, i, "sample", 0);
    } else if (a == "--temperature") {
      o.temperature = next_double(args, i, "sample");
      have_temp = true;
    } else if (a == "--greedy") {
      greedy = true;
    } else if (a == "--top-k") {
      o.top_k = next_int_in(args, i, "sample", 0);
    } else if (a == "--seed") {
      o.seed = uint64_t(next_int(args, i, "sample"));
    } else if (a == "--context") {
      context = next_int_in(args, i, "sample", 1);
    } else if (a == "--no-kv-cache") {
      o.kv_cache = false;
    } else if (a == "--ids") {
      print_ids = true;
    } else if (a == "--device") {
      device = option_value(args, i, "sample");
    } else if (!a.empty() && a[0] == '-') {
      MF_FAIL("sample: unknown option ", a, " (see muonforge sample --help)");
    } else {
      MF_CHECK(path.empty(), "sample: more than one directory given (", path, ", ", a, ")");
      path = a;
    }
  }
  if (path.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  MF_CHECK(!(have_text && have_ids), "sample: give --prompt or --prompt-ids, not both");
  MF_CHECK(!have_ids || !prompt_ids.empty(), "sample: --prompt-ids is empty (give token ids, e.g. "
           "--prompt-ids 464,2068,7586)");
  MF_CHECK(!(greedy && have_temp), "sample: give --greedy or --temperature, not both (--greedy "
           "is --temperature 0)");
  if (greedy) o.temperature = 0;
  MF_CHECK(o.temperature >= 0, "sample: --temperature ", o.temperature, " must be >= 0");

  const std::string ckpt = resolve_checkpoint_dir(path, "sample");
  Config cfg = load_config((fs::path(ckpt) / "config.json").string());
  if (!device.empty()) cfg.train.device = device;
  const int64_t V = cfg.model.vocab_size;
  const bool bytes = V == 256;
  if (!bytes) print_ids = true;

  std::vector<int32_t> prompt;
  if (have_ids) {
    prompt = parse_ids(prompt_ids);
  } else {
    MF_CHECK(bytes || !have_text, "sample: --prompt needs a byte-level model (vocab_size 256); ",
             "this one has vocab_size ", V, ": encode the prompt with its tokenizer and pass "
             "--prompt-ids");
    MF_CHECK(bytes, "sample: this model has vocab_size ", V,
             ": pass the prompt as token ids with --prompt-ids");
    if (!have_text) prompt_text = "\n";
    for (unsigned char c : prompt_text) prompt.push_back(int32_t(c));
  }
  MF_CHECK(!prompt.empty(), "sample: the prompt is empty");
  // Before anything is printed (scripts/sample.py starts echoing the prompt at the " |").
  check_prompt_ids(prompt, V);

  const int max_T = cfg.model.max_seq_len;
  if (context <= 0) context = std::min(cfg.train.seq_len, max_T);
  MF_CHECK(context <= max_T, "sample: --context ", context, " exceeds model.max_seq_len ", max_T);
  // No longer window than the text will ever be: fewer wasted positions per token.
  const int64_t needed = int64_t(prompt.size()) + o.max_new_tokens;
  const int T = int(std::max<int64_t>(1, std::min<int64_t>(context, needed)));

  auto be = make_backend(cfg.train.device);
  be->set_precision(cfg.train.precision);  // a fp32 run evaluates in fp32 on CUDA too
  LlamaModel model(cfg.model, *be, 1, T, mup_model_scales(cfg));
  nlohmann::json state = load_checkpoint(ckpt, model.params(), *be, nullptr);
  model.sync_weights();
  std::fprintf(stderr, "sample: %s (step %s) on %s, window %d tokens%s, temperature %g, "
               "top-k %d, seed %llu\n", ckpt.c_str(),
               state.value("step", nlohmann::json()).dump().c_str(),
               o.kv_cache ? "cpu (key/value cache)" : be->name().c_str(), T,
               o.kv_cache ? "" : " (no cache)", o.temperature, o.top_k, (unsigned long long)o.seed);

  if (print_ids) {
    for (size_t i = 0; i < prompt.size(); ++i) std::printf("%s%d", i ? " " : "", prompt[i]);
    std::printf(" |");
  } else {
    std::fwrite(prompt_text.data(), 1, prompt_text.size(), stdout);
  }
  std::fflush(stdout);
  generate(model, prompt, o, [&](int32_t tok) {
    if (print_ids)
      std::printf(" %d", tok);
    else
      std::fputc(tok, stdout);
    std::fflush(stdout);
  });
  std::printf("\n");
  return 0;
}

}  // namespace mf
