// SwiGLU forward/backward: elementwise, 16-byte vectors when every pointer is aligned.
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
  int64_t n;
};

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// Element range [i*VEC, i*VEC+VEC) per step; the tail (n % VEC) is done element by element.
template <typename T, int VEC, bool BWD>
__global__ void swiglu_kernel(SwigluParams p) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  const int64_t nvec = p.n / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < nvec; i += stride) {
    float g[VEC], u[VEC];
    load_f<VEC>(gate + i * VEC, g);
    load_f<VEC>(up + i * VEC, u);
    if constexpr (!BWD) {
      float h[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) h[e] = g[e] * sigmoidf_(g[e]) * u[e];
      store_f<VEC>(static_cast<T*>(p.h) + i * VEC, h);
    } else {
      float d[VEC], dg[VEC], du[VEC];
      load_f<VEC>(static_cast<const T*>(p.dh) + i * VEC, d);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float s = sigmoidf_(g[e]);
        dg[e] = d[e] * u[e] * s * (1.f + g[e] * (1.f - s));
        du[e] = d[e] * g[e] * s;
      }
      store_f<VEC>(static_cast<T*>(p.dgate) + i * VEC, dg);
      store_f<VEC>(static_cast<T*>(p.dup) + i * VEC, du);
    }
  }
  for (int64_t i = nvec * VEC + first; i < p.n; i += stride) {
    const float g = to_f(gate[i]), u = to_f(up[i]), s = sigmoidf_(g);
    if constexpr (!BWD) {
      static_cast<T*>(p.h)[i] = from_f<T>(g * s * u);
    } else {
      const float d = to_f(static_cast<const T*>(p.dh)[i]);
      static_cast<T*>(p.dgate)[i] = from_f<T>(d * u * s * (1.f + g * (1.f - s)));
      static_cast<T*>(p.dup)[i] = from_f<T>(d * g * s);
    }
  }
}

template <typename T, bool BWD>
void launch_swiglu(const SwigluParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = aligned16(p.gate) && aligned16(p.up) &&
                   (BWD ? aligned16(p.dh) && aligned16(p.dgate) && aligned16(p.dup) : aligned16(p.h));
  const int64_t work = vec ? ceil_div(p.n, VEC) : p.n;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(work, kSwigluThreads), kSwigluMaxBlocks));
  if (vec)
    swiglu_kernel<T, VEC, BWD><<<blocks, kSwigluThreads, 0, stream>>>(p);
  else
    swiglu_kernel<T, 1, BWD><<<blocks, kSwigluThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

namespace {
void check_like(const char* op, const char* name, const Tensor& t, const Tensor& gate) {
  check_float(op, name, t);
  MF_CHECK(t.dtype == gate.dtype && t.numel() == gate.numel(), op, ": ", describe(name, t),
           " must match ", describe("gate", gate));
}
}  // namespace

void op_swiglu_fwd(const Ctx& ctx, const Tensor& gate, const Tensor& up, Tensor& h) {
  const char* op = "swiglu_fwd";
  check_float(op, "gate", gate);
  check_like(op, "up", up, gate);
  check_like(op, "h", h, gate);
  SwigluParams p{gate.ptr, up.ptr, nullptr, h.ptr, nullptr, nullptr, gate.numel()};
  if (gate.dtype == DType::F32)
    launch_swiglu<float, false>(p, ctx.stream);
  else
    launch_swiglu<bf16, false>(p, ctx.stream);
}

void op_swiglu_bwd(const Ctx& ctx, const Tensor& dh, const Tensor& gate, const Tensor& up,
                   Tensor& dgate, Tensor& dup) {
  const char* op = "swiglu_bwd";
  check_float(op, "gate", gate);
  check_like(op, "up", up, gate);
  check_like(op, "dh", dh, gate);
  check_like(op, "dgate", dgate, gate);
  check_like(op, "dup", dup, gate);
  MF_CHECK(dgate.ptr != dup.ptr, op, ": dgate and dup must be different tensors");
  SwigluParams p{gate.ptr, up.ptr, dh.ptr, nullptr, dgate.ptr, dup.ptr, gate.numel()};
  if (gate.dtype == DType::F32)
    launch_swiglu<float, true>(p, ctx.stream);
  else
    launch_swiglu<bf16, true>(p, ctx.stream);
}

}  // namespace mf::cuda
