// Causal grouped-query attention (flash-style): forward with online softmax and log-sum-exp
// output, backward recomputing the probabilities from lse. No T x T matrix is ever stored.
#pragma once
#include "backend/backend.h"
#include "common.cuh"

namespace mf::cuda {

// Arguments: contract::attention_fwd / attention_bwd (backend/op_contract.h), shared with the
// CPU reference and cuDNN's path (which also requires bf16).

// The forward's 16-row m-tiles per warp for head dim 64 (hd 128 always uses 1): 2 by default,
// or the environment variable MF_ATTN_FWD_MTILES (1 or 2; anything else is an error) read on
// first use. The setter is for tests and benchmarks that compare the two.
int attention_fwd_mtiles();
void set_attention_fwd_mtiles(int mt);

// q, out [B,T,H,hd]; k, v [B,T,Hkv,hd] (any shape with those element counts), bf16 (tensor
// cores for hd 64 and 128 on 16-byte aligned data, else SIMT) or f32 (SIMT, for
// train.precision "fp32"); lse f32 [B,H,T] (natural log of sum exp(scale q.k) over keys j <= t).
void op_attention_fwd(const Ctx& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                      Tensor& out, Tensor& lse, const AttnShape& s);
// dq, dk, dv (=), q's dtype, shapes of q, k, v. Deterministic (no atomics): dq by query tile, then
// dk/dv by key tile looping over the query heads of the group and the query tiles in order.
void op_attention_bwd(const Ctx& ctx, const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& out, const Tensor& lse, Tensor& dq,
                      Tensor& dk, Tensor& dv, const AttnShape& s);

}  // namespace mf::cuda
