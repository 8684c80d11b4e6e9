// CpuBackend: optimizer primitives (fp32 reference). AdamW and the Muon momentum are elementwise
// OpenMP loops; Newton-Schulz runs its three matmuls per iteration through OpenBLAS sgemm.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_ops.h"
#include "backend/op_contract.h"

namespace mf {

void CpuBackend::adamw_update(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                              const AdamWArgs& a) {
  contract::adamw_update(contract::kCpu, p, g, m, v, a);
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
  contract::muon_momentum(contract::kCpu, g, M, U);
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
  contract::newton_schulz(contract::kCpu, U, O, steps);
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
