// SwiGLU forward/backward: elementwise over [rows, f], 16-byte vectors when every row start is
// aligned. Gate and up are either two [rows, f] tensors or the two halves of one packed
// [rows, 2f] tensor (what one GEMM against the stacked [W_gate; W_up] writes); the row strides
// say which.
#include "swiglu.cuh"

namespace mf::cuda {

constexpr int kSwigluThreads = 256;
constexpr int64_t kSwigluMaxBlocks = 4096;

struct SwigluParams {
  const void* gate;
  const void* up;
  const void* dh;  // backward only
  void* h;         // forward output
  void* dgate;     // backward outputs
  void* dup;
  int64_t rows, f;
  int64_t ld_in;   // row stride of gate and up (f, or 2f packed)
  int64_t ld_h;    // row stride of h and dh (f)
  int64_t ld_d;    // row stride of dgate and dup (f, or 2f packed)
};

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// Block (tx, ty): threadIdx.y picks one of ty rows, threadIdx.x strides over the row's VEC-wide
// vectors (VEC divides f on the vector path). Rows stride over the grid.
template <typename T, int VEC, bool BWD>
__global__ void swiglu_kernel(SwigluParams p) {
  const int64_t fv = p.f / VEC;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < p.rows;
       r += int64_t(gridDim.x) * blockDim.y) {
    const T* gate = static_cast<const T*>(p.gate) + r * p.ld_in;
    const T* up = static_cast<const T*>(p.up) + r * p.ld_in;
    for (int64_t c = threadIdx.x; c < fv; c += blockDim.x) {
      float g[VEC], u[VEC];
      load_f<VEC>(gate + c * VEC, g);
      load_f<VEC>(up + c * VEC, u);
      if constexpr (!BWD) {
        float h[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) h[e] = g[e] * sigmoidf_(g[e]) * u[e];
        store_f<VEC>(static_cast<T*>(p.h) + r * p.ld_h + c * VEC, h);
      } else {
        float d[VEC], dg[VEC], du[VEC];
        load_f<VEC>(static_cast<const T*>(p.dh) + r * p.ld_h + c * VEC, d);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float s = sigmoidf_(g[e]);
          dg[e] = d[e] * u[e] * s * (1.f + g[e] * (1.f - s));
          du[e] = d[e] * g[e] * s;
        }
        store_f<VEC>(static_cast<T*>(p.dgate) + r * p.ld_d + c * VEC, dg);
        store_f<VEC>(static_cast<T*>(p.dup) + r * p.ld_d + c * VEC, du);
      }
    }
  }
}

template <typename T, bool BWD>
void launch_swiglu(const SwigluParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.f == 0) return;
  constexpr int VEC = 16 / sizeof(T);
  // Every row start is aligned when the base pointers are and every row stride is a whole
  // number of vectors.
  auto ok = [](const void* ptr, int64_t ld) { return aligned16(ptr) && ld % VEC == 0; };
  const bool vec = p.f % VEC == 0 && ok(p.gate, p.ld_in) && ok(p.up, p.ld_in) &&
                   (BWD ? ok(p.dh, p.ld_h) && ok(p.dgate, p.ld_d) && ok(p.dup, p.ld_d)
                        : ok(p.h, p.ld_h));
  const int64_t fv = vec ? p.f / VEC : p.f;
  int tx = 1;  // a power of two covering the row's vectors, at most a whole block
  while (tx < fv && tx < kSwigluThreads) tx *= 2;
  const dim3 block(unsigned(tx), unsigned(kSwigluThreads / tx));
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(p.rows, int64_t(block.y)), kSwigluMaxBlocks));
  if (vec)
    swiglu_kernel<T, VEC, BWD><<<blocks, block, 0, stream>>>(p);
  else
    swiglu_kernel<T, 1, BWD><<<blocks, block, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <bool BWD>
void run_swiglu(const SwigluParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::F32)
    launch_swiglu<float, BWD>(p, stream);
  else
    launch_swiglu<bf16, BWD>(p, stream);
}

void op_swiglu_fwd(const Ctx& ctx, const Tensor& gate, const Tensor& up, Tensor& h) {
  const auto [rows, f] = contract::swiglu_fwd(contract::kCuda, gate, up, h);
  SwigluParams p{gate.ptr, up.ptr, nullptr, h.ptr, nullptr, nullptr, rows, f, f, f, f};
  run_swiglu<false>(p, gate.dtype, ctx.stream);
}

void op_swiglu_bwd(const Ctx& ctx, const Tensor& dh, const Tensor& gate, const Tensor& up,
                   Tensor& dgate, Tensor& dup) {
  const auto [rows, f] = contract::swiglu_bwd(contract::kCuda, dh, gate, up, dgate, dup);
  SwigluParams p{gate.ptr, up.ptr, dh.ptr, nullptr, dgate.ptr, dup.ptr, rows, f, f, f, f};
  run_swiglu<true>(p, gate.dtype, ctx.stream);
}

void op_swiglu_packed_fwd(const Ctx& ctx, const Tensor& gu, Tensor& h) {
  const int64_t f = contract::swiglu_packed_fwd(contract::kCuda, gu, h).f;
  const size_t half = size_t(f) * dtype_size(gu.dtype);
  const char* base = static_cast<const char*>(gu.ptr);
  SwigluParams p{base, base + half, nullptr, h.ptr, nullptr, nullptr, gu.dim(0), f, 2 * f, f, 0};
  run_swiglu<false>(p, gu.dtype, ctx.stream);
}

void op_swiglu_packed_bwd(const Ctx& ctx, const Tensor& dh, const Tensor& gu, Tensor& dgu) {
  const int64_t f = contract::swiglu_packed_bwd(contract::kCuda, dh, gu, dgu).f;
  const size_t half = size_t(f) * dtype_size(gu.dtype);
  const char* base = static_cast<const char*>(gu.ptr);
  char* dbase = static_cast<char*>(dgu.ptr);
  SwigluParams p{base, base + half, dh.ptr, nullptr, dbase, dbase + half, gu.dim(0), f, 2 * f, f, 2 * f};
  run_swiglu<true>(p, gu.dtype, ctx.stream);
}

}  // namespace mf::cuda
