// Muon momentum (elementwise) and Newton-Schulz (device norms + cast kernels around cuBLASLt),
// batched over a stack of same-shape matrices.
#include "muon.cuh"

#include <vector>

#include "backend/cuda/cublaslt.h"

namespace mf::cuda {

constexpr int kMuonThreads = 256;
constexpr int64_t kMuonMaxBlocks = 8192;
// X = U / (norm_mult ||U||_F + kNsNormEps), as in Keller Jordan's Muon and the CPU backend.
constexpr double kNsNormEps = 1e-7;

struct MomentumParams {
  const float* g;
  float* M;
  float* U;
  int64_t n;
  float mu, grad_scale;
  bool nesterov;
};

__global__ void muon_momentum_kernel(MomentumParams p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const float gi = p.g[i] * p.grad_scale;  // read before U[i] is written: U may alias g
    const float mi = p.mu * p.M[i] + gi;
    p.M[i] = mi;
    p.U[i] = p.nesterov ? gi + p.mu * mi : mi;
  }
}

// ---- batched Newton-Schulz: k independent [r,c] slices -------------------------------------------
// Per-slice sum of squares: grid (P, k) blocks each reduce a fixed strided set of one slice in
// double, then one block per slice adds its P partials in order (no atomics: deterministic).
constexpr int kNsSsThreads = 256;
constexpr int64_t kNsSsElemsPerBlock = int64_t(kNsSsThreads) * 16;
constexpr int64_t kNsSsMaxBlocks = 256;  // per slice
constexpr int64_t kNsMaxGridY = 65535;   // slices beyond this are looped over
// Slice strides of the X / A / B buffers are rounded up to 8 elements (16 bytes in bf16) so
// every slice of a strided-batched GEMM keeps the alignment of the first one.
constexpr int64_t kNsStrideAlign = 8;

static_assert((kNsSsMaxBlocks + 1) * sizeof(double) + 4 * (kNsStrideAlign - 1) * sizeof(float) <=
                  kNsScratchPerSliceBytes,
              "the memory plan's Newton-Schulz scratch bound (backend/cuda/sizes.h)");
static_assert(6 * Arena::kAlign <= kNsScratchFixedBytes,
              "the memory plan's Newton-Schulz scratch bound (backend/cuda/sizes.h)");

static int64_t ns_ss_blocks(int64_t per) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(per, kNsSsElemsPerBlock), kNsSsMaxBlocks));
}
static int64_t ns_stride(int64_t elems) { return ceil_div(elems, kNsStrideAlign) * kNsStrideAlign; }

__global__ void __launch_bounds__(kNsSsThreads)
    ns_sumsq_partial_kernel(const float* U, int64_t k, int64_t per, double* partials) {
  __shared__ double red[32];
  for (int64_t s = blockIdx.y; s < k; s += gridDim.y) {
    const float* x = U + s * per;
    double acc = 0;
    for (int64_t i = int64_t(blockIdx.x) * kNsSsThreads + threadIdx.x; i < per;
         i += int64_t(gridDim.x) * kNsSsThreads)
      acc += double(x[i]) * double(x[i]);
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) partials[s * gridDim.x + blockIdx.x] = acc;
  }
}

__global__ void __launch_bounds__(kNsSsThreads)
    ns_sumsq_final_kernel(const double* partials, int64_t nparts, double* ss) {
  __shared__ double red[32];
  const int64_t s = blockIdx.x;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < nparts; i += kNsSsThreads) acc += partials[s * nparts + i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) ss[s] = acc;
}

template <typename TX>
struct NsCastParams {
  const float* U;    // prepare: input [k,r,c], r <= c
  float* O;          // finish: output [k,r,c]
  TX* X;             // k slices [r,c] with slice stride xs
  const double* ss;  // prepare: ||U_s||_F^2 of every slice, on the device
  int64_t k, per, xs;  // per = r * c
  double norm_mult;
};

// Square and wide matrices (r <= c, X_s = U_s): X_s = U_s * inv_s, one thread per element,
// inv_s = 1 / (norm_mult ||U_s||_F + 1e-7): the CPU backend's formula. Slices along the grid's y
// (looping past 65535), elements along x: no 64-bit division per element, inv_s once per slice.
template <typename TX>
__global__ void ns_prepare_kernel(NsCastParams<TX> p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t s = blockIdx.y; s < p.k; s += gridDim.y) {
    const float inv = float(1.0 / (p.norm_mult * sqrt(p.ss[s]) + kNsNormEps));
    const float* u = p.U + s * p.per;
    TX* x = p.X + s * p.xs;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.per; e += stride)
      x[e] = from_f<TX>(u[e] * inv);
  }
}

// O_s = X_s back in f32 (r <= c), one thread per element, slices as in ns_prepare_kernel.
template <typename TX>
__global__ void ns_finish_kernel(NsCastParams<TX> p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t s = blockIdx.y; s < p.k; s += gridDim.y) {
    const TX* x = p.X + s * p.xs;
    float* o = p.O + s * p.per;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.per; e += stride)
      o[e] = to_f(x[e]);
  }
}

// Tall matrices (r > c): X_s = U_s^T * inv_s (prepare) and O_s = X_s^T (finish) as a tiled
// transpose through shared memory, so both the reads and the writes are coalesced (one thread
// per element would stride one side by the row length). out_s[b,a] = in_s[a,b] * inv_s for
// in_s [A,B] (slice stride in_stride) and out_s [B,A] (slice stride out_stride); inv_s as in
// ns_prepare_kernel when ss is given, else 1 (the same bits as the element-wise kernels: one
// f32 product, one rounding to TO).
constexpr int kNsTile = 32, kNsTileRows = 8;
template <typename TI, typename TO, bool SCALE>
__global__ void __launch_bounds__(kNsTile * kNsTileRows)
    ns_transpose_kernel(const TI* in, int64_t in_stride, TO* out, int64_t out_stride, int64_t A,
                        int64_t B, const double* ss, double norm_mult) {
  __shared__ float tile[kNsTile][kNsTile + 1];
  const int64_t s = blockIdx.z;  // one slice per z (the launcher splits k into grids)
  const int64_t a0 = int64_t(blockIdx.y) * kNsTile, b0 = int64_t(blockIdx.x) * kNsTile;
  const TI* I = in + s * in_stride;
  TO* O = out + s * out_stride;
  for (int y = threadIdx.y; y < kNsTile; y += kNsTileRows) {
    const int64_t a = a0 + y, b = b0 + threadIdx.x;
    if (a < A && b < B) tile[y][threadIdx.x] = to_f(I[a * B + b]);
  }
  __syncthreads();
  float inv = 1.f;
  if constexpr (SCALE) inv = float(1.0 / (norm_mult * sqrt(ss[s]) + kNsNormEps));
  for (int y = threadIdx.y; y < kNsTile; y += kNsTileRows) {
    const int64_t b = b0 + y, a = a0 + threadIdx.x;
    if (a < A && b < B)
      O[b * A + a] = from_f<TO>(SCALE ? tile[threadIdx.x][y] * inv : tile[threadIdx.x][y]);
  }
}

template <bool SCALE, typename TI, typename TO>
void launch_ns_transpose(const TI* in, int64_t in_stride, TO* out, int64_t out_stride, int64_t A,
                         int64_t B, int64_t k, const double* ss, double norm_mult,
                         cudaStream_t stream) {
  const int64_t gx = ceil_div(B, int64_t(kNsTile)), gy = ceil_div(A, int64_t(kNsTile));
  MF_CHECK(gx <= 0x7fffffff && gy <= 65535, "newton_schulz: a ", A, " x ", B,
           " matrix is beyond the transpose grid (at most ", 65535 * kNsTile, " rows)");
  for (int64_t s0 = 0; s0 < k; s0 += 65535) {  // gridDim.z holds 65535 slices per launch
    const int64_t kz = std::min<int64_t>(k - s0, 65535);
    const dim3 grid{unsigned(gx), unsigned(gy), unsigned(kz)};
    ns_transpose_kernel<TI, TO, SCALE><<<grid, dim3(kNsTile, kNsTileRows), 0, stream>>>(
        in + s0 * in_stride, in_stride, out + s0 * out_stride, out_stride, A, B,
        SCALE ? ss + s0 : nullptr, norm_mult);
    CUDA_CHECK_LAUNCH();
  }
}

static unsigned elt_blocks(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kMuonThreads), kMuonMaxBlocks)));
}
// k slices of `per` elements each: x covers a slice (the grid at most kMuonMaxBlocks blocks in
// all), y the slices.
static dim3 slice_grid(int64_t per, int64_t k) {
  const int64_t ys = std::max<int64_t>(1, std::min<int64_t>(k, 65535));
  const int64_t xs = std::max<int64_t>(1, std::min<int64_t>(ceil_div(per, kMuonThreads),
                                                            std::max<int64_t>(1, kMuonMaxBlocks / ys)));
  return dim3(unsigned(xs), unsigned(ys));
}

void op_muon_momentum(const Ctx& ctx, const Tensor& g, Tensor& M, Tensor& U, float mu,
                      bool nesterov, float grad_scale) {
  contract::muon_momentum(contract::kCuda, g, M, U);
  MomentumParams p{g.data<float>(), M.data<float>(), U.data<float>(), g.numel(), mu, grad_scale,
                   nesterov};
  if (p.n == 0) return;
  muon_momentum_kernel<<<elt_blocks(p.n), kMuonThreads, 0, ctx.stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

void ns_iteration(const Ctx& ctx, DType dt, const void* X, void* A, void* B, void* Xn, int64_t m,
                  int64_t n, int64_t k, int64_t xs, int64_t as, float a, float b, float c) {
  GemmArgs g;  // A (=) X X^T   [m,m]
  g.transB = true;
  g.M = m; g.N = m; g.K = n;
  g.A = X; g.lda = n; g.B = X; g.ldb = n; g.D = A; g.ldd = m;
  g.ab = dt; g.cd = dt; g.alpha = 1.f; g.beta = 0.f;
  g.batch = k; g.strideA = xs; g.strideB = xs; g.strideD = as;
  ctx.lt->gemm(g);

  g = GemmArgs{};  // B (=) b A + c A A   [m,m]
  g.M = m; g.N = m; g.K = m;
  g.A = A; g.lda = m; g.B = A; g.ldb = m; g.C = A; g.ldc = m; g.D = B; g.ldd = m;
  g.ab = dt; g.cd = dt; g.alpha = c; g.beta = b;
  g.batch = k; g.strideA = as; g.strideB = as; g.strideC = as; g.strideD = as;
  ctx.lt->gemm(g);

  g = GemmArgs{};  // Xn (=) a X + B X   [m,n]
  g.M = m; g.N = n; g.K = m;
  g.A = B; g.lda = m; g.B = X; g.ldb = n; g.C = X; g.ldc = n; g.D = Xn; g.ldd = n;
  g.ab = dt; g.cd = dt; g.alpha = 1.f; g.beta = a;
  g.batch = k; g.strideA = as; g.strideB = xs; g.strideC = xs; g.strideD = xs;
  ctx.lt->gemm(g);
}

namespace {

template <typename TX>
void run_newton_schulz_t(const Ctx& ctx, DType dt, const Tensor& U, Tensor& O,
                         const std::vector<float>& coeffs, double norm_mult) {
  const bool stack = U.ndim() == 3;
  const int64_t k = stack ? U.dim(0) : 1, r = U.dim(-2), cols = U.dim(-1);
  if (k == 0 || r == 0 || cols == 0) return;
  const bool transposed = r > cols;
  const int64_t m = transposed ? cols : r, n = transposed ? r : cols;
  const int64_t per = r * cols, xs = ns_stride(m * n), as = ns_stride(m * m);
  const int64_t P = ns_ss_blocks(per);

  Arena sz;
  sz.take<double>(size_t(k * P));
  sz.take<double>(size_t(k));
  for (int i = 0; i < 2; ++i) sz.take<TX>(size_t(k * xs));
  for (int i = 0; i < 2; ++i) sz.take<TX>(size_t(k * as));
  Arena ar(ctx.scratch->get(sz.used()));
  double* partials = ar.take<double>(size_t(k * P));
  double* ss = ar.take<double>(size_t(k));
  TX* X = ar.take<TX>(size_t(k * xs));
  TX* Xn = ar.take<TX>(size_t(k * xs));
  TX* A = ar.take<TX>(size_t(k * as));
  TX* B = ar.take<TX>(size_t(k * as));

  const float* u = U.data<float>();
  const dim3 ss_grid(unsigned(P), unsigned(std::min(k, kNsMaxGridY)));
  ns_sumsq_partial_kernel<<<ss_grid, kNsSsThreads, 0, ctx.stream>>>(u, k, per, partials);
  CUDA_CHECK_LAUNCH();
  ns_sumsq_final_kernel<<<unsigned(k), kNsSsThreads, 0, ctx.stream>>>(partials, P, ss);
  CUDA_CHECK_LAUNCH();
  NsCastParams<TX> cp{u, O.data<float>(), X, ss, k, per, xs, norm_mult};
  if (transposed) {  // U_s [n,m] -> X_s [m,n] through coalesced tiles
    launch_ns_transpose<true, float, TX>(u, per, X, xs, n, m, k, ss, norm_mult, ctx.stream);
  } else {
    ns_prepare_kernel<TX><<<slice_grid(per, k), kMuonThreads, 0, ctx.stream>>>(cp);
    CUDA_CHECK_LAUNCH();
  }

  for (size_t it = 0; it + 2 < coeffs.size(); it += 3) {
    ns_iteration(ctx, dt, X, A, B, Xn, m, n, k, xs, as, coeffs[it], coeffs[it + 1],
                 coeffs[it + 2]);
    std::swap(X, Xn);
  }
  cp.X = X;
  if (transposed) {  // X_s [m,n] -> O_s [n,m]
    launch_ns_transpose<false, TX, float>(X, xs, O.data<float>(), per, m, n, k, nullptr, 1.0,
                                          ctx.stream);
  } else {
    ns_finish_kernel<TX><<<slice_grid(per, k), kMuonThreads, 0, ctx.stream>>>(cp);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

void check_ns_slices(const char* op, const Tensor& U) {
  MF_CHECK(U.ndim() == 2 || U.dim(0) <= int64_t(0x7fffffff), op, ": ", U.dim(0),
           " slices are too many for one call");
}

void run_newton_schulz(const Ctx& ctx, DType dt, const Tensor& U, Tensor& O,
                       const std::vector<float>& coeffs, double norm_mult) {
  if (dt == DType::BF16) return run_newton_schulz_t<bf16>(ctx, dt, U, O, coeffs, norm_mult);
  if (dt == DType::F32) return run_newton_schulz_t<float>(ctx, dt, U, O, coeffs, norm_mult);
  MF_FAIL("newton_schulz: X dtype ", dtype_name(dt), " is not supported (bf16 or f32)");
}

void op_newton_schulz(const Ctx& ctx, const Tensor& U, Tensor& O, int steps, float a, float b,
                      float c, DType dt) {
  contract::newton_schulz(contract::kCuda, U, O, steps);
  check_ns_slices("newton_schulz", U);
  std::vector<float> coeffs;
  for (int i = 0; i < steps; ++i) coeffs.insert(coeffs.end(), {a, b, c});
  run_newton_schulz(ctx, dt, U, O, coeffs, 1.0);
}

}  // namespace mf::cuda
