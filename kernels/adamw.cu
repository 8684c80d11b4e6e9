// AdamW: elementwise, float4 vectors when every pointer is 16-byte aligned. The arithmetic
// follows CpuBackend::adamw_update operation by operation (same rounding up to FMA contraction).
#include "adamw.cuh"

namespace mf::cuda {

constexpr int kAdamThreads = 256;
constexpr int64_t kAdamMaxBlocks = 8192;

struct AdamWParams {
  float* p;
  const float* g;
  float* m;
  float* v;
  void* out;  // optional compute copy
  int64_t n;
  float lr, b1, b2, eps, keep, inv_bc1, inv_bc2, grad_scale;
  bool cautious;  // decay only where p * mhat >= 0
};

__device__ __forceinline__ float adamw_elem(const AdamWParams& a, float p, float g, float& m,
                                            float& v) {
  const float gi = g * a.grad_scale;
  m = a.b1 * m + (1.f - a.b1) * gi;
  v = a.b2 * v + (1.f - a.b2) * gi * gi;
  const float mhat = m * a.inv_bc1, vhat = v * a.inv_bc2;
  const float keep = a.cautious && p * mhat < 0.f ? 1.f : a.keep;
  return p * keep - a.lr * mhat / (sqrtf(vhat) + a.eps);
}

template <int VEC, typename TO>
__global__ void adamw_kernel(AdamWParams a) {
  const int64_t nvec = a.n / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  TO* out = static_cast<TO*>(a.out);
  for (int64_t i = first; i < nvec; i += stride) {
    float p[VEC], g[VEC], m[VEC], v[VEC];
    load_f<VEC>(a.p + i * VEC, p);
    load_f<VEC>(a.g + i * VEC, g);
    load_f<VEC>(a.m + i * VEC, m);
    load_f<VEC>(a.v + i * VEC, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = adamw_elem(a, p[e], g[e], m[e], v[e]);
    store_f<VEC>(a.p + i * VEC, p);
    store_f<VEC>(a.m + i * VEC, m);
    store_f<VEC>(a.v + i * VEC, v);
    if (out) store_f<VEC>(out + i * VEC, p);
  }
  for (int64_t i = nvec * VEC + first; i < a.n; i += stride) {
    float m = a.m[i], v = a.v[i];
    const float p = adamw_elem(a, a.p[i], a.g[i], m, v);
    a.p[i] = p;
    a.m[i] = m;
    a.v[i] = v;
    if (out) out[i] = from_f<TO>(p);
  }
}

template <typename TO>
void launch_adamw(const AdamWParams& a, cudaStream_t stream) {
  if (a.n == 0) return;
  constexpr int VEC = 4;
  const bool vec = aligned16(a.p) && aligned16(a.g) && aligned16(a.m) && aligned16(a.v) &&
                   (!a.out || aligned16(a.out));
  // bf16 out with VEC = 4 is an 8-byte store: store_f falls back to scalar stores, still fine.
  const int64_t work = vec ? ceil_div(a.n, VEC) : a.n;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(work, kAdamThreads), kAdamMaxBlocks));
  if (vec)
    adamw_kernel<VEC, TO><<<blocks, kAdamThreads, 0, stream>>>(a);
  else
    adamw_kernel<1, TO><<<blocks, kAdamThreads, 0, stream>>>(a);
  CUDA_CHECK_LAUNCH();
}

void op_adamw_update(const Ctx& ctx, Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                     const AdamWArgs& args, Tensor* weight_out) {
  const char* op = "adamw_update";
  contract::adamw_update(contract::kCuda, p, g, m, v, args);
  AdamWParams a{p.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), nullptr,
                p.numel(), args.lr, args.b1, args.b2, args.eps, 1.f - args.decay,
                1.f / args.bc1, 1.f / args.bc2, args.grad_scale, args.cautious};
  if (weight_out) {
    check_float(op, "weight_out", *weight_out);
    check_numel(op, "weight_out", *weight_out, p.numel(), "one per parameter");
    a.out = weight_out->ptr;
    if (weight_out->dtype == DType::BF16) return launch_adamw<bf16>(a, ctx.stream);
  }
  launch_adamw<float>(a, ctx.stream);
}

}  // namespace mf::cuda
