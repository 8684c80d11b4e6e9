// Fused lm-head + softmax cross-entropy (loss and gradients, chunked over rows).
#pragma once
#include "common.cuh"

namespace mf::cuda {

// Contract of Backend::lmhead_xent. x [N,d], W [V,d] and dx [N,d] (=) share one dtype: bf16, or
// f32 for train.precision "fp32"; targets i32 [N], losses f32 [N], dW f32 [V,d] (+=). Per chunk
// of rows (at most ctx.xent_chunk_bytes of logits and dlogits, train.loss_chunk_mb):
//   logits f32 [rows,V] = logit_scale * x W^T           (cuBLASLt, fp32 accumulation)
//   one block per row: online max/sum-exp, loss, dlogits (x's dtype) = loss_scale * logit_scale *
//     (softmax - onehot)
//   dx[rows] = dlogits W;  dW += dlogits^T x[rows]        (cuBLASLt)
// A target outside [0,V) gives a NaN loss and no one-hot term (the kernel cannot throw).
void op_lmhead_xent(const Ctx& ctx, const Tensor& x, const Tensor& W, const Tensor& targets,
                    float logit_scale, Tensor& losses, Tensor* dx, Tensor* dW, float loss_scale);

}  // namespace mf::cuda
