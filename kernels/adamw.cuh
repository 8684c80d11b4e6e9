// AdamW step on one f32 tensor, optionally writing the bf16 compute copy in the same pass.
#pragma once
#include "backend/backend.h"
#include "common.cuh"

namespace mf::cuda {

// p, g, m, v f32, same shape. PyTorch semantics (backend.h AdamWArgs). If weight_out is given
// (bf16 or f32, same numel), it receives the updated p, fusing the master -> compute cast.
void op_adamw_update(const Ctx& ctx, Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                     const AdamWArgs& a, Tensor* weight_out);

}  // namespace mf::cuda
