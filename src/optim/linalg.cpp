#include "optim/linalg.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace mf {

namespace {

// Householder tridiagonalisation of the symmetric matrix held in V (n x n, row-major), which on
// return holds the accumulated orthogonal transform; d = diagonal, e = sub-diagonal (e[0] = 0).
void tred2(int n, std::vector<double>& V, std::vector<double>& d, std::vector<double>& e) {
  auto at = [&](int i, int j) -> double& { return V[size_t(i) * size_t(n) + size_t(j)]; };
  for (int j = 0; j < n; ++j) d[j] = at(n - 1, j);
  for (int i = n - 1; i > 0; --i) {
    double scale = 0, h = 0;
    for (int k = 0; k < i; ++k) scale += std::fabs(d[k]);
    if (scale == 0) {
      e[i] = d[i - 1];
      for (int j = 0; j < i; ++j) {
        d[j] = at(i - 1, j);
        at(i, j) = 0;
        at(j, i) = 0;
      }
    } else {
      for (int k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = std::sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int j = 0; j < i; ++j) e[j] = 0;
      for (int j = 0; j < i; ++j) {
        f = d[j];
        at(j, i) = f;
        g = e[j] + at(j, j) * f;
        for (int k = j + 1; k <= i - 1; ++k) {
          g += at(k, j) * d[k];
          e[k] += at(k, j) * f;
        }
        e[j] = g;
      }
      f = 0;
      for (int j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int k = j; k <= i - 1; ++k) at(k, j) -= (f * e[k] + g * d[k]);
        d[j] = at(i - 1, j);
        at(i, j) = 0;
      }
    }
    d[i] = h;
  }
  // Accumulate the transformations.
  for (int i = 0; i < n - 1; ++i) {
    at(n - 1, i) = at(i, i);
    at(i, i) = 1;
    const double h = d[i + 1];
    if (h != 0) {
      for (int k = 0; k <= i; ++k) d[k] = at(k, i + 1) / h;
      for (int j = 0; j <= i; ++j) {
        double g = 0;
        for (int k = 0; k <= i; ++k) g += at(k, i + 1) * at(k, j);
        for (int k = 0; k <= i; ++k) at(k, j) -= g * d[k];
      }
    }
    for (int k = 0; k <= i; ++k) at(k, i + 1) = 0;
  }
  for (int j = 0; j < n; ++j) {
    d[j] = at(n - 1, j);
    at(n - 1, j) = 0;
  }
  at(n - 1, n - 1) = 1;
  e[0] = 0;
}

// Implicit-shift QL on the tridiagonal (d, e), rotating the columns of V along.
void tql2(int n, std::vector<double>& V, std::vector<double>& d, std::vector<double>& e) {
  auto at = [&](int i, int j) -> double& { return V[size_t(i) * size_t(n) + size_t(j)]; };
  for (int i = 1; i < n; ++i) e[i - 1] = e[i];
  e[n - 1] = 0;
  double f = 0, tst1 = 0;
  const double eps = std::ldexp(1.0, -52);
  for (int l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::fabs(d[l]) + std::fabs(e[l]));
    int m = l;
    while (m < n - 1 && std::fabs(e[m]) > eps * tst1) ++m;
    if (m > l) {
      int iter = 0;
      do {
        MF_CHECK(++iter <= 100, "sym_eig: the QL iteration did not converge (n = ", n, ")");
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = std::hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1, c2 = c, c3 = c, s = 0, s2 = 0;
        const double el1 = e[l + 1];
        for (int i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = std::hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          for (int k = 0; k < n; ++k) {
            h = at(k, i + 1);
            at(k, i + 1) = s * at(k, i) + c * h;
            at(k, i) = c * at(k, i) - s * h;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (std::fabs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0;
  }
}

}  // namespace

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
  std::vector<double> V(size_t(n) * size_t(n));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      V[size_t(i) * n + j] = 0.5 * (a[size_t(i) * n + j] + a[size_t(j) * n + i]);
  std::vector<double> d(static_cast<size_t>(n)), e(static_cast<size_t>(n));
  tred2(n, V, d, e);
  tql2(n, V, d, e);
  // Descending order (stable: ties keep QL's order), sign convention per column.
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return d[x] > d[y]; });
  v.assign(size_t(n) * size_t(n), 0.0);
  for (int c = 0; c < n; ++c) {
    const int src = order[size_t(c)];
    w[size_t(c)] = d[size_t(src)];
    int big = 0;
    for (int i = 1; i < n; ++i)
      if (std::fabs(V[size_t(i) * n + src]) > std::fabs(V[size_t(big) * n + src])) big = i;
    const double sign = V[size_t(big) * n + src] < 0 ? -1.0 : 1.0;
    for (int i = 0; i < n; ++i) v[size_t(i) * n + c] = sign * V[size_t(i) * n + src];
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
