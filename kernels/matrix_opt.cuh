// Matrix-optimizer primitives of the CUDA backend (Backend's "matrix-optimizer primitives";
// src/optim/matrix_opt.h is the caller). Everything is f32 in memory; the spectral functions
// work in double. The entries here are the kernel-only ops; sym_eig / sym_func (cuSOLVER +
// cuBLAS) and gemm (cuBLASLt, f32) are assembled in src/backend/cuda/cuda_matrix_opt.cpp from
// the launchers below. Every reduction has a fixed order (no float atomics): results are
// deterministic run to run.
#pragma once
#include <vector>

#include "backend/backend.h"
#include "common.cuh"

namespace mf::cuda {

// ---- entries (check the tensors, launch on ctx.stream) -------------------------------------------

// dst[dr+i, dc+j] (=) src[sr+i, sc+j]; overlapping windows of one buffer go through scratch.
void op_block_copy(const Ctx& ctx, const Tensor& src, int64_t sr, int64_t sc, Tensor& dst,
                   int64_t dr, int64_t dc, int64_t rows, int64_t cols);
// Newton-Schulz with one (a,b,c) per iteration, f32 GEMMs (CUBLAS_COMPUTE_32F); see the .cu.
// U, O: [r,c] or a stack [k,r,c] (each slice normalised on its own, strided-batched GEMMs).
void op_newton_schulz_coeffs(const Ctx& ctx, const Tensor& U, Tensor& O,
                             const std::vector<float>& coeffs, float norm_mult);
// NorMuon's per-row normalisation with the Frobenius norm kept; no host synchronisation.
void op_normuon_normalize(const Ctx& ctx, Tensor& O, Tensor& v, float beta2, float eps);
// p_i *= (1 - decay) where p_i u_i >= 0.
void op_cautious_decay(const Ctx& ctx, Tensor& p, const Tensor& u, float decay);
// v (=) b2 v + (1-b2) g^2; out (=) (num / bc1) / (sqrt(v / bc2) + eps); out may alias num.
void op_adam_precond(const Ctx& ctx, const Tensor& num, const Tensor& g, Tensor& v, Tensor& out,
                     float b2, float eps, float bc1, float bc2);

// ---- launchers for the eigen-decomposition path (pointers into the caller's scratch) ------------

// A[i,j] (=) (S[i,j] + S[j,i]) / 2 in double (n x n, symmetric, so row- and column-major agree);
// *bad (=) 1 if any S value is not finite (*bad must be zeroed by the caller first).
void launch_sym_prepare(const float* S, double* A, int* bad, int64_t n, cudaStream_t stream);
// From syevd's output (eigenvectors as columns of the column-major E, eigenvalues ascending):
// Q (row-major, f32) (=) the eigenvectors ordered by descending eigenvalue, each column's
// largest-magnitude entry (first one on ties) made positive. sign: scratch of n doubles.
void launch_eig_to_q(const double* E, float* Q, double* sign, int64_t n, cudaStream_t stream);
// f[k] (=) the spectral function of Backend::sym_func at the ascending eigenvalues W[k]
// (lmax and the Schatten sum are taken in descending order, as on the CPU).
void launch_spectral_f(const double* W, double* f, int64_t n, const SymFuncArgs& a,
                       cudaStream_t stream);
// EF[:,k] (=) E[:,k] * f[k] (column-major n x n).
void launch_scale_cols(const double* E, const double* f, double* EF, int64_t n,
                       cudaStream_t stream);
// out[i,j] (=) float((R[i,j] + R[j,i]) / 2) (n x n).
void launch_sym_cast(const double* R, float* out, int64_t n, cudaStream_t stream);

}  // namespace mf::cuda
