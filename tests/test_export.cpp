// Hugging Face export and init_from: round trip, config checks, CLI errors, and (when a Python
// with transformers is available via MF_HF_PYTHON) logits parity with transformers' LlamaForCausalLM.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "data/shard.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "train/export.h"
#include "train/trainer.h"
#include "io/hf.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace mf;

namespace {

std::string temp_dir(const std::string& tag) {
  fs::path p = fs::temp_directory_path() / ("mf_export_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

Config small(const std::string& root, const std::string& name, bool tied) {
  Rng rng(3);
  std::vector<uint32_t> toks(4000);
  for (auto& t : toks) t = uint32_t(rng.below(48));
  if (!fs::exists(root + "/train_000000.bin")) write_shard(root + "/train_000000.bin", toks, 2);
  Config c;
  c.model.vocab_size = 48;
  c.model.d_model = 32;
  c.model.n_layers = 2;
  c.model.n_heads = 4;
  c.model.n_kv_heads = 2;
  c.model.d_ff = 40;
  c.model.max_seq_len = 16;
  c.model.tie_embeddings = tied;
  c.train.seq_len = 16;
  c.train.micro_batch = 2;
  c.train.batch_tokens = 32;
  c.train.max_steps = 2;
  c.train.eval_every = 0;
  c.train.device = "cpu";
  c.schedule.warmup = 1;
  c.data.train = root + "/train_*.bin";
  c.data.shuffle = false;
  c.run.dir = root + "/" + name;
  return c;
}

int run(const std::string& cmd) {
  int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace

TEST_CASE("export then init_from gives identical weights", "[export]") {
  const std::string root = temp_dir("rt");
  for (bool tied : {false, true}) {
    DYNAMIC_SECTION("tied " << tied) {
      TrainOptions q;
      q.quiet = true;
      Config c = small(root, tied ? "tied" : "untied", tied);
      TrainResult r = Trainer(c, q).run();
      const std::string out = root + (tied ? "/hf_tied" : "/hf_untied");
      int n = export_checkpoint(r.last_checkpoint, out, DType::F32);
      CHECK(n == (tied ? 20 : 21));
      std::ifstream f(out + "/config.json");
      auto hf = nlohmann::json::parse(f);
      CHECK(hf["architectures"][0] == "LlamaForCausalLM");
      CHECK(hf["num_key_value_heads"] == 2);
      CHECK(hf["tie_word_embeddings"] == tied);
      SafetensorsReader w(out + "/model.safetensors");
      CHECK(w.contains("lm_head.weight") == !tied);
      CHECK(w.metadata().at("format") == "pt");

      Config c2 = c;
      c2.run.dir = root + "/from_hf_" + std::to_string(tied);
      c2.train.init_from = out;
      c2.train.max_steps = 0 + 1;
      Trainer t(c2, q);
      SafetensorsReader ck(r.last_checkpoint + "/model.safetensors");
      for (Param* p : t.model().params()) {
        Tensor ref = ck.read_f32(p->name);
        INFO(p->name);
        CHECK(std::equal(ref.f32(), ref.f32() + ref.numel(), p->master.f32()));
      }
      // bf16 export rounds; init_from still loads it.
      export_checkpoint(r.last_checkpoint, out + "_bf16", DType::BF16);
      c2.train.init_from = out + "_bf16";
      c2.run.dir += "_bf16";
      CHECK_NOTHROW(Trainer(c2, q));
      // Our own checkpoint or run directory is named as such, with the two ways to use it
      // (it read as a Hugging Face config missing every key).
      for (const std::string& own : {r.last_checkpoint, c.run.dir}) {
        c2.train.init_from = own;
        c2.run.dir += "_own";
        CHECK_THROWS_WITH(Trainer(c2, q), Catch::Contains("is a muonforge checkpoint or run "
                                                          "directory, not a Hugging Face model") &&
                                              Catch::Contains("muonforge export " + own));
      }
    }
  }
  fs::remove_all(root);
}

TEST_CASE("a µP model exports with its multipliers folded in: same logits as plain Llama",
          "[export][mup]") {
  const std::string root = temp_dir("mup");
  TrainOptions q;
  q.quiet = true;
  Config c = small(root, "mup", false);
  c.mup.enabled = true;
  c.mup.base_width = 8;      // logit multiplier 1/4
  c.mup.base_depth = 1;      // residual multiplier 1/2
  c.mup.base_head_dim = 4;   // attention scale 2/8 instead of 1/sqrt(8)
  c.optim.scale = "spectral";
  TrainResult r = Trainer(c, q).run();
  const auto fold = export_weight_factors(c);
  CHECK(fold.at("lm_head.weight") == Approx(0.25));
  CHECK(fold.at("model.layers.1.mlp.down_proj.weight") == Approx(0.5));
  CHECK(fold.at("model.layers.0.self_attn.o_proj.weight") == Approx(0.5));
  CHECK(fold.at("model.layers.0.self_attn.q_proj.weight") == Approx(0.25 * std::sqrt(8.0)));
  CHECK(fold.count("model.layers.0.self_attn.k_proj.weight") == 0);
  export_checkpoint(r.last_checkpoint, root + "/hf", DType::F32);

  // The µP model as trained (resumed from its checkpoint) and a plain SP Llama loaded from the
  // export must compute the same logits.
  Config resumed = c;
  resumed.train.max_steps = 3;
  Trainer tm(resumed, q);
  Config sp = small(root, "sp", false);
  sp.train.init_from = root + "/hf";
  Trainer ts(sp, q);
  std::vector<int32_t> in(size_t(c.train.micro_batch) * c.train.seq_len);
  Rng rng(11);
  for (auto& t : in) t = int32_t(rng.below(48));
  const std::vector<float> a = tm.model().logits(in.data()), b = ts.model().logits(in.data());
  REQUIRE(a.size() == b.size());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, double(std::fabs(a[i] - b[i])));
    scale = std::max(scale, double(std::fabs(a[i])));
  }
  INFO("max |logit diff| " << worst << ", max |logit| " << scale);
  CHECK(scale > 1e-3);
  CHECK(worst < 1e-5 * std::max(1.0, scale));
  // And back: a µP model initialised from the export divides the multipliers out again, so it
  // computes the same logits as the model that was exported.
  Config back = c;
  back.run.dir = root + "/mup_back";
  back.train.init_from = root + "/hf";
  Trainer tb(back, q);
  const std::vector<float> d = tb.model().logits(in.data());
  double worst_back = 0;
  for (size_t i = 0; i < a.size(); ++i) worst_back = std::max(worst_back, double(std::fabs(a[i] - d[i])));
  INFO("max |logit diff| after init_from into µP " << worst_back);
  CHECK(worst_back < 1e-5 * std::max(1.0, scale));
  // MoE: the residual multiplier folds into every expert's and the shared experts' down_proj.
  Config moe = c;
  moe.model.moe.n_experts = 4;
  moe.model.moe.n_shared = 1;
  moe.model.moe.d_expert = 8;
  const auto mf = export_weight_factors(moe);
  CHECK(mf.at("model.layers.1.mlp.experts.3.down_proj.weight") == Approx(0.5));
  CHECK(mf.at("model.layers.1.mlp.shared_experts.down_proj.weight") == Approx(0.5));
  CHECK(mf.count("model.layers.1.mlp.experts.3.up_proj.weight") == 0);

  // Tied embeddings cannot carry the logit multiplier.
  Config tied = c;
  tied.model.tie_embeddings = true;
  CHECK_THROWS_WITH(export_weight_factors(tied), Catch::Contains("tie_embeddings"));
  fs::remove_all(root);
}

TEST_CASE("init_from checks the Hugging Face config and shapes", "[export]") {
  const std::string root = temp_dir("chk");
  TrainOptions q;
  q.quiet = true;
  Config c = small(root, "a", false);
  TrainResult r = Trainer(c, q).run();
  export_checkpoint(r.last_checkpoint, root + "/hf", DType::F32);
  Config c2 = c;
  c2.run.dir = root + "/b";
  c2.model.d_ff = 48;
  c2.train.init_from = root + "/hf";
  CHECK_THROWS_WITH(Trainer(c2, q), Catch::Contains("intermediate_size") &&
                                        Catch::Contains("config.json"));
  c2.model.d_ff = 40;
  c2.train.init_from = root + "/nowhere";
  CHECK_THROWS_WITH(Trainer(c2, q), Catch::Contains("nowhere"));
  fs::remove_all(root);
}

TEST_CASE("muonforge export command line", "[export][cli]") {
  const std::string root = temp_dir("cli");
  const std::string bin = MF_BINARY;
  TrainOptions q;
  q.quiet = true;
  Config c = small(root, "a", false);
  TrainResult r = Trainer(c, q).run();
  CHECK(run(bin + " export " + r.last_checkpoint + " " + root + "/out") == 0);
  CHECK(fs::exists(root + "/out/model.safetensors"));
  CHECK(run(bin + " export " + root + "/missing " + root + "/out2") == 1);
  CHECK(run(bin + " export " + r.last_checkpoint + " " + root + "/o --dtype fp8") == 1);
  CHECK(run(bin + " export") == 2);
  CHECK(run(bin + " export --help") == 0);
  // An existing export is replaced (as save_pretrained does), and says so; one of our checkpoints
  // or run directories is refused and left as it was.
  int rc = -1;
  std::string out =
      mf::test::run_capture(bin + " export " + r.last_checkpoint + " " + root + "/out", &rc);
  CHECK(rc == 0);
  CHECK(out.find("replaced the config.json and model.safetensors already in") != std::string::npos);
  const auto before = fs::last_write_time(r.last_checkpoint + "/model.safetensors");
  out = mf::test::run_capture(bin + " export " + r.last_checkpoint + " " + r.last_checkpoint, &rc);
  CHECK(rc == 1);
  CHECK(out.find("holds a muonforge checkpoint (state.json)") != std::string::npos);
  const std::string run_dir = fs::path(r.last_checkpoint).parent_path().string();
  out = mf::test::run_capture(bin + " export " + r.last_checkpoint + " " + run_dir, &rc);
  CHECK(rc == 1);
  CHECK(out.find("is a muonforge run directory") != std::string::npos);
  CHECK(!fs::exists(run_dir + "/model.safetensors"));
  CHECK(fs::last_write_time(r.last_checkpoint + "/model.safetensors") == before);
  // inspect: a checkpoint (a run directory: its newest), a safetensors file.
  {
    const std::string rd = fs::path(r.last_checkpoint).parent_path().string();
    out = mf::test::run_capture(bin + " inspect " + rd + " --top 2", &rc);
    INFO(out);
    CHECK(rc == 0);
    CHECK(out.find("checkpoint:  " + r.last_checkpoint + "\n") != std::string::npos);
    CHECK(out.find("step:        " + std::to_string(c.train.max_steps) + " of " +
                   std::to_string(c.train.max_steps)) != std::string::npos);
    CHECK(out.find("optimizer:   " + c.optim.name) != std::string::npos);
    CHECK(out.find("logged:      train loss ") != std::string::npos);
    CHECK(out.find("optimizer.safetensors") != std::string::npos);
    SafetensorsReader model(r.last_checkpoint + "/model.safetensors");
    int64_t values = 0;
    for (const std::string& n : model.names()) values += model.entry(n).numel();
    CHECK(out.find("tensors:     " + std::to_string(model.names().size()) + ", " +
                   std::to_string(values) + " values") != std::string::npos);
    out = mf::test::run_capture(bin + " inspect " + r.last_checkpoint + "/model.safetensors --top 1", &rc);
    CHECK(rc == 0);
    CHECK(out.find("tensors:     " + std::to_string(model.names().size()) + ", ") != std::string::npos);
  }
  // The tokenizer's special ids, when given (checked against the vocabulary before writing).
  out = mf::test::run_capture(bin + " export " + r.last_checkpoint + " " + root + "/ids --eos-id " +
                                  std::to_string(c.model.vocab_size) + " --bos-id 1", &rc);
  CHECK(rc == 1);
  CHECK(out.find("--eos-id " + std::to_string(c.model.vocab_size) +
                 " is not below the model's vocab_size") != std::string::npos);
  CHECK(!fs::exists(root + "/ids"));
  CHECK(run(bin + " export " + r.last_checkpoint + " " + root + "/ids --eos-id 3 --bos-id 1") == 0);
  {
    std::ifstream in(root + "/ids/config.json");
    const nlohmann::json j = nlohmann::json::parse(in);
    CHECK(j["eos_token_id"] == 3);
    CHECK(j["bos_token_id"] == 1);
    std::ifstream in0(root + "/out/config.json");
    CHECK(nlohmann::json::parse(in0)["eos_token_id"].is_null());  // unset by default
  }
  // The export is a Hugging Face directory: sample, eval and export name it as such and say
  // what to do, instead of failing on its config.json as one of ours.
  for (const std::string cmd : {"sample " + root + "/out --tokens 2",
                                "eval " + root + "/out --batches 1",
                                "export " + root + "/out " + root + "/again"}) {
    out = mf::test::run_capture(bin + " " + cmd, &rc);
    INFO(cmd << "\n" << out);
    CHECK(rc == 1);
    CHECK(out.find(root + "/out is a Hugging Face model directory (its config.json has "
                   "\"model_type\": \"llama\")") != std::string::npos);
    CHECK(out.find("muonforge import " + root + "/out OUTDIR") != std::string::npos);
  }
  // inspect reads it as what it is.
  out = mf::test::run_capture(bin + " inspect " + root + "/out --top 1", &rc);
  CHECK(rc == 0);
  CHECK(out.find("Hugging Face model directory: " + root + "/out") != std::string::npos);
  CHECK(out.find("model:       \"llama\"") != std::string::npos);
  fs::remove_all(root);
}

// The loss `muonforge eval` prints for a checkpoint directory (NaN when it fails).
double eval_loss(const std::string& ckpt, const std::string& data, int batches = 4,
                 std::string* output = nullptr) {
  int rc = -1;
  const std::string out = mf::test::run_capture(std::string(MF_BINARY) + " eval " + ckpt + " --data '" +
                                                data + "' --batches " + std::to_string(batches) +
                                                " --device cpu", &rc);
  if (output) *output = out;
  INFO(out);
  const size_t at = out.find(": loss ");
  if (rc != 0 || at == std::string::npos) return std::nan("");
  return std::stod(out.substr(at + 7));
}

TEST_CASE("muonforge eval: --batches past the data evaluates each micro-batch once", "[export][cli]") {
  const std::string root = temp_dir("evalcap");
  TrainOptions q;
  q.quiet = true;
  const TrainResult r = Trainer(small(root, "run", false), q).run();
  const int avail = (4000 - 1) / (2 * 16);  // micro-batches of 2 x 16 (+1 target) in the shard
  std::string out;
  const double whole = eval_loss(r.last_checkpoint, root + "/train_*.bin", avail);
  const double more = eval_loss(r.last_checkpoint, root + "/train_*.bin", avail + 40, &out);
  REQUIRE(std::isfinite(whole));
  CHECK(more == whole);  // it used to read the first 40 twice
  CHECK(out.find("holds " + std::to_string(avail) + " micro-batch(es) of 2 x 16 tokens, fewer than "
                 "the " + std::to_string(avail + 40) + " asked for") != std::string::npos);
  CHECK(eval_loss(r.last_checkpoint, root + "/train_*.bin", avail - 40) != whole);
  fs::remove_all(root);
}

TEST_CASE("muonforge import: a Hugging Face directory becomes a checkpoint of ours", "[export][cli]") {
  const std::string root = temp_dir("import");
  const std::string bin = MF_BINARY;
  TrainOptions q;
  q.quiet = true;
  for (const bool mup : {false, true}) {
    INFO("mup " << mup);
    const std::string tag = mup ? "mup" : "sp";
    Config c = small(root, tag, false);
    if (mup) {  // multipliers that export folds into the weights and import must divide out
      c.mup.enabled = true;
      c.mup.base_width = 8;
      c.mup.base_depth = 1;
      c.mup.base_head_dim = 4;
      c.optim.scale = "spectral";
    }
    const TrainResult r = Trainer(c, q).run();
    export_checkpoint(r.last_checkpoint, root + "/hf_" + tag, DType::F32);
    // The base config supplies every section but the model, which comes from the HF directory.
    Config base = c;
    base.model.d_model = 64;  // overwritten by the import
    base.model.d_ff = 128;
    std::ofstream(root + "/base_" + tag + ".json") << config_to_json(base).dump(2);
    int rc = -1;
    std::string out = mf::test::run_capture(bin + " import " + root + "/hf_" + tag + " " + root + "/imp_" +
                                                tag + " --config " + root + "/base_" + tag + ".json" +
                                                " --set run.name=imported",
                                            &rc);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("imported " + std::to_string(expected_param_names(c.model).size()) + " tensors") !=
          std::string::npos);
    const Config got = load_config(root + "/imp_" + tag + "/config.json");
    CHECK(got.model.d_model == c.model.d_model);
    CHECK(got.model.d_ff == c.model.d_ff);
    CHECK(got.mup.enabled == mup);
    CHECK(got.run.name == "imported");
    REQUIRE(got.train.init_from.has_value());
    CHECK(fs::equivalent(*got.train.init_from, root + "/hf_" + tag));
    // The imported checkpoint computes what the trained one did (µP: multipliers divided out).
    const double want = eval_loss(r.last_checkpoint, root + "/train_*.bin");
    const double have = eval_loss(root + "/imp_" + tag, root + "/train_*.bin");
    REQUIRE(std::isfinite(want));
    CHECK(have == Approx(want).epsilon(1e-5));
    // And it trains on from there: train.init_from points at the HF directory.
    out = mf::test::run_capture(bin + " train " + root + "/imp_" + tag + "/config.json --quiet " +
                                    "--set train.max_steps=1 --set run.dir=" + root + "/ft_" + tag,
                                &rc);
    CHECK(rc == 0);
    CHECK(out.find("initialised from Hugging Face model") != std::string::npos);
  }
  // Errors: an existing non-empty output, a missing input, usage.
  int rc = -1;
  std::string out = mf::test::run_capture(bin + " import " + root + "/hf_sp " + root + "/imp_sp", &rc);
  CHECK(rc == 1);
  CHECK(out.find("not an empty directory") != std::string::npos);
  out = mf::test::run_capture(bin + " import " + root + "/nothing " + root + "/x", &rc);
  CHECK(rc == 1);
  CHECK(out.find("nothing") != std::string::npos);
  out = mf::test::run_capture(bin + " import " + root + "/hf_sp " + root + "/y --set optim.lr=abc", &rc);
  CHECK(rc == 1);
  CHECK(out.find("optim.lr") != std::string::npos);
  CHECK(!fs::exists(root + "/y/model.safetensors"));
  CHECK(run(bin + " import") == 2);
  CHECK(run(bin + " import a b --frobnicate") == 1);
  CHECK(run(bin + " import --help") == 0);
  fs::remove_all(root);
}

TEST_CASE("exported model matches transformers' LlamaForCausalLM", "[export][hf]") {
  const char* py = std::getenv("MF_HF_PYTHON");
  const std::string python = py ? py : "python3";
  if (run(python + " -c 'import transformers, torch'") != 0) {
    WARN("skipped: no transformers for " << python << " (set MF_HF_PYTHON to a Python that has it)");
    return;
  }
  const std::string root = temp_dir("hf");
  TrainOptions q;
  q.quiet = true;
  Config c = small(root, "a", false);
  TrainResult r = Trainer(c, q).run();
  export_checkpoint(r.last_checkpoint, root + "/hf", DType::F32);
  // Our logits for a fixed batch, written beside the tokens for the Python side.
  Trainer t([&] {
    Config c2 = c;
    c2.run.dir = root + "/b";
    c2.train.init_from = root + "/hf";
    return c2;
  }(), q);
  std::vector<int32_t> tokens(size_t(c.train.micro_batch) * c.train.seq_len);
  Rng rng(11);
  for (auto& x : tokens) x = int32_t(rng.below(48));
  auto logits = t.model().logits(tokens.data());
  Tensor tt = host_tensor({int64_t(tokens.size())});
  Tensor lt = host_tensor({int64_t(tokens.size()), 48});
  for (size_t i = 0; i < tokens.size(); ++i) tt.f32()[i] = float(tokens[i]);
  std::copy(logits.begin(), logits.end(), lt.f32());
  SafetensorsWriter w;
  w.add("tokens", tt);
  w.add("logits", lt);
  w.write(root + "/ours.safetensors");
  const std::string script = std::string(MF_TEST_DIR) + "/reference/hf_check.py";
  CHECK(run(python + " " + script + " " + root + "/hf " + root + "/ours.safetensors " +
            std::to_string(c.train.micro_batch)) == 0);
  fs::remove_all(root);
}
