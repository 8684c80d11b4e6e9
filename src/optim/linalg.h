// Small dense linear algebra in double for the matrix optimizers (Shampoo, SOAP, ASGO, Freon):
// symmetric eigendecomposition and spectral functions of symmetric matrices. Host only; the
// CPU backend's sym_eig / sym_func call these, and the tests use them as references.
//
// Method: LAPACK's dsyevd (Householder tridiagonalisation in blocked BLAS-3 steps, then divide
// and conquer; backward stable, eigenvalues to a few ulps of ||S||), the algorithm cuSOLVER's
// Dsyevd runs for the CUDA backend. It replaced a hand-written EISPACK tred2 / tql2 pair that
// was 9x slower at n = 384 and 94x at n = 1024 on one core (unblocked, column-strided), which
// made the decompositions the whole of a CPU Shampoo / SOAP / ASGO step.
#pragma once
#include <vector>

namespace mf {

// Eigen-decomposition of the symmetric n x n matrix `a` (row-major; only its values are read,
// symmetry is assumed). On return `w` holds the eigenvalues in DESCENDING order and `v`
// (row-major n x n) the matching orthonormal eigenvectors as COLUMNS: S = V diag(w) V^T. Each
// column's largest-magnitude entry is made positive (a deterministic sign convention).
// Throws mf::Error if `a` holds a non-finite value or LAPACK reports a failure.
void sym_eig(const std::vector<double>& a, int n, std::vector<double>& w, std::vector<double>& v);

// out = V diag(f_i) V^T given the eigenvectors (columns of v) and the values f (n x n, row-major).
void sym_reconstruct(const std::vector<double>& v, const std::vector<double>& f, int n,
                     std::vector<double>& out);

// General matrix product in double: C[m,n] = op(A) op(B), with A/B row-major and op = transpose
// when the flag is set (A is m x k after op, B is k x n after op).
void matmul_d(const std::vector<double>& A, bool ta, const std::vector<double>& B, bool tb,
              int m, int n, int k, std::vector<double>& C);

}  // namespace mf
