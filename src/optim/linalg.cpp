#include "optim/linalg.h"

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "core/error.h"

// LAPACK (OpenBLAS ships it): the divide-and-conquer symmetric eigensolver, Fortran calling
// convention (the two trailing lengths are the hidden lengths of the character arguments).
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a,
                        const int* lda, double* w, double* work, const int* lwork, int* iwork,
                        const int* liwork, int* info, size_t jobz_len, size_t uplo_len);

namespace mf {

void sym_eig(const std::vector<double>& a, int n, std::vector<double>& w, std::vector<double>& v) {
  MF_CHECK(n >= 0 && a.size() == size_t(n) * size_t(n), "sym_eig: expected ", n, "x", n,
           " values, got ", a.size());
  for (double x : a) MF_CHECK(std::isfinite(x), "sym_eig: the matrix holds a non-finite value");
  w.assign(size_t(n), 0.0);
  if (n == 0) {
    v.clear();
    return;
  }
  // Symmetrise (the statistics are symmetric up to rounding of the products that built them).
  // Symmetric, so the row-major buffer is also its column-major self.
  std::vector<double> A(size_t(n) * size_t(n));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      A[size_t(i) * n + j] = 0.5 * (a[size_t(i) * n + j] + a[size_t(j) * n + i]);
  // Workspace query, then the decomposition: ascending eigenvalues in d, eigenvector k in
  // column k of the column-major A, i.e. in row k of the row-major buffer.
  std::vector<double> d(static_cast<size_t>(n));
  int info = 0, lwork = -1, liwork = -1, iw = 0;
  double wq = 0;
  dsyevd_("V", "U", &n, A.data(), &n, d.data(), &wq, &lwork, &iw, &liwork, &info, 1, 1);
  MF_CHECK(info == 0, "sym_eig: LAPACK dsyevd's workspace query failed (info = ", info, ")");
  lwork = std::max(int(wq), 1 + 6 * n + 2 * n * n);
  liwork = std::max(iw, 3 + 5 * n);
  std::vector<double> work(static_cast<size_t>(lwork));
  std::vector<int> iwork(static_cast<size_t>(liwork));
  dsyevd_("V", "U", &n, A.data(), &n, d.data(), work.data(), &lwork, iwork.data(), &liwork,
          &info, 1, 1);
  MF_CHECK(info == 0, "sym_eig: LAPACK dsyevd failed on a ", n, "x", n, " matrix (info = ", info,
           info > 0 ? ": the iteration did not converge)" : ": an invalid argument)");
  // Descending order, sign convention per column (its largest-magnitude entry positive, the
  // first such entry on ties).
  v.assign(size_t(n) * size_t(n), 0.0);
  for (int c = 0; c < n; ++c) {
    const int src = n - 1 - c;
    const double* e = A.data() + size_t(src) * size_t(n);
    w[size_t(c)] = d[size_t(src)];
    int big = 0;
    for (int i = 1; i < n; ++i)
      if (std::fabs(e[i]) > std::fabs(e[big])) big = i;
    const double sign = e[big] < 0 ? -1.0 : 1.0;
    for (int i = 0; i < n; ++i) v[size_t(i) * n + c] = sign * e[i];
  }
}

void sym_reconstruct(const std::vector<double>& v, const std::vector<double>& f, int n,
                     std::vector<double>& out) {
  out.assign(size_t(n) * size_t(n), 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = i; j < n; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += v[size_t(i) * n + k] * f[size_t(k)] * v[size_t(j) * n + k];
      out[size_t(i) * n + j] = s;
      out[size_t(j) * n + i] = s;
    }
}

void matmul_d(const std::vector<double>& A, bool ta, const std::vector<double>& B, bool tb,
              int m, int n, int k, std::vector<double>& C) {
  C.assign(size_t(m) * size_t(n), 0.0);
  for (int i = 0; i < m; ++i)
    for (int p = 0; p < k; ++p) {
      const double a = ta ? A[size_t(p) * m + i] : A[size_t(i) * k + p];
      if (a == 0) continue;
      for (int j = 0; j < n; ++j) C[size_t(i) * n + j] += a * (tb ? B[size_t(j) * k + p] : B[size_t(p) * n + j]);
    }
}

}  // namespace mf
