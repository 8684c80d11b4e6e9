// cuemu: the cuBLAS(Lt) names kernels/common.cuh and cuda_common.cpp mention. No GEMM runs through
// them in the emulator (ops that need cuBLASLt are not emulated).
#pragma once
#include "cuda_runtime.h"
using cublasLtHandle_t = struct cublasLtContext*;
enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_SUPPORTED = 15 };
inline const char* cublasLtGetStatusName(cublasStatus_t) { return "CUBLAS_STATUS_EMULATED"; }
inline const char* cublasLtGetStatusString(cublasStatus_t) { return "cuemu has no cuBLASLt"; }
