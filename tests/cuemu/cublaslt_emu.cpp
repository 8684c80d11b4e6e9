// cuemu: CublasLt without cuBLASLt. Two ways to run a GEMM:
// - "host" (the default): what cuBLASLt computes, on the host: op(A) and op(B) widened to f32,
//   one cblas_sgemm per batch entry (f32 accumulation, like CUBLAS_COMPUTE_32F), then
//   alpha * AB + beta * C rounded to D's dtype. The device's GEMMs go through cuBLASLt, so this is
//   the path whole-model tests should see, and it is fast.
// - "simt": the SIMT fallback kernel of kernels/matmul.cu (the device's path when cuBLASLt has no
//   algorithm), run by the emulator. Taken when CUEMU_GEMM=simt or when a test forces the fallback
//   (set_force_fallback), and counted in fallback_calls() as on the device.
#include <cblas.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/cublaslt.h"
#include "cuda_bf16.h"
#include "matmul.cuh"

namespace mf::cuda {

struct CublasLt::Plan {};

CublasLt::CublasLt(cudaStream_t stream) : stream_(stream) {}
CublasLt::~CublasLt() = default;

namespace {

bool simt_everywhere() {
  static const bool on = [] {
    const char* e = std::getenv("CUEMU_GEMM");
    const std::string v = e ? e : "host";
    if (v != "host" && v != "simt") {
      std::fprintf(stderr, "cuemu: CUEMU_GEMM=%s: expected host or simt\n", v.c_str());
      std::exit(2);
    }
    return v == "simt";
  }();
  return on;
}

float load(const void* p, DType t, int64_t i) {
  return t == DType::BF16 ? float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// rows x cols of a row-major matrix stored with leading dimension ld, transposed when `trans`
// (stored [cols, rows]), as dense row-major f32.
std::vector<float> widen(const void* p, DType t, bool trans, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> out(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[size_t(r * cols + c)] = load(p, t, trans ? c * ld + r : r * ld + c);
  return out;
}

void host_gemm(const GemmArgs& g) {
  const size_t eab = g.ab == DType::BF16 ? 2 : 4, ecd = g.cd == DType::BF16 ? 2 : 4;
  for (int64_t b = 0; b < g.batch; ++b) {
    const char* A = static_cast<const char*>(g.A) + size_t(b * g.strideA) * eab;
    const char* B = static_cast<const char*>(g.B) + size_t(b * g.strideB) * eab;
    const char* C = static_cast<const char*>(g.C) + size_t(b * g.strideC) * ecd;
    char* D = static_cast<char*>(g.D) + size_t(b * g.strideD) * ecd;
    std::vector<float> acc(size_t(g.M * g.N), 0.f);
    if (g.K > 0) {
      const std::vector<float> a = widen(A, g.ab, g.transA, g.M, g.K, g.lda);
      const std::vector<float> bm = widen(B, g.ab, g.transB, g.K, g.N, g.ldb);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(g.M), int(g.N), int(g.K), 1.f,
                  a.data(), int(g.K), bm.data(), int(g.N), 0.f, acc.data(), int(g.N));
    }
    // Read all of C before writing D: they may be the same memory.
    std::vector<float> out(acc.size());
    for (int64_t r = 0; r < g.M; ++r)
      for (int64_t c = 0; c < g.N; ++c) {
        float v = g.alpha * acc[size_t(r * g.N + c)];
        if (g.beta != 0.f) v += g.beta * load(C, g.cd, r * g.ldc + c);
        out[size_t(r * g.N + c)] = v;
      }
    for (int64_t r = 0; r < g.M; ++r)
      for (int64_t c = 0; c < g.N; ++c) {
        const float v = out[size_t(r * g.N + c)];
        if (g.cd == DType::BF16)
          reinterpret_cast<__nv_bfloat16*>(D)[r * g.ldd + c] = __nv_bfloat16(v);
        else
          reinterpret_cast<float*>(D)[r * g.ldd + c] = v;
      }
  }
}

}  // namespace

void CublasLt::gemm(const GemmArgs& g) {
  MF_CHECK(g.M >= 0 && g.N >= 0 && g.K >= 0, "gemm: negative size M=", g.M, " N=", g.N, " K=", g.K);
  if (g.M == 0 || g.N == 0) return;
  const GemmArgs r = resolve_gemm(g);
  if (force_fallback_ || simt_everywhere()) {
    ++fallback_calls_;
    launch_gemm_fallback(r, stream_);
    return;
  }
  cuemu::eager_work(stream_);  // the stream's queued collectives come first
  cuemu::count_stat("gemm");
  host_gemm(r);
}

}  // namespace mf::cuda
