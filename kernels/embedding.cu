// Embedding forward (row gather) and backward (tokens sorted stably, one warp per vocabulary row
// and column group; deterministic).
#include "embedding.cuh"

#include "sort.cuh"

namespace mf::cuda {

constexpr int kEmbFwdThreads = 128;      // one block per token row, threads over columns
constexpr int kEmbBwdThreads = 256;      // backward: 8 warps per block, one per sorted token
constexpr int kEmbBwdUnroll = 8;         // dout rows in flight per warp in the backward

struct EmbeddingParams {
  const int32_t* tokens;
  const void* wte;   // fwd
  void* out;         // fwd
  const void* dout;  // bwd
  float* dwte;       // bwd
  int64_t N, V, d;
};

template <typename TW, typename TO, int VEC>
__global__ void __launch_bounds__(kEmbFwdThreads) embedding_fwd_kernel(EmbeddingParams p) {
  const int64_t n = blockIdx.x;
  const int32_t tok = p.tokens[n];
  TO* dst = static_cast<TO*>(p.out) + n * p.d;
  if (tok < 0 || tok >= p.V) {
    for (int64_t c = threadIdx.x; c < p.d; c += blockDim.x) dst[c] = from_f<TO>(__int_as_float(0x7fc00000));
    return;
  }
  const TW* src = static_cast<const TW*>(p.wte) + int64_t(tok) * p.d;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.d; c += int64_t(blockDim.x) * VEC) {
    float f[VEC];
    load_f<VEC>(src + c, f);
    store_f<VEC>(dst + c, f);
  }
}

// One warp per (sorted entry, column group of 32 * VEC). The warp at the first entry of a token's
// run owns that vocabulary row's columns: it starts from dwte, adds the run's dout rows in
// increasing n in f32 registers (the CPU reference's order, so f32 inputs give its exact bits)
// and stores once. Every other warp leaves at once. A long run (" the", ",") is read 32 row
// indices at a time (one coalesced load, handed out by shuffles), then kEmbBwdUnroll dout rows
// are loaded before they are added: bound by bandwidth more than by one latency per token.
template <typename TD, int VEC>
__global__ void __launch_bounds__(kEmbBwdThreads) embedding_bwd_kernel(EmbeddingParams p,
                                                                       const uint64_t* sorted) {
  const int64_t j = (int64_t(blockIdx.x) * kEmbBwdThreads + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (j >= p.N) return;  // whole warps
  const uint32_t v = sort_key(sorted[j]);
  if (v == kSortNoKey || (j > 0 && sort_key(sorted[j - 1]) == v)) return;  // not a run's head
  // The run is sorted[j, end): the entries below (v + 1, 0).
  const int64_t end = j + sort_count_less(sorted, j, p.N, (uint64_t(v) + 1) << 32);
  const int64_t c = (int64_t(blockIdx.y) * kWarp + lane) * VEC;
  const bool mine = c < p.d;  // lanes past d still take part in the shuffles
  const TD* dout = static_cast<const TD*>(p.dout);
  float* row = p.dwte + int64_t(v) * p.d + (mine ? c : 0);
  float acc[VEC];
  if (mine) load_f<VEC>(row, acc);
  for (int64_t t0 = j; t0 < end; t0 += kWarp) {
    const int32_t n_lane = t0 + lane < end ? int32_t(sort_index(sorted[t0 + lane])) : 0;
    const int cnt = int(min(int64_t(kWarp), end - t0));  // the same in every lane
    int u0 = 0;
    for (; u0 + kEmbBwdUnroll <= cnt; u0 += kEmbBwdUnroll) {
      int32_t n[kEmbBwdUnroll];
#pragma unroll
      for (int u = 0; u < kEmbBwdUnroll; ++u) n[u] = __shfl_sync(kFullMask, n_lane, u0 + u);
      if (!mine) continue;
      float g[kEmbBwdUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kEmbBwdUnroll; ++u) load_f<VEC>(dout + int64_t(n[u]) * p.d + c, g[u]);
#pragma unroll
      for (int u = 0; u < kEmbBwdUnroll; ++u)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += g[u][e];
    }
    for (; u0 < cnt; ++u0) {
      const int32_t n = __shfl_sync(kFullMask, n_lane, u0);
      if (!mine) continue;
      float g[VEC];
      load_f<VEC>(dout + int64_t(n) * p.d + c, g);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += g[e];
    }
  }
  if (mine) store_f<VEC>(row, acc);
}

template <typename TW, typename TO>
void launch_embedding_fwd(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.d == 0) return;
  MF_CHECK(p.N <= 0x7fffffff, "embedding_fwd: ", p.N, " tokens is too many for one launch");
  constexpr int VEC = 16 / (sizeof(TW) > sizeof(TO) ? sizeof(TO) : sizeof(TW));  // 8 if any bf16
  const bool vec = aligned16(p.wte) && aligned16(p.out) && p.d % VEC == 0;
  if (vec)
    embedding_fwd_kernel<TW, TO, VEC><<<unsigned(p.N), kEmbFwdThreads, 0, stream>>>(p);
  else
    embedding_fwd_kernel<TW, TO, 1><<<unsigned(p.N), kEmbFwdThreads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <typename TD, int VEC>
void launch_embedding_bwd_vec(const EmbeddingParams& p, const uint64_t* sorted, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(p.N * kWarp, kEmbBwdThreads)),
                  unsigned(ceil_div(p.d, int64_t(kWarp) * VEC)));
  embedding_bwd_kernel<TD, VEC><<<grid, kEmbBwdThreads, 0, stream>>>(p, sorted);
  CUDA_CHECK_LAUNCH();
}

template <typename TD>
void launch_embedding_bwd(const EmbeddingParams& p, const uint64_t* sorted, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(TD);  // 16-byte dout loads; dwte is f32 (VEC floats)
  if (aligned16(p.dout) && aligned16(p.dwte) && p.d % VEC == 0)
    launch_embedding_bwd_vec<TD, VEC>(p, sorted, stream);
  else
    launch_embedding_bwd_vec<TD, 1>(p, sorted, stream);
}

void op_embedding_fwd(const Ctx& ctx, const Tensor& tokens, const Tensor& wte, Tensor& out) {
  const auto [N, V, d] = contract::embedding_fwd(contract::kCuda, tokens, wte, out);
  EmbeddingParams p{tokens.data<int32_t>(), wte.ptr, out.ptr, nullptr, nullptr, N, V, d};
  const bool wf = wte.dtype == DType::F32, of = out.dtype == DType::F32;
  if (wf && of) return launch_embedding_fwd<float, float>(p, ctx.stream);
  if (wf && !of) return launch_embedding_fwd<float, bf16>(p, ctx.stream);
  if (!wf && of) return launch_embedding_fwd<bf16, float>(p, ctx.stream);
  launch_embedding_fwd<bf16, bf16>(p, ctx.stream);
}

void op_embedding_bwd(const Ctx& ctx, const Tensor& tokens, const Tensor& dout, Tensor& dwte) {
  const auto [N, V, d] = contract::embedding_bwd(contract::kCuda, tokens, dout, dwte);
  MF_CHECK(N <= 0x7fffffff / kWarp, "embedding_bwd: ", N, " tokens is too many for one launch");
  if (N == 0 || d == 0 || V == 0) return;
  EmbeddingParams p{tokens.data<int32_t>(), nullptr, nullptr, dout.ptr, dwte.data<float>(), N, V, d};
  Arena sz;
  take_sort_buffers(sz, N);
  Arena ar(ctx.scratch->get(sz.used()));
  const SortBuffers sb = take_sort_buffers(ar, N);
  stable_sort_keys(p.tokens, N, V, sb.sorted, sb.tmp, ctx.stream);  // ids outside [0,V) sort last
  if (dout.dtype == DType::F32)
    launch_embedding_bwd<float>(p, sb.sorted, ctx.stream);
  else
    launch_embedding_bwd<bf16>(p, sb.sorted, ctx.stream);
}

}  // namespace mf::cuda
