// Helpers shared by the Catch2 tests: temp dirs, running commands, finite differences, fixture
// token handling. Header-only; include after <catch2/catch.hpp>.
#pragma once
#include <unistd.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/attention_check.h"  // normalized_max_error
#include "config/config.h"
#include "core/rng.h"
#include "op_tolerance.h"

namespace mf::test {

// A fresh folder under the system temp dir, removed at scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag = "test") {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("mf_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  std::set<std::string> entries() const {
    std::set<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(path))
      out.insert(e.path().filename().string());
    return out;
  }
};

// Runs `cmd` through the shell; returns stdout+stderr and sets *rc to the exit status.
inline std::string run_capture(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int st = ::pclose(p);
  *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// The message of the exception f throws, or "<no error>" when it throws none (error tests match
// parts of the message: every user-facing error names the file, key or value to fix).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no error>";
}

using Vec = std::vector<double>;

// The op harness's error measure (op_tolerance.h): max |got - want| / max |want| (the plain max
// difference when want is all zeros); a size mismatch or a non-finite value -> infinity. The
// same function as the cuDNN-vs-flash agreement check (src/backend/attention_check.h).
inline double norm_err(const Vec& got, const Vec& want) { return normalized_max_error(got, want); }

// Central differences of loss() over every coordinate of p (or max_checks sampled ones) against
// the analytic gradient. Returns the max error normalized by the largest analytic gradient
// (see op_tolerance.h). An analytic gradient that is zero everywhere (T=1 attention's dq, V=1
// cross-entropy's dx) passes only if the finite differences are zero too.
inline double fd_error(Vec& p, const Vec& grad, const std::function<double()>& loss,
                       uint64_t seed, size_t max_checks = 64) {
  REQUIRE(p.size() == grad.size());
  std::vector<size_t> idx;
  if (p.size() <= max_checks) {
    for (size_t i = 0; i < p.size(); ++i) idx.push_back(i);
  } else {
    Rng rng(seed, 7);
    for (size_t k = 0; k < max_checks; ++k) idx.push_back(size_t(rng.below(p.size())));
  }
  double scale = 0;
  for (double g : grad) scale = std::max(scale, std::abs(g));
  double err = 0;
  const double h = kFdStep;
  for (size_t i : idx) {
    const double saved = p[i];
    p[i] = saved + h;
    const double lp = loss();
    p[i] = saved - h;
    const double lm = loss();
    p[i] = saved;
    err = std::max(err, std::abs((lp - lm) / (2 * h) - grad[i]));
  }
  return err / std::max(scale, 1e-300);
}

// Splits a (B, T+1) row-major token block (as floats, from a fixture) into inputs and targets.
inline void split_tokens(const float* tok, int B, int T, std::vector<int32_t>& in,
                         std::vector<int32_t>& tg) {
  in.resize(size_t(B) * T);
  tg.resize(size_t(B) * T);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      in[size_t(b) * T + t] = int32_t(tok[size_t(b) * (T + 1) + t]);
      tg[size_t(b) * T + t] = int32_t(tok[size_t(b) * (T + 1) + t + 1]);
    }
}

// ||a - b|| / ||b|| in double.
inline double rel_err(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// One run's loss and parameter gradients against a reference run's: the loss within loss_rel
// (relative), each gradient within grad_tol (normalized_max_error); a failure names the
// parameter's index.
inline void check_same_run(double loss, const std::vector<std::vector<float>>& grads,
                           double want_loss, const std::vector<std::vector<float>>& want,
                           double loss_rel, double grad_tol) {
  CHECK(std::abs(loss - want_loss) <= loss_rel * std::abs(want_loss));
  REQUIRE(grads.size() == want.size());
  for (size_t k = 0; k < grads.size(); ++k) {
    INFO("parameter " << k);
    CHECK(normalized_max_error(grads[k], want[k]) <= grad_tol);
  }
}

// The model and run settings a PyTorch fixture's JSON records (tests/reference/*_ref.py):
// "config" (the dense Llama shape), B, T, steps, clip; constant lr, no warmup, coupled decay.
inline Config fixture_config(const nlohmann::json& m) {
  Config c;
  auto& mc = m["config"];
  c.model.vocab_size = mc["vocab_size"];
  c.model.d_model = mc["d_model"];
  c.model.n_layers = mc["n_layers"];
  c.model.n_heads = mc["n_heads"];
  c.model.n_kv_heads = mc["n_kv_heads"];
  c.model.d_ff = mc["d_ff"];
  c.model.max_seq_len = mc["max_seq_len"];
  c.model.rope_theta = mc["rope_theta"];
  c.model.norm_eps = mc["norm_eps"];
  c.model.tie_embeddings = false;
  c.train.micro_batch = m["B"];
  c.train.seq_len = m["T"];
  c.train.max_steps = m["steps"];
  c.train.batch_tokens = c.train.micro_batch * c.train.seq_len;
  c.schedule.warmup = 0;
  c.schedule.decay = "constant";
  c.optim.grad_clip = m["clip"];
  c.optim.wd_mode = "coupled";
  return c;
}

// The Muon run of a PyTorch fixture's JSON ("muon" and "muon_adamw" sections, written by
// tests/reference/*_ref.py) as optimizer settings.
inline void set_fixture_muon(Config& c, const nlohmann::json& m) {
  auto& mu = m["muon"];
  auto& a = m["muon_adamw"];
  c.optim.name = "muon";
  c.optim.lr = mu["lr"];
  c.optim.momentum = mu["momentum"];
  c.optim.nesterov = mu["nesterov"];
  c.optim.ns_steps = mu["ns_steps"];
  c.optim.wd = mu["wd"];
  c.optim.scale = "shape";
  c.optim.adamw.lr = a["lr"];
  c.optim.adamw.betas = {a["betas"][0], a["betas"][1]};
  c.optim.adamw.eps = a["eps"];
  c.optim.adamw.wd = a["wd"];
}

}  // namespace mf::test
