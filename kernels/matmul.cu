// Linear layers through cuBLASLt, and the SIMT fallback GEMM. See matmul.cuh.
#include "matmul.cuh"

namespace mf::cuda {

// ---- fallback GEMM ----------------------------------------------------------------------------
constexpr int kGemmTile = 16;           // output tile is kGemmTile x kGemmTile, one thread each
constexpr int kGemmMaxGridY = 65535;    // row tiles beyond this are looped over
constexpr int kGemmMaxGridZ = 65535;    // batch entries beyond this are looped over

struct GemmFallbackParams {
  bool transA, transB;
  int64_t M, N, K, lda, ldb, ldc, ldd;
  const void* A;
  const void* B;
  const void* C;
  void* D;
  float alpha, beta;
  int64_t batch, strideA, strideB, strideC, strideD;  // strided batch (elements)
};

template <typename TAB, typename TCD>
__global__ void gemm_fallback_kernel(GemmFallbackParams p) {
  __shared__ float As[kGemmTile][kGemmTile + 1];
  __shared__ float Bs[kGemmTile][kGemmTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kGemmTile + tx;
  const int64_t row_tiles = (p.M + kGemmTile - 1) / kGemmTile;
  for (int64_t z = blockIdx.z; z < p.batch; z += gridDim.z) {
    const TAB* A = static_cast<const TAB*>(p.A) + z * p.strideA;
    const TAB* B = static_cast<const TAB*>(p.B) + z * p.strideB;
    const TCD* C = static_cast<const TCD*>(p.C) + z * p.strideC;
    TCD* D = static_cast<TCD*>(p.D) + z * p.strideD;
    for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
      const int64_t row = rt * kGemmTile + ty;
      const int64_t arow = rt * kGemmTile + ty;  // row of op(A) this thread loads
      float acc = 0.f;
      for (int64_t k0 = 0; k0 < p.K; k0 += kGemmTile) {
        const int64_t ak = k0 + tx, bk = k0 + ty;
        float a = 0.f, b = 0.f;
        if (arow < p.M && ak < p.K) a = to_f(p.transA ? A[ak * p.lda + arow] : A[arow * p.lda + ak]);
        if (bk < p.K && col < p.N) b = to_f(p.transB ? B[col * p.ldb + bk] : B[bk * p.ldb + col]);
        As[ty][tx] = a;
        Bs[ty][tx] = b;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kGemmTile; ++kk) acc += As[ty][kk] * Bs[kk][tx];
        __syncthreads();
      }
      if (row < p.M && col < p.N) {
        float v = p.alpha * acc;
        if (p.beta != 0.f) v += p.beta * to_f(C[row * p.ldc + col]);
        D[row * p.ldd + col] = from_f<TCD>(v);
      }
    }
  }
}

template <typename TAB, typename TCD>
void launch_gemm_fallback_t(const GemmFallbackParams& p, cudaStream_t stream) {
  const dim3 block(kGemmTile, kGemmTile);
  const int64_t gy = std::min<int64_t>(ceil_div(p.M, kGemmTile), kGemmMaxGridY);
  const int64_t gx = ceil_div(p.N, kGemmTile);
  const int64_t gz = std::min<int64_t>(p.batch, kGemmMaxGridZ);
  MF_CHECK(gx <= 0x7fffffff, "gemm fallback: N = ", p.N, " is too large");
  gemm_fallback_kernel<TAB, TCD>
      <<<dim3(unsigned(gx), unsigned(gy), unsigned(gz)), block, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

// Declared in backend/cuda/cublaslt.h; here so that every build of the kernels (the CPU emulator in
// tests/cuemu included) has it next to the fallback that also takes resolved arguments.
GemmArgs resolve_gemm(const GemmArgs& g) {
  GemmArgs r = g;
  r.ldc = g.ldc ? g.ldc : g.ldd;
  if (!r.C) {
    r.C = r.D;
    r.strideC = r.strideD;
  }
  if (r.batch == 1) r.strideA = r.strideB = r.strideC = r.strideD = 0;
  // With K = 0 nothing of A or B is read (D = beta C), so their leading dimensions are free, as
  // on the CPU backend (found by the emulator: cuemu_test_cuda_matrix_opt's {4, 6, 0} case).
  MF_CHECK((r.K == 0 || (r.lda >= std::max<int64_t>(1, r.transA ? r.M : r.K) &&
                         r.ldb >= std::max<int64_t>(1, r.transB ? r.K : r.N))) &&
               r.ldd >= r.N && r.ldc >= r.N,
           "gemm: leading dimensions too small (lda=", r.lda, " ldb=", r.ldb, " ldd=", r.ldd,
           ") for M=", r.M, " N=", r.N, " K=", r.K);
  if (r.batch > 1) {
    MF_CHECK(r.strideA >= 0 && r.strideB >= 0 && r.strideC >= 0,
             "gemm: batch strides must be >= 0 (strideA=", r.strideA, " strideB=", r.strideB,
             " strideC=", r.strideC, ")");
    MF_CHECK(r.strideD >= (r.M - 1) * r.ldd + r.N, "gemm: strideD=", r.strideD,
             " makes the ", r.batch, " outputs of ", r.M, "x", r.N, " (ldd=", r.ldd, ") overlap");
  }
  return r;
}

void launch_gemm_fallback(const GemmArgs& g, cudaStream_t stream) {
  if (g.M == 0 || g.N == 0 || g.batch < 1) return;
  const bool many = g.batch > 1;
  GemmFallbackParams p{g.transA, g.transB, g.M, g.N, g.K, g.lda, g.ldb,
                       g.ldc ? g.ldc : g.ldd, g.ldd, g.A, g.B, g.C ? g.C : g.D, g.D,
                       g.alpha, g.beta, g.batch,
                       many ? g.strideA : 0, many ? g.strideB : 0,
                       many ? (g.C ? g.strideC : g.strideD) : 0, many ? g.strideD : 0};
  if (g.ab == DType::BF16 && g.cd == DType::BF16) return launch_gemm_fallback_t<bf16, bf16>(p, stream);
  if (g.ab == DType::BF16 && g.cd == DType::F32) return launch_gemm_fallback_t<bf16, float>(p, stream);
  if (g.ab == DType::F32 && g.cd == DType::F32) return launch_gemm_fallback_t<float, float>(p, stream);
  MF_FAIL("gemm fallback: unsupported dtypes A/B ", dtype_name(g.ab), ", C/D ", dtype_name(g.cd));
}

// ---- linear entries ---------------------------------------------------------------------------
void op_matmul_fwd(const Ctx& ctx, const Tensor& x, const Tensor& W, Tensor& y) {
  const auto [N, in, out] = contract::matmul_fwd(contract::kCuda, x, W, y);
  GemmArgs g;
  g.transA = false; g.transB = true;
  g.M = N; g.N = out; g.K = in;
  g.A = x.ptr; g.lda = in;
  g.B = W.ptr; g.ldb = in;
  g.D = y.ptr; g.ldd = out;
  g.ab = x.dtype; g.cd = y.dtype;
  g.alpha = 1.f; g.beta = 0.f;
  ctx.lt->gemm(g);
}

void op_matmul_bwd(const Ctx& ctx, const Tensor& dy, const Tensor& x, const Tensor& W, Tensor* dx,
                   Tensor* dW, bool accumulate_dx) {
  const auto [N, in, out] = contract::matmul_bwd(contract::kCuda, dy, x, W, dx, dW);
  if (dx) {
    GemmArgs g;  // dx[N,in] = dy[N,out] W[out,in]
    g.M = N; g.N = in; g.K = out;
    g.A = dy.ptr; g.lda = out;
    g.B = W.ptr; g.ldb = in;
    g.D = dx->ptr; g.ldd = in;
    g.ab = W.dtype; g.cd = dx->dtype;
    g.alpha = 1.f; g.beta = accumulate_dx ? 1.f : 0.f;
    ctx.lt->gemm(g);
  }
  if (dW) {
    GemmArgs g;  // dW[out,in] += dy^T[out,N] x[N,in]
    g.transA = true;
    g.M = out; g.N = in; g.K = N;
    g.A = dy.ptr; g.lda = out;
    g.B = x.ptr; g.ldb = in;
    g.D = dW->ptr; g.ldd = in;
    g.ab = W.dtype; g.cd = dW->dtype;
    g.alpha = 1.f; g.beta = 1.f;
    ctx.lt->gemm(g);
  }
}

}  // namespace mf::cuda
