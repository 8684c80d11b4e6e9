// Data-parallel training through scripts/launch.py with the real binary (Gloo on CPU):
// 2 and 3 ranks match one process step for step (AdamW, Muon, with and without ZeRO-1); a rank
// killed mid-run is restarted and the job ends with the uninterrupted run's weights; a taken
// port, a missing master and mismatched configs fail fast with clear errors.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <csignal>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "data/shard.h"
#include "io/safetensors.h"

namespace fs = std::filesystem;
using namespace mf;

namespace {

const std::string kRoot = (fs::temp_directory_path() / ("mf_dist_" + std::to_string(getpid()))).string();
const std::string kBin = MF_BINARY;
const std::string kLaunch = std::string(MF_TEST_DIR) + "/../scripts/launch.py";

void setup_once() {
  static bool done = false;
  if (done) return;
  done = true;
  fs::remove_all(kRoot);
  fs::create_directories(kRoot);
  std::atexit([] {
    std::error_code ec;
    fs::remove_all(kRoot, ec);
  });
  // The launcher's temporary log folders (kept after a failed or stopped job) go under kRoot.
  ::setenv("TMPDIR", kRoot.c_str(), 1);
  Rng rng(5);
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> toks;
    uint32_t x = 1;
    for (int i = 0; i < 8000; ++i) {
      x = (x * 5 + 1 + uint32_t(rng.below(3))) % 40;
      toks.push_back(x);
    }
    write_shard(kRoot + "/" + split + "_000000.bin", toks, 2);
  }
  nlohmann::json c = {
      {"model", {{"vocab_size", 40}, {"d_model", 32}, {"n_layers", 2}, {"n_heads", 4},
                 {"n_kv_heads", 2}, {"d_ff", 64}, {"max_seq_len", 16}}},
      {"optim", {{"name", "muon"}, {"lr", 0.02}, {"wd", 0.01}, {"adamw", {{"lr", 0.003}}}}},
      {"schedule", {{"warmup", 2}, {"decay", "cosine"}}},
      {"train", {{"seq_len", 16}, {"micro_batch", 2}, {"batch_tokens", 192}, {"max_steps", 6},
                 {"eval_every", 3}, {"eval_batches", 6}, {"ckpt_every", 2}, {"keep_ckpts", 5},
                 {"log_every", 1}, {"device", "cpu"}}},
      {"data", {{"train", kRoot + "/train_*.bin"}, {"val", kRoot + "/val_*.bin"},
                {"shuffle", false}}},
      {"run", {{"dir", kRoot + "/runs/{name}"}, {"name", "x"}}}};
  std::ofstream(kRoot + "/cfg.json") << c.dump(2);
}

struct Result {
  int rc;
  std::string out;
  double seconds;
};

Result sh(const std::string& cmd) {
  const std::string log = kRoot + "/cmd.log";
  auto t0 = std::chrono::steady_clock::now();
  int rc = std::system(("OMP_NUM_THREADS=1 " + cmd + " >" + log + " 2>&1").c_str());
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, ss.str(), s};
}

std::string launch(int nproc, const std::string& args, const std::string& extra = "") {
  return "python3 " + kLaunch + " --standalone --nproc-per-node " + std::to_string(nproc) + " " +
         extra + " " + kBin + " train " + kRoot + "/cfg.json --quiet " + args;
}

// Step -> train loss (and val losses under key -step) from a run's metrics.jsonl.
std::map<int, double> losses(const std::string& run) {
  std::map<int, double> m;
  std::ifstream f(kRoot + "/runs/" + run + "/metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) m[j["step"].get<int>()] = j["loss"];
    if (j.contains("val_loss")) m[-j["step"].get<int>()] = j["val_loss"];
  }
  return m;
}

// Waits (at most 60 s) until `run` has logged n losses: a run started in the background is mid-run.
bool trained_steps(const std::string& run, size_t n) {
  const auto t0 = std::chrono::steady_clock::now();
  while (losses(run).size() < n) {
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(60)) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return true;
}

// Every step's train loss and every val loss of `got` within 1e-5 of `ref` (losses() maps).
void check_losses_match(const std::map<int, double>& ref, std::map<int, double> got) {
  REQUIRE(got.size() == ref.size());
  for (auto& [k, v] : ref) {
    INFO("step " << k << " (negative: val loss)");
    CHECK(got[k] == Approx(v).epsilon(1e-5));
  }
}

// Runs `run` with w1 ranks and args `first` up to step 3 (--stop-at 3), then continues it to the
// end with w2 ranks and args `then`; both sittings must succeed and the second must resume.
// Returns the second sitting's result.
Result stop_then_resume(const std::string& run, int w1, const std::string& first, int w2,
                        const std::string& then) {
  Result a = sh(launch(w1, first + " --set run.name=" + run + " --stop-at 3"));
  INFO(a.out);
  REQUIRE(a.rc == 0);
  Result b = sh(launch(w2, then + " --set run.name=" + run));
  INFO(b.out);
  REQUIRE(b.rc == 0);
  CHECK(b.out.find("resumed from") != std::string::npos);
  return b;
}

std::vector<char> bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

}  // namespace

TEST_CASE("2 and 3 ranks give the losses of one process", "[dist]") {
  setup_once();
  for (std::string opt : {"adamw", "muon"}) {
    const std::string o = "--set optim.name=" + opt + (opt == "adamw" ? " --set optim.lr=0.003" : "");
    Result r1 = sh(launch(1, o + " --set run.name=" + opt + "_w1"));
    REQUIRE(r1.rc == 0);
    auto ref = losses(opt + "_w1");
    REQUIRE(ref.size() == 8);  // 6 steps + 2 evals
    for (int zero : {0, 1})
      for (int w : {2, 3}) {
        const std::string name = opt + "_w" + std::to_string(w) + "_z" + std::to_string(zero);
        DYNAMIC_SECTION(name) {
          Result r = sh(launch(w, o + " --set train.zero=" + std::to_string(zero) +
                                      " --set run.name=" + name));
          INFO(r.out);
          REQUIRE(r.rc == 0);
          check_losses_match(ref, losses(name));
          // Sharded optimizer state: one file per rank (Muon always, AdamW with ZeRO-1).
          const bool sharded = opt == "muon" || zero == 1;
          CHECK(fs::exists(kRoot + "/runs/" + name + "/ckpt-000006/optimizer-rank1.safetensors") ==
                sharded);
        }
      }
  }
}

TEST_CASE("many small gradient buckets, overlap on and off, give the losses of one process",
          "[dist][bucket]") {
  // 0.004 MiB = 1048 floats: most tensors of the tiny model share buckets with their neighbours,
  // the 2048-float MLP matrices get buckets of their own; 0 = one bucket per tensor. Grad
  // accumulation is 3 (2 ranks) or 2 (3 ranks), so the grad-ready hook must wait for the last
  // micro-batch.
  setup_once();
  for (std::string opt : {"adamw", "muon"}) {
    const std::string o = "--set optim.name=" + opt + (opt == "adamw" ? " --set optim.lr=0.003" : "");
    Result r1 = sh(launch(1, o + " --set run.name=b_" + opt + "_w1"));
    REQUIRE(r1.rc == 0);
    auto ref = losses("b_" + opt + "_w1");
    REQUIRE(ref.size() == 8);
    struct Case {
      int w;
      const char* bucket_mb;
      bool overlap;
    };
    for (Case c : {Case{2, "0.004", true}, Case{3, "0.004", false}, Case{3, "0", true}}) {
      const std::string name = "b_" + opt + "_w" + std::to_string(c.w) + "_b" + c.bucket_mb +
                               (c.overlap ? "_on" : "_off");
      DYNAMIC_SECTION(name) {
        Result r = sh(launch(c.w, o + " --set train.bucket_mb=" + c.bucket_mb +
                                      " --set train.overlap_comm=" + (c.overlap ? "true" : "false") +
                                      " --set run.name=" + name));
        INFO(r.out);
        REQUIRE(r.rc == 0);
        // The log line states the plan: many buckets, and whether they overlap backward.
        CHECK(r.out.find(c.overlap ? "overlapping backward" : "after backward") != std::string::npos);
        CHECK(r.out.find("gradient all-reduce: 1 bucket") == std::string::npos);
        check_losses_match(ref, losses(name));
      }
    }
  }
}

TEST_CASE("a killed rank is restarted and the job ends as if uninterrupted", "[dist]") {
  setup_once();
  Result a = sh(launch(2, "--set run.name=straight"));
  REQUIRE(a.rc == 0);
  // Rank 1 SIGKILLs itself after step 3 (checkpoint at 2); the launcher restarts the group.
  Result b = sh("MF_FAULT_KILL_AT=3:1 " + launch(2, "--set run.name=killed", "--max-restarts 1"));
  INFO(b.out);
  REQUIRE(b.rc == 0);
  CHECK(b.out.find("restart") != std::string::npos);
  CHECK(b.out.find("resumed from") != std::string::npos);
  CHECK(bytes(kRoot + "/runs/straight/ckpt-000006/model.safetensors") ==
        bytes(kRoot + "/runs/killed/ckpt-000006/model.safetensors"));
  auto la = losses("straight"), lb = losses("killed");
  CHECK(la == lb);
  // Without restarts the failure is reported with the killed rank's signal.
  Result c = sh("MF_FAULT_KILL_AT=3:1 " + launch(2, "--set run.name=killed2"));
  CHECK(c.rc != 0);
  CHECK(c.out.find("rank 1") != std::string::npos);
}

TEST_CASE("a killed rank under --resume CKPT: the restart continues from the job's latest checkpoint",
          "[dist]") {
  setup_once();
  REQUIRE(sh(launch(2, "--set run.name=resume_ref")).rc == 0);
  // A first sitting to step 2; keep_ckpts 1, so ckpt-000002 is pruned once ckpt-000004 exists.
  const std::string o = " --set run.name=resume_kill --set train.keep_ckpts=1";
  REQUIRE(sh(launch(2, o + " --stop-at 2")).rc == 0);
  // Rank 1 dies after step 5 (checkpoint at 4). The restart used to go back to --resume's
  // ckpt-000002: gone by then, so the job failed (or, with it kept, the checkpoints since were
  // moved to superseded-1 and the steps trained again).
  Result r = sh("MF_FAULT_KILL_AT=5:1 " +
                launch(2, o + " --resume " + kRoot + "/runs/resume_kill/ckpt-000002", "--max-restarts 1"));
  INFO(r.out);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("resuming from the latest checkpoint " + kRoot + "/runs/resume_kill/ckpt-000004") !=
        std::string::npos);
  CHECK_FALSE(fs::exists(kRoot + "/runs/resume_kill/superseded-1"));
  CHECK(losses("resume_ref") == losses("resume_kill"));
  CHECK(bytes(kRoot + "/runs/resume_ref/ckpt-000006/model.safetensors") ==
        bytes(kRoot + "/runs/resume_kill/ckpt-000006/model.safetensors"));
}

TEST_CASE("--no-resume in a used run directory: a rank killed in setup restarts the new run, not "
          "the old one", "[dist]") {
  setup_once();
  REQUIRE(sh(launch(2, "--set run.name=fresh_ref")).rc == 0);
  const std::string o = " --set run.name=fresh_kill";
  // An earlier run of another seed, finished: ckpt-000002 .. ckpt-000006.
  REQUIRE(sh(launch(2, o + " --set train.seed=7")).rc == 0);
  // The new job starts over; rank 0 dies in setup on attempt 0, before the model is built. The
  // restart resumes the job's latest checkpoint: there must be none (the old run's were set aside
  // first). It used to find the old ckpt-000006, so the restart "continued" a finished run.
  Result r = sh("MF_FAULT_KILL_AT=setup:0 " + launch(2, o + " --no-resume", "--max-restarts 1"));
  INFO(r.out);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("restart") != std::string::npos);
  CHECK(r.out.find("resumed from") == std::string::npos);
  CHECK(fs::exists(kRoot + "/runs/fresh_kill/superseded-1/ckpt-000006"));
  CHECK(losses("fresh_ref") == losses("fresh_kill"));
  CHECK(bytes(kRoot + "/runs/fresh_ref/ckpt-000006/model.safetensors") ==
        bytes(kRoot + "/runs/fresh_kill/ckpt-000006/model.safetensors"));
}

// One process, no launcher: SIGKILLed while the save of step 4 deletes ckpt-000002 (keep_ckpts 1),
// after that checkpoint's state.json is gone. The deletion used to happen in place, leaving a
// ckpt-000002 directory with some of its files that no later pruning saw (it has no state.json).
TEST_CASE("a kill while a checkpoint is pruned leaves no part of it behind", "[dist]") {
  setup_once();
  const std::string o = kBin + " train " + kRoot + "/cfg.json --quiet --set train.keep_ckpts=1";
  REQUIRE(sh(o + " --set run.name=prune_ref").rc == 0);
  const std::string run = kRoot + "/runs/prune_kill";
  Result k = sh("MF_FAULT_KILL_AT=prune:4 " + o + " --set run.name=prune_kill");
  CHECK(k.rc != 0);  // killed
  CHECK(fs::exists(run + "/ckpt-000004/state.json"));
  Result r = sh(o + " --set run.name=prune_kill");
  INFO(r.out);
  REQUIRE(r.rc == 0);
  CHECK(r.out.find("resumed from " + run + "/ckpt-000004") != std::string::npos);
  std::vector<std::string> left;
  for (auto& e : fs::directory_iterator(run)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("ckpt-", 0) == 0 || n.rfind(".tmp-", 0) == 0) left.push_back(n);
  }
  CHECK(left == std::vector<std::string>{"ckpt-000006"});
  CHECK(losses("prune_ref") == losses("prune_kill"));
  CHECK(bytes(kRoot + "/runs/prune_ref/ckpt-000006/model.safetensors") ==
        bytes(run + "/ckpt-000006/model.safetensors"));
}

TEST_CASE("a malformed MF_FAULT_KILL_AT is an error, not a silent run", "[dist]") {
  setup_once();
  const std::string o = kBin + " train " + kRoot + "/cfg.json --quiet --set run.name=fault_typo";
  for (const char* bad : {"setup", "prune:x", "3:", "-1", "steps:3"}) {
    Result r = sh(std::string("MF_FAULT_KILL_AT=") + bad + " " + o);
    INFO(bad << "\n" << r.out);
    CHECK(r.rc == 1);
    CHECK(r.out.find(std::string("MF_FAULT_KILL_AT='") + bad + "': expected STEP, STEP:RANK") !=
          std::string::npos);
  }
  // The plain STEP form is rank 0's: the run dies after step 2, and a restart (attempt 1) runs on.
  Result k = sh("MF_FAULT_KILL_AT=2 " + o);
  CHECK(k.rc != 0);
  Result r = sh("MF_FAULT_KILL_AT=2 MF_RESTART_COUNT=1 " + o);
  INFO(r.out);
  CHECK(r.rc == 0);
  CHECK(r.out.find("resumed from " + kRoot + "/runs/fault_typo/ckpt-000002") != std::string::npos);
}

// Two launchers on this host stand for two nodes (--nnodes 2, one rank each, a fixed port),
// started in the background; `env` goes before both commands, `args` after the config.
struct TwoNodes {
  std::string log[2];
  int launcher[2] = {0, 0};
};

TwoNodes start_two_nodes(const std::string& run, const std::string& env, const std::string& args = "") {
  static int next_port = 0;
  if (next_port == 0) next_port = 20000 + int(getpid() % 20000);
  const int port = next_port++;
  TwoNodes t;
  for (int node = 0; node < 2; ++node) {
    t.log[node] = kRoot + "/" + run + ".node" + std::to_string(node) + ".log";
    fs::remove(t.log[node] + ".rc");
    const std::string cmd = "OMP_NUM_THREADS=1 MF_STORE_TIMEOUT=20 " + env + " python3 " + kLaunch +
                            " --nnodes 2 --node-rank " + std::to_string(node) + " --nproc-per-node 1 " +
                            "--master-addr 127.0.0.1 --master-port " + std::to_string(port) +
                            " --max-restarts 1 " + kBin + " train " + kRoot + "/cfg.json --quiet " +
                            "--set run.name=" + run + " " + args;
    // The subshell records the launcher's pid, then its exit code once it is done.
    std::system(("(" + cmd + " >" + t.log[node] + " 2>&1 & echo $! >" + t.log[node] + ".pid; wait $!; echo $? >" +
                 t.log[node] + ".rc.tmp; mv " + t.log[node] + ".rc.tmp " + t.log[node] + ".rc) &")
                    .c_str());
    for (int i = 0; i < 100 && t.launcher[node] <= 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      std::ifstream(t.log[node] + ".pid") >> t.launcher[node];
    }
  }
  return t;
}

std::pair<Result, Result> wait_two_nodes(const TwoNodes& t) {
  std::pair<Result, Result> r;
  Result* out[2] = {&r.first, &r.second};
  const auto t0 = std::chrono::steady_clock::now();
  for (int node = 0; node < 2; ++node) {
    while (!fs::exists(t.log[node] + ".rc") && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(120))
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::ifstream f(t.log[node]), g(t.log[node] + ".rc");
    std::stringstream ss;
    ss << f.rdbuf();
    int rc = -1;
    g >> rc;
    *out[node] = {rc, ss.str(), 0.0};
  }
  return r;
}

std::pair<Result, Result> two_nodes(const std::string& run, const std::string& env) {
  return wait_two_nodes(start_two_nodes(run, env));
}

TEST_CASE("two nodes: a rank killed on either node restarts both; the job ends as if uninterrupted",
          "[dist][nodes]") {
  setup_once();
  auto [a0, a1] = two_nodes("nodes_straight", "");
  INFO(a0.out << a1.out);
  REQUIRE(a0.rc == 0);
  REQUIRE(a1.rc == 0);
  const auto straight = bytes(kRoot + "/runs/nodes_straight/ckpt-000006/model.safetensors");
  REQUIRE(!straight.empty());
  // Each node restarts once: the killed rank's because it died, the other's because its collective
  // lost the peer. The restarted rank must not join the store of the group still going down (it
  // did, about one time in three, before the store compared restart counts).
  for (int rep = 0; rep < 3; ++rep) {
    for (int killed = 0; killed < 2; ++killed) {
      const std::string run = "nodes_kill" + std::to_string(killed) + "_" + std::to_string(rep);
      auto [b0, b1] = two_nodes(run, "MF_FAULT_KILL_AT=3:" + std::to_string(killed));
      INFO(run << "\n--- node 0:\n" << b0.out << "\n--- node 1:\n" << b1.out);
      REQUIRE(b0.rc == 0);
      REQUIRE(b1.rc == 0);
      CHECK(b0.out.find("restart 1 of 1") != std::string::npos);
      CHECK(b1.out.find("restart 1 of 1") != std::string::npos);
      CHECK(b0.out.find("resumed from") != std::string::npos);
      CHECK(bytes(kRoot + "/runs/" + run + "/ckpt-000006/model.safetensors") == straight);
      CHECK(losses(run) == losses("nodes_straight"));
    }
  }
}

TEST_CASE("two nodes: SIGTERM to one launcher stops both nodes at the same checkpoint", "[dist][nodes]") {
  setup_once();
  TwoNodes t = start_two_nodes("nodes_term", "",
                               "--set train.max_steps=100000000 --set train.ckpt_every=0 "
                               "--set train.eval_every=0");
  REQUIRE(t.launcher[0] > 0);
  REQUIRE(trained_steps("nodes_term", 3));
  ::kill(t.launcher[0], SIGTERM);
  auto [n0, n1] = wait_two_nodes(t);
  INFO("--- node 0:\n" << n0.out << "\n--- node 1:\n" << n1.out);
  CHECK(n0.rc == 128 + SIGTERM);  // the launcher that got the signal says so
  CHECK(n1.rc == 0);              // the other node's rank stopped because its peer asked to
  CHECK(n1.out.find("another rank was asked to stop") != std::string::npos);
  CHECK(n1.out.find("restart") == std::string::npos);  // and no restart
  std::ifstream latest(kRoot + "/runs/nodes_term/latest");
  std::string ckpt;
  latest >> ckpt;
  REQUIRE(ckpt.rfind("ckpt-", 0) == 0);
  const std::string step = std::to_string(std::stoi(ckpt.substr(5)));
  CHECK(n0.out.find("after step " + step) != std::string::npos);
  CHECK(n1.out.find("after step " + step) != std::string::npos);
}

// Pids of the live (non-zombie) processes whose command line contains `needle`.
std::vector<int> processes_with(const std::string& needle) {
  std::vector<int> pids;
  for (auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream cmd(e.path() / "cmdline"), stat(e.path() / "stat");
    std::string c((std::istreambuf_iterator<char>(cmd)), {}), st((std::istreambuf_iterator<char>(stat)), {});
    const size_t paren = st.rfind(')');
    if (paren != std::string::npos && paren + 2 < st.size() && st[paren + 2] == 'Z') continue;
    std::replace(c.begin(), c.end(), '\0', ' ');
    if (c.find(needle) != std::string::npos) pids.push_back(std::stoi(name));
  }
  return pids;
}

TEST_CASE("a launcher killed with SIGKILL: its workers checkpoint and stop", "[dist]") {
  setup_once();
  const std::string pidfile = kRoot + "/orphan.pid";
  std::system(("OMP_NUM_THREADS=1 " +
               launch(2, "--set run.name=orphan --set train.max_steps=100000000 "
                         "--set train.ckpt_every=0 --set train.eval_every=0") +
               " >" + kRoot + "/orphan.log 2>&1 & echo $! >" + pidfile)
                  .c_str());
  int launcher = 0;
  std::ifstream(pidfile) >> launcher;
  REQUIRE(launcher > 1);
  REQUIRE(trained_steps("orphan", 3));  // both workers are mid-run
  REQUIRE(processes_with("run.name=orphan ").size() >= 2);
  ::kill(launcher, SIGKILL);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int> left;
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    left = processes_with("run.name=orphan ");
  } while (!left.empty() && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30));
  for (int pid : left) ::kill(pid, SIGKILL);  // do not leave them behind when the check fails
  CHECK(left.empty());
  // They stopped the way SIGTERM stops a run: with a checkpoint of the step they were on.
  std::ifstream latest(kRoot + "/runs/orphan/latest");
  std::string ckpt;
  latest >> ckpt;
  CHECK(ckpt.rfind("ckpt-", 0) == 0);
  std::ifstream log(kRoot + "/runs/orphan/log.txt");
  std::string text((std::istreambuf_iterator<char>(log)), {});
  CHECK(text.find("the launcher (pid " + std::to_string(launcher) + ") has exited") != std::string::npos);

  Result bad = sh("MF_LAUNCHER_PID=abc " + kBin + " train " + kRoot + "/cfg.json --quiet --set run.name=badpid");
  CHECK(bad.rc == 1);
  CHECK(bad.out.find("MF_LAUNCHER_PID='abc'") != std::string::npos);
}

TEST_CASE("mismatched configs, a taken port and a missing master fail fast", "[dist]") {
  setup_once();
  SECTION("mismatched config names the key") {
    const std::string cmd = "python3 " + kLaunch +
                            " --standalone --nproc-per-node 2 --no-python sh -c '" + kBin +
                            " train " + kRoot + "/cfg.json --quiet --set run.name=mm " +
                            "--set optim.lr=0.0$((2 + RANK))'";
    Result r = sh("MF_STORE_TIMEOUT=10 " + cmd);
    INFO(r.out);
    CHECK(r.rc != 0);
    CHECK(r.out.find("optim.lr") != std::string::npos);
    CHECK(r.seconds < 30);
  }
  SECTION("a taken port") {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    REQUIRE(bind(fd, (sockaddr*)&a, sizeof a) == 0);
    REQUIRE(listen(fd, 4) == 0);
    socklen_t len = sizeof a;
    getsockname(fd, (sockaddr*)&a, &len);
    const int port = ntohs(a.sin_port);
    Result r = sh("MF_STORE_TIMEOUT=5 python3 " + kLaunch + " --nproc-per-node 2 --master-addr " +
                  "127.0.0.1 --master-port " + std::to_string(port) + " " + kBin + " train " +
                  kRoot + "/cfg.json --quiet --set run.name=port");
    close(fd);
    INFO(r.out);
    CHECK(r.rc != 0);
    CHECK(r.out.find("already in use") != std::string::npos);
    CHECK(r.seconds < 30);
  }
  SECTION("a missing master") {
    Result r = sh("MF_STORE_TIMEOUT=2 RANK=1 WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 "
                  "MASTER_ADDR=127.0.0.1 MASTER_PORT=1 " + kBin + " train " + kRoot +
                  "/cfg.json --quiet --set run.name=nomaster");
    INFO(r.out);
    CHECK(r.rc == 1);
    CHECK(r.out.find("cannot reach master") != std::string::npos);
    CHECK(r.seconds < 20);
  }
  SECTION("a node that never comes") {
    // Node 0 of two: its rank waits for rank 1's address, then names it.
    Result r = sh("MF_STORE_TIMEOUT=3 python3 " + kLaunch + " --nnodes 2 --node-rank 0 "
                  "--nproc-per-node 1 --master-addr 127.0.0.1 --master-port " +
                  std::to_string(20000 + ::getpid() % 20000) + " " + kBin + " train " + kRoot +
                  "/cfg.json --quiet --set run.name=nonode");
    INFO(r.out);
    CHECK(r.rc != 0);
    CHECK(r.out.find("rank(s) 1 never joined the group") != std::string::npos);
    CHECK(r.seconds < 30);
  }
}

TEST_CASE("ZeRO-1 splits the AdamW state over the ranks and resumes bit-exactly", "[dist][zero]") {
  setup_once();
  const std::string o = "--set optim.name=adamw --set optim.lr=0.003 --set train.zero=1 ";
  Result a = sh(launch(3, o + "--set run.name=z_straight"));
  INFO(a.out);
  REQUIRE(a.rc == 0);
  CHECK(a.out.find("reduce-scattered for ZeRO-1") != std::string::npos);
  const std::string ck = kRoot + "/runs/z_straight/ckpt-000006/";
  int64_t total = 0;
  {
    SafetensorsReader m(ck + "model.safetensors");
    for (auto& n : m.names()) total += m.entry(n).numel();
  }
  // Each rank holds exp_avg / exp_avg_sq for its shard only, as fragments "<name>[a:b]"; the
  // shards together cover every weight exactly once, about a third each.
  int64_t covered = 0;
  for (int r = 0; r < 3; ++r) {
    SafetensorsReader opt(ck + "optimizer-rank" + std::to_string(r) + ".safetensors");
    int64_t mine = 0;
    for (auto& n : opt.names()) {
      INFO(n);
      CHECK(n.find('[') != std::string::npos);
      if (n.size() > 8 && n.compare(n.size() - 8, 8, ".exp_avg") == 0) mine += opt.entry(n).numel();
    }
    INFO("rank " << r << " holds " << mine << " of " << total);
    CHECK(double(mine) > 0.25 * double(total));
    CHECK(double(mine) < 0.42 * double(total));
    covered += mine;
  }
  CHECK(covered == total);

  // Stop after step 3, continue with the same command: the same final weights, byte for byte.
  stop_then_resume("z_resumed", 3, o, 3, o);
  CHECK(bytes(ck + "model.safetensors") ==
        bytes(kRoot + "/runs/z_resumed/ckpt-000006/model.safetensors"));
  CHECK(losses("z_straight") == losses("z_resumed"));

  // Other buckets mean other shards: the state is re-sharded from the fragments on resume.
  Result d = stop_then_resume("z_rebucket", 3, o, 3, o + "--set train.bucket_mb=0.004");
  INFO(d.out);
  CHECK(d.out.find("re-sharded") != std::string::npos);
  check_losses_match(losses("z_straight"), losses("z_rebucket"));
}

TEST_CASE("a run resumes on another number of ranks", "[dist][zero]") {
  // Stop after step 3 with one layout, continue with another: the same global batches, so the
  // losses of the straight run (any world size gives them within 1e-5, see above) are met again,
  // which needs the data position and every optimizer state tensor carried over exactly.
  setup_once();
  struct Case {
    const char* name;
    const char* opt;
    int w1, z1, w2, z2;
  };
  for (Case c : {Case{"adamw_2z1_to_3z1", "adamw", 2, 1, 3, 1},
                 Case{"adamw_1_to_3z1", "adamw", 1, 0, 3, 1},
                 Case{"adamw_3z1_to_1", "adamw", 3, 1, 1, 0},
                 Case{"muon_2z1_to_3", "muon", 2, 1, 3, 0},
                 Case{"muon_3_to_1", "muon", 3, 0, 1, 0}}) {
    DYNAMIC_SECTION(c.name) {
      const std::string o = std::string("--set optim.name=") + c.opt +
                            (std::string(c.opt) == "adamw" ? " --set optim.lr=0.003" : "");
      const std::string ref_name = std::string("rw_ref_") + c.opt;
      if (!fs::exists(kRoot + "/runs/" + ref_name + "/ckpt-000006"))
        REQUIRE(sh(launch(2, o + " --set run.name=" + ref_name)).rc == 0);
      const std::string run = std::string("rw_") + c.name;
      Result b = stop_then_resume(run, c.w1, o + " --set train.zero=" + std::to_string(c.z1), c.w2,
                                  o + " --set train.zero=" + std::to_string(c.z2));
      INFO(b.out);
      CHECK(b.out.find("written by " + std::to_string(c.w1) + " rank(s)") != std::string::npos);
      check_losses_match(losses(ref_name), losses(run));
    }
  }
}

TEST_CASE("SIGTERM or SIGHUP to the launcher: all ranks checkpoint the same step, then resume",
          "[dist]") {
  setup_once();
  const int sig = GENERATE(SIGTERM, SIGHUP);  // SIGHUP: the launcher's terminal closed
  // Ignored here (ctest under nohup), the launcher would inherit that and rightly run on.
  std::signal(SIGHUP, SIG_DFL);
  const std::string name = sig == SIGTERM ? "sigterm" : "sighup";
  const std::string metrics = kRoot + "/runs/" + name + "/metrics.jsonl";
  // Many steps so the signal lands mid-run; the launcher runs in the background.
  const std::string cmd = launch(2, "--set run.name=" + name + " --set train.max_steps=400 " +
                                        "--set train.ckpt_every=1000 --set train.eval_every=0");
  const std::string pidfile = kRoot + "/launcher.pid";
  std::system(("OMP_NUM_THREADS=1 " + cmd + " >" + kRoot + "/" + name + ".log 2>&1 & echo $! >" +
               pidfile).c_str());
  std::ifstream pf(pidfile);
  int pid = 0;
  pf >> pid;
  REQUIRE(pid > 0);
  REQUIRE(trained_steps(name, 3));
  kill(pid, sig);
  int rc = -1;
  for (int i = 0; i < 600 && rc < 0; ++i) {  // the launcher exits within 60 s
    if (kill(pid, 0) != 0) rc = 0;
    usleep(100 * 1000);
  }
  REQUIRE(rc == 0);
  std::string latest;
  std::ifstream(kRoot + "/runs/" + name + "/latest") >> latest;
  REQUIRE(!latest.empty());
  const int step = std::stoi(latest.substr(5));
  CHECK(step >= 3);
  CHECK(step < 400);
  CHECK(fs::exists(kRoot + "/runs/" + name + "/" + latest + "/optimizer-rank1.safetensors"));
  // The same command continues from there to the end.
  Result r = sh(launch(2, "--set run.name=" + name + " --set train.max_steps=" +
                              std::to_string(step + 2) + " --set train.ckpt_every=1000 " +
                              "--set train.eval_every=0 --set schedule.warmup=2"));
  INFO(r.out);
  // max_steps changed, so the schedule differs, but the resume itself must work.
  CHECK(r.rc == 0);
  CHECK(r.out.find("resumed from") != std::string::npos);
}

TEST_CASE("matrix optimizers beyond Muon are spread over ranks with the same losses", "[dist]") {
  setup_once();
  for (std::string opt : {"shampoo", "normuon"}) {
    DYNAMIC_SECTION(opt) {
      // Shampoo's default eps (1e-12) makes its inverse roots amplify the ~1e-8 differences of
      // a different all-reduce order into ~1e-3 loss differences within a few steps; a
      // well-conditioned eps shows the distributed update itself is the same.
      const std::string o = "--set optim.name=" + opt + " --set optim.lr=0.01" +
                            (opt == "shampoo" ? " --set optim.shampoo.eps=1e-4" : "");
      REQUIRE(sh(launch(1, o + " --set run.name=" + opt + "_w1")).rc == 0);
      Result r = sh(launch(2, o + " --set run.name=" + opt + "_w2"));
      INFO(r.out);
      REQUIRE(r.rc == 0);
      CHECK(r.out.find("distributed matrix optimizer") != std::string::npos);
      check_losses_match(losses(opt + "_w1"), losses(opt + "_w2"));
      CHECK(fs::exists(kRoot + "/runs/" + opt + "_w2/ckpt-000006/optimizer-rank1.safetensors"));
    }
  }
}

TEST_CASE("QK-clip on 2 ranks clips by the max over ranks and keeps the ranks' weights equal",
          "[dist][qkclip]") {
  setup_once();
  // tau tiny: every head is clipped every step, from each rank's own batch's logits. Before every
  // checkpoint (every 2 steps) the trainer compares the ranks' weights and fails on a difference,
  // so a clip that used each rank's own maximum would stop this run.
  const std::string o = " --set optim.qk_clip_tau=0.001";
  for (int zero : {0, 1}) {
    const std::string name = "qkclip_w2_z" + std::to_string(zero);
    DYNAMIC_SECTION(name) {
      Result r = sh(launch(2, o + " --set train.zero=" + std::to_string(zero) + " --set run.name=" + name));
      INFO(r.out);
      REQUIRE(r.rc == 0);
      CHECK(r.out.find("weights differ") == std::string::npos);
      std::ifstream f(kRoot + "/runs/" + name + "/metrics.jsonl");
      std::string line;
      int clipped_steps = 0;
      while (std::getline(f, line)) {
        auto j = nlohmann::json::parse(line);
        if (j.value("qk_clipped", 0) > 0) ++clipped_steps;
      }
      CHECK(clipped_steps == 6);
    }
  }
}
