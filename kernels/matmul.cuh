// Linear layers: y = x W^T and its backward, all through cuBLASLt (src/backend/cuda/cublaslt.h),
// plus the SIMT fallback GEMM the wrapper uses when cuBLASLt has no algorithm for a layout.
#pragma once
#include "backend/cuda/cublaslt.h"
#include "common.cuh"

namespace mf::cuda {

// Fallback: the row-major GemmArgs contract of CublasLt::gemm (C must be set, ldc too), fp32
// accumulation, one thread per output element over 16x16 shared-memory tiles. Slow; correct for
// any size, alignment and leading dimension. Strided batches (GemmArgs::batch) run along the
// grid's z dimension.
void launch_gemm_fallback(const GemmArgs& g, cudaStream_t stream);

// y (=) x W^T.  x [N,in], W [out,in] (same dtype), y [N,out] (f32 or bf16).
void op_matmul_fwd(const Ctx& ctx, const Tensor& x, const Tensor& W, Tensor& y);
// dx (= or +=) dy W;  dW (+=) dy^T x.  dy, x, W share one dtype; dx that dtype or f32; dW f32
// (or the operand dtype).
void op_matmul_bwd(const Ctx& ctx, const Tensor& dy, const Tensor& x, const Tensor& W, Tensor* dx,
                   Tensor* dW, bool accumulate_dx);

}  // namespace mf::cuda
