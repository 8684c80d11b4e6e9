// Fixed sizes of the CUDA backend's scratch users that host code also needs (the memory plan's
// expected workspace, src/train/bench.cpp). Header only and free of CUDA includes, so builds
// without CUDA read it too.
#pragma once
#include <cstddef>

namespace mf::cuda {

// Fused lm-head cross-entropy (kernels/xent.cu): at most this many bytes of f32 logits plus
// dlogits per chunk of rows. Each chunk rereads and rewrites the f32 lm-head gradient, so a
// larger chunk means fewer passes over it and more memory held.
constexpr size_t kXentScratchBytes = size_t(256) << 20;
// cuBLASLt workspace (src/backend/cuda/cublaslt.cpp): 32 MiB, Hopper's recommendation.
constexpr size_t kCublasLtWorkspaceBytes = size_t(32) << 20;

}  // namespace mf::cuda
