// Fused lm-head cross-entropy: chunked logits GEMM, a row kernel for loss and dlogits, and the
// two gradient GEMMs. See xent.cuh.
#include "xent.cuh"

#include "backend/cuda/cublaslt.h"
#include "backend/cuda/sizes.h"

namespace mf::cuda {

constexpr int kXentThreads = 512;  // one block per row of logits
// kXentRowAlign, kXentLdAlign and the chunk's rows: backend/cuda/sizes.h (the memory plan uses
// the same functions).
static_assert(Arena::kAlign == 256, "sizes.h's xent_scratch_bytes cuts 256-byte pieces");
constexpr int kXentVec = 8;  // columns per vector step of the row kernel (kXentLdAlign keeps rows aligned)
static_assert(kXentLdAlign % kXentVec == 0, "xent rows must stay 32-byte aligned for the vector loads");

template <class T>
struct XentParams {
  const float* logits;     // [rows, ld] (first V columns used)
  T* dlogits;              // [rows, ld] or nullptr (no gradient); bf16, or f32 for fp32 runs
  const int32_t* targets;  // [rows] (already offset to the chunk)
  float* losses;           // [rows]
  int64_t V;
  int64_t ld;              // row pitch of logits and dlogits (>= V)
  float gscale;            // loss_scale * logit_scale
};

// Online (max, sum-exp) merge: combines two partial softmax normalisers.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

template <class T>
__global__ void __launch_bounds__(kXentThreads) xent_row_kernel(XentParams<T> p) {
  __shared__ float red_m[kXentThreads / kWarp];
  __shared__ float red_s[kXentThreads / kWarp];
  const int64_t row = blockIdx.x;
  const float* z = p.logits + row * p.ld;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  float m = -INFINITY, s = 0.f;
  // kXentVec columns per thread per step (two 16-byte loads; rows are 32-byte aligned since ld is
  // a multiple of 8): the running max moves once per group, then the group's exps are added.
  const int64_t nvec = p.V / kXentVec;
  for (int64_t i = tid; i < nvec; i += kXentThreads) {
    float v[kXentVec];
    load_f<kXentVec>(z + i * kXentVec, v);
    float vm = v[0];
#pragma unroll
    for (int k = 1; k < kXentVec; ++k) vm = fmaxf(vm, v[k]);
    if (vm > m) {
      s *= expf(m - vm);  // m = -inf first: exp(-inf) = 0
      m = vm;
    }
#pragma unroll
    for (int k = 0; k < kXentVec; ++k) s += expf(v[k] - m);
  }
  for (int64_t j = nvec * kXentVec + tid; j < p.V; j += kXentThreads) {  // the last V % 8 columns
    const float v = z[j];
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, o), s2 = __shfl_xor_sync(kFullMask, s, o);
    lse_merge(m, s, m2, s2);
  }
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
  }
  __syncthreads();
  m = -INFINITY;
  s = 0.f;
  for (int w = 0; w < kXentThreads / kWarp; ++w) lse_merge(m, s, red_m[w], red_s[w]);  // fixed order
  const float lse = m + logf(s);
  const int32_t y = p.targets[row];
  const bool valid = y >= 0 && int64_t(y) < p.V;
  if (tid == 0) p.losses[row] = valid ? lse - z[y] : __int_as_float(0x7fc00000);
  if (!p.dlogits) return;
  T* dl = p.dlogits + row * p.ld;
  for (int64_t i = tid; i < nvec; i += kXentThreads) {
    float g[kXentVec];
    load_f<kXentVec>(z + i * kXentVec, g);
#pragma unroll
    for (int k = 0; k < kXentVec; ++k) {
      g[k] = p.gscale * expf(g[k] - lse);
      if (i * kXentVec + k == y) g[k] -= p.gscale;
    }
    store_f<kXentVec>(dl + i * kXentVec, g);  // 16-byte vector stores (one in bf16, two in f32)
  }
  for (int64_t j = nvec * kXentVec + tid; j < p.V; j += kXentThreads) {
    float g = p.gscale * expf(z[j] - lse);
    if (j == y) g -= p.gscale;
    dl[j] = from_f<T>(g);
  }
}

template <class T>
void launch_xent_rows(const XentParams<T>& p, int64_t rows, cudaStream_t stream) {
  if (rows == 0) return;
  xent_row_kernel<T><<<unsigned(rows), kXentThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <class T>
void lmhead_xent_t(const Ctx& ctx, const Tensor& x, const Tensor& W, const Tensor& targets,
                   float logit_scale, Tensor& losses, Tensor* dx, Tensor* dW, float loss_scale) {
  const int64_t V = W.dim(0), d = W.dim(1), N = x.numel() / d;
  const bool grads = dx || dW;
  const int64_t ld = xent_ld(V);
  const int64_t R = xent_chunk_rows(N, V, ctx.xent_chunk_bytes, sizeof(T), grads);

  Arena sz;
  sz.take<float>(size_t(R * ld));
  if (grads) sz.take<T>(size_t(R * ld));
  Arena ar(ctx.scratch->get(sz.used()));
  float* logits = ar.take<float>(size_t(R * ld));
  T* dlogits = grads ? ar.take<T>(size_t(R * ld)) : nullptr;

  const T* xp = static_cast<const T*>(x.ptr);
  const DType dt = x.dtype;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    GemmArgs g;  // logits[rows,V] = logit_scale * x[r0:r0+rows] W^T
    g.transB = true;
    g.M = rows; g.N = V; g.K = d;
    g.A = xp + r0 * d; g.lda = d; g.B = W.ptr; g.ldb = d; g.D = logits; g.ldd = ld;
    g.ab = dt; g.cd = DType::F32; g.alpha = logit_scale; g.beta = 0.f;
    ctx.lt->gemm(g);

    XentParams<T> p{logits, dlogits, targets.data<int32_t>() + r0, losses.data<float>() + r0, V, ld,
                 loss_scale * logit_scale};
    launch_xent_rows(p, rows, ctx.stream);

    if (dx) {
      GemmArgs h;  // dx[rows,d] (=) dlogits[rows,V] W[V,d]
      h.M = rows; h.N = d; h.K = V;
      h.A = dlogits; h.lda = ld; h.B = W.ptr; h.ldb = d;
      h.D = static_cast<T*>(dx->ptr) + r0 * d; h.ldd = d;
      h.ab = dt; h.cd = dt; h.alpha = 1.f; h.beta = 0.f;
      ctx.lt->gemm(h);
    }
    if (dW) {
      GemmArgs h;  // dW[V,d] += dlogits^T[V,rows] x[rows,d]
      h.transA = true;
      h.M = V; h.N = d; h.K = rows;
      h.A = dlogits; h.lda = ld; h.B = xp + r0 * d; h.ldb = d; h.D = dW->ptr; h.ldd = d;
      h.ab = dt; h.cd = dW->dtype; h.alpha = 1.f; h.beta = 1.f;
      ctx.lt->gemm(h);
    }
  }
}

void op_lmhead_xent(const Ctx& ctx, const Tensor& x, const Tensor& W, const Tensor& targets,
                    float logit_scale, Tensor& losses, Tensor* dx, Tensor* dW, float loss_scale) {
  const int64_t N = contract::lmhead_xent(contract::kCuda, x, W, targets, losses, dx, dW).N;
  if (N == 0) return;
  if (x.dtype == DType::F32)
    return lmhead_xent_t<float>(ctx, x, W, targets, logit_scale, losses, dx, dW, loss_scale);
  lmhead_xent_t<bf16>(ctx, x, W, targets, logit_scale, losses, dx, dW, loss_scale);
}

}  // namespace mf::cuda
