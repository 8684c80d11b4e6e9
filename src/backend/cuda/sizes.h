// Fixed sizes of the CUDA backend's scratch users that host code also needs (the memory plan's
// expected workspace, src/train/bench.cpp). Header only and free of CUDA includes, so builds
// without CUDA read it too.
#pragma once
#include <cstddef>

namespace mf::cuda {

// Fused lm-head cross-entropy (kernels/xent.cu): by default at most this many bytes of f32
// logits plus dlogits per chunk of rows (train.loss_chunk_mb sets it per run). Each chunk
// rereads and rewrites the f32 lm-head gradient and rereads W, so a larger chunk means fewer
// passes over them and more memory held: at V = 50304, d = 768 and 16K rows, 1 GiB is 5 chunks
// (about 2.3 GB of that traffic), 256 MiB was 20 (about 9 GB).
constexpr size_t kXentChunkBytesDefault = size_t(1) << 30;
// cuBLASLt workspace (src/backend/cuda/cublaslt.cpp): 32 MiB, Hopper's recommendation.
constexpr size_t kCublasLtWorkspaceBytes = size_t(32) << 20;

}  // namespace mf::cuda
