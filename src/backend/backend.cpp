#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"

#ifdef MF_HAS_CUDA
namespace mf {
std::unique_ptr<Backend> make_cuda_backend();  // src/backend/cuda
int cuda_device_count();
}  // namespace mf
#endif

namespace mf {

bool cuda_available() {
#ifdef MF_HAS_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return std::make_unique<CpuBackend>();
  if (device == "cuda" || device == "auto") {
#ifdef MF_HAS_CUDA
    if (cuda_available()) return make_cuda_backend();
#endif
    MF_CHECK(device == "auto", "train.device is \"cuda\" but ",
#ifdef MF_HAS_CUDA
             "no CUDA device is visible",
#else
             "this build has no CUDA backend (configure with nvcc present)",
#endif
             "; use \"cpu\" or \"auto\"");
    return std::make_unique<CpuBackend>();
  }
  MF_FAIL("unknown device \"", device, "\"; expected one of: auto, cpu, cuda");
}

}  // namespace mf
