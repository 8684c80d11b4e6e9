// cuemu: cuSOLVER's symmetric eigensolver (Shampoo, SOAP, diagnostics) by LAPACK's dsyevd on the
// host (OpenBLAS ships LAPACK); same column-major contract, eigenvalues ascending.
#pragma once
#include "cublas_v2.h"
using cusolverDnHandle_t = struct cusolverDnContext*;
enum cusolverStatus_t { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_INVALID_VALUE = 3 };
enum cusolverEigMode_t { CUSOLVER_EIG_MODE_NOVECTOR = 0, CUSOLVER_EIG_MODE_VECTOR = 1 };
enum cublasFillMode_t { CUBLAS_FILL_MODE_LOWER = 0, CUBLAS_FILL_MODE_UPPER = 1 };
cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* h);
cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t h);
cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t h, cudaStream_t s);
cusolverStatus_t cusolverDnDsyevd_bufferSize(cusolverDnHandle_t h, cusolverEigMode_t jobz, cublasFillMode_t uplo,
                                             int n, const double* A, int lda, const double* W, int* lwork);
cusolverStatus_t cusolverDnDsyevd(cusolverDnHandle_t h, cusolverEigMode_t jobz, cublasFillMode_t uplo, int n,
                                  double* A, int lda, double* W, double* work, int lwork, int* info);
