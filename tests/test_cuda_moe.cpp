// The CUDA Mixture-of-Experts ops (kernels/moe.cu) against CpuBackend (ref_moe.h), op by op, on
// awkward shapes: N = 1, 7, 127 tokens; E = 4, 64, 100 experts; k = 1, 2, 6; with and without an
// expert capacity; softmax and sigmoid scores; with and without the selection bias. Every case
// is tagged [gpu] and skips itself (WARN + return) without a CUDA device or in a CPU-only build.
//
// Inputs stored in bf16 on the GPU are bf16-representable (rounded on the host), so both
// backends see the same numbers. Integer outputs (plans, indices, counts) must match exactly;
// float outputs within the GPU's own roundings (bf16 stores, fp32 accumulation order).
#include <catch2/catch.hpp>

#include "gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_moe.h"
#include "core/bf16.h"
#include "core/rng.h"
#include "core/tensor.h"

using namespace mf;

namespace {

using FVec = std::vector<float>;
using IVec = std::vector<int32_t>;

FVec rand_f(Rng& rng, size_t n, double lo, double hi, bool bf16) {
  FVec v(n);
  for (auto& x : v) {
    x = float(lo + (hi - lo) * rng.uniform());
    if (bf16) x = round_to_bf16(x);
  }
  return v;
}

Tensor host_f(const Shape& s, const FVec& v) {
  Tensor h = host_tensor(s, DType::F32);
  std::memcpy(h.ptr, v.data(), v.size() * sizeof(float));
  return h;
}
Tensor host_i(const Shape& s, const IVec& v) {
  Tensor h = host_tensor(s, DType::I32);
  std::memcpy(h.ptr, v.data(), v.size() * sizeof(int32_t));
  return h;
}
Tensor on(Backend& be, const Shape& s, DType t, const FVec& v) {
  Tensor d = be.empty(s, t);
  be.upload(host_f(s, v), d);
  return d;
}
Tensor on_i(Backend& be, const Shape& s, const IVec& v) {
  Tensor d = be.empty(s, DType::I32);
  be.upload(host_i(s, v), d);
  return d;
}
FVec get_f(Backend& be, const Tensor& t) {
  Tensor h = host_tensor(t.shape, DType::F32);
  be.download(t, h);
  return FVec(h.f32(), h.f32() + h.numel());
}
IVec get_i(Backend& be, const Tensor& t) {
  Tensor h = host_tensor(t.shape, DType::I32);
  be.download(t, h);
  return IVec(h.i32(), h.i32() + h.numel());
}

// max |got - want| / max(max |want|, floor); NaN -> infinity.
double rel(const FVec& got, const FVec& want, double floor = 1e-30) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = floor;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i])) return std::numeric_limits<double>::infinity();
    num = std::max(num, std::abs(double(got[i]) - double(want[i])));
    den = std::max(den, std::abs(double(want[i])));
  }
  return num / den;
}

// Tolerance for an output stored in `t` on the GPU.
double tol_for(DType t) { return t == DType::BF16 ? 8e-3 : 2e-6; }
const char* dname(DType t) { return t == DType::BF16 ? "bf16" : "f32"; }

// Random top-k choices: k distinct experts per token; `skew` makes expert 0 (and 1) popular so
// that a capacity drops rows.
IVec rand_topk(Rng& rng, int64_t N, int k, int E, bool skew) {
  IVec idx(size_t(N * k));
  std::vector<int> perm(static_cast<size_t>(E));
  for (int64_t n = 0; n < N; ++n) {
    for (int e = 0; e < E; ++e) perm[size_t(e)] = e;
    for (int e = E - 1; e > 0; --e) std::swap(perm[size_t(e)], perm[rng.below(uint64_t(e + 1))]);
    if (skew) {
      auto it0 = std::find(perm.begin(), perm.end(), 0);
      std::iter_swap(perm.begin(), it0);
    }
    for (int j = 0; j < k; ++j) idx[size_t(n * k + j)] = perm[size_t(j)];
  }
  return idx;
}

struct Shape3 {
  int64_t N;
  int E, k;
};
std::vector<Shape3> shapes() {
  std::vector<Shape3> s;
  for (int64_t N : {1, 7, 127})
    for (int E : {4, 64, 100})  // 100: lanes own 3 or 4 experts, not a multiple of 32
      for (int k : {1, 2, 6})
        if (k <= E) s.push_back({N, E, k});
  return s;
}

// The plan both backends use for the row ops (computed by the CPU reference).
struct Plan {
  int64_t N, M;
  int E, k;
  IVec idx, offsets, row_of, row_token;
};
Plan make_plan(Rng& rng, const Shape3& s, int64_t capacity, bool skew) {
  Plan p{s.N, 0, s.E, s.k, rand_topk(rng, s.N, s.k, s.E, skew), {}, {}, {}};
  p.offsets.assign(size_t(s.E + 1), 0);
  p.row_of.assign(size_t(s.N * s.k), 0);
  p.row_token.assign(size_t(s.N * s.k), 0);
  ref::moe_permute(p.idx.data(), s.N, s.k, s.E, capacity, p.offsets.data(), p.row_of.data(),
                   p.row_token.data());
  p.M = p.offsets.back();
  return p;
}

std::string tag(const Shape3& s, int64_t cap) {
  return "N=" + std::to_string(s.N) + " E=" + std::to_string(s.E) + " k=" +
         std::to_string(s.k) + " capacity=" + std::to_string(cap);
}

}  // namespace

TEST_CASE("cuda moe_permute equals the CPU plan (stable, capacity drops)", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  CpuBackend cpu;
  Rng rng(101);
  // Beyond shapes(): more slots than one sort chunk (kSortChunk = 1024 in kernels/sort.cuh), so the
  // plan's sort runs 1, 2 and 3 merge passes, the last run of each pass shorter than the others.
  std::vector<Shape3> all = shapes();
  for (Shape3 big : {Shape3{300, 64, 6}, Shape3{450, 8, 6}, Shape3{900, 100, 6}}) all.push_back(big);
  for (const auto& s : all)
    for (int cap_mode = 0; cap_mode < 3; ++cap_mode)
      for (bool skew : {false, true}) {
        const int64_t cap = cap_mode == 0 ? 0
                            : cap_mode == 1 ? ref::moe_capacity(1.0, s.N, s.k, s.E)
                                            : 1;
        INFO(tag(s, cap) << " skew=" << skew);
        const IVec idx = rand_topk(rng, s.N, s.k, s.E, skew);
        const Shape ks{s.N, int64_t(s.k)};
        Tensor ci = host_i(ks, idx);
        Tensor co = host_tensor({s.E + 1}, DType::I32), cr = host_tensor(ks, DType::I32),
               ct = host_tensor({s.N * s.k}, DType::I32);
        cpu.moe_permute(ci, s.E, cap, co, cr, ct);
        Tensor gi = on_i(*gpu, ks, idx);
        Tensor go = gpu->empty({s.E + 1}, DType::I32), gr = gpu->empty(ks, DType::I32),
               gt = gpu->empty({s.N * s.k}, DType::I32);
        // Garbage in the outputs: the op must overwrite every entry.
        gpu->upload(host_i(ks, IVec(size_t(s.N * s.k), 12345)), gr);
        gpu->upload(host_i({s.N * s.k}, IVec(size_t(s.N * s.k), 777)), gt);
        gpu->moe_permute(gi, s.E, cap, go, gr, gt);
        CHECK(get_i(*gpu, go) == IVec(co.i32(), co.i32() + s.E + 1));
        CHECK(get_i(*gpu, gr) == IVec(cr.i32(), cr.i32() + s.N * s.k));
        CHECK(get_i(*gpu, gt) == IVec(ct.i32(), ct.i32() + s.N * s.k));
      }
}

TEST_CASE("cuda moe_router_fwd matches CpuBackend (softmax/sigmoid, bias, renorm)", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  CpuBackend cpu;
  const DType act = gpu->act_dtype();
  Rng rng(202);
  int variant = 0;
  for (const auto& s : shapes())
    for (bool sigmoid : {false, true})
      for (bool with_bias : {false, true}) {
        ++variant;
        const int64_t d = variant % 2 ? 37 : 64;
        MoeRouterArgs a;
        a.E = s.E;
        a.k = s.k;
        a.sigmoid = sigmoid;
        a.norm_topk = variant % 3 != 0;
        a.route_scale = variant % 4 == 0 ? 2.5f : 1.f;
        INFO(tag(s, 0) << " d=" << d << " sigmoid=" << sigmoid << " bias=" << with_bias
                       << " norm_topk=" << a.norm_topk << " route_scale=" << a.route_scale);
        const FVec x = rand_f(rng, size_t(s.N * d), -1.5, 1.5, true);
        const FVec Wr = rand_f(rng, size_t(s.E * d), -0.5, 0.5, false);
        const FVec bias = rand_f(rng, size_t(s.E), -0.05, 0.05, false);
        const Shape ne{s.N, int64_t(s.E)}, nk{s.N, int64_t(s.k)};

        Tensor cx = host_f({s.N, d}, x), cw = host_f({s.E, d}, Wr), cb = host_f({s.E}, bias);
        Tensor cp = host_tensor(ne), ci = host_tensor(nk, DType::I32), ctw = host_tensor(nk),
               cc = host_tensor({s.E}, DType::I32), cs = host_tensor({s.E});
        cpu.moe_router_fwd(cx, cw, with_bias ? &cb : nullptr, a, cp, ci, ctw, cc, cs);

        Tensor gx = on(*gpu, {s.N, d}, act, x), gw = on(*gpu, {s.E, d}, DType::F32, Wr),
               gb = on(*gpu, {s.E}, DType::F32, bias);
        Tensor gp = gpu->empty(ne, DType::F32), gi = gpu->empty(nk, DType::I32),
               gtw = gpu->empty(nk, DType::F32), gc = gpu->empty({s.E}, DType::I32),
               gs = gpu->empty({s.E}, DType::F32);
        gpu->upload(host_i({s.E}, IVec(size_t(s.E), 99)), gc);  // counts must be (=), not (+=)
        gpu->moe_router_fwd(gx, gw, with_bias ? &gb : nullptr, a, gp, gi, gtw, gc, gs);

        const FVec probs = get_f(*gpu, gp), tw = get_f(*gpu, gtw), ssum = get_f(*gpu, gs);
        const IVec idx = get_i(*gpu, gi), cnt = get_i(*gpu, gc);
        const FVec cprobs(cp.f32(), cp.f32() + cp.numel());
        CHECK(rel(probs, cprobs, 1e-3) <= 2e-5);
        CHECK(rel(ssum, FVec(cs.f32(), cs.f32() + s.E)) <= 2e-5);

        // Selection and weights on the GPU's own probs: exactly the reference's algorithm.
        IVec ridx(idx.size()), rcnt(size_t(s.E));
        FVec rw(tw.size());
        const ref::MoeRoute rt{s.E, s.k, sigmoid, a.norm_topk, double(a.route_scale)};
        ref::moe_topk<float>(probs.data(), with_bias ? bias.data() : nullptr, s.N, rt, ridx.data(),
                             rw.data(), rcnt.data(), nullptr);
        CHECK(idx == ridx);
        CHECK(cnt == rcnt);
        CHECK(rel(tw, rw) <= 1e-6);

        // Against the CPU run: the same experts except where two candidates are within the
        // probs tolerance of each other (a near tie may legitimately flip).
        int hard = 0;
        for (int64_t n = 0; n < s.N; ++n)
          for (int j = 0; j < s.k; ++j) {
            const int eg = idx[size_t(n * s.k + j)], ec = ci.i32()[n * s.k + j];
            if (eg == ec) continue;
            const auto score = [&](int e) {
              return double(cprobs[size_t(n * s.E + e)]) + (with_bias ? double(bias[size_t(e)]) : 0.0);
            };
            if (std::abs(score(eg) - score(ec)) > 1e-5) ++hard;
          }
        CHECK(hard == 0);
        if (idx == IVec(ci.i32(), ci.i32() + ci.numel())) {
          CHECK(cnt == IVec(cc.i32(), cc.i32() + s.E));
          CHECK(rel(tw, FVec(ctw.f32(), ctw.f32() + ctw.numel())) <= 2e-5);
        }
      }
}

TEST_CASE("cuda moe_router_bwd matches CpuBackend", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  CpuBackend cpu;
  const DType act = gpu->act_dtype();
  Rng rng(303);
  int variant = 0;
  for (const auto& s : shapes())
    for (bool sigmoid : {false, true})
      for (bool with_aux : {false, true}) {
        ++variant;
        const int64_t d = variant % 2 ? 64 : 37;
        MoeRouterArgs a;
        a.E = s.E;
        a.k = s.k;
        a.sigmoid = sigmoid;
        a.norm_topk = variant % 3 != 1;
        a.route_scale = variant % 4 == 1 ? 2.5f : 1.f;
        INFO(tag(s, 0) << " d=" << d << " sigmoid=" << sigmoid << " aux=" << with_aux
                       << " norm_topk=" << a.norm_topk << " route_scale=" << a.route_scale);
        const FVec x = rand_f(rng, size_t(s.N * d), -1.5, 1.5, true);
        const FVec Wr = rand_f(rng, size_t(s.E * d), -0.5, 0.5, false);
        const FVec dw = rand_f(rng, size_t(s.N * s.k), -1, 1, false);
        const FVec aux = rand_f(rng, size_t(s.E), -0.2, 0.2, false);
        const FVec dx0 = rand_f(rng, size_t(s.N * d), -1, 1, true);
        const FVec dWr0 = rand_f(rng, size_t(s.E * d), -1, 1, false);
        const Shape ne{s.N, int64_t(s.E)}, nk{s.N, int64_t(s.k)};
        // probs / topk_idx from the CPU router, then handed to both backends.
        Tensor cx = host_f({s.N, d}, x), cw = host_f({s.E, d}, Wr);
        Tensor cp = host_tensor(ne), ci = host_tensor(nk, DType::I32), ctw = host_tensor(nk),
               cc = host_tensor({s.E}, DType::I32), cs = host_tensor({s.E});
        cpu.moe_router_fwd(cx, cw, nullptr, a, cp, ci, ctw, cc, cs);
        const FVec probs(cp.f32(), cp.f32() + cp.numel());
        const IVec idx(ci.i32(), ci.i32() + ci.numel());

        Tensor cdw = host_f(nk, dw), caux = host_f({s.E}, aux), cdl = host_tensor(ne),
               cdx = host_f({s.N, d}, dx0), cdWr = host_f({s.E, d}, dWr0);
        cpu.moe_router_bwd(cdw, with_aux ? &caux : nullptr, cx, cw, cp, ci, a, cdl, cdx, cdWr);

        Tensor gx = on(*gpu, {s.N, d}, act, x), gw = on(*gpu, {s.E, d}, DType::F32, Wr);
        Tensor gp = on(*gpu, ne, DType::F32, probs), gi = on_i(*gpu, nk, idx);
        Tensor gdw = on(*gpu, nk, DType::F32, dw), gaux = on(*gpu, {s.E}, DType::F32, aux);
        Tensor gdl = on(*gpu, ne, DType::F32, FVec(size_t(s.N * s.E), 5.f));  // (=) check
        Tensor gdx = on(*gpu, {s.N, d}, act, dx0), gdWr = on(*gpu, {s.E, d}, DType::F32, dWr0);
        gpu->moe_router_bwd(gdw, with_aux ? &gaux : nullptr, gx, gw, gp, gi, a, gdl, gdx, gdWr);

        CHECK(rel(get_f(*gpu, gdl), FVec(cdl.f32(), cdl.f32() + cdl.numel()), 1e-6) <= 1e-5);
        CHECK(rel(get_f(*gpu, gdx), FVec(cdx.f32(), cdx.f32() + cdx.numel())) <= tol_for(act));
        CHECK(rel(get_f(*gpu, gdWr), FVec(cdWr.f32(), cdWr.f32() + cdWr.numel())) <= 1e-5);
      }
}

TEST_CASE("cuda moe_gather / moe_gather_bwd match CpuBackend", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  CpuBackend cpu;
  Rng rng(404);
  const auto all = shapes();
  for (size_t si = 0; si < all.size(); ++si)
    for (int64_t cap_mode : {0, 1})
      for (DType dt : {DType::F32, DType::BF16}) {
        const auto& s = all[si];
        // Each dtype at both row widths: 64 takes the 16-byte vector path, 37 the scalar one.
        const int64_t d = (si + size_t(cap_mode)) % 2 ? 64 : 37;
        const int64_t cap = cap_mode ? ref::moe_capacity(0.75, s.N, s.k, s.E) : 0;
        INFO(tag(s, cap) << " d=" << d << " dtype=" << dname(dt));
        const Plan p = make_plan(rng, s, cap, true);
        const Shape nk{s.N, int64_t(s.k)};
        const FVec x = rand_f(rng, size_t(s.N * d), -2, 2, true);
        // gather: exact copies, over all N*k rows (those past the kept M are zeros).
        const int64_t R = s.N * s.k;
        Tensor cxg = host_tensor({R, d});
        cpu.moe_gather(host_f({s.N, d}, x), host_i({R}, p.row_token), cxg);
        for (int64_t i = p.M * d; i < R * d; ++i) REQUIRE(cxg.f32()[i] == 0.f);
        Tensor gx = on(*gpu, {s.N, d}, dt, x), grt = on_i(*gpu, {R}, p.row_token);
        Tensor gxg = gpu->empty({R, d}, dt);
        gpu->moe_gather(gx, grt, gxg);
        CHECK(get_f(*gpu, gxg) == FVec(cxg.f32(), cxg.f32() + cxg.numel()));
        // gather_bwd: dx (+=) sum over the token's kept slots.
        const FVec dxg = rand_f(rng, size_t(p.M * d), -1, 1, true);
        const FVec dx0 = rand_f(rng, size_t(s.N * d), -1, 1, true);
        Tensor cdx = host_f({s.N, d}, dx0);
        cpu.moe_gather_bwd(host_f({p.M, d}, dxg), host_i(nk, p.row_of), cdx);
        Tensor gdxg = on(*gpu, {p.M, d}, dt, dxg), gro = on_i(*gpu, nk, p.row_of);
        Tensor gdx = on(*gpu, {s.N, d}, dt, dx0);
        gpu->moe_gather_bwd(gdxg, gro, gdx);
        CHECK(rel(get_f(*gpu, gdx), FVec(cdx.f32(), cdx.f32() + cdx.numel())) <= tol_for(dt));
      }
}

TEST_CASE("cuda moe_combine_fwd / moe_combine_bwd match CpuBackend", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  CpuBackend cpu;
  Rng rng(505);
  int variant = 0;
  const auto all = shapes();
  for (size_t si = 0; si < all.size(); ++si)
    for (int64_t cap_mode : {0, 1})
      for (DType dt : {DType::F32, DType::BF16}) {
        const auto& s = all[si];
        ++variant;
        // Each dtype at both row widths: 64 takes the 16-byte vector path, 37 the scalar one.
        const int64_t d = (si + size_t(cap_mode)) % 2 ? 37 : 64;
        const bool accumulate = variant % 3 == 0;
        const int64_t cap = cap_mode ? ref::moe_capacity(0.75, s.N, s.k, s.E) : 0;
        INFO(tag(s, cap) << " d=" << d << " dtype=" << dname(dt) << " accumulate=" << accumulate);
        const Plan p = make_plan(rng, s, cap, true);
        const Shape nk{s.N, int64_t(s.k)};
        // +1 spare row in yg/dyg that no slot maps to: combine_bwd must leave it untouched.
        const int64_t R = p.M + 1;
        const FVec yg = rand_f(rng, size_t(R * d), -2, 2, true);
        const FVec w = rand_f(rng, size_t(s.N * s.k), 0.05, 1.0, false);
        const FVec out0 = rand_f(rng, size_t(s.N * d), -1, 1, true);
        const FVec dout = rand_f(rng, size_t(s.N * d), -1, 1, true);
        const FVec dyg0(size_t(R * d), 3.f);

        Tensor cout_ = host_f({s.N, d}, out0);
        cpu.moe_combine_fwd(host_f({R, d}, yg), host_f(nk, w), host_i(nk, p.row_of), cout_,
                            accumulate);
        Tensor gyg = on(*gpu, {R, d}, dt, yg), gw = on(*gpu, nk, DType::F32, w);
        Tensor gro = on_i(*gpu, nk, p.row_of), gout = on(*gpu, {s.N, d}, dt, out0);
        gpu->moe_combine_fwd(gyg, gw, gro, gout, accumulate);
        CHECK(rel(get_f(*gpu, gout), FVec(cout_.f32(), cout_.f32() + cout_.numel())) <=
              tol_for(dt));

        Tensor cdyg = host_f({R, d}, dyg0), cdw = host_tensor(nk);
        cpu.moe_combine_bwd(host_f({s.N, d}, dout), host_f({R, d}, yg), host_f(nk, w),
                            host_i(nk, p.row_of), cdyg, cdw);
        Tensor gdout = on(*gpu, {s.N, d}, dt, dout), gdyg = on(*gpu, {R, d}, dt, dyg0);
        Tensor gdw = on(*gpu, nk, DType::F32, FVec(size_t(s.N * s.k), 9.f));  // (=) check
        gpu->moe_combine_bwd(gdout, gyg, gw, gro, gdyg, gdw);
        const FVec got_dyg = get_f(*gpu, gdyg);
        CHECK(rel(got_dyg, FVec(cdyg.f32(), cdyg.f32() + cdyg.numel())) <= tol_for(dt));
        for (int64_t c = 0; c < d; ++c) REQUIRE(got_dyg[size_t(p.M * d + c)] == 3.f);
        CHECK(rel(get_f(*gpu, gdw), FVec(cdw.f32(), cdw.f32() + cdw.numel())) <= 1e-5);
      }
}

TEST_CASE("cuda moe ops are deterministic (bitwise equal on repeat)", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  const DType act = gpu->act_dtype();
  Rng rng(606);
  const int64_t N = 127, d = 64;
  const int E = 64, k = 6;
  MoeRouterArgs a;
  a.E = E;
  a.k = k;
  a.sigmoid = true;
  const FVec x = rand_f(rng, size_t(N * d), -1.5, 1.5, true);
  const FVec Wr = rand_f(rng, size_t(E * d), -0.5, 0.5, false);
  const FVec dout = rand_f(rng, size_t(N * d), -1, 1, true);
  Tensor gx = on(*gpu, {N, d}, act, x), gw = on(*gpu, {E, d}, DType::F32, Wr);
  Tensor gdo = on(*gpu, {N, d}, act, dout);
  auto run = [&]() {
    Tensor p = gpu->empty({N, E}, DType::F32), i = gpu->empty({N, k}, DType::I32),
           w = gpu->empty({N, k}, DType::F32), c = gpu->empty({E}, DType::I32),
           ss = gpu->empty({E}, DType::F32);
    gpu->moe_router_fwd(gx, gw, nullptr, a, p, i, w, c, ss);
    Tensor off = gpu->empty({E + 1}, DType::I32), ro = gpu->empty({N, k}, DType::I32),
           rt = gpu->empty({N * k}, DType::I32);
    gpu->moe_permute(i, E, ref::moe_capacity(1.0, N, k, E), off, ro, rt);
    const int64_t M = get_i(*gpu, off).back();
    Tensor xg = gpu->empty({M, d}, act), out = gpu->empty({N, d}, act);
    gpu->moe_gather(gx, rt, xg);
    gpu->moe_combine_fwd(xg, w, ro, out, false);
    Tensor dyg = gpu->empty({M, d}, act), dw = gpu->empty({N, k}, DType::F32);
    gpu->moe_combine_bwd(gdo, xg, w, ro, dyg, dw);
    Tensor dl = gpu->empty({N, E}, DType::F32), dx = gpu->empty({N, d}, act),
           dWr = gpu->empty({E, d}, DType::F32);
    gpu->moe_gather_bwd(dyg, ro, dx);
    gpu->moe_router_bwd(dw, nullptr, gx, gw, p, i, a, dl, dx, dWr);
    FVec all = get_f(*gpu, ss);
    for (const Tensor* t : {&p, &w, &out, &dyg, &dw, &dl, &dx, &dWr}) {
      const FVec v = get_f(*gpu, *t);
      all.insert(all.end(), v.begin(), v.end());
    }
    for (const Tensor* t : {&i, &c, &off, &ro, &rt}) {
      const IVec v = get_i(*gpu, *t);
      for (int32_t q : v) all.push_back(float(q));
    }
    return all;
  };
  const FVec first = run(), second = run();
  REQUIRE(first.size() == second.size());
  CHECK(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)) == 0);
}

TEST_CASE("cuda moe ops reject bad arguments with clear errors", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  MoeRouterArgs a;
  a.E = 4;
  a.k = 5;  // k > E
  Tensor x = gpu->empty({3, 8}, gpu->act_dtype()), Wr = gpu->empty({4, 8}, DType::F32);
  Tensor p = gpu->empty({3, 4}, DType::F32), i = gpu->empty({3, 5}, DType::I32),
         w = gpu->empty({3, 5}, DType::F32), c = gpu->empty({4}, DType::I32),
         ss = gpu->empty({4}, DType::F32);
  CHECK_THROWS_WITH(gpu->moe_router_fwd(x, Wr, nullptr, a, p, i, w, c, ss),
                    Catch::Contains("top_k") && Catch::Contains("model.moe"));
  a.k = 2;
  Tensor i2 = gpu->empty({3, 2}, DType::I32), w2 = gpu->empty({3, 3}, DType::F32);
  CHECK_THROWS_WITH(gpu->moe_router_fwd(x, Wr, nullptr, a, p, i2, w2, c, ss),
                    Catch::Contains("topk_w"));
  Tensor off = gpu->empty({4}, DType::I32), ro = gpu->empty({3, 2}, DType::I32),
         rt = gpu->empty({6}, DType::I32);
  CHECK_THROWS_WITH(gpu->moe_permute(i2, 4, 0, off, ro, rt), Catch::Contains("offsets"));
  Tensor xg = gpu->empty({2, 7}, gpu->act_dtype());
  CHECK_THROWS_WITH(gpu->moe_gather(x, rt, xg), Catch::Contains("same width"));
}

TEST_CASE("cuda grouped expert GEMMs (moe_expert_fwd / _bwd) match CpuBackend", "[gpu][moe]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  CpuBackend cpu;
  const DType act = gpu->act_dtype();
  Rng rng(606);
  // Row blocks: router plans (with a capacity drop) and hand-made ones with empty experts and
  // blocks of several 64-row tiles. Widths: aligned (16-byte loads), odd (element loads) and
  // several K steps.
  std::vector<IVec> plans;
  for (const Shape3& s : {Shape3{127, 4, 2}, Shape3{127, 64, 6}, Shape3{7, 100, 2}})
    for (int64_t cap : {int64_t(0), ref::moe_capacity(0.7, s.N, s.k, s.E)})
      plans.push_back(make_plan(rng, s, cap, true).offsets);
  plans.push_back({0, 200, 200, 275});
  plans.push_back({0, 0, 0, 130});
  plans.push_back({0, 1});
  struct Dims {
    int64_t in, out;
  };
  int variant = 0;
  for (const IVec& off : plans)
    for (const Dims& dm : {Dims{64, 96}, Dims{37, 50}, Dims{128, 200}}) {
      ++variant;
      const int64_t E = int64_t(off.size()) - 1, M = off.back(), R = M + 3;
      INFO("experts " << E << " rows " << M << " in " << dm.in << " out " << dm.out);
      std::vector<FVec> Wv, dW0;
      std::vector<Tensor> Wg, Wc, dWg, dWc;
      for (int64_t e = 0; e < E; ++e) {
        Wv.push_back(rand_f(rng, size_t(dm.out * dm.in), -0.5, 0.5, true));
        dW0.push_back(rand_f(rng, size_t(dm.out * dm.in), -0.5, 0.5, false));
        Wg.push_back(on(*gpu, {dm.out, dm.in}, act, Wv.back()));
        Wc.push_back(host_f({dm.out, dm.in}, Wv.back()));
        dWg.push_back(on(*gpu, {dm.out, dm.in}, DType::F32, dW0.back()));
        dWc.push_back(host_f({dm.out, dm.in}, dW0.back()));
      }
      std::vector<const Tensor*> pWg, pWc;
      std::vector<Tensor*> pdWg, pdWc;
      for (int64_t e = 0; e < E; ++e) {
        pWg.push_back(&Wg[size_t(e)]);
        pWc.push_back(&Wc[size_t(e)]);
        pdWg.push_back(&dWg[size_t(e)]);
        pdWc.push_back(&dWc[size_t(e)]);
      }
      const FVec x = rand_f(rng, size_t(R * dm.in), -1, 1, true);
      const FVec dy = rand_f(rng, size_t(R * dm.out), -1, 1, true);
      const FVec y0 = rand_f(rng, size_t(R * dm.out), -1, 1, true);
      const FVec dx0 = rand_f(rng, size_t(R * dm.in), -1, 1, true);
      Tensor goff = on_i(*gpu, {E + 1}, off), coff = host_i({E + 1}, off);

      Tensor gx = on(*gpu, {R, dm.in}, act, x), cx = host_f({R, dm.in}, x);
      Tensor gy = on(*gpu, {R, dm.out}, act, y0), cy = host_f({R, dm.out}, y0);
      gpu->moe_expert_fwd(gx, pWg, goff, gy);
      cpu.moe_expert_fwd(cx, pWc, coff, cy);
      const FVec ygot = get_f(*gpu, gy);
      CHECK(rel(ygot, FVec(cy.f32(), cy.f32() + R * dm.out)) < tol_for(act));
      CHECK(FVec(ygot.begin() + M * dm.out, ygot.end()) == FVec(y0.begin() + M * dm.out, y0.end()));

      const bool acc = variant % 2 == 0;
      INFO("accumulate dx " << acc);
      Tensor gdy = on(*gpu, {R, dm.out}, act, dy), cdy = host_f({R, dm.out}, dy);
      Tensor gdx = on(*gpu, {R, dm.in}, act, dx0), cdx = host_f({R, dm.in}, dx0);
      gpu->moe_expert_bwd(gdy, gx, pWg, goff, &gdx, &pdWg, acc);
      cpu.moe_expert_bwd(cdy, cx, pWc, coff, &cdx, &pdWc, acc);
      const FVec dxgot = get_f(*gpu, gdx);
      CHECK(rel(dxgot, FVec(cdx.f32(), cdx.f32() + R * dm.in)) < tol_for(act));
      CHECK(FVec(dxgot.begin() + M * dm.in, dxgot.end()) == FVec(dx0.begin() + M * dm.in, dx0.end()));
      for (int64_t e = 0; e < E; ++e) {
        INFO("expert " << e << " rows " << off[size_t(e + 1)] - off[size_t(e)]);
        const FVec g = get_f(*gpu, dWg[size_t(e)]);
        const FVec c(dWc[size_t(e)].f32(), dWc[size_t(e)].f32() + dm.out * dm.in);
        CHECK(rel(g, c) < 1e-5);  // products exact in f32, only the summation order differs
        if (off[size_t(e + 1)] == off[size_t(e)]) CHECK(g == dW0[size_t(e)]);
      }
    }
  // Repeat runs are bitwise equal (no atomics).
  const IVec off = {0, 200, 200, 275};
  const int64_t in = 96, out = 64;
  Tensor goff = on_i(*gpu, {4}, off);
  std::vector<Tensor> Ws, dWs;
  std::vector<const Tensor*> W;
  std::vector<Tensor*> dW;
  for (int e = 0; e < 3; ++e) {
    Ws.push_back(on(*gpu, {out, in}, act, rand_f(rng, size_t(out * in), -0.5, 0.5, true)));
    dWs.push_back(gpu->empty({out, in}, DType::F32));
  }
  for (int e = 0; e < 3; ++e) {
    W.push_back(&Ws[size_t(e)]);
    dW.push_back(&dWs[size_t(e)]);
  }
  Tensor gx = on(*gpu, {275, in}, act, rand_f(rng, size_t(275 * in), -1, 1, true));
  Tensor gdy = on(*gpu, {275, out}, act, rand_f(rng, size_t(275 * out), -1, 1, true));
  Tensor gy = gpu->empty({275, out}, act), gdx = gpu->empty({275, in}, act);
  auto run = [&] {
    for (Tensor& t : dWs) gpu->zero(t);
    gpu->moe_expert_fwd(gx, W, goff, gy);
    gpu->moe_expert_bwd(gdy, gx, W, goff, &gdx, &dW, false);
    FVec all = get_f(*gpu, gy), more = get_f(*gpu, gdx);
    all.insert(all.end(), more.begin(), more.end());
    for (const Tensor& t : dWs) {
      more = get_f(*gpu, t);
      all.insert(all.end(), more.begin(), more.end());
    }
    return all;
  };
  const FVec first = run(), second = run();
  REQUIRE(first.size() == second.size());
  CHECK(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)) == 0);
}
