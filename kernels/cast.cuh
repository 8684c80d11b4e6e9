// Casts between f32 and bf16 (the master -> compute weight copy; activations in and out).
#pragma once
#include "common.cuh"

namespace mf::cuda {

// dst (=) src converted; same-dtype copies are a device memcpy. src, dst same numel.
void op_cast(const Ctx& ctx, const Tensor& src, Tensor& dst);

// Raw launchers (n elements; any alignment).
void launch_cast_f32_bf16(const float* src, void* dst_bf16, int64_t n, cudaStream_t stream);
void launch_cast_bf16_f32(const void* src_bf16, float* dst, int64_t n, cudaStream_t stream);

}  // namespace mf::cuda
