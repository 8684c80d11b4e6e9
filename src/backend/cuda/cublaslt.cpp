// cuBLASLt wrapper; see cublaslt.h for the row-major convention.
#include "backend/cuda/cublaslt.h"

#include <algorithm>
#include <climits>
#include <vector>

#include "common.cuh"
#include "core/log.h"
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

// Largest power of two <= 16 dividing the address, the row pitch and the batch stride in bytes
// (stride 0: one matrix, or the same one for every batch entry).
int alignment(const void* p, int64_t ld, int64_t stride, size_t esize) {
  const uint64_t a = reinterpret_cast<uintptr_t>(p), pitch = uint64_t(ld) * esize;
  const uint64_t bstride = uint64_t(stride) * esize;
  int al = 16;
  while (al > 1 && ((a % al) != 0 || (pitch % al) != 0 || (bstride % al) != 0)) al /= 2;
  return al;
}

// Strided batch on one layout: int32 count, int64 stride in elements (cublasLt.h).
void set_batch(cublasLtMatrixLayout_t l, int64_t batch, int64_t stride) {
  const int32_t count = int32_t(batch);
  const int64_t offset = stride;
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                sizeof count));
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                &offset, sizeof offset));
}

}  // namespace

struct CublasLt::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  // The heuristic's candidates, best first; algos[next] is the one in use. An algorithm that
  // answers NOT_SUPPORTED at run time is dropped for the next; none left: the fallback kernel.
  std::vector<cublasLtMatmulAlgo_t> algos;
  size_t next = 0;
  bool ok() const { return next < algos.size(); }
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

CublasLt::Plan* CublasLt::plan_for(const GemmArgs& g) {
  const size_t eab = dtype_size(g.ab), ecd = dtype_size(g.cd);
  const int64_t ldc = g.ldc;
  const int alA = alignment(g.A, g.lda, g.strideA, eab), alB = alignment(g.B, g.ldb, g.strideB, eab);
  const int alC = alignment(g.C, ldc, g.strideC, ecd), alD = alignment(g.D, g.ldd, g.strideD, ecd);
  const Key key{int64_t(g.transA), int64_t(g.transB), g.M, g.N, g.K, g.lda, g.ldb, ldc, g.ldd,
                int64_t(g.ab), int64_t(g.cd), alA, alB, alC, alD, int64_t(g.beta != 0.f),
                g.batch, g.strideA, g.strideB, g.strideC, g.strideD};
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
  if (g.batch > 1) {  // the first operand is B, the second A (see the column-major view above)
    set_batch(plan->a, g.batch, g.strideB);
    set_batch(plan->b, g.batch, g.strideA);
    set_batch(plan->c, g.batch, g.strideC);
    set_batch(plan->d, g.batch, g.strideD);
  }

  struct Pref {  // destroyed on every path, a throwing check included
    cublasLtMatmulPreference_t p = nullptr;
    ~Pref() {
      if (p) cublasLtMatmulPreferenceDestroy(p);
    }
  } pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.p));
  const uint64_t ws = kWorkspaceBytes;
  const uint32_t a32 = uint32_t(alB), b32 = uint32_t(alA), c32 = uint32_t(alC), d32 = uint32_t(alD);
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a32, sizeof a32));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b32, sizeof b32));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c32, sizeof c32));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &d32, sizeof d32));
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t res[kCandidates] = {};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      handle_, plan->op, plan->a, plan->b, plan->c, plan->d, pref.p, kCandidates, res, &found);
  // NOT_SUPPORTED (or no result) means cuBLASLt has no kernel for this GEMM; any other failure
  // is a descriptor this wrapper built wrong, which the fallback would hide behind a slow kernel.
  if (st != CUBLAS_STATUS_NOT_SUPPORTED) CUBLAS_CHECK(st);
  if (st == CUBLAS_STATUS_SUCCESS)
    for (int i = 0; i < std::min(found, kCandidates); ++i)
      if (res[i].state == CUBLAS_STATUS_SUCCESS) plan->algos.push_back(res[i].algo);
  if (plan->algos.empty()) warn_fallback(g, "cuBLASLt offers no algorithm");
  Plan* p = plan.get();
  plans_.emplace(key, std::move(plan));
  return p;
}

// Once per GEMM plan (shape, layout, types, alignment): the SIMT fallback kernel is correct but
// far slower than cuBLASLt, so a run that lands there says so.
void CublasLt::warn_fallback(const GemmArgs& g, const char* why) {
  spdlog::warn("{} for the GEMM {}{} M={} N={} K={} (lda {}, ldb {}, ldd {}, {} x {} -> {}, batch {}): it "
               "runs on the slow SIMT fallback kernel (kernels/matmul.cu)",
               why, g.transA ? "T" : "N", g.transB ? "T" : "N", g.M, g.N, g.K, g.lda, g.ldb, g.ldd,
               dtype_name(g.ab), dtype_name(g.ab), dtype_name(g.cd), g.batch);
}

void CublasLt::gemm(const GemmArgs& g) {
  MF_CHECK(g.M >= 0 && g.N >= 0 && g.K >= 0, "gemm: negative size M=", g.M, " N=", g.N, " K=", g.K);
  MF_CHECK(g.ab == DType::BF16 || g.ab == DType::F32, "gemm: A/B dtype ", dtype_name(g.ab),
           " is not supported (bf16 or f32)");
  MF_CHECK(g.cd == DType::BF16 || g.cd == DType::F32, "gemm: C/D dtype ", dtype_name(g.cd),
           " is not supported (bf16 or f32)");
  MF_CHECK(!(g.ab == DType::F32 && g.cd == DType::BF16),
           "gemm: f32 operands with a bf16 output are not supported");
  MF_CHECK(g.batch >= 1 && g.batch <= int64_t(INT32_MAX), "gemm: batch must be in [1, 2^31), got ",
           g.batch);
  if (g.M == 0 || g.N == 0) return;
  const GemmArgs r = resolve_gemm(g);
  Plan* p = (r.K == 0 || force_fallback_) ? nullptr : plan_for(r);
  while (p && p->ok()) {
    const cublasStatus_t st = cublasLtMatmul(handle_, p->op, &r.alpha, r.B, p->a, r.A, p->b,
                                             &r.beta, r.C, p->c, r.D, p->d, &p->algos[p->next],
                                             workspace_, kWorkspaceBytes, stream_);
    if (st == CUBLAS_STATUS_SUCCESS) return;
    // An algorithm the heuristic offered but that rejects this layout: remember, try the next.
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) CUBLAS_CHECK(st);
    ++p->next;
    if (!p->ok()) warn_fallback(r, "every algorithm cuBLASLt offered refused the call");
  }
  ++fallback_calls_;
  launch_gemm_fallback(r, stream_);
}

}  // namespace mf::cuda
