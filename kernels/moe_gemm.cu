// Grouped expert GEMMs of the MoE layer: every expert's rows in one launch, the row blocks read
// from the permutation plan on the device (no host copy of the offsets, no launch per expert).
//
//   rows kernel:   C[r, n] (= or +=) sum_k A[r, k] B_e[n, k]   for the rows r of expert e
//                  (forward: A = x, B_e = W_e [out,in];  dx: A = dy, B_e = W_e^T, read from
//                  W_e [out,in] down its columns)
//   wgrad kernel:  dW_e[m, n] (+=) sum over the rows r of expert e of dy[r, m] x[r, n]
//
// One block computes a 64 x 64 tile with 4 warps (2 x 2, 32 x 32 each) on mma.sync m16n8k16
// (bf16 in, f32 accumulate), stepping K by 32 through two shared-memory buffers per operand
// (the next step's loads are in flight during this step's mma). Both operands are staged
// k-contiguous (sA[m][k], sB[n][k]): one stored that way in memory goes by cp.async; one stored
// the other way round (W_e for dx, dy and x for the weight gradient) is read 8 elements along
// its contiguous axis into registers and written transposed after the mma. Out-of-range
// rows/columns are staged as zeros, so any shape works; 16-byte loads are used where pointer
// and leading dimension allow, element loads otherwise.
//
// Rows kernel schedule: a one-warp plan kernel scans the experts' tile counts
// (ceil(rows_e / 64)) into tile_start[E+1] in scratch; the grid has ceil(R / 64) + E blocks
// along x (an upper bound of the total) and each block finds its expert by binary search;
// blocks past the total return. Weight gradient: one block per (tile of dW_e, expert), looping
// over the expert's rows. Every output element has one owner that sums in a fixed order, so
// results are deterministic.
#include "mma.cuh"
#include "moe.cuh"

namespace mf::cuda {

namespace {

constexpr int kGBM = 64, kGBN = 64, kGBK = 32;
constexpr int kGLd = kGBK + 8;  // smem row stride (bf16): 80 bytes, 16-byte aligned rows
constexpr int kGThreads = 128;

// A GEMM operand as the tile stager sees it: element (i, k) (i = the m or n index) at
// p[i * ld + k] when k_contig, else at p[k * ld + i]; i < ilim and k < klim are in range.
struct Operand {
  const bf16* p;
  int64_t ld, ilim, klim;
  bool k_contig, vec;  // vec: p 16-byte aligned and ld % 8 == 0
};

// Staging of one K step, split in two so a step's global loads overlap the previous step's
// mma: stage_issue starts s[i][k] (=) op(i0 + i, k0 + k) for i < BI, k < kGBK (zero outside
// the operand), stage_land completes it. A k-contiguous operand goes by cp.async where 16-byte
// loads are allowed (element stores otherwise, done in stage_issue); the other kind is loaded
// into registers by stage_issue and stored transposed by stage_land (items at the operand's
// edge, or unaligned, are stored by stage_issue).
template <int BI>
struct StageRegs {
  static constexpr int kItems = kGBK * (BI / 8) / kGThreads;  // 8-element items per thread
  static_assert(kItems * kGThreads == kGBK * (BI / 8), "stage: whole items per thread");
  int4 v[kItems];
  unsigned in_regs;  // bit j: item j waits in v[j] for stage_land
};

// The transposed item j of this thread: k row and first i of its 8 elements. Lanes 0-15 take
// k = 16 kh + 0..15 at group 2 gh, lanes 16-31 the same k at group 2 gh + 1: each k row is read
// as 32 contiguous bytes (one sector), and the transposed stores of a warp fall in 8 banks twice
// (2-way) instead of one bank 8 times with 4 k by 8 groups per warp.
template <int BI>
__device__ __forceinline__ void trans_item(int j, int& k, int& ii) {
  static_assert((BI / 8) % 2 == 0 && kGBK % 16 == 0, "stage: whole half-warp items");
  const int idx = threadIdx.x + j * kGThreads;
  const int lane = idx % kWarp, q = idx / kWarp;
  k = (q % (kGBK / 16)) * 16 + lane % 16;
  ii = ((q / (kGBK / 16)) * 2 + lane / 16) * 8;
}

// One transposed item at the operand's edge or unaligned: s[u * kGLd] (=) op(gi + u, gk),
// u < 8, stored at once. Not inlined: inlined, the compiler keeps the 8 element addresses of
// every item live across the K loop, about 90 registers more in the weight-gradient kernel.
__device__ __noinline__ void stage_trans_edge(bf16* s, const bf16* p, int64_t ld, int64_t ilim,
                                              int64_t klim, int64_t gi, int64_t gk) {
#pragma unroll
  for (int u = 0; u < 8; ++u)
    s[u * kGLd] = (gk < klim && gi + u < ilim) ? p[gk * ld + gi + u] : __float2bfloat16(0.f);
}

template <int BI>
__device__ __forceinline__ void stage_issue(bf16* s, const Operand& op, int64_t i0, int64_t k0,
                                            StageRegs<BI>& r) {
  const bf16 zero = __float2bfloat16(0.f);
  if (op.k_contig) {
    for (int idx = threadIdx.x; idx < BI * (kGBK / 8); idx += kGThreads) {
      const int i = idx / (kGBK / 8), kk = (idx % (kGBK / 8)) * 8;
      const int64_t gi = i0 + i, gk = k0 + kk;
      bf16* dst = s + i * kGLd + kk;
      if (gi < op.ilim && op.vec && gk + 8 <= op.klim) {
        cp_async16(dst, op.p + gi * op.ld + gk, true);
      } else {
#pragma unroll
        for (int u = 0; u < 8; ++u)
          dst[u] = (gi < op.ilim && gk + u < op.klim) ? op.p[gi * op.ld + gk + u] : zero;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < StageRegs<BI>::kItems; ++j) {
      int k, ii;
      trans_item<BI>(j, k, ii);
      const int64_t gk = k0 + k, gi = i0 + ii;
      if (gk < op.klim && op.vec && gi + 8 <= op.ilim) {
        r.v[j] = *reinterpret_cast<const int4*>(op.p + gk * op.ld + gi);
        r.in_regs |= 1u << j;
      } else {
        r.in_regs &= ~(1u << j);
        stage_trans_edge(s + ii * kGLd + k, op.p, op.ld, op.ilim, op.klim, gi, gk);
      }
    }
  }
}

template <int BI>
__device__ __forceinline__ void stage_land(bf16* s, const Operand& op, const StageRegs<BI>& r) {
  if (op.k_contig) return;  // in flight as cp.async, or already stored
#pragma unroll
  for (int j = 0; j < StageRegs<BI>::kItems; ++j) {
    if (!(r.in_regs & (1u << j))) continue;
    int k, ii;
    trans_item<BI>(j, k, ii);
    const bf16* v = reinterpret_cast<const bf16*>(&r.v[j]);
#pragma unroll
    for (int u = 0; u < 8; ++u) s[(ii + u) * kGLd + k] = v[u];
  }
}

// acc (+=) the warp's 32 x 32 part of sA sB^T over one K step.
__device__ __forceinline__ void mma_step(float (&acc)[2][4][4], const bf16* sA, const bf16* sB,
                                         int wm, int wn, int lane) {
#pragma unroll
  for (int kk = 0; kk < kGBK; kk += 16) {
    uint32_t a[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) frag_a<kGLd>(a[i], sA, wm * 32 + i * 16, kk, lane);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t b[2];
      frag_b_rows_n<kGLd>(b, sB, wn * 32 + j * 8, kk, lane);
#pragma unroll
      for (int i = 0; i < 2; ++i) mma16816(acc[i][j], a[i], b);
    }
  }
}

// The full K loop of one block tile: acc (=) sum_k A(m0 + m, k) B(n0 + n, k). Two buffers per
// operand: while the warps multiply step t from one, step t + 1's loads fill the other, and one
// barrier per step separates them (the buffer written in step t was last read in step t - 1,
// which ended at that step's barrier).
__device__ __forceinline__ void tile_product(float (&acc)[2][4][4], const Operand& A,
                                             const Operand& B, int64_t m0, int64_t n0,
                                             int64_t K) {
  __shared__ __align__(16) bf16 sA[2][kGBM * kGLd];
  __shared__ __align__(16) bf16 sB[2][kGBN * kGLd];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp / 2, wn = warp % 2;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;
  const int64_t steps = (K + kGBK - 1) / kGBK;
  if (steps <= 0) return;
  StageRegs<kGBM> ra;
  StageRegs<kGBN> rb;
  stage_issue<kGBM>(sA[0], A, m0, 0, ra);
  stage_issue<kGBN>(sB[0], B, n0, 0, rb);
  stage_land<kGBM>(sA[0], A, ra);
  stage_land<kGBN>(sB[0], B, rb);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll 1
  for (int64_t t = 0; t < steps; ++t) {
    const int cur = int(t & 1);
    const bool more = t + 1 < steps;
    if (more) {
      stage_issue<kGBM>(sA[cur ^ 1], A, m0, (t + 1) * kGBK, ra);
      stage_issue<kGBN>(sB[cur ^ 1], B, n0, (t + 1) * kGBK, rb);
    }
    cp_async_commit();
    mma_step(acc, sA[cur], sB[cur], wm, wn, lane);
    if (more) {
      stage_land<kGBM>(sA[cur ^ 1], A, ra);
      stage_land<kGBN>(sB[cur ^ 1], B, rb);
    }
    cp_async_wait<0>();
    __syncthreads();
  }
}

// Calls f(m, n, value) for every accumulator element of this thread (tile-local m, n).
template <typename F>
__device__ __forceinline__ void for_each_acc(const float (&acc)[2][4][4], F f) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp / 2, wn = warp % 2, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        f(wm * 32 + i * 16 + g + (c >= 2 ? 8 : 0), wn * 32 + j * 8 + 2 * t + (c & 1),
          acc[i][j][c]);
}

// The first expert row of offsets, clamped into [0, R] (a bad plan cannot index out of range).
__device__ __forceinline__ int64_t clamp_row(int32_t v, int64_t R) {
  return v < 0 ? 0 : (int64_t(v) > R ? R : int64_t(v));
}

// tile_start[0] = 0, tile_start[e + 1] = tile_start[e] + ceil(rows_e / kGBM). One warp.
__global__ void expert_tile_plan_kernel(const int32_t* offsets, int E, int64_t R,
                                        int32_t* tile_start) {
  const int lane = threadIdx.x;
  int carry = 0;
  if (lane == 0) tile_start[0] = 0;
  for (int base = 0; base < E; base += kWarp) {
    const int e = base + lane;
    int t = 0;
    if (e < E) {
      const int64_t m = clamp_row(offsets[e + 1], R) - clamp_row(offsets[e], R);
      t = m > 0 ? int((m + kGBM - 1) / kGBM) : 0;
    }
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, t, o);
      if (lane >= o) t += y;
    }
    if (e < E) tile_start[e + 1] = carry + t;
    carry += __shfl_sync(kFullMask, t, kWarp - 1);
  }
}

struct RowsParams {
  const bf16* a;  // [R, K], row-major
  int64_t lda;
  const void* const* w;  // E expert matrices
  int64_t ldw;           // their row length
  bool vec_a, vec_w;
  bf16* c;  // [R, N]
  int64_t ldc;
  bool accumulate;
  const int32_t* offsets;     // [E + 1]
  const int32_t* tile_start;  // [E + 1]
  int E;
  int64_t R, N, K;
};

// W_K_CONTIG: p.w_k_contig as a template argument, so each instantiation stages W one way only.
template <bool W_K_CONTIG>
__global__ void __launch_bounds__(kGThreads) expert_rows_kernel(RowsParams p) {
  const int tile = blockIdx.x;
  if (tile >= p.tile_start[p.E]) return;  // uniform across the block
  int lo = 0, hi = p.E - 1;                 // the last expert whose first tile is <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.tile_start[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  const int e = lo;
  const int64_t r_begin = clamp_row(p.offsets[e], p.R), r_end = clamp_row(p.offsets[e + 1], p.R);
  const int64_t r0 = r_begin + int64_t(tile - p.tile_start[e]) * kGBM;
  const int64_t n0 = int64_t(blockIdx.y) * kGBN;
  const Operand A{p.a + r0 * p.lda, p.lda, r_end - r0, p.K, true, p.vec_a};
  const Operand B{static_cast<const bf16*>(p.w[e]), p.ldw, p.N, p.K, W_K_CONTIG, p.vec_w};
  float acc[2][4][4];
  tile_product(acc, A, B, 0, n0, p.K);
  // Plain locals for the epilogue (a lambda holding a reference to the kernel parameter would
  // copy the whole struct to local memory).
  const int64_t rows = r_end - r0, N = p.N, ldc = p.ldc;
  bf16* const c = p.c + r0 * ldc;
  const bool accumulate = p.accumulate;
  for_each_acc(acc, [&](int m, int n, float v) {
    const int64_t gn = n0 + n;
    if (m >= rows || gn >= N) return;
    bf16* dst = c + m * ldc + gn;
    *dst = __float2bfloat16(accumulate ? __bfloat162float(*dst) + v : v);
  });
}

struct WgradParams {
  const bf16* dy;  // [R, M]
  const bf16* x;   // [R, N]
  int64_t ldy, ldx;
  bool vec_dy, vec_x;
  void* const* dw;  // E f32 matrices [M, N]
  const int32_t* offsets;
  int64_t R, M, N;
  int tiles_n;
};

// At most 128 registers: 4 blocks (16 warps) per SM.
__global__ void __launch_bounds__(kGThreads, 4) expert_wgrad_kernel(WgradParams p) {
  const int e = blockIdx.y;
  const int64_t r_begin = clamp_row(p.offsets[e], p.R), r_end = clamp_row(p.offsets[e + 1], p.R);
  if (r_end <= r_begin) return;
  const int64_t m0 = int64_t(blockIdx.x / p.tiles_n) * kGBM;
  const int64_t n0 = int64_t(blockIdx.x % p.tiles_n) * kGBN;
  const int64_t rows = r_end - r_begin;
  const Operand A{p.dy + r_begin * p.ldy, p.ldy, p.M, rows, false, p.vec_dy};
  const Operand B{p.x + r_begin * p.ldx, p.ldx, p.N, rows, false, p.vec_x};
  float acc[2][4][4];
  tile_product(acc, A, B, m0, n0, rows);
  float* const dw = static_cast<float*>(p.dw[e]);
  const int64_t M = p.M, N = p.N;
  for_each_acc(acc, [&](int m, int n, float v) {
    const int64_t gm = m0 + m, gn = n0 + n;
    if (gm < M && gn < N) dw[gm * N + gn] += v;
  });
}

bool vec_ok(const void* p, int64_t ld) { return aligned16(p) && ld % 8 == 0; }

// What the grouped kernels take beyond the contract (contract::moe_expert_fwd / _bwd): bf16
// operands (CudaBackend sends f32 ones to the per-expert fallback) and one weight-gradient grid
// row per expert.
void check_grouped(const char* op, const std::vector<const Tensor*>& W) {
  MF_CHECK(W[0]->dtype == DType::BF16, op, ": the grouped kernels take bf16 operands, got ",
           describe("W[0]", *W[0]));
  MF_CHECK(W.size() <= 65535, op, ": ", W.size(), " experts is more than one launch takes (65535)");
}

bool all_vec(const std::vector<const Tensor*>& W, int64_t ld) {
  for (const Tensor* w : W)
    if (!vec_ok(w->ptr, ld)) return false;
  return true;
}

// Runs the plan kernel into scratch and returns tile_start.
const int32_t* tile_plan(const Ctx& ctx, const Tensor& offsets, int E, int64_t R) {
  int32_t* ts = static_cast<int32_t*>(ctx.scratch->get(size_t(E + 1) * sizeof(int32_t)));
  expert_tile_plan_kernel<<<1, kWarp, 0, ctx.stream>>>(offsets.data<int32_t>(), E, R, ts);
  CUDA_CHECK_LAUNCH();
  return ts;
}

void launch_rows(const Ctx& ctx, const Tensor& a, const std::vector<const Tensor*>& W,
                 const void* const* w_table, bool w_k_contig, const Tensor& offsets, Tensor& c,
                 bool accumulate, int64_t R, int64_t N, int64_t K) {
  const int E = int(W.size());
  RowsParams p{};
  p.a = a.data<bf16>();
  p.lda = K;
  p.w = w_table;
  p.ldw = w_k_contig ? K : N;
  p.vec_a = vec_ok(a.ptr, K);
  p.vec_w = all_vec(W, p.ldw);
  p.c = c.data<bf16>();
  p.ldc = N;
  p.accumulate = accumulate;
  p.offsets = offsets.data<int32_t>();
  p.tile_start = tile_plan(ctx, offsets, E, R);
  p.E = E;
  p.R = R;
  p.N = N;
  p.K = K;
  const dim3 grid(unsigned(ceil_div(R, kGBM) + E), unsigned(ceil_div(N, kGBN)));
  MF_CHECK(grid.y <= 65535u, "moe expert GEMM: ", N, " output columns is too many");
  if (w_k_contig) expert_rows_kernel<true><<<grid, kGThreads, 0, ctx.stream>>>(p);
  else expert_rows_kernel<false><<<grid, kGThreads, 0, ctx.stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void op_moe_expert_fwd(const Ctx& ctx, const Tensor& x, const std::vector<const Tensor*>& W,
                       const void* const* w_table, const Tensor& offsets, Tensor& y) {
  const auto [E, R, out, in] = contract::moe_expert_fwd(contract::kCuda, x, W, offsets, y);
  check_grouped("moe_expert_fwd", W);
  if (R == 0) return;
  launch_rows(ctx, x, W, w_table, /*w_k_contig=*/true, offsets, y, false, R, out, in);
}

void op_moe_expert_bwd(const Ctx& ctx, const Tensor& dy, const Tensor& x,
                       const std::vector<const Tensor*>& W, const void* const* w_table,
                       const Tensor& offsets, Tensor* dx, const std::vector<Tensor*>* dW,
                       void* const* dw_table, bool accumulate_dx) {
  const char* op = "moe_expert_bwd";
  const auto [E, R, out, in] =
      contract::moe_expert_bwd(contract::kCuda, dy, x, W, offsets, dx, dW);
  check_grouped(op, W);
  if (R == 0) return;
  if (dx) launch_rows(ctx, dy, W, w_table, /*w_k_contig=*/false, offsets, *dx, accumulate_dx, R,
                      in, out);
  if (dW) {
    WgradParams p{};
    p.dy = dy.data<bf16>();
    p.x = x.data<bf16>();
    p.ldy = out;
    p.ldx = in;
    p.vec_dy = vec_ok(dy.ptr, out);
    p.vec_x = vec_ok(x.ptr, in);
    p.dw = dw_table;
    p.offsets = offsets.data<int32_t>();
    p.R = R;
    p.M = out;
    p.N = in;
    p.tiles_n = int(ceil_div(in, kGBN));
    const int64_t tiles = ceil_div(out, kGBM) * p.tiles_n;
    MF_CHECK(tiles < (int64_t(1) << 31), op, ": expert matrices of [", out, ",", in,
             "] are too large");
    expert_wgrad_kernel<<<dim3(unsigned(tiles), unsigned(E)), kGThreads, 0, ctx.stream>>>(p);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace mf::cuda
