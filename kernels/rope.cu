// RoPE: one kernel builds the cos/sin table in scratch, one applies the rotation
// (one thread per (row, i < hd/2) pair: reads x[i], x[i+hd/2], writes both, so y may alias x).
#include "rope.cuh"

namespace mf::cuda {

constexpr int kRopeThreads = 256;
constexpr int64_t kRopeMaxBlocks = 8192;

struct RopeParams {
  const void* x;
  void* y;
  const float* cs;  // [T, half] cos
  const float* sn;  // [T, half] sin (negated for the inverse rotation)
  int64_t rows;     // B*T*H
  int T, H, half;
};

__global__ void rope_table_kernel(float* cs, float* sn, int T, int half, double theta, bool inverse) {
  const int64_t n = int64_t(T) * half;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int t = int(idx / half), i = int(idx % half);
    const float inv_freq = float(pow(theta, -2.0 * double(i) / double(2 * half)));
    const double f = double(t) * double(inv_freq);
    cs[idx] = float(cos(f));
    sn[idx] = float(inverse ? -sin(f) : sin(f));
  }
}

template <typename T>
__global__ void rope_kernel(RopeParams p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t n = p.rows * p.half;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / p.half;
    const int i = int(idx % p.half);
    const int t = int((row / p.H) % p.T);
    const float c = p.cs[int64_t(t) * p.half + i], s = p.sn[int64_t(t) * p.half + i];
    const int64_t base = row * 2 * p.half;
    const float a = to_f(x[base + i]), b = to_f(x[base + i + p.half]);
    y[base + i] = from_f<T>(a * c - b * s);
    y[base + i + p.half] = from_f<T>(b * c + a * s);
  }
}

template <typename T>
void launch_rope(const RopeParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.half;
  if (n == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(n, kRopeThreads), kRopeMaxBlocks));
  rope_kernel<T><<<blocks, kRopeThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

namespace {
void rope_entry(const Ctx& ctx, const char* op, const char* xn, const Tensor& x, const char* yn,
                Tensor& y, float theta, bool inverse) {
  check_float(op, xn, x);
  check_float(op, yn, y);
  MF_CHECK(x.ndim() == 4, op, ": ", describe(xn, x), " must be [B,T,H,hd]");
  MF_CHECK(y.shape == x.shape && y.dtype == x.dtype, op, ": ", describe(yn, y), " must match ",
           describe(xn, x));
  MF_CHECK(x.dim(3) % 2 == 0, op, ": head_dim ", x.dim(3), " must be even for rotary embedding");
  MF_CHECK(theta > 0.f, op, ": rope_theta ", theta, " must be positive (model.rope_theta)");
  MF_CHECK(x.dim(1) <= 0x7fffffff && x.dim(2) <= 0x7fffffff && x.dim(3) <= 0x7fffffff, op,
           ": ", describe(xn, x), " is too large");
  const int T = int(x.dim(1)), H = int(x.dim(2)), half = int(x.dim(3) / 2);
  if (x.numel() == 0) return;
  Arena sz;
  sz.take<float>(size_t(T) * half);
  sz.take<float>(size_t(T) * half);
  Arena a(ctx.scratch->get(sz.used()));
  float* cs = a.take<float>(size_t(T) * half);
  float* sn = a.take<float>(size_t(T) * half);
  const int64_t tn = int64_t(T) * half;
  rope_table_kernel<<<unsigned(std::min<int64_t>(ceil_div(tn, kRopeThreads), kRopeMaxBlocks)),
                      kRopeThreads, 0, ctx.stream>>>(cs, sn, T, half, double(theta), inverse);
  CUDA_CHECK_LAUNCH();
  RopeParams p{x.ptr, y.ptr, cs, sn, x.dim(0) * T * int64_t(H), T, H, half};
  if (x.dtype == DType::F32)
    launch_rope<float>(p, ctx.stream);
  else
    launch_rope<bf16>(p, ctx.stream);
}
}  // namespace

void op_rope_fwd(const Ctx& ctx, const Tensor& x, Tensor& y, float theta) {
  rope_entry(ctx, "rope_fwd", "x", x, "y", y, theta, false);
}
void op_rope_bwd(const Ctx& ctx, const Tensor& dy, Tensor& dx, float theta) {
  rope_entry(ctx, "rope_bwd", "dy", dy, "dx", dx, theta, true);
}

}  // namespace mf::cuda
