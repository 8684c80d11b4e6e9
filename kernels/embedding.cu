// Embedding forward (row gather) and backward (sort-free row ownership, deterministic).
#include "embedding.cuh"

namespace mf::cuda {

constexpr int kEmbFwdThreads = 128;      // one block per token row, threads over columns
constexpr int kEmbBwdThreads = 256;      // tokens scanned per step = threads per block
constexpr int kEmbBwdBlocksPerSm = 8;    // grid size target for the backward

struct EmbeddingParams {
  const int32_t* tokens;
  const void* wte;   // fwd
  void* out;         // fwd
  const void* dout;  // bwd
  float* dwte;       // bwd
  int64_t N, V, d;
  int64_t rows_per_block;  // bwd: vocabulary rows owned by one block
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

template <typename TD>
__global__ void __launch_bounds__(kEmbBwdThreads) embedding_bwd_kernel(EmbeddingParams p) {
  constexpr int kWarps = kEmbBwdThreads / kWarp;
  __shared__ int list_n[kEmbBwdThreads];
  __shared__ int list_v[kEmbBwdThreads];
  __shared__ int wcnt[kWarps];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t v0 = int64_t(blockIdx.x) * p.rows_per_block;
  const int64_t v1 = min(p.V, v0 + p.rows_per_block);
  const TD* dout = static_cast<const TD*>(p.dout);
  for (int64_t base = 0; base < p.N; base += kEmbBwdThreads) {
    const int64_t n = base + tid;
    const int32_t tok = n < p.N ? p.tokens[n] : -1;
    const bool mine = tok >= v0 && tok < v1;
    const unsigned ballot = __ballot_sync(kFullMask, mine);
    if (lane == 0) wcnt[warp] = __popc(ballot);
    __syncthreads();
    int off = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = wcnt[w];
      off += w < warp ? c : 0;
      total += c;
    }
    if (mine) {
      const int at = off + __popc(ballot & ((1u << lane) - 1u));  // keeps increasing n order
      list_n[at] = int(n - base);
      list_v[at] = tok;
    }
    __syncthreads();
    // Column c is always handled by thread c % blockDim: one owner per dwte element, in n order.
    for (int k = 0; k < total; ++k) {
      const TD* src = dout + (base + list_n[k]) * p.d;
      float* row = p.dwte + int64_t(list_v[k]) * p.d;
      for (int64_t c = tid; c < p.d; c += kEmbBwdThreads) row[c] += to_f(src[c]);
    }
    __syncthreads();  // list_* and wcnt are rewritten next step
  }
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

template <typename TD>
void launch_embedding_bwd(const EmbeddingParams& p, int sm_count, cudaStream_t stream) {
  if (p.N == 0 || p.d == 0 || p.V == 0) return;
  EmbeddingParams q = p;
  q.rows_per_block = std::max<int64_t>(1, ceil_div(p.V, int64_t(sm_count) * kEmbBwdBlocksPerSm));
  const int64_t blocks = ceil_div(p.V, q.rows_per_block);
  embedding_bwd_kernel<TD><<<unsigned(blocks), kEmbBwdThreads, 0, stream>>>(q);
  CUDA_CHECK_LAUNCH();
}

void op_embedding_fwd(const Ctx& ctx, const Tensor& tokens, const Tensor& wte, Tensor& out) {
  const char* op = "embedding_fwd";
  check_dtype(op, "tokens", tokens, DType::I32);
  check_float(op, "wte", wte);
  check_float(op, "out", out);
  MF_CHECK(wte.ndim() == 2, op, ": ", describe("wte", wte), " must be [V,d]");
  const int64_t V = wte.dim(0), d = wte.dim(1), N = tokens.numel();
  MF_CHECK(rows_of(op, "out", out, d) == N, op, ": ", describe("out", out), " must be [N=", N,
           ",", d, "]");
  EmbeddingParams p{tokens.data<int32_t>(), wte.ptr, out.ptr, nullptr, nullptr, N, V, d, 0};
  const bool wf = wte.dtype == DType::F32, of = out.dtype == DType::F32;
  if (wf && of) return launch_embedding_fwd<float, float>(p, ctx.stream);
  if (wf && !of) return launch_embedding_fwd<float, bf16>(p, ctx.stream);
  if (!wf && of) return launch_embedding_fwd<bf16, float>(p, ctx.stream);
  launch_embedding_fwd<bf16, bf16>(p, ctx.stream);
}

void op_embedding_bwd(const Ctx& ctx, const Tensor& tokens, const Tensor& dout, Tensor& dwte) {
  const char* op = "embedding_bwd";
  check_dtype(op, "tokens", tokens, DType::I32);
  check_float(op, "dout", dout);
  check_dtype(op, "dwte", dwte, DType::F32);
  MF_CHECK(dwte.ndim() == 2, op, ": ", describe("dwte", dwte), " must be [V,d]");
  const int64_t V = dwte.dim(0), d = dwte.dim(1), N = tokens.numel();
  MF_CHECK(rows_of(op, "dout", dout, d) == N, op, ": ", describe("dout", dout), " must be [N=",
           N, ",", d, "]");
  EmbeddingParams p{tokens.data<int32_t>(), nullptr, nullptr, dout.ptr, dwte.data<float>(), N, V, d, 0};
  if (dout.dtype == DType::F32)
    launch_embedding_bwd<float>(p, ctx.sm_count, ctx.stream);
  else
    launch_embedding_bwd<bf16>(p, ctx.sm_count, ctx.stream);
}

}  // namespace mf::cuda
