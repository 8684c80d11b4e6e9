// Trainer end to end on CPU: bit-exact resume, checkpoint retention, metrics, non-finite stop,
// corrupted checkpoints.
#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "data/shard.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace mf;

namespace {

std::string temp_dir(const std::string& tag) {
  fs::path p = fs::temp_directory_path() / ("mf_train_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

// A learnable toy language: noisy arithmetic sequences over a 32-token vocabulary.
void write_data(const std::string& dir) {
  Rng rng(7);
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> toks;
    uint32_t x = 0;
    for (int i = 0; i < 6000; ++i) {
      x = (x + 3 + (rng.below(10) == 0 ? rng.below(5) : 0)) % 32;
      toks.push_back(x);
    }
    write_shard(dir + "/" + split + "_000000.bin", toks, 2);
  }
}

Config tiny_config(const std::string& data, const std::string& run_dir, const std::string& opt) {
  Config c;
  c.model.vocab_size = 32;
  c.model.d_model = 32;
  c.model.n_layers = 2;
  c.model.n_heads = 4;
  c.model.n_kv_heads = 2;
  c.model.d_ff = 64;
  c.model.max_seq_len = 16;
  c.optim.name = opt;
  c.optim.lr = opt == "muon" ? 0.02 : 3e-3;
  c.optim.wd = 0.01;
  c.schedule.warmup = 2;
  c.schedule.decay = "cosine";
  c.train.seq_len = 16;
  c.train.micro_batch = 4;
  c.train.batch_tokens = 128;  // 2 micro-batches of accumulation
  c.train.max_steps = 8;
  c.train.eval_every = 4;
  c.train.eval_batches = 2;
  c.train.ckpt_every = 2;
  c.train.keep_ckpts = 2;
  c.train.log_every = 1;
  c.train.device = "cpu";
  c.data.train = data + "/train_*.bin";
  c.data.val = data + "/val_*.bin";
  c.data.shuffle = true;
  c.run.dir = run_dir;
  c.run.name = "t";
  return c;
}

std::vector<char> file_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

}  // namespace

TEST_CASE("resume continues bit-exactly", "[train]") {
  const std::string root = temp_dir("resume");
  write_data(root);
  for (const char* opt : {"muon", "adamw"}) {
    DYNAMIC_SECTION(opt) {
      TrainOptions quiet;
      quiet.quiet = true;
      Config a = tiny_config(root, root + "/straight_" + opt, opt);
      TrainResult ra = Trainer(a, quiet).run();
      REQUIRE(ra.losses.size() == 8);
      CHECK(ra.losses.back() < ra.losses.front());  // it learns

      Config b = tiny_config(root, root + "/split_" + opt, opt);
      TrainOptions half = quiet;
      half.stop_at = 4;
      TrainResult rb1 = Trainer(b, half).run();
      REQUIRE(rb1.losses.size() == 4);
      TrainResult rb2 = Trainer(b, quiet).run();  // resumes automatically
      REQUIRE(rb2.losses.size() == 4);
      for (int i = 0; i < 4; ++i) {
        CHECK(rb1.losses[i] == ra.losses[i]);
        CHECK(rb2.losses[i] == ra.losses[4 + i]);  // bitwise equal
      }
      // Same final weights and optimizer state, byte for byte.
      CHECK(file_bytes(ra.last_checkpoint + "/model.safetensors") ==
            file_bytes(rb2.last_checkpoint + "/model.safetensors"));
      CHECK(file_bytes(ra.last_checkpoint + "/optimizer.safetensors") ==
            file_bytes(rb2.last_checkpoint + "/optimizer.safetensors"));
      CHECK(ra.final_val_loss == rb2.final_val_loss);
    }
  }
  fs::remove_all(root);
}

TEST_CASE("run directory: retention, latest pointer, metrics", "[train]") {
  const std::string root = temp_dir("rundir");
  write_data(root);
  Config c = tiny_config(root, root + "/run", "muon");
  TrainOptions quiet;
  quiet.quiet = true;
  TrainResult r = Trainer(c, quiet).run();
  std::vector<std::string> ckpts;
  for (auto& e : fs::directory_iterator(root + "/run"))
    if (e.path().filename().string().rfind("ckpt-", 0) == 0)
      ckpts.push_back(e.path().filename().string());
  std::sort(ckpts.begin(), ckpts.end());
  REQUIRE(ckpts == std::vector<std::string>{"ckpt-000006", "ckpt-000008"});
  CHECK(find_latest_checkpoint(root + "/run") == root + "/run/ckpt-000008");
  CHECK(fs::exists(root + "/run/config.json"));
  CHECK(fs::exists(root + "/run/log.txt") == true);
  std::ifstream m(root + "/run/metrics.jsonl");
  int steps = 0, evals = 0;
  std::string line;
  while (std::getline(m, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) {
      ++steps;
      CHECK(j.contains("lr"));
      CHECK(j.contains("grad_norm"));
      CHECK(j.contains("tok_per_s"));
    }
    if (j.contains("val_loss")) ++evals;
  }
  CHECK(steps == 8);
  CHECK(evals == 2);
  // Running again finds the finished run and does nothing.
  TrainResult again = Trainer(c, quiet).run();
  CHECK(again.losses.empty());
  CHECK(again.steps_done == 8);
  // A checkpoint's state.json carries step and loader state.
  std::ifstream sj(root + "/run/ckpt-000008/state.json");
  auto st = nlohmann::json::parse(sj);
  CHECK(st["step"] == 8);
  CHECK(st.contains("loader"));
  fs::remove_all(root);
}

TEST_CASE("a non-finite loss stops the run and names the step", "[train]") {
  const std::string root = temp_dir("nan");
  write_data(root);
  Config c = tiny_config(root, root + "/run", "adamw");
  c.optim.lr = 1e30;  // blows up within a couple of steps
  c.optim.adamw.lr = 1e30;
  c.optim.grad_clip = 0;
  c.train.ckpt_every = 1;
  TrainOptions quiet;
  quiet.quiet = true;
  CHECK_THROWS_WITH(Trainer(c, quiet).run(), Catch::Contains("non-finite") &&
                                                 Catch::Contains("step") &&
                                                 Catch::Contains("stopping before the update"));
  // Whatever checkpoint was written before the blow-up is complete and loadable.
  std::string last = find_latest_checkpoint(root + "/run");
  if (!last.empty()) {
    SafetensorsReader r(last + "/model.safetensors");
    CHECK(!r.names().empty());
  }
  fs::remove_all(root);
}

TEST_CASE("a corrupted checkpoint gives a clear error on resume", "[train]") {
  const std::string root = temp_dir("corrupt");
  write_data(root);
  Config c = tiny_config(root, root + "/run", "muon");
  c.train.max_steps = 2;
  TrainOptions quiet;
  quiet.quiet = true;
  TrainResult r = Trainer(c, quiet).run();
  // A crash mid-save leaves a hidden temporary directory: it is ignored and cleared on restart.
  fs::create_directories(root + "/run/.tmp-ckpt-000004/");
  std::ofstream(root + "/run/.tmp-ckpt-000004/model.safetensors") << "partial";
  CHECK(find_latest_checkpoint(root + "/run") == r.last_checkpoint);
  {
    Config c3 = c;
    c3.train.max_steps = 3;
    TrainResult r3 = Trainer(c3, quiet).run();
    CHECK(r3.losses.size() == 1);  // resumed at 2 despite the stale temporary
    CHECK(!fs::exists(root + "/run/.tmp-ckpt-000004"));
    r = r3;
  }
  const std::string model = r.last_checkpoint + "/model.safetensors";
  fs::resize_file(model, fs::file_size(model) - 100);
  c.train.max_steps = 4;
  CHECK_THROWS_WITH(Trainer(c, quiet), Catch::Contains("model.safetensors"));
  // An explicit --resume of a directory that is not a checkpoint.
  TrainOptions bad = quiet;
  bad.resume = root;
  CHECK_THROWS_WITH(Trainer(c, bad), Catch::Contains("state.json"));
  fs::remove_all(root);
}
