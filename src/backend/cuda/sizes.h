// Fixed sizes of the CUDA backend's scratch users that host code also needs (the memory plan's
// expected workspace, src/train/bench.cpp). Header only and free of CUDA includes, so builds
// without CUDA read it too.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace mf::cuda {

// Fused lm-head cross-entropy (kernels/xent.cu): by default at most this many bytes of f32
// logits plus dlogits per chunk of rows (train.loss_chunk_mb sets it per run). Each chunk
// rereads and rewrites the f32 lm-head gradient and rereads W, so a larger chunk means fewer
// passes over them and more memory held: at V = 50304, d = 768 and 16K rows, 1 GiB is 5 chunks
// (about 2.3 GB of that traffic), 256 MiB was 20 (about 9 GB).
// One piece of an op's scratch request: kernels/common.cuh's Arena cuts 256-byte aligned pieces
// (the kernels static_assert that it still does).
inline size_t scratch_piece(size_t bytes) { return (bytes + 255) / 256 * 256; }

constexpr size_t kXentChunkBytesDefault = size_t(1) << 30;
constexpr int64_t kXentRowAlign = 64;  // chunk rows rounded down to this (GEMM tiles)
// Row pitch of the logits / dlogits scratch, in elements: V rounded up to a multiple of 8, so
// every row starts 16-byte aligned in bf16 and f32 whatever V is (GPT-2's 50257 is odd). With a
// pitch of V the bf16 dlogits rows would only be 2-byte aligned, which keeps cuBLASLt off its
// 16-byte-aligned tensor-core kernels (or sends the GEMMs to the SIMT fallback). The pad columns
// [V, ld) are never read: every GEMM and the row kernel use only the first V columns.
constexpr int64_t kXentLdAlign = 8;
inline int64_t xent_ld(int64_t V) { return (V + kXentLdAlign - 1) / kXentLdAlign * kXentLdAlign; }
// Rows of one chunk for N rows of vocabulary V within chunk_bytes of f32 logits plus (with
// gradients) dlogits of act_bytes per element; at least 1 and at most N.
inline int64_t xent_chunk_rows(int64_t N, int64_t V, size_t chunk_bytes, size_t act_bytes,
                               bool grads) {
  const size_t row_bytes = size_t(xent_ld(V)) * (sizeof(float) + (grads ? act_bytes : 0));
  int64_t R = std::max<int64_t>(1, int64_t(chunk_bytes / row_bytes));
  if (R >= kXentRowAlign) R = R / kXentRowAlign * kXentRowAlign;
  return std::min(R, N);
}
// The scratch one call takes (256-byte aligned pieces, as kernels/common.cuh's Arena cuts them).
inline size_t xent_scratch_bytes(int64_t N, int64_t V, size_t chunk_bytes, size_t act_bytes,
                                 bool grads) {
  const size_t cells = size_t(xent_chunk_rows(N, V, chunk_bytes, act_bytes, grads)) * size_t(xent_ld(V));
  return scratch_piece(cells * sizeof(float)) + (grads ? scratch_piece(cells * act_bytes) : 0);
}
// The MoE router's backward (kernels/moe.cu), its largest scratch user: x widened to f32 when
// it is bf16, and dx's GEMM through an f32 temporary when dx is bf16, N x d floats each.
inline size_t moe_router_bwd_scratch_bytes(int64_t N, int64_t d, bool widen_x, bool dx_via_tmp) {
  const size_t one = scratch_piece(size_t(N) * size_t(d) * sizeof(float));
  return (widen_x ? one : 0) + (dx_via_tmp ? one : 0);
}
// Newton-Schulz (kernels/muon.cu): besides its X ping-pong and A, B buffers (at most 2x the f32
// stack's bytes in bf16, 4x in f32), at most this many bytes per slice (the f64 norm partials
// and the slice strides' rounding) and kNsScratchFixedBytes in all (alignment); muon.cu checks
// that its constants stay within them.
constexpr size_t kNsScratchPerSliceBytes = 2304;
constexpr size_t kNsScratchFixedBytes = 2048;
// cuBLASLt workspace (src/backend/cuda/cublaslt.cpp): 32 MiB, Hopper's recommendation.
constexpr size_t kCublasLtWorkspaceBytes = size_t(32) << 20;

}  // namespace mf::cuda
