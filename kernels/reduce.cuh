// Reductions and simple elementwise updates on f32 / bf16 tensors.
// Sums are deterministic: each block of the first pass reduces one fixed 65536-element chunk of a
// tensor in double (fixed per-thread strides), then one block per tensor adds its chunks'
// partials in a fixed order (two passes, no atomics), so the result depends only on the tensor's
// values, not on the device, on scheduling or on the other tensors reduced in the same call.
#pragma once
#include "common.cuh"

#include <vector>

namespace mf::cuda {

double op_sum_squares(const Ctx& ctx, const Tensor& x);  // synchronizes
double op_sum(const Ctx& ctx, const Tensor& x);          // synchronizes
// op_sum_squares of each tensor (the same bits as one call per tensor) in two launches for all of
// them, synchronizing once.
std::vector<double> op_sum_squares_each(const Ctx& ctx, const std::vector<const Tensor*>& xs);
void op_scale(const Ctx& ctx, Tensor& x, float alpha);  // x (=) alpha x
// x (=) x * float(sqrt(ss(ref) / ss(x))) (0 when ss(x) = 0), both sums kept on the device.
void op_scale_to_norm_of(const Ctx& ctx, Tensor& x, const Tensor& ref);
void op_axpy(const Ctx& ctx, float alpha, const Tensor& x, Tensor& y);  // y (=) y + alpha x

// Device-resident sum of squares of n f32 values into *out (no host sync; the same bits as
// op_sum_squares). `partials` is scratch of reduce_partials_count(n) doubles.
int reduce_partials_count(int64_t n);
void launch_sum_squares_f32(const float* x, int64_t n, double* out, double* partials,
                            cudaStream_t stream);

}  // namespace mf::cuda
