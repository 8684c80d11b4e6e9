// Mixture-of-Experts kernels (see moe.cuh; math in src/backend/cpu/ref_moe.h).
//
// Router forward: an fp32 cuBLASLt GEMM writes the logits into probs; then one warp per token
// scores the row in place (softmax with a double sum, or sigmoid), picks the k best experts by a
// warp arg-max per pick (ties to the lower index; bias only for the ranking; a per-lane 64-bit
// mask marks taken experts) and writes the renormalised, route-scaled weights. counts is an
// integer histogram; score_sum is a fixed two-pass column sum in double (chunks of rows, then
// the chunks in order), independent of the device.
// Permutation: histogram, capacity-clamped exclusive scan (one thread, E <= 2048), then a stable
// sort of the N*k slots by expert (sort.cuh) and one thread per sorted slot placing it, so each
// expert's rows keep token order (the CPU's sequential plan exactly).
// Gather / gather backward / combine: one block per output row, columns over threads (16-byte
// vectors when aligned), the k slots summed in slot order in f32 registers. Combine backward: one
// block per token; dyg rows written, the dots reduced in double with a fixed block tree.
// Products that the CPU rounds separately use __fmul_rn so nvcc does not contract them to FMAs
// (the f32 results then match the CPU's up to summation order, often bitwise).
#include "moe.cuh"

#include "backend/cuda/cublaslt.h"
#include "backend/cuda/sizes.h"
#include "cast.cuh"
#include "sort.cuh"

namespace mf::cuda {

constexpr int kMoeRouterThreads = 128;     // 4 warps = 4 tokens per block (router fwd and bwd)
constexpr int kMoeSumThreads = 128;        // experts per block of the score-sum pass 1
constexpr int kMoeSumChunks = 128;         // fixed row chunks of the score sum (pass 1 grid.y)
constexpr int kMoeCountThreads = 256;      // histogram
constexpr int64_t kMoeCountMaxBlocks = 256;
constexpr int kMoePlaceThreads = 256;      // permutation plan: one thread per sorted slot
constexpr int kMoeRowThreads = 256;        // gather / gather_bwd / combine: one block per row
constexpr int kMoeAddThreads = 256;        // f32 scratch -> dx accumulation
constexpr int64_t kMoeAddMaxBlocks = 4096;
constexpr double kMoeRenormEps = 1e-20;    // = ref::kMoeNormEps (top-k renormalisation guard)

static_assert(Arena::kAlign == 256, "sizes.h's moe_router_bwd_scratch_bytes cuts 256-byte pieces");
static_assert(kMoeMaxExperts <= kWarp * 64, "router: one 64-bit taken mask per lane");

// ---- params -------------------------------------------------------------------------------------

struct MoeRouterParams {
  float* probs;          // [N,E]: logits in, scores out
  const float* bias;     // [E] or nullptr
  int32_t* idx;          // [N,k]
  float* w;              // [N,k]
  double* inv_row;       // [N]: 1 / row sum of the scores (sigmoid only)
  int64_t N;
  int E, k;
  bool norm_topk;
  double route_scale;
};

struct MoeScoreSumParams {
  const float* probs;     // [N,E]
  const double* inv_row;  // [N] or nullptr (softmax: pn = probs)
  double* partials;       // [kMoeSumChunks, E]
  float* score_sum;       // [E]
  int64_t N;
  int E;
  int64_t rows_per_chunk;
};

struct MoeRouteBwdParams {
  const float* dw;     // [N,k]
  const float* aux;    // [E] or nullptr
  const float* probs;  // [N,E]
  const int32_t* idx;  // [N,k]
  float* dlogits;      // [N,E]
  int64_t N;
  int E, k;
  bool norm_topk;
  float route_scale;
};

struct MoeAddParams {
  const float* src;
  void* dst;  // f32 or bf16
  int64_t n;
};

struct MoePlanParams {
  const int32_t* idx;  // [N*k]
  int32_t* counts;     // [E] histogram (scratch)
  int32_t* offsets;    // [E+1]
  int32_t* starts;     // [E] scratch: sorted position of each expert's first slot (no capacity)
  int32_t* row_of;     // [N*k], pre-filled with -1
  int32_t* row_token;  // [N*k], pre-filled with -1
  int64_t slots;       // N*k
  int k, E;
  int64_t capacity;    // <= 0: dropless
};

struct MoeRowsParams {
  const void* src;     // gather: x [rows_src,d]; gather_bwd: dxg; combine: yg
  void* dst;           // gather: xg; gather_bwd: dx; combine fwd: out; combine bwd: dyg
  const void* dout;    // combine bwd: dout [N,d]
  const int32_t* map;  // gather: row_token [M]; others: row_of [N,k]
  const float* w;      // combine: topk_w [N,k]
  float* dw;           // combine bwd: dtopk_w [N,k]
  int64_t rows_src;    // rows of src (valid map values are [0, rows_src))
  int64_t d;
  int k;
  bool accumulate;
};

// ---- router -------------------------------------------------------------------------------------

template <bool SIGMOID>
__global__ void __launch_bounds__(kMoeRouterThreads) moe_router_kernel(MoeRouterParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = int64_t(blockIdx.x) * (kMoeRouterThreads / kWarp) + threadIdx.x / kWarp;
  if (n >= p.N) return;  // the whole warp leaves together
  const int E = p.E;
  float* row = p.probs + n * E;
  // Scores, in place. Lane l owns experts l, l+32, ...
  if constexpr (SIGMOID) {
    double s = 0;
    for (int e = lane; e < E; e += kWarp) {
      const float v = 1.f / (1.f + expf(-row[e]));
      row[e] = v;
      s += double(v);
    }
    s = warp_sum(s);
    if (lane == 0) p.inv_row[n] = 1.0 / s;
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, row[e]);
    mx = warp_max(mx);
    double s = 0;
    for (int e = lane; e < E; e += kWarp) {
      const float v = expf(row[e] - mx);
      row[e] = v;
      s += double(v);
    }
    s = warp_sum(s);
    const float inv = float(1.0 / s);
    for (int e = lane; e < E; e += kWarp) row[e] = __fmul_rn(row[e], inv);
  }
  __syncwarp();  // lane 0 reads the chosen experts' scores below

  // Top-k: per pick, each lane's best untaken expert, then a warp arg-max (ties: lower index).
  uint64_t taken = 0;  // bit i: expert lane + 32 i
  int32_t* id = p.idx + n * p.k;
  double s = 0;  // lane 0: sum of the chosen scores, in pick order
  for (int j = 0; j < p.k; ++j) {
    int best = -1;
    float bv = 0.f;
    for (int i = 0, e = lane; e < E; ++i, e += kWarp) {
      if ((taken >> i) & 1ull) continue;
      const float v = p.bias ? row[e] + p.bias[e] : row[e];
      if (best < 0 || v > bv) {  // increasing e: ties keep the lower index
        best = e;
        bv = v;
      }
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, bv, o);
      const int oi = __shfl_xor_sync(kFullMask, best, o);
      if (oi >= 0 && (best < 0 || ov > bv || (ov == bv && oi < best))) {
        best = oi;
        bv = ov;
      }
    }
    best = __shfl_sync(kFullMask, best, 0);  // one answer even if NaNs broke the order
    if (best < 0) best = 0;                  // unreachable for k <= E (checked on the host)
    if (best % kWarp == lane) taken |= 1ull << (best / kWarp);
    if (lane == 0) {
      id[j] = best;
      s += double(row[best]);
    }
  }
  if (lane == 0) {
    const float scale = p.norm_topk ? float(p.route_scale / (s + kMoeRenormEps)) : float(p.route_scale);
    for (int j = 0; j < p.k; ++j) p.w[n * p.k + j] = __fmul_rn(row[id[j]], scale);
  }
}

// Pass 1: partials[c, e] = sum over the rows of chunk c, in order, of probs[n,e] (* inv_row[n]).
__global__ void __launch_bounds__(kMoeSumThreads) moe_score_sum_kernel(MoeScoreSumParams p) {
  const int e = blockIdx.x * kMoeSumThreads + threadIdx.x;
  if (e >= p.E) return;
  const int64_t c = blockIdx.y;
  const int64_t n0 = c * p.rows_per_chunk, n1 = min(p.N, n0 + p.rows_per_chunk);
  double s = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const double v = double(p.probs[n * p.E + e]);
    s += p.inv_row ? v * p.inv_row[n] : v;
  }
  p.partials[c * p.E + e] = s;
}

// Pass 2: score_sum[e] = the chunk partials added in chunk order.
__global__ void __launch_bounds__(kMoeSumThreads) moe_score_sum_final_kernel(MoeScoreSumParams p) {
  const int e = blockIdx.x * kMoeSumThreads + threadIdx.x;
  if (e >= p.E) return;
  double s = 0;
  for (int c = 0; c < kMoeSumChunks; ++c) s += p.partials[int64_t(c) * p.E + e];
  p.score_sum[e] = float(s);
}

// dlogits row n (see ref::moe_route_bwd): one warp per token, lane l owns experts l, l+32, ...
template <bool SIGMOID>
__global__ void __launch_bounds__(kMoeRouterThreads) moe_route_bwd_kernel(MoeRouteBwdParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = int64_t(blockIdx.x) * (kMoeRouterThreads / kWarp) + threadIdx.x / kWarp;
  if (n >= p.N) return;
  const int E = p.E, k = p.k;
  const float* pr = p.probs + n * E;
  const int32_t* id = p.idx + n * k;
  const float* g = p.dw + n * k;
  float* dl = p.dlogits + n * E;  // dp first, then dlogits
  for (int e = lane; e < E; e += kWarp) dl[e] = 0.f;
  __syncwarp();
  const float rs = p.route_scale;
  if (p.norm_topk) {
    double s = 0, dot = 0;  // every lane, same order: same values
    for (int j = 0; j < k; ++j) {
      const int e = id[j];
      const double pe = (e >= 0 && e < E) ? double(pr[e]) : 0.0;
      s += pe;
      dot += double(g[j]) * pe;
    }
    const double D = s + kMoeRenormEps;
    const float c = float(dot / (D * D));
    const float invD = float(1.0 / D);
    for (int j = lane; j < k; j += kWarp) {
      const int e = id[j];
      if (e >= 0 && e < E) dl[e] = dl[e] + __fmul_rn(rs, __fmul_rn(g[j], invD) - c);
    }
  } else {
    for (int j = lane; j < k; j += kWarp) {
      const int e = id[j];
      if (e >= 0 && e < E) dl[e] = dl[e] + __fmul_rn(rs, g[j]);
    }
  }
  __syncwarp();  // from here on each lane touches only its own experts
  if (p.aux) {
    if constexpr (SIGMOID) {
      double S = 0;
      for (int e = lane; e < E; e += kWarp) S += double(pr[e]);
      S = warp_sum(S);
      double dot = 0;
      for (int e = lane; e < E; e += kWarp) dot += double(p.aux[e]) * double(pr[e]) / S;
      dot = warp_sum(dot);
      for (int e = lane; e < E; e += kWarp) dl[e] += float((double(p.aux[e]) - dot) / S);
    } else {
      for (int e = lane; e < E; e += kWarp) dl[e] += p.aux[e];
    }
  }
  if constexpr (SIGMOID) {
    for (int e = lane; e < E; e += kWarp) {
      const float pe = pr[e];
      dl[e] = __fmul_rn(__fmul_rn(dl[e], pe), 1.f - pe);
    }
  } else {
    double dot = 0;
    for (int e = lane; e < E; e += kWarp) dot += double(dl[e]) * double(pr[e]);
    dot = warp_sum(dot);
    const float fd = float(dot);
    for (int e = lane; e < E; e += kWarp) dl[e] = __fmul_rn(pr[e], dl[e] - fd);
  }
}

// dst (+=) src (f32 scratch) for the router's dx when dx is bf16.
template <typename T>
__global__ void __launch_bounds__(kMoeAddThreads) moe_add_kernel(MoeAddParams p) {
  T* dst = static_cast<T*>(p.dst);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
    dst[i] = from_f<T>(to_f(dst[i]) + p.src[i]);
}

// ---- permutation plan ---------------------------------------------------------------------------

// counts[e] (+=) number of slots choosing e (integer atomics: the result is exact). The caller
// zeroes counts. Dynamic shared memory: E ints.
__global__ void __launch_bounds__(kMoeCountThreads) moe_count_kernel(MoePlanParams p) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < p.E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.slots; i += stride) {
    const int e = p.idx[i];
    if (e >= 0 && e < p.E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.E; e += blockDim.x)
    if (hist[e]) atomicAdd(&p.counts[e], hist[e]);
}

// offsets[0] = 0, offsets[e+1] = offsets[e] + min(counts[e], capacity); starts[e] = the sum of
// counts before e. One thread: E <= 2048.
__global__ void moe_offsets_kernel(MoePlanParams p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t o = 0, all = 0;
  p.offsets[0] = 0;
  for (int e = 0; e < p.E; ++e) {
    const int64_t c = p.counts[e];
    p.starts[e] = int32_t(all);
    all += c;
    o += p.capacity > 0 ? min(c, p.capacity) : c;
    p.offsets[e + 1] = int32_t(o);
  }
}

// Sorted entry s holds slot i of expert e (sort.cuh: slots sorted stably by expert, so each
// expert's slots are in increasing i = token order, then slot order). Its position among e's
// slots is s minus the sorted position of e's first slot (starts[e]: the histogram counts the
// same in-range ids as the sort); a position >= capacity is dropped (row_of stays -1).
__global__ void __launch_bounds__(kMoePlaceThreads) moe_place_kernel(MoePlanParams p,
                                                                     const uint64_t* sorted) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= p.slots) return;
  const uint64_t w = sorted[s];
  const uint32_t e = sort_key(w);
  if (e == kSortNoKey) return;  // an index outside [0,E): no row
  const int64_t pos = s - p.starts[e];
  if (p.capacity > 0 && pos >= p.capacity) return;
  const int64_t i = sort_index(w), r = p.offsets[e] + pos;
  p.row_of[i] = int32_t(r);
  p.row_token[r] = int32_t(i / p.k);
}

// ---- gather / combine -----------------------------------------------------------------------

// xg[r,:] = x[row_token[r],:] (zeros for row_token -1); block r.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMoeRowThreads) moe_gather_kernel(MoeRowsParams p) {
  const int64_t r = blockIdx.x;
  const int32_t tok = p.map[r];
  T* dst = static_cast<T*>(p.dst) + r * p.d;
  if (tok < 0 || tok >= p.rows_src) {  // -1: a row past the kept ones (zeros); beyond: NaN
    const float fill = tok < 0 ? 0.f : __int_as_float(0x7fc00000);
    for (int64_t c = threadIdx.x; c < p.d; c += blockDim.x) dst[c] = from_f<T>(fill);
    return;
  }
  const T* src = static_cast<const T*>(p.src) + int64_t(tok) * p.d;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.d; c += int64_t(blockDim.x) * VEC) {
    float f[VEC];
    load_f<VEC>(src + c, f);
    store_f<VEC>(dst + c, f);
  }
}

// dx[n,:] += sum_j dxg[row_of[n,j],:] (j in order, f32 registers, one rounding to T); block n.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMoeRowThreads) moe_gather_bwd_kernel(MoeRowsParams p) {
  const int64_t n = blockIdx.x;
  const int32_t* rows = p.map + n * p.k;
  const T* src = static_cast<const T*>(p.src);
  T* o = static_cast<T*>(p.dst) + n * p.d;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.d; c += int64_t(blockDim.x) * VEC) {
    float acc[VEC];
    load_f<VEC>(o + c, acc);
    for (int j = 0; j < p.k; ++j) {
      const int32_t r = rows[j];
      if (r < 0 || r >= p.rows_src) continue;
      float g[VEC];
      load_f<VEC>(src + int64_t(r) * p.d + c, g);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += g[v];
    }
    store_f<VEC>(o + c, acc);
  }
}

// out[n,:] (= / +=) sum_j w[n,j] yg[row_of[n,j],:]; block n.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMoeRowThreads) moe_combine_fwd_kernel(MoeRowsParams p) {
  const int64_t n = blockIdx.x;
  const int32_t* rows = p.map + n * p.k;
  const float* w = p.w + n * p.k;
  const T* yg = static_cast<const T*>(p.src);
  T* o = static_cast<T*>(p.dst) + n * p.d;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.d; c += int64_t(blockDim.x) * VEC) {
    float acc[VEC];
    if (p.accumulate) {
      load_f<VEC>(o + c, acc);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    }
    for (int j = 0; j < p.k; ++j) {
      const int32_t r = rows[j];
      if (r < 0 || r >= p.rows_src) continue;
      const float wj = w[j];
      float y[VEC];
      load_f<VEC>(yg + int64_t(r) * p.d + c, y);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += __fmul_rn(wj, y[v]);
    }
    store_f<VEC>(o + c, acc);
  }
}

// For each slot j of token n (block n), in order: dyg[r,:] = w dout[n,:]; dw = dout[n,:].yg[r,:]
// (per-thread double partials, fixed block tree).
template <typename T, int VEC>
__global__ void __launch_bounds__(kMoeRowThreads) moe_combine_bwd_kernel(MoeRowsParams p) {
  __shared__ double red[kWarp];
  const int64_t n = blockIdx.x;
  const int32_t* rows = p.map + n * p.k;
  const T* g = static_cast<const T*>(p.dout) + n * p.d;
  const T* yg = static_cast<const T*>(p.src);
  T* dyg = static_cast<T*>(p.dst);
  for (int j = 0; j < p.k; ++j) {
    const int32_t r = rows[j];
    if (r < 0 || r >= p.rows_src) {  // block-uniform
      if (threadIdx.x == 0) p.dw[n * p.k + j] = 0.f;
      continue;
    }
    const float wj = p.w[n * p.k + j];
    const T* y = yg + int64_t(r) * p.d;
    T* dy = dyg + int64_t(r) * p.d;
    double dot = 0;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.d; c += int64_t(blockDim.x) * VEC) {
      float gv[VEC], yv[VEC], out[VEC];
      load_f<VEC>(g + c, gv);
      load_f<VEC>(y + c, yv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        out[v] = __fmul_rn(wj, gv[v]);
        dot += double(gv[v]) * double(yv[v]);
      }
      store_f<VEC>(dy + c, out);
    }
    dot = block_sum(dot, red);
    if (threadIdx.x == 0) p.dw[n * p.k + j] = float(dot);
  }
}

// ---- launchers ----------------------------------------------------------------------------------

void launch_moe_router(const MoeRouterParams& p, bool sigmoid, cudaStream_t stream) {
  if (p.N == 0) return;
  const int64_t blocks = ceil_div(p.N, kMoeRouterThreads / kWarp);
  if (sigmoid)
    moe_router_kernel<true><<<unsigned(blocks), kMoeRouterThreads, 0, stream>>>(p);
  else
    moe_router_kernel<false><<<unsigned(blocks), kMoeRouterThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

void launch_moe_score_sum(const MoeScoreSumParams& p, cudaStream_t stream) {
  MoeScoreSumParams q = p;
  q.rows_per_chunk = std::max<int64_t>(1, ceil_div(p.N, kMoeSumChunks));
  const unsigned bx = unsigned(ceil_div(p.E, kMoeSumThreads));
  moe_score_sum_kernel<<<dim3(bx, kMoeSumChunks), kMoeSumThreads, 0, stream>>>(q);
  CUDA_CHECK_LAUNCH();
  moe_score_sum_final_kernel<<<bx, kMoeSumThreads, 0, stream>>>(q);
  CUDA_CHECK_LAUNCH();
}

void launch_moe_route_bwd(const MoeRouteBwdParams& p, bool sigmoid, cudaStream_t stream) {
  if (p.N == 0) return;
  const int64_t blocks = ceil_div(p.N, kMoeRouterThreads / kWarp);
  if (sigmoid)
    moe_route_bwd_kernel<true><<<unsigned(blocks), kMoeRouterThreads, 0, stream>>>(p);
  else
    moe_route_bwd_kernel<false><<<unsigned(blocks), kMoeRouterThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_moe_add(const MoeAddParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(p.n, kMoeAddThreads), kMoeAddMaxBlocks));
  moe_add_kernel<T><<<blocks, kMoeAddThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

// counts (=) histogram of idx (zeroes it first).
void launch_moe_count(const MoePlanParams& p, cudaStream_t stream) {
  CUDA_CHECK(cudaMemsetAsync(p.counts, 0, size_t(p.E) * sizeof(int32_t), stream));
  if (p.slots == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(p.slots, kMoeCountThreads), kMoeCountMaxBlocks));
  moe_count_kernel<<<blocks, kMoeCountThreads, size_t(p.E) * sizeof(int), stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

void launch_moe_plan(const MoePlanParams& p, const SortBuffers& sb, cudaStream_t stream) {
  const size_t bytes = size_t(p.slots) * sizeof(int32_t);
  if (bytes) {
    CUDA_CHECK(cudaMemsetAsync(p.row_of, 0xff, bytes, stream));  // -1: dropped / unused
    CUDA_CHECK(cudaMemsetAsync(p.row_token, 0xff, bytes, stream));
  }
  launch_moe_count(p, stream);
  moe_offsets_kernel<<<1, 1, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
  if (p.slots == 0) return;
  stable_sort_keys(p.idx, p.slots, p.E, sb.sorted, sb.tmp, stream);
  moe_place_kernel<<<unsigned(ceil_div(p.slots, kMoePlaceThreads)), kMoePlaceThreads, 0, stream>>>(
      p, sb.sorted);
  CUDA_CHECK_LAUNCH();
}

enum class MoeRowOp { Gather, GatherBwd, CombineFwd, CombineBwd };

template <MoeRowOp OP, typename T, int VEC>
void launch_moe_rows_vec(const MoeRowsParams& p, int64_t blocks, cudaStream_t stream) {
  if constexpr (OP == MoeRowOp::Gather)
    moe_gather_kernel<T, VEC><<<unsigned(blocks), kMoeRowThreads, 0, stream>>>(p);
  else if constexpr (OP == MoeRowOp::GatherBwd)
    moe_gather_bwd_kernel<T, VEC><<<unsigned(blocks), kMoeRowThreads, 0, stream>>>(p);
  else if constexpr (OP == MoeRowOp::CombineFwd)
    moe_combine_fwd_kernel<T, VEC><<<unsigned(blocks), kMoeRowThreads, 0, stream>>>(p);
  else
    moe_combine_bwd_kernel<T, VEC><<<unsigned(blocks), kMoeRowThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

// One block per output row (blocks = M for gather, N otherwise); 16-byte vectors when every row
// pointer is aligned (all bases aligned and d a multiple of the vector width).
template <MoeRowOp OP, typename T>
void launch_moe_rows(const MoeRowsParams& p, int64_t blocks, cudaStream_t stream) {
  if (blocks == 0 || p.d == 0) return;
  MF_CHECK(blocks <= 0x7fffffff, "moe: ", blocks, " rows is too many for one launch");
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = p.d % VEC == 0 && aligned16(p.src) && aligned16(p.dst) &&
                   (p.dout == nullptr || aligned16(p.dout));
  if (vec)
    launch_moe_rows_vec<OP, T, VEC>(p, blocks, stream);
  else
    launch_moe_rows_vec<OP, T, 1>(p, blocks, stream);
}

// ---- entries ------------------------------------------------------------------------------------

namespace {

// The router kernels' own limit (the contract is contract::moe_route_args).
void check_expert_limit(const char* op, int E) {
  MF_CHECK(E <= kMoeMaxExperts, op, ": n_experts ", E, " exceeds the CUDA limit of ",
           kMoeMaxExperts, " (model.moe.n_experts)");
}

template <MoeRowOp OP>
void dispatch_rows(DType t, const MoeRowsParams& p, int64_t blocks, cudaStream_t stream) {
  if (t == DType::F32)
    launch_moe_rows<OP, float>(p, blocks, stream);
  else
    launch_moe_rows<OP, bf16>(p, blocks, stream);
}

}  // namespace

void op_moe_router_fwd(const Ctx& ctx, const Tensor& x, const Tensor& Wr, const Tensor* bias,
                       const MoeRouterArgs& a, Tensor& probs, Tensor& topk_idx, Tensor& topk_w,
                       Tensor& counts, Tensor& score_sum) {
  const char* op = "moe_router_fwd";
  const auto [N, d] = contract::moe_router_fwd(contract::kCuda, x, Wr, bias, a, probs, topk_idx,
                                               topk_w, counts, score_sum);
  check_expert_limit(op, a.E);
  MF_CHECK(N * a.k <= 0x7fffffff, op, ": ", N, " tokens x top_k ", a.k, " is too many slots");

  const bool widen = x.dtype == DType::BF16;
  Arena sz;
  sz.take<float>(widen ? size_t(N * d) : 0);
  sz.take<double>(size_t(N));
  sz.take<double>(size_t(kMoeSumChunks) * a.E);
  Arena ar(ctx.scratch->get(sz.used()));
  float* xw = ar.take<float>(widen ? size_t(N * d) : 0);
  double* inv_row = ar.take<double>(size_t(N));
  double* partials = ar.take<double>(size_t(kMoeSumChunks) * a.E);

  // Logits in fp32: probs (=) x Wr^T.
  const float* xf = x.data<float>();
  if (widen) {
    launch_cast_bf16_f32(x.ptr, xw, N * d, ctx.stream);
    xf = xw;
  }
  if (N > 0) {
    GemmArgs g;
    g.transB = true;
    g.M = N;
    g.N = a.E;
    g.K = d;
    g.A = xf;
    g.lda = d;
    g.B = Wr.ptr;
    g.ldb = d;
    g.D = probs.ptr;
    g.ldd = a.E;
    g.ab = DType::F32;
    g.cd = DType::F32;
    ctx.lt->gemm(g);
  }

  MoeRouterParams rp{probs.data<float>(), bias ? bias->data<float>() : nullptr,
                     topk_idx.data<int32_t>(), topk_w.data<float>(), inv_row, N, a.E, a.k,
                     a.norm_topk, double(a.route_scale)};
  launch_moe_router(rp, a.sigmoid, ctx.stream);

  MoePlanParams cp{topk_idx.data<int32_t>(), counts.data<int32_t>(), nullptr, nullptr, nullptr,
                   nullptr, N * a.k, a.k, a.E, 0};
  launch_moe_count(cp, ctx.stream);

  MoeScoreSumParams sp{probs.data<float>(), a.sigmoid ? inv_row : nullptr, partials,
                       score_sum.data<float>(), N, a.E, 0};
  launch_moe_score_sum(sp, ctx.stream);
}

void op_moe_router_bwd(const Ctx& ctx, const Tensor& dtopk_w, const Tensor* aux_grad,
                       const Tensor& x, const Tensor& Wr, const Tensor& probs,
                       const Tensor& topk_idx, const MoeRouterArgs& a, Tensor& dlogits,
                       Tensor& dx, Tensor& dWr) {
  const auto [N, d] = contract::moe_router_bwd(contract::kCuda, dtopk_w, aux_grad, x, Wr, probs,
                                               topk_idx, a, dlogits, dx, dWr);
  check_expert_limit("moe_router_bwd", a.E);
  if (N == 0) return;

  MoeRouteBwdParams bp{dtopk_w.data<float>(), aux_grad ? aux_grad->data<float>() : nullptr,
                       probs.data<float>(), topk_idx.data<int32_t>(), dlogits.data<float>(),
                       N, a.E, a.k, a.norm_topk, a.route_scale};
  launch_moe_route_bwd(bp, a.sigmoid, ctx.stream);

  const bool widen = x.dtype == DType::BF16, via_tmp = dx.dtype == DType::BF16;
  // Sized by sizes.h, which the memory plan reads too.
  Arena ar(ctx.scratch->get(std::max<size_t>(moe_router_bwd_scratch_bytes(N, d, widen, via_tmp), 1)));
  float* xw = ar.take<float>(widen ? size_t(N * d) : 0);
  float* tmp = ar.take<float>(via_tmp ? size_t(N * d) : 0);

  // dx (+=) dlogits Wr: straight into an f32 dx (beta 1), else via f32 scratch and an add.
  GemmArgs gx;
  gx.M = N;
  gx.N = d;
  gx.K = a.E;
  gx.A = dlogits.ptr;
  gx.lda = a.E;
  gx.B = Wr.ptr;
  gx.ldb = d;
  gx.D = via_tmp ? static_cast<void*>(tmp) : dx.ptr;
  gx.ldd = d;
  gx.ab = DType::F32;
  gx.cd = DType::F32;
  gx.beta = via_tmp ? 0.f : 1.f;
  ctx.lt->gemm(gx);
  if (via_tmp) launch_moe_add<bf16>(MoeAddParams{tmp, dx.ptr, N * d}, ctx.stream);

  // dWr (+=) dlogits^T x, in fp32.
  const float* xf = x.data<float>();
  if (widen) {
    launch_cast_bf16_f32(x.ptr, xw, N * d, ctx.stream);
    xf = xw;
  }
  GemmArgs gw;
  gw.transA = true;
  gw.M = a.E;
  gw.N = d;
  gw.K = N;
  gw.A = dlogits.ptr;
  gw.lda = a.E;
  gw.B = xf;
  gw.ldb = d;
  gw.D = dWr.ptr;
  gw.ldd = d;
  gw.ab = DType::F32;
  gw.cd = DType::F32;
  gw.beta = 1.f;
  ctx.lt->gemm(gw);
}

void op_moe_permute(const Ctx& ctx, const Tensor& topk_idx, int E, int64_t capacity,
                    Tensor& offsets, Tensor& row_of, Tensor& row_token) {
  const char* op = "moe_permute";
  const auto [N, k] = contract::moe_permute(contract::kCuda, topk_idx, E, offsets, row_of,
                                            row_token);
  check_expert_limit(op, E);
  MF_CHECK(N * k <= 0x7fffffff, op, ": ", describe("topk_idx", topk_idx), " has too many slots");
  Arena sz;
  sz.take<int32_t>(size_t(E));
  sz.take<int32_t>(size_t(E));
  take_sort_buffers(sz, N * k);
  Arena ar(ctx.scratch->get(sz.used()));
  int32_t* counts = ar.take<int32_t>(size_t(E));
  int32_t* starts = ar.take<int32_t>(size_t(E));
  MoePlanParams p{topk_idx.data<int32_t>(), counts, offsets.data<int32_t>(), starts,
                  row_of.data<int32_t>(), row_token.data<int32_t>(), N * k, int(k), E, capacity};
  const SortBuffers sb = take_sort_buffers(ar, N * k);
  launch_moe_plan(p, sb, ctx.stream);
}

void op_moe_gather(const Ctx& ctx, const Tensor& x, const Tensor& row_token, Tensor& xg) {
  contract::moe_gather(contract::kCuda, x, row_token, xg);
  const int64_t M = xg.dim(0);
  MoeRowsParams p{x.ptr, xg.ptr, nullptr, row_token.data<int32_t>(), nullptr, nullptr,
                  x.dim(0), x.dim(1), 1, false};
  dispatch_rows<MoeRowOp::Gather>(x.dtype, p, M, ctx.stream);
}

void op_moe_gather_bwd(const Ctx& ctx, const Tensor& dxg, const Tensor& row_of, Tensor& dx) {
  contract::moe_gather_bwd(contract::kCuda, dxg, row_of, dx);
  MoeRowsParams p{dxg.ptr, dx.ptr, nullptr, row_of.data<int32_t>(), nullptr, nullptr,
                  dxg.dim(0), dx.dim(1), int(row_of.dim(1)), false};
  dispatch_rows<MoeRowOp::GatherBwd>(dx.dtype, p, dx.dim(0), ctx.stream);
}

void op_moe_combine_fwd(const Ctx& ctx, const Tensor& yg, const Tensor& topk_w,
                        const Tensor& row_of, Tensor& out, bool accumulate) {
  contract::moe_combine_fwd(contract::kCuda, yg, topk_w, row_of, out);
  MoeRowsParams p{yg.ptr, out.ptr, nullptr, row_of.data<int32_t>(), topk_w.data<float>(), nullptr,
                  yg.dim(0), out.dim(1), int(row_of.dim(1)), accumulate};
  dispatch_rows<MoeRowOp::CombineFwd>(out.dtype, p, out.dim(0), ctx.stream);
}

void op_moe_combine_bwd(const Ctx& ctx, const Tensor& dout, const Tensor& yg,
                        const Tensor& topk_w, const Tensor& row_of, Tensor& dyg,
                        Tensor& dtopk_w) {
  contract::moe_combine_bwd(contract::kCuda, dout, yg, topk_w, row_of, dyg, dtopk_w);
  MoeRowsParams p{yg.ptr, dyg.ptr, dout.ptr, row_of.data<int32_t>(), topk_w.data<float>(),
                  dtopk_w.data<float>(), yg.dim(0), dout.dim(1), int(row_of.dim(1)), false};
  if (dout.dim(1) == 0) {  // nothing to write into dyg; the dots are 0
    if (dtopk_w.nbytes()) CUDA_CHECK(cudaMemsetAsync(dtopk_w.ptr, 0, dtopk_w.nbytes(), ctx.stream));
    return;
  }
  dispatch_rows<MoeRowOp::CombineBwd>(dout.dtype, p, dout.dim(0), ctx.stream);
}

}  // namespace mf::cuda
