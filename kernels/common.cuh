// Shared pieces of the CUDA kernels: error-check macros (host), the op context every entry
// receives, a bump allocator over the backend's scratch buffer, and (device code only) bf16
// conversions, 16-byte vector loads/stores and deterministic warp/block reductions.
//
// Layering used by every kernels/*.cu file (see docs/cuda.md):
//   1. __global__ templated kernel, reading one params struct per family;
//   2. launch_*<...>(const Params&, cudaStream_t): grid/block choice and cudaGetLastError;
//   3. entry (mf::cuda::op_*): checks tensors (device, dtype, shape, alignment), dispatches the
//      dtypes once, fills the params struct and calls the launcher.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "backend/cuda/sizes.h"
#include "backend/op_contract.h"
#include "core/error.h"
#include "core/tensor.h"

// ---- check macros (host) ------------------------------------------------------------------------
namespace mf::cuda::detail {
[[noreturn]] void cuda_fail(cudaError_t e, const char* stmt, const char* file, int line);
[[noreturn]] void cublas_fail(cublasStatus_t s, const char* stmt, const char* file, int line);
// cudaMalloc / cudaHostAlloc that answer nullptr when the memory is not there (the error is
// cleared); any other failure (a fault left by an earlier kernel, a lost device) throws, naming
// `what`.
void* device_alloc_or_null(size_t bytes, const char* what);
void* pinned_alloc_or_null(size_t bytes, const char* what);
// "F MiB free of T MiB" on the current device, for out-of-memory messages.
std::string free_memory();
}  // namespace mf::cuda::detail

// CUDA_CHECK(stmt): throws mf::Error naming the CUDA error, the statement, file:line and device.
#define CUDA_CHECK(stmt)                                                              \
  do {                                                                                \
    cudaError_t mf_cuda_err_ = (stmt);                                                \
    if (mf_cuda_err_ != cudaSuccess)                                                  \
      ::mf::cuda::detail::cuda_fail(mf_cuda_err_, #stmt, __FILE__, __LINE__);         \
  } while (0)

// CUBLAS_CHECK(stmt): the same for cuBLAS / cuBLASLt status codes.
#define CUBLAS_CHECK(stmt)                                                            \
  do {                                                                                \
    cublasStatus_t mf_cublas_st_ = (stmt);                                            \
    if (mf_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                       \
      ::mf::cuda::detail::cublas_fail(mf_cublas_st_, #stmt, __FILE__, __LINE__);      \
  } while (0)

// After every kernel launch: catches bad launch configurations at the launching line.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace mf::cuda {

class CublasLt;  // src/backend/cuda/cublaslt.h

// Grow-only device scratch owned by the backend. All ops run on one stream, so an op may use the
// buffer freely until it returns; get() may reallocate (after synchronizing), invalidating
// earlier pointers, so an op asks once for everything it needs (see Arena).
class Scratch {
 public:
  explicit Scratch(cudaStream_t stream) : stream_(stream) {}
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get(size_t bytes);
  size_t capacity() const { return cap_; }
  // Frees the buffer once the stream's queued work is done (a later get allocates again).
  void release();

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
  size_t cap_ = 0;
};

// What every op entry receives.
struct Ctx {
  cudaStream_t stream = nullptr;
  CublasLt* lt = nullptr;
  Scratch* scratch = nullptr;
  int sm_count = 1;
  size_t max_smem_optin = 48 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  // Fused xent: logits + dlogits bytes per chunk (CudaBackend::set_loss_chunk_mb sets it).
  size_t xent_chunk_bytes = kXentChunkBytesDefault;
};

// Bump allocator carving one scratch request into 256-byte aligned pieces. Usage:
//   Arena sz;  sz.take<float>(n); sz.take<bf16>(m);          // sizing pass (base == nullptr)
//   Arena a(ctx.scratch->get(sz.used()));  float* f = a.take<float>(n); ...
struct Arena {
  static constexpr size_t kAlign = 256;
  char* base = nullptr;
  size_t off = 0;
  Arena() = default;
  explicit Arena(void* p) : base(static_cast<char*>(p)) {}
  template <typename T>
  T* take(size_t n) {
    const size_t at = off;
    off += (n * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    return base ? reinterpret_cast<T*>(base + at) : nullptr;
  }
  size_t used() const { return off == 0 ? kAlign : off; }
};

// ---- argument checks shared by the entries (host) -------------------------------------------
std::string describe(const char* name, const Tensor& t);  // "x [4,8] bf16"
void check_dev(const char* op, const char* name, const Tensor& t);
void check_dtype(const char* op, const char* name, const Tensor& t, DType want);
void check_float(const char* op, const char* name, const Tensor& t);  // f32 or bf16
void check_numel(const char* op, const char* name, const Tensor& t, int64_t n, const char* what);
int64_t rows_of(const char* op, const char* name, const Tensor& t, int64_t width);
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mf::cuda

// ---- device helpers ---------------------------------------------------------------------------
#if defined(__CUDACC__)
namespace mf::cuda {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Scalar conversions: every kernel computes in f32 and converts at load/store.
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }  // RNE
// The value x takes once stored as T (used where a later pass must see the stored value).
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

// N consecutive elements <-> N floats. When N * sizeof(T) is a multiple of 16 the access is done
// with 16-byte vectors (p must then be 16-byte aligned); otherwise element by element.
template <int N, typename T>
__device__ __forceinline__ void load_f(const T* p, float (&f)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int C = int(N * sizeof(T) / 16);
    int4 raw[C];
#pragma unroll
    for (int c = 0; c < C; ++c) raw[c] = reinterpret_cast<const int4*>(p)[c];
    const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_f(p[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_f(T* p, const float (&f)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int C = int(N * sizeof(T) / 16);
    int4 raw[C];
    T* e = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_f<T>(f[i]);
#pragma unroll
    for (int c = 0; c < C; ++c) reinterpret_cast<int4*>(p)[c] = raw[c];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_f<T>(f[i]);
  }
}

// Deterministic reductions: fixed shuffle tree, fixed order across warps.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `red` is shared scratch of at least 32 elements; the call ends with a barrier so it can be
// reused right away.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T r = lane < nwarps ? red[lane] : T(0);
  r = warp_sum(r);
  __syncthreads();
  return r;
}

}  // namespace mf::cuda
#endif  // __CUDACC__
