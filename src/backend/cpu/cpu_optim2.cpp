// CpuBackend: primitives of the matrix optimizers (src/optim/matrix_opt.h). GEMMs go through
// OpenBLAS (sgemm; dgemm for the spectral functions), eigendecompositions through
// src/optim/linalg (double). Elementwise loops use OpenMP with a fixed partition of the work, and
// every reduction runs in a fixed order, so results do not depend on the thread count.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/ref_ops.h"
#include "backend/op_contract.h"
#include "core/error.h"
#include "optim/linalg.h"

namespace mf {

namespace {

std::vector<double> to_double(const Tensor& t) {
  const float* p = t.f32();
  return std::vector<double>(p, p + t.numel());
}

}  // namespace

void CpuBackend::gemm(const Tensor& A, bool ta, const Tensor& B, bool tb, Tensor& C, float alpha,
                      float beta) {
  const auto [m, n, k] = contract::gemm(contract::kCpu, A, ta, B, tb, C);
  if (m == 0 || n == 0) return;
  if (beta == 0) std::memset(C.ptr, 0, C.nbytes());  // BLAS may read C even when beta = 0
  if (k == 0) {
    if (beta != 0 && beta != 1) scale(C, beta);
    return;
  }
  ref::gemm<float>(ta, tb, m, n, k, alpha, A.f32(), A.dim(1), B.f32(), B.dim(1), beta == 0 ? 0.0f : beta,
                   C.f32(), n);
}

void CpuBackend::block_copy(const Tensor& src, int64_t sr, int64_t sc, Tensor& dst, int64_t dr,
                            int64_t dc, int64_t rows, int64_t cols) {
  contract::block_copy(contract::kCpu, src, sr, sc, dst, dr, dc, rows, cols);
  const float* s = src.f32();
  float* d = dst.f32();
  int64_t ls = src.dim(1);
  const int64_t ld = dst.dim(1);
  // Overlapping windows of one buffer: the result is as if the source window had been copied out
  // first (a row-by-row memmove would let early rows overwrite later source rows).
  std::vector<float> tmp;
  const char *s0 = static_cast<const char*>(src.ptr), *d0 = static_cast<const char*>(dst.ptr);
  if (s0 < d0 + dst.nbytes() && d0 < s0 + src.nbytes()) {
    tmp.resize(size_t(rows) * size_t(cols));
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(tmp.data() + i * cols, s + (sr + i) * ls + sc, size_t(cols) * sizeof(float));
    s = tmp.data();
    sr = sc = 0;
    ls = cols;
  }
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(d + (dr + i) * ld + dc, s + (sr + i) * ls + sc, size_t(cols) * sizeof(float));
}

void CpuBackend::sym_eig(const Tensor& S, Tensor& Q) {
  contract::sym_square(contract::kCpu, "sym_eig", S, "Q", Q);
  const int n = int(S.dim(0));
  std::vector<double> w, v;
  mf::sym_eig(to_double(S), n, w, v);
  float* q = Q.f32();
  for (size_t i = 0; i < v.size(); ++i) q[i] = float(v[i]);
}

void CpuBackend::sym_func(const Tensor& S, const SymFuncArgs& a, Tensor& out) {
  contract::sym_square(contract::kCpu, "sym_func", S, "out", out);
  const int n = int(S.dim(0));
  if (n == 0) return;
  std::vector<double> w, v;
  mf::sym_eig(to_double(S), n, w, v);
  double lmax = 0;
  for (double& x : w) {
    x = std::max(x * a.input_scale, 0.0);
    lmax = std::max(lmax, x);
  }
  double scale = a.scale;
  if (a.schatten_q > 0) {
    double s = 0;
    for (double x : w) s += std::pow(x, 0.5 * a.schatten_q);
    scale *= s > 0 ? std::pow(s, a.schatten_pow / a.schatten_q) : 1.0;
  }
  const double eps = a.relative_eps ? a.eps * lmax : a.eps;
  const double base_min = a.base_floor_rel > 0 ? a.base_floor_rel * std::pow(lmax, a.root) : 0.0;
  std::vector<double> f(static_cast<size_t>(n), 0.0);
  for (int i = 0; i < n; ++i) {
    const double base = std::max(std::pow(w[size_t(i)], a.root) + eps, base_min);
    f[size_t(i)] = base > 0 ? scale * std::pow(base, a.power) : 0.0;  // 0^negative: null space
  }
  // out = (V diag f) V^T with dgemm.
  std::vector<double> VF(v.size()), R(v.size());
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < n; ++k) VF[size_t(i) * n + k] = v[size_t(i) * n + k] * f[size_t(k)];
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0, VF.data(), n, v.data(), n, 0.0,
              R.data(), n);
  float* o = out.f32();
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)  // symmetrise the rounding
      o[size_t(i) * n + j] = float(0.5 * (R[size_t(i) * n + j] + R[size_t(j) * n + i]));
}

void CpuBackend::newton_schulz_coeffs(const Tensor& U, Tensor& O, const std::vector<float>& coeffs,
                                      float norm_mult) {
  contract::newton_schulz_coeffs(contract::kCpu, U, O, coeffs, norm_mult);
  if (U.ndim() == 3) {  // a stack: the per-matrix code on each slice (bitwise the same results)
    const Shape ms{U.dim(1), U.dim(2)};
    // One slice per thread (its GEMMs and loops then run on that thread: nested regions are
    // inactive); each slice's arithmetic is the same whichever thread runs it.
#pragma omp parallel for schedule(dynamic) if (U.dim(0) > 1)
    for (int64_t x = 0; x < U.dim(0); ++x) {
      Tensor o = O.slice0(x, x + 1).view(ms);
      newton_schulz_coeffs(U.slice0(x, x + 1).view(ms), o, coeffs, norm_mult);
    }
    return;
  }
  const int64_t r = U.dim(0), cols = U.dim(1);
  if (r == 0 || cols == 0) return;
  const bool transposed = r > cols;
  const int64_t m = transposed ? cols : r, n = transposed ? r : cols;
  const double norm = std::sqrt(ref::ordered_sum_squares(U.f32(), U.numel()));
  const float inv = float(1.0 / (double(norm_mult) * norm + 1e-7));
  std::vector<float> X(size_t(m * n)), Xn(size_t(m * n)), A(size_t(m * m)), B(size_t(m * m));
  const float* up = U.f32();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      X[size_t(i * n + j)] = (transposed ? up[j * m + i] : up[i * n + j]) * inv;
  const int M = int(m), N = int(n);
  for (size_t it = 0; it + 2 < coeffs.size(); it += 3) {
    const float a = coeffs[it], b = coeffs[it + 1], c = coeffs[it + 2];
    ref::gemm<float>(false, true, M, M, N, 1.0f, X.data(), N, X.data(), N, 0.0f, A.data(), M);
    for (size_t i = 0; i < B.size(); ++i) B[i] = b * A[i];
    ref::gemm<float>(false, false, M, M, M, c, A.data(), M, A.data(), M, 1.0f, B.data(), M);
    for (size_t i = 0; i < Xn.size(); ++i) Xn[i] = a * X[i];
    ref::gemm<float>(false, false, M, N, M, 1.0f, B.data(), M, X.data(), N, 1.0f, Xn.data(), N);
    X.swap(Xn);
  }
  float* op = O.f32();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) (transposed ? op[j * m + i] : op[i * n + j]) = X[size_t(i * n + j)];
}

void CpuBackend::normuon_normalize(Tensor& O, Tensor& v, float beta2, float eps) {
  contract::normuon_normalize(contract::kCpu, O, v);
  const int64_t r = O.dim(0), c = O.dim(1);
  if (r == 0 || c == 0) return;
  float* o = O.f32();
  float* vp = v.f32();
  const double before = ref::ordered_sum_squares(o, O.numel());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < r; ++i) {
    double s = 0;
    for (int64_t j = 0; j < c; ++j) s += double(o[i * c + j]) * o[i * c + j];
    const float vi = beta2 * vp[i] + (1.0f - beta2) * float(s / double(c));
    vp[i] = vi;
    const float inv = 1.0f / (std::sqrt(vi) + eps);
    for (int64_t j = 0; j < c; ++j) o[i * c + j] *= inv;
  }
  const double after = ref::ordered_sum_squares(o, O.numel());
  if (after > 0) scale(O, float(std::sqrt(before / after)));
}

void CpuBackend::cautious_decay(Tensor& p, const Tensor& u, float decay) {
  contract::cautious_decay(contract::kCpu, p, u);
  float* pp = p.f32();
  const float* up = u.f32();
  const float keep = 1.0f - decay;
  const int64_t n = p.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    if (pp[i] * up[i] >= 0.0f) pp[i] *= keep;
}

void CpuBackend::adam_precond(const Tensor& num, const Tensor& g, Tensor& v, Tensor& out, float b2,
                              float eps, float bc1, float bc2) {
  contract::adam_precond(contract::kCpu, num, g, v, out);
  const float* np = num.f32();
  const float* gp = g.f32();
  float* vp = v.f32();
  float* op = out.f32();
  const float inv1 = 1.0f / bc1, inv2 = 1.0f / bc2;
  const int64_t n = num.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float vi = b2 * vp[i] + (1.0f - b2) * gp[i] * gp[i];
    vp[i] = vi;
    op[i] = (np[i] * inv1) / (std::sqrt(vi * inv2) + eps);
  }
}

}  // namespace mf
