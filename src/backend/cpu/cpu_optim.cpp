// CpuBackend: optimizer primitives (fp32 reference). AdamW and the Muon momentum are elementwise
// OpenMP loops; Newton-Schulz runs its three matmuls per iteration through OpenBLAS sgemm.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_ops.h"

namespace mf {

namespace {

void check_same_f32(const char* op, const char* what, const Tensor& ref, const Tensor& t) {
  MF_CHECK(t.dtype == DType::F32, op, ": ", what, " is ", dtype_name(t.dtype), ", expected f32");
  MF_CHECK(t.shape == ref.shape, op, ": ", what, " has shape ", shape_str(t.shape),
           ", expected ", shape_str(ref.shape));
}

}  // namespace

void CpuBackend::adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                              const AdamWArgs& a) {
  MF_CHECK(p.dtype == DType::F32, "adamw_update: param is ", dtype_name(p.dtype), ", expected f32");
  check_same_f32("adamw_update", "grad", p, g);
  check_same_f32("adamw_update", "exp_avg", p, m);
  check_same_f32("adamw_update", "exp_avg_sq", p, v);
  float* pp = p.f32();
  const float* gp = g.f32();
  float* mp = m.f32();
  float* vp = v.f32();
  const int64_t n = p.numel();
  const float keep = 1.0f - a.decay;
  const float inv_bc1 = 1.0f / a.bc1;
  const float inv_bc2 = 1.0f / a.bc2;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = gp[i] * a.grad_scale;
    const float mi = a.b1 * mp[i] + (1.0f - a.b1) * gi;
    const float vi = a.b2 * vp[i] + (1.0f - a.b2) * gi * gi;
    mp[i] = mi;
    vp[i] = vi;
    const float mhat = mi * inv_bc1;
    const float vhat = vi * inv_bc2;
    const float k = a.cautious && pp[i] * mhat < 0.0f ? 1.0f : keep;
    pp[i] = pp[i] * k - a.lr * mhat / (std::sqrt(vhat) + a.eps);
  }
}

void CpuBackend::muon_momentum(const Tensor& g, Tensor& M, Tensor& U, float mu, bool nesterov,
                               float grad_scale) {
  MF_CHECK(g.dtype == DType::F32, "muon_momentum: grad is ", dtype_name(g.dtype), ", expected f32");
  check_same_f32("muon_momentum", "momentum_buffer", g, M);
  check_same_f32("muon_momentum", "output U", g, U);
  const float* gp = g.f32();
  float* mp = M.f32();
  float* up = U.f32();
  const int64_t n = g.numel();
  // Each element is read before it is written, so U may alias g.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = gp[i] * grad_scale;
    const float mi = mu * mp[i] + gi;
    mp[i] = mi;
    up[i] = nesterov ? gi + mu * mi : mi;
  }
}

void CpuBackend::newton_schulz(const Tensor& U, Tensor& O, int steps, float a, float b,
                               float c) {
  MF_CHECK(U.ndim() == 2 || U.ndim() == 3,
           "newton_schulz: input must be a matrix [r,c] or a stack [k,r,c], got shape ",
           shape_str(U.shape));
  MF_CHECK(U.dtype == DType::F32, "newton_schulz: input is ", dtype_name(U.dtype),
           ", expected f32");
  check_same_f32("newton_schulz", "output", U, O);
  MF_CHECK(steps >= 0, "newton_schulz: steps must be >= 0, got ", steps);
  if (U.ndim() == 3) {
    // A stack: each slice on its own with exactly the per-matrix code below (bitwise equal to
    // one call per slice; the slices of O alias those of U when O aliases U).
    const Shape ms{U.dim(1), U.dim(2)};
    // One slice per thread (its GEMMs and loops then run on that thread: nested regions are
    // inactive); each slice's arithmetic is the same whichever thread runs it.
#pragma omp parallel for schedule(dynamic) if (U.dim(0) > 1)
    for (int64_t x = 0; x < U.dim(0); ++x) {
      Tensor o = O.slice0(x, x + 1).view(ms);
      newton_schulz(U.slice0(x, x + 1).view(ms), o, steps, a, b, c);
    }
    return;
  }
  const int64_t r = U.dim(0), cols = U.dim(1);
  if (r == 0 || cols == 0) return;
  // Work on X [m, n] with m <= n so that A = X X^T is the small Gram matrix.
  const bool transposed = r > cols;
  const int64_t m = transposed ? cols : r;
  const int64_t n = transposed ? r : cols;

  const double norm = std::sqrt(ref::ordered_sum_squares(U.f32(), U.numel()));
  const float inv = float(1.0 / (norm + 1e-7));
  std::vector<float> X(size_t(m * n)), Xn(size_t(m * n)), A(size_t(m * m)), B(size_t(m * m));
  const float* up = U.f32();
  if (transposed) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) X[size_t(i * n + j)] = up[j * m + i] * inv;
  } else {
    const int64_t total = m * n;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < total; ++i) X[size_t(i)] = up[i] * inv;
  }

  const int M = int(m), N = int(n);
  for (int it = 0; it < steps; ++it) {
    // A (=) X X^T   [m,m]
    ref::gemm<float>(false, true, M, M, N, 1.0f, X.data(), N, X.data(), N, 0.0f, A.data(), M);
    // B (=) b A + c A A   [m,m]
    for (size_t i = 0; i < B.size(); ++i) B[i] = b * A[i];
    ref::gemm<float>(false, false, M, M, M, c, A.data(), M, A.data(), M, 1.0f, B.data(), M);
    // Xn (=) a X + B X   [m,n]
    for (size_t i = 0; i < Xn.size(); ++i) Xn[i] = a * X[i];
    ref::gemm<float>(false, false, M, N, M, 1.0f, B.data(), M, X.data(), N, 1.0f, Xn.data(), N);
    X.swap(Xn);
  }

  float* op = O.f32();  // U was fully consumed into X above, so O may alias U
  if (transposed) {
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) op[j * m + i] = X[size_t(i * n + j)];
  } else {
    std::memcpy(op, X.data(), X.size() * sizeof(float));
  }
}

}  // namespace mf
