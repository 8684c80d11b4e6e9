// A small cuBLASLt wrapper: every GEMM of the CUDA backend goes through CublasLt::gemm.
//
// Semantics are row-major (like ref::gemm in the CPU backend):
//   D[M,N] (=) alpha * op(A) op(B) + beta * C,   op(A) [M,K], op(B) [K,N]
// with A stored [M,K] (or [K,M] when transA), B stored [K,N] (or [N,K] when transB), leading
// dimensions in elements. C defaults to D (in-place accumulation, beta = 1 for dW (+=)).
// Row-major is mapped onto cuBLAS's column-major by computing D^T = op(B)^T op(A)^T, i.e. the
// operands are swapped and M/N exchanged; no data is moved.
//
// Types: A and B share one dtype (bf16, or f32); C and D share one (bf16 or f32). Accumulation
// is always fp32 (CUBLAS_COMPUTE_32F), so bf16 x bf16 -> f32 gives the f32 dW accumulation.
// Strided batch: batch > 1 runs `batch` independent GEMMs in one call, the i-th on
// A + i*strideA, B + i*strideB, C + i*strideC, D + i*strideD (strides in elements; C = D
// implies strideC = strideD). cuBLASLt gets CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT (int32) and
// CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET (int64) on all four layouts; the fallback kernel
// walks the batch along the grid's z dimension.
// The plan (descriptors + heuristic algorithm) is cached per shape/layout/dtype/alignment/batch key.
// When cuBLASLt offers no algorithm (odd alignments), a plain SIMT kernel (kernels/matmul.cu)
// computes the same thing, so every shape works.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>

#include "backend/cuda/sizes.h"
#include "core/tensor.h"

namespace mf::cuda {

struct GemmArgs {
  bool transA = false, transB = false;
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  const void* C = nullptr;  // nullptr: C = D
  int64_t ldc = 0;          // 0: ldd
  void* D = nullptr;
  int64_t ldd = 0;
  DType ab = DType::BF16;  // dtype of A and B
  DType cd = DType::BF16;  // dtype of C and D
  float alpha = 1.f, beta = 0.f;
  int64_t batch = 1;  // strided batch count (>= 1)
  // Batch strides in elements (read only when batch > 1). strideC is ignored when C is nullptr
  // (C = D, stride strideD). Input strides may be 0 (the same matrix for every batch entry);
  // strideD must keep the outputs apart.
  int64_t strideA = 0, strideB = 0, strideC = 0, strideD = 0;
};

// g with C = D (with D's stride) when C is null, ldc = ldd when 0, and strides 0 for a single
// GEMM (so a plan key does not depend on unused fields); checks the leading dimensions and batch
// strides (mf::Error naming them).
GemmArgs resolve_gemm(const GemmArgs& g);

class CublasLt {
 public:
  static constexpr size_t kWorkspaceBytes = kCublasLtWorkspaceBytes;

  explicit CublasLt(cudaStream_t stream);
  ~CublasLt();
  CublasLt(const CublasLt&) = delete;
  CublasLt& operator=(const CublasLt&) = delete;

  void gemm(const GemmArgs& g);
  // For tests: force the SIMT fallback for every call (compares the two paths).
  void set_force_fallback(bool on) { force_fallback_ = on; }
  size_t plans_cached() const { return plans_.size(); }
  size_t fallback_calls() const { return fallback_calls_; }

 private:
  struct Plan;
  // transA, transB, M, N, K, lda, ldb, ldc, ldd, ab, cd, 4 alignments, beta != 0, batch and the
  // four strides (0 when batch == 1).
  using Key = std::array<int64_t, 21>;
  // g with ldc / C / strideC resolved (C = D when nullptr).
  Plan* plan_for(const GemmArgs& g);
  static void warn_fallback(const GemmArgs& g, const char* why);

  cudaStream_t stream_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  bool force_fallback_ = false;
  size_t fallback_calls_ = 0;
};

}  // namespace mf::cuda
