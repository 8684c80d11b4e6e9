// SwiGLU: h = silu(gate) * up, forward and backward.
#pragma once
#include "common.cuh"

namespace mf::cuda {

// h (=) silu(gate) * up.  gate, up, h: same dtype (f32 or bf16), same numel.
void op_swiglu_fwd(const Ctx& ctx, const Tensor& gate, const Tensor& up, Tensor& h);
// dgate (=) dh * up * sig * (1 + g (1 - sig));  dup (=) dh * silu(g). Outputs may alias dh.
void op_swiglu_bwd(const Ctx& ctx, const Tensor& dh, const Tensor& gate, const Tensor& up,
                   Tensor& dgate, Tensor& dup);

}  // namespace mf::cuda
