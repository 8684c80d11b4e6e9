// µP multipliers (the resolved table at two widths against the formulas of src/optim/mup.h),
// a coordinate check (logit RMS after a few steps stays flat across widths under µP and grows
// under SP), the host eigen-solver and singular values, SVD entropy, max attention logits against
// a brute-force double loop, QK-clip, and the diagnostics records written by the trainer.
#include <catch2/catch.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "data/shard.h"
#include "model/llama.h"
#include "optim/mup.h"
#include "optim/optimizer.h"
#include "train/diagnostics.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace mf;
using Catch::Contains;

namespace {

// A Llama of width d with head_dim 16 and d_ff = 2d, so every hidden dimension scales with d.
Config width_config(int d, int base, const std::string& opt, bool mup) {
  Config c;
  c.model.vocab_size = 64;
  c.model.d_model = d;
  c.model.n_layers = 2;
  c.model.n_heads = d / 16;
  c.model.n_kv_heads = std::max(1, d / 32);
  c.model.d_ff = 2 * d;
  c.model.max_seq_len = 16;
  c.model.init_std = 0.02;
  c.mup.enabled = mup;
  c.mup.base_width = base;
  c.mup.base_depth = 2;
  c.optim.name = opt;
  c.optim.lr = opt == "muon" ? 0.01 : 4e-3;
  c.optim.scale = "spectral";
  c.optim.adamw.lr = 4e-3;
  c.optim.grad_clip = 0;  // clipping would rescale updates differently per width
  c.schedule.warmup = 0;
  c.schedule.decay = "constant";
  c.train.seq_len = 16;
  c.train.micro_batch = 4;
  c.train.batch_tokens = 64;
  c.train.max_steps = 10;
  c.train.device = "cpu";
  return c;
}

const MupRow& row_of(const MupResult& r, const std::string& name) {
  for (auto& row : r.rows)
    if (row.name == name) return row;
  FAIL("no row " << name);
  return r.rows.front();
}

// Noisy arithmetic sequences: learnable, so a few steps move the logits coherently.
void make_batch(Rng& rng, int n, int vocab, std::vector<int32_t>& in, std::vector<int32_t>& tg) {
  in.resize(n);
  tg.resize(n);
  uint32_t x = uint32_t(rng.below(vocab));
  std::vector<int32_t> s(n + 1);
  for (int i = 0; i <= n; ++i) {
    x = (x + 3 + (rng.below(8) == 0 ? uint32_t(rng.below(5)) : 0)) % vocab;
    s[i] = int32_t(x);
  }
  for (int i = 0; i < n; ++i) in[i] = s[i], tg[i] = s[i + 1];
}

// RMS of the change of the logits on a fixed batch after `steps` optimizer steps (the quantity
// a µP coordinate check plots: under µP the initial logits shrink with width, their updates
// must not).
double logit_rms_after(const Config& c, int steps) {
  auto be = make_backend("cpu");
  LlamaModel model(c.model, *be, c.train.micro_batch, c.train.seq_len, mup_model_scales(c));
  apply_mup(c, model.params());
  model.init_weights(1234);  // same seed at every width: only the widths differ
  Optimizer opt(c, model.params(), *be);
  const int n = c.train.micro_batch * c.train.seq_len;
  std::vector<int32_t> in, tg;
  Rng eval_rng0(7);
  make_batch(eval_rng0, n, c.model.vocab_size, in, tg);
  const std::vector<float> lg0 = model.logits(in.data());
  Rng rng(99);
  for (int s = 0; s < steps; ++s) {
    make_batch(rng, n, c.model.vocab_size, in, tg);
    opt.zero_grad();
    model.forward_backward(in.data(), tg.data(), 1.0f / float(n));
    opt.step(s, 1.0f);
  }
  Rng eval_rng(7);
  make_batch(eval_rng, n, c.model.vocab_size, in, tg);
  std::vector<float> lg = model.logits(in.data());
  double ss = 0;
  for (size_t i = 0; i < lg.size(); ++i) ss += double(lg[i] - lg0[i]) * (lg[i] - lg0[i]);
  return std::sqrt(ss / double(lg.size()));
}

std::string temp_dir(const std::string& tag) {
  fs::path p = fs::temp_directory_path() / ("mf_mup_" + tag + "_" + std::to_string(getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

// Random orthogonal n x n (Gram-Schmidt of a Gaussian matrix), row-major, double.
std::vector<double> random_orthogonal(int n, Rng& rng) {
  std::vector<double> q(size_t(n) * n);
  for (auto& x : q) x = rng.normal();
  for (int i = 0; i < n; ++i) {
    double* qi = &q[size_t(i) * n];
    for (int pass = 0; pass < 2; ++pass)
      for (int j = 0; j < i; ++j) {
        const double* qj = &q[size_t(j) * n];
        double dot = 0;
        for (int k = 0; k < n; ++k) dot += qi[k] * qj[k];
        for (int k = 0; k < n; ++k) qi[k] -= dot * qj[k];
      }
    double nrm = 0;
    for (int k = 0; k < n; ++k) nrm += qi[k] * qi[k];
    nrm = std::sqrt(nrm);
    for (int k = 0; k < n; ++k) qi[k] /= nrm;
  }
  return q;
}

}  // namespace

TEST_CASE("µP table at two widths matches the formulas", "[mup]") {
  for (const std::string opt : {"muon", "adamw"})
    for (const std::string wd_mode : {"independent", "coupled"})
      for (int d : {128, 512}) {
        INFO(opt << " " << wd_mode << " d_model " << d);
        Config c = width_config(d, 128, opt, true);
        c.model.n_layers = 4;   // depth_mult 2 against base_depth 2
        c.optim.wd_mode = wd_mode;
        c.optim.wd = 0.1;
        c.optim.adamw.wd = 0.05;
        auto be = make_backend("cpu");
        LlamaModel model(c.model, *be, 1, 8, mup_model_scales(c));
        MupResult r = apply_mup(c, model.params());
        const double m = d / 128.0;
        CHECK(r.parametrization == "mup");
        CHECK(r.width_mult == Approx(m));
        CHECK(r.depth_mult == Approx(2.0));
        CHECK(r.scales.logit_mult == Approx(1.0 / m));
        // head_dim stays 16 (width grows by heads): SP's 1/sqrt(16) unless a base head_dim
        // is given, then sqrt(base_head_dim)/head_dim.
        CHECK(r.scales.attn_scale == Approx(1.0 / 4.0));
        CHECK(r.scales.residual_mult == Approx(0.5));
        CHECK(model.attn_scale() == Approx(1.0 / 4.0));
        CHECK(r.warnings.empty());
        Config c4 = c;
        c4.mup.base_head_dim = 4;
        CHECK(mup_model_scales(c4).attn_scale == Approx(2.0 / 16.0));

        for (Param* p : model.params()) {
          INFO(p->name);
          const MupRow& row = row_of(r, p->name);
          CHECK(row.lr_mult == p->lr_mult);
          CHECK(row.wd_mult == p->wd_mult);
          CHECK(row.init_std == p->init_std);
          switch (p->kind) {
            case ParamKind::Hidden: {
              const bool out = p->name.find("o_proj") != std::string::npos ||
                               p->name.find("down_proj") != std::string::npos;
              const double std = 0.02 / std::sqrt(m) / (out ? std::sqrt(2.0 * 2) : 1.0);
              CHECK(p->init_std == Approx(std));
              // The decay per step scales as 1/m in both modes: coupled decays lr_eff*wd, so
              // lr_mult * wd_mult carries the 1/m (AdamW through its lr, Muon through wd_mult).
              if (wd_mode == "independent")
                CHECK(p->wd_mult == Approx(1.0 / m));
              else
                CHECK(p->lr_mult * p->wd_mult == Approx(1.0 / m));
              CHECK(p->wd_mult == Approx(wd_mode == "coupled" && opt == "adamw" ? 1.0 : 1.0 / m));
              if (opt == "muon") {
                CHECK(row.optimizer == "muon");
                CHECK(p->lr_mult == 1.0);
                CHECK(row.lr == Approx(c.optim.lr));
                CHECK(row.muon_scale == Approx(std::sqrt(double(p->shape[0]) / p->shape[1])));
              } else {
                CHECK(row.optimizer == "adamw");
                CHECK(p->lr_mult == Approx(1.0 / m));
                CHECK(row.lr == Approx(c.optim.lr / m));
              }
              CHECK(row.wd == Approx(0.1 * p->wd_mult));
              break;
            }
            case ParamKind::Embedding:
            case ParamKind::LmHead:
              CHECK(p->lr_mult == 1.0);
              CHECK(p->wd_mult == 1.0);
              CHECK(p->init_std == Approx(0.02));
              CHECK(row.optimizer == "adamw");
              CHECK(row.lr == Approx(c.optim.adamw.lr));
              CHECK(row.wd == Approx(0.05));
              break;
            case ParamKind::Norm:
              CHECK(p->lr_mult == 1.0);
              CHECK(p->wd_mult == 1.0);
              CHECK(p->init_std == 0.0);
              CHECK(row.wd == 0.0);  // norm gains are never decayed
              break;
            default:
              FAIL("unexpected kind");
          }
        }
        // Printable and CSV forms: one line per parameter plus headers.
        const std::string t = r.table(), csv = r.csv();
        CHECK_THAT(t, Contains("parametrization mup"));
        CHECK_THAT(t, Contains("model.layers.3.mlp.down_proj.weight"));
        CHECK(std::count(csv.begin(), csv.end(), '\n') == long(model.params().size()) + 1);
        CHECK_THAT(csv, Contains("param,kind,shape,optimizer,lr,lr_mult,wd,wd_mult,init_std"));
        CHECK_THAT(csv, Contains("lm_head.weight,lm_head,64x" + std::to_string(d) + ",adamw,"));
      }
}

TEST_CASE("the hyper-parameter table names how non-random parameters start", "[mup]") {
  Config c = width_config(64, 64, "muon", true);
  c.model.moe.n_experts = 4;
  c.model.moe.top_k = 2;
  c.model.moe.d_expert = 32;
  c.model.moe.balance = "bias";
  auto be = make_backend("cpu");
  LlamaModel model(c.model, *be, 1, 8, mup_model_scales(c));
  const std::string t = apply_mup(c, model.params()).table();
  auto line_of = [&](const std::string& name) {
    const size_t at = t.find(name);
    REQUIRE(at != std::string::npos);
    return t.substr(at, t.find('\n', at) - at);
  };
  // The router's bias buffer starts at zeros (it used to read "ones", like a norm gain).
  CHECK_THAT(line_of("model.layers.1.mlp.gate.e_score_correction_bias"), Contains("zeros"));
  CHECK_THAT(line_of("model.layers.1.mlp.gate.e_score_correction_bias"), !Contains("ones"));
  CHECK_THAT(line_of("model.layers.1.post_attention_layernorm.weight"), Contains("ones"));
}

TEST_CASE("SP and RMS parametrisations leave the model alone", "[mup]") {
  Config c = width_config(256, 64, "muon", false);
  c.optim.scale = "shape";
  auto be = make_backend("cpu");
  LlamaModel model(c.model, *be, 1, 8, mup_model_scales(c));
  std::map<std::string, double> stds;
  for (Param* p : model.params()) {
    p->lr_mult = 3.0;  // stale values must be reset
    stds[p->name] = p->init_std;
  }
  MupResult r = apply_mup(c, model.params());
  CHECK(r.parametrization == "sp");
  CHECK(r.scales.logit_mult == 1.0);
  CHECK(r.scales.attn_scale == 0.0);
  CHECK(r.scales.residual_mult == 1.0);
  CHECK(model.attn_scale() == Approx(1.0 / 4.0));  // 1/sqrt(16)
  for (Param* p : model.params()) {
    CHECK(p->lr_mult == 1.0);
    CHECK(p->wd_mult == 1.0);
    CHECK(p->init_std == stds[p->name]);
  }
  c.optim.scale = "rms";
  CHECK(apply_mup(c, model.params()).parametrization == "rms");
  for (const char* name : {"normuon", "freon", "kaon"}) {  // they take optim.scale too
    c.optim.name = name;
    CHECK(apply_mup(c, model.params()).parametrization == "rms");
  }
  c.optim.name = "shampoo";  // has no optim.scale: its rms setting is ignored
  CHECK(apply_mup(c, model.params()).parametrization == "sp");
  c.optim.name = "muon";
  CHECK(row_of(apply_mup(c, model.params()), "model.layers.0.mlp.up_proj.weight").muon_scale ==
        Approx(0.2 * std::sqrt(512.0)));
  // µP with rms scaling works but warns that it breaks transfer.
  c.mup.enabled = true;
  MupResult w = apply_mup(c, model.params());
  REQUIRE(w.warnings.size() == 1);
  CHECK_THAT(w.warnings[0], Contains("optim.scale=spectral"));
  CHECK_THAT(w.table(), Contains("warning:"));
}

TEST_CASE("at the base shape µP is exactly SP", "[mup]") {
  // Width, depth and head_dim at their base values: every multiplier is 1 and the attention
  // scale is 1/sqrt(head_dim), so training must be bitwise the same as SP.
  for (const std::string opt : {"adamw", "muon"}) {
    INFO(opt);
    Config mup = width_config(64, 64, opt, true);
    Config sp = width_config(64, 64, opt, false);
    sp.optim.scale = mup.optim.scale;
    mup.optim.wd = sp.optim.wd = 0.1;
    mup.optim.wd_mode = sp.optim.wd_mode = "independent";
    CHECK(logit_rms_after(mup, 3) == logit_rms_after(sp, 3));
    // A base head_dim other than the model's changes the attention scale and the result.
    mup.mup.base_head_dim = 4;
    CHECK(logit_rms_after(mup, 3) != logit_rms_after(sp, 3));
  }
}

TEST_CASE("init_weights draws hidden matrices with the µP std", "[mup]") {
  Config c = width_config(256, 64, "adamw", true);
  auto be = make_backend("cpu");
  LlamaModel model(c.model, *be, 1, 8, mup_model_scales(c));
  apply_mup(c, model.params());
  model.init_weights(5);
  auto rms = [](const Param* p) {
    double ss = 0;
    for (int64_t i = 0; i < p->numel(); ++i) ss += double(p->master.f32()[i]) * p->master.f32()[i];
    return std::sqrt(ss / double(p->numel()));
  };
  CHECK(rms(model.find("model.layers.0.mlp.up_proj.weight")) == Approx(0.01).epsilon(0.03));
  CHECK(rms(model.find("model.layers.1.self_attn.o_proj.weight")) ==
        Approx(0.01 / 2.0).epsilon(0.03));
  CHECK(rms(model.find("model.embed_tokens.weight")) == Approx(0.02).epsilon(0.05));
}

TEST_CASE("coordinate check: logits stay flat across widths under µP, grow under SP", "[mup]") {
  const int widths[] = {32, 64, 128, 256};
  for (const std::string opt : {"adamw", "muon"}) {
    std::vector<double> mup, sp;
    for (int d : widths) {
      mup.push_back(logit_rms_after(width_config(d, 32, opt, true), 4));
      Config s = width_config(d, 32, opt, false);
      s.optim.scale = "shape";
      sp.push_back(logit_rms_after(s, 4));
    }
    std::ostringstream msg;
    for (size_t i = 0; i < mup.size(); ++i)
      msg << "d=" << widths[i] << " mup " << mup[i] << " sp " << sp[i] << "; ";
    INFO(opt << ": " << msg.str());
    // Close at the base width (the runs differ only in Muon's scale mode, spectral vs shape).
    CHECK(mup[0] == Approx(sp[0]).epsilon(0.25));
    const double mup_spread = *std::max_element(mup.begin(), mup.end()) /
                              *std::min_element(mup.begin(), mup.end());
    // µP: within a small factor over an 8x width range, and settling (the W_out . dx term's
    // finite-width part fades); SP: grows nearly linearly (Adam's lm-head updates add up over
    // the width).
    CHECK(mup_spread < 1.8);
    CHECK(mup[3] / mup[2] > 0.8);
    CHECK(mup[3] / mup[2] < 1.25);
    CHECK(sp.back() / sp.front() > 4.0);
    for (size_t i = 1; i < sp.size(); ++i) CHECK(sp[i] > 1.3 * sp[i - 1]);
  }
}

TEST_CASE("symmetric eigenvalues and singular values on known spectra", "[mup][diag]") {
  Rng rng(2025, 3);
  for (int n : {1, 2, 3, 7, 33, 64}) {
    INFO("n " << n);
    std::vector<double> lam(n);
    for (auto& x : lam) x = 4.0 * rng.uniform() - 2.0;
    if (n >= 3) lam[1] = lam[2];  // a repeated eigenvalue
    std::vector<double> q = random_orthogonal(n, rng), a(size_t(n) * n, 0.0);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        double s = 0;
        for (int k = 0; k < n; ++k) s += q[size_t(k) * n + i] * lam[k] * q[size_t(k) * n + j];
        a[size_t(i) * n + j] = s;
      }
    for (int i = 0; i < n; ++i)  // exactly symmetric
      for (int j = 0; j < i; ++j) a[size_t(i) * n + j] = a[size_t(j) * n + i];
    std::vector<double> ev = symmetric_eigenvalues(a, n);
    std::sort(lam.begin(), lam.end());
    REQUIRE(ev.size() == size_t(n));
    for (int i = 0; i < n; ++i) CHECK(ev[i] == Approx(lam[i]).margin(1e-10));
  }
  // W = U diag(sigma) V^T for awkward shapes, both orientations.
  const std::pair<int, int> shapes[] = {{1, 9}, {9, 1}, {7, 33}, {33, 7}, {64, 64}, {127, 48}};
  for (auto [r, c] : shapes) {
    INFO("shape " << r << "x" << c);
    const int n = std::min(r, c);
    std::vector<double> sig(n);
    for (int i = 0; i < n; ++i) sig[i] = 0.1 + 3.0 * rng.uniform();
    std::vector<double> U = random_orthogonal(r, rng), V = random_orthogonal(c, rng);
    std::vector<float> w(size_t(r) * c);
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < c; ++j) {
        double s = 0;
        for (int k = 0; k < n; ++k) s += U[size_t(k) * r + i] * sig[k] * V[size_t(k) * c + j];
        w[size_t(i) * c + j] = float(s);
      }
    std::vector<double> sv = singular_values(w.data(), r, c);
    std::sort(sig.rbegin(), sig.rend());
    REQUIRE(sv.size() == size_t(n));
    for (int i = 0; i < n; ++i) CHECK(sv[i] == Approx(sig[i]).epsilon(1e-4).margin(1e-4));
  }
  std::vector<double> bad = {1.0, NAN, NAN, 1.0};
  CHECK_THROWS_AS(symmetric_eigenvalues(bad, 2), Error);
}

TEST_CASE("singular values: the same bits for 1, 2 and 3 threads", "[mup][diag]") {
  // 200 columns: the tridiagonalisation's row loops run in parallel (above 128 rows).
  Rng rng(31, 1);
  const int r = 260, c = 200;
  std::vector<float> w(size_t(r) * c);
  for (float& x : w) x = float(rng.normal());
  const int threads0 = omp_get_max_threads();
  std::vector<std::vector<double>> got;
  for (int t : {1, 2, 3}) {
    omp_set_num_threads(t);
    got.push_back(singular_values(w.data(), r, c));
  }
  omp_set_num_threads(threads0);
  REQUIRE(got[0].size() == size_t(c));
  CHECK(got[0] == got[1]);
  CHECK(got[0] == got[2]);
}

TEST_CASE("SVD entropy: flat spectrum 1, rank one 0", "[mup][diag]") {
  CHECK(sv_entropy({2.0, 2.0, 2.0, 2.0}) == Approx(1.0));
  CHECK(sv_entropy({5.0, 0.0, 0.0}) == Approx(0.0).margin(1e-12));
  CHECK(sv_entropy({0.0, 0.0}) == 0.0);
  CHECK(sv_entropy({3.0}) == 1.0);
  // Two equal values among four: log 2 / log 4 = 0.5.
  CHECK(sv_entropy({1.0, 1.0, 0.0, 0.0}) == Approx(0.5));
  // An identity matrix through singular_values.
  std::vector<float> eye(25, 0.f);
  for (int i = 0; i < 5; ++i) eye[i * 6] = 1.f;
  CHECK(sv_entropy(singular_values(eye.data(), 5, 5)) == Approx(1.0));
}

TEST_CASE("max attention logits match a brute-force loop; QK-clip caps them at tau",
          "[mup][diag]") {
  for (int kv : {4, 2}) {  // MHA and GQA
    INFO("n_kv_heads " << kv);
    Config c = width_config(64, 64, "muon", false);
    c.model.n_layers = 1;
    c.model.n_heads = 4;
    c.model.n_kv_heads = kv;
    c.model.init_std = 0.3;  // large logits
    auto be = make_backend("cpu");
    const int B = 2, T = 16;
    LlamaModel model(c.model, *be, B, T);
    model.init_weights(11);
    Rng rng(5);
    std::vector<int32_t> in, tg;
    make_batch(rng, B * T, c.model.vocab_size, in, tg);
    model.forward(in.data(), tg.data());
    auto got = max_attention_logits(model, *be, 2);
    // Brute force over both sequences.
    const int H = 4, hd = 16;
    const float* q = model.attn_q(0).f32();
    const float* k = model.attn_k(0).f32();
    std::vector<double> want(H, -1e30);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < T; ++i)
          for (int j = 0; j <= i; ++j) {
            double s = 0;
            for (int e = 0; e < hd; ++e)
              s += double(q[((size_t(b) * T + i) * H + h) * hd + e]) *
                   k[((size_t(b) * T + j) * kv + h / (H / kv)) * hd + e];
            want[h] = std::max(want[h], s * model.attn_scale());
          }
    REQUIRE(got.size() == 1);
    for (int h = 0; h < H; ++h) CHECK(got[0][h] == Approx(want[h]).epsilon(1e-4));

    // Clip at a tau below the largest head's logit (and above the smallest's).
    std::vector<double> sorted = got[0];
    std::sort(sorted.begin(), sorted.end());
    const double tau = 0.5 * (sorted[0] + sorted[3]);
    REQUIRE(sorted[0] < tau);
    int expect_clipped = 0;
    for (double x : got[0]) expect_clipped += x > tau;
    CHECK(apply_qk_clip(model, *be, tau, got) == expect_clipped);
    model.forward(in.data(), tg.data());
    auto after = max_attention_logits(model, *be, 2);
    for (int h = 0; h < H; ++h) {
      INFO("head " << h);
      CHECK(after[0][h] == Approx(std::min(got[0][h], tau)).epsilon(1e-4));
    }
    CHECK_THROWS_AS(apply_qk_clip(model, *be, 0.0, got), Error);
  }
}

TEST_CASE("trainer writes the µP table and diagnostics records", "[mup][diag]") {
  const std::string dir = temp_dir("trainer");
  Rng rng(3);
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> toks;
    uint32_t x = 0;
    for (int i = 0; i < 4000; ++i) {
      x = (x + 3 + (rng.below(10) == 0 ? uint32_t(rng.below(5)) : 0)) % 64;
      toks.push_back(x);
    }
    write_shard(dir + "/" + split + "_000000.bin", toks, 2);
  }
  Config c = width_config(64, 32, "muon", true);
  c.optim.wd_mode = "independent";
  c.optim.wd = 0.1;
  c.optim.qk_clip_tau = 1e-3;  // tiny: every head is clipped every step
  c.train.max_steps = 4;
  c.train.diag_every = 2;
  c.train.eval_every = 0;
  c.train.log_every = 1;
  c.train.ckpt_every = 0;
  c.data.train = dir + "/train_*.bin";
  c.data.val = "";
  c.run.dir = dir + "/run";
  TrainOptions o;
  o.quiet = true;
  Trainer t(c, o);
  TrainResult res = t.run();
  REQUIRE(res.steps_done == 4);
  for (double l : res.losses) CHECK(std::isfinite(l));

  std::ifstream csv(dir + "/run/mup_table.csv");
  std::string header;
  std::getline(csv, header);
  CHECK_THAT(header, Contains("lr_mult"));
  int lines = 0;
  for (std::string line; std::getline(csv, line);) ++lines;
  CHECK(lines == int(t.model().params().size()));

  std::ifstream m(dir + "/run/metrics.jsonl");
  std::vector<nlohmann::json> diag;
  int clipped_steps = 0;
  for (std::string line; std::getline(m, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("diag")) diag.push_back(j);
    if (j.value("qk_clipped", 0) > 0) ++clipped_steps;
  }
  CHECK(clipped_steps == 4);
  REQUIRE(diag.size() == 2);
  CHECK(diag[0]["step"] == 2);
  CHECK(diag[1]["step"] == 4);
  const auto& d = diag[1]["diag"];
  CHECK(d["max_attn_logit"].size() == 2);
  CHECK(d["qk_clipped"].get<int>() > 0);
  CHECK(d["sv_entropy_mean"].get<double>() > 0.3);
  CHECK(d["sv_entropy_mean"].get<double>() <= 1.0);
  const auto& up = d["matrices"]["model.layers.1.mlp.up_proj.weight"];
  CHECK(up["spectral_norm"].get<double>() > 0);
  CHECK(up["update_rms"].get<double>() > 0);
  CHECK(up["weight_rms"].get<double>() > up["update_rms"].get<double>());
  CHECK(d["matrices"].contains("lm_head.weight"));
  CHECK(!d["matrices"].contains("model.norm.weight"));
  fs::remove_all(dir);
}

TEST_CASE("update RMS is the RMS of the weight change", "[mup][diag]") {
  Config c = width_config(32, 32, "muon", false);
  auto be = make_backend("cpu");
  LlamaModel model(c.model, *be, 2, 8);
  model.init_weights(3);
  Diagnostics diag(1, 0.0);
  CHECK(diag.due(0));
  CHECK(!Diagnostics(0, 0.0).due(0));
  CHECK(Diagnostics(3, 0.0).due(2));
  CHECK(!Diagnostics(3, 0.0).due(3));
  std::vector<int32_t> in, tg;
  Rng rng(8);
  make_batch(rng, 16, c.model.vocab_size, in, tg);
  model.forward(in.data(), tg.data());
  diag.before_step(model.params(), *be);
  Param* p = model.find("model.layers.0.self_attn.v_proj.weight");
  double ss = 0;
  for (int64_t i = 0; i < p->numel(); ++i) {
    const float dlt = float(0.01 * (rng.uniform() - 0.5));
    p->master.f32()[i] += dlt;
    ss += double(dlt) * dlt;
  }
  nlohmann::json rec = diag.after_step(model, *be, 1);
  const auto& mats = rec["diag"]["matrices"];
  CHECK(mats[p->name]["update_rms"].get<double>() ==
        Approx(std::sqrt(ss / double(p->numel()))).epsilon(1e-3));
  CHECK(mats["model.layers.0.self_attn.q_proj.weight"]["update_rms"].get<double>() == 0.0);
  // Without before_step, update_rms is null.
  nlohmann::json rec2 = diag.after_step(model, *be, 2);
  CHECK(rec2["diag"]["matrices"][p->name]["update_rms"].is_null());
}
