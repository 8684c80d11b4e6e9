// SwiGLU: h = silu(gate) * up, forward and backward.
#pragma once
#include "common.cuh"

namespace mf::cuda {

// h (=) silu(gate) * up.  gate, up, h: same dtype (f32 or bf16), same shape; the last
// dimension is the row.
void op_swiglu_fwd(const Ctx& ctx, const Tensor& gate, const Tensor& up, Tensor& h);
// dgate (=) dh * up * sig * (1 + g (1 - sig));  dup (=) dh * silu(g). Outputs may alias dh.
void op_swiglu_bwd(const Ctx& ctx, const Tensor& dh, const Tensor& gate, const Tensor& up,
                   Tensor& dgate, Tensor& dup);
// The packed form: gu [N,2f] holds gate in columns [0,f) and up in [f,2f). h [N,f] (=).
void op_swiglu_packed_fwd(const Ctx& ctx, const Tensor& gu, Tensor& h);
// dgu [N,2f] (=): dgate in columns [0,f), dup in [f,2f). dh [N,f].
void op_swiglu_packed_bwd(const Ctx& ctx, const Tensor& dh, const Tensor& gu, Tensor& dgu);

}  // namespace mf::cuda
