// RMSNorm: forward one warp per row (two passes over the row: add+store+sum of squares, then
// normalise). Backward one warp per row when a lane can hold its share of the dw partial in
// registers (d <= 256 * VEC), else one block per row; either way a fixed set of kRmsBwdBlocks
// blocks each writes one dw partial row, and a column pass adds the partials in a fixed order
// (deterministic). Both take 16-byte accesses when d and the pointers allow, element by element
// otherwise.
#include "rmsnorm.cuh"

namespace mf::cuda {

constexpr int kRmsFwdWarps = 4;        // rows per forward block (one warp each)
constexpr int kRmsBwdThreads = 256;
constexpr int kRmsBwdWarps = kRmsBwdThreads / kWarp;  // rows in flight per block (warp kernel)
constexpr int kRmsBwdBlocks = 256;     // fixed: part of dw's summation order
constexpr int kRmsBwdMaxIter = 8;      // warp kernel: at most 8 x 32 x VEC columns per row
constexpr int kRmsColWarps = 8;        // dw column pass: partial rows summed by 8 warps, then in order

struct RmsnormParams {
  const void* resid_in;
  const void* branch;  // may be nullptr
  void* resid_out;
  const void* w;
  void* y;
  float* rstd;
  const void* dy;  // backward
  const void* x;
  void* dx;
  float* dw;
  float* partials;  // [blocks, d]
  int64_t N, d;
  float eps;
  int blocks;
};

template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kRmsFwdWarps * kWarp) rmsnorm_fwd_kernel(RmsnormParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kRmsFwdWarps + threadIdx.x / kWarp;
  if (row >= p.N) return;  // whole warps leave; no block barrier below
  const T* rin = static_cast<const T*>(p.resid_in) + row * p.d;
  const T* br = p.branch ? static_cast<const T*>(p.branch) + row * p.d : nullptr;
  T* rout = static_cast<T*>(p.resid_out) + row * p.d;
  const TW* w = static_cast<const TW*>(p.w);
  T* y = static_cast<T*>(p.y) + row * p.d;
  float ss = 0.f;
  for (int64_t c = int64_t(lane) * VEC; c < p.d; c += int64_t(kWarp) * VEC) {
    float x[VEC];
    load_f<VEC>(rin + c, x);
    if (br) {
      float b[VEC];
      load_f<VEC>(br + c, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] += b[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      x[e] = round_to<T>(x[e]);  // normalise what is stored (the backward sees the same x)
      ss += x[e] * x[e];
    }
    store_f<VEC>(rout + c, x);
  }
  ss = warp_sum(ss);
  const float r = rsqrtf(ss / float(p.d) + p.eps);
  if (lane == 0) p.rstd[row] = r;
  // Second pass reads back this thread's own stores (same addresses, program order).
  for (int64_t c = int64_t(lane) * VEC; c < p.d; c += int64_t(kWarp) * VEC) {
    float x[VEC], g[VEC];
    load_f<VEC>(rout + c, x);
    load_f<VEC>(w + c, g);
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = x[e] * r * g[e];
    store_f<VEC>(y + c, x);
  }
}

// The row math of both backward kernels, for the VEC columns at c of one row (g = dy, x, o = dx
// rows; r = rstd): the terms of sum(w dy x), then dx += r w dy - x coef with this row's dw terms
// dy x r added to dwv.
template <typename T, typename TW, int VEC>
__device__ __forceinline__ void rms_bwd_dot(const T* g, const TW* w, const T* x, int64_t c,
                                            float& dot) {
  float gv[VEC], wv[VEC], xv[VEC];
  load_f<VEC>(g + c, gv);
  load_f<VEC>(w + c, wv);
  load_f<VEC>(x + c, xv);
#pragma unroll
  for (int e = 0; e < VEC; ++e) dot += gv[e] * wv[e] * xv[e];
}

template <typename T, typename TW, int VEC>
__device__ __forceinline__ void rms_bwd_dx(const T* g, const TW* w, const T* x, T* o, int64_t c,
                                           float r, float coef, float (&dwv)[VEC]) {
  float gv[VEC], wv[VEC], xv[VEC], ov[VEC];
  load_f<VEC>(g + c, gv);  // the same thread's loads in rms_bwd_dot: L1 hits
  load_f<VEC>(w + c, wv);
  load_f<VEC>(x + c, xv);
  load_f<VEC>(o + c, ov);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    ov[e] = ov[e] + r * wv[e] * gv[e] - xv[e] * coef;
    dwv[e] += gv[e] * xv[e] * r;
  }
  store_f<VEC>(o + c, ov);
}

// VEC consecutive columns per thread per step (16-byte accesses when VEC > 1, then d % VEC == 0):
// thread t owns columns [VEC t, VEC t + VEC) + k VEC blockDim in every loop, so part[] needs no
// barrier. part[] keeps column c + e (c a multiple of VEC) at e (d / VEC) + c / VEC, so a warp's
// 32 threads touch 32 consecutive floats (no bank conflicts).
template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kRmsBwdThreads) rmsnorm_bwd_kernel(RmsnormParams p) {
  extern __shared__ float smem[];  // [kWarp] reduction scratch, then [d] dw partial
  float* red = smem;
  float* part = smem + kWarp;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const TW* w = static_cast<const TW*>(p.w);
  T* dx = static_cast<T*>(p.dx);
  const int64_t c0 = int64_t(threadIdx.x) * VEC, step = int64_t(kRmsBwdThreads) * VEC;
  const int64_t plane = p.d / VEC;
  for (int64_t c = c0; c < p.d; c += step)
#pragma unroll
    for (int e = 0; e < VEC; ++e) part[e * plane + c / VEC] = 0.f;
  for (int64_t row = blockIdx.x; row < p.N; row += p.blocks) {
    const T* g = dy + row * p.d;
    const T* xr = x + row * p.d;
    const float r = p.rstd[row];
    float dot = 0.f;
    for (int64_t c = c0; c < p.d; c += step) rms_bwd_dot<T, TW, VEC>(g, w, xr, c, dot);
    dot = block_sum(dot, red);
    const float coef = dot * r * r * r / float(p.d);
    T* o = dx + row * p.d;
    for (int64_t c = c0; c < p.d; c += step) {
      float dwv[VEC] = {};
      rms_bwd_dx<T, TW, VEC>(g, w, xr, o, c, r, coef, dwv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) part[e * plane + c / VEC] += dwv[e];
    }
  }
  float* out = p.partials + int64_t(blockIdx.x) * p.d;
  for (int64_t c = c0; c < p.d; c += step)
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[c + e] = part[e * plane + c / VEC];
}

// One warp per row: rows blockIdx.x * kRmsBwdWarps + warp + k * blocks * kRmsBwdWarps. Lane l owns
// columns (i * 32 + l) * VEC + [0, VEC), i < ITER, and keeps their dw partial in registers over
// its rows; no block barrier until the end, so every warp has its own row's loads in flight.
// The warps' partials then meet in shared memory ([kRmsBwdWarps, d]) and are added in warp
// order into the block's row of p.partials.
// Two blocks per SM (at most 128 registers a thread), so the fixed grid of kRmsBwdBlocks fits
// in one wave on 128 SMs or more.
template <typename T, typename TW, int VEC, int ITER>
__global__ void __launch_bounds__(kRmsBwdThreads, 2) rmsnorm_bwd_warp_kernel(RmsnormParams p) {
  extern __shared__ float smem[];  // [kRmsBwdWarps, d]
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const TW* w = static_cast<const TW*>(p.w);
  T* dx = static_cast<T*>(p.dx);
  float part[ITER][VEC];
#pragma unroll
  for (int i = 0; i < ITER; ++i)
#pragma unroll
    for (int e = 0; e < VEC; ++e) part[i][e] = 0.f;
  const int64_t step = int64_t(p.blocks) * kRmsBwdWarps;
  for (int64_t row = int64_t(blockIdx.x) * kRmsBwdWarps + warp; row < p.N; row += step) {
    const T* g = dy + row * p.d;
    const T* xr = x + row * p.d;
    const float r = p.rstd[row];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < ITER; ++i) {
      const int64_t c = (int64_t(i) * kWarp + lane) * VEC;
      if (c >= p.d) break;
      rms_bwd_dot<T, TW, VEC>(g, w, xr, c, dot);
    }
    dot = warp_sum(dot);
    const float coef = dot * r * r * r / float(p.d);
    T* o = dx + row * p.d;
#pragma unroll
    for (int i = 0; i < ITER; ++i) {
      const int64_t c = (int64_t(i) * kWarp + lane) * VEC;
      if (c >= p.d) break;
      rms_bwd_dx<T, TW, VEC>(g, w, xr, o, c, r, coef, part[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < ITER; ++i) {
    const int64_t c = (int64_t(i) * kWarp + lane) * VEC;
    if (c >= p.d) break;
#pragma unroll
    for (int e = 0; e < VEC; ++e) smem[int64_t(warp) * p.d + c + e] = part[i][e];
  }
  __syncthreads();
  float* out = p.partials + int64_t(blockIdx.x) * p.d;
  for (int64_t c = threadIdx.x; c < p.d; c += kRmsBwdThreads) {
    float sum = 0.f;
    for (int k = 0; k < kRmsBwdWarps; ++k) sum += smem[int64_t(k) * p.d + c];
    out[c] = sum;
  }
}

// dw[c] += the p.blocks partial rows of column c: warp k adds rows k, k + 8, ... (lane = column,
// so a warp reads 32 consecutive floats), then warp 0 adds the 8 sums in warp order.
__global__ void __launch_bounds__(kRmsColWarps * kWarp) rmsnorm_dw_kernel(RmsnormParams p) {
  __shared__ float red[kRmsColWarps][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t c = int64_t(blockIdx.x) * kWarp + lane;
  float s = 0.f;
  if (c < p.d)
    for (int b = warp; b < p.blocks; b += kRmsColWarps) s += p.partials[int64_t(b) * p.d + c];
  red[warp][lane] = s;
  __syncthreads();
  if (warp != 0 || c >= p.d) return;
  float t = 0.f;
#pragma unroll
  for (int k = 0; k < kRmsColWarps; ++k) t += red[k][lane];
  p.dw[c] += t;
}

template <typename T, typename TW>
void launch_rmsnorm_fwd(const RmsnormParams& p, cudaStream_t stream) {
  if (p.N == 0) return;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.d % VEC == 0 && aligned16(p.resid_in) && aligned16(p.resid_out) &&
                   aligned16(p.w) && aligned16(p.y) && (!p.branch || aligned16(p.branch));
  const unsigned blocks = unsigned(ceil_div(p.N, kRmsFwdWarps));
  if (vec)
    rmsnorm_fwd_kernel<T, TW, VEC><<<blocks, kRmsFwdWarps * kWarp, 0, stream>>>(p);
  else
    rmsnorm_fwd_kernel<T, TW, 1><<<blocks, kRmsFwdWarps * kWarp, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

using RmsnormKernel = void (*)(RmsnormParams);

// The warp kernel whose ITER covers `iters` column steps of 32 x VEC.
template <typename T, typename TW, int VEC>
RmsnormKernel rmsnorm_bwd_warp_for(int64_t iters) {
  return iters <= 1   ? rmsnorm_bwd_warp_kernel<T, TW, VEC, 1>
         : iters <= 2 ? rmsnorm_bwd_warp_kernel<T, TW, VEC, 2>
         : iters <= 4 ? rmsnorm_bwd_warp_kernel<T, TW, VEC, 4>
                      : rmsnorm_bwd_warp_kernel<T, TW, VEC, kRmsBwdMaxIter>;
}

template <typename T, typename TW>
void launch_rmsnorm_bwd(const RmsnormParams& p, size_t max_smem, cudaStream_t stream) {
  if (p.N == 0 || p.d == 0) return;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.d % VEC == 0 && aligned16(p.dy) && aligned16(p.x) && aligned16(p.dx) &&
                   ((VEC * sizeof(TW)) % 16 != 0 || aligned16(p.w));  // w is read by vector iff that
                                                                     // is a whole number of 16 bytes
  const int64_t iters = ceil_div(p.d, int64_t(kWarp) * (vec ? VEC : 1));
  RmsnormKernel kernel;
  size_t smem;
  if (iters <= kRmsBwdMaxIter) {  // warp per row: [kRmsBwdWarps, d] partials
    kernel = vec ? rmsnorm_bwd_warp_for<T, TW, VEC>(iters) : rmsnorm_bwd_warp_for<T, TW, 1>(iters);
    smem = size_t(kRmsBwdWarps) * size_t(p.d) * sizeof(float);
  } else {  // block per row: [kWarp] reduction scratch + [d] partial
    kernel = vec ? rmsnorm_bwd_kernel<T, TW, VEC> : rmsnorm_bwd_kernel<T, TW, 1>;
    smem = (kWarp + size_t(p.d)) * sizeof(float);
  }
  MF_CHECK(smem <= max_smem, "rmsnorm_bwd: d = ", p.d, " needs ", smem,
           " bytes of shared memory, more than the device's ", max_smem);
  if (smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<p.blocks, kRmsBwdThreads, smem, stream>>>(p);
  CUDA_CHECK_LAUNCH();
  rmsnorm_dw_kernel<<<unsigned(ceil_div(p.d, kWarp)), kRmsColWarps * kWarp, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

void op_add_rmsnorm_fwd(const Ctx& ctx, const Tensor& resid_in, const Tensor* branch,
                        Tensor& resid_out, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  const auto [N, d] =
      contract::add_rmsnorm_fwd(contract::kCuda, resid_in, branch, resid_out, w, eps, y, rstd);
  const DType T = resid_in.dtype;
  RmsnormParams p{};
  p.resid_in = resid_in.ptr;
  p.branch = branch ? branch->ptr : nullptr;
  p.resid_out = resid_out.ptr;
  p.w = w.ptr;
  p.y = y.ptr;
  p.rstd = rstd.data<float>();
  p.N = N;
  p.d = d;
  p.eps = eps;
  const bool tf = T == DType::F32, wf = w.dtype == DType::F32;
  if (tf && wf) return launch_rmsnorm_fwd<float, float>(p, ctx.stream);
  if (tf && !wf) return launch_rmsnorm_fwd<float, bf16>(p, ctx.stream);
  if (!tf && wf) return launch_rmsnorm_fwd<bf16, float>(p, ctx.stream);
  launch_rmsnorm_fwd<bf16, bf16>(p, ctx.stream);
}

void op_rmsnorm_bwd(const Ctx& ctx, const Tensor& dy, const Tensor& x, const Tensor& w,
                    const Tensor& rstd, Tensor& dx, Tensor& dw) {
  const auto [N, d] = contract::rmsnorm_bwd(contract::kCuda, dy, x, w, rstd, dx, dw);
  RmsnormParams p{};
  p.dy = dy.ptr;
  p.x = x.ptr;
  p.w = w.ptr;
  p.rstd = rstd.data<float>();
  p.dx = dx.ptr;
  p.dw = dw.data<float>();
  p.N = N;
  p.d = d;
  p.blocks = int(std::min<int64_t>(N, kRmsBwdBlocks));
  if (N == 0 || d == 0) return;
  Arena a(ctx.scratch->get(size_t(p.blocks) * d * sizeof(float)));
  p.partials = a.take<float>(size_t(p.blocks) * d);
  const bool tf = x.dtype == DType::F32, wf = w.dtype == DType::F32;
  if (tf && wf) return launch_rmsnorm_bwd<float, float>(p, ctx.max_smem_optin, ctx.stream);
  if (tf && !wf) return launch_rmsnorm_bwd<float, bf16>(p, ctx.max_smem_optin, ctx.stream);
  if (!tf && wf) return launch_rmsnorm_bwd<bf16, float>(p, ctx.max_smem_optin, ctx.stream);
  launch_rmsnorm_bwd<bf16, bf16>(p, ctx.max_smem_optin, ctx.stream);
}

}  // namespace mf::cuda
