// Token embedding lookup and its deterministic backward.
#pragma once
#include "common.cuh"

namespace mf::cuda {

// out[n,:] (=) wte[tokens[n],:].  tokens i32 [N], wte [V,d] (f32/bf16), out [N,d] (f32/bf16).
// A token outside [0,V) yields a row of NaN (the kernel cannot throw; the loss shows it).
void op_embedding_fwd(const Ctx& ctx, const Tensor& tokens, const Tensor& wte, Tensor& out);
// dwte[tokens[n],:] (+=) dout[n,:]; dwte f32 [V,d]. Deterministic: the tokens are sorted stably
// (sort.cuh), and each vocabulary row's run is summed by one warp per column group, in
// increasing n (the CPU reference's order). Tokens outside [0,V) are ignored.
void op_embedding_bwd(const Ctx& ctx, const Tensor& tokens, const Tensor& dout, Tensor& dwte);

}  // namespace mf::cuda
