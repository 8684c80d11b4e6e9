// Muon: momentum update and the Newton-Schulz orthogonalisation (NS5).
#pragma once
#include <vector>

#include "common.cuh"

namespace mf::cuda {

// M (=) mu M + s g;  U (=) nesterov ? s g + mu M : M  (s = grad_scale). All f32, same shape;
// U may alias g.
void op_muon_momentum(const Ctx& ctx, const Tensor& g, Tensor& M, Tensor& U, float mu,
                      bool nesterov, float grad_scale);
// O (=) NS(U), U and O f32 [r,c] or a stack [k,r,c] (O may alias U); each slice on its own.
// X_s = U_s / (||U_s||_F + 1e-7) in bf16, transposed to [min, max] when r > c; `steps` times:
// A = X X^T; B = b A + c A A; X = a X + B X — three strided-batched cuBLASLt bf16 GEMMs with
// fp32 accumulation per step (one call each for all k slices), no host synchronisation (the
// norms stay on the device); the result is cast back to f32 (transposed back). dt = F32 keeps
// X in f32 (f32 GEMMs, no TF32) for train.precision "fp32".
void op_newton_schulz(const Ctx& ctx, const Tensor& U, Tensor& O, int steps, float a, float b,
                      float c, DType dt = DType::BF16);

// The shared implementation of op_newton_schulz (dt = BF16, one (a,b,c) repeated) and
// op_newton_schulz_coeffs (dt = F32, kernels/matrix_opt.cu): U, O f32 [r,c] or [k,r,c], already
// checked (the op's contract and check_ns_slices); coeffs holds (a,b,c) triples, one per iteration; X_s = U_s /
// (norm_mult ||U_s||_F + 1e-7) in dtype dt. Per-slice norms by a deterministic two-pass
// reduction (grid P x k, then one block per slice), batched prepare / finish kernels.
void run_newton_schulz(const Ctx& ctx, DType dt, const Tensor& U, Tensor& O,
                       const std::vector<float>& coeffs, double norm_mult);
// A stack's slice count fits the kernels' grid (the rest of the contract:
// contract::newton_schulz / newton_schulz_coeffs); mf::Error naming op otherwise.
void check_ns_slices(const char* op, const Tensor& U);

// One Newton-Schulz iteration on k slices X_s [m,n] (dtype dt, row-major, slice stride xs
// elements) with scratch A, B (k slices [m,m], stride as) and the output Xn (like X):
// A = X X^T; B = b A + c A A; Xn = a X + B X — three strided-batched cuBLASLt GEMMs with fp32
// accumulation (k = 1: plain GEMMs).
void ns_iteration(const Ctx& ctx, DType dt, const void* X, void* A, void* B, void* Xn, int64_t m,
                  int64_t n, int64_t k, int64_t xs, int64_t as, float a, float b, float c);

}  // namespace mf::cuda
