// Rotary position embedding (Hugging Face rotate-half form), forward and backward (the inverse
// rotation). Same math as ref::rope: inv_freq_i = theta^(-2i/hd) computed in double and rounded
// to f32; angle t * inv_freq and its cos/sin in double, rounded to f32 into a [T, hd/2] table.
#pragma once
#include "common.cuh"

namespace mf::cuda {

// x, y [B,T,H,hd] (y may alias x), same dtype (f32 or bf16).
void op_rope_fwd(const Ctx& ctx, const Tensor& x, Tensor& y, float theta);
void op_rope_bwd(const Ctx& ctx, const Tensor& dy, Tensor& dx, float theta);
// The packed projections: qkv [B,T,H+2Hkv,hd] -> q [B,T,H,hd] (rotated), k [B,T,Hkv,hd]
// (rotated), v [B,T,Hkv,hd] (copied); merge is its backward into dqkv (=). No aliasing.
void op_qkv_rope_split(const Ctx& ctx, const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, float theta);
void op_qkv_rope_merge_bwd(const Ctx& ctx, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                           Tensor& dqkv, float theta);

}  // namespace mf::cuda
