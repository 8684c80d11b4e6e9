// Causal grouped-query attention (flash-style): forward with online softmax and log-sum-exp
// output, backward recomputing the probabilities from lse. No T x T matrix is ever stored.
#pragma once
#include "backend/backend.h"
#include "common.cuh"

namespace mf::cuda {

// q, out [B,T,H,hd] bf16; k, v [B,T,Hkv,hd] bf16 (any shape with those element counts);
// lse f32 [B,H,T] (natural log of sum exp(scale q.k) over keys j <= t).
void op_attention_fwd(const Ctx& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                      Tensor& out, Tensor& lse, const AttnShape& s);
// dq, dk, dv (=), bf16, shapes of q, k, v. Deterministic (no atomics): dq by query tile, then
// dk/dv by key tile looping over the query heads of the group and the query tiles in order.
void op_attention_bwd(const Ctx& ctx, const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& out, const Tensor& lse, Tensor& dq,
                      Tensor& dk, Tensor& dv, const AttnShape& s);

}  // namespace mf::cuda
