// Muon: momentum update and the Newton-Schulz orthogonalisation (NS5).
#pragma once
#include "common.cuh"

namespace mf::cuda {

// M (=) mu M + s g;  U (=) nesterov ? s g + mu M : M  (s = grad_scale). All f32, same shape;
// U may alias g.
void op_muon_momentum(const Ctx& ctx, const Tensor& g, Tensor& M, Tensor& U, float mu,
                      bool nesterov, float grad_scale);
// O (=) NS(U), U and O f32 [r,c] (O may alias U). X = U / (||U||_F + 1e-7) in bf16, transposed
// to [min, max] when r > c; `steps` times: A = X X^T; B = b A + c A A; X = a X + B X — three
// cuBLASLt bf16 GEMMs with fp32 accumulation per step, no host synchronisation (the norm stays
// on the device); the result is cast back to f32 (transposed back).
void op_newton_schulz(const Ctx& ctx, const Tensor& U, Tensor& O, int steps, float a, float b,
                      float c);

// One Newton-Schulz iteration on X [m,n] (dtype dt, row-major) with scratch A, B [m,m] and the
// output Xn [m,n]: A = X X^T; B = b A + c A A; Xn = a X + B X — three cuBLASLt GEMMs with fp32
// accumulation. Shared by op_newton_schulz (bf16) and op_newton_schulz_coeffs (f32).
void ns_iteration(const Ctx& ctx, DType dt, const void* X, void* A, void* B, void* Xn, int64_t m,
                  int64_t n, float a, float b, float c);

}  // namespace mf::cuda
