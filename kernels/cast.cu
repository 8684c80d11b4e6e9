// f32 <-> bf16 casts. 16-byte vectors when both pointers allow it, scalar otherwise.
#include "cast.cuh"

namespace mf::cuda {

constexpr int kCastThreads = 256;
constexpr int kCastVec = 8;             // elements per thread step on the vector path
constexpr int64_t kCastMaxBlocks = 4096;  // grid-stride beyond this

struct CastParams {
  const void* src;
  void* dst;
  int64_t n;
};

// VEC elements per step; VEC == 1 is the scalar path.
template <typename TI, typename TO, int VEC>
__global__ void cast_kernel(CastParams p) {
  const TI* src = static_cast<const TI*>(p.src);
  TO* dst = static_cast<TO*>(p.dst);
  const int64_t nvec = p.n / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    float f[VEC];
    load_f<VEC>(src + i * VEC, f);
    store_f<VEC>(dst + i * VEC, f);
  }
  // Tail (only when n is not a multiple of VEC): handled by the first threads.
  for (int64_t i = nvec * VEC + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
    dst[i] = from_f<TO>(to_f(src[i]));
}

template <typename TI, typename TO>
void launch_cast(const CastParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const bool vec = aligned16(p.src) && aligned16(p.dst);
  const int64_t work = vec ? ceil_div(p.n, kCastVec) : p.n;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(work, kCastThreads), kCastMaxBlocks));
  if (vec)
    cast_kernel<TI, TO, kCastVec><<<blocks, kCastThreads, 0, stream>>>(p);
  else
    cast_kernel<TI, TO, 1><<<blocks, kCastThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

void launch_cast_f32_bf16(const float* src, void* dst, int64_t n, cudaStream_t stream) {
  launch_cast<float, bf16>({src, dst, n}, stream);
}
void launch_cast_bf16_f32(const void* src, float* dst, int64_t n, cudaStream_t stream) {
  launch_cast<bf16, float>({src, dst, n}, stream);
}

void op_cast(const Ctx& ctx, const Tensor& src, Tensor& dst) {
  const char* op = "copy";
  check_dev(op, "src", src);
  check_dev(op, "dst", dst);
  MF_CHECK(src.numel() == dst.numel(), op, ": ", describe("src", src), " and ",
           describe("dst", dst), " differ in size");
  if (src.dtype == dst.dtype) {
    if (src.ptr != dst.ptr && src.nbytes() > 0)
      CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, src.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream));
    return;
  }
  MF_CHECK(src.ptr != dst.ptr, op, ": an in-place cast between dtypes is not possible");
  if (src.dtype == DType::F32 && dst.dtype == DType::BF16)
    return launch_cast_f32_bf16(static_cast<const float*>(src.ptr), dst.ptr, src.numel(), ctx.stream);
  if (src.dtype == DType::BF16 && dst.dtype == DType::F32)
    return launch_cast_bf16_f32(src.ptr, static_cast<float*>(dst.ptr), src.numel(), ctx.stream);
  MF_FAIL(op, ": cannot convert ", describe("src", src), " to ", describe("dst", dst),
          " (casts are between f32 and bf16)");
}

}  // namespace mf::cuda
