// One [gpu] test file (CUEMU_TEST, e.g. "test_ops.cpp") built against the CUDA backend compiled
// for the CPU emulator (tests/cuemu): its [gpu] cases then run here, on the CPU, through the
// hand-written kernels, their launchers and the backend's host code. Where the real backend calls
// cuBLASLt the emulator runs the SIMT fallback kernel, cuSOLVER and cuBLAS become LAPACK/BLAS, and
// there is no cuDNN (cases that need it skip as on a machine without it); NCCL is emulated
// between processes (nccl_emu.cpp).
#include <memory>
#include <string>

#include "backend/backend.h"

namespace mf {
std::unique_ptr<Backend> make_cuda_backend();  // the emulated one (mf_cuemu renames it)
inline bool cuemu_cuda_available() { return true; }
inline std::unique_ptr<Backend> cuemu_make_backend(const std::string& device) {
  if (device == "cuda" || device == "auto") return make_cuda_backend();
  return make_backend(device);
}
}  // namespace mf

// Tests that train whole models shrink their shapes under the emulator (MF_CUEMU_TEST).
#define MF_CUEMU_TEST 1
#define make_backend cuemu_make_backend
#define cuda_available cuemu_cuda_available
#ifndef MF_HAS_NCCL
#define MF_HAS_NCCL 1  // the emulated NCCL (nccl_emu.cpp)
#endif
#ifndef MF_HAS_CUDA
#define MF_HAS_CUDA 1
#endif
#include CUEMU_TEST
