// Matrix-optimizer primitives: window copies, Newton-Schulz with per-step coefficients (f32),
// NorMuon's row normalisation, cautious weight decay, Adam in a rotated basis, and the small
// double-precision kernels around cuSOLVER's syevd (see matrix_opt.cuh). Deterministic: every
// reduction is a fixed shuffle tree or a fixed serial order, and no kernel uses float atomics.
#include "matrix_opt.cuh"
#include "muon.cuh"

#include <cmath>

#include "backend/cuda/cublaslt.h"
#include "reduce.cuh"

namespace mf::cuda {

namespace {

constexpr int kMoThreads = 256;
constexpr int64_t kMoMaxBlocks = 8192;

unsigned mo_blocks(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kMoThreads), kMoMaxBlocks)));
}

#define MO_GRID_STRIDE(i, n)                                                              \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);               \
       i += int64_t(gridDim.x) * blockDim.x)


// ---- NorMuon ---------------------------------------------------------------------------------

struct NorMuonParams {
  float* O;
  float* v;
  int64_t r, c;
  float beta2, eps;
};

// One block per row: v_i = b2 v_i + (1-b2) mean_j O_ij^2 (sum in double), O_i /= sqrt(v_i) + eps.
__global__ void normuon_rows_kernel(NorMuonParams p) {
  __shared__ double red[32];
  const int64_t row = blockIdx.x;
  float* o = p.O + row * p.c;
  double s = 0;
  for (int64_t j = threadIdx.x; j < p.c; j += blockDim.x) s += double(o[j]) * double(o[j]);
  s = block_sum(s, red);
  const float vi = p.beta2 * p.v[row] + (1.0f - p.beta2) * float(s / double(p.c));
  const float inv = 1.0f / (sqrtf(vi) + p.eps);
  __syncthreads();  // every thread has read v[row] before it is written
  if (threadIdx.x == 0) p.v[row] = vi;
  for (int64_t j = threadIdx.x; j < p.c; j += blockDim.x) o[j] *= inv;
}

// O *= sqrt(before / after) (unchanged when after = 0).
__global__ void rescale_kernel(float* O, int64_t n, const double* before, const double* after) {
  const double b = *before, a = *after;
  if (!(a > 0)) return;
  const float f = float(sqrt(b / a));
  MO_GRID_STRIDE(i, n) O[i] *= f;
}

// ---- elementwise -------------------------------------------------------------------------------

__global__ void cautious_decay_kernel(float* p, const float* u, int64_t n, float keep) {
  MO_GRID_STRIDE(i, n) {
    const float pi = p[i];
    if (pi * u[i] >= 0.0f) p[i] = pi * keep;
  }
}

struct AdamPrecondParams {
  const float* num;
  const float* g;
  float* v;
  float* out;
  int64_t n;
  float b2, eps, inv1, inv2;
};

__global__ void adam_precond_kernel(AdamPrecondParams p) {
  MO_GRID_STRIDE(i, p.n) {
    const float gi = p.g[i];
    const float vi = p.b2 * p.v[i] + (1.0f - p.b2) * gi * gi;
    p.v[i] = vi;
    p.out[i] = (p.num[i] * p.inv1) / (sqrtf(vi * p.inv2) + p.eps);
  }
}

// ---- eigen-decomposition helpers -------------------------------------------------------------

__global__ void sym_prepare_kernel(const float* S, double* A, int* bad, int64_t n) {
  MO_GRID_STRIDE(q, n * n) {
    const int64_t i = q / n, j = q % n;
    const float s = S[q];
    if (!isfinite(s)) *bad = 1;  // an int flag: every writer stores the same value
    A[q] = 0.5 * (double(s) + double(S[j * n + i]));
  }
}

// One block per output column c (source column n-1-c of E): sign[c] = the sign of the
// largest-magnitude entry (the first one on ties, as on the CPU).
__global__ void eig_sign_kernel(const double* E, double* sign, int64_t n) {
  __shared__ double bv[kMoThreads];
  __shared__ int64_t bi[kMoThreads];
  const int64_t c = blockIdx.x;
  const double* col = E + (n - 1 - c) * n;
  double best = -1.0;
  int64_t at = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double a = fabs(col[i]);
    if (a > best) { best = a; at = i; }  // indices ascend: ties keep the first
  }
  bv[threadIdx.x] = best;
  bi[threadIdx.x] = at;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const double ov = bv[threadIdx.x + s];
      const int64_t oi = bi[threadIdx.x + s];
      if (ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x])) {
        bv[threadIdx.x] = ov;
        bi[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) sign[c] = col[bi[0]] < 0 ? -1.0 : 1.0;
}

__global__ void eig_to_q_kernel(const double* E, const double* sign, float* Q, int64_t n) {
  MO_GRID_STRIDE(q, n * n) {
    const int64_t i = q / n, c = q % n;
    Q[q] = float(sign[c] * E[(n - 1 - c) * n + i]);
  }
}

struct SpectralParams {
  const double* W;
  double* f;
  int64_t n;
  SymFuncArgs a;
};

// std::max(x, 0.0) as the CPU reference computes it: negatives (rounding) to 0, but a NaN stays NaN
// so that a broken statistic shows in the result (fmax would turn it into 0).
__device__ __forceinline__ double clamp_eig(double x) { return x < 0.0 ? 0.0 : x; }

// One block. Thread 0 takes lmax and the Schatten sum serially over descending eigenvalues
// (the CPU's order); then every thread fills its share of f.
__global__ void spectral_f_kernel(SpectralParams p) {
  __shared__ double sh_scale, sh_eps, sh_base_min;
  const SymFuncArgs& a = p.a;
  if (threadIdx.x == 0) {
    double lmax = 0, s = 0;
    for (int64_t k = p.n - 1; k >= 0; --k) {
      const double l = clamp_eig(p.W[k] * a.input_scale);
      lmax = lmax < l ? l : lmax;  // std::max's rule, as on the CPU
      if (a.schatten_q > 0) s += pow(l, 0.5 * a.schatten_q);
    }
    double scale = a.scale;
    if (a.schatten_q > 0) scale *= s > 0 ? pow(s, a.schatten_pow / a.schatten_q) : 1.0;
    sh_scale = scale;
    sh_eps = a.relative_eps ? a.eps * lmax : a.eps;
    sh_base_min = a.base_floor_rel > 0 ? a.base_floor_rel * pow(lmax, a.root) : 0.0;
  }
  __syncthreads();
  const double scale = sh_scale, eps = sh_eps, base_min = sh_base_min;
  for (int64_t k = threadIdx.x; k < p.n; k += blockDim.x) {
    const double l = clamp_eig(p.W[k] * a.input_scale);
    double base = pow(l, a.root) + eps;
    base = base < base_min ? base_min : base;  // std::max's rule, as on the CPU
    p.f[k] = base > 0 ? scale * pow(base, a.power) : 0.0;  // 0^negative: the null space
  }
}

__global__ void scale_cols_kernel(const double* E, const double* f, double* EF, int64_t n) {
  MO_GRID_STRIDE(q, n * n) EF[q] = E[q] * f[q / n];  // column-major: column k = q / n
}

__global__ void sym_cast_kernel(const double* R, float* out, int64_t n) {
  MO_GRID_STRIDE(q, n * n) {
    const int64_t i = q / n, j = q % n;
    out[q] = float(0.5 * (R[q] + R[j * n + i]));
  }
}

}  // namespace

// ---- entries ---------------------------------------------------------------------------------

void op_block_copy(const Ctx& ctx, const Tensor& src, int64_t sr, int64_t sc, Tensor& dst,
                   int64_t dr, int64_t dc, int64_t rows, int64_t cols) {
  contract::block_copy(contract::kCuda, src, sr, sc, dst, dr, dc, rows, cols);
  if (rows == 0 || cols == 0) return;
  const int64_t ls = src.dim(1), ld = dst.dim(1);
  const float* s = src.data<float>() + sr * ls + sc;
  float* d = dst.data<float>() + dr * ld + dc;
  const size_t width = size_t(cols) * sizeof(float);
  const char *s0 = static_cast<const char*>(src.ptr), *d0 = static_cast<const char*>(dst.ptr);
  const bool overlap = s0 < d0 + dst.nbytes() && d0 < s0 + src.nbytes();
  if (!overlap) {
    CUDA_CHECK(cudaMemcpy2DAsync(d, size_t(ld) * sizeof(float), s, size_t(ls) * sizeof(float),
                                 width, size_t(rows), cudaMemcpyDeviceToDevice, ctx.stream));
    return;
  }
  // One buffer, possibly overlapping windows (the CPU's memmove semantics): via scratch.
  float* tmp = static_cast<float*>(ctx.scratch->get(size_t(rows) * width));
  CUDA_CHECK(cudaMemcpy2DAsync(tmp, width, s, size_t(ls) * sizeof(float), width, size_t(rows),
                               cudaMemcpyDeviceToDevice, ctx.stream));
  CUDA_CHECK(cudaMemcpy2DAsync(d, size_t(ld) * sizeof(float), tmp, width, width, size_t(rows),
                               cudaMemcpyDeviceToDevice, ctx.stream));
}

// The contract is f32 and this path serves Polar Express (first coefficients 8.2 / -22.5 / 15.9)
// and Kaon (a chaotic map, which amplifies every rounding step by step): in bf16 the rounding
// of X would dominate the comparison with the CPU, so the three GEMMs per step run in fp32 with
// CUBLAS_COMPUTE_32F (no TF32). The plain quintic Muon keeps its bf16 path (op_newton_schulz);
// both run kernels/muon.cu's run_newton_schulz (batched over a stack [k,r,c]).
void op_newton_schulz_coeffs(const Ctx& ctx, const Tensor& U, Tensor& O,
                             const std::vector<float>& coeffs, float norm_mult) {
  contract::newton_schulz_coeffs(contract::kCuda, U, O, coeffs, norm_mult);
  check_ns_slices("newton_schulz_coeffs", U);
  run_newton_schulz(ctx, DType::F32, U, O, coeffs, double(norm_mult));
}

void op_normuon_normalize(const Ctx& ctx, Tensor& O, Tensor& v, float beta2, float eps) {
  const char* op = "normuon_normalize";
  contract::normuon_normalize(contract::kCuda, O, v);
  const int64_t r = O.dim(0), c = O.dim(1);
  if (r == 0 || c == 0) return;
  MF_CHECK(r <= int64_t(0x7fffffff), op, ": ", r, " rows are too many for one launch");
  const int nparts = reduce_partials_count(O.numel());
  Arena sz;
  sz.take<double>(nparts);
  sz.take<double>(2);
  Arena ar(ctx.scratch->get(sz.used()));
  double* partials = ar.take<double>(nparts);
  double* norms = ar.take<double>(2);  // ||O||^2 before and after
  float* o = O.data<float>();
  launch_sum_squares_f32(o, O.numel(), norms, partials, ctx.stream);
  NorMuonParams p{o, v.data<float>(), r, c, beta2, eps};
  normuon_rows_kernel<<<unsigned(r), kMoThreads, 0, ctx.stream>>>(p);
  CUDA_CHECK_LAUNCH();
  launch_sum_squares_f32(o, O.numel(), norms + 1, partials, ctx.stream);
  rescale_kernel<<<mo_blocks(O.numel()), kMoThreads, 0, ctx.stream>>>(o, O.numel(), norms,
                                                                       norms + 1);
  CUDA_CHECK_LAUNCH();
}

void op_cautious_decay(const Ctx& ctx, Tensor& p, const Tensor& u, float decay) {
  contract::cautious_decay(contract::kCuda, p, u);
  const int64_t n = p.numel();
  if (n == 0) return;
  cautious_decay_kernel<<<mo_blocks(n), kMoThreads, 0, ctx.stream>>>(p.data<float>(),
                                                                     u.data<float>(), n,
                                                                     1.0f - decay);
  CUDA_CHECK_LAUNCH();
}

void op_adam_precond(const Ctx& ctx, const Tensor& num, const Tensor& g, Tensor& v, Tensor& out,
                     float b2, float eps, float bc1, float bc2) {
  contract::adam_precond(contract::kCuda, num, g, v, out);
  const int64_t n = num.numel();
  if (n == 0) return;
  AdamPrecondParams p{num.data<float>(), g.data<float>(), v.data<float>(), out.data<float>(),
                      n, b2, eps, 1.0f / bc1, 1.0f / bc2};
  adam_precond_kernel<<<mo_blocks(n), kMoThreads, 0, ctx.stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

// ---- launchers ---------------------------------------------------------------------------------

void launch_sym_prepare(const float* S, double* A, int* bad, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  sym_prepare_kernel<<<mo_blocks(n * n), kMoThreads, 0, stream>>>(S, A, bad, n);
  CUDA_CHECK_LAUNCH();
}

void launch_eig_to_q(const double* E, float* Q, double* sign, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  MF_CHECK(n <= int64_t(0x7fffffff), "sym_eig: n = ", n, " is too large");
  eig_sign_kernel<<<unsigned(n), kMoThreads, 0, stream>>>(E, sign, n);
  CUDA_CHECK_LAUNCH();
  eig_to_q_kernel<<<mo_blocks(n * n), kMoThreads, 0, stream>>>(E, sign, Q, n);
  CUDA_CHECK_LAUNCH();
}

void launch_spectral_f(const double* W, double* f, int64_t n, const SymFuncArgs& a,
                       cudaStream_t stream) {
  if (n == 0) return;
  spectral_f_kernel<<<1, kMoThreads, 0, stream>>>(SpectralParams{W, f, n, a});
  CUDA_CHECK_LAUNCH();
}

void launch_scale_cols(const double* E, const double* f, double* EF, int64_t n,
                       cudaStream_t stream) {
  if (n == 0) return;
  scale_cols_kernel<<<mo_blocks(n * n), kMoThreads, 0, stream>>>(E, f, EF, n);
  CUDA_CHECK_LAUNCH();
}

void launch_sym_cast(const double* R, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  sym_cast_kernel<<<mo_blocks(n * n), kMoThreads, 0, stream>>>(R, out, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace mf::cuda
