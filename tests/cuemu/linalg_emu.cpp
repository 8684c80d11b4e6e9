// cuemu: cublasDgemm and cusolverDnDsyevd on the host (OpenBLAS's BLAS and LAPACK).
#include <cblas.h>

#include <vector>

#include "cusolverDn.h"

// A handle is the stream it works on: the host call waits for that stream's queued work first.
struct cublasContext { cudaStream_t stream = nullptr; };
struct cusolverDnContext { cudaStream_t stream = nullptr; };

extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
                        double* work, const int* lwork, int* iwork, const int* liwork, int* info);

cublasStatus_t cublasCreate(cublasHandle_t* h) { *h = new cublasContext; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) { h->stream = s; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const double* alpha, const double* A, int lda, const double* B, int ldb,
                           const double* beta, double* C, int ldc) {
  cuemu::eager_work(h->stream);
  cblas_dgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
              tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc);
  return CUBLAS_STATUS_SUCCESS;
}

cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* h) { *h = new cusolverDnContext; return CUSOLVER_STATUS_SUCCESS; }
cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t h) { delete h; return CUSOLVER_STATUS_SUCCESS; }
cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t h, cudaStream_t s) { h->stream = s; return CUSOLVER_STATUS_SUCCESS; }
cusolverStatus_t cusolverDnDsyevd_bufferSize(cusolverDnHandle_t, cusolverEigMode_t, cublasFillMode_t, int n,
                                             const double*, int, const double*, int* lwork) {
  *lwork = 1 + 6 * n + 2 * n * n;  // LAPACK's minimum for jobz = 'V'
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnDsyevd(cusolverDnHandle_t h, cusolverEigMode_t jobz, cublasFillMode_t uplo, int n,
                                  double* A, int lda, double* W, double* work, int lwork, int* info) {
  cuemu::eager_work(h->stream);
  const char jz = jobz == CUSOLVER_EIG_MODE_VECTOR ? 'V' : 'N', ul = uplo == CUBLAS_FILL_MODE_UPPER ? 'U' : 'L';
  int liwork = 3 + 5 * n;
  std::vector<int> iwork(static_cast<size_t>(liwork));
  dsyevd_(&jz, &ul, &n, A, &lda, W, work, &lwork, iwork.data(), &liwork, info);
  return CUSOLVER_STATUS_SUCCESS;
}
