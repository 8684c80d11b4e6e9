// Hugging Face export and init_from for MoE models: the "muonforge_moe" config.json (Llama keys +
// DeepSeek-V3 MoE keys), tensors under the DeepSeek-V3 names, round trips, every mismatched MoE
// key named, and configs/moe-tiny.json trained, exported through the CLI and read back.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "data/shard.h"
#include "io/hf.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "test_util.h"
#include "train/export.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace mf;
using mf::test::TempDir;
using json = nlohmann::json;
using Catch::Matchers::Contains;

namespace {

void write_tokens(const std::string& root, int vocab) {
  Rng rng(5);
  std::vector<uint32_t> toks(6000);
  for (auto& t : toks) t = uint32_t(rng.below(uint32_t(vocab)));
  write_shard(root + "/train_000000.bin", toks, 2);
}

// A small MoE: layer 0 dense, layers 1-2 MoE; awkward widths (d_expert 24, 5 experts).
Config small_moe(const TempDir& root, const std::string& name, const std::string& balance,
                 const std::string& score) {
  if (!fs::exists(root / "train_000000.bin")) write_tokens(root.path.string(), 48);
  Config c;
  c.model.vocab_size = 48;
  c.model.d_model = 32;
  c.model.n_layers = 3;
  c.model.n_heads = 4;
  c.model.n_kv_heads = 2;
  c.model.d_ff = 40;
  c.model.max_seq_len = 16;
  c.model.moe.n_experts = 5;
  c.model.moe.top_k = 2;
  c.model.moe.n_shared = balance == "bias" ? 2 : 0;
  c.model.moe.d_expert = 24;
  c.model.moe.first_dense = balance == "bias" ? 1 : 0;
  c.model.moe.score = score;
  c.model.moe.norm_topk = score == "sigmoid";
  c.model.moe.route_scale = score == "sigmoid" ? 1.5 : 1.0;
  c.model.moe.balance = balance;
  c.model.moe.bias_rate = 0.05;  // large, so two steps leave a visible bias
  c.model.moe.aux_coef = 0.02;
  c.train.seq_len = 16;
  c.train.micro_batch = 2;
  c.train.batch_tokens = 32;
  c.train.max_steps = 2;
  c.train.eval_every = 0;
  c.train.device = "cpu";
  c.schedule.warmup = 1;
  c.data.train = root / "train_*.bin";
  c.data.shuffle = false;
  c.run.dir = root / name;
  return c;
}

json read_json(const std::string& path) {
  std::ifstream f(path);
  REQUIRE(f);
  return json::parse(f);
}

using mf::test::error_of;

TrainOptions quiet() {
  TrainOptions q;
  q.quiet = true;
  return q;
}

}  // namespace

TEST_CASE("MoE export writes the muonforge_moe config and DeepSeek-V3 names", "[export][moe]") {
  TempDir root("moe_export");
  Config c = small_moe(root, "a", "bias", "sigmoid");
  TrainResult r = Trainer(c, quiet()).run();
  const std::string out = root / "hf";
  const auto expected = expected_param_names(c.model);
  // 1 embed + 3*(6 attn/norm) + dense mlp 3 + 2 MoE layers * (router, bias, 5*3, shared 3) + norm
  // + lm_head.
  CHECK(expected.size() == size_t(1 + 18 + 3 + 2 * (2 + 15 + 3) + 1 + 1));
  const int n = export_checkpoint(r.last_checkpoint, out, DType::F32);
  CHECK(n == int(expected.size()));

  const json hf = read_json(out + "/config.json");
  CHECK(hf["architectures"][0] == "MuonforgeMoeForCausalLM");
  CHECK(hf["model_type"] == "muonforge_moe");
  CHECK(hf["hidden_size"] == 32);
  CHECK(hf["intermediate_size"] == 40);
  CHECK(hf["num_attention_heads"] == 4);
  CHECK(hf["num_key_value_heads"] == 2);
  CHECK(hf["num_hidden_layers"] == 3);
  CHECK(hf["n_routed_experts"] == 5);
  CHECK(hf["num_experts_per_tok"] == 2);
  CHECK(hf["n_shared_experts"] == 2);
  CHECK(hf["moe_intermediate_size"] == 24);
  CHECK(hf["first_k_dense_replace"] == 1);
  CHECK(hf["scoring_func"] == "sigmoid");
  CHECK(hf["norm_topk_prob"] == true);
  CHECK(hf["routed_scaling_factor"] == 1.5);
  CHECK(hf["topk_method"] == "noaux_tc");
  CHECK(hf["aux_loss_alpha"] == 0.0);

  // Every tensor the model has, under its own name and shape, bit-identical to the checkpoint.
  SafetensorsReader w(out + "/model.safetensors");
  SafetensorsReader ck(r.last_checkpoint + "/model.safetensors");
  CHECK(w.names().size() == expected.size());
  for (const auto& [name, shape] : expected) {
    INFO(name);
    REQUIRE(w.contains(name));
    Tensor a = w.read_f32(name), b = ck.read_f32(name);
    CHECK(a.shape == shape);
    CHECK(std::equal(a.f32(), a.f32() + a.numel(), b.f32()));
  }
  CHECK(w.contains("model.layers.1.mlp.experts.4.down_proj.weight"));
  CHECK(w.entry("model.layers.2.mlp.shared_experts.up_proj.weight").shape == Shape{48, 32});
  CHECK(w.contains("model.layers.0.mlp.gate_proj.weight"));
  CHECK_FALSE(w.contains("model.layers.1.mlp.gate_proj.weight"));

  // The config maps back to the same MoE section.
  ModelConfig back = model_config_from_hf(hf, "hf/config.json");
  CHECK(back.moe.n_experts == 5);
  CHECK(back.moe.top_k == 2);
  CHECK(back.moe.n_shared == 2);
  CHECK(back.moe.d_expert == 24);
  CHECK(back.moe.first_dense == 1);
  CHECK(back.moe.score == "sigmoid");
  CHECK(back.moe.norm_topk);
  CHECK(back.moe.route_scale == 1.5);
  CHECK(back.moe.balance == "bias");
  CHECK_NOTHROW(check_hf_config(hf, back, "hf/config.json"));
}

TEST_CASE("MoE export then init_from gives identical weights", "[export][moe]") {
  TempDir root("moe_rt");
  for (const auto& [balance, score] :
       std::vector<std::pair<std::string, std::string>>{{"bias", "sigmoid"},
                                                        {"aux_loss", "softmax"},
                                                        {"none", "softmax"}}) {
    DYNAMIC_SECTION(balance << " " << score) {
      Config c = small_moe(root, "a_" + balance, balance, score);
      // An odd number of bias steps: with rate 0.05 an expert's load often flips from over to
      // under, and two steps of +0.05 and -0.05 cancel exactly in f32.
      if (balance == "bias") c.train.max_steps = 3;
      TrainResult r = Trainer(c, quiet()).run();
      const std::string out = root / ("hf_" + balance);
      export_checkpoint(r.last_checkpoint, out, DType::F32);
      const json hf = read_json(out + "/config.json");
      CHECK(hf["topk_method"] == (balance == "bias" ? "noaux_tc" : "greedy"));
      CHECK(hf["aux_loss_alpha"] == (balance == "aux_loss" ? 0.02 : 0.0));

      SafetensorsReader ck(r.last_checkpoint + "/model.safetensors");
      if (balance == "bias") {
        // The bias moved away from zero during training, so the check below means something.
        Tensor b = ck.read_f32("model.layers.1.mlp.gate.e_score_correction_bias");
        double s = 0;
        for (int64_t i = 0; i < b.numel(); ++i) s += std::fabs(b.f32()[i]);
        CHECK(s > 0);
      }
      Config c2 = c;
      c2.run.dir = root / ("from_hf_" + balance);
      c2.train.init_from = out;
      Trainer t(c2, quiet());
      size_t n = 0, biases = 0;
      for (Param* p : t.model().params()) {
        Tensor ref = ck.read_f32(p->name);
        INFO(p->name);
        REQUIRE(ref.shape == p->shape);
        CHECK(std::equal(ref.f32(), ref.f32() + ref.numel(), p->master.f32()));
        ++n;
        biases += p->name.find("e_score_correction_bias") != std::string::npos;
      }
      CHECK(n == expected_param_names(c.model).size());
      CHECK(biases == (balance == "bias" ? 2u : 0u));
      // Training goes on from the imported weights.
      CHECK(t.run().steps_done == c.train.max_steps);

      // bf16 export rounds; init_from still loads it.
      export_checkpoint(r.last_checkpoint, out + "_bf16", DType::BF16);
      CHECK(read_json(out + "_bf16/config.json")["torch_dtype"] == "bfloat16");
      {
        // Weights are bf16, the router's bias stays f32 and exact (bf16 would move it by about
        // bias_rate and change close routing choices).
        SafetensorsReader hb(out + "_bf16/model.safetensors");
        CHECK(hb.entry("model.layers.1.mlp.gate.weight").dtype == "BF16");
        const std::string bias = "model.layers.1.mlp.gate.e_score_correction_bias";
        CHECK(hb.contains(bias) == (balance == "bias"));
        if (hb.contains(bias)) {
          CHECK(hb.entry(bias).dtype == "F32");
          Tensor a = hb.read_f32(bias), b = ck.read_f32(bias);
          CHECK(std::equal(a.f32(), a.f32() + a.numel(), b.f32()));
        }
      }
      c2.train.init_from = out + "_bf16";
      c2.run.dir += "_bf16";
      CHECK_NOTHROW(Trainer(c2, quiet()));
    }
  }
}

TEST_CASE("a resume that drops the router bias is refused, naming model.moe.balance",
          "[train][moe]") {
  // The checkpoint's e_score_correction_bias tensors used to be ignored: the run went on with
  // balance "none" and a "config differs" line, its learned biases gone.
  TempDir root("moe_rebal");
  Config c = small_moe(root, "a", "bias", "sigmoid");
  Trainer(c, quiet()).run();
  for (const char* other : {"none", "aux_loss"}) {
    Config o = c;
    o.model.moe.balance = other;
    o.train.max_steps += 2;
    CHECK_THROWS_WITH(Trainer(o, quiet()),
                      Contains(std::string("model.moe.balance \"bias\" -> \"") + other + "\"") &&
                          Contains("e_score_correction_bias"));
  }
}

TEST_CASE("init_from names every mismatched MoE key", "[export][moe]") {
  TempDir root("moe_chk");
  Config c = small_moe(root, "a", "bias", "sigmoid");
  TrainResult r = Trainer(c, quiet()).run();
  const std::string out = root / "hf";
  export_checkpoint(r.last_checkpoint, out, DType::F32);

  Config c2 = c;
  c2.run.dir = root / "b";
  c2.train.init_from = out;
  c2.model.moe.n_experts = 6;
  std::string msg = error_of([&] { Trainer t(c2, quiet()); });
  CHECK_THAT(msg, Contains("n_routed_experts is 5") && Contains("model.moe.n_experts is 6") &&
                      Contains(out + "/config.json"));

  c2 = c;
  c2.run.dir = root / "c";
  c2.train.init_from = out;
  c2.model.moe.balance = "aux_loss";
  c2.model.moe.d_expert = 16;
  c2.model.moe.score = "softmax";
  msg = error_of([&] { Trainer t(c2, quiet()); });
  CHECK_THAT(msg, Contains("topk_method is \"noaux_tc\"") && Contains("model.moe.balance") &&
                      Contains("moe_intermediate_size is 24") &&
                      Contains("scoring_func is \"sigmoid\""));

  // A dense model cannot start from an MoE export, nor an MoE model from a dense Llama.
  Config dense = c;
  dense.model.moe = MoeConfig{};
  dense.run.dir = root / "d";
  dense.train.init_from = out;
  CHECK_THAT(error_of([&] { Trainer t(dense, quiet()); }),
             Contains("muonforge_moe") && Contains("model.moe.n_experts is 0"));
  json llama = hf_llama_config(dense.model);
  CHECK_THAT(error_of([&] { check_hf_config(llama, c.model, "l/config.json"); }),
             Contains("model.moe.n_experts is 5") && Contains("l/config.json"));
}

TEST_CASE("check_hf_config for muonforge_moe: every key, unsupported routing", "[export][moe]") {
  ModelConfig m;
  m.vocab_size = 97;
  m.d_model = 48;
  m.n_layers = 3;
  m.n_heads = 6;
  m.n_kv_heads = 2;
  m.d_ff = 72;
  m.moe.n_experts = 7;
  m.moe.top_k = 3;
  m.moe.n_shared = 1;
  m.moe.d_expert = 20;
  m.moe.first_dense = 0;
  m.moe.score = "softmax";
  m.moe.norm_topk = false;
  m.moe.route_scale = 2.5;
  m.moe.balance = "aux_loss";
  const json hf = hf_config(m);
  CHECK(hf["model_type"] == "muonforge_moe");
  CHECK_NOTHROW(check_hf_config(hf, m, "x/config.json"));
  CHECK_NOTHROW(check_hf_config(json::parse(hf.dump(2)), m, "x/config.json"));
  CHECK_THROWS_WITH(hf_moe_config(ModelConfig{}), Contains("model.moe.n_experts"));
  // No dense layer: intermediate_size is not used, so it is not compared.
  json ff = hf;
  ff["intermediate_size"] = 1;
  CHECK_NOTHROW(check_hf_config(ff, m, "x/config.json"));

  json bad = hf;
  bad["num_experts_per_tok"] = 2;
  bad["n_shared_experts"] = 0;
  bad["first_k_dense_replace"] = 1;
  bad["norm_topk_prob"] = true;
  bad["routed_scaling_factor"] = 1.0;
  bad["aux_loss_alpha"] = 0.5;  // a training hyper-parameter: not compared
  const std::string msg = error_of([&] { check_hf_config(bad, m, "b/config.json"); });
  CHECK_THAT(msg, Contains("b/config.json") && Contains("num_experts_per_tok is 2") &&
                      Contains("model.moe.top_k is 3") && Contains("n_shared_experts is 0") &&
                      Contains("first_k_dense_replace is 1") &&
                      Contains("norm_topk_prob is true") &&
                      Contains("routed_scaling_factor is 1"));
  CHECK_THAT(msg, !Contains("aux_loss_alpha"));

  json unsupported = hf;
  unsupported["n_group"] = 4;
  unsupported["topk_group"] = 2;
  unsupported["topk_method"] = "group_limited_greedy";
  unsupported["scoring_func"] = "tanh";
  unsupported["moe_layer_freq"] = 2;
  CHECK_THAT(error_of([&] { check_hf_config(unsupported, m, "u/config.json"); }),
             Contains("topk_group is 2 < n_group 4") &&
                 Contains("topk_method is \"group_limited_greedy\"") &&
                 Contains("scoring_func is \"tanh\"") && Contains("moe_layer_freq is 2"));
  CHECK_THROWS_WITH(model_config_from_hf(unsupported, "u/config.json"),
                    Contains("u/config.json") && Contains("moe_layer_freq"));

  json missing = hf;
  missing.erase("n_routed_experts");
  missing.erase("norm_topk_prob");
  missing["num_experts_per_tok"] = "three";
  CHECK_THAT(error_of([&] { check_hf_config(missing, m, "m/config.json"); }),
             Contains("n_routed_experts is missing") && Contains("norm_topk_prob is missing") &&
                 Contains("num_experts_per_tok should be an integer"));

  // aux_loss_alpha and topk_method give the balance mode back.
  CHECK(model_config_from_hf(hf, "x").moe.balance == "aux_loss");
  CHECK(model_config_from_hf(hf, "x").moe.aux_coef == m.moe.aux_coef);
  m.moe.balance = "none";
  CHECK(model_config_from_hf(hf_config(m), "x").moe.balance == "none");
  m.moe.balance = "bias";
  CHECK(model_config_from_hf(hf_config(m), "x").moe.balance == "bias");
}

TEST_CASE("configs/moe-tiny.json trains 2 steps, exports and is read back", "[export][moe][cli]") {
  TempDir root("moe_tiny");
  write_tokens(root.path.string(), 256);
  const std::string cfg_path = std::string(MF_TEST_DIR) + "/../configs/moe-tiny.json";
  Config c = load_config(cfg_path);
  REQUIRE(c.model.moe.n_experts == 8);
  REQUIRE(c.model.moe.balance == "bias");
  c.train.max_steps = 2;
  c.train.eval_every = 0;
  c.train.device = "cpu";
  c.train.batch_tokens = c.train.seq_len * c.train.micro_batch;  // one micro-batch per step
  c.schedule.warmup = 1;  // the checkpoint's config.json must validate (warmup <= max_steps)
  c.data.train = root / "train_*.bin";
  c.run.dir = root / "run";
  TrainResult r = Trainer(c, quiet()).run();
  REQUIRE(r.steps_done == 2);
  REQUIRE_FALSE(r.last_checkpoint.empty());

  int rc = 0;
  const std::string out = root / "hf";
  const std::string log = mf::test::run_capture(
      std::string(MF_BINARY) + " export " + r.last_checkpoint + " " + out + " --dtype bf16", &rc);
  INFO(log);
  REQUIRE(rc == 0);
  const json hf = read_json(out + "/config.json");
  CHECK(hf["model_type"] == "muonforge_moe");
  CHECK(hf["n_routed_experts"] == 8);
  CHECK(hf["first_k_dense_replace"] == 1);
  CHECK(hf["topk_method"] == "noaux_tc");
  CHECK(hf["torch_dtype"] == "bfloat16");
  SafetensorsReader w(out + "/model.safetensors");
  CHECK(w.names().size() == expected_param_names(c.model).size());
  CHECK(w.contains("model.layers.3.mlp.gate.e_score_correction_bias"));
  CHECK(w.contains("model.layers.3.mlp.experts.7.up_proj.weight"));
  CHECK(w.contains("model.layers.1.mlp.shared_experts.down_proj.weight"));
  // inspect on the export shows its MoE layout.
  const std::string shown = mf::test::run_capture(std::string(MF_BINARY) + " inspect " + out, &rc);
  INFO(shown);
  CHECK(rc == 0);
  CHECK_THAT(shown, Contains("MoE 8 experts top-2 (+1 shared) width 96 from layer 1"));

  Config c2 = c;
  c2.run.dir = root / "again";
  c2.train.init_from = out;
  CHECK(Trainer(c2, quiet()).run().steps_done == 2);

  // `import --config BASE`: the model keys config.json does not carry (how the model is run and
  // balanced while training) come from BASE, as they do with train.init_from and BASE; they used
  // to fall back to the defaults (moe-tiny's bias_rate 0.01 became 0.001).
  const std::string base_path = root / "base.json";
  std::ofstream(base_path) << json{{"base", cfg_path},
                                   {"model", {{"recompute", "full"}, {"attention", "flash"},
                                              {"moe", {{"bias_rate", 0.02},
                                                       {"capacity_factor", 1.25},
                                                       {"aux_coef", 0.05}}}}}}.dump();
  const Config ci = config_for_hf_model(out, base_path, {});
  CHECK(ci.model.moe.bias_rate == 0.02);
  CHECK(ci.model.moe.capacity_factor == 1.25);
  CHECK(ci.model.moe.aux_coef == 0.05);  // balance is bias: aux_loss_alpha (0) says nothing
  CHECK(ci.model.recompute == "full");
  CHECK(ci.model.attention == "flash");
  CHECK(ci.model.moe.balance == "bias");   // from config.json
  CHECK(ci.model.moe.n_experts == 8);
  CHECK(config_for_hf_model(out, cfg_path, {}).model.moe.bias_rate == 0.01);  // moe-tiny's
  CHECK(config_for_hf_model(out, base_path, {"model.moe.bias_rate=0.03"}).model.moe.bias_rate == 0.03);
  CHECK(config_for_hf_model(out, "", {}).model.moe.bias_rate == MoeConfig{}.bias_rate);
}
