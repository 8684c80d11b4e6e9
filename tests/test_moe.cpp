// Mixture-of-Experts: ops, layer, model, optimizer groups, balancing, configs.
//
//  1. Finite differences (double) of every MoE op's backward, run as the double instantiation of
//     backend/cpu/ref_moe.h: router (softmax | sigmoid, top-k renormalisation, route_scale, bias,
//     balance-loss gradient), combine; gather by its adjoint identity.
//  2. CpuBackend (f32) against the double reference; plan properties (token order within each
//     expert, capacity drops, tie-breaking, bias selects only); argument errors.
//  3. The model against the PyTorch fixture of tests/reference/moe_ref.py (two variants: softmax +
//     balance loss + capacity drops; sigmoid + renormalised top-k + bias balancing): logits, loss,
//     every gradient, expert loads, 5 Muon steps with bias updates.
//  4. Muon groups (each expert separately; router on AdamW; bias not optimized), bias balancing
//     of a skewed router, balance-loss bookkeeping, determinism, configs.
#include <catch2/catch.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <numeric>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_moe.h"
#include "config/config.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "model/moe.h"
#include "optim/mup.h"
#include "optim/optimizer.h"
#include "op_tolerance.h"
#include "test_util.h"

using namespace mf;
using Vec = std::vector<double>;
using Catch::Contains;

namespace {

using mf::test::split_tokens;
using mf::test::rel_err;
using mf::test::fd_error;

Vec uniform_vec(Rng& rng, size_t n, double lo = -1.0, double hi = 1.0) {
  Vec v(n);
  for (auto& x : v) x = lo + (hi - lo) * rng.uniform();
  return v;
}

double dot_all(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}


using mf::test::norm_err;

Tensor host_of(const Shape& s, const Vec& v) {
  Tensor t = host_tensor(s);
  REQUIRE(size_t(t.numel()) == v.size());
  for (size_t i = 0; i < v.size(); ++i) t.f32()[i] = float(v[i]);
  return t;
}
Vec vec_of(const Tensor& t) { return Vec(t.f32(), t.f32() + t.numel()); }
Vec floats(const Vec& v) {  // the values a float round trip gives (inputs shared by f32 and f64)
  Vec o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = double(float(v[i]));
  return o;
}

// ---- router in double ------------------------------------------------------------------------

struct RouterCase {
  int64_t N, d, E, k;
  bool sigmoid, norm_topk, bias;
  double route_scale;
};

std::string label(const RouterCase& c) {
  return "N=" + std::to_string(c.N) + " d=" + std::to_string(c.d) + " E=" + std::to_string(c.E) +
         " k=" + std::to_string(c.k) + (c.sigmoid ? " sigmoid" : " softmax") +
         (c.norm_topk ? " norm" : "") + (c.bias ? " bias" : "") +
         " rs=" + std::to_string(c.route_scale);
}

ref::MoeRoute route_of(const RouterCase& c) {
  return {c.E, c.k, c.sigmoid, c.norm_topk, c.route_scale};
}

struct RouterOut {
  Vec probs, w, score_sum;
  std::vector<int32_t> idx, counts;
};

RouterOut router_double(const RouterCase& c, const Vec& x, const Vec& Wr, const Vec* bias) {
  RouterOut o;
  o.probs.resize(size_t(c.N * c.E));
  o.w.resize(size_t(c.N * c.k));
  o.score_sum.resize(size_t(c.E));
  o.idx.resize(size_t(c.N * c.k));
  o.counts.resize(size_t(c.E));
  ref::moe_router_fwd(x.data(), Wr.data(), bias ? bias->data() : nullptr, c.N, c.d, route_of(c),
                      o.probs.data(), o.idx.data(), o.w.data(), o.counts.data(),
                      o.score_sum.data());
  return o;
}

// ---- fixtures ----------------------------------------------------------------------------------

const std::string kFixture = std::string(MF_TEST_DIR) + "/fixtures/moe_ref";

nlohmann::json fixture_meta() {
  std::ifstream f(kFixture + ".json");
  REQUIRE(f);
  return nlohmann::json::parse(f);
}

Config fixture_config(const nlohmann::json& m, const std::string& variant) {
  Config c = mf::test::fixture_config(m);
  auto& v = m["variants"][variant]["moe"];
  MoeConfig& e = c.model.moe;
  e.n_experts = v["n_experts"];
  e.top_k = v["top_k"];
  e.n_shared = v["n_shared"];
  e.d_expert = v["d_expert"];
  e.first_dense = v["first_dense"];
  e.score = v["score"];
  e.norm_topk = v["norm_topk"];
  e.route_scale = v["route_scale"];
  e.balance = v["balance"];
  e.aux_coef = v["aux_coef"];
  e.bias_rate = v["bias_rate"];
  e.capacity_factor = v["capacity_factor"];
  mf::test::set_fixture_muon(c, m);
  return c;
}



void load_init(LlamaModel& model, const SafetensorsReader& r, const std::string& pre) {
  for (Param* p : model.params()) {
    INFO(p->name);
    Tensor t = r.read_f32(pre + "init." + p->name);
    REQUIRE(t.shape == p->shape);
    std::copy(t.f32(), t.f32() + t.numel(), p->master.f32());
  }
}

// A small MoE config for model-level tests (no fixture).
ModelConfig tiny_moe(const std::string& balance, const std::string& score) {
  ModelConfig m;
  m.vocab_size = 48;
  m.d_model = 24;
  m.n_layers = 2;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.d_ff = 40;
  m.max_seq_len = 16;
  m.init_std = 0.1;
  m.moe.n_experts = 7;
  m.moe.top_k = 2;
  m.moe.n_shared = 1;
  m.moe.d_expert = 10;
  m.moe.first_dense = 1;
  m.moe.score = score;
  m.moe.balance = balance;
  m.moe.aux_coef = 0.1;
  m.moe.bias_rate = 0.01;
  return m;
}

std::vector<int32_t> random_tokens(uint64_t seed, size_t n, int V) {
  Rng rng(seed);
  std::vector<int32_t> v(n);
  for (auto& t : v) t = int32_t(rng.below(uint64_t(V)));
  return v;
}

}  // namespace

// ================================================================================================
// 1. Finite differences (double)
// ================================================================================================

TEST_CASE("moe router backward matches finite differences", "[moe][fd]") {
  const std::vector<RouterCase> cases = {
      {7, 5, 4, 2, false, true, false, 1.0},   {7, 5, 4, 2, false, false, false, 1.7},
      {9, 6, 8, 3, true, true, false, 2.5},    {9, 6, 8, 3, true, false, true, 0.8},
      {5, 3, 6, 1, false, false, true, 1.0},   {11, 4, 5, 5, true, true, true, 1.3},
      {1, 7, 3, 2, false, true, true, 1.0},    {33, 8, 16, 4, true, true, true, 2.446},
  };
  uint64_t seed = 100;
  for (const auto& c : cases) {
    for (bool aux : {false, true}) {
      INFO(label(c) << (aux ? " aux" : ""));
      Rng rng(++seed);
      Vec x = uniform_vec(rng, size_t(c.N * c.d)), Wr = uniform_vec(rng, size_t(c.E * c.d));
      Vec bias = uniform_vec(rng, size_t(c.E), -0.3, 0.3);
      Vec cw = uniform_vec(rng, size_t(c.N * c.k)), g = uniform_vec(rng, size_t(c.E));
      const Vec* b = c.bias ? &bias : nullptr;
      // L = sum c_nj w_nj (+ sum_e g_e score_sum_e): score_sum_e = sum_n pn[n,e], so the
      // gradient on pn[n,e] is g_e for every token, the aux_grad contract.
      auto loss = [&]() {
        RouterOut o = router_double(c, x, Wr, b);
        return dot_all(o.w, cw) + (aux ? dot_all(o.score_sum, g) : 0.0);
      };
      RouterOut o = router_double(c, x, Wr, b);
      Vec dlogits(size_t(c.N * c.E)), dx(size_t(c.N * c.d), 0.0), dWr(size_t(c.E * c.d), 0.0);
      ref::moe_router_bwd(cw.data(), aux ? g.data() : nullptr, x.data(), Wr.data(),
                          o.probs.data(), o.idx.data(), c.N, c.d, route_of(c), dlogits.data(),
                          dx.data(), dWr.data());
      CHECK(fd_error(x, dx, loss, seed) < test::kFdTol);
      CHECK(fd_error(Wr, dWr, loss, seed + 1) < test::kFdTol);
    }
  }
}

TEST_CASE("moe balance loss gradient matches finite differences", "[moe][fd][balance]") {
  // L_aux = coef * E * sum_i f_i P_i with f_i = counts_i / (N k) held fixed (piecewise constant)
  // and P_i = score_sum_i / N; the model passes aux_grad_i = coef E f_i / N to router_bwd.
  for (bool sigmoid : {false, true}) {
    INFO((sigmoid ? "sigmoid" : "softmax"));
    RouterCase c{29, 6, 8, 2, sigmoid, true, sigmoid, 1.0};
    Rng rng(sigmoid ? 11 : 12);
    Vec x = uniform_vec(rng, size_t(c.N * c.d)), Wr = uniform_vec(rng, size_t(c.E * c.d), -2, 2);
    Vec bias = uniform_vec(rng, size_t(c.E), -0.2, 0.2);
    const double coef = 0.37;
    RouterOut o0 = router_double(c, x, Wr, &bias);
    auto aux_of = [&](const RouterOut& o) {
      double s = 0;
      for (int64_t e = 0; e < c.E; ++e)
        s += double(o0.counts[size_t(e)]) / double(c.N * c.k) * o.score_sum[size_t(e)] /
             double(c.N);
      return coef * double(c.E) * s;
    };
    auto loss = [&]() { return aux_of(router_double(c, x, Wr, &bias)); };
    Vec g(size_t(c.E));
    for (int64_t e = 0; e < c.E; ++e)
      g[size_t(e)] = coef * double(c.E) * o0.counts[size_t(e)] / double(c.N * c.k) / double(c.N);
    Vec zero_w(size_t(c.N * c.k), 0.0), dlogits(size_t(c.N * c.E));
    Vec dx(size_t(c.N * c.d), 0.0), dWr(size_t(c.E * c.d), 0.0);
    ref::moe_router_bwd(zero_w.data(), g.data(), x.data(), Wr.data(), o0.probs.data(),
                        o0.idx.data(), c.N, c.d, route_of(c), dlogits.data(), dx.data(),
                        dWr.data());
    CHECK(fd_error(Wr, dWr, loss, 5) < test::kFdTol);
    CHECK(fd_error(x, dx, loss, 6) < test::kFdTol);
    // The minimum of the balance loss is coef, at perfectly uniform f and P.
    CHECK(aux_of(o0) >= coef * 0.999);
  }
}

TEST_CASE("moe combine backward matches finite differences; gather is the adjoint",
          "[moe][fd]") {
  struct Case { int64_t N, k, E, d; double cf; };
  for (const Case& cs : {Case{7, 2, 4, 5, 0.0}, Case{13, 3, 5, 9, 0.7}, Case{1, 1, 3, 4, 0.0},
                         Case{33, 4, 16, 7, 1.0}}) {
    INFO("N=" << cs.N << " k=" << cs.k << " E=" << cs.E << " d=" << cs.d << " cf=" << cs.cf);
    Rng rng(uint64_t(cs.N * 31 + cs.k));
    std::vector<int32_t> idx(size_t(cs.N * cs.k));
    for (int64_t n = 0; n < cs.N; ++n) {  // k distinct experts per token
      std::vector<int32_t> perm(size_t(cs.E));
      std::iota(perm.begin(), perm.end(), 0);
      for (int64_t i = cs.E - 1; i > 0; --i)
        std::swap(perm[size_t(i)], perm[size_t(rng.below(uint64_t(i + 1)))]);
      for (int64_t j = 0; j < cs.k; ++j) idx[size_t(n * cs.k + j)] = perm[size_t(j)];
    }
    const int64_t cap = ref::moe_capacity(cs.cf, cs.N, cs.k, cs.E);
    std::vector<int32_t> off(size_t(cs.E + 1)), row_of(size_t(cs.N * cs.k)),
        row_token(size_t(cs.N * cs.k));
    ref::moe_permute(idx.data(), cs.N, cs.k, cs.E, cap, off.data(), row_of.data(),
                     row_token.data());
    const int64_t M = off.back();
    Vec yg = uniform_vec(rng, size_t(M * cs.d)), w = uniform_vec(rng, size_t(cs.N * cs.k));
    Vec cout = uniform_vec(rng, size_t(cs.N * cs.d));
    auto loss = [&]() {
      Vec out(size_t(cs.N * cs.d));
      ref::moe_combine_fwd(yg.data(), w.data(), row_of.data(), cs.N, cs.k, cs.d, out.data(),
                           false);
      return dot_all(out, cout);
    };
    Vec dyg(size_t(M * cs.d), 0.0), dw(size_t(cs.N * cs.k));
    ref::moe_combine_bwd(cout.data(), yg.data(), w.data(), row_of.data(), cs.N, cs.k, cs.d,
                         dyg.data(), dw.data());
    if (M > 0) CHECK(fd_error(yg, dyg, loss, 1) < test::kFdTol);
    CHECK(fd_error(w, dw, loss, 2) < test::kFdTol);
    // accumulate = true adds onto out.
    Vec base = uniform_vec(rng, size_t(cs.N * cs.d)), acc = base, fresh(size_t(cs.N * cs.d));
    ref::moe_combine_fwd(yg.data(), w.data(), row_of.data(), cs.N, cs.k, cs.d, acc.data(), true);
    ref::moe_combine_fwd(yg.data(), w.data(), row_of.data(), cs.N, cs.k, cs.d, fresh.data(),
                         false);
    for (size_t i = 0; i < acc.size(); ++i) REQUIRE(acc[i] == Approx(base[i] + fresh[i]));
    // gather: <gather(x), c> == <x, gather_bwd(c)>
    Vec x = uniform_vec(rng, size_t(cs.N * cs.d)), c = uniform_vec(rng, size_t(M * cs.d));
    Vec xg(size_t(M * cs.d)), dx(size_t(cs.N * cs.d), 0.0);
    ref::moe_gather(x.data(), row_token.data(), M, cs.d, xg.data());
    ref::moe_gather_bwd(c.data(), row_of.data(), cs.N, cs.k, cs.d, dx.data());
    CHECK(std::abs(dot_all(xg, c) - dot_all(x, dx)) <
          test::kDoubleTol * std::max(1.0, std::abs(dot_all(xg, c))));
  }
}

// ================================================================================================
// 2. CpuBackend against the reference; plan properties; errors
// ================================================================================================

TEST_CASE("moe ops on CpuBackend match the double reference", "[moe][ops]") {
  CpuBackend be;
  const double tol = test::op_tolerance("moe", DType::F32);
  for (const RouterCase& c : {RouterCase{33, 16, 8, 2, false, true, false, 1.0},
                              RouterCase{127, 24, 64, 6, true, true, true, 2.446},
                              RouterCase{7, 5, 3, 1, false, false, true, 1.0}}) {
    INFO(label(c));
    Rng rng(uint64_t(c.N + c.E));
    Vec x = floats(uniform_vec(rng, size_t(c.N * c.d)));
    Vec Wr = floats(uniform_vec(rng, size_t(c.E * c.d)));
    Vec bias = floats(uniform_vec(rng, size_t(c.E), -0.1, 0.1));
    RouterOut want = router_double(c, x, Wr, c.bias ? &bias : nullptr);
    MoeRouterArgs a{int(c.E), int(c.k), c.sigmoid, c.norm_topk, float(c.route_scale)};
    Tensor tx = host_of({c.N, c.d}, x), tW = host_of({c.E, c.d}, Wr), tb = host_of({c.E}, bias);
    Tensor probs = host_tensor({c.N, c.E}), w = host_tensor({c.N, c.k});
    Tensor idx = host_tensor({c.N, c.k}, DType::I32), counts = host_tensor({c.E}, DType::I32);
    Tensor ss = host_tensor({c.E});
    be.moe_router_fwd(tx, tW, c.bias ? &tb : nullptr, a, probs, idx, w, counts, ss);
    CHECK(norm_err(vec_of(probs), want.probs) < tol);
    CHECK(norm_err(vec_of(w), want.w) < tol);
    CHECK(norm_err(vec_of(ss), want.score_sum) < tol);
    // The choices are compared exactly: that holds on any CPU (any BLAS kernel's rounding) only
    // because these inputs have no near-tie, which is checked: every token's k-th selection
    // score is 1e-5 above its (k+1)-th, far beyond fp32 rounding of scores of order 1.
    double gap = 1e9;
    for (int64_t n = 0; n < c.N && c.k < c.E; ++n) {
      std::vector<double> sc(size_t(c.E));
      for (int64_t e = 0; e < c.E; ++e)
        sc[size_t(e)] = want.probs[size_t(n * c.E + e)] + (c.bias ? bias[size_t(e)] : 0.0);
      std::nth_element(sc.begin(), sc.begin() + c.k, sc.end(), std::greater<double>());
      const double kth = *std::min_element(sc.begin(), sc.begin() + c.k);
      gap = std::min(gap, kth - sc[size_t(c.k)]);
    }
    INFO("smallest top-k selection gap " << gap);
    CHECK(gap > 1e-5);
    CHECK(std::equal(want.idx.begin(), want.idx.end(), idx.i32()));
    CHECK(std::equal(want.counts.begin(), want.counts.end(), counts.i32()));

    // backward (with +=-accumulated dx / dWr starting from random values)
    Vec dw = floats(uniform_vec(rng, size_t(c.N * c.k))), g = floats(uniform_vec(rng, size_t(c.E)));
    Vec dx0 = floats(uniform_vec(rng, size_t(c.N * c.d))), dW0 = floats(uniform_vec(rng, size_t(c.E * c.d)));
    Vec dl(size_t(c.N * c.E)), dxw = dx0, dWw = dW0;
    ref::moe_router_bwd(dw.data(), g.data(), x.data(), Wr.data(), want.probs.data(),
                        want.idx.data(), c.N, c.d, route_of(c), dl.data(), dxw.data(), dWw.data());
    Tensor tdw = host_of({c.N, c.k}, dw), tg = host_of({c.E}, g), tdl = host_tensor({c.N, c.E});
    Tensor tdx = host_of({c.N, c.d}, dx0), tdW = host_of({c.E, c.d}, dW0);
    be.moe_router_bwd(tdw, &tg, tx, tW, probs, idx, a, tdl, tdx, tdW);
    CHECK(norm_err(vec_of(tdl), dl) < 2 * tol);
    CHECK(norm_err(vec_of(tdx), dxw) < 2 * tol);
    CHECK(norm_err(vec_of(tdW), dWw) < 2 * tol);

    // permute / gather / combine on the router's choice, with and without capacity
    for (int64_t cap : {int64_t(0), ref::moe_capacity(0.8, c.N, c.k, c.E)}) {
      INFO("capacity " << cap);
      const int64_t Nk = c.N * c.k;
      std::vector<int32_t> off(size_t(c.E + 1)), row_of(static_cast<size_t>(Nk)), row_token(static_cast<size_t>(Nk));
      ref::moe_permute(want.idx.data(), c.N, c.k, c.E, cap, off.data(), row_of.data(),
                       row_token.data());
      Tensor toff = host_tensor({c.E + 1}, DType::I32), trow = host_tensor({c.N, c.k}, DType::I32);
      Tensor ttok = host_tensor({Nk}, DType::I32);
      be.moe_permute(idx, int(c.E), cap, toff, trow, ttok);
      REQUIRE(std::equal(off.begin(), off.end(), toff.i32()));
      REQUIRE(std::equal(row_of.begin(), row_of.end(), trow.i32()));
      REQUIRE(std::equal(row_token.begin(), row_token.end(), ttok.i32()));
      const int64_t M = off.back();
      Vec xg(size_t(M * c.d));
      ref::moe_gather(x.data(), row_token.data(), M, c.d, xg.data());
      Tensor txg = host_tensor({M, c.d});
      be.moe_gather(tx, ttok, txg);
      CHECK(norm_err(vec_of(txg), xg) == 0.0);
      Vec yg = floats(uniform_vec(rng, size_t(M * c.d)));
      Vec out(size_t(c.N * c.d));
      ref::moe_combine_fwd(yg.data(), want.w.data(), row_of.data(), c.N, c.k, c.d, out.data(),
                           false);
      Tensor tyg = host_of({M, c.d}, yg), tout = host_of({c.N, c.d}, uniform_vec(rng, size_t(c.N * c.d)));
      be.moe_combine_fwd(tyg, w, trow, tout, false);
      CHECK(norm_err(vec_of(tout), out) < tol);
      Vec dout = floats(uniform_vec(rng, size_t(c.N * c.d))), dyg(size_t(M * c.d)), dtw(static_cast<size_t>(Nk));
      ref::moe_combine_bwd(dout.data(), yg.data(), want.w.data(), row_of.data(), c.N, c.k, c.d,
                           dyg.data(), dtw.data());
      Tensor tdout = host_of({c.N, c.d}, dout), tdyg = host_tensor({M, c.d}), tdtw = host_tensor({c.N, c.k});
      be.moe_combine_bwd(tdout, tyg, w, trow, tdyg, tdtw);
      if (M > 0) CHECK(norm_err(vec_of(tdyg), dyg) < tol);
      CHECK(norm_err(vec_of(tdtw), dtw) < tol);
      Vec dx(size_t(c.N * c.d), 0.0);
      ref::moe_gather_bwd(dyg.data(), row_of.data(), c.N, c.k, c.d, dx.data());
      Tensor tdxg = host_tensor({c.N, c.d});
      be.moe_gather_bwd(tdyg, trow, tdxg);
      CHECK(norm_err(vec_of(tdxg), dx) < tol);
    }
  }
}

TEST_CASE("moe grouped expert GEMMs on CpuBackend match a double loop over the row blocks",
          "[moe][ops]") {
  CpuBackend be;
  const double tol = test::op_tolerance("moe", DType::F32);
  Rng rng(515);
  // Row counts per expert: empty experts, one row, uneven blocks; rows past offsets[E] (a
  // capacity drop) must stay untouched.
  for (const std::vector<int>& counts : {std::vector<int>{3, 0, 5, 1}, std::vector<int>{0, 0, 9},
                                         std::vector<int>{7}}) {
    const int64_t E = int64_t(counts.size()), in = 6, out = 5;
    std::vector<int32_t> off(size_t(E + 1), 0);
    for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] = off[size_t(e)] + counts[size_t(e)];
    const int64_t M = off.back(), R = M + 2;
    INFO("experts " << E << ", rows " << M);
    Tensor toff = host_tensor({E + 1}, DType::I32);
    std::copy(off.begin(), off.end(), toff.i32());
    std::vector<Tensor> Wt, dWt;
    std::vector<const Tensor*> W;
    std::vector<Tensor*> dW;
    std::vector<Vec> Wv, dW0;
    for (int64_t e = 0; e < E; ++e) {
      Wv.push_back(floats(uniform_vec(rng, size_t(out * in))));
      dW0.push_back(floats(uniform_vec(rng, size_t(out * in))));
      Wt.push_back(host_of({out, in}, Wv.back()));
      dWt.push_back(host_of({out, in}, dW0.back()));
    }
    for (int64_t e = 0; e < E; ++e) {
      W.push_back(&Wt[size_t(e)]);
      dW.push_back(&dWt[size_t(e)]);
    }
    const Vec x = floats(uniform_vec(rng, size_t(R * in)));
    const Vec dy = floats(uniform_vec(rng, size_t(R * out)));
    const Vec y0 = floats(uniform_vec(rng, size_t(R * out)));
    const Vec dx0 = floats(uniform_vec(rng, size_t(R * in)));
    // The double loop: expert e owns rows off[e] .. off[e+1].
    Vec y = y0, dx_set = dx0, dx_acc = dx0;
    std::vector<Vec> dWw = dW0;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[size_t(e)]; r < off[size_t(e + 1)]; ++r) {
        for (int64_t o = 0; o < out; ++o) {
          double s = 0;
          for (int64_t i = 0; i < in; ++i) s += x[size_t(r * in + i)] * Wv[size_t(e)][size_t(o * in + i)];
          y[size_t(r * out + o)] = s;
        }
        for (int64_t i = 0; i < in; ++i) {
          double s = 0;
          for (int64_t o = 0; o < out; ++o) s += dy[size_t(r * out + o)] * Wv[size_t(e)][size_t(o * in + i)];
          dx_set[size_t(r * in + i)] = s;
          dx_acc[size_t(r * in + i)] += s;
          for (int64_t o = 0; o < out; ++o)
            dWw[size_t(e)][size_t(o * in + i)] += dy[size_t(r * out + o)] * x[size_t(r * in + i)];
        }
      }
    Tensor tx = host_of({R, in}, x), tdy = host_of({R, out}, dy), ty = host_of({R, out}, y0);
    be.moe_expert_fwd(tx, W, toff, ty);
    CHECK(norm_err(vec_of(ty), y) < tol);
    CHECK(vec_of(ty.slice0(M, R)) == Vec(y0.begin() + M * out, y0.end()));  // untouched
    for (bool acc : {false, true}) {
      Tensor tdx = host_of({R, in}, dx0);
      for (int64_t e = 0; e < E; ++e) dWt[size_t(e)] = host_of({out, in}, dW0[size_t(e)]);
      be.moe_expert_bwd(tdy, tx, W, toff, &tdx, acc ? nullptr : &dW, acc);
      CHECK(norm_err(vec_of(tdx), acc ? dx_acc : dx_set) < tol);
      CHECK(vec_of(tdx.slice0(M, R)) == Vec(dx0.begin() + M * in, dx0.end()));
      for (int64_t e = 0; e < E; ++e)  // dW (+=) when given, untouched when not
        CHECK(norm_err(vec_of(dWt[size_t(e)]), acc ? dW0[size_t(e)] : dWw[size_t(e)]) < tol);
    }
    // dx null: only the weight gradients
    for (int64_t e = 0; e < E; ++e) dWt[size_t(e)] = host_of({out, in}, dW0[size_t(e)]);
    be.moe_expert_bwd(tdy, tx, W, toff, nullptr, &dW, false);
    for (int64_t e = 0; e < E; ++e) CHECK(norm_err(vec_of(dWt[size_t(e)]), dWw[size_t(e)]) < tol);
  }

  // Bad plans and lists name the op and the problem.
  Tensor x = host_tensor({4, 3}), y = host_tensor({4, 2}), Wa = host_tensor({2, 3});
  const std::vector<const Tensor*> W2 = {&Wa, &Wa};
  Tensor off = host_tensor({3}, DType::I32);
  off.i32()[1] = 3;
  off.i32()[2] = 2;
  CHECK_THROWS_WITH(be.moe_expert_fwd(x, W2, off, y),
                    Contains("moe_expert_fwd") && Contains("decrease at expert 1"));
  off.i32()[2] = 5;
  CHECK_THROWS_WITH(be.moe_expert_fwd(x, W2, off, y), Contains("offsets[E] = 5") && Contains("4"));
  Tensor off_short = host_tensor({2}, DType::I32);
  CHECK_THROWS_WITH(be.moe_expert_fwd(x, W2, off_short, y),
                    Contains("offsets [2] i32 must have 3 elements (experts + 1)"));
  CHECK_THROWS_WITH(be.moe_expert_fwd(x, {}, off, y), Contains("no expert weights"));
}

TEST_CASE("moe permutation plan: token order, capacity drops, deterministic", "[moe][plan]") {
  Rng rng(77);
  const int64_t N = 50, k = 3, E = 6;
  std::vector<int32_t> idx(size_t(N * k));
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int32_t> perm = {0, 1, 2, 3, 4, 5};
    // skew: expert 0 is first choice of most tokens
    for (int64_t i = E - 1; i > 0; --i) std::swap(perm[size_t(i)], perm[size_t(rng.below(uint64_t(i + 1)))]);
    if (n % 4 != 0) std::swap(perm[0], *std::find(perm.begin(), perm.end(), 0));
    for (int64_t j = 0; j < k; ++j) idx[size_t(n * k + j)] = perm[size_t(j)];
  }
  // The capacity formula ceil(cf N k / E), capped at N (an expert sees a token at most once;
  // 1e300 used to overflow the int64 conversion).
  CHECK(ref::moe_capacity(0.5, N, k, E) == 13);
  CHECK(ref::moe_capacity(3.0, N, k, E) == N);
  CHECK(ref::moe_capacity(1e300, N, k, E) == N);
  for (double cf : {0.0, 0.5, 1.0, 2.0, 1e30}) {
    INFO("capacity_factor " << cf);
    const int64_t cap = ref::moe_capacity(cf, N, k, E);
    std::vector<int32_t> off(size_t(E + 1)), row_of(size_t(N * k)), row_token(size_t(N * k));
    ref::moe_permute(idx.data(), N, k, E, cap, off.data(), row_of.data(), row_token.data());
    std::vector<int64_t> cnt(size_t(E), 0);
    for (int32_t e : idx) ++cnt[size_t(e)];
    int64_t dropped = 0, expected_dropped = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t kept = off[size_t(e + 1)] - off[size_t(e)];
      CHECK(kept == (cap > 0 ? std::min(cnt[size_t(e)], cap) : cnt[size_t(e)]));
      expected_dropped += cnt[size_t(e)] - kept;
      // rows of an expert hold its tokens in increasing token order
      for (int64_t r = off[size_t(e)] + 1; r < off[size_t(e + 1)]; ++r)
        CHECK(row_token[size_t(r)] > row_token[size_t(r - 1)]);
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < k; ++j) {
        const int32_t r = row_of[size_t(n * k + j)];
        if (r < 0) {
          ++dropped;
          continue;
        }
        const int32_t e = idx[size_t(n * k + j)];
        CHECK(r >= off[size_t(e)]);
        CHECK(r < off[size_t(e + 1)]);
        CHECK(row_token[size_t(r)] == n);
      }
    CHECK(dropped == expected_dropped);
    CHECK(dropped == N * k - off.back());
    if (cf == 0.0) CHECK(dropped == 0);
    if (cf == 0.5) CHECK(dropped > 0);
    // a dropped slot belongs to a token later than every kept one of that expert
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < k; ++j)
        if (row_of[size_t(n * k + j)] < 0) {
          const int32_t e = idx[size_t(n * k + j)];
          CHECK(row_token[size_t(off[size_t(e + 1)] - 1)] < n);
        }
  }
}

TEST_CASE("moe top-k: ties go to the lower expert, the bias selects but does not weigh",
          "[moe][router]") {
  // Equal logits -> equal probabilities: the lowest indices win, in order.
  ref::MoeRoute a{5, 2, false, false, 1.0};
  Vec probs(5, 0.2);
  std::vector<int32_t> idx(2), counts(5);
  Vec w(2), ss(5);
  ref::moe_topk(probs.data(), static_cast<const double*>(nullptr), 1, a, idx.data(), w.data(),
                counts.data(), ss.data());
  CHECK(idx[0] == 0);
  CHECK(idx[1] == 1);
  // A bias on experts 3 and 4 moves the choice there; the weights stay the probabilities.
  Vec p2 = {0.4, 0.3, 0.15, 0.1, 0.05};
  Vec bias = {0, 0, 0, 0.5, 0.2};
  ref::moe_topk(p2.data(), bias.data(), 1, a, idx.data(), w.data(), counts.data(), ss.data());
  CHECK(idx[0] == 3);
  CHECK(idx[1] == 0);
  CHECK(w[0] == Approx(0.1));
  CHECK(w[1] == Approx(0.4));
  CHECK(counts[3] == 1);
  CHECK(counts[1] == 0);
  // Renormalised and scaled: weights sum to route_scale.
  ref::MoeRoute an{5, 3, false, true, 2.5};
  std::vector<int32_t> idx3(3);
  Vec w3(3);
  ref::moe_topk(p2.data(), static_cast<const double*>(nullptr), 1, an, idx3.data(), w3.data(),
                counts.data(), ss.data());
  CHECK(w3[0] + w3[1] + w3[2] == Approx(2.5));
  CHECK(idx3 == std::vector<int32_t>({0, 1, 2}));
}

TEST_CASE("moe ops reject bad arguments with clear messages", "[moe][errors]") {
  CpuBackend be;
  MoeRouterArgs a{4, 2, false, true, 1.f};
  Tensor x = host_tensor({5, 3}), W = host_tensor({4, 3}), probs = host_tensor({5, 4});
  Tensor idx = host_tensor({5, 2}, DType::I32), w = host_tensor({5, 2});
  Tensor counts = host_tensor({4}, DType::I32), ss = host_tensor({4});
  Tensor Wbad = host_tensor({3, 3});
  CHECK_THROWS_WITH(be.moe_router_fwd(x, Wbad, nullptr, a, probs, idx, w, counts, ss),
                    Contains("moe_router_fwd") && Contains("Wr"));
  MoeRouterArgs bad_k{4, 5, false, true, 1.f};
  CHECK_THROWS_WITH(be.moe_router_fwd(x, W, nullptr, bad_k, probs, idx, w, counts, ss),
                    Contains("top_k 5") && Contains("model.moe"));
  Tensor probs_bad = host_tensor({5, 3});
  CHECK_THROWS_WITH(be.moe_router_fwd(x, W, nullptr, a, probs_bad, idx, w, counts, ss),
                    Contains("probs") && Contains("[5,4]"));
  Tensor off = host_tensor({5}, DType::I32), row_of = host_tensor({5, 2}, DType::I32);
  Tensor row_token = host_tensor({10}, DType::I32);
  idx.i32()[3] = 7;
  CHECK_THROWS_WITH(be.moe_permute(idx, 4, 0, off, row_of, row_token),
                    Contains("moe_permute") && Contains("topk_idx[3] = 7"));
  idx.i32()[3] = 1;
  be.moe_permute(idx, 4, 0, off, row_of, row_token);
  Tensor yg = host_tensor({3, 3}), out = host_tensor({5, 3});  // too few rows for the plan
  CHECK_THROWS_WITH(be.moe_combine_fwd(yg, w, row_of, out, false),
                    Contains("moe_combine_fwd") && Contains("row_of"));
  Tensor x_wrong = host_tensor({5, 3}, DType::I32);
  Tensor xg = host_tensor({10, 3});
  CHECK_THROWS_WITH(be.moe_gather(x_wrong, row_token, xg), Contains("moe_gather") && Contains("dtype"));
  // Gather: -1 rows (past the kept ones) become zeros; any other token outside x is refused.
  Tensor x5 = host_tensor({5, 3});
  for (int64_t i = 0; i < x5.numel(); ++i) x5.f32()[i] = float(i + 1);
  Tensor tok = host_tensor({4}, DType::I32), xg4 = host_tensor({4, 3});
  const int32_t toks[4] = {4, -1, 0, -1};
  std::copy(toks, toks + 4, tok.i32());
  for (int64_t i = 0; i < xg4.numel(); ++i) xg4.f32()[i] = 7.f;
  be.moe_gather(x5, tok, xg4);
  CHECK(std::vector<float>(xg4.f32(), xg4.f32() + 12) ==
        std::vector<float>{13, 14, 15, 0, 0, 0, 1, 2, 3, 0, 0, 0});
  tok.i32()[1] = 5;
  CHECK_THROWS_WITH(be.moe_gather(x5, tok, xg4),
                    Contains("moe_gather") && Contains("row_token[1] = 5"));
  tok.i32()[1] = -2;
  CHECK_THROWS_WITH(be.moe_gather(x5, tok, xg4), Contains("row_token[1] = -2"));
}

// ================================================================================================
// 3. The model against the PyTorch fixture
// ================================================================================================

TEST_CASE("moe model forward and backward match the PyTorch fixture", "[moe][model]") {
  auto m = fixture_meta();
  SafetensorsReader r(kFixture + ".safetensors");
  for (const std::string variant : {"a", "b"}) {
    INFO("variant " << variant);
    auto& vm = m["variants"][variant];
    Config c = fixture_config(m, variant);
    const std::string pre = variant + ".";
    CpuBackend be;
    const int B = c.train.micro_batch, T = c.train.seq_len;
    LlamaModel model(c.model, be, B, T);
    REQUIRE(model.is_moe());
    load_init(model, r, pre);
    std::vector<int32_t> in, tg;
    Tensor tok = r.read_f32(pre + "tokens");
    split_tokens(tok.f32(), B, T, in, tg);

    Tensor ref_logits = r.read_f32(pre + "logits");
    auto lg = model.logits(in.data());
    REQUIRE(int64_t(lg.size()) == ref_logits.numel());
    CHECK(rel_err(lg.data(), ref_logits.f32(), ref_logits.numel()) < 1e-5);

    model.zero_grads();
    const double loss = model.forward_backward(in.data(), tg.data(), 1.0f / float(B * T));
    CHECK(loss == Approx(vm["loss"].get<double>()).epsilon(1e-5));
    CHECK(model.moe_aux_loss() == Approx(vm["aux_loss"].get<double>()).margin(1e-6));
    int64_t dropped = 0;
    for (MoeLayer* l : model.moe_layers()) {
      INFO("layer " << l->layer());
      auto want = vm["counts"][std::to_string(l->layer())].get<std::vector<int>>();
      CHECK(std::vector<int>(l->last_counts().begin(), l->last_counts().end()) == want);
      dropped += l->last_dropped();
    }
    CHECK(dropped == vm["dropped"].get<int64_t>());
    for (Param* p : model.params()) {
      if (p->kind == ParamKind::Bias) continue;
      INFO(p->name);
      Tensor ref = r.read_f32(pre + "grad." + p->name);
      CHECK(rel_err(p->grad.f32(), ref.f32(), ref.numel()) < 1e-4);
    }
    // Forward-only returns the cross-entropy alone.
    CHECK(model.forward(in.data(), tg.data()) ==
          Approx(loss - model.moe_aux_loss()).epsilon(1e-6));
  }
}

TEST_CASE("moe model: 5 Muon steps (experts one by one, bias updates) match PyTorch",
          "[moe][model][optim]") {
  auto m = fixture_meta();
  SafetensorsReader r(kFixture + ".safetensors");
  for (const std::string variant : {"a", "b"}) {
    INFO("variant " << variant);
    auto& vm = m["variants"][variant];
    Config c = fixture_config(m, variant);
    const std::string pre = variant + ".";
    CpuBackend be;
    const int B = c.train.micro_batch, T = c.train.seq_len;
    LlamaModel model(c.model, be, B, T);
    load_init(model, r, pre);
    Optimizer opt(c, model.params(), be);
    Tensor batches = r.read_f32(pre + "batches");
    std::vector<int32_t> in, tg;
    for (int s = 0; s < c.train.max_steps; ++s) {
      opt.zero_grad();
      split_tokens(batches.f32() + size_t(s) * B * (T + 1), B, T, in, tg);
      const double loss = model.forward_backward(in.data(), tg.data(), 1.0f / float(B * T));
      INFO("step " << s);
      CHECK(loss == Approx(vm["muon_losses"][s].get<double>()).epsilon(1e-5));
      const double n = global_grad_norm(model.params(), be);
      opt.step(s, float(clip_factor(n, c.optim.grad_clip)));
      model.post_step();
    }
    const std::string probe = vm["probe"];
    Param* p = model.find(probe);
    REQUIRE(p);
    Tensor ref = r.read_f32(pre + "final." + probe);
    CHECK(rel_err(p->master.f32(), ref.f32(), ref.numel()) < 1e-4);
    if (!vm["bias_probe"].is_null()) {
      const std::string bname = vm["bias_probe"];
      Param* b = model.find(bname);
      REQUIRE(b);
      Tensor bref = r.read_f32(pre + "final." + bname);
      for (int64_t e = 0; e < b->numel(); ++e) CHECK(b->master.f32()[e] == Approx(bref.f32()[e]).margin(1e-6));
    }
  }
}

// ================================================================================================
// 4. Optimizer groups, balancing, bookkeeping, determinism, configs
// ================================================================================================

TEST_CASE("moe parameters: HF DeepSeek-V3 names; Muon per expert, router on AdamW, bias off",
          "[moe][optim]") {
  CpuBackend be;
  ModelConfig mc = tiny_moe("bias", "sigmoid");
  LlamaModel model(mc, be, 2, 8);
  Config c;
  c.model = mc;
  c.optim.name = "muon";
  Optimizer opt(c, model.params(), be);
  const int E = mc.moe.n_experts, de = mc.moe.d_expert, d = mc.d_model;
  // layer 0 dense, layer 1 MoE
  CHECK(model.find("model.layers.0.mlp.gate_proj.weight"));
  CHECK_FALSE(model.find("model.layers.1.mlp.gate_proj.weight"));
  Param* router = model.find("model.layers.1.mlp.gate.weight");
  Param* bias = model.find("model.layers.1.mlp.gate.e_score_correction_bias");
  REQUIRE(router);
  REQUIRE(bias);
  CHECK(router->kind == ParamKind::Router);
  CHECK(router->shape == Shape{E, d});
  CHECK(bias->kind == ParamKind::Bias);
  CHECK(bias->shape == Shape{E});
  Param* sg = model.find("model.layers.1.mlp.shared_experts.gate_proj.weight");
  REQUIRE(sg);
  CHECK(sg->shape == Shape{int64_t(mc.moe.n_shared) * de, d});
  int muon_experts = 0;
  for (const OptEntry& e : opt.entries()) {
    INFO(e.param->name);
    CHECK(e.param->kind != ParamKind::Bias);
    if (e.param->name.find(".mlp.experts.") != std::string::npos) {
      CHECK(e.kind == OptKind::Muon);
      CHECK(e.param->shape.size() == 2);
      ++muon_experts;
    }
    if (e.param == router) CHECK(e.kind == OptKind::AdamW);
  }
  CHECK(muon_experts == 3 * E);
  for (int e = 0; e < E; ++e) {
    const std::string q = "model.layers.1.mlp.experts." + std::to_string(e) + ".";
    CHECK(model.find(q + "gate_proj.weight")->shape == Shape{de, d});
    CHECK(model.find(q + "up_proj.weight")->shape == Shape{de, d});
    CHECK(model.find(q + "down_proj.weight")->shape == Shape{d, de});
  }
  // init: bias zero, router random
  model.init_weights(3);
  for (int e = 0; e < E; ++e) CHECK(bias->master.f32()[e] == 0.f);
  CHECK(be.sum_squares(router->master) > 0);
  // No bias param unless balance = "bias".
  LlamaModel m2(tiny_moe("aux_loss", "softmax"), be, 2, 8);
  CHECK_FALSE(m2.find("model.layers.1.mlp.gate.e_score_correction_bias"));
  // MFU accounting counts the active share of the experts only.
  ModelConfig dense = mc;
  dense.moe.n_experts = 0;
  LlamaModel md(dense, be, 2, 8);
  CHECK(model.flops_per_token() < 6.0 * double(model.num_params()));
}

TEST_CASE("optim.router \"matrix\" puts the router in the main group, under µP too",
          "[moe][optim]") {
  CpuBackend be;
  Config c;
  c.model = tiny_moe("bias", "sigmoid");
  c.optim.name = "muon";
  c.optim.lr = 0.02;
  c.optim.wd = 0.1;
  c.optim.adamw.lr = 3e-3;
  c.optim.adamw.wd = 0.01;
  c.optim.scale = "spectral";
  c.mup.enabled = true;
  c.mup.base_width = c.model.d_model / 2;  // width_mult 2
  for (const char* where : {"adamw", "matrix"}) {
    c.optim.router = where;
    const bool matrix = std::string(where) == "matrix";
    LlamaModel model(c.model, be, 2, 8);
    const MupResult mup = apply_mup(c, model.params());
    Optimizer opt(c, model.params(), be);
    Param* router = model.find("model.layers.1.mlp.gate.weight");
    REQUIRE(router);
    const OptEntry* re = nullptr;
    for (const OptEntry& e : opt.entries())
      if (e.param == router) re = &e;
    REQUIRE(re);
    INFO(where);
    CHECK(re->kind == (matrix ? OptKind::Muon : OptKind::AdamW));
    // Main group: optim.lr with Muon's µP rule (lr_mult 1) and its scale, optim.wd; else the
    // adamw group's lr with the hidden-matrix fan-in rule 1/width_mult.
    CHECK(re->lr == Approx(matrix ? 0.02 : 3e-3 / 2));
    CHECK(re->wd == Approx(matrix ? 0.1 : 0.01));
    if (matrix) CHECK(re->scale == Approx(std::sqrt(double(c.model.moe.n_experts) / c.model.d_model)));
    // The printed table says the same.
    bool row_seen = false;
    for (const MupRow& r : mup.rows)
      if (r.name == router->name) {
        row_seen = true;
        CHECK(r.optimizer == (matrix ? "muon" : "adamw"));
      }
    CHECK(row_seen);
    // The bias buffer is never an optimizer's.
    for (const OptEntry& e : opt.entries()) CHECK(e.param->kind != ParamKind::Bias);
  }
  c.optim.router = "muon";
  const std::string err = mf::test::error_of([&] { validate_config(c); });
  CHECK(err.find("optim.router") != std::string::npos);
}

TEST_CASE("moe bias balancing drives a skewed router toward balance", "[moe][balance]") {
  // One MoE layer on fixed inputs whose router strongly prefers experts 0 and 1: logits get
  // about +6 on those two through a direction u that every input shares. Only post_step moves the
  // bias (no optimizer), as DeepSeek-V3's auxiliary-loss-free rule prescribes.
  CpuBackend be;
  for (const std::string score : {"sigmoid", "softmax"}) {
    INFO(score);
    ModelConfig mc = tiny_moe("bias", score);
    mc.moe.n_experts = 8;
    mc.moe.bias_rate = 0.01;
    const int64_t N = 256, d = mc.d_model, E = mc.moe.n_experts;
    std::vector<std::unique_ptr<Param>> table;
    AddParamFn add = [&](const std::string& name, ParamKind kind, Shape shape, double std) {
      auto p = std::make_unique<Param>();
      p->name = name;
      p->kind = kind;
      p->shape = shape;
      p->init_std = std;
      p->master = be.empty(shape, DType::F32);
      p->weight = p->master;
      p->grad = be.empty(shape, DType::F32);
      table.push_back(std::move(p));
      return table.back().get();
    };
    MoeScratch scratch(mc, be, N);
    MoeLayer layer(mc, be, 1, N, scratch, add, 0.05);
    Rng rng(31);
    for (auto& p : table)
      for (int64_t i = 0; i < p->numel(); ++i)
        p->master.f32()[i] = p->kind == ParamKind::Bias ? 0.f : float(rng.normal() * 0.3);
    std::vector<double> u(static_cast<size_t>(d));
    double un = 0;
    for (auto& v : u) {
      v = rng.normal();
      un += v * v;
    }
    for (auto& v : u) v /= std::sqrt(un);
    // Softmax probabilities of the losing experts all collapse toward 0 under a large skew,
    // leaving the bias nothing to tell tokens apart with: a milder skew there.
    const double skew = score == "sigmoid" ? 2.0 : 1.0;
    float* Wr = layer.router()->master.f32();
    for (int e = 0; e < 2; ++e)
      for (int64_t i = 0; i < d; ++i) Wr[e * d + i] += float(skew * u[size_t(i)]);
    Tensor x = host_tensor({N, d}), out = host_tensor({N, d});
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < d; ++i) x.f32()[n * d + i] = float(rng.normal() + 3.0 * u[size_t(i)]);

    layer.forward(x, out, true);
    layer.post_step();
    auto m0 = layer.metrics();
    const double cv0 = m0["load_cv"].get<double>();
    INFO("initial " << m0.dump());
    REQUIRE(m0["load_max"].get<int64_t>() >= 2 * N * mc.moe.top_k / E);  // twice the mean load
    for (int it = 0; it < 400; ++it) {
      layer.forward(x, out, true);
      layer.post_step();
    }
    auto m1 = layer.metrics();
    INFO("final " << m1.dump());
    CHECK(m1["load_cv"].get<double>() < 0.25 * cv0);
    CHECK(m1["load_max"].get<int64_t>() < 3 * N * mc.moe.top_k / (2 * E));  // < 1.5 x mean
    CHECK(m1["load_min"].get<int64_t>() > N * mc.moe.top_k / (2 * E));      // > 0.5 x mean
    // the over-loaded experts ended with the lowest biases
    const float* b = layer.bias()->master.f32();
    const float lowest = *std::min_element(b, b + E);
    CHECK((b[0] == lowest || b[1] == lowest));
    const float mean_b = std::accumulate(b, b + E, 0.f) / float(E);
    CHECK(b[0] < mean_b);
    CHECK(b[1] < mean_b);
    CHECK(m1["bias_min"].get<double>() == Approx(lowest));
    // Evaluation passes (record = false) do not count toward the step's loads.
    layer.forward(x, out, false);
    layer.post_step();
    CHECK(layer.metrics()["load_max"].get<int64_t>() == 0);
  }
}

TEST_CASE("moe balance loss: in the loss, in the metrics, zero when balance is not aux_loss",
          "[moe][balance]") {
  CpuBackend be;
  const int B = 2, T = 8;
  auto tokens = random_tokens(1, size_t(B * T), 48), targets = random_tokens(2, size_t(B * T), 48);
  for (const std::string balance : {"aux_loss", "bias", "none"}) {
    INFO(balance);
    ModelConfig mc = tiny_moe(balance, "softmax");
    mc.moe.capacity_factor = 0.6;
    LlamaModel model(mc, be, B, T);
    model.init_weights(4);
    model.zero_grads();
    const double total = model.forward_backward(tokens.data(), targets.data(), 1.f / (B * T));
    const double aux = model.moe_aux_loss();
    const double ce = model.forward(tokens.data(), targets.data());
    CHECK(total == Approx(ce + aux).epsilon(1e-6));
    model.post_step();
    auto j = model.moe_metrics();
    INFO(j.dump());
    if (balance == "aux_loss") {
      CHECK(aux >= mc.moe.aux_coef * 0.999);  // >= coef, equality only at perfect balance
      CHECK(j["aux_loss"].get<double>() == Approx(aux));
    } else {
      CHECK(aux == 0.0);
    }
    CHECK(j["dropped"].get<int64_t>() > 0);  // capacity 0.6 drops overflow
    auto l = j["layers"][0];
    CHECK(l["load_min"].get<int64_t>() <= l["load_max"].get<int64_t>());
    int64_t sum = 0;
    for (int c : model.moe_layers()[0]->last_counts()) sum += c;
    CHECK(sum == int64_t(B * T) * mc.moe.top_k);
    CHECK(l.contains("bias_min") == (balance == "bias"));
    // Data parallel: post_step hands the step's statistics to a sum over ranks; two identical
    // ranks double the loads and drops and keep the mean aux loss.
    model.zero_grads();
    model.forward_backward(tokens.data(), targets.data(), 1.f / (B * T));
    int calls = 0;
    model.post_step([&](std::vector<float>& v) {
      ++calls;
      for (auto& x : v) x *= 2;
    });
    CHECK(calls == 1);
    auto j2 = model.moe_metrics();
    MoeLayer* ml = model.moe_layers()[0];  // (the bias may have changed this pass's routing)
    const int max_count = *std::max_element(ml->last_counts().begin(), ml->last_counts().end());
    CHECK(j2["layers"][0]["load_max"].get<int64_t>() == 2 * max_count);
    CHECK(j2["dropped"].get<int64_t>() == 2 * ml->last_dropped());
    CHECK(j2["aux_loss"].get<double>() == Approx(ml->aux_loss()));
  }
}

TEST_CASE("moe model: activation recompute gives bitwise-identical losses and gradients",
          "[moe][model]") {
  CpuBackend be;
  const int B = 2, T = 8;
  auto tokens = random_tokens(5, size_t(B * T), 48), targets = random_tokens(6, size_t(B * T), 48);
  ModelScales scales;
  scales.residual_mult = 0.7;
  for (const std::string balance : {"aux_loss", "bias"}) {
    INFO(balance);
    struct Out {
      double loss;
      std::vector<std::vector<float>> grads, q;
      int64_t bytes;
    };
    auto run = [&](const std::string& rc) {
      ModelConfig mc = tiny_moe(balance, balance == "bias" ? "sigmoid" : "softmax");
      mc.n_layers = 4;  // one dense layer, then three MoE layers
      mc.recompute = rc;
      LlamaModel model(mc, be, B, T, scales);
      model.init_weights(8);
      model.zero_grads();
      Out o;
      o.bytes = model.activation_bytes();
      o.loss = model.forward_backward(tokens.data(), targets.data(), 1.f / (B * T));
      for (Param* p : model.params()) o.grads.emplace_back(p->grad.f32(), p->grad.f32() + p->numel());
      for (int l = 0; l < mc.n_layers; ++l) {
        Tensor q = model.attn_q(l);
        o.q.emplace_back(q.f32(), q.f32() + q.numel());
      }
      return o;
    };
    const Out none = run("none");
    // The expert activations of one MoE layer: gate, up, h (N k x de), yg (N k x d) and the
    // shared expert's gate, up, h (N x n_shared de), f32. With recompute three layers hold one set.
    const int64_t N = B * T, per_layer = 4 * (N * 2 * (3 * 10 + 24) + N * 3 * 10);
    for (const char* rc : {"mlp", "full"}) {
      INFO("recompute " << rc);
      const Out o = run(rc);
      CHECK(o.loss == none.loss);
      CHECK(o.grads == none.grads);
      CHECK(o.q == none.q);
      if (std::string(rc) == "mlp") CHECK(none.bytes - o.bytes == 2 * per_layer);
      else CHECK(none.bytes - o.bytes > 2 * per_layer);  // attention buffers shared too
    }
    CHECK(none.q[1] != none.q[2]);
  }
}

TEST_CASE("moe model: stacked expert gate/up GEMMs give the losses and gradients of separate "
          "GEMMs", "[moe][model]") {
  CpuBackend be;
  const int B = 2, T = 8;
  auto tokens = random_tokens(11, size_t(B * T), 48), targets = random_tokens(12, size_t(B * T), 48);
  struct Shape {
    int64_t d, de;
    int n_shared;
    bool routed, shared;  // which pairs sit side by side in the arenas (64-float alignment)
  };
  // 32 x 16 = 512 floats: both stack. 24 x 10 = 240 (padded to 256): the routed experts stay
  // separate while the shared [40, 24] = 960 floats stack. The tiny shape: neither.
  for (const Shape sh : {Shape{32, 16, 2, true, true}, Shape{24, 10, 4, false, true},
                         Shape{24, 10, 1, false, false}}) {
    for (const std::string balance : {"aux_loss", "bias"}) {
      INFO("d " << sh.d << ", d_expert " << sh.de << ", n_shared " << sh.n_shared << ", "
                << balance);
      auto run = [&](bool stack, const std::string& rc, std::vector<std::vector<float>>& grads) {
        ModelConfig mc = tiny_moe(balance, balance == "bias" ? "sigmoid" : "softmax");
        mc.d_model = sh.d;
        mc.moe.d_expert = sh.de;
        mc.moe.n_shared = sh.n_shared;
        mc.n_layers = 3;
        mc.recompute = rc;
        mc.stack_projections = stack;
        if (balance == "bias") mc.moe.capacity_factor = 1.0;  // drops some of 32 slots
        LlamaModel model(mc, be, B, T);
        for (MoeLayer* l : model.moe_layers()) {
          CHECK(l->routed_stacked() == (stack && sh.routed));
          CHECK(l->shared_stacked() == (stack && sh.shared));
        }
        model.init_weights(21);
        model.zero_grads();
        const double loss = model.forward_backward(tokens.data(), targets.data(), 1.f / (B * T));
        for (Param* p : model.params())
          grads.emplace_back(p->grad.f32(), p->grad.f32() + p->numel());
        return loss;
      };
      std::vector<std::vector<float>> g_sep;
      const double loss_sep = run(false, "none", g_sep);
      for (const char* rc : {"none", "full"}) {
        INFO("recompute " << rc);
        std::vector<std::vector<float>> g;
        const double loss = run(true, rc, g);
        mf::test::check_same_run(loss, g, loss_sep, g_sep, 1e-6, 1e-5);
      }
    }
  }
}

TEST_CASE("moe training is deterministic and independent of the thread count",
          "[moe][determinism]") {
  const int B = 2, T = 16;
  auto tokens = random_tokens(8, size_t(B * T), 48), targets = random_tokens(9, size_t(B * T), 48);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    CpuBackend be;
    ModelConfig mc = tiny_moe("bias", "sigmoid");
    mc.n_layers = 3;
    Config c;
    c.model = mc;
    c.train.max_steps = 6;
    c.schedule.warmup = 0;
    LlamaModel model(mc, be, B, T);
    model.init_weights(17);
    Optimizer opt(c, model.params(), be);
    std::vector<double> losses;
    for (int s = 0; s < 6; ++s) {
      opt.zero_grad();
      losses.push_back(model.forward_backward(tokens.data(), targets.data(), 1.f / (B * T)));
      opt.step(s, float(clip_factor(global_grad_norm(model.params(), be), 1.0)));
      model.post_step();
    }
    std::vector<float> w;
    for (Param* p : model.params()) w.insert(w.end(), p->master.f32(), p->master.f32() + p->numel());
    return std::make_pair(losses, w);
  };
  const int saved = omp_get_max_threads();
  auto a = run(1), b = run(2), c = run(1);
  omp_set_num_threads(saved);
  CHECK(a.first == c.first);
  CHECK(a.second == c.second);
  CHECK(a.first == b.first);
  CHECK(a.second == b.second);
  CHECK(a.first.back() < a.first.front());  // it learns the repeated batch
}

namespace {
// A CPU backend whose read-backs behave like the CUDA one at its most delayed: start() fills the
// host buffers with garbage and the data only arrives in wait(). An MoE layer that used its
// routing numbers without settling the read-back first would read the garbage.
class LateReadbackCpu final : public CpuBackend {
 public:
  class Late final : public Readback {
   public:
    Late(Backend& be, const std::vector<const Tensor*>& src) : be_(be), src_(src) {
      for (const Tensor* t : src) host_.push_back(host_tensor(t->shape, t->dtype));
    }
    void start() override {
      for (Tensor& h : host_)
        for (int64_t i = 0; i < h.numel(); ++i) h.data<int32_t>()[i] = -123456;  // garbage
      pending_ = true;
    }
    void wait() override {
      if (pending_) {
        for (size_t i = 0; i < src_.size(); ++i) be_.download(*src_[i], host_[i]);
        ++static_cast<LateReadbackCpu&>(be_).data_waits;
      }
      pending_ = false;
    }

   private:
    Backend& be_;
    std::vector<const Tensor*> src_;
    bool pending_ = false;
  };
  std::unique_ptr<Readback> make_readback(const std::vector<const Tensor*>& src) override {
    return std::make_unique<Late>(*this, src);
  }
  int data_waits = 0;  // waits that had a read-back in flight (the host stalled on the device)
};
}  // namespace

TEST_CASE("moe: routing read back late gives the same training, metrics and balance loss",
          "[moe][readback]") {
  const int B = 2, T = 16;
  auto tokens = random_tokens(21, size_t(B * T), 48), targets = random_tokens(22, size_t(B * T), 48);
  for (const char* balance : {"aux_loss", "bias"})
    for (double cap : {0.0, 0.9}) {
      INFO("balance " << balance << " capacity_factor " << cap);
      auto run = [&](CpuBackend& be) {
        ModelConfig mc = tiny_moe(balance, "softmax");
        mc.n_layers = 3;
        mc.moe.capacity_factor = cap;
        Config c;
        c.model = mc;
        c.train.max_steps = 4;
        c.schedule.warmup = 0;
        LlamaModel model(mc, be, B, T);
        model.init_weights(5);
        Optimizer opt(c, model.params(), be);
        std::vector<double> out;
        for (int s = 0; s < 4; ++s) {
          opt.zero_grad();
          // two deferred micro-batches, an evaluation forward between steps
          model.forward_backward_deferred(tokens.data(), targets.data(), 0.5f / (B * T), false);
          model.forward_backward_deferred(targets.data(), tokens.data(), 0.5f / (B * T), true);
          out.push_back(model.take_loss());
          opt.step(s, float(clip_factor(global_grad_norm(model.params(), be), 1.0)));
          model.post_step();
          const nlohmann::json m = model.moe_metrics();
          out.push_back(m["aux_loss"].get<double>());
          out.push_back(double(m["dropped"].get<int64_t>()));
          out.push_back(m["load_cv_max"].get<double>());
          out.push_back(model.forward(tokens.data(), targets.data()));
          out.push_back(model.moe_aux_loss());
          for (MoeLayer* l : model.moe_layers()) {
            out.push_back(double(l->last_dropped()));
            for (int v : l->last_counts()) out.push_back(double(v));
          }
        }
        for (Param* p : model.params())
          out.insert(out.end(), p->master.f32(), p->master.f32() + p->numel());
        return out;
      };
      CpuBackend plain;
      LateReadbackCpu late;
      const std::vector<double> a = run(plain), b = run(late);
      REQUIRE(a.size() == b.size());
      CHECK(a == b);
      if (std::string(balance) == "aux_loss") CHECK(a[1] > 0);  // the balance loss is in play
      if (cap > 0) CHECK(a[2] > 0);                              // and rows were dropped
    }
  // No MoE forward waits for its own read-back, with or without a capacity: a forward settles
  // only the previous pass (one wait per layer), never the one it started.
  for (double cap : {0.0, 0.9}) {
    INFO("capacity_factor " << cap);
    LateReadbackCpu late;
    ModelConfig mc = tiny_moe("bias", "softmax");
    mc.n_layers = 3;
    mc.moe.capacity_factor = cap;
    LlamaModel model(mc, late, B, T);
    model.init_weights(7);
    const int n_moe = int(model.moe_layers().size());
    REQUIRE(n_moe > 0);
    model.forward(tokens.data(), targets.data());
    CHECK(late.data_waits == 0);
    model.forward(targets.data(), tokens.data());
    CHECK(late.data_waits == n_moe);
    if (cap > 0) CHECK(model.moe_layers()[0]->last_dropped() > 0);
  }
  // The balance-loss gradient uses this pass's counts: a forward on other tokens just before
  // (whose counts differ) must not change the gradients.
  for (int late_rb = 0; late_rb < 2; ++late_rb) {
    INFO("late read-back " << late_rb);
    auto grads = [&](bool other_forward_first) {
      CpuBackend plain;
      LateReadbackCpu late;
      CpuBackend& be = late_rb ? late : plain;
      ModelConfig mc = tiny_moe("aux_loss", "softmax");
      mc.moe.aux_coef = 1.0;  // a large balance term, so wrong counts move the gradients
      LlamaModel model(mc, be, B, T);
      model.init_weights(6);
      if (other_forward_first) model.forward(targets.data(), tokens.data());
      model.zero_grads();
      model.forward_backward(tokens.data(), targets.data(), 1.f / (B * T));
      std::vector<float> g;
      for (Param* p : model.params()) g.insert(g.end(), p->grad.f32(), p->grad.f32() + p->numel());
      return g;
    };
    CHECK(grads(false) == grads(true));
  }
}

TEST_CASE("moe configs: moe-tiny trains, moe-moonlight-small has the Moonlight shape",
          "[moe][config]") {
  const std::string root = std::string(MF_TEST_DIR) + "/..";
  Config tiny = load_config(root + "/configs/moe-tiny.json");
  CHECK(tiny.model.moe.n_experts > 0);
  CpuBackend be;
  LlamaModel model(tiny.model, be, 2, 32);
  model.init_weights(1);
  auto tokens = random_tokens(3, 64, tiny.model.vocab_size);
  auto targets = random_tokens(4, 64, tiny.model.vocab_size);
  const double loss = model.forward_backward(tokens.data(), targets.data(), 1.f / 64);
  CHECK(std::isfinite(loss));
  CHECK(loss == Approx(std::log(double(tiny.model.vocab_size))).epsilon(0.05));

  Config ml = load_config(root + "/configs/moe-moonlight-small.json");
  const ModelConfig& m = ml.model;
  CHECK(m.moe.n_experts == 64);
  CHECK(m.moe.top_k == 6);
  CHECK(m.moe.n_shared == 2);
  CHECK(m.moe.first_dense == 1);
  CHECK(m.moe.score == "sigmoid");
  CHECK(m.moe.balance == "bias");
  // Total parameters from the table's shapes (the same arithmetic as LlamaModel::build_params,
  // without allocating half a billion floats).
  const double d = m.d_model, hd = m.head_dim(), qd = m.n_heads * hd, kvd = m.n_kv_heads * hd;
  const double attn = d * qd * 2 + d * kvd * 2 + 2 * d;
  const double moe = m.moe.n_experts * (d + 3 * d * m.moe.d_expert) +
                     3 * d * m.moe.n_shared * m.moe.d_expert + m.moe.n_experts;
  const double dense = 3 * d * m.d_ff;
  const double total = double(m.vocab_size) * d * (m.tie_embeddings ? 1 : 2) + d +
                       m.n_layers * attn + m.moe.first_dense * dense +
                       (m.n_layers - m.moe.first_dense) * moe;
  INFO("total params " << total);
  CHECK(total > 0.45e9);
  CHECK(total < 0.55e9);
  CHECK(m.param_count() == total);
  // Active per token: the routed experts a token does not reach (58 of 64) left out.
  const double unused = (m.n_layers - m.moe.first_dense) * (m.moe.n_experts - m.moe.top_k) * 3 * d *
                        double(m.moe.d_expert);
  CHECK(m.active_param_count() == total - unused);
  CHECK(m.active_param_count() < 0.2 * 1e9);
  // moe-tiny, counted on the allocated model: every parameter except the unused share of the
  // expert tensors.
  double experts = 0;
  for (Param* p : model.params())
    if (p->name.find(".mlp.experts.") != std::string::npos) experts += double(p->numel());
  const MoeConfig& te = tiny.model.moe;
  CHECK(tiny.model.active_param_count() ==
        double(model.num_params()) - experts * double(te.n_experts - te.top_k) / te.n_experts);
  ModelConfig dense_m = tiny.model;
  dense_m.moe.n_experts = 0;
  CHECK(dense_m.active_param_count() == dense_m.param_count());
}
