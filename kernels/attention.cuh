// Causal grouped-query attention (flash-style): forward with online softmax and log-sum-exp
// output, backward recomputing the probabilities from lse. No T x T matrix is ever stored.
#pragma once
#include "backend/backend.h"
#include "common.cuh"

namespace mf::cuda {

// Argument checks shared by every attention path (these kernels and cuDNN's): all sizes > 0,
// H a multiple of Hkv, scale > 0; device activations of B*T*heads*hd elements, all of q's float
// dtype (q, out, dout, dq: H heads; k, v, dk, dv: Hkv); device f32 lse of B*H*T. Errors name op
// and tensor. cuDNN's path also requires bf16.
void check_attention_shape(const char* op, const AttnShape& s);
void check_attention_fwd_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& out, const Tensor& lse, const AttnShape& s);
void check_attention_bwd_args(const char* op, const Tensor& dout, const Tensor& q,
                              const Tensor& k, const Tensor& v, const Tensor& out,
                              const Tensor& lse, const Tensor& dq, const Tensor& dk,
                              const Tensor& dv, const AttnShape& s);

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
