// cuemu: CublasLt without cuBLASLt. Every GEMM takes the path the device takes when cuBLASLt offers
// no algorithm: the SIMT fallback kernel of kernels/matmul.cu, run by the emulator.
#include "backend/cuda/cublaslt.h"
#include "matmul.cuh"

namespace mf::cuda {

struct CublasLt::Plan {};

CublasLt::CublasLt(cudaStream_t stream) : stream_(stream) {}
CublasLt::~CublasLt() = default;

void CublasLt::gemm(const GemmArgs& g) {
  MF_CHECK(g.M >= 0 && g.N >= 0 && g.K >= 0, "gemm: negative size M=", g.M, " N=", g.N, " K=", g.K);
  if (g.M == 0 || g.N == 0) return;
  ++fallback_calls_;
  launch_gemm_fallback(resolve_gemm(g), stream_);
}

}  // namespace mf::cuda
