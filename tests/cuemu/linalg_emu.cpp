// cuemu: cublasDgemm and cusolverDnDsyevd on the host (OpenBLAS's BLAS and LAPACK).
// Stricter than the libraries in one way on purpose: a handle used before its Set*Stream call is
// an error, not the legacy default stream (which the backend's non-blocking stream does not wait
// for: a race on the device). CUEMU_SYEVD_INFO=K makes every syevd report info = K (its failure
// path: K > 0 is "did not converge").
#include <cblas.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cusolverDn.h"

// A handle is the stream it works on: the host call waits for that stream's queued work first.
struct cublasContext {
  cudaStream_t stream = nullptr;
  bool stream_set = false;
};
struct cusolverDnContext {
  cudaStream_t stream = nullptr;
  bool stream_set = false;
};

namespace {
bool stream_missing(bool set, const char* call, const char* setter) {
  if (!set)
    std::fprintf(stderr, "cuemu: %s on a handle without %s: it would run on the legacy default stream, "
                         "unordered with the backend's non-blocking stream\n", call, setter);
  return !set;
}
}  // namespace

// LAPACK's Fortran convention: the trailing hidden lengths of the character arguments (as
// src/optim/linalg.cpp declares it).
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info,
                        size_t jobz_len, size_t uplo_len);

cublasStatus_t cublasCreate(cublasHandle_t* h) { *h = new cublasContext; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  h->stream = s;
  h->stream_set = true;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const double* alpha, const double* A, int lda, const double* B, int ldb,
                           const double* beta, double* C, int ldc) {
  if (stream_missing(h->stream_set, "cublasDgemm", "cublasSetStream")) return CUBLAS_STATUS_NOT_INITIALIZED;
  cuemu::eager_work(h->stream);
  cblas_dgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
              tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc);
  return CUBLAS_STATUS_SUCCESS;
}

cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* h) { *h = new cusolverDnContext; return CUSOLVER_STATUS_SUCCESS; }
cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t h) { delete h; return CUSOLVER_STATUS_SUCCESS; }
cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t h, cudaStream_t s) {
  h->stream = s;
  h->stream_set = true;
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnDsyevd_bufferSize(cusolverDnHandle_t, cusolverEigMode_t, cublasFillMode_t, int n,
                                             const double*, int, const double*, int* lwork) {
  *lwork = 1 + 6 * n + 2 * n * n;  // LAPACK's minimum for jobz = 'V'
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnDsyevd(cusolverDnHandle_t h, cusolverEigMode_t jobz, cublasFillMode_t uplo, int n,
                                  double* A, int lda, double* W, double* work, int lwork, int* info) {
  if (stream_missing(h->stream_set, "cusolverDnDsyevd", "cusolverDnSetStream")) return CUSOLVER_STATUS_INVALID_VALUE;
  if (n < 0 || lda < (n > 1 ? n : 1) || lwork < 1 + 6 * n + 2 * n * n) return CUSOLVER_STATUS_INVALID_VALUE;
  cuemu::eager_work(h->stream);
  const char jz = jobz == CUSOLVER_EIG_MODE_VECTOR ? 'V' : 'N', ul = uplo == CUBLAS_FILL_MODE_UPPER ? 'U' : 'L';
  int liwork = 3 + 5 * n;
  std::vector<int> iwork(static_cast<size_t>(liwork));
  dsyevd_(&jz, &ul, &n, A, &lda, W, work, &lwork, iwork.data(), &liwork, info, 1, 1);
  if (const char* k = std::getenv("CUEMU_SYEVD_INFO"); k && *k) *info = std::atoi(k);
  return CUSOLVER_STATUS_SUCCESS;
}
