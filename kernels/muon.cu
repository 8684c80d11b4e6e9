// Muon momentum (elementwise) and Newton-Schulz (device norm + cast kernels around cuBLASLt).
#include "muon.cuh"

#include "backend/cuda/cublaslt.h"
#include "reduce.cuh"

namespace mf::cuda {

constexpr int kMuonThreads = 256;
constexpr int64_t kMuonMaxBlocks = 8192;
constexpr float kNsNormEps = 1e-7f;  // X = U / (||U||_F + kNsNormEps), as in Keller Jordan's Muon

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

struct NsCastParams {
  const float* U;    // prepare: input [r,c]
  float* O;          // finish: output [r,c]
  bf16* X;           // [m,n], m = min(r,c), n = max(r,c)
  const double* ss;  // prepare: ||U||_F^2 on the device
  int64_t r, c;
  bool transposed;   // r > c: X = U^T
};

// X[i,j] = U[i,j] * inv (or U[j,i] * inv when transposed), one thread per X element.
__global__ void ns_prepare_kernel(NsCastParams p) {
  const float inv = float(1.0 / (sqrt(*p.ss) + double(kNsNormEps)));
  const int64_t total = p.r * p.c;
  const int64_t n = p.transposed ? p.r : p.c, m = p.transposed ? p.c : p.r;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    const int64_t i = q / n, j = q % n;  // X row i, column j
    const float u = p.transposed ? p.U[j * m + i] : p.U[q];
    p.X[q] = __float2bfloat16(u * inv);
  }
}

// O[q] from X, one thread per O element.
__global__ void ns_finish_kernel(NsCastParams p) {
  const int64_t total = p.r * p.c;
  const int64_t n = p.transposed ? p.r : p.c, m = p.transposed ? p.c : p.r;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    float x;
    if (p.transposed) {
      const int64_t j = q / m, i = q % m;  // O is [n, m] = X^T
      x = __bfloat162float(p.X[i * n + j]);
    } else {
      x = __bfloat162float(p.X[q]);
    }
    p.O[q] = x;
  }
}

static unsigned elt_blocks(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kMuonThreads), kMuonMaxBlocks)));
}

void op_muon_momentum(const Ctx& ctx, const Tensor& g, Tensor& M, Tensor& U, float mu,
                      bool nesterov, float grad_scale) {
  const char* op = "muon_momentum";
  check_dtype(op, "grad", g, DType::F32);
  check_dtype(op, "momentum_buffer", M, DType::F32);
  check_dtype(op, "output U", U, DType::F32);
  MF_CHECK(M.shape == g.shape && U.shape == g.shape, op, ": ", describe("momentum_buffer", M),
           " and ", describe("output U", U), " must have the shape of ", describe("grad", g));
  MomentumParams p{g.data<float>(), M.data<float>(), U.data<float>(), g.numel(), mu, grad_scale,
                   nesterov};
  if (p.n == 0) return;
  muon_momentum_kernel<<<elt_blocks(p.n), kMuonThreads, 0, ctx.stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

void ns_iteration(const Ctx& ctx, DType dt, const void* X, void* A, void* B, void* Xn, int64_t m,
                  int64_t n, float a, float b, float c) {
  GemmArgs g;  // A (=) X X^T   [m,m]
  g.transB = true;
  g.M = m; g.N = m; g.K = n;
  g.A = X; g.lda = n; g.B = X; g.ldb = n; g.D = A; g.ldd = m;
  g.ab = dt; g.cd = dt; g.alpha = 1.f; g.beta = 0.f;
  ctx.lt->gemm(g);

  g = GemmArgs{};  // B (=) b A + c A A   [m,m]
  g.M = m; g.N = m; g.K = m;
  g.A = A; g.lda = m; g.B = A; g.ldb = m; g.C = A; g.ldc = m; g.D = B; g.ldd = m;
  g.ab = dt; g.cd = dt; g.alpha = c; g.beta = b;
  ctx.lt->gemm(g);

  g = GemmArgs{};  // Xn (=) a X + B X   [m,n]
  g.M = m; g.N = n; g.K = m;
  g.A = B; g.lda = m; g.B = X; g.ldb = n; g.C = X; g.ldc = n; g.D = Xn; g.ldd = n;
  g.ab = dt; g.cd = dt; g.alpha = 1.f; g.beta = a;
  ctx.lt->gemm(g);
}

void op_newton_schulz(const Ctx& ctx, const Tensor& U, Tensor& O, int steps, float a, float b,
                      float c) {
  const char* op = "newton_schulz";
  check_dtype(op, "input", U, DType::F32);
  check_dtype(op, "output", O, DType::F32);
  MF_CHECK(U.ndim() == 2, op, ": input must be a matrix, got ", describe("U", U));
  MF_CHECK(O.shape == U.shape, op, ": ", describe("output", O), " must have the shape of ",
           describe("input", U));
  MF_CHECK(steps >= 0, op, ": steps must be >= 0, got ", steps);
  const int64_t r = U.dim(0), cols = U.dim(1);
  if (r == 0 || cols == 0) return;
  const bool transposed = r > cols;
  const int64_t m = transposed ? cols : r, n = transposed ? r : cols;

  const int nparts = reduce_partials_count();
  Arena sz;
  sz.take<double>(nparts);
  sz.take<double>(1);
  for (int i = 0; i < 2; ++i) sz.take<bf16>(size_t(m * n));
  for (int i = 0; i < 2; ++i) sz.take<bf16>(size_t(m * m));
  Arena ar(ctx.scratch->get(sz.used()));
  double* partials = ar.take<double>(nparts);
  double* ss = ar.take<double>(1);
  bf16* X = ar.take<bf16>(size_t(m * n));
  bf16* Xn = ar.take<bf16>(size_t(m * n));
  bf16* A = ar.take<bf16>(size_t(m * m));
  bf16* B = ar.take<bf16>(size_t(m * m));

  launch_sum_squares_f32(U.data<float>(), U.numel(), ss, partials, ctx.stream);
  NsCastParams cp{U.data<float>(), O.data<float>(), X, ss, r, cols, transposed};
  ns_prepare_kernel<<<elt_blocks(m * n), kMuonThreads, 0, ctx.stream>>>(cp);
  CUDA_CHECK_LAUNCH();

  for (int it = 0; it < steps; ++it) {
    ns_iteration(ctx, DType::BF16, X, A, B, Xn, m, n, a, b, c);
    std::swap(X, Xn);
  }
  cp.X = X;
  ns_finish_kernel<<<elt_blocks(m * n), kMuonThreads, 0, ctx.stream>>>(cp);
  CUDA_CHECK_LAUNCH();
}

}  // namespace mf::cuda
