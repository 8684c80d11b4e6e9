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
#include "core/error.h"
#include "optim/linalg.h"

namespace mf {

namespace {

void check_f32(const char* op, const char* what, const Tensor& t) {
  MF_CHECK(t.defined() && t.dtype == DType::F32, op, ": ", what, " must be a defined f32 tensor, got ",
           dtype_name(t.dtype));
}

void check_matrix(const char* op, const char* what, const Tensor& t) {
  check_f32(op, what, t);
  MF_CHECK(t.ndim() == 2, op, ": ", what, " must be a matrix, got shape ", shape_str(t.shape));
}

void check_square(const char* op, const char* what, const Tensor& t) {
  check_matrix(op, what, t);
  MF_CHECK(t.dim(0) == t.dim(1), op, ": ", what, " must be square, got shape ", shape_str(t.shape));
}

std::vector<double> to_double(const Tensor& t) {
  const float* p = t.f32();
  return std::vector<double>(p, p + t.numel());
}

}  // namespace

void CpuBackend::gemm(const Tensor& A, bool ta, const Tensor& B, bool tb, Tensor& C, float alpha,
                      float beta) {
  check_matrix("gemm", "A", A);
  check_matrix("gemm", "B", B);
  check_matrix("gemm", "C", C);
  const int64_t m = ta ? A.dim(1) : A.dim(0), k = ta ? A.dim(0) : A.dim(1);
  const int64_t kb = tb ? B.dim(1) : B.dim(0), n = tb ? B.dim(0) : B.dim(1);
  MF_CHECK(k == kb, "gemm: inner dimensions differ: op(A) is ", m, "x", k, ", op(B) is ", kb, "x", n);
  MF_CHECK(C.dim(0) == m && C.dim(1) == n, "gemm: C has shape ", shape_str(C.shape), ", expected [",
           m, ", ", n, "]");
  MF_CHECK(C.ptr != A.ptr && C.ptr != B.ptr, "gemm: C must not alias A or B");
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
  check_matrix("block_copy", "src", src);
  check_matrix("block_copy", "dst", dst);
  MF_CHECK(rows >= 0 && cols >= 0 && sr >= 0 && sc >= 0 && dr >= 0 && dc >= 0 &&
               sr + rows <= src.dim(0) && sc + cols <= src.dim(1) && dr + rows <= dst.dim(0) &&
               dc + cols <= dst.dim(1),
           "block_copy: window ", rows, "x", cols, " at (", sr, ",", sc, ") of ",
           shape_str(src.shape), " -> (", dr, ",", dc, ") of ", shape_str(dst.shape),
           " is out of range");
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
  check_square("sym_eig", "S", S);
  check_square("sym_eig", "Q", Q);
  MF_CHECK(Q.dim(0) == S.dim(0), "sym_eig: Q has shape ", shape_str(Q.shape), ", expected ",
           shape_str(S.shape));
  const int n = int(S.dim(0));
  std::vector<double> w, v;
  mf::sym_eig(to_double(S), n, w, v);
  float* q = Q.f32();
  for (size_t i = 0; i < v.size(); ++i) q[i] = float(v[i]);
}

void CpuBackend::sym_func(const Tensor& S, const SymFuncArgs& a, Tensor& out) {
  check_square("sym_func", "S", S);
  check_square("sym_func", "out", out);
  MF_CHECK(out.dim(0) == S.dim(0), "sym_func: out has shape ", shape_str(out.shape), ", expected ",
           shape_str(S.shape));
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
  check_f32("newton_schulz_coeffs", "input", U);
  check_f32("newton_schulz_coeffs", "output", O);
  MF_CHECK(U.ndim() == 2 || U.ndim() == 3,
           "newton_schulz_coeffs: input must be a matrix [r,c] or a stack [k,r,c], got shape ",
           shape_str(U.shape));
  MF_CHECK(O.shape == U.shape, "newton_schulz_coeffs: output has shape ", shape_str(O.shape),
           ", expected ", shape_str(U.shape));
  MF_CHECK(coeffs.size() % 3 == 0, "newton_schulz_coeffs: coeffs must hold (a,b,c) triples, got ",
           coeffs.size(), " values");
  MF_CHECK(norm_mult > 0, "newton_schulz_coeffs: norm_mult must be > 0, got ", norm_mult);
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
  check_matrix("normuon_normalize", "O", O);
  check_f32("normuon_normalize", "v", v);
  MF_CHECK(v.numel() == O.dim(0), "normuon_normalize: v has ", v.numel(), " entries, expected ",
           O.dim(0), " (one per row of O ", shape_str(O.shape), ")");
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
  check_f32("cautious_decay", "param", p);
  check_f32("cautious_decay", "update", u);
  MF_CHECK(u.shape == p.shape, "cautious_decay: update has shape ", shape_str(u.shape),
           ", expected ", shape_str(p.shape));
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
  check_f32("adam_precond", "num", num);
  check_f32("adam_precond", "g", g);
  check_f32("adam_precond", "v", v);
  check_f32("adam_precond", "out", out);
  MF_CHECK(g.shape == num.shape && v.shape == num.shape && out.shape == num.shape,
           "adam_precond: shapes differ: num ", shape_str(num.shape), ", g ", shape_str(g.shape),
           ", v ", shape_str(v.shape), ", out ", shape_str(out.shape));
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
