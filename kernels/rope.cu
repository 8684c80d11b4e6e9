// RoPE: one kernel builds the cos/sin table in scratch, one applies the rotation (blocks stride
// over positions, a block's threads over the position's (head, i < hd/2) pairs: each reads x[i],
// x[i+hd/2] and writes both, so y may alias x).
#include "rope.cuh"

namespace mf::cuda {

constexpr int kRopeThreads = 256;
constexpr int64_t kRopeMaxBlocks = 8192;

struct RopeParams {
  const void* x;
  void* y;
  const float* cs;  // [T, half] cos
  const float* sn;  // [T, half] sin (negated for the inverse rotation)
  int64_t positions;  // B*T
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
  const int pairs = p.H * p.half;
  for (int64_t pos = blockIdx.x; pos < p.positions; pos += gridDim.x) {
    const int t = int(pos % p.T);
    const float* cs = p.cs + int64_t(t) * p.half;
    const float* sn = p.sn + int64_t(t) * p.half;
    const T* x = static_cast<const T*>(p.x) + pos * p.H * 2 * p.half;
    T* y = static_cast<T*>(p.y) + pos * p.H * 2 * p.half;
    for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
      const int h = j / p.half, i = j - h * p.half;
      const int base = 2 * h * p.half;  // < H * hd, checked to fit an int
      const float c = cs[i], s = sn[i];
      const float a = to_f(x[base + i]), b = to_f(x[base + i + p.half]);
      y[base + i] = from_f<T>(a * c - b * s);
      y[base + i + p.half] = from_f<T>(b * c + a * s);
    }
  }
}

template <typename T>
void launch_rope(const RopeParams& p, cudaStream_t stream) {
  if (p.positions == 0 || p.H == 0 || p.half == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(p.positions, kRopeMaxBlocks));
  rope_kernel<T><<<blocks, kRopeThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

// The packed projections: blocks stride over positions; a block's threads take the position's
// (head, i < half) pairs of its H + 2 Hkv heads (no 64-bit division per element). Split reads
// the packed row and writes q, k (rotated) and v (copied); merge reads dq, dk, dv and writes the
// packed row (the table then holds the inverse rotation).
struct QkvParams {
  void* packed;       // qkv (split: read) or dqkv (merge: written), [B*T, H+2Hkv, hd]
  void* q;            // [B*T, H, hd]   split: written; merge: read
  void* k;            // [B*T, Hkv, hd]
  void* v;            // [B*T, Hkv, hd]
  const float* cs;
  const float* sn;
  int64_t positions;  // B*T
  int T, H, Hkv, half;
};

template <typename T, bool MERGE>
__global__ void qkv_rope_kernel(QkvParams p) {
  const int heads = p.H + 2 * p.Hkv, hd = 2 * p.half, pairs = heads * p.half;
  for (int64_t pos = blockIdx.x; pos < p.positions; pos += gridDim.x) {
    const int t = int(pos % p.T);
    T* packed_row = static_cast<T*>(p.packed) + pos * heads * hd;
    for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
      const int h = j / p.half, i = j - h * p.half;
      T* sep;
      if (h < p.H)
        sep = static_cast<T*>(p.q) + (pos * p.H + h) * hd;
      else if (h < p.H + p.Hkv)
        sep = static_cast<T*>(p.k) + (pos * p.Hkv + (h - p.H)) * hd;
      else
        sep = static_cast<T*>(p.v) + (pos * p.Hkv + (h - p.H - p.Hkv)) * hd;
      T* packed = packed_row + int64_t(h) * hd;
      const T* src = MERGE ? sep : packed;
      T* dst = MERGE ? packed : sep;
      const float a = to_f(src[i]), b = to_f(src[i + p.half]);
      if (h < p.H + p.Hkv) {
        const float c = p.cs[int64_t(t) * p.half + i], s = p.sn[int64_t(t) * p.half + i];
        dst[i] = from_f<T>(a * c - b * s);
        dst[i + p.half] = from_f<T>(b * c + a * s);
      } else {
        dst[i] = from_f<T>(a);
        dst[i + p.half] = from_f<T>(b);
      }
    }
  }
}

template <typename T, bool MERGE>
void launch_qkv_rope(const QkvParams& p, cudaStream_t stream) {
  if (p.positions == 0 || p.half == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(p.positions, kRopeMaxBlocks));
  qkv_rope_kernel<T, MERGE><<<blocks, kRopeThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

namespace {
// cos and sin [T, half] in the context's scratch (sin negated for the inverse rotation).
void rope_table(const Ctx& ctx, int T, int half, float theta, bool inverse, float*& cs, float*& sn) {
  Arena sz;
  sz.take<float>(size_t(T) * half);
  sz.take<float>(size_t(T) * half);
  Arena a(ctx.scratch->get(sz.used()));
  cs = a.take<float>(size_t(T) * half);
  sn = a.take<float>(size_t(T) * half);
  const int64_t tn = int64_t(T) * half;
  rope_table_kernel<<<unsigned(std::min<int64_t>(ceil_div(tn, kRopeThreads), kRopeMaxBlocks)),
                      kRopeThreads, 0, ctx.stream>>>(cs, sn, T, half, double(theta), inverse);
  CUDA_CHECK_LAUNCH();
}

void rope_entry(const Ctx& ctx, const char* op, const char* xn, const Tensor& x, const char* yn,
                Tensor& y, float theta, bool inverse) {
  contract::rope(contract::kCuda, op, xn, x, yn, y, theta);
  MF_CHECK(x.dim(1) <= 0x7fffffff && x.dim(2) * x.dim(3) <= 0x7fffffff, op, ": ",
           describe(xn, x), " is too large (a position's heads must hold fewer than 2^31 elements)");
  const int T = int(x.dim(1)), H = int(x.dim(2)), half = int(x.dim(3) / 2);
  if (x.numel() == 0) return;
  float *cs, *sn;
  rope_table(ctx, T, half, theta, inverse, cs, sn);
  RopeParams p{x.ptr, y.ptr, cs, sn, x.dim(0) * T, T, H, half};
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

namespace {
// packed [B,T,H+2Hkv,hd] against q [B,T,H,hd], k and v [B,T,Hkv,hd]; then the launch.
template <bool MERGE>
void qkv_entry(const Ctx& ctx, const char* op, const char* pn, const Tensor& packed,
               const char* qn, const Tensor& q, const char* kn, const Tensor& k, const char* vn,
               const Tensor& v, float theta) {
  contract::qkv_rope(contract::kCuda, op, pn, packed, qn, q, kn, k, vn, v, theta);
  MF_CHECK(q.dim(1) <= 0x7fffffff && (q.dim(2) + 2 * k.dim(2)) * q.dim(3) <= 0x7fffffff, op, ": ",
           describe(pn, packed), " is too large (a row must have fewer than 2^31 elements)");
  if (packed.numel() == 0) return;
  const int T = int(q.dim(1)), half = int(q.dim(3) / 2);
  float *cs, *sn;
  rope_table(ctx, T, half, theta, MERGE, cs, sn);
  QkvParams p{packed.ptr, q.ptr, k.ptr, v.ptr, cs, sn, q.dim(0) * T, T, int(q.dim(2)),
              int(k.dim(2)), half};
  if (q.dtype == DType::F32)
    launch_qkv_rope<float, MERGE>(p, ctx.stream);
  else
    launch_qkv_rope<bf16, MERGE>(p, ctx.stream);
}
}  // namespace

void op_qkv_rope_split(const Ctx& ctx, const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, float theta) {
  qkv_entry<false>(ctx, "qkv_rope_split", "qkv", qkv, "q", q, "k", k, "v", v, theta);
}
void op_qkv_rope_merge_bwd(const Ctx& ctx, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                           Tensor& dqkv, float theta) {
  qkv_entry<true>(ctx, "qkv_rope_merge_bwd", "dqkv", dqkv, "dq", dq, "dk", dk, "dv", dv, theta);
}

}  // namespace mf::cuda
