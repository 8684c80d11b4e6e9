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
// The plan (descriptors + heuristic algorithm) is cached per shape/layout/dtype/alignment key.
// When cuBLASLt offers no algorithm (odd alignments), a plain SIMT kernel (kernels/matmul.cu)
// computes the same thing, so every shape works.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

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
};

class CublasLt {
 public:
  static constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // 32 MiB, Hopper's recommendation

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
  using Key = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int, int, int, int, int, int, int>;
  Plan* plan_for(const GemmArgs& g, int64_t ldc);

  cudaStream_t stream_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  bool force_fallback_ = false;
  size_t fallback_calls_ = 0;
};

}  // namespace mf::cuda
