// Config system: defaults, JSON round trip, "base" inheritance, --set overrides, and one case per
// error class checking that the message names the file and the key path. Also loads every shipped
// configs/*.json and runs `muonforge config` end to end.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include <unistd.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "config/config.h"
#include "core/version.h"
#include "core/error.h"
#include "core/rng.h"
#include "test_util.h"

using Catch::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// A scratch directory per test case, removed afterwards.
struct TempDir {
  fs::path root;
  TempDir() {
    static int counter = 0;
    root = fs::temp_directory_path() /
           ("mf_test_config_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(root);
    fs::create_directories(root);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
  std::string write(const std::string& rel, const std::string& text) const {
    fs::path p = root / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
};

// Tests pin the world size unless they set it themselves.
struct WorldSize {
  explicit WorldSize(const char* v) {
    if (v)
      setenv("WORLD_SIZE", v, 1);
    else
      unsetenv("WORLD_SIZE");
  }
  ~WorldSize() { unsetenv("WORLD_SIZE"); }
};

// A small valid config (the shape of configs/tiny.json) to break one key at a time.
json small() {
  return json::parse(R"({
    "model": {"vocab_size": 256, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
              "d_ff": 384, "max_seq_len": 128},
    "train": {"seq_len": 128, "micro_batch": 8, "batch_tokens": 2048, "max_steps": 300},
    "schedule": {"warmup": 20},
    "run": {"name": "small"}
  })");
}

using mf::test::error_of;

int count_leaves(const json& j) {
  if (!j.is_object()) return 1;
  int n = 0;
  for (auto& v : j) n += count_leaves(v);
  return n;
}

}  // namespace

TEST_CASE("defaults follow DESIGN section 5 and validate", "[config]") {
  mf::Config c;
  CHECK(c.model.vocab_size == 50304);
  CHECK(c.model.d_model == 768);
  CHECK(c.model.n_heads == 12);
  CHECK(c.model.head_dim() == 64);
  CHECK(c.model.moe.n_experts == 0);
  CHECK(c.optim.name == "muon");
  CHECK(c.optim.lr == Approx(0.02));
  CHECK(c.optim.adamw.betas[1] == Approx(0.95));
  CHECK(c.schedule.decay == "cosine");
  CHECK(c.train.batch_tokens == 524288);
  CHECK(!c.train.init_from.has_value());
  CHECK(c.train.world_size == 1);
  CHECK_NOTHROW(mf::validate_config(c));
  CHECK(c.grad_accum() == 32);  // 524288 / (16 * 1024)
  CHECK(c.run_dir() == "runs/run");

  // An empty JSON object resolves to exactly the defaults.
  WorldSize ws(nullptr);
  mf::Config e = mf::config_from_json(json::object(), "empty.json");
  CHECK(mf::config_to_json(e) == mf::config_to_json(c));
  CHECK(e.key_source.empty());
}

TEST_CASE("without_source drops only MF_CHECK's location suffix", "[config]") {
  CHECK(mf::without_source("bad value [src/config/config.cpp:123]") == "bad value");
  CHECK(mf::without_source("bad [kernels/xent.cu:7]") == "bad");
  CHECK(mf::without_source("must be in [0, 1]") == "must be in [0, 1]");
  CHECK(mf::without_source("see [a b:1]") == "see [a b:1]");
  CHECK(mf::without_source("see [src/x.cpp:]") == "see [src/x.cpp:]");
  CHECK(mf::without_source("see [src/x.cpp:1a]") == "see [src/x.cpp:1a]");
  CHECK(mf::without_source("plain") == "plain");
  try {
    MF_FAIL("oops ", 3);
  } catch (const mf::Error& e) {
    CHECK(std::string(e.what()) != "oops 3");  // a location was appended...
    if (std::string(__FILE__).find(' ') == std::string::npos)
      CHECK(mf::without_source(e.what()) == "oops 3");  // ...and is taken off again
  }
}

TEST_CASE("other trainers' key names map onto keys that exist", "[config]") {
  const auto leaves = mf::json_leaves(mf::config_to_json(mf::Config{}));
  REQUIRE(mf::config_key_aliases().size() >= 40);
  for (const auto& [name, ours] : mf::config_key_aliases()) {
    INFO(name);
    for (const std::string& k : ours) CHECK(leaves.count(k) == 1);
    // All of them, and only them: no key of ours has this name (it would come first).
    CHECK(mf::config_keys_for(name) == ours);
  }
  // Our own names, in any section.
  CHECK(mf::config_keys_for("max_steps") == std::vector<std::string>{"train.max_steps"});
  CHECK(mf::config_keys_for("lr") == std::vector<std::string>{"optim.lr", "optim.adamw.lr"});
  CHECK(mf::config_keys_for("frobnicate").empty());
}

TEST_CASE("config_to_json emits every key and round-trips", "[config]") {
  WorldSize ws(nullptr);
  mf::Config c;
  json j = mf::config_to_json(c);
  CHECK(count_leaves(j) == 101);  // every schema key except train.world_size
  CHECK(j["train"]["init_from"].is_null());
  CHECK(!j["train"].contains("world_size"));
  CHECK(j["model"]["moe"].contains("capacity_factor"));

  // Non-default values everywhere the type allows, drawn from a fixed seed.
  mf::Rng rng(20240520, 7);
  c.model.d_model = 96;
  c.model.n_heads = 6;
  c.model.n_kv_heads = 3;
  c.model.rope_theta = 500000.0 + rng.uniform();
  c.model.norm_eps = 1e-6 * (1 + rng.uniform());
  c.model.tie_embeddings = true;
  c.model.attention = "cudnn";
  c.model.moe.n_experts = 7;
  c.model.moe.top_k = 3;
  c.model.moe.score = "sigmoid";
  c.model.moe.aux_coef = rng.uniform();
  c.mup.enabled = true;
  c.optim.name = "adamw";
  c.optim.lr = 1e-3 * (1 + rng.uniform());
  c.optim.betas = {0.8 + 0.1 * rng.uniform(), 0.99};
  c.optim.adamw.betas = {0.85, 0.9 + 0.05 * rng.uniform()};
  c.schedule.decay = "wsd";
  c.schedule.min_lr_ratio = rng.uniform();
  c.train.seed = 18446744073709551557ull;  // above INT64_MAX: must stay unsigned
  c.train.batch_tokens = 16LL * 1024 * 4096;
  c.train.init_from = "hf/llama";
  c.train.zero = 1;
  c.train.diag_every = 25;
  c.optim.qk_clip_tau = 100.0 + rng.uniform();
  c.optim.name = "shampoo";
  c.optim.ns = "polar_express";
  c.optim.cautious_wd = true;
  c.optim.router = "matrix";
  c.optim.normuon_beta2 = 0.5 + 0.4 * rng.uniform();
  c.optim.shampoo.block_size = 96;
  c.optim.shampoo.exp_l = 0.5;
  c.optim.shampoo.graft = "none";
  c.optim.shampoo.eps = 1e-9 * rng.uniform();
  c.optim.soap.precond_every = 7;
  c.optim.soap.beta1 = rng.uniform() * 0.9;
  c.optim.asgo.beta2 = 1.0;
  c.optim.freon.c = 0.75;
  c.optim.kaon.steps = 9;
  c.mup.base_width = 64;
  c.mup.base_depth = 3;
  c.data.train = "x/train_*.bin";
  c.run.name = "rt";
  mf::validate_config(c);

  json j1 = mf::config_to_json(c);
  mf::Config back = mf::config_from_json(j1, "roundtrip.json");
  json j2 = mf::config_to_json(back);
  CHECK(j1 == j2);
  CHECK(back.model.rope_theta == c.model.rope_theta);  // doubles survive exactly
  CHECK(back.optim.betas == c.optim.betas);
  CHECK(back.train.seed == c.train.seed);
  CHECK(back.train.init_from == c.train.init_from);
  CHECK(back.train.diag_every == 25);
  CHECK(back.optim.qk_clip_tau == c.optim.qk_clip_tau);
  CHECK(back.mup.base_depth == 3);
  CHECK(back.optim.name == "shampoo");
  CHECK(back.optim.ns == "polar_express");
  CHECK(back.optim.cautious_wd);
  CHECK(back.optim.normuon_beta2 == c.optim.normuon_beta2);
  CHECK(back.optim.shampoo.block_size == 96);
  CHECK(back.optim.shampoo.exp_l == 0.5);
  CHECK(back.optim.shampoo.graft == "none");
  CHECK(back.optim.shampoo.eps == c.optim.shampoo.eps);
  CHECK(back.optim.soap.precond_every == 7);
  CHECK(back.optim.soap.beta1 == c.optim.soap.beta1);
  CHECK(back.optim.asgo.beta2 == 1.0);
  CHECK(back.optim.freon.c == 0.75);
  CHECK(back.optim.kaon.steps == 9);
  // --set reaches the nested optimizer sections.
  mf::Config o = mf::config_from_json(json::object(), "set.json", ".",
                                      {"optim.name=soap", "optim.soap.block_size=33", "optim.freon.c=0.25"});
  CHECK(o.optim.name == "soap");
  CHECK(o.optim.soap.block_size == 33);
  CHECK(o.optim.freon.c == 0.25);
  // The string form parses to the same JSON (it only orders keys differently).
  CHECK(json::parse(mf::config_to_string(back)) == j1);
  // Schema order, not alphabetical: model first, run last.
  std::string text = mf::config_to_string(back);
  CHECK(text.find("\"model\"") < text.find("\"data\""));
  CHECK(text.find("\"data\"") < text.find("\"run\""));
}

TEST_CASE("model.n_kv_heads left out is n_heads, wherever n_heads is set", "[config]") {
  WorldSize ws(nullptr);
  TempDir t;
  // n_heads 8 alone used to fail: "model.n_kv_heads: 12 does not divide model.n_heads = 8".
  mf::Config a = mf::config_from_json(json::parse(R"({"model": {"n_heads": 8}})"), "a.json");
  CHECK(a.model.n_kv_heads == 8);
  mf::Config b = mf::config_from_json(json::object(), "b.json", ".", {"model.n_heads=6"});
  CHECK(b.model.n_kv_heads == 6);
  // Set anywhere (a base, the file, an override), it stays as set.
  mf::Config c = mf::config_from_json(json::parse(R"({"model": {"n_heads": 8}})"), "c.json", ".",
                                      {"model.n_kv_heads=2"});
  CHECK(c.model.n_kv_heads == 2);
  t.write("base.json", R"({"model": {"n_heads": 8, "n_kv_heads": 2}})");
  const std::string child =
      t.write("child.json", R"({"base": "base.json", "model": {"n_heads": 16}})");
  CHECK(mf::load_config(child).model.n_kv_heads == 2);
  // The resolved config (what a run directory's config.json holds) says it outright.
  CHECK(mf::config_to_json(a)["model"]["n_kv_heads"] == 8);
}

TEST_CASE("base inheritance: relative paths, deep merge, chains, cycles", "[config]") {
  WorldSize ws(nullptr);
  TempDir t;
  json base = small();
  base["model"]["d_model"] = 256;
  base["optim"] = {{"lr", 0.05}, {"adamw", {{"lr", 1e-3}, {"betas", {0.8, 0.9}}}}};
  t.write("shared/base.json", base.dump());

  SECTION("relative base across folders, deep merge of objects") {
    std::string child = t.write("runs/sub/child.json", R"({
      "base": "../../shared/base.json",
      "model": {"n_heads": 8},
      "optim": {"adamw": {"lr": 2e-3}},
      "run": {"name": "child"}
    })");
    mf::Config c = mf::load_config(child);
    CHECK(c.model.d_model == 256);  // from base
    CHECK(c.model.n_heads == 8);    // child wins
    CHECK(c.model.vocab_size == 256);
    CHECK(c.optim.lr == Approx(0.05));
    CHECK(c.optim.adamw.lr == Approx(2e-3));           // merged inside a nested object
    CHECK(c.optim.adamw.betas[0] == Approx(0.8));      // sibling kept from base
    CHECK(c.run.name == "child");
    CHECK(c.source == child);
    CHECK_THAT(c.key_source.at("model.d_model"), Contains("base.json") && Contains("base of"));
    CHECK(c.key_source.at("model.n_heads") == child);
  }

  SECTION("chain of three") {
    t.write("a/one.json", R"({"base": "../shared/base.json", "train": {"max_steps": 50}})");
    t.write("b/two.json", R"({"base": "../a/one.json", "schedule": {"warmup": 5}})");
    std::string three = t.write("three.json", R"({"base": "b/two.json", "train": {"seed": 7}})");
    mf::Config c = mf::load_config(three);
    CHECK(c.model.d_model == 256);
    CHECK(c.train.max_steps == 50);
    CHECK(c.schedule.warmup == 5);
    CHECK(c.train.seed == 7);
    CHECK(c.train.batch_tokens == 2048);
  }

  SECTION("a cycle is an error naming the chain") {
    t.write("cyc/x.json", R"({"base": "y.json"})");
    t.write("cyc/y.json", R"({"base": "../cyc2/z.json"})");
    t.write("cyc2/z.json", R"({"base": "../cyc/x.json"})");
    std::string msg = error_of([&] { mf::load_config((t.root / "cyc/x.json").string()); });
    CHECK_THAT(msg, Contains("inheritance cycle") && Contains("x.json -> ") &&
                        Contains("y.json -> ") && Contains("z.json -> ") && Contains("base"));
    std::string self = t.write("self.json", R"({"base": "self.json"})");
    CHECK_THROWS_WITH(mf::load_config(self), Contains("self.json") && Contains("cycle"));
  }

  SECTION("missing or malformed base") {
    std::string m = t.write("missing.json", R"({"base": "nowhere/none.json"})");
    CHECK_THROWS_WITH(mf::load_config(m), Contains("missing.json: base: cannot open") &&
                                              Contains("none.json"));
    std::string n = t.write("num.json", R"({"base": 3})");
    CHECK_THROWS_WITH(mf::load_config(n), Contains("num.json: base: expected the path"));
  }

  SECTION("an error inside a base names the base file") {
    t.write("bad/base.json", R"({"model": {"n_headz": 4}})");
    std::string c = t.write("bad/top.json", R"({"base": "base.json"})");
    CHECK_THROWS_WITH(mf::load_config(c), Contains("base.json (base of ") &&
                                              Contains("model.n_headz: unknown key (did you mean n_heads?)"));
  }

  SECTION("config_from_json resolves bases against base_dir") {
    json j = {{"base", "shared/base.json"}, {"run", {{"name", "mem"}}}};
    mf::Config c = mf::config_from_json(j, "<memory>", t.root.string());
    CHECK(c.model.d_model == 256);
    CHECK(c.run.name == "mem");
  }
}

TEST_CASE("--set overrides", "[config]") {
  WorldSize ws(nullptr);
  TempDir t;
  json j = small();
  j["train"]["init_from"] = "hf/model";
  std::string f = t.write("over.json", j.dump());

  mf::Config c = mf::load_config(
      f, {"optim.lr=3e-3", "model.tie_embeddings=true", "train.init_from=null",
          "optim.adamw.betas=[0.9,0.99]", "model.moe.n_experts=4", "model.moe.score=sigmoid",
          "run.name=123", "train.seed=99", "optim.name=adamw"});
  CHECK(c.optim.lr == Approx(3e-3));
  CHECK(c.model.tie_embeddings);
  CHECK(!c.train.init_from.has_value());
  CHECK(c.optim.adamw.betas[0] == Approx(0.9));
  CHECK(c.optim.adamw.betas[1] == Approx(0.99));
  CHECK(c.model.moe.n_experts == 4);
  CHECK(c.model.moe.score == "sigmoid");
  CHECK(c.run.name == "123");  // a string key keeps the raw text
  CHECK(c.train.seed == 99);
  CHECK(c.optim.name == "adamw");
  CHECK_THAT(c.key_source.at("optim.lr"), Contains("over.json (--set optim.lr=3e-3)"));
  // Whole numbers written with an exponent are integers as long as the field holds them.
  mf::Config e = mf::load_config(f, {"train.seed=1e19", "train.batch_tokens=2048e3"});
  CHECK(e.train.seed == 10000000000000000000ULL);
  CHECK(e.train.batch_tokens == 2048000);

  // Later overrides win; an object at a section path merges into it.
  mf::Config d = mf::load_config(f, {"optim.lr=1", "optim.lr=0.5",
                                     R"(model.moe={"n_experts": 6, "top_k": 3})",
                                     "train.init_from=other/dir"});
  CHECK(d.optim.lr == Approx(0.5));
  CHECK(d.model.moe.n_experts == 6);
  CHECK(d.model.moe.top_k == 3);
  CHECK(d.model.moe.d_expert == 512);  // untouched sibling keeps its default
  CHECK(d.train.init_from == std::optional<std::string>("other/dir"));

  // The world size may be previewed by an override, but not written in a file.
  mf::Config w = mf::load_config(f, {"train.world_size=2"});
  CHECK(w.train.world_size == 2);
  CHECK(w.grad_accum() == 1);

  CHECK_THROWS_WITH(mf::load_config(f, {"model.d_model=abc"}),
                    Contains("over.json (--set model.d_model=abc): model.d_model: expected integer, got string \"abc\""));
  CHECK_THROWS_WITH(mf::load_config(f, {"model.tie_embeddings=1"}),
                    Contains("over.json") && Contains("model.tie_embeddings: expected boolean"));
  CHECK_THROWS_WITH(mf::load_config(f, {"optim.adamw.betas=[0.9]"}),
                    Contains("over.json") && Contains("optim.adamw.betas: expected array of 2 numbers"));
  CHECK_THROWS_WITH(mf::load_config(f, {"model.n_headz=4"}),
                    Contains("over.json") && Contains("model.n_headz: unknown key (did you mean n_heads?)"));
  CHECK_THROWS_WITH(mf::load_config(f, {"modle.d_model=4"}),
                    Contains("over.json") && Contains("modle: unknown key (did you mean model?)"));
  CHECK_THROWS_WITH(mf::load_config(f, {"optim.lr.x=4"}),
                    Contains("over.json") && Contains("optim.lr.x: unknown key"));
  CHECK_THROWS_WITH(mf::load_config(f, {"optim.lr"}), Contains("over.json") && Contains("expected key=value"));
  CHECK_THROWS_WITH(mf::load_config(f, {"model.moe=3"}),
                    Contains("over.json") && Contains("model.moe: expected object, got integer 3"));
  CHECK_THROWS_WITH(mf::load_config(f, {"base=x.json"}), Contains("over.json") && Contains("base"));
  // Range checks apply to overridden values and name the override.
  CHECK_THROWS_WITH(mf::load_config(f, {"optim.lr=-0.1"}),
                    Contains("over.json (--set optim.lr=-0.1): optim.lr: must be > 0"));
}

TEST_CASE("every error class names the file and the key path", "[config]") {
  WorldSize ws(nullptr);
  TempDir t;
  struct Case {
    const char* patch;  // merged into small()
    const char* key;    // key path the message must name
    const char* text;   // and this explanation
  };
  const Case cases[] = {
      // unknown keys and wrong types
      {R"({"model": {"n_headz": 4}})", "model.n_headz", "unknown key (did you mean n_heads?)"},
      {R"({"optimizer": {}})", "optimizer", "unknown key (did you mean optim?)"},
      // other trainers' names for our keys
      {R"({"optim": {"weight_decay": 0.1}})", "optim.weight_decay",
       "unknown key (muonforge calls it optim.wd)"},
      {R"({"model": {"hidden_size": 64}})", "model.hidden_size",
       "unknown key (muonforge calls it model.d_model)"},
      {R"({"train": {"batch_size": 8}})", "train.batch_size",
       "unknown key (muonforge calls it train.micro_batch or train.batch_tokens)"},
      {R"({"model": {"num_experts_per_tok": 2}})", "model.num_experts_per_tok",
       "unknown key (muonforge calls it model.moe.top_k)"},
      {R"({"model": {"moe": {"zzz": 1}}})", "model.moe.zzz", "unknown key (valid keys in model.moe: n_experts"},
      {R"({"model": {"d_model": "768"}})", "model.d_model", "expected integer, got string \"768\""},
      {R"({"model": {"d_model": 64.5}})", "model.d_model", "expected integer, got number 64.5"},
      {R"({"model": {"n_layers": 3000000000}})", "model.n_layers", "integer out of range"},
      {R"({"optim": {"lr": "fast"}})", "optim.lr", "expected number"},
      {R"({"optim": {"nesterov": "yes"}})", "optim.nesterov", "expected boolean"},
      {R"({"run": {"name": 5}})", "run.name", "expected string, got integer 5"},
      {R"({"train": {"init_from": 5}})", "train.init_from", "expected string or null"},
      {R"({"train": {"seed": -3}})", "train.seed", "expected non-negative integer"},
      // a whole number too large for the field is out of range, not "expected integer, got integer"
      {R"({"train": {"batch_tokens": 9223372036854775808}})", "train.batch_tokens",
       "integer out of range: 9223372036854775808"},
      {R"({"model": {"d_model": 1e300}})", "model.d_model", "integer out of range: 1e+300"},
      {R"({"train": {"seed": 18446744073709551616}})", "train.seed", "integer out of range"},
      {R"({"train": {"seed": -1e30}})", "train.seed", "expected non-negative integer"},
      {R"({"optim": {"betas": [0.9, "x"]}})", "optim.betas", "expected array of 2 numbers"},
      {R"({"model": {"moe": 4}})", "model.moe", "expected object, got integer 4"},
      {R"({"train": {"world_size": 2}})", "train.world_size", "WORLD_SIZE environment variable"},
      // ranges
      {R"({"model": {"vocab_size": 0}})", "model.vocab_size", "must be > 0, got 0"},
      {R"({"model": {"d_ff": -4}})", "model.d_ff", "must be > 0"},
      {R"({"model": {"norm_eps": 0}})", "model.norm_eps", "must be > 0"},
      {R"({"model": {"moe": {"n_experts": -1}}})", "model.moe.n_experts", "must be >= 0"},
      {R"({"optim": {"momentum": 1.0}})", "optim.momentum", "must be in [0, 1), got 1"},
      {R"({"optim": {"momentum": -0.1}})", "optim.momentum", "must be in [0, 1)"},
      {R"({"optim": {"lr": 0}})", "optim.lr", "must be > 0"},
      {R"({"optim": {"adamw": {"lr": -1e-3}}})", "optim.adamw.lr", "must be > 0"},
      {R"({"optim": {"qk_clip_tau": -1}})", "optim.qk_clip_tau", "must be >= 0"},
      {R"({"train": {"diag_every": -5}})", "train.diag_every", "must be >= 0"},
      {R"({"train": {"diag_evry": 5}})", "train.diag_evry", "unknown key (did you mean diag_every?)"},
      {R"({"mup": {"base_width": 0}})", "mup.base_width", "must be > 0"},
      {R"({"optim": {"eps": 0}})", "optim.eps", "must be > 0"},
      {R"({"optim": {"adamw": {"eps": -1}}})", "optim.adamw.eps", "must be > 0"},
      // fp32 rounds these to 0 (adamw.eps=1e-300 trained into a NaN loss at step 2)
      {R"({"optim": {"adamw": {"eps": 1e-300}}})", "optim.adamw.eps", "must be >= 1.2e-38 (the smallest normal fp32 number"},
      // scalars the kernels take as floats: past fp32's largest number they become inf
      {R"({"model": {"init_std": 1e300}})", "model.init_std", "must be <= 3.4e38 (the largest fp32 number"},
      {R"({"model": {"moe": {"route_scale": 1e308}}})", "model.moe.route_scale", "must be <= 3.4e38"},
      {R"({"model": {"moe": {"aux_coef": 1e39}}})", "model.moe.aux_coef", "must be <= 3.4e38"},
      {R"({"model": {"moe": {"bias_rate": 1e39}}})", "model.moe.bias_rate", "must be <= 3.4e38"},
      {R"({"optim": {"eps": 1e-46}})", "optim.eps", "must be >= 1.2e-38"},
      {R"({"optim": {"asgo": {"eps": 1e-300}}})", "optim.asgo.eps", "must be >= 1.2e-38"},
      {R"({"optim": {"soap": {"eps": 1e-40}}})", "optim.soap.eps", "must be >= 1.2e-38"},
      {R"({"optim": {"shampoo": {"graft_eps": 1e-300}}})", "optim.shampoo.graft_eps", "must be >= 1.2e-38"},
      {R"({"model": {"norm_eps": 1e-300}})", "model.norm_eps", "must be >= 1.2e-38"},
      {R"({"model": {"rope_theta": 1e-300}})", "model.rope_theta", "must be >= 1.2e-38"},
      {R"({"optim": {"adamw": {"betas": [0.9, 1.0]}}})", "optim.adamw.betas", "each beta must be in [0, 1)"},
      {R"({"optim": {"betas": [-0.1, 0.9]}})", "optim.betas", "each beta must be in [0, 1)"},
      {R"({"optim": {"wd": -0.1}})", "optim.wd", "must be >= 0"},
      {R"({"optim": {"grad_clip": -1}})", "optim.grad_clip", "must be >= 0"},
      {R"({"train": {"keep_ckpts": 0}})", "train.keep_ckpts", "must be >= 1"},
      {R"({"train": {"micro_batch": 0}})", "train.micro_batch", "must be > 0"},
      {R"({"schedule": {"min_lr_ratio": 1.5}})", "schedule.min_lr_ratio", "must be in [0, 1]"},
      {R"({"schedule": {"min_lr_ratio": -0.5}})", "schedule.min_lr_ratio", "must be in [0, 1]"},
      // enums list their valid values
      {R"({"optim": {"name": "sgd"}})", "optim.name",
       "expected one of muon|adamw|normuon|shampoo|soap|asgo|freon|kaon, got \"sgd\""},
      // matrix optimizers (src/optim/matrix_opt.h)
      {R"({"optim": {"ns": "cubic"}})", "optim.ns", "expected one of quintic|polar_express, got \"cubic\""},
      {R"({"optim": {"shampoo": {"graft": "sgd"}}})", "optim.shampoo.graft", "expected one of adam|none"},
      {R"({"optim": {"shampoo": {"exp_l": 0}}})", "optim.shampoo.exp_l", "must be in (0, 1]"},
      {R"({"optim": {"shampoo": {"precond_every": 0}}})", "optim.shampoo.precond_every", "must be > 0"},
      {R"({"optim": {"shampoo": {"block_size": -1}}})", "optim.shampoo.block_size", "must be >= 0"},
      {R"({"optim": {"soap": {"beta2": 1.0}}})", "optim.soap.beta2", "must be in [0, 1)"},
      {R"({"optim": {"soap": {"precond_every": -2}}})", "optim.soap.precond_every", "must be > 0"},
      {R"({"optim": {"asgo": {"beta2": 0}}})", "optim.asgo.beta2", "must be in (0, 1]"},
      {R"({"optim": {"freon": {"c": 1.0}}})", "optim.freon.c", "must be in [0, 0.9]"},
      // c > 0.9: the inverted spectrum of the update grows like n^((2c-1)/(2-2c)), NaN at step 2
      {R"({"optim": {"freon": {"c": 0.95}}})", "optim.freon.c", "9e18 at c = 0.95"},
      {R"({"optim": {"freon": {"c": 0.9000001}}})", "optim.freon.c", "must be in [0, 0.9]"},
      {R"({"optim": {"freon": {"c": -0.1}}})", "optim.freon.c", "must be in [0, 0.9]"},
      {R"({"optim": {"kaon": {"steps": 0}}})", "optim.kaon.steps", "must be in [1, 100]"},
      {R"({"optim": {"normuon_beta2": 1.5}})", "optim.normuon_beta2", "must be in [0, 1)"},
      {R"({"optim": {"shampoo": {"blocksize": 64}}})", "optim.shampoo.blocksize", "did you mean block_size?"},
      {R"({"optim": {"cautious_wd": 1}})", "optim.cautious_wd", "expected boolean"},
      {R"({"optim": {"wd_mode": "decoupled"}})", "optim.wd_mode", "expected one of coupled|independent"},
      {R"({"optim": {"scale": "none"}})", "optim.scale", "expected one of shape|rms|spectral"},
      {R"({"schedule": {"decay": "step"}})", "schedule.decay", "expected one of constant|cosine|linear|wsd"},
      {R"({"train": {"device": "gpu"}})", "train.device", "expected one of auto|cpu|cuda"},
      {R"({"train": {"precision": "fp16"}})", "train.precision", "expected one of bf16|fp32"},
      {R"({"model": {"moe": {"score": "relu"}}})", "model.moe.score", "expected one of softmax|sigmoid"},
      {R"({"model": {"moe": {"balance": "loss"}}})", "model.moe.balance", "expected one of aux_loss|bias|none"},
      {R"({"model": {"attention": "sdpa"}})", "model.attention", "expected one of flash|cudnn|auto"},
      {R"({"model": {"recompute": "all"}})", "model.recompute", "expected one of none|mlp|full"},
      {R"({"model": {"arch": "gpt2"}})", "model.arch", "expected one of llama"},
      {R"({"train": {"zero": 2}})", "train.zero", "expected one of 0|1, got 2"},
      // cross-field rules
      {R"({"model": {"n_heads": 5}})", "model.d_model", "128 is not divisible by model.n_heads = 5"},
      {R"({"model": {"d_model": 12, "n_heads": 4, "n_kv_heads": 4}})", "model.n_heads",
       "head_dim = d_model / n_heads = 12 / 4 = 3 must be even for RoPE"},
      {R"({"model": {"n_kv_heads": 3}})", "model.n_kv_heads", "3 does not divide model.n_heads = 4"},
      // shapes whose parameter count passes 2^53 (d_model=1e9 wrapped the int64 gradient offsets)
      {R"({"model": {"d_model": 1000000000}})", "model.d_model",
       "the model would have 1.2000005129e+19 parameters (model.d_model 1000000000, model.n_layers 4"},
      {R"({"model": {"moe": {"n_experts": 2147483647, "top_k": 1, "d_expert": 2147483647}}})", "model.d_model",
       "model.moe.n_experts 2147483647, model.moe.n_shared 0, model.moe.d_expert 2147483647), more than 2^53"},
      {R"({"model": {"moe": {"n_experts": 4, "top_k": 5}}})", "model.moe.top_k",
       "5 exceeds model.moe.n_experts = 4"},
      {R"({"model": {"moe": {"capacity_factor": 1e300}}})", "model.moe.capacity_factor", "3.4e38"},
      {R"({"optim": {"ns_steps": 101}})", "optim.ns_steps", "must be in [1, 100], got 101"},
      // the name exists in another section
      {R"({"model": {"n_experts": 8}})", "model.n_experts", "did you mean model.moe.n_experts?"},
      {R"({"optim": {"block_size": 8}})", "optim.block_size",
       "did you mean optim.shampoo.block_size or optim.soap.block_size or optim.asgo.block_size?"},
      {R"({"optim": {"ns_steps": 0}})", "optim.ns_steps", "must be in [1, 100], got 0"},
      {R"({"model": {"moe": {"n_experts": 4, "first_dense": 5}}})", "model.moe.first_dense",
       "5 exceeds model.n_layers = 4"},
      {R"({"model": {"moe": {"n_experts": 4, "first_dense": 4}}})", "model.moe.first_dense",
       "4 equals model.n_layers = 4, which leaves no MoE layer"},
      {R"({"train": {"batch_tokens": 3000}})", "train.batch_tokens",
       "3000 is not a multiple of micro_batch * seq_len * world_size = 8 * 128 * 1 = 1024; use e.g. 2048 or 3072"},
      {R"({"train": {"batch_tokens": 512}})", "train.batch_tokens", "use e.g. 1024"},
      // grad_accum is an int: 2^31 micro-batches and more per step used to run as 0 or negative
      // ("take_loss: no micro-batch since the last take_loss")
      {R"({"train": {"batch_tokens": 2199023255552}})", "train.batch_tokens",
       "2199023255552 is 2147483648 micro-batches of micro_batch * seq_len * world_size = 1024 "
       "tokens per step, more than 2147483647"},
      {R"({"train": {"batch_tokens": 9223372036854775807}})", "train.batch_tokens",
       "use e.g. 9223372036854774784 (or"},  // no overflowing "or -9223372036854775808"

      {R"({"train": {"seq_len": 256}})", "train.seq_len", "256 exceeds model.max_seq_len = 128"},
      {R"({"schedule": {"warmup": 301}})", "schedule.warmup", "301 exceeds train.max_steps = 300 (lower it too, e.g. --set schedule.warmup=30)"},
  };
  int i = 0;
  for (const auto& c : cases) {
    json j = small();
    j.merge_patch(json::parse(c.patch));
    std::string name = "err" + std::to_string(i++) + ".json";
    std::string file = t.write(name, j.dump(2));
    INFO("case " << c.patch);
    std::string expect = name + ": " + c.key + ": ";
    CHECK_THROWS_WITH(mf::load_config(file), Contains(expect) && Contains(c.text));
  }
  // The unpatched config is valid (so each case fails for its own reason).
  CHECK_NOTHROW(mf::load_config(t.write("ok.json", small().dump())));
  // optim.freon.c: both ends of [0, 0.9] are accepted.
  CHECK_NOTHROW(mf::load_config(t.write("ok.json", small().dump()), {"optim.freon.c=0.9"}));
  CHECK_NOTHROW(mf::load_config(t.write("ok.json", small().dump()), {"optim.freon.c=0"}));
  // micro_batch * seq_len * world_size past 2^63 (it used to wrap around).
  CHECK_THROWS_WITH(
      mf::load_config(t.write("ok2.json", small().dump()),
                      {"model.max_seq_len=2147483647", "train.seq_len=2147483647",
                       "train.micro_batch=2147483647", "train.world_size=3"}),
      Contains("train.batch_tokens: 2048 is not a multiple of micro_batch * seq_len * world_size = "
               "2147483647 * 2147483647 * 3 = more than 2^63; use e.g. a smaller micro_batch or seq_len"));
}

TEST_CASE("file-level errors: unreadable, invalid JSON, not an object", "[config]") {
  WorldSize ws(nullptr);
  TempDir t;
  CHECK_THROWS_WITH(mf::load_config((t.root / "absent.json").string()),
                    Contains("absent.json") && Contains("cannot open"));
  std::string bad = t.write("broken.json", "{\n  \"model\": {\"d_model\": 64,,}\n}");
  CHECK_THROWS_WITH(mf::load_config(bad), Contains("broken.json: invalid JSON") && Contains("line 2"));
  std::string arr = t.write("array.json", "[1, 2]");
  CHECK_THROWS_WITH(mf::load_config(arr), Contains("array.json: the top level must be a JSON object"));
  // Comments are allowed in config files.
  std::string com = t.write("comments.json", "{\n // a comment\n \"run\": {\"name\": \"c\"} /* x */\n}");
  CHECK(mf::load_config(com).run.name == "c");
  // A folder (tab completion stops at configs/) used to read as "invalid JSON".
  CHECK_THROWS_WITH(mf::load_config(t.root.string()), Contains("is a directory; give a .json file"));
}

TEST_CASE("world size comes from WORLD_SIZE", "[config]") {
  TempDir t;
  std::string f = t.write("ws.json", small().dump());
  {
    // srun starting the ranks itself: Slurm's task count, as the process group reads it.
    WorldSize ws(nullptr);
    setenv("SLURM_PROCID", "1", 1);
    setenv("SLURM_NTASKS", "2", 1);
    CHECK(mf::load_config(f).train.world_size == 2);
    setenv("SLURM_NTASKS", "two", 1);
    CHECK_THROWS_WITH(mf::load_config(f), Contains("SLURM_NTASKS environment variable") &&
                                              Contains("'two'"));
    setenv("WORLD_SIZE", "1", 1);  // the launcher's variables come first
    CHECK(mf::load_config(f).train.world_size == 1);
    unsetenv("SLURM_PROCID");
    unsetenv("SLURM_NTASKS");
  }
  {
    WorldSize ws("2");
    mf::Config c = mf::load_config(f);
    CHECK(c.train.world_size == 2);
    CHECK(c.grad_accum() == 1);  // 2048 / (8 * 128 * 2)
    CHECK(mf::config_to_json(c)["train"].count("world_size") == 0);
  }
  {
    WorldSize ws("4");  // 2048 tokens cannot be split over 4 ranks of 8 x 128
    CHECK_THROWS_WITH(mf::load_config(f), Contains("ws.json: train.batch_tokens: 2048 is not a multiple") &&
                                              Contains("8 * 128 * 4 = 4096; use e.g. 4096"));
  }
  {
    WorldSize ws("zero");
    CHECK_THROWS_WITH(mf::load_config(f), Contains("WORLD_SIZE") && Contains("'zero'"));
  }
  {
    WorldSize ws("0");
    CHECK_THROWS_WITH(mf::load_config(f), Contains("WORLD_SIZE") && Contains("positive integer"));
  }
}

TEST_CASE("run_dir substitutes {name}", "[config]") {
  mf::Config c;
  c.run.dir = "out/{name}/x-{name}";
  c.run.name = "abc";
  CHECK(c.run_dir() == "out/abc/x-abc");
  c.run.dir = "fixed";
  CHECK(c.run_dir() == "fixed");
}

TEST_CASE("every shipped config loads and validates", "[config]") {
  WorldSize ws(nullptr);
  fs::path dir = fs::path(MF_TEST_DIR) / ".." / "configs";
  int n = 0;
  for (auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".json") continue;
    INFO("config " << e.path().string());
    mf::Config c;
    REQUIRE_NOTHROW(c = mf::load_config(e.path().string()));
    CHECK(c.grad_accum() >= 1);
    CHECK(!c.run_dir().empty());
    CHECK(c.run_dir().find("{name}") == std::string::npos);
    // Resolved configs round-trip as well.
    CHECK(mf::config_to_json(mf::config_from_json(mf::config_to_json(c), "rt")) == mf::config_to_json(c));
    ++n;
  }
  CHECK(n >= 5);

  mf::Config tiny = mf::load_config((dir / "tiny.json").string());
  CHECK(tiny.model.vocab_size == 256);
  CHECK(tiny.data.shuffle == false);
  CHECK(tiny.run_dir() == "runs/tiny");
  CHECK(tiny.grad_accum() == 2);
  mf::Config adamw = mf::load_config((dir / "tiny-adamw.json").string());
  CHECK(adamw.optim.name == "adamw");
  CHECK(adamw.model.d_model == tiny.model.d_model);  // inherited
}

TEST_CASE("muonforge config prints the resolved config or an error", "[config][cli]") {
  WorldSize ws(nullptr);
  TempDir t;
  std::string root = fs::path(MF_TEST_DIR).parent_path().string();
  std::string out = (t.root / "out.txt").string();
  auto run = [&](const std::string& args) {
    std::string cmd = "cd '" + root + "' && '" + MF_BINARY + "' config " + args + " > '" + out + "' 2>&1";
    int rc = std::system(cmd.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  };
  auto output = [&] {
    std::ifstream in(out);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };

  REQUIRE(run("configs/tiny-adamw.json --set optim.lr=0.004 --json") == 0);
  json printed = json::parse(output());
  mf::Config c = mf::load_config(root + "/configs/tiny-adamw.json", {"optim.lr=0.004"});
  CHECK(printed == mf::config_to_json(c));
  REQUIRE(run("configs/tiny-adamw.json --set=optim.lr=0.004 --json") == 0);  // the = form
  CHECK(json::parse(output()) == mf::config_to_json(c));

  CHECK(run("configs/tiny.json") == 0);
  CHECK_THAT(output(), Contains("grad_accum 2") && Contains("runs/tiny"));
  CHECK_THAT(output(), Contains("# parameters: 853120 (0.85M)"));
  CHECK(run("configs/moe-tiny.json") == 0);
  CHECK_THAT(output(), Contains("# parameters: 1409176 (1.41M), 745624 (0.75M) active per token"));
  // --params: the trainer's per-parameter table (µP at width 256 over base 64 here: the hidden
  // matrices' wd multiplier 1/4 with Muon), without a run directory.
  CHECK(run("configs/mup-cpu.json --set model.d_model=256 --set model.n_heads=8 "
            "--set model.n_kv_heads=8 --set model.d_ff=768 --params") == 0);
  {
    const std::string o = output();
    CHECK_THAT(o, Contains("parametrization mup: width_mult 4"));
    const size_t at = o.find("model.layers.0.mlp.up_proj.weight");
    REQUIRE(at != std::string::npos);
    const std::string row = o.substr(at, o.find('\n', at) - at);
    CHECK_THAT(row, Contains("hidden") && Contains("muon") && Contains("0.25"));
  }
  CHECK(run("configs/tiny.json --params --json") == 1);
  CHECK_THAT(output(), Contains("--json prints only the JSON"));

  CHECK(run("configs/tiny.json --set model.n_headz=2") == 1);
  CHECK_THAT(output(), Contains("configs/tiny.json (--set model.n_headz=2): model.n_headz: unknown key"));
  CHECK(run("configs/none.json") == 1);
  CHECK_THAT(output(), Contains("none.json"));
  CHECK(run("") == 1);
  CHECK_THAT(output(), Contains("missing FILE"));
  CHECK(run("--help") == 0);
  CHECK_THAT(output(), Contains("usage: muonforge config FILE") && Contains("--set=KEY=VALUE works too"));
  // `train --resume CONFIG`: the config went to --resume; said, where only the usage was printed.
  int rc = std::system(("cd '" + root + "' && '" + MF_BINARY + "' train --resume configs/tiny.json > '" +
                        out + "' 2>&1").c_str());
  CHECK(WEXITSTATUS(rc) == 2);
  CHECK_THAT(output(), Contains("error: train: no CONFIG given (--resume took 'configs/tiny.json' as "
                                "the checkpoint to resume)"));
  // --version: the project version and the commit built from (git is there in a checkout).
  rc = std::system(("cd '" + root + "' && '" + MF_BINARY + "' --version > '" + out + "' 2>&1").c_str());
  CHECK(WEXITSTATUS(rc) == 0);
  CHECK_THAT(output(), Contains(std::string("muonforge ") + mf::version() + " (commit " +
                                mf::build_commit() + ", CUDA backend "));
  rc = std::system(("cd '" + root + "' && '" + MF_BINARY + "' train > '" + out + "' 2>&1").c_str());
  CHECK(WEXITSTATUS(rc) == 2);
  CHECK_THAT(output(), Contains("usage: muonforge train") && Contains("error: train: no CONFIG given"));
}

TEST_CASE("train.precision: bf16 and fp32 are accepted, anything else named", "[config]") {
  mf::CpuBackend cpu;
  CHECK_NOTHROW(cpu.set_precision("fp32"));
  CHECK_NOTHROW(cpu.set_precision("bf16"));  // the default; the CPU computes in fp32 anyway
  CHECK(cpu.act_dtype() == mf::DType::F32);
  CHECK_THROWS_WITH(cpu.set_precision("fp16"), Catch::Contains("train.precision \"fp16\"") &&
                                                   Catch::Contains("expected \"bf16\" or \"fp32\""));
}
