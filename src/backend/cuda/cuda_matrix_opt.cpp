// CudaBackend: the matrix-optimizer primitives (Backend's "matrix-optimizer primitives";
// callers in src/optim/matrix_opt.cpp and optimizer.cpp).
//
//  - gemm: fp32 cuBLASLt (CUBLAS_COMPUTE_32F, no TF32) through the backend's CublasLt wrapper,
//    which maps the row-major contract onto column-major and falls back to a SIMT kernel for
//    alignments cuBLASLt rejects (views at odd offsets of the flat statistics buffers).
//  - sym_eig / sym_func: cuSOLVER's dense syevd in double on a symmetrised double copy, then
//    small kernels (kernels/matrix_opt.cu) for the order / sign convention and the spectral
//    function, and a double cuBLAS GEMM for Q diag(f) Q^T. Each call synchronizes the stream
//    twice (the non-finite check before syevd and syevd's info after it); the callers decompose
//    only every `precond_every` steps.
//  - the rest are kernels in kernels/matrix_opt.cu.
// Device buffers come from the backend's grow-only scratch (allocated once, grown when a larger
// matrix comes); the library handles are created on first use and live with the backend.
#include <cublas_v2.h>
#include <cusolverDn.h>

#include <map>

#include "backend/cuda/cuda_backend.h"
#include "matrix_opt.cuh"

namespace mf {

namespace cuda {

#define CUSOLVER_CHECK(stmt)                                                                 \
  do {                                                                                       \
    const cusolverStatus_t mf_st_ = (stmt);                                                  \
    MF_CHECK(mf_st_ == CUSOLVER_STATUS_SUCCESS, "cuSOLVER error ", int(mf_st_), " in `", #stmt, \
             "`");                                                                           \
  } while (0)

struct MatOptLibs {
  cusolverDnHandle_t solver = nullptr;
  cublasHandle_t blas = nullptr;
  int* host = nullptr;            // pinned: [0] the non-finite flag, [1] syevd's info
  std::map<int64_t, int> lwork;   // syevd workspace (doubles) per n

  explicit MatOptLibs(cudaStream_t stream) {
    try {
      CUSOLVER_CHECK(cusolverDnCreate(&solver));
      CUSOLVER_CHECK(cusolverDnSetStream(solver, stream));
      CUBLAS_CHECK(cublasCreate(&blas));
      CUBLAS_CHECK(cublasSetStream(blas, stream));
      CUDA_CHECK(cudaMallocHost(&host, 2 * sizeof(int)));
    } catch (...) {
      release();
      throw;
    }
  }
  ~MatOptLibs() { release(); }
  MatOptLibs(const MatOptLibs&) = delete;
  MatOptLibs& operator=(const MatOptLibs&) = delete;

  void release() {  // no throw: errors at teardown have nothing left to protect
    if (host) cudaFreeHost(host);
    if (blas) cublasDestroy(blas);
    if (solver) cusolverDnDestroy(solver);
    host = nullptr;
    blas = nullptr;
    solver = nullptr;
  }

  // A, W: device buffers of the call's size (the query reads only n, but gets real pointers).
  int syevd_lwork(int64_t n, const double* A, const double* W) {
    auto it = lwork.find(n);
    if (it != lwork.end()) return it->second;
    int lw = 0;
    CUSOLVER_CHECK(cusolverDnDsyevd_bufferSize(solver, CUSOLVER_EIG_MODE_VECTOR,
                                               CUBLAS_FILL_MODE_UPPER, int(n), A, int(n), W,
                                               &lw));
    // The workspace (about 1 + 6n + 2n^2 doubles) is an int: it wraps from n ~ 32k on. Zero is
    // not documented as impossible (a 1x1 matrix may need none).
    MF_CHECK(lw >= 0, "cuSOLVER syevd: the workspace size for n = ", n,
             " does not fit its 32-bit count (", lw, ")");
    lwork.emplace(n, lw);
    return lw;
  }
};

namespace {

// Device buffers of one decomposition, carved from the backend's scratch.
struct EigBuffers {
  double* A = nullptr;   // [n,n] symmetrised input, then syevd's eigenvectors (column-major)
  double* W = nullptr;   // [n] eigenvalues, ascending
  double* work = nullptr;
  double* aux = nullptr;  // [n] signs (sym_eig) or f (sym_func)
  double* EF = nullptr;   // sym_func: [n,n] E diag(f)
  double* R = nullptr;    // sym_func: [n,n] E diag(f) E^T
  int* flags = nullptr;   // [0] non-finite input, [1] info
  int lwork = 0;
};

// syevd keeps its workspace size in an int (about 1 + 6n + 2n^2 doubles).
void check_syevd_size(const char* op, int64_t n) {
  MF_CHECK(n <= 32000, op, ": n = ", n,
           " is beyond cuSOLVER's 32-bit syevd (its 2n^2 workspace < 2^31)");
}

// syevd's workspace for n (queried once per n). The query gets real device buffers of the
// call's size: the scratch grows to (n^2 + n) doubles, less than the decomposition then takes.
int syevd_lwork(const Ctx& ctx, MatOptLibs& libs, int64_t n) {
  const size_t nn = size_t(n) * size_t(n);
  Arena pre;
  pre.take<double>(nn);
  pre.take<double>(size_t(n));
  Arena pa(ctx.scratch->get(pre.used()));
  const double* A0 = pa.take<double>(nn);
  return libs.syevd_lwork(n, A0, pa.take<double>(size_t(n)));
}

// The buffers of one decomposition in the order eig_buffers carves them; on a sizing arena
// (base null) only `used()` counts.
EigBuffers carve_eig(Arena& ar, int64_t n, int lwork, bool func) {
  const size_t nn = size_t(n) * size_t(n);
  EigBuffers b;
  b.lwork = lwork;
  b.A = ar.take<double>(nn);
  b.W = ar.take<double>(size_t(n));
  b.work = ar.take<double>(size_t(std::max(lwork, 1)));
  b.aux = ar.take<double>(size_t(n));
  if (func) {
    b.EF = ar.take<double>(nn);
    b.R = ar.take<double>(nn);
  }
  b.flags = ar.take<int>(2);
  return b;
}

size_t eig_scratch_bytes(int64_t n, int lwork, bool func) {
  Arena sz;
  carve_eig(sz, n, lwork, func);
  return sz.used();
}

EigBuffers eig_buffers(const Ctx& ctx, MatOptLibs& libs, int64_t n, bool func) {
  const int lwork = syevd_lwork(ctx, libs, n);
  Arena ar(ctx.scratch->get(eig_scratch_bytes(n, lwork, func)));
  return carve_eig(ar, n, lwork, func);
}

// Symmetrise S into b.A (double), refuse non-finite input, run syevd (eigenvectors in b.A,
// ascending eigenvalues in b.W). syevd's info is left in b.flags[1] for finish_eig.
void decompose(const char* op, const Ctx& ctx, MatOptLibs& libs, const Tensor& S, int64_t n,
               EigBuffers& b) {
  CUDA_CHECK(cudaMemsetAsync(b.flags, 0, 2 * sizeof(int), ctx.stream));
  launch_sym_prepare(S.data<float>(), b.A, b.flags, n, ctx.stream);
  CUDA_CHECK(cudaMemcpyAsync(libs.host, b.flags, sizeof(int), cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  MF_CHECK(libs.host[0] == 0, op, ": the ", n, "x", n,
           " matrix holds a non-finite value (diverged statistics: lower optim.lr or check the "
           "gradients)");
  CUSOLVER_CHECK(cusolverDnDsyevd(libs.solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER,
                                  int(n), b.A, int(n), b.W, b.work, b.lwork, b.flags + 1));
}

void finish_eig(const char* op, const Ctx& ctx, MatOptLibs& libs, int64_t n, EigBuffers& b) {
  CUDA_CHECK(cudaMemcpyAsync(libs.host + 1, b.flags + 1, sizeof(int), cudaMemcpyDeviceToHost,
                             ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  MF_CHECK(libs.host[1] == 0, op, ": cuSOLVER syevd failed on a ", n, "x", n,
           " matrix (info = ", libs.host[1], ": ",
           libs.host[1] > 0 ? "the iteration did not converge" : "an invalid argument", ")");
}

}  // namespace

}  // namespace cuda

cuda::MatOptLibs& CudaBackend::mo_libs() {
  if (!mo_) mo_ = std::make_shared<cuda::MatOptLibs>(stream_);
  return *mo_;
}

void CudaBackend::gemm(const Tensor& A, bool ta, const Tensor& B, bool tb, Tensor& C, float alpha,
                       float beta) {
  const auto [m, n, k] = contract::gemm(contract::kCuda, A, ta, B, tb, C);
  if (m == 0 || n == 0) return;
  // beta = 0: C is not read. cuBLAS promises this too; clearing it first also covers the
  // fallback kernel and costs one pass over C against the GEMM's k passes.
  if (beta == 0.f) CUDA_CHECK(cudaMemsetAsync(C.ptr, 0, C.nbytes(), stream_));
  cuda::GemmArgs g;
  g.transA = ta;
  g.transB = tb;
  g.M = m;
  g.N = n;
  g.K = k;
  g.A = A.ptr;
  g.lda = A.dim(1);
  g.B = B.ptr;
  g.ldb = B.dim(1);
  g.D = C.ptr;
  g.ldd = n;
  g.ab = DType::F32;
  g.cd = DType::F32;
  g.alpha = alpha;
  g.beta = beta;
  lt_->gemm(g);
}

void CudaBackend::block_copy(const Tensor& src, int64_t sr, int64_t sc, Tensor& dst, int64_t dr,
                             int64_t dc, int64_t rows, int64_t cols) {
  cuda::op_block_copy(ctx_, src, sr, sc, dst, dr, dc, rows, cols);
}

void CudaBackend::sym_eig(const Tensor& S, Tensor& Q) {
  const char* op = "sym_eig";
  contract::sym_square(contract::kCuda, op, S, "Q", Q);
  const int64_t n = S.dim(0);
  if (n == 0) return;
  cuda::check_syevd_size(op, n);
  cuda::MatOptLibs& libs = mo_libs();
  cuda::EigBuffers b = cuda::eig_buffers(ctx_, libs, n, false);
  cuda::decompose(op, ctx_, libs, S, n, b);
  cuda::finish_eig(op, ctx_, libs, n, b);  // before Q is written: a failure leaves it as it was
  cuda::launch_eig_to_q(b.A, Q.data<float>(), b.aux, n, stream_);
}

size_t CudaBackend::sym_scratch_bytes(int64_t n, bool func) {
  MF_CHECK(n >= 0, "sym_scratch_bytes: n must be >= 0, got ", n);
  if (n == 0) return 0;
  cuda::check_syevd_size(func ? "sym_func" : "sym_eig", n);
  return cuda::eig_scratch_bytes(n, cuda::syevd_lwork(ctx_, mo_libs(), n), func);
}

void CudaBackend::sym_func(const Tensor& S, const SymFuncArgs& a, Tensor& out) {
  const char* op = "sym_func";
  contract::sym_square(contract::kCuda, op, S, "out", out);
  const int64_t n = S.dim(0);
  if (n == 0) return;
  cuda::check_syevd_size(op, n);
  cuda::MatOptLibs& libs = mo_libs();
  cuda::EigBuffers b = cuda::eig_buffers(ctx_, libs, n, true);
  cuda::decompose(op, ctx_, libs, S, n, b);  // out may alias S: S is consumed here
  cuda::finish_eig(op, ctx_, libs, n, b);    // before out is written: a failure leaves it (and S)
  cuda::launch_spectral_f(b.W, b.aux, n, a, stream_);
  cuda::launch_scale_cols(b.A, b.aux, b.EF, n, stream_);
  // Column-major R = (E diag f) E^T, symmetric; the cast below symmetrises the rounding.
  const double one = 1.0, zero = 0.0;
  CUBLAS_CHECK(cublasDgemm(libs.blas, CUBLAS_OP_N, CUBLAS_OP_T, int(n), int(n), int(n), &one,
                           b.EF, int(n), b.A, int(n), &zero, b.R, int(n)));
  cuda::launch_sym_cast(b.R, out.data<float>(), n, stream_);
}

void CudaBackend::newton_schulz_coeffs(const Tensor& U, Tensor& O,
                                       const std::vector<float>& coeffs, float norm_mult) {
  cuda::op_newton_schulz_coeffs(ctx_, U, O, coeffs, norm_mult);
}

void CudaBackend::normuon_normalize(Tensor& O, Tensor& v, float beta2, float eps) {
  cuda::op_normuon_normalize(ctx_, O, v, beta2, eps);
}

void CudaBackend::cautious_decay(Tensor& p, const Tensor& u, float decay) {
  cuda::op_cautious_decay(ctx_, p, u, decay);
}

void CudaBackend::adam_precond(const Tensor& num, const Tensor& g, Tensor& v, Tensor& out,
                               float b2, float eps, float bc1, float bc2) {
  cuda::op_adam_precond(ctx_, num, g, v, out, b2, eps, bc1, bc2);
}

}  // namespace mf
