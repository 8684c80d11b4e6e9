// Kernels for test_cuemu_runtime.cpp: each exercises one behaviour of the emulator itself
// (scheduling order, shared-memory poison, warp collectives, barrier errors). Written as CUDA and
// rewritten by cu2cpp.py like kernels/*.cu.
#include <cuda_runtime.h>

#include "mma.cuh"

namespace selftest {

// Block sum: out[blockIdx.x] = sum of x over the block's threads. BARRIER false leaves out the
// __syncthreads, so thread 0 reads the other warps' partial sums whether or not they have been
// written.
template <bool BARRIER>
__global__ void block_sum_kernel(const float* x, float* out) {
  __shared__ float part[32];
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) part[warp] = v;
  if (BARRIER) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < int(blockDim.x / 32); ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}

// Each thread writes its slot of static shared memory in block 0 only, then every block reads all
// slots back: blocks after the first read shared memory nobody in them wrote.
__global__ void stale_shared_kernel(unsigned* out) {
  __shared__ unsigned slot[64];
  if (blockIdx.x == 0) slot[threadIdx.x] = 7u;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slot[threadIdx.x];
}

// The same for dynamic shared memory.
__global__ void stale_dynamic_kernel(unsigned* out) {
  extern __shared__ unsigned dyn[];
  if (blockIdx.x == 0) dyn[threadIdx.x] = 7u;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = dyn[threadIdx.x];
}

// Records which block ran in which position, and every block's coordinates.
__global__ void block_order_kernel(int* counter, int* position, int* coords) {
  const int b = int(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
  if (threadIdx.x == 0) {
    position[b] = atomicAdd(counter, 1);
    coords[3 * b] = int(blockIdx.x);
    coords[3 * b + 1] = int(blockIdx.y);
    coords[3 * b + 2] = int(blockIdx.z);
  }
}

// Records the order in which one block's threads first ran.
__global__ void thread_order_kernel(int* counter, int* position) {
  position[threadIdx.x] = atomicAdd(counter, 1);
}

// Shuffles and ballot within each warp.
__global__ void warp_ops_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  const int up = __shfl_up_sync(0xffffffffu, lane, 1);
  const int down = __shfl_down_sync(0xffffffffu, lane, 2);
  const int bcast = __shfl_sync(0xffffffffu, lane * 10, 3);
  out[4 * threadIdx.x] = int(odd);
  out[4 * threadIdx.x + 1] = up;
  out[4 * threadIdx.x + 2] = down;
  out[4 * threadIdx.x + 3] = bcast;
}

// Half of each warp waits at __syncthreads, the other half at a warp collective: on the device a
// hang or undefined behaviour, here an error.
__global__ void divergent_barrier_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

void block_sum(const float* x, float* out, int blocks, int threads, bool racy) {
  if (racy)
    block_sum_kernel<false><<<blocks, threads>>>(x, out);
  else
    block_sum_kernel<true><<<blocks, threads>>>(x, out);
}
void stale_shared(unsigned* out, int blocks, bool dynamic) {
  if (dynamic)
    stale_dynamic_kernel<<<blocks, 64, 64 * sizeof(unsigned)>>>(out);
  else
    stale_shared_kernel<<<blocks, 64>>>(out);
}
void block_order(int* counter, int* position, int* coords, dim3 grid) {
  block_order_kernel<<<grid, 32>>>(counter, position, coords);
}
void thread_order(int* counter, int* position, int threads) {
  thread_order_kernel<<<1, threads>>>(counter, position);
}
void warp_ops(int* out, int threads) { warp_ops_kernel<<<1, threads>>>(out); }
void divergent_barrier(float* out) { divergent_barrier_kernel<<<1, 64>>>(out); }

}  // namespace selftest

namespace selftest {
// ldmatrix through kernels/mma.cuh's helpers: a 16x16 tile with tile[r][c] = 100 r + c (as bf16
// bits), read as an A fragment (x4), a B fragment by rows of n (x2) and by rows of k (x2.trans).
// out[lane][0..7] = a0..a3, b_rows_n0..1, b_rows_k0..1. `offset` shifts the tile by that many
// elements (not a multiple of 8: misaligned rows).
__global__ void ldmatrix_kernel(unsigned* out, int offset) {
  __shared__ __align__(16) __nv_bfloat16 tile[16 * 24 + 8];
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 24 + 8; i += 32) tile[i] = __ushort_as_bfloat16(0);
  __syncwarp();
  __nv_bfloat16* s = tile + offset;
  for (int i = lane; i < 256; i += 32) s[(i / 16) * 24 + i % 16] = __ushort_as_bfloat16(uint16_t(100 * (i / 16) + i % 16));
  __syncwarp();
  uint32_t a[4], b[2], bt[2];
  mf::cuda::frag_a<24>(a, s, 0, 0, lane);
  mf::cuda::frag_b_rows_n<24>(b, s, 8, 0, lane);
  mf::cuda::frag_b_rows_k<24>(bt, s, 0, 8, lane);
  for (int i = 0; i < 4; ++i) out[8 * lane + i] = a[i];
  out[8 * lane + 4] = b[0];
  out[8 * lane + 5] = b[1];
  out[8 * lane + 6] = bt[0];
  out[8 * lane + 7] = bt[1];
}
void ldmatrix(unsigned* out, int offset) { ldmatrix_kernel<<<1, 32>>>(out, offset); }
}  // namespace selftest

namespace selftest {
// cp.async through kernels/mma.cuh's helpers, one warp: lane l copies src[4l..4l+3] into a[] as
// group 0 and zero-fills b[4l..4l+3] as group 1. out[8l + 0..7]: a[4l] before any wait, a[4l]
// and b[4l] after waiting down to one group in flight, then both after waiting for all; with
// `offset` (floats, not a multiple of 4) the destination is misaligned.
__global__ void cp_async_kernel(const float* src, float* out, int offset) {
  __shared__ __align__(16) float a[4 * 32 + 4];
  __shared__ __align__(16) float b[4 * 32];
  const int lane = threadIdx.x;
  for (int i = 0; i < 4; ++i) a[4 * lane + i] = b[4 * lane + i] = -1.f;
  mf::cuda::cp_async16(a + offset + 4 * lane, src + 4 * lane, true);
  mf::cuda::cp_async_commit();
  mf::cuda::cp_async16(b + 4 * lane, src, false);
  mf::cuda::cp_async_commit();
  float* o = out + 8 * lane;
  o[0] = a[4 * lane];
  mf::cuda::cp_async_wait<1>();
  o[1] = a[4 * lane];
  o[2] = a[4 * lane + 3];
  o[3] = b[4 * lane];
  mf::cuda::cp_async_wait<0>();
  o[4] = a[4 * lane];
  o[5] = b[4 * lane];
  o[6] = b[4 * lane + 3];
  o[7] = 0.f;
}
void cp_async(const float* src, float* out, int offset) { cp_async_kernel<<<1, 32>>>(src, out, offset); }

// Lane l copies src[4l..4l+3] into shared memory and then writes src[4l] = -src[4l], before the
// wait (a race with the copy on the device) or after it; out[4l..4l+3] is what landed.
__global__ void cp_async_src_write_kernel(float* src, float* out, bool before_wait) {
  __shared__ __align__(16) float a[4 * 32];
  const int lane = threadIdx.x;
  mf::cuda::cp_async16(a + 4 * lane, src + 4 * lane, true);
  mf::cuda::cp_async_commit();
  if (before_wait) src[4 * lane] = -src[4 * lane];
  mf::cuda::cp_async_wait<0>();
  if (!before_wait) src[4 * lane] = -src[4 * lane];
  for (int i = 0; i < 4; ++i) out[4 * lane + i] = a[4 * lane + i];
}
// Thread 0 writes the last float of `bytes` of dynamic shared memory and reads it back into *out.
__global__ void dyn_smem_kernel(float* out, int bytes) {
  extern __shared__ float dyn[];
  if (threadIdx.x == 0) {
    dyn[bytes / 4 - 1] = 3.f;
    *out = dyn[bytes / 4 - 1];
  }
}
// Raises `kernel`'s dynamic shared memory attribute to `attribute` (< 0: leaves it as it is).
template <typename Kernel>
cudaError_t smem_attribute(Kernel kernel, int attribute) {
  if (attribute < 0) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attribute);
}
cudaError_t dyn_smem(float* out, int bytes, int attribute) {
  if (const cudaError_t e = smem_attribute(dyn_smem_kernel, attribute); e != cudaSuccess) return e;
  dyn_smem_kernel<<<1, 32, size_t(bytes)>>>(out, bytes);
  return cudaGetLastError();
}
// 32 KiB of static shared memory beside `bytes` of dynamic: thread 0 writes one float of each.
__global__ void mixed_smem_kernel(float* out, int bytes) {
  __shared__ float fixed[8192];
  extern __shared__ float dyn[];
  if (threadIdx.x == 0) {
    fixed[8191] = 1.f;
    dyn[bytes / 4 - 1] = 2.f;
    *out = fixed[8191] + dyn[bytes / 4 - 1];
  }
}
cudaError_t mixed_smem(float* out, int bytes, int attribute) {
  if (const cudaError_t e = smem_attribute(mixed_smem_kernel, attribute); e != cudaSuccess) return e;
  mixed_smem_kernel<<<1, 32, size_t(bytes)>>>(out, bytes);
  return cudaGetLastError();
}
// 52 KiB of static shared memory: more than a kernel may declare.
__global__ void big_static_kernel(float* out) {
  __shared__ float big[13 * 1024];
  if (threadIdx.x == 0) {
    big[0] = 1.f;
    *out = big[0];
  }
}
cudaError_t big_static(float* out) {
  big_static_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}
void cp_async_src_write(float* src, float* out, bool before_wait) {
  cp_async_src_write_kernel<<<1, 32>>>(src, out, before_wait);
}

// Each warp passes four warp barriers; after each, lane 0 records the running position of that
// step. Shows how far one warp runs ahead of another between block barriers.
__global__ void warp_drift_kernel(int* counter, int* position) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    __syncwarp();
    if (lane == 0) position[4 * warp + i] = atomicAdd(counter, 1);
  }
}
void warp_drift(int* counter, int* position, int warps) { warp_drift_kernel<<<1, 32 * warps>>>(counter, position); }
}  // namespace selftest
