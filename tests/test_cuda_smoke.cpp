// Smoke tests of the CUDA backend against small host references computed in double (the same
// math as the CPU reference). Every case is tagged [gpu] and skips itself (WARN + return) when
// no CUDA device is visible or the build has no CUDA backend, so on CPU-only machines they pass
// by skipping. The full op-by-op comparison against CpuBackend lives in test_ops.cpp.
//
// Inputs are bf16-representable (rounded on the host) wherever the GPU stores them in bf16, so
// the only differences left are the GPU's own roundings (bf16 outputs, fp32 accumulation order).
#include <catch2/catch.hpp>

#include "gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "core/bf16.h"
#include "core/rng.h"
#include "core/tensor.h"
#ifdef MF_HAS_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

using namespace mf;
using mf::test::host_of;
using mf::test::dev_of;
using mf::test::fetch;
using mf::test::norm_err;

namespace {

using Vec = std::vector<double>;

Vec rand_vec(Rng& rng, size_t n, double lo = -1.0, double hi = 1.0, bool bf16 = true) {
  Vec v(n);
  for (auto& x : v) {
    x = lo + (hi - lo) * rng.uniform();
    if (bf16) x = double(round_to_bf16(float(x)));
  }
  return v;
}

Tensor host_ids(const std::vector<int32_t>& v) {
  Tensor h = host_tensor({int64_t(v.size())}, DType::I32);
  std::memcpy(h.ptr, v.data(), v.size() * sizeof(int32_t));
  return h;
}

// C[M,N] = alpha op(A) op(B) + beta C, row-major, double.
void gemm_ref(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const Vec& A,
              const Vec& B, double beta, Vec& C) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += (ta ? A[k * M + i] : A[i * K + k]) * (tb ? B[j * K + k] : B[k * N + j]);
      C[i * N + j] = alpha * acc + (beta != 0 ? beta * C[i * N + j] : 0.0);
    }
}

}  // namespace

TEST_CASE("cuda: upload/download round trips and casts", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  REQUIRE(be->name() == "cuda");
  REQUIRE(be->act_dtype() == DType::BF16);
  Rng rng(11);
  for (int64_t n : {1, 7, 33, 127, 4099}) {
    INFO("n = " << n);
    const Vec x = rand_vec(rng, size_t(n), -100.0, 100.0, false);  // not bf16-representable
    // f32 is exact both ways.
    CHECK(fetch(*be, dev_of(*be, {n}, DType::F32, x)) == [&] {
      Vec r(x.size());
      for (size_t i = 0; i < x.size(); ++i) r[i] = double(float(x[i]));
      return r;
    }());
    // bf16 storage rounds to nearest even, exactly like the host conversion.
    Vec rounded(x.size());
    for (size_t i = 0; i < x.size(); ++i) rounded[i] = double(round_to_bf16(float(x[i])));
    Tensor b = dev_of(*be, {n}, DType::BF16, x);
    CHECK(fetch(*be, b) == rounded);
    // Device-side casts: f32 -> bf16 rounds like the host; bf16 -> f32 is exact.
    Tensor f = dev_of(*be, {n}, DType::F32, x);
    Tensor b2 = be->empty({n}, DType::BF16);
    be->copy(f, b2);
    CHECK(fetch(*be, b2) == rounded);
    Tensor f2 = be->empty({n}, DType::F32);
    be->copy(b2, f2);
    CHECK(fetch(*be, f2) == rounded);
    // A view with an odd offset (not 16-byte aligned) takes the scalar path.
    if (n > 3) {
      Tensor fv = f.slice0(1, n), bv = be->empty({n - 1}, DType::BF16);
      be->copy(fv, bv);
      CHECK(fetch(*be, bv) == Vec(rounded.begin() + 1, rounded.end()));
      Tensor bf = b2.slice0(1, n), fb = be->empty({n - 1}, DType::F32);  // and bf16 -> f32
      be->copy(bf, fb);
      CHECK(fetch(*be, fb) == Vec(rounded.begin() + 1, rounded.end()));
    }
  }
  // i32 round trip.
  std::vector<int32_t> ids = {0, 5, -3, 1 << 30, 77};
  Tensor t = be->empty({5}, DType::I32);
  be->upload(host_ids(ids), t);
  Tensor h = host_tensor({5}, DType::I32);
  be->download(t, h);
  CHECK(std::vector<int32_t>(h.i32(), h.i32() + 5) == ids);
  // empty() is zero-filled.
  CHECK(fetch(*be, be->empty({3, 5}, DType::BF16)) == Vec(15, 0.0));
  // Host tensors are rejected by ops with a message naming the backend.
  Tensor host = host_tensor({4}, DType::F32);
  CHECK_THROWS_WITH(be->scale(host, 2.f), Catch::Contains("host tensor"));
}

TEST_CASE("cuda: back-to-back uploads through the pinned ring, host buffer reused at once",
          "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  // A slow kernel first, so the copies queue up behind it and the ring wraps (8 slots) while the
  // stream is still busy: a slot refilled before its copy ran would corrupt an earlier upload.
  const int64_t n = 1 << 22;
  Tensor big = be->empty({n}, DType::F32);
  for (int i = 0; i < 20; ++i) be->scale(big, 1.0001f);
  const int kUploads = 40;
  std::vector<Tensor> dst;
  Tensor host = host_tensor({4099}, DType::I32), hf = host_tensor({4099}, DType::F32);
  for (int u = 0; u < kUploads; ++u) {
    // One host buffer, rewritten after every upload: upload must have taken its copy.
    for (int64_t i = 0; i < host.numel(); ++i) host.i32()[i] = int32_t(u * 100003 + i);
    dst.push_back(be->empty({host.numel()}, DType::I32));
    be->upload(host, dst.back());
    for (int64_t i = 0; i < hf.numel(); ++i) hf.f32()[i] = float(u) + 0.25f * float(i % 7);
    dst.push_back(be->empty({hf.numel()}, DType::BF16));  // the f32 -> bf16 staging path
    be->upload(hf, dst.back());
  }
  // Larger than the ring's limit: the synchronous path.
  Tensor large = host_tensor({(int64_t(5) << 20) / 4 + 3}, DType::I32);
  for (int64_t i = 0; i < large.numel(); ++i) large.i32()[i] = int32_t(7 * i + 1);
  Tensor dl = be->empty({large.numel()}, DType::I32);
  be->upload(large, dl);
  for (int u = 0; u < kUploads; ++u) {
    INFO("upload " << u);
    Tensor h = host_tensor({host.numel()}, DType::I32);
    be->download(dst[size_t(2 * u)], h);
    bool ok = true;
    for (int64_t i = 0; i < h.numel(); ++i) ok = ok && h.i32()[i] == int32_t(u * 100003 + i);
    CHECK(ok);
    const Vec b = fetch(*be, dst[size_t(2 * u + 1)]);
    ok = true;
    for (size_t i = 0; i < b.size(); ++i)
      ok = ok && b[i] == double(round_to_bf16(float(u) + 0.25f * float(i % 7)));
    CHECK(ok);
  }
  Tensor hl = host_tensor({large.numel()}, DType::I32);
  be->download(dl, hl);
  CHECK(std::equal(hl.i32(), hl.i32() + hl.numel(), large.i32()));
}

TEST_CASE("cuda: an asynchronous read-back sees the sources as queued, not as later rewritten",
          "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  const int64_t n = 1 << 22;
  Tensor big = be->empty({n}, DType::F32);
  Tensor ti = be->empty({65}, DType::I32), tf = be->empty({33}, DType::F32);
  auto rb = be->make_readback({&ti, &tf});
  for (int round = 0; round < 3; ++round) {
    INFO("round " << round);
    Tensor hi = host_tensor({65}, DType::I32), hf = host_tensor({33}, DType::F32);
    for (int64_t i = 0; i < 65; ++i) hi.i32()[i] = int32_t(1000 * round + i);
    for (int64_t i = 0; i < 33; ++i) hf.f32()[i] = 0.5f * float(round) + float(i);
    be->upload(hi, ti);
    be->upload(hf, tf);
    for (int i = 0; i < 20; ++i) be->scale(big, 1.0001f);  // keep the stream busy
    rb->start();
    // Queued after start(): must not show in this read-back.
    be->upload(host_tensor({65}, DType::I32), ti);
    be->zero(tf);
    rb->wait();
    CHECK(std::equal(hi.i32(), hi.i32() + 65, rb->host(0).i32()));
    CHECK(std::equal(hf.f32(), hf.f32() + 33, rb->host(1).f32()));
    rb->wait();  // a second wait returns at once
  }
  Tensor bad = be->empty({4}, DType::BF16);
  CHECK_THROWS_WITH(be->make_readback({&bad}), Catch::Contains("f32 or i32"));
  // A larger source (8 KiB: past CUEMU_PINNED_MAX=4096 in cuemu_test_cuda_smoke_unpinned, where
  // cudaHostAlloc fails and the read-back goes through pageable memory) reads back the same.
  Tensor hl = host_tensor({2048}, DType::F32);
  for (int64_t i = 0; i < 2048; ++i) hl.f32()[i] = 0.25f * float(i) - 7.f;
  Tensor tl = be->empty({2048}, DType::F32);
  be->upload(hl, tl);
  auto rbl = be->make_readback({&tl});
  rbl->start();
  be->zero(tl);  // queued after start()
  rbl->wait();
  CHECK(std::equal(hl.f32(), hl.f32() + 2048, rbl->host(0).f32()));
}

TEST_CASE("cuda: matmul through cuBLASLt matches a double reference", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  Rng rng(23);
  struct S { int64_t N, in, out; };
  for (S s : {S{1, 1, 1}, S{7, 33, 5}, S{33, 127, 64}, S{127, 7, 33}, S{256, 768, 384}}) {
    INFO("N=" << s.N << " in=" << s.in << " out=" << s.out);
#ifdef MF_HAS_CUDA
    const size_t fallbacks_before = dynamic_cast<CudaBackend&>(*be).cublas().fallback_calls();
#endif
    const Vec x = rand_vec(rng, size_t(s.N * s.in)), W = rand_vec(rng, size_t(s.out * s.in));
    const Vec dy = rand_vec(rng, size_t(s.N * s.out));
    const Vec dx0 = rand_vec(rng, size_t(s.N * s.in)), dW0 = rand_vec(rng, size_t(s.out * s.in), -1, 1, false);
    Tensor tx = dev_of(*be, {s.N, s.in}, DType::BF16, x), tW = dev_of(*be, {s.out, s.in}, DType::BF16, W);
    Tensor tdy = dev_of(*be, {s.N, s.out}, DType::BF16, dy);
    // forward, into bf16 and into f32
    Vec y(size_t(s.N * s.out));
    gemm_ref(false, true, s.N, s.out, s.in, 1.0, x, W, 0.0, y);
    Tensor ty = be->empty({s.N, s.out}, DType::BF16), tyf = be->empty({s.N, s.out}, DType::F32);
    be->matmul_fwd(tx, tW, ty);
    be->matmul_fwd(tx, tW, tyf);
    CHECK(norm_err(fetch(*be, ty), y) < 1e-2);
    CHECK(norm_err(fetch(*be, tyf), y) < 1e-4);
    // backward: dx (+=) dy W, dW (+=) dy^T x into f32
    for (bool acc : {false, true}) {
      Vec dx = dx0, dW = dW0;
      gemm_ref(false, false, s.N, s.in, s.out, 1.0, dy, W, acc ? 1.0 : 0.0, dx);
      gemm_ref(true, false, s.out, s.in, s.N, 1.0, dy, x, 1.0, dW);
      Tensor tdx = dev_of(*be, {s.N, s.in}, DType::BF16, dx0);
      Tensor tdW = dev_of(*be, {s.out, s.in}, DType::F32, dW0);
      be->matmul_bwd(tdy, tx, tW, &tdx, &tdW, acc);
      CHECK(norm_err(fetch(*be, tdx), dx) < 1e-2);
      CHECK(norm_err(fetch(*be, tdW), dW) < 1e-4);
    }
#ifdef MF_HAS_CUDA
    // With 16-byte rows cuBLASLt has algorithms: nothing ran on the slow SIMT fallback.
    if (s.in % 8 == 0 && s.out % 8 == 0)
      CHECK(dynamic_cast<CudaBackend&>(*be).cublas().fallback_calls() == fallbacks_before);
#endif
  }
#ifdef MF_HAS_CUDA
  // The SIMT fallback GEMM (used when cuBLASLt has no algorithm) computes the same thing.
  auto* cb = dynamic_cast<CudaBackend*>(be.get());
  REQUIRE(cb);
  const int64_t N = 33, in = 65, out = 17;
  const Vec x = rand_vec(rng, size_t(N * in)), W = rand_vec(rng, size_t(out * in));
  const Vec dy = rand_vec(rng, size_t(N * out));
  Tensor tx = dev_of(*be, {N, in}, DType::BF16, x), tW = dev_of(*be, {out, in}, DType::BF16, W);
  Tensor tdy = dev_of(*be, {N, out}, DType::BF16, dy);
  Vec y(size_t(N * out)), dW(size_t(out * in), 0.0), dx(size_t(N * in));
  gemm_ref(false, true, N, out, in, 1.0, x, W, 0.0, y);
  gemm_ref(false, false, N, in, out, 1.0, dy, W, 0.0, dx);
  gemm_ref(true, false, out, in, N, 1.0, dy, x, 1.0, dW);
  cb->cublas().set_force_fallback(true);
  Tensor ty = be->empty({N, out}, DType::F32);
  Tensor tdW = be->empty({out, in}, DType::F32);
  const size_t before = cb->cublas().fallback_calls();
  be->matmul_fwd(tx, tW, ty);
  Tensor tdxb = be->empty({N, in}, DType::BF16);
  be->matmul_bwd(tdy, tx, tW, &tdxb, &tdW, false);
  cb->cublas().set_force_fallback(false);
  CHECK(cb->cublas().fallback_calls() == before + 3);
  CHECK(norm_err(fetch(*be, ty), y) < 1e-5);
  CHECK(norm_err(fetch(*be, tdxb), dx) < 1e-2);
  CHECK(norm_err(fetch(*be, tdW), dW) < 1e-5);
#endif
  // Mismatched shapes are rejected with the tensors named.
  Tensor a = be->empty({4, 8}, DType::BF16), w = be->empty({3, 9}, DType::BF16), o = be->empty({4, 3}, DType::BF16);
  CHECK_THROWS_WITH(be->matmul_fwd(a, w, o), Catch::Contains("last dim"));
}

namespace {
// Newton-Schulz in double (the CPU backend's algorithm).
Vec ns_ref(const Vec& U, int64_t r, int64_t c, int steps, double a, double b, double cc) {
  const bool tr = r > c;
  const int64_t m = tr ? c : r, n = tr ? r : c;
  double ss = 0;
  for (double u : U) ss += u * u;
  const double inv = 1.0 / (std::sqrt(ss) + 1e-7);
  Vec X(size_t(m * n)), A(size_t(m * m)), B(size_t(m * m)), Xn(size_t(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) X[i * n + j] = (tr ? U[j * m + i] : U[i * n + j]) * inv;
  for (int it = 0; it < steps; ++it) {
    gemm_ref(false, true, m, m, n, 1.0, X, X, 0.0, A);
    B = A;
    for (auto& v : B) v *= b;
    gemm_ref(false, false, m, m, m, cc, A, A, 1.0, B);
    Xn = X;
    for (auto& v : Xn) v *= a;
    gemm_ref(false, false, m, n, m, 1.0, B, X, 1.0, Xn);
    X.swap(Xn);
  }
  Vec O(size_t(r * c));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) (tr ? O[j * m + i] : O[i * n + j]) = X[i * n + j];
  return O;
}

double frob_rel(const Vec& got, const Vec& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) return std::numeric_limits<double>::infinity();
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}
}  // namespace

TEST_CASE("cuda: muon momentum and Newton-Schulz match a double reference", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  Rng rng(31);
  // momentum (all f32, elementwise: tight tolerance)
  {
    const int64_t n = 1031;
    const Vec g = rand_vec(rng, n, -1, 1, false), M0 = rand_vec(rng, n, -1, 1, false);
    for (bool nest : {false, true}) {
      Tensor tg = dev_of(*be, {n}, DType::F32, g), tM = dev_of(*be, {n}, DType::F32, M0);
      Tensor tU = be->empty({n}, DType::F32);
      be->muon_momentum(tg, tM, tU, 0.95f, nest, 0.5f);
      Vec M(n), U(n);
      for (int64_t i = 0; i < n; ++i) {
        const double gi = g[i] * 0.5;
        M[i] = 0.95 * M0[i] + gi;
        U[i] = nest ? gi + 0.95 * M[i] : M[i];
      }
      CHECK(norm_err(fetch(*be, tM), M) < 1e-6);
      CHECK(norm_err(fetch(*be, tU), U) < 1e-6);
    }
  }
  // NS5 in bf16 with fp32 accumulation: compared by relative Frobenius error.
  const double a = 3.4445, b = -4.7750, c = 2.0315;
  struct S { int64_t r, c; };
  for (S s : {S{1, 1}, S{7, 33}, S{33, 7}, S{64, 64}, S{96, 256}, S{384, 128}}) {
    INFO("U [" << s.r << "," << s.c << "]");
    const Vec U = rand_vec(rng, size_t(s.r * s.c), -1, 1, false);
    const Vec want = ns_ref(U, s.r, s.c, 5, a, b, c);
    Tensor tU = dev_of(*be, {s.r, s.c}, DType::F32, U);
    Tensor tO = be->empty({s.r, s.c}, DType::F32);
    be->newton_schulz(tU, tO, 5, float(a), float(b), float(c));
    const Vec got = fetch(*be, tO);
    CHECK(frob_rel(got, want) < 3e-2);
    // O may alias U.
    be->newton_schulz(tU, tU, 5, float(a), float(b), float(c));
    CHECK(fetch(*be, tU) == got);
    // zero steps: just the normalised (bf16-rounded) input.
    Tensor tU2 = dev_of(*be, {s.r, s.c}, DType::F32, U);
    be->newton_schulz(tU2, tO, 0, float(a), float(b), float(c));
    CHECK(frob_rel(fetch(*be, tO), ns_ref(U, s.r, s.c, 0, a, b, c)) < 5e-3);
  }
  // A stack [k,r,c]: every GEMM of an iteration is one strided-batched cuBLASLt call over the k
  // slices (X X^T reads X with two strides, the last product A and X with different ones); each
  // slice is normalised and orthogonalised on its own.
  for (S s : {S{7, 33}, S{33, 7}, S{96, 256}}) {
    const int64_t k = 3;
    INFO("stack of " << k << " x [" << s.r << "," << s.c << "]");
    Vec U = rand_vec(rng, size_t(k * s.r * s.c), -1, 1, false);
    for (int64_t i = 0; i < s.r * s.c; ++i) U[size_t(2 * s.r * s.c + i)] *= 40.0;  // norms differ
    Tensor tU = dev_of(*be, {k, s.r, s.c}, DType::F32, U);
    Tensor tO = be->empty({k, s.r, s.c}, DType::F32);
    be->newton_schulz(tU, tO, 5, float(a), float(b), float(c));
    const Vec got = fetch(*be, tO);
    for (int64_t j = 0; j < k; ++j) {
      INFO("slice " << j);
      const size_t n = size_t(s.r * s.c), at = size_t(j) * n;
      const Vec Uj(U.begin() + long(at), U.begin() + long(at + n));
      const Vec gj(got.begin() + long(at), got.begin() + long(at + n));
      CHECK(frob_rel(gj, ns_ref(Uj, s.r, s.c, 5, a, b, c)) < 3e-2);
    }
  }
}

TEST_CASE("cuda: adamw matches a double reference; fused bf16 copy", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  Rng rng(47);
  // Offset 1: every tensor one element into its allocation, the kernel's scalar path.
  for (const bool cautious : {false, true})
  for (auto [n, off] : {std::pair<int64_t, int64_t>{1, 0}, {7, 0}, {33, 0}, {1027, 0}, {33, 1}, {1027, 1}}) {
    INFO("n = " << n << ", tensors at element offset " << off << (cautious ? ", cautious" : ""));
    const Vec p0 = rand_vec(rng, n, -1, 1, false), g = rand_vec(rng, n, -1, 1, false);
    const Vec m0 = rand_vec(rng, n, -0.1, 0.1, false), v0 = rand_vec(rng, n, 0.0, 0.01, false);
    AdamWArgs a;
    a.lr = 1e-2f; a.b1 = 0.9f; a.b2 = 0.95f; a.eps = 1e-8f; a.decay = 1e-3f;
    a.bc1 = 1.f - std::pow(0.9f, 3.f); a.bc2 = 1.f - std::pow(0.95f, 3.f); a.grad_scale = 0.7f;
    a.cautious = cautious;  // decay only where p0 and the step agree in sign
    Vec p(n), m(n), v(n);
    for (int64_t i = 0; i < n; ++i) {
      const double gi = g[i] * double(a.grad_scale);
      m[i] = a.b1 * m0[i] + (1 - double(a.b1)) * gi;
      v[i] = a.b2 * v0[i] + (1 - double(a.b2)) * gi * gi;
      const double u = (m[i] / a.bc1) / (std::sqrt(v[i] / a.bc2) + double(a.eps));
      p[i] = p0[i] * (cautious && p0[i] * u < 0 ? 1.0 : 1 - double(a.decay)) - a.lr * u;
    }
    Tensor tp = dev_of(*be, {n}, DType::F32, p0, off), tg = dev_of(*be, {n}, DType::F32, g, off);
    Tensor tm = dev_of(*be, {n}, DType::F32, m0, off), tv = dev_of(*be, {n}, DType::F32, v0, off);
    be->adamw_update(tp, tg, tm, tv, a);
    const Vec gp = fetch(*be, tp);
    CHECK(norm_err(gp, p) < 1e-6);
    CHECK(norm_err(fetch(*be, tm), m) < 1e-6);
    CHECK(norm_err(fetch(*be, tv), v) < 1e-6);
#ifdef MF_HAS_CUDA
    auto* cb = dynamic_cast<CudaBackend*>(be.get());
    REQUIRE(cb);
    Tensor tp2 = dev_of(*be, {n}, DType::F32, p0, off), tm2 = dev_of(*be, {n}, DType::F32, m0, off);
    Tensor tv2 = dev_of(*be, {n}, DType::F32, v0, off);
    Tensor w = be->empty({n + off}, DType::BF16).slice0(off, n + off);
    cb->adamw_update_fused(tp2, tg, tm2, tv2, a, &w);
    const Vec gp2 = fetch(*be, tp2);
    CHECK(gp2 == gp);  // same arithmetic, bitwise
    Vec wr(n);
    for (int64_t i = 0; i < n; ++i) wr[i] = double(round_to_bf16(float(gp2[i])));
    CHECK(fetch(*be, w) == wr);
#endif
  }
}

TEST_CASE("cuda: reductions are exact in double and deterministic", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  Rng rng(53);
  for (int64_t n : {1, 7, 33, 100003}) {
    const Vec x = rand_vec(rng, n, -1, 1, false);
    double ss = 0, s = 0;
    for (double v : x) {
      const double f = double(float(v));
      ss += f * f;
      s += f;
    }
    Tensor t = dev_of(*be, {n}, DType::F32, x);
    const double g1 = be->sum_squares(t), g2 = be->sum_squares(t);
    CHECK(g1 == g2);
    CHECK(std::abs(g1 - ss) <= 1e-12 * ss);
    CHECK(std::abs(be->sum(t) - s) <= 1e-12 * std::max(1.0, std::abs(s)) * double(n));
    // scale and axpy
    Tensor y = dev_of(*be, {n}, DType::F32, x);
    be->axpy(0.5f, t, y);  // y = 1.5 x
    be->scale(y, 2.f);     // y = 3 x
    Vec want(x.size());
    for (size_t i = 0; i < x.size(); ++i) want[i] = 3.0 * double(float(x[i]));
    CHECK(norm_err(fetch(*be, y), want) < 1e-6);
  }
  // sum_squares_each: one sync for many tensors, the same bits as one call per tensor (f32 and
  // bf16, an empty one, sizes across the reduction grid).
  std::vector<Tensor> ts;
  for (int64_t n : {int64_t(5), int64_t(0), int64_t(262147), int64_t(1)})
    for (DType t : {DType::F32, DType::BF16}) ts.push_back(dev_of(*be, {n}, t, rand_vec(rng, n, -2, 2, false)));
  std::vector<const Tensor*> ptrs;
  for (const Tensor& t : ts) ptrs.push_back(&t);
  const std::vector<double> each = be->sum_squares_each(ptrs);
  REQUIRE(each.size() == ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    INFO("tensor " << i << " of " << ts[i].numel());
    CHECK(each[i] == be->sum_squares(ts[i]));
    double want = 0;
    for (double v : fetch(*be, ts[i])) want += v * v;
    CHECK(std::abs(each[i] - want) <= 1e-12 * want);
    if (ts[i].numel() > 0) CHECK(each[i] > 0);
  }
  CHECK(be->sum_squares_each({}).empty());
  // Many tensors in one call (the chunk-to-tensor search), empties first and last, one tensor
  // twice: each result is still its own tensor's.
  {
    std::vector<Tensor> many;
    many.push_back(dev_of(*be, {0}, DType::F32, {}));
    for (int i = 0; i < 150; ++i) {
      const int64_t n = 1 + (int64_t(i) * 7919) % 70000;
      many.push_back(dev_of(*be, {n}, i % 3 ? DType::BF16 : DType::F32, rand_vec(rng, n, -1, 1, false)));
    }
    many.push_back(dev_of(*be, {0}, DType::BF16, {}));
    std::vector<const Tensor*> mp;
    for (const Tensor& t : many) mp.push_back(&t);
    mp.push_back(&many[7]);
    const std::vector<double> got = be->sum_squares_each(mp);
    REQUIRE(got.size() == mp.size());
    for (size_t i = 0; i < mp.size(); ++i) {
      INFO("tensor " << i << " of " << mp[i]->numel());
      CHECK(got[i] == be->sum_squares(*mp[i]));
    }
    CHECK(got.front() == 0.0);
    CHECK(got.back() == got[7]);
  }
}

namespace {
// Causal GQA attention in double: out, lse; and the gradients.
struct AttnRef {
  int B, T, H, Hkv, hd;
  double scale;
  size_t qa(int b, int t, int h) const { return size_t(((int64_t(b) * T + t) * H + h) * hd); }
  size_t ka(int b, int t, int g) const { return size_t(((int64_t(b) * T + t) * Hkv + g) * hd); }
  size_t ra(int b, int h, int t) const { return size_t((int64_t(b) * H + h) * T + t); }
  double dot(const Vec& a, size_t i, const Vec& b, size_t j) const {
    double s = 0;
    for (int c = 0; c < hd; ++c) s += a[i + c] * b[j + c];
    return s;
  }
  void fwd(const Vec& q, const Vec& k, const Vec& v, Vec& out, Vec& lse) const {
    const int G = H / Hkv;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int t = 0; t < T; ++t) {
          std::vector<double> s(size_t(t + 1));
          double mx = -1e300;
          for (int j = 0; j <= t; ++j) {
            s[j] = scale * dot(q, qa(b, t, h), k, ka(b, j, h / G));
            mx = std::max(mx, s[j]);
          }
          double l = 0;
          for (int j = 0; j <= t; ++j) l += std::exp(s[j] - mx);
          for (int c = 0; c < hd; ++c) {
            double acc = 0;
            for (int j = 0; j <= t; ++j) acc += std::exp(s[j] - mx) / l * v[ka(b, j, h / G) + c];
            out[qa(b, t, h) + c] = acc;
          }
          lse[ra(b, h, t)] = mx + std::log(l);
        }
  }
  void bwd(const Vec& dout, const Vec& q, const Vec& k, const Vec& v, const Vec& out,
           const Vec& lse, Vec& dq, Vec& dk, Vec& dv) const {
    const int G = H / Hkv;
    std::fill(dq.begin(), dq.end(), 0.0);
    std::fill(dk.begin(), dk.end(), 0.0);
    std::fill(dv.begin(), dv.end(), 0.0);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int t = 0; t < T; ++t) {
          const double D = dot(dout, qa(b, t, h), out, qa(b, t, h));
          for (int j = 0; j <= t; ++j) {
            const size_t kj = ka(b, j, h / G);
            const double p = std::exp(scale * dot(q, qa(b, t, h), k, kj) - lse[ra(b, h, t)]);
            const double ds = p * (dot(dout, qa(b, t, h), v, kj) - D);
            for (int c = 0; c < hd; ++c) {
              dq[qa(b, t, h) + c] += scale * ds * k[kj + c];
              dk[kj + c] += scale * ds * q[qa(b, t, h) + c];
              dv[kj + c] += p * dout[qa(b, t, h) + c];
            }
          }
        }
  }
};
}  // namespace

TEST_CASE("cuda: flash attention (tensor-core and fallback paths) matches a double reference",
          "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  Rng rng(61);
  struct S { int B, T, H, Hkv, hd; };
  // hd 64/128 take the mma.sync kernels; 48 and 16 the SIMT fallback. T crosses tile edges.
  // The last three: several 64-row tiles with a partial last one, GQA groups of 4, B > 1
  // (hd 128's dk/dv kernel steps 32 queries at a time, so T = 200 / 520 end mid-step too).
  for (S s : {S{1, 1, 1, 1, 64}, S{2, 7, 4, 2, 64}, S{1, 65, 2, 1, 64}, S{1, 130, 4, 4, 128},
              S{2, 33, 6, 2, 128}, S{1, 127, 3, 1, 48}, S{2, 9, 2, 2, 16},
              S{2, 200, 8, 2, 128}, S{3, 257, 4, 1, 64}, S{1, 520, 2, 1, 128}}) {
    INFO("B=" << s.B << " T=" << s.T << " H=" << s.H << " Hkv=" << s.Hkv << " hd=" << s.hd);
    AttnRef r{s.B, s.T, s.H, s.Hkv, s.hd, 1.0 / std::sqrt(double(s.hd))};
    const size_t nq = size_t(s.B) * s.T * s.H * s.hd, nk = size_t(s.B) * s.T * s.Hkv * s.hd;
    const Vec q = rand_vec(rng, nq), k = rand_vec(rng, nk), v = rand_vec(rng, nk);
    const Vec dout = rand_vec(rng, nq);
    Vec out(nq), lse(size_t(s.B) * s.H * s.T), dq(nq), dk(nk), dv(nk);
    r.fwd(q, k, v, out, lse);
    const Shape qs{s.B, s.T, s.H, s.hd}, ks{s.B, s.T, s.Hkv, s.hd};
    Tensor tq = dev_of(*be, qs, DType::BF16, q), tk = dev_of(*be, ks, DType::BF16, k);
    Tensor tv = dev_of(*be, ks, DType::BF16, v), tdo = dev_of(*be, qs, DType::BF16, dout);
    Tensor to = be->empty(qs, DType::BF16), tl = be->empty({s.B, s.H, s.T}, DType::F32);
    AttnShape as{s.B, s.T, s.H, s.Hkv, s.hd, float(r.scale)};
    be->attention_fwd(tq, tk, tv, to, tl, as);
    const Vec got_out = fetch(*be, to);
    CHECK(norm_err(got_out, out) < 2e-2);
    CHECK(norm_err(fetch(*be, tl), lse) < 1e-3);
    // Backward from the GPU's own (bf16) out and lse, as training does.
    const Vec got_lse = fetch(*be, tl);
    r.bwd(dout, q, k, v, got_out, got_lse, dq, dk, dv);
    Tensor tdq = be->empty(qs, DType::BF16), tdk = be->empty(ks, DType::BF16), tdv = be->empty(ks, DType::BF16);
    be->attention_bwd(tdo, tq, tk, tv, to, tl, tdq, tdk, tdv, as);
    const Vec gdq = fetch(*be, tdq), gdk = fetch(*be, tdk), gdv = fetch(*be, tdv);
    CHECK(norm_err(gdq, dq) < 4e-2);
    CHECK(norm_err(gdk, dk) < 4e-2);
    CHECK(norm_err(gdv, dv) < 4e-2);
    // Deterministic: a second backward is bitwise equal.
    be->attention_bwd(tdo, tq, tk, tv, to, tl, tdq, tdk, tdv, as);
    CHECK(fetch(*be, tdq) == gdq);
    CHECK(fetch(*be, tdk) == gdk);
    CHECK(fetch(*be, tdv) == gdv);
  }
}

TEST_CASE("cuda: fused lm-head cross-entropy matches a double reference", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  Rng rng(71);
  struct S { int64_t N, d, V; };
  // The last case has GPT-2's odd vocabulary (50257: padded scratch row pitch). Each case runs
  // with three chunk sizes (train.loss_chunk_mb): 16 MiB holds 55 rows at V = 50257, fewer than
  // the 64-row rounding, so 17 chunks, the last of 20 rows; 256 MiB holds 832 (a second chunk
  // starts at row 832); the default 1 GiB holds all 900. The scratch buffer (grow-only, by at
  // least half when it grows) shows that the size was obeyed: right after each full call at
  // V = 50257 it holds at most the chunk size for 16 and 256 MiB (the gradient call needs more
  // than the loss-only call before it), and N x V x 6 bytes or more for 1 GiB (one chunk).
  auto scratch = [&] { return dynamic_cast<CudaBackend&>(*be).scratch_bytes(); };
  for (S s : {S{1, 8, 1}, S{7, 33, 127}, S{65, 64, 1000}, S{900, 8, 50257}}) {
    INFO("N=" << s.N << " d=" << s.d << " V=" << s.V);
    const Vec x = rand_vec(rng, size_t(s.N * s.d)), W = rand_vec(rng, size_t(s.V * s.d));
    std::vector<int32_t> tg(size_t(s.N));
    for (auto& t : tg) t = int32_t(rng.below(uint64_t(s.V)));
    const double ls = 0.5, lsc = 1.0 / double(s.N);
    Vec z(size_t(s.N * s.V));
    gemm_ref(false, true, s.N, s.V, s.d, ls, x, W, 0.0, z);
    Vec loss(size_t(s.N)), dl(z.size());
    for (int64_t n = 0; n < s.N; ++n) {
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < s.V; ++j) mx = std::max(mx, z[n * s.V + j]);
      for (int64_t j = 0; j < s.V; ++j) sum += std::exp(z[n * s.V + j] - mx);
      const double lse = mx + std::log(sum);
      loss[n] = lse - z[n * s.V + tg[n]];
      for (int64_t j = 0; j < s.V; ++j)
        dl[n * s.V + j] = lsc * ls * (std::exp(z[n * s.V + j] - lse) - (j == tg[n] ? 1.0 : 0.0));
    }
    Vec dx(size_t(s.N * s.d)), dW0 = rand_vec(rng, size_t(s.V * s.d), -1, 1, false), dW = dW0;
    gemm_ref(false, false, s.N, s.d, s.V, 1.0, dl, W, 0.0, dx);
    gemm_ref(true, false, s.V, s.d, s.N, 1.0, dl, x, 1.0, dW);
    Tensor tx = dev_of(*be, {s.N, s.d}, DType::BF16, x), tW = dev_of(*be, {s.V, s.d}, DType::BF16, W);
    Tensor tt = be->empty({s.N}, DType::I32);
    be->upload(host_ids(tg), tt);
    for (double mb : {16.0, 256.0, 1024.0}) {
      INFO("train.loss_chunk_mb " << mb);
      be->set_loss_chunk_mb(mb);
      Tensor tl = be->empty({s.N}, DType::F32), tdx = be->empty({s.N, s.d}, DType::BF16);
      Tensor tdW = dev_of(*be, {s.V, s.d}, DType::F32, dW0);
      be->lmhead_xent(tx, tW, tt, float(ls), tl, &tdx, &tdW, float(lsc));
      if (s.V == 50257 && mb < 1024) CHECK(scratch() <= size_t(mb) << 20);
      if (s.V == 50257 && mb == 1024) CHECK(scratch() >= size_t(s.N * s.V * 6));
      CHECK(norm_err(fetch(*be, tl), loss) < 1e-4);
      CHECK(norm_err(fetch(*be, tdx), dx) < 3e-2);
      CHECK(norm_err(fetch(*be, tdW), dW) < 3e-2);
      // Loss only. Without gradient scratch a chunk holds more rows (at V = 50257 and 256 MiB
      // all 900 rows in one GEMM instead of 832 + 68), and cuBLASLt may pick another algorithm
      // for another M, so the logits can differ in the last bits: equal to fp32 rounding, not
      // bitwise.
      Tensor tl2 = be->empty({s.N}, DType::F32);
      be->lmhead_xent(tx, tW, tt, float(ls), tl2, nullptr, nullptr, 1.f);
      CHECK(norm_err(fetch(*be, tl2), fetch(*be, tl)) < 1e-6);
    }
  }
}

TEST_CASE("cuda: Scratch grows by at least half, keeps its buffer, and release frees it",
          "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
#ifdef MF_HAS_CUDA
  auto be = make_backend("cuda");  // selects the device
  cuda::Scratch s(nullptr);
  CHECK(s.capacity() == 0);
  void* p = s.get(1000);
  REQUIRE(p != nullptr);
  CHECK(s.capacity() == 1000);
  CHECK(s.get(600) == p);  // fits: the same buffer
  s.get(1200);
  CHECK(s.capacity() == 1500);  // max(1200, 1000 * 1.5)
  s.release();
  CHECK(s.capacity() == 0);
  s.release();  // twice is harmless
  CHECK(s.get(64) != nullptr);
  CHECK(s.capacity() == 64);
  // More than the device has: an error naming the size and what to lower; the old buffer is gone.
  try {
    s.get(size_t(200) << 30);
    FAIL_CHECK("a 200 GiB workspace was granted");
  } catch (const std::exception& e) {
    const std::string why = e.what();
    INFO(why);
    CHECK(why.find("out of GPU memory for the ops' workspace: 214748364800 bytes (204800 MiB) wanted") !=
          std::string::npos);
    CHECK(why.find("reduce train.loss_chunk_mb") != std::string::npos);
  }
  CHECK(s.capacity() == 0);
  CHECK(s.get(64) != nullptr);
#endif
}

TEST_CASE("cuda: an error a faulting kernel leaves says so, and how to find the kernel", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
#ifdef MF_HAS_CUDA
  auto message = [](cudaError_t e) {
    try {
      cuda::detail::cuda_fail(e, "cudaStreamSynchronize(s)", __FILE__, __LINE__);
    } catch (const std::exception& x) {
      return std::string(x.what());
    }
    return std::string();
  };
  const std::string fault = message(cudaErrorIllegalAddress), other = message(cudaErrorInvalidValue);
  INFO(fault);
  CHECK(fault.find("cudaErrorIllegalAddress") != std::string::npos);
  CHECK(fault.find("a kernel queued earlier faulted") != std::string::npos);
  CHECK(fault.find("CUDA_LAUNCH_BLOCKING=1") != std::string::npos);
  CHECK(other.find("cudaStreamSynchronize(s)") != std::string::npos);
  CHECK(other.find("faulted") == std::string::npos);
#endif
}

TEST_CASE("cuda: embedding backward is deterministic and in token order", "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto be = make_backend("cuda");
  Rng rng(83);
  const int64_t V = 37;
  // Heavy repetition (~27 to ~135 uses per row). The backward sorts the tokens in chunks of 1024
  // (kernels/sort.cuh): 1000 is one chunk, 1500, 2500 and 5000 need 1, 2 and 3 merge passes. A
  // few tokens outside [0,V) must be skipped, and so must the last row, which no token uses.
  // d = 64 takes the 16-byte path (8 columns per lane), d = 33 the scalar one.
  for (const auto [N, d] : {std::pair<int64_t, int64_t>{1000, 33}, {1500, 64}, {2500, 33}, {5000, 64}}) {
    INFO("N = " << N << ", d = " << d);
    std::vector<int32_t> tok(static_cast<size_t>(N));
    for (auto& t : tok) t = int32_t(rng.below(V - 1));
    tok[size_t(N / 3)] = -1;
    tok[size_t(N / 2)] = int32_t(V);
    const Vec dout = rand_vec(rng, size_t(N * d)), dw0 = rand_vec(rng, size_t(V * d), -1, 1, false);
    // f32 accumulation in increasing n, exactly what the kernel does: bitwise equal.
    std::vector<float> want(dw0.begin(), dw0.end());
    for (int64_t n = 0; n < N; ++n)
      if (tok[size_t(n)] >= 0 && tok[size_t(n)] < V)
        for (int64_t c = 0; c < d; ++c) want[size_t(tok[size_t(n)] * d + c)] += float(dout[size_t(n * d + c)]);
    Tensor tt = be->empty({N}, DType::I32);
    be->upload(host_ids(tok), tt);
    Tensor tdo = dev_of(*be, {N, d}, DType::BF16, dout), tdw = dev_of(*be, {V, d}, DType::F32, dw0);
    be->embedding_bwd(tt, tdo, tdw);
    const Vec got = fetch(*be, tdw);
    CHECK(got == Vec(want.begin(), want.end()));
  }
  const int64_t N = 1000, d = 33;
  std::vector<int32_t> tok(static_cast<size_t>(N));
  for (auto& t : tok) t = int32_t(rng.below(V));
  Tensor tt = be->empty({N}, DType::I32);
  be->upload(host_ids(tok), tt);
  // forward gathers exactly
  Tensor wte = dev_of(*be, {V, d}, DType::BF16, rand_vec(rng, size_t(V * d)));
  Tensor out = be->empty({N, d}, DType::BF16);
  be->embedding_fwd(tt, wte, out);
  const Vec w = fetch(*be, wte), o = fetch(*be, out);
  bool same = true;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < d; ++c) same = same && o[size_t(n * d + c)] == w[size_t(tok[n] * d + c)];
  CHECK(same);
}

// The ops whose entries take the activation and the weight in either float dtype (embedding,
// fused residual + RMSNorm forward and backward, axpy): every mixed pairing, on aligned tensors
// (the 16-byte vector path) and on views one element into their allocations (the scalar path),
// against CpuBackend in f32 on the same bf16-representable values. Training passes equal dtypes
// only, so these instantiations run nowhere else. An output stored in bf16 carries one bf16
// rounding (tolerance 1e-2 of its largest value); an f32 output only the summation order (1e-5).
TEST_CASE("cuda: mixed-dtype ops (bf16 with f32 weights and the reverse) match the CPU in f32",
          "[gpu][cuda]") {
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  auto cpu = make_backend("cpu");
  Rng rng(97);
  const int64_t N = 37, V = 29, d = 64;
  auto tol = [](DType t) { return t == DType::BF16 ? 1e-2 : 1e-5; };
  std::vector<int32_t> tok(N);
  for (auto& t : tok) t = int32_t(rng.below(V));
  Tensor ids_g = gpu->empty({N}, DType::I32), ids_c = cpu->empty({N}, DType::I32);
  gpu->upload(host_ids(tok), ids_g);
  cpu->upload(host_ids(tok), ids_c);
  const Vec wte = rand_vec(rng, size_t(V * d)), x = rand_vec(rng, size_t(N * d)),
            br = rand_vec(rng, size_t(N * d)), w = rand_vec(rng, size_t(d), 0.5, 1.5),
            dy = rand_vec(rng, size_t(N * d)), dx0 = rand_vec(rng, size_t(N * d)),
            dw0 = rand_vec(rng, size_t(d), -1, 1, false);
  const std::pair<DType, DType> mixed[] = {{DType::BF16, DType::F32}, {DType::F32, DType::BF16}};
  for (const int64_t off : {int64_t(0), int64_t(1)}) {
    for (auto [act, wt] : mixed) {
      INFO("activations " << dtype_name(act) << ", weights " << dtype_name(wt) << ", offset " << off);
      auto on_gpu = [&](const Shape& s, DType t, const Vec& v) { return dev_of(*gpu, s, t, v, off); };
      auto on_cpu = [&](const Shape& s, const Vec& v) { return dev_of(*cpu, s, DType::F32, v); };
      // embedding: table in `wt`, output in `act`
      {
        Tensor tw = on_gpu({V, d}, wt, wte), to = on_gpu({N, d}, act, x);
        gpu->embedding_fwd(ids_g, tw, to);
        Tensor cw = on_cpu({V, d}, wte), co = on_cpu({N, d}, x);
        cpu->embedding_fwd(ids_c, cw, co);
        CHECK(norm_err(fetch(*gpu, to), fetch(*cpu, co)) == 0.0);  // a gather of representable values
      }
      // fused residual add + RMSNorm forward, weight in `wt`
      {
        Tensor gx = on_gpu({N, d}, act, x), gb = on_gpu({N, d}, act, br), gr = on_gpu({N, d}, act, dx0),
               gw = on_gpu({d}, wt, w), gy = on_gpu({N, d}, act, dy), gs = on_gpu({N}, DType::F32, Vec(N, 7.0));
        gpu->add_rmsnorm_fwd(gx, &gb, gr, gw, 1e-5f, gy, gs);
        Tensor cx = on_cpu({N, d}, x), cb = on_cpu({N, d}, br), cr = on_cpu({N, d}, dx0),
               cw = on_cpu({d}, w), cy = on_cpu({N, d}, dy), cs = on_cpu({N}, Vec(N, 7.0));
        cpu->add_rmsnorm_fwd(cx, &cb, cr, cw, 1e-5f, cy, cs);
        CHECK(norm_err(fetch(*gpu, gr), fetch(*cpu, cr)) <= tol(act));
        // the residual sum is rounded to `act` before the norm reads it: bf16 twice at most
        CHECK(norm_err(fetch(*gpu, gy), fetch(*cpu, cy)) <= 2 * tol(act));
        CHECK(norm_err(fetch(*gpu, gs), fetch(*cpu, cs)) <= tol(act));
      }
      // RMSNorm backward (dx and dw accumulate), weight in `wt`; rstd from the CPU forward
      {
        Tensor cx = on_cpu({N, d}, x), cw = on_cpu({d}, w), cy = on_cpu({N, d}, Vec(size_t(N * d), 0.0)),
               cs = on_cpu({N}, Vec(N, 0.0));
        cpu->add_rmsnorm_fwd(cx, nullptr, cx, cw, 1e-5f, cy, cs);
        const Vec rstd = fetch(*cpu, cs);
        Tensor gdy = on_gpu({N, d}, act, dy), gx = on_gpu({N, d}, act, x), gw = on_gpu({d}, wt, w),
               gs = on_gpu({N}, DType::F32, rstd), gdx = on_gpu({N, d}, act, dx0),
               gdw = on_gpu({d}, DType::F32, dw0);
        gpu->rmsnorm_bwd(gdy, gx, gw, gs, gdx, gdw);
        Tensor cdy = on_cpu({N, d}, dy), cdx = on_cpu({N, d}, dx0), cdw = on_cpu({d}, dw0);
        cpu->rmsnorm_bwd(cdy, cx, cw, cs, cdx, cdw);
        CHECK(norm_err(fetch(*gpu, gdx), fetch(*cpu, cdx)) <= tol(act));
        CHECK(norm_err(fetch(*gpu, gdw), fetch(*cpu, cdw)) <= 1e-5);
      }
      // axpy: x in `wt`, y in `act` (both pairings over the loop)
      {
        Tensor gx = on_gpu({N, d}, wt, x), gy = on_gpu({N, d}, act, dy);
        gpu->axpy(-0.75f, gx, gy);
        Tensor cx = on_cpu({N, d}, x), cy = on_cpu({N, d}, dy);
        cpu->axpy(-0.75f, cx, cy);
        CHECK(norm_err(fetch(*gpu, gy), fetch(*cpu, cy)) <= tol(act));
      }
    }
  }
}

TEST_CASE("cuda and cpu backends reject bad arguments with the same message", "[gpu]") {
  // Both backends' entries check their arguments with the op's contract (op_contract.h): for
  // f32 tensors of the same shapes the two must fail with the same text.
  MF_SKIP_WITHOUT_GPU();
  auto gpu = make_backend("cuda");
  auto cpu = make_backend("cpu");
  using Call = std::function<void(Backend&)>;
  const std::vector<std::pair<const char*, Call>> calls = {
      {"matmul_fwd", [](Backend& b) {
         Tensor x = b.empty({7, 33}, DType::F32), W = b.empty({5, 32}, DType::F32),
                y = b.empty({7, 5}, DType::F32);
         b.matmul_fwd(x, W, y);
       }},
      {"matmul_bwd", [](Backend& b) {
         Tensor dy = b.empty({7, 5}, DType::F32), x = b.empty({7, 32}, DType::F32),
                W = b.empty({5, 32}, DType::F32), dx = b.empty({6, 32}, DType::F32);
         b.matmul_bwd(dy, x, W, &dx, nullptr, false);
       }},
      {"add_rmsnorm_fwd", [](Backend& b) {
         Tensor x = b.empty({4, 16}, DType::F32), w = b.empty({16}, DType::F32),
                y = b.empty({4, 16}, DType::F32), o = b.empty({4, 16}, DType::F32),
                rstd = b.empty({5}, DType::F32);
         b.add_rmsnorm_fwd(x, nullptr, o, w, 1e-5f, y, rstd);
       }},
      {"rmsnorm_bwd", [](Backend& b) {
         Tensor x = b.empty({4, 16}, DType::F32), w = b.empty({16}, DType::F32),
                dy = b.empty({4, 15}, DType::F32), dx = b.empty({4, 16}, DType::F32),
                rstd = b.empty({4}, DType::F32), dw = b.empty({16}, DType::F32);
         b.rmsnorm_bwd(dy, x, w, rstd, dx, dw);
       }},
      {"embedding_fwd", [](Backend& b) {
         Tensor t = b.empty({6}, DType::I32), wte = b.empty({10, 8}, DType::F32),
                out = b.empty({6, 9}, DType::F32);
         b.embedding_fwd(t, wte, out);
       }},
      {"rope_fwd", [](Backend& b) {
         Tensor x = b.empty({1, 2, 2, 5}, DType::F32);
         b.rope_fwd(x, x, 1e4f);
       }},
      {"qkv_rope_split", [](Backend& b) {
         Tensor p = b.empty({1, 2, 5, 4}, DType::F32), q = b.empty({1, 2, 4, 4}, DType::F32),
                k = b.empty({1, 2, 1, 4}, DType::F32), v = b.empty({1, 2, 1, 4}, DType::F32);
         b.qkv_rope_split(p, q, k, v, 1e4f);
       }},
      {"swiglu_packed_bwd", [](Backend& b) {
         Tensor dh = b.empty({5, 7}, DType::F32), gu = b.empty({5, 16}, DType::F32),
                dgu = b.empty({5, 16}, DType::F32);
         b.swiglu_packed_bwd(dh, gu, dgu);
       }},
      {"swiglu_bwd", [](Backend& b) {
         Tensor g = b.empty({5, 8}, DType::F32), u = b.empty({5, 8}, DType::F32),
                dh = b.empty({5, 8}, DType::F32), dg = b.empty({5, 8}, DType::F32),
                du = b.empty({4, 8}, DType::F32);
         b.swiglu_bwd(dh, g, u, dg, du);
       }},
      {"lmhead_xent", [](Backend& b) {
         Tensor x = b.empty({6, 8}, DType::F32), W = b.empty({11, 8}, DType::F32),
                t = b.empty({5}, DType::I32), l = b.empty({6}, DType::F32);
         b.lmhead_xent(x, W, t, 1.f, l, nullptr, nullptr, 1.f);
       }},
      {"attention_fwd", [](Backend& b) {
         AttnShape s{1, 4, 3, 2, 8, 0.35f};
         Tensor q = b.empty({1, 4, 3, 8}, DType::F32), k = b.empty({1, 4, 2, 8}, DType::F32),
                o = b.empty({1, 4, 3, 8}, DType::F32), lse = b.empty({12}, DType::F32);
         b.attention_fwd(q, k, k, o, lse, s);
       }},
      {"attention_bwd", [](Backend& b) {
         AttnShape s{1, 4, 2, 1, 8, 0.35f};
         Tensor q = b.empty({1, 4, 2, 8}, DType::F32), k = b.empty({1, 4, 1, 8}, DType::F32),
                lse = b.empty({8}, DType::F32), dk = b.empty({1, 4, 2, 8}, DType::F32);
         b.attention_bwd(q, q, k, k, q, lse, q, dk, k, s);
       }},
      {"moe_router_fwd", [](Backend& b) {
         MoeRouterArgs a;
         a.E = 4;
         a.k = 2;
         Tensor x = b.empty({6, 8}, DType::F32), Wr = b.empty({4, 8}, DType::F32),
                p = b.empty({6, 4}, DType::F32), i = b.empty({6, 2}, DType::I32),
                w = b.empty({6, 3}, DType::F32), c = b.empty({4}, DType::I32),
                ss = b.empty({4}, DType::F32);
         b.moe_router_fwd(x, Wr, nullptr, a, p, i, w, c, ss);
       }},
      {"moe_combine_bwd", [](Backend& b) {
         Tensor dout = b.empty({3, 8}, DType::F32), yg = b.empty({6, 8}, DType::F32),
                w = b.empty({3, 2}, DType::F32), r = b.empty({3, 2}, DType::I32),
                dyg = b.empty({6, 8}, DType::F32), dw = b.empty({2, 3}, DType::F32);
         b.moe_combine_bwd(dout, yg, w, r, dyg, dw);
       }},
      {"moe_expert_fwd", [](Backend& b) {  // f32: CUDA's per-expert fallback, same contract
         Tensor x = b.empty({6, 8}, DType::F32), w0 = b.empty({4, 8}, DType::F32),
                w1 = b.empty({4, 7}, DType::F32), off = b.empty({3}, DType::I32),
                y = b.empty({6, 4}, DType::F32);
         b.moe_expert_fwd(x, {&w0, &w1}, off, y);
       }},
      {"moe_expert_bwd", [](Backend& b) {
         Tensor dy = b.empty({6, 4}, DType::F32), x = b.empty({6, 8}, DType::F32),
                w0 = b.empty({4, 8}, DType::F32), off = b.empty({3}, DType::I32),
                g0 = b.empty({4, 8}, DType::F32);
         std::vector<Tensor*> dW = {&g0};
         b.moe_expert_bwd(dy, x, {&w0, &w0}, off, nullptr, &dW, false);
       }},
      {"adamw_update", [](Backend& b) {
         Tensor p = b.empty({3, 4}, DType::F32), g = b.empty({3, 4}, DType::F32),
                m = b.empty({3, 4}, DType::F32), v = b.empty({4, 3}, DType::F32);
         b.adamw_update(p, g, m, v, AdamWArgs{});
       }},
      {"newton_schulz", [](Backend& b) {
         Tensor u = b.empty({3, 4, 5}, DType::F32), o = b.empty({3, 5, 4}, DType::F32);
         b.newton_schulz(u, o, 5, 3.4445f, -4.775f, 2.0315f);
       }},
      {"gemm", [](Backend& b) {
         Tensor A = b.empty({4, 3}, DType::F32), B = b.empty({4, 5}, DType::F32),
                C = b.empty({4, 5}, DType::F32);
         b.gemm(A, false, B, false, C, 1.f, 0.f);
       }},
      {"sym_eig", [](Backend& b) {
         Tensor S = b.empty({3, 4}, DType::F32), Q = b.empty({3, 4}, DType::F32);
         b.sym_eig(S, Q);
       }},
      {"normuon_normalize", [](Backend& b) {
         Tensor O = b.empty({3, 4}, DType::F32), v = b.empty({4}, DType::F32);
         b.normuon_normalize(O, v, 0.95f, 1e-8f);
       }},
  };
  auto message = [](Backend& b, const Call& call) -> std::string {
    try {
      call(b);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  for (const auto& [op, call] : calls) {
    INFO(op);
    const std::string on_cpu = message(*cpu, call), on_gpu = message(*gpu, call);
    CHECK(on_cpu.find(op) != std::string::npos);
    CHECK(on_gpu == on_cpu);
  }
}
