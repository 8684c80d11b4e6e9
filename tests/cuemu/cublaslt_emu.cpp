// cuemu: the cuBLASLt C API on the host, so that src/backend/cuda/cublaslt.cpp (the wrapper every
// GEMM of the CUDA backend goes through) runs unchanged under the emulator.
//
// cublasLtMatmul computes what cuBLASLt documents, in column-major: for each batch entry i,
//   D_i = alpha * op(A_i) op(B_i) + beta * C_i,   op(A) [m,k], op(B) [k,n], C and D [m,n],
// X_i = X + i * stride (elements), element (r, c) of a layout at r + c * ld. Operands are widened to
// f32, multiplied by one cblas_sgemm (f32 accumulation, like CUBLAS_COMPUTE_32F), and alpha AB +
// beta C is rounded to D's type. The API's contracts are checked as cuBLASLt would, so a wrapper
// that breaks one fails here instead of on the device:
// - attribute sizes (TRANSA/TRANSB 4 bytes, BATCH_COUNT int32, STRIDED_BATCH_OFFSET int64,
//   workspace uint64, alignments uint32): INVALID_VALUE;
// - ld >= rows for every layout; op(A), op(B), C and D shapes and batch counts agreeing; A and B of
//   one type, C and D of one type; C == D only with identical layouts: INVALID_VALUE;
// - the algorithm the heuristic returns assumes the minimum alignments the preference declared;
//   a call whose pointers (or, with a batch, strides) are less aligned than declared gets
//   NOT_SUPPORTED, as a device algorithm would; a workspace larger than the call passes: the same;
// - D sharing memory with A or B: INVALID_VALUE.
// CUEMU_GEMM=simt makes the heuristic return no algorithm, so the wrapper takes its SIMT fallback
// kernel (kernels/matmul.cu), as on the device when cuBLASLt has none. CUEMU_GEMM=picky puts
// first an algorithm that refuses pointers not 256-byte aligned, so the wrapper's step to the
// next algorithm on NOT_SUPPORTED runs.
#include <cblas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cublasLt.h"
#include "cuda_bf16.h"

struct cublasLtContext {};
struct cublasLtMatmulDescOpaque_t {
  cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
};
struct cublasLtMatrixLayoutOpaque_t {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
  int32_t batch = 1;
  int64_t stride = 0;
};
struct cublasLtMatmulPreferenceOpaque_t {
  uint64_t workspace = 0;
  uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D (cuBLASLt's default)
};

namespace {

enum class GemmMode { Host, Simt, Picky };

GemmMode gemm_mode() {
  static const GemmMode m = [] {
    const char* e = std::getenv("CUEMU_GEMM");
    const std::string v = e ? e : "host";
    if (v != "host" && v != "simt" && v != "picky") {
      std::fprintf(stderr, "cuemu: CUEMU_GEMM=%s: expected host, simt or picky\n", v.c_str());
      std::exit(2);
    }
    return v == "simt" ? GemmMode::Simt : v == "picky" ? GemmMode::Picky : GemmMode::Host;
  }();
  return m;
}

// CUEMU_GEMM=picky: the first algorithm offered wants every pointer (and batch stride) 256-byte
// aligned, more than the preference declared, and refuses others with NOT_SUPPORTED at the call.
constexpr uint32_t kPickyAlign = 256;

cublasStatus_t invalid(const char* why) {
  std::fprintf(stderr, "cuemu: cuBLASLt: %s\n", why);
  return CUBLAS_STATUS_INVALID_VALUE;
}

size_t esize(cudaDataType_t t) { return t == CUDA_R_16BF ? 2 : 4; }
bool gemm_type(cudaDataType_t t) { return t == CUDA_R_16BF || t == CUDA_R_32F; }

float load(const void* p, cudaDataType_t t, int64_t i) {
  return t == CUDA_R_16BF ? float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// The shapes and types agree (checked by the heuristic and by every matmul).
cublasStatus_t check(const cublasLtMatmulDescOpaque_t& op, const cublasLtMatrixLayoutOpaque_t& a,
                     const cublasLtMatrixLayoutOpaque_t& b, const cublasLtMatrixLayoutOpaque_t& c,
                     const cublasLtMatrixLayoutOpaque_t& d) {
  for (const auto* l : {&a, &b, &c, &d}) {
    if (!gemm_type(l->type)) return invalid("a layout's type is not bf16 or f32");
    if (l->ld < 1 || uint64_t(l->ld) < l->rows) return invalid("a layout's ld is smaller than its rows");
  }
  if (a.type != b.type || c.type != d.type) return invalid("A and B (or C and D) differ in type");
  const uint64_t m = d.rows, n = d.cols;
  const uint64_t am = op.ta == CUBLAS_OP_N ? a.rows : a.cols, ak = op.ta == CUBLAS_OP_N ? a.cols : a.rows;
  const uint64_t bk = op.tb == CUBLAS_OP_N ? b.rows : b.cols, bn = op.tb == CUBLAS_OP_N ? b.cols : b.rows;
  if (am != m || bn != n || ak != bk || c.rows != m || c.cols != n)
    return invalid("op(A) [m,k], op(B) [k,n], C and D [m,n] do not agree");
  if (a.batch != d.batch || b.batch != d.batch || c.batch != d.batch)
    return invalid("the four layouts' batch counts differ");
  return CUBLAS_STATUS_SUCCESS;
}

// Largest power of two <= 256 dividing the address and, with a batch, the stride in bytes.
uint32_t alignment_of(const void* p, const cublasLtMatrixLayoutOpaque_t& l) {
  const uint64_t a = reinterpret_cast<uintptr_t>(p);
  const uint64_t s = l.batch > 1 ? uint64_t(l.stride) * esize(l.type) : 0;
  uint32_t al = 256;
  while (al > 1 && (a % al != 0 || s % al != 0)) al /= 2;
  return al;
}

// Whether the bytes a layout spans from X (all batch entries, ld padding included) and those from Y
// share any: conservative for interleaved layouts, exact for the separate buffers used today.
bool overlaps(const void* X, const cublasLtMatrixLayoutOpaque_t& lx, const void* Y,
              const cublasLtMatrixLayoutOpaque_t& ly) {
  auto span = [](const void* p, const cublasLtMatrixLayoutOpaque_t& l) {
    const uint64_t lo = reinterpret_cast<uintptr_t>(p);
    if (l.rows == 0 || l.cols == 0) return std::pair<uint64_t, uint64_t>{lo, lo};
    const uint64_t n = uint64_t(l.batch - 1) * uint64_t(l.stride) + (l.cols - 1) * uint64_t(l.ld) + l.rows;
    return std::pair<uint64_t, uint64_t>{lo, lo + n * esize(l.type)};
  };
  const auto x = span(X, lx), y = span(Y, ly);
  return x.first < y.second && y.first < x.second;
}

// The dense column-major f32 copy of op(X) for batch entry i: rows x cols.
std::vector<float> widen(const void* X, const cublasLtMatrixLayoutOpaque_t& l, bool trans, int64_t i,
                         uint64_t rows, uint64_t cols) {
  std::vector<float> out(size_t(rows * cols));
  const int64_t base = i * l.stride;
  for (uint64_t c = 0; c < cols; ++c)
    for (uint64_t r = 0; r < rows; ++r)
      out[size_t(r + c * rows)] = load(X, l.type, base + int64_t(trans ? c + r * uint64_t(l.ld) : r + c * uint64_t(l.ld)));
  return out;
}

template <typename T>
cublasStatus_t set(T& field, const void* buf, size_t bytes) {
  if (!buf || bytes != sizeof(T)) return invalid("an attribute's size is not the size of its type");
  std::memcpy(&field, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

const char* cublasLtGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_?";
}
const char* cublasLtGetStatusString(cublasStatus_t) { return "emulated cuBLASLt (cuemu)"; }

cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) { *h = new cublasLtContext; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute, cudaDataType_t scale) {
  if (compute != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F) return invalid("only COMPUTE_32F with f32 scale is emulated");
  *d = new cublasLtMatmulDescOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete d; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                              const void* buf, size_t bytes) {
  int32_t v = 0;
  if (a != CUBLASLT_MATMUL_DESC_TRANSA && a != CUBLASLT_MATMUL_DESC_TRANSB) return invalid("unknown matmul attribute");
  const cublasStatus_t st = set(v, buf, bytes);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (v != CUBLAS_OP_N && v != CUBLAS_OP_T) return invalid("TRANSA/TRANSB must be N or T");
  (a == CUBLASLT_MATMUL_DESC_TRANSA ? d->ta : d->tb) = cublasOperation_t(v);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  *l = new cublasLtMatrixLayoutOpaque_t{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { delete l; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t a,
                                                const void* buf, size_t bytes) {
  if (a == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT) {
    const cublasStatus_t st = set(l->batch, buf, bytes);
    return st == CUBLAS_STATUS_SUCCESS && l->batch < 1 ? invalid("BATCH_COUNT < 1") : st;
  }
  if (a == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET) return set(l->stride, buf, bytes);
  return invalid("unknown layout attribute");
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  *p = new cublasLtMatmulPreferenceOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { delete p; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t a, const void* buf,
                                                    size_t bytes) {
  switch (a) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return set(p->workspace, buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return set(p->align[0], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return set(p->align[1], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return set(p->align[2], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return set(p->align[3], buf, bytes);
  }
  return invalid("unknown preference attribute");
}

// One algorithm: it records the alignments the preference promised and the workspace it needs
// (the preference's maximum, up to 1 MiB, as a real algorithm may use what it was allowed). None
// with CUEMU_GEMM=simt; with CUEMU_GEMM=picky the picky one comes first.
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref,
                                              int requested, cublasLtMatmulHeuristicResult_t* results,
                                              int* returned) {
  if (requested < 1 || !results || !returned) return invalid("heuristic: no room for results");
  const cublasStatus_t st = check(*op, *a, *b, *c, *d);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  *returned = 0;
  if (gemm_mode() == GemmMode::Simt) return CUBLAS_STATUS_NOT_SUPPORTED;  // "no algorithm": the wrapper's fallback
  cublasLtMatmulHeuristicResult_t r{};
  for (int i = 0; i < 4; ++i) r.algo.data[i] = pref->align[i];
  r.algo.data[4] = std::min<uint64_t>(pref->workspace, uint64_t(1) << 20);
  r.workspaceSize = size_t(r.algo.data[4]);
  r.state = CUBLAS_STATUS_SUCCESS;
  int k = 0;
  if (gemm_mode() == GemmMode::Picky && requested >= 2) {
    results[k] = r;
    for (int i = 0; i < 4; ++i) results[k].algo.data[i] = kPickyAlign;
    ++k;
  }
  results[k++] = r;
  *returned = k;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t op, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc,
                              const void* beta, const void* C, cublasLtMatrixLayout_t Cdesc, void* D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t* algo, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  const cublasStatus_t st = check(*op, *Adesc, *Bdesc, *Cdesc, *Ddesc);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (!algo || !alpha || !beta) return invalid("matmul: no algorithm, alpha or beta");
  if (C == D && (Cdesc->ld != Ddesc->ld || Cdesc->stride != Ddesc->stride))
    return invalid("in place (C == D) with different C and D layouts");
  // The device reads A and B tiles while it writes D, so an output over an input is garbage there
  // (this emulator would compute it correctly from its copies).
  if (overlaps(D, *Ddesc, A, *Adesc) || overlaps(D, *Ddesc, B, *Bdesc))
    return invalid("matmul: D overlaps A or B");
  const void* ptrs[4] = {A, B, C, D};
  const cublasLtMatrixLayoutOpaque_t* lays[4] = {Adesc, Bdesc, Cdesc, Ddesc};
  for (int i = 0; i < 4; ++i)
    if (alignment_of(ptrs[i], *lays[i]) < algo->data[i]) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (algo->data[4] > 0 && (!workspace || workspace_bytes < algo->data[4])) return CUBLAS_STATUS_NOT_SUPPORTED;
  cuemu::eager_work(stream);  // the stream's queued collectives come first
  cuemu::count_stat("gemm");
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  const uint64_t m = Ddesc->rows, n = Ddesc->cols, k = op->ta == CUBLAS_OP_N ? Adesc->cols : Adesc->rows;
  for (int64_t i = 0; i < Ddesc->batch; ++i) {
    std::vector<float> acc(size_t(m * n), 0.f);
    if (k > 0) {
      const std::vector<float> a = widen(A, *Adesc, op->ta == CUBLAS_OP_T, i, m, k);
      const std::vector<float> b = widen(B, *Bdesc, op->tb == CUBLAS_OP_T, i, k, n);
      cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, int(m), int(n), int(k), 1.f, a.data(), int(m),
                  b.data(), int(k), 0.f, acc.data(), int(m));
    }
    // All of C is read before D is written: they may be the same memory.
    const int64_t cb = i * Cdesc->stride, db = i * Ddesc->stride;
    for (uint64_t c = 0; c < n; ++c)
      for (uint64_t r = 0; r < m; ++r) {
        float& v = acc[size_t(r + c * m)];
        v *= al;
        if (be != 0.f) v += be * load(C, Cdesc->type, cb + int64_t(r + c * uint64_t(Cdesc->ld)));
      }
    for (uint64_t c = 0; c < n; ++c)
      for (uint64_t r = 0; r < m; ++r) {
        const int64_t at = db + int64_t(r + c * uint64_t(Ddesc->ld));
        const float v = acc[size_t(r + c * m)];
        if (Ddesc->type == CUDA_R_16BF)
          static_cast<__nv_bfloat16*>(D)[at] = __nv_bfloat16(v);
        else
          static_cast<float*>(D)[at] = v;
      }
  }
  return CUBLAS_STATUS_SUCCESS;
}
