// cuBLASLt wrapper; see cublaslt.h for the row-major convention.
#include "backend/cuda/cublaslt.h"

#include <algorithm>

#include "common.cuh"
#include "matmul.cuh"

namespace mf::cuda {

namespace {

cudaDataType_t lt_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    default: break;
  }
  MF_FAIL("gemm: dtype ", dtype_name(t), " is not a GEMM operand type (f32 or bf16)");
}

// Largest power of two <= 16 dividing both the address and the row pitch in bytes.
int alignment(const void* p, int64_t ld, size_t esize) {
  const uint64_t a = reinterpret_cast<uintptr_t>(p), pitch = uint64_t(ld) * esize;
  int al = 16;
  while (al > 1 && ((a % al) != 0 || (pitch % al) != 0)) al /= 2;
  return al;
}

}  // namespace

struct CublasLt::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;  // false: no cuBLASLt algorithm, use the fallback kernel
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

CublasLt::CublasLt(cudaStream_t stream) : stream_(stream) {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
}

CublasLt::~CublasLt() {
  plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

CublasLt::Plan* CublasLt::plan_for(const GemmArgs& g, int64_t ldc) {
  const size_t eab = dtype_size(g.ab), ecd = dtype_size(g.cd);
  const void* C = g.C ? g.C : g.D;
  const int alA = alignment(g.A, g.lda, eab), alB = alignment(g.B, g.ldb, eab);
  const int alC = alignment(C, ldc, ecd), alD = alignment(g.D, g.ldd, ecd);
  Key key{int(g.transA), int(g.transB), g.M, g.N, g.K, g.lda, g.ldb, ldc, g.ldd, int(g.ab),
          int(g.cd), alA, alB, alC, alD, int(g.beta != 0.f)};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second.get();

  auto plan = std::make_unique<Plan>();
  // Column-major view: D^T [N,M] = op(B)^T [N,K] * op(A)^T [K,M].
  const cublasOperation_t ta = g.transB ? CUBLAS_OP_T : CUBLAS_OP_N;  // first operand = B
  const cublasOperation_t tb = g.transA ? CUBLAS_OP_T : CUBLAS_OP_N;  // second operand = A
  const uint64_t m = uint64_t(g.N), n = uint64_t(g.M), k = uint64_t(g.K);
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  const cudaDataType_t tab = lt_type(g.ab), tcd = lt_type(g.cd);
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, tab, ta == CUBLAS_OP_N ? m : k,
                                          ta == CUBLAS_OP_N ? k : m, g.ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, tab, tb == CUBLAS_OP_N ? k : n,
                                          tb == CUBLAS_OP_N ? n : k, g.lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, tcd, m, n, ldc));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->d, tcd, m, n, g.ldd));

  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspaceBytes;
  const uint32_t a32 = uint32_t(alB), b32 = uint32_t(alA), c32 = uint32_t(alC), d32 = uint32_t(alD);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a32, sizeof a32);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b32, sizeof b32);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c32, sizeof c32);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &d32, sizeof d32);
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b,
                                                           plan->c, plan->d, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS) {
    plan->algo = res.algo;
    plan->ok = true;
  }
  Plan* p = plan.get();
  plans_.emplace(key, std::move(plan));
  return p;
}

void CublasLt::gemm(const GemmArgs& g) {
  MF_CHECK(g.M >= 0 && g.N >= 0 && g.K >= 0, "gemm: negative size M=", g.M, " N=", g.N, " K=", g.K);
  MF_CHECK(g.ab == DType::BF16 || g.ab == DType::F32, "gemm: A/B dtype ", dtype_name(g.ab),
           " is not supported (bf16 or f32)");
  MF_CHECK(g.cd == DType::BF16 || g.cd == DType::F32, "gemm: C/D dtype ", dtype_name(g.cd),
           " is not supported (bf16 or f32)");
  MF_CHECK(!(g.ab == DType::F32 && g.cd == DType::BF16),
           "gemm: f32 operands with a bf16 output are not supported");
  if (g.M == 0 || g.N == 0) return;
  const int64_t ldc = g.ldc ? g.ldc : g.ldd;
  MF_CHECK(g.lda >= std::max<int64_t>(1, g.transA ? g.M : g.K) &&
               g.ldb >= std::max<int64_t>(1, g.transB ? g.K : g.N) && g.ldd >= g.N && ldc >= g.N,
           "gemm: leading dimensions too small (lda=", g.lda, " ldb=", g.ldb, " ldd=", g.ldd,
           ") for M=", g.M, " N=", g.N, " K=", g.K);
  Plan* p = (g.K == 0 || force_fallback_) ? nullptr : plan_for(g, ldc);
  if (p && p->ok) {
    const void* C = g.C ? g.C : g.D;
    const cublasStatus_t st = cublasLtMatmul(handle_, p->op, &g.alpha, g.B, p->a, g.A, p->b,
                                             &g.beta, C, p->c, g.D, p->d, &p->algo, workspace_,
                                             kWorkspaceBytes, stream_);
    if (st == CUBLAS_STATUS_SUCCESS) return;
    // An algorithm the heuristic offered but that rejects this layout: remember, fall back.
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) CUBLAS_CHECK(st);
    p->ok = false;
  }
  ++fallback_calls_;
  GemmArgs f = g;
  f.ldc = ldc;
  if (!f.C) f.C = f.D;
  launch_gemm_fallback(f, stream_);
}

}  // namespace mf::cuda
