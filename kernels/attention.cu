// Causal GQA flash attention on tensor cores (mma.sync m16n8k16 bf16 -> f32) for head_dim 64
// and 128, with a SIMT fallback (one warp per row) for any other head_dim or misaligned data.
//
// Tensor-core kernels: a block has kAttnWarps warps; each warp owns 16 rows of the tile it
// computes (query rows in fwd/dq, key rows in dk/dv). Tiles are staged in shared memory with
// 16-byte cp.async copies (rows past T are zero-filled, so padded rows never inject NaN/Inf),
// issued a stage ahead so that they land while the tensor cores work on the tile before; rows
// are padded by kAttnPad elements so the fragment reads below are bank-conflict free. Fragments are
// read from shared memory following the PTX ISA layout of mma.m16n8k16 (kernels/mma.cuh):
// C (16x8 f32) holds c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1) and A a0..a3 the same rows,
// so an accumulator pair of n-tiles (2kk, 2kk+1) is exactly the A fragment of k-chunk kk: the
// probabilities go from the S accumulators straight into the P V product without shared memory.
//
// Softmax runs in the log2 domain (scores times scale*log2(e), exp2f); lse is stored in natural
// log units like the CPU reference.
#include "attention.cuh"

#include <atomic>
#include <cstdlib>

#include "mma.cuh"

namespace mf::cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kAttnRowsPerWarp = 16;                          // mma M
constexpr int kAttnTileRows = kAttnWarps * kAttnRowsPerWarp;  // rows owned by one block
constexpr int kAttnPad = 8;                                   // bf16 elements per smem row
constexpr int kSimtWarpsPerBlock = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tile shapes per head dim (columns of the inner loop; rows are kAttnTileRows, or MT times that
// in the forward).
template <int HD>
struct AttnTraits;
template <>
struct AttnTraits<64> {
  static constexpr int kFwdKeys = 64;   // keys per step in the forward
  static constexpr int kDqKeys = 64;    // keys per step in the dq kernel
  static constexpr int kDkvQueries = 64;  // queries per step in the dk/dv kernel
};
template <>
struct AttnTraits<128> {
  static constexpr int kFwdKeys = 64;
  static constexpr int kDqKeys = 64;
  static constexpr int kDkvQueries = 32;  // dk + dv accumulators already take 128 registers
};

// E: the activation dtype. The tensor-core kernels take bf16 (AttnParams); the SIMT kernels
// either (f32 for train.precision "fp32").
template <class E>
struct AttnParamsT {
  const E* q;
  const E* k;
  const E* v;
  const E* out;
  const E* dout;
  E* o;
  E* dq;
  E* dk;
  E* dv;
  float* lse;  // [B,H,T]
  float* D;    // [B,H,T] rowsum(dout * out), backward
  int B, T, H, Hkv, group, hd;
  float scale, scale_log2;
};
using AttnParams = AttnParamsT<bf16>;

// A fragment of k-chunk kk from f32 accumulators laid out as [n-tile][4].
template <int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[NT][4], int kk) {
  a[0] = pack2f(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2f(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2f(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2f(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// Start copying rows [row0, row0 + ROWS) of one head into smem (stride HD + kAttnPad) with
// cp.async; rows >= T become 0. g points at row t = 0 of the head; consecutive rows are
// row_stride elements apart. The caller commits the group and waits for it.
template <int HD, int ROWS>
__device__ __forceinline__ void load_tile_async(bf16* s, const bf16* g, int64_t row_stride, int row0, int T) {
  constexpr int kVecPerRow = HD / 8;
  constexpr int LD = HD + kAttnPad;
  for (int idx = threadIdx.x; idx < ROWS * kVecPerRow; idx += kAttnThreads) {
    const int r = idx / kVecPerRow, c = (idx % kVecPerRow) * 8;
    const int t = row0 + r;
    const bool in = t < T;
    cp_async16(s + r * LD + c, g + (in ? int64_t(t) * row_stride + c : 0), in);
  }
}

// ---- forward (tensor cores) -------------------------------------------------------------------
// Each warp owns MT m-tiles (16 query rows each): every K and V fragment read from shared memory
// feeds MT mma instead of one, which halves the shared-memory traffic per product at MT = 2
// (what bounds mma.sync kernels on sm_80/sm_90), at the price of MT times the accumulators
// (hd 64: 243 registers instead of 101, so 2 blocks per SM instead of 4). hd 128 has MT = 1 only:
// at 2 it spills. attention_fwd_mtiles() picks MT for hd 64.
template <int HD, int MT>
__global__ void __launch_bounds__(kAttnThreads) attn_fwd_tc_kernel(AttnParams p) {
  constexpr int WR = MT * kAttnRowsPerWarp;  // rows per warp
  constexpr int BR = kAttnWarps * WR, BC = AttnTraits<HD>::kFwdKeys, LD = HD + kAttnPad;
  constexpr int NO = HD / 8, NS = BC / 8;  // n-tiles of O and of S
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* Ks = Qs + BR * LD;
  bf16* Vs = Ks + BC * LD;

  const int qtile = gridDim.x - 1 - blockIdx.x;  // longest (last) query tiles start first
  const int b = blockIdx.y / p.H, h = blockIdx.y % p.H, hk = h / p.group;
  const int q0 = qtile * BR;
  const int64_t qs = int64_t(p.H) * HD, kvs = int64_t(p.Hkv) * HD;
  const bf16* qg = p.q + (int64_t(b) * p.T * p.H + h) * HD;
  const bf16* kg = p.k + (int64_t(b) * p.T * p.Hkv + hk) * HD;
  const bf16* vg = p.v + (int64_t(b) * p.T * p.Hkv + hk) * HD;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane >> 2, t4 = lane & 3;
  const int wr0 = warp * WR;
  // row[i][r]: the query row of accumulator half r (c0,c1 / c2,c3) of m-tile i.
  int row[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    row[i][0] = q0 + wr0 + i * kAttnRowsPerWarp + g;
    row[i][1] = row[i][0] + 8;
  }

  // The pipeline: K of the next tile is copied while this tile's softmax and P V run, and V of
  // this tile while Q K^T runs. Two barriers per tile, as without the copies in flight.
  load_tile_async<HD, BR>(Qs, qg, qs, q0, p.T);
  load_tile_async<HD, BC>(Ks, kg, kvs, 0, p.T);
  cp_async_commit();
  float o[MT][NO][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int n = 0; n < NO; ++n) o[i][n][0] = o[i][n][1] = o[i][n][2] = o[i][n][3] = 0.f;
    m[i][0] = m[i][1] = -INFINITY;
    l[i][0] = l[i][1] = 0.f;
  }

  const int kv_end = min(p.T, q0 + BR);
  for (int kv0 = 0; kv0 < kv_end; kv0 += BC) {
    cp_async_wait<0>();
    __syncthreads();  // K (and Q) are in place; every warp is done with the previous V
    load_tile_async<HD, BC>(Vs, vg, kvs, kv0, p.T);
    cp_async_commit();
    // Warps whose rows all precede kv0 skip the arithmetic but not the barriers.
    const bool active = kv0 <= q0 + wr0 + WR - 1;

    float s[MT][NS][4];
    if (active) {
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NS; ++j) s[i][j][0] = s[i][j][1] = s[i][j][2] = s[i][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i) frag_a<LD>(a[i], Qs, wr0 + i * kAttnRowsPerWarp, kk * 16, lane);
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          uint32_t bb[2];
          frag_b_rows_n<LD>(bb, Ks, j * 8, kk * 16, lane);
#pragma unroll
          for (int i = 0; i < MT; ++i) mma16816(s[i][j], a[i], bb);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // V is in place; every warp is done with K
    if (kv0 + BC < kv_end) {
      load_tile_async<HD, BC>(Ks, kg, kvs, kv0 + BC, p.T);
      cp_async_commit();
    }
    if (!active) continue;

#pragma unroll
    for (int i = 0; i < MT; ++i) {
      float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = kv0 + j * 8 + 2 * t4 + (e & 1);
          const int r = e >> 1;
          const float x = (col > row[i][r] || col >= p.T) ? -INFINITY : s[i][j][e] * p.scale_log2;
          s[i][j][e] = x;
          mt[r] = fmaxf(mt[r], x);
        }
      float alpha[2], base[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mt[r] = fmaxf(mt[r], __shfl_xor_sync(kFullMask, mt[r], 1));
        mt[r] = fmaxf(mt[r], __shfl_xor_sync(kFullMask, mt[r], 2));
        const float mn = fmaxf(m[i][r], mt[r]);
        base[r] = mn == -INFINITY ? 0.f : mn;  // a fully masked row so far: keep exp2 finite
        alpha[r] = exp2f(m[i][r] - base[r]);   // 0 when m was -inf
        m[i][r] = mn;
        l[i][r] *= alpha[r];
      }
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = exp2f(s[i][j][e] - base[e >> 1]);  // masked: exp2(-inf) = 0
          s[i][j][e] = pe;
          l[i][e >> 1] += pe;  // thread-partial; reduced over the quad at the end
        }
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[i][n][0] *= alpha[0];
        o[i][n][1] *= alpha[0];
        o[i][n][2] *= alpha[1];
        o[i][n][3] *= alpha[1];
      }
    }
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) acc_to_a<NS>(a[i], s[i], kk);
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        uint32_t bb[2];
        frag_b_rows_k<LD>(bb, Vs, kk * 16, n * 8, lane);
#pragma unroll
        for (int i = 0; i < MT; ++i) mma16816(o[i][n], a[i], bb);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[i][r] += __shfl_xor_sync(kFullMask, l[i][r], 1);
      l[i][r] += __shfl_xor_sync(kFullMask, l[i][r], 2);
    }
    const float inv[2] = {1.f / l[i][0], 1.f / l[i][1]};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[i][r] >= p.T) continue;
      bf16* dst = p.o + ((int64_t(b) * p.T + row[i][r]) * p.H + h) * HD + 2 * t4;
#pragma unroll
      for (int n = 0; n < NO; ++n)
        *reinterpret_cast<bf162*>(dst + n * 8) =
            __floats2bfloat162_rn(o[i][n][2 * r] * inv[r], o[i][n][2 * r + 1] * inv[r]);
      if (t4 == 0) p.lse[(int64_t(b) * p.H + h) * p.T + row[i][r]] = (m[i][r] + log2f(l[i][r])) * kLn2;
    }
  }
}

// ---- backward: dq (tensor cores) --------------------------------------------------------------
template <int HD>
__global__ void __launch_bounds__(kAttnThreads) attn_bwd_dq_tc_kernel(AttnParams p) {
  constexpr int BR = kAttnTileRows, BC = AttnTraits<HD>::kDqKeys, LD = HD + kAttnPad;
  constexpr int NO = HD / 8, NS = BC / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
  bf16* dOs = Qs + BR * LD;
  bf16* Vs = dOs + BR * LD;
  bf16* K0 = Vs + BC * LD;  // two K tiles: K0 and K0 + BC * LD; the next tile lands in the other

  const int qtile = gridDim.x - 1 - blockIdx.x;
  const int b = blockIdx.y / p.H, h = blockIdx.y % p.H, hk = h / p.group;
  const int q0 = qtile * BR;
  const int64_t qs = int64_t(p.H) * HD, kvs = int64_t(p.Hkv) * HD;
  const int64_t qoff = (int64_t(b) * p.T * p.H + h) * HD;
  const int64_t kvoff = (int64_t(b) * p.T * p.Hkv + hk) * HD;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane >> 2, t4 = lane & 3;
  const int wr0 = warp * kAttnRowsPerWarp;
  const int row[2] = {q0 + wr0 + g, q0 + wr0 + g + 8};
  float lse2[2], Dr[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool ok = row[r] < p.T;
    const int64_t at = (int64_t(b) * p.H + h) * p.T + row[r];
    lse2[r] = ok ? p.lse[at] * kLog2e : 0.f;
    Dr[r] = ok ? p.D[at] : 0.f;
  }

  // The pipeline: V of this tile and K of the next are copied while S = Q K^T runs; the next K
  // goes into the other K buffer, which the previous tile's dQ += dS K has finished with.
  load_tile_async<HD, BR>(Qs, p.q + qoff, qs, q0, p.T);
  load_tile_async<HD, BR>(dOs, p.dout + qoff, qs, q0, p.T);
  load_tile_async<HD, BC>(K0, p.k + kvoff, kvs, 0, p.T);
  cp_async_commit();
  float dq[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  const int kv_end = min(p.T, q0 + BR);
  for (int kv0 = 0, it = 0; kv0 < kv_end; kv0 += BC, ++it) {
    const bf16* Ks = K0 + (it & 1) * (BC * LD);
    cp_async_wait<0>();
    __syncthreads();  // this K (and Q, dO) in place; every warp is done with the last V and K
    load_tile_async<HD, BC>(Vs, p.v + kvoff, kvs, kv0, p.T);
    cp_async_commit();
    const bool more = kv0 + BC < kv_end;
    if (more) {
      load_tile_async<HD, BC>(K0 + ((it + 1) & 1) * (BC * LD), p.k + kvoff, kvs, kv0 + BC, p.T);
      cp_async_commit();
    }
    const bool active = kv0 <= q0 + wr0 + kAttnRowsPerWarp - 1;  // some key in this warp's past

    float s[NS][4], dp[NS][4];
    if (active) {
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t a[4];
        frag_a<LD>(a, Qs, wr0, kk * 16, lane);
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          uint32_t bb[2];
          frag_b_rows_n<LD>(bb, Ks, j * 8, kk * 16, lane);  // S = Q K^T
          mma16816(s[j], a, bb);
        }
      }
    }
    if (more)
      cp_async_wait<1>();  // V has landed; the next K may still be in flight
    else
      cp_async_wait<0>();
    __syncthreads();  // V in place
    if (!active) continue;

#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t ad[4];
      frag_a<LD>(ad, dOs, wr0, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        uint32_t bb[2];
        frag_b_rows_n<LD>(bb, Vs, j * 8, kk * 16, lane);  // dP = dO V^T
        mma16816(dp[j], ad, bb);
      }
    }
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = kv0 + j * 8 + 2 * t4 + (e & 1);
        const int r = e >> 1;
        const bool ok = col <= row[r] && col < p.T && row[r] < p.T;
        const float pe = ok ? exp2f(s[j][e] * p.scale_log2 - lse2[r]) : 0.f;
        s[j][e] = pe * (dp[j][e] - Dr[r]);  // dS
      }
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<NS>(a, s, kk);
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        uint32_t bb[2];
        frag_b_rows_k<LD>(bb, Ks, kk * 16, n * 8, lane);  // dQ += dS K
        mma16816(dq[n], a, bb);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= p.T) continue;
    bf16* dst = p.dq + qoff + int64_t(row[r]) * qs + 2 * t4;
#pragma unroll
    for (int n = 0; n < NO; ++n)
      *reinterpret_cast<bf162*>(dst + n * 8) =
          __floats2bfloat162_rn(dq[n][2 * r] * p.scale, dq[n][2 * r + 1] * p.scale);
  }
}

// ---- backward: dk, dv (tensor cores) ----------------------------------------------------------
// Start copying query tile [q0, q0 + BQ) of head h: Q and dO rows, lse (natural log) and D.
template <int HD, int BQ>
__device__ __forceinline__ void load_qtile_async(bf16* Qs, bf16* dOs, float* lse_s, float* D_s,
                                                 const AttnParams& p, int b, int h, int q0) {
  const int64_t qs = int64_t(p.H) * HD;
  const int64_t qoff = (int64_t(b) * p.T * p.H + h) * HD;
  const int64_t rowoff = (int64_t(b) * p.H + h) * p.T;
  load_tile_async<HD, BQ>(Qs, p.q + qoff, qs, q0, p.T);
  load_tile_async<HD, BQ>(dOs, p.dout + qoff, qs, q0, p.T);
  for (int i = threadIdx.x; i < BQ; i += kAttnThreads) {
    const int t = q0 + i;
    const bool in = t < p.T;
    cp_async4(lse_s + i, p.lse + rowoff + (in ? t : 0), in);
    cp_async4(D_s + i, p.D + rowoff + (in ? t : 0), in);
  }
}

template <int HD>
__global__ void __launch_bounds__(kAttnThreads) attn_bwd_dkdv_tc_kernel(AttnParams p) {
  constexpr int BKV = kAttnTileRows, BQ = AttnTraits<HD>::kDkvQueries, LD = HD + kAttnPad;
  constexpr int NO = HD / 8, NS = BQ / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // K and V stay for the whole block; the query tiles (Q, dO, lse, D) alternate between two
  // buffers, the next one landing while this one is used.
  bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* Vs = Ks + BKV * LD;
  // Buffer i: Q at Qb + i * kStride, dO BQ * LD elements after it; lse at lseb + i * kFStride,
  // D BQ floats after it.
  constexpr int kStride = 2 * BQ * LD, kFStride = 2 * BQ;
  bf16* Qb = Vs + BKV * LD;
  float* lseb = reinterpret_cast<float*>(Qb + 2 * kStride);

  const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
  const int kv0 = blockIdx.x * BKV;  // early key tiles see the most queries: they start first
  const int64_t kvs = int64_t(p.Hkv) * HD;
  const int64_t kvoff = (int64_t(b) * p.T * p.Hkv + hk) * HD;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane >> 2, t4 = lane & 3;
  const int wr0 = warp * kAttnRowsPerWarp;
  const int kvrow[2] = {kv0 + wr0 + g, kv0 + wr0 + g + 8};

  load_tile_async<HD, BKV>(Ks, p.k + kvoff, kvs, kv0, p.T);
  load_tile_async<HD, BKV>(Vs, p.v + kvoff, kvs, kv0, p.T);
  load_qtile_async<HD, BQ>(Qb, Qb + BQ * LD, lseb, lseb + BQ, p, b, hk * p.group, kv0);
  cp_async_commit();
  float dk[NO][4], dv[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  // Query tiles in order: for each head of the group, q0 = kv0, kv0 + BQ, ... < T (causal: the
  // queries before kv0 see none of these keys).
  for (int hi = 0, q0 = kv0, buf = 0; hi < p.group; buf ^= 1) {
    int nhi = hi, nq0 = q0 + BQ;
    if (nq0 >= p.T) {
      ++nhi;
      nq0 = kv0;
    }
    cp_async_wait<0>();
    __syncthreads();  // this query tile in place; every warp is done with the other buffer
    if (nhi < p.group) {
      bf16* nQ = Qb + (buf ^ 1) * kStride;
      float* nl = lseb + (buf ^ 1) * kFStride;
      load_qtile_async<HD, BQ>(nQ, nQ + BQ * LD, nl, nl + BQ, p, b, hk * p.group + nhi, nq0);
      cp_async_commit();
    }
    const bf16* Qs = Qb + buf * kStride;
    const bf16* dOs = Qs + BQ * LD;
    const float* lse_s = lseb + buf * kFStride;
    const float* D_s = lse_s + BQ;
    const int tq0 = q0;
    hi = nhi;
    q0 = nq0;
    if (tq0 + BQ - 1 < kv0 + wr0) continue;  // every query precedes this warp's keys

    float st[NS][4], dpt[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4], av[4];
      frag_a<LD>(a, Ks, wr0, kk * 16, lane);
      frag_a<LD>(av, Vs, wr0, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        uint32_t bb[2];
        frag_b_rows_n<LD>(bb, Qs, j * 8, kk * 16, lane);  // S^T = K Q^T
        mma16816(st[j], a, bb);
        frag_b_rows_n<LD>(bb, dOs, j * 8, kk * 16, lane);  // dP^T = V dO^T
        mma16816(dpt[j], av, bb);
      }
    }
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = j * 8 + 2 * t4 + (e & 1);
        const int qrow = tq0 + qi, kr = kvrow[e >> 1];
        const bool ok = qrow < p.T && qrow >= kr && kr < p.T;
        const float pe = ok ? exp2f(st[j][e] * p.scale_log2 - lse_s[qi] * kLog2e) : 0.f;
        st[j][e] = pe;                           // P^T
        dpt[j][e] = pe * (dpt[j][e] - D_s[qi]);  // dS^T
      }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t ap[4], as[4];
      acc_to_a<NS>(ap, st, kk);
      acc_to_a<NS>(as, dpt, kk);
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        uint32_t bb[2];
        frag_b_rows_k<LD>(bb, dOs, kk * 16, n * 8, lane);  // dV += P^T dO
        mma16816(dv[n], ap, bb);
        frag_b_rows_k<LD>(bb, Qs, kk * 16, n * 8, lane);  // dK += dS^T Q
        mma16816(dk[n], as, bb);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (kvrow[r] >= p.T) continue;
    const int64_t at = kvoff + int64_t(kvrow[r]) * kvs + 2 * t4;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      *reinterpret_cast<bf162*>(p.dk + at + n * 8) =
          __floats2bfloat162_rn(dk[n][2 * r] * p.scale, dk[n][2 * r + 1] * p.scale);
      *reinterpret_cast<bf162*>(p.dv + at + n * 8) =
          __floats2bfloat162_rn(dv[n][2 * r], dv[n][2 * r + 1]);
    }
  }
}

// ---- D = rowsum(dout * out) -------------------------------------------------------------------
// One warp per (b, t, h) row, any head dim.
template <class T>
__global__ void attn_bwd_rowdot_kernel(AttnParamsT<T> p) {
  const int64_t it = int64_t(blockIdx.x) * kSimtWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = int64_t(p.B) * p.T * p.H;
  if (it >= rows) return;
  const T* a = p.dout + it * p.hd;
  const T* o = p.out + it * p.hd;
  float s = 0.f;
  for (int c = lane; c < p.hd; c += kWarp) s += to_f(a[c]) * to_f(o[c]);
  s = warp_sum(s);
  const int64_t h = it % p.H, t = (it / p.H) % p.T, b = it / (int64_t(p.H) * p.T);
  if (lane == 0) p.D[(b * p.H + h) * p.T + t] = s;
}

// ---- SIMT fallback: one warp per row, NPER head-dim elements per lane (hd <= 32 * NPER) -------
template <int NPER, class T>
__device__ __forceinline__ void load_row(float (&x)[NPER], const T* p, int hd, int lane) {
#pragma unroll
  for (int i = 0; i < NPER; ++i) {
    const int c = lane + i * kWarp;
    x[i] = c < hd ? to_f(p[c]) : 0.f;
  }
}
template <int NPER, class T>
__device__ __forceinline__ float row_dot(const float (&x)[NPER], const T* p, int hd, int lane) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NPER; ++i) {
    const int c = lane + i * kWarp;
    if (c < hd) s += x[i] * to_f(p[c]);
  }
  return warp_sum(s);
}
template <int NPER, class T>
__device__ __forceinline__ void store_row(T* p, const float (&x)[NPER], float scale, int hd, int lane) {
#pragma unroll
  for (int i = 0; i < NPER; ++i) {
    const int c = lane + i * kWarp;
    if (c < hd) p[c] = from_f<T>(x[i] * scale);
  }
}

template <class T, int NPER>
__global__ void attn_fwd_simt_kernel(AttnParamsT<T> p) {
  const int64_t it = int64_t(blockIdx.x) * kSimtWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (it >= int64_t(p.B) * p.H * p.T) return;
  const int b = int(it / (int64_t(p.H) * p.T)), h = int((it / p.T) % p.H), t = int(it % p.T);
  const int hk = h / p.group;
  float q[NPER], acc[NPER];
  load_row<NPER>(q, p.q + ((int64_t(b) * p.T + t) * p.H + h) * p.hd, p.hd, lane);
#pragma unroll
  for (int i = 0; i < NPER; ++i) acc[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j <= t; ++j) {
    const int64_t kv = ((int64_t(b) * p.T + j) * p.Hkv + hk) * p.hd;
    const float s = p.scale * row_dot<NPER>(q, p.k + kv, p.hd, lane);
    const float mn = fmaxf(m, s);
    const float corr = expf(m - mn), pj = expf(s - mn);
    l = l * corr + pj;
#pragma unroll
    for (int i = 0; i < NPER; ++i) {
      const int c = lane + i * kWarp;
      acc[i] = acc[i] * corr + (c < p.hd ? pj * to_f(p.v[kv + c]) : 0.f);
    }
    m = mn;
  }
  store_row<NPER>(p.o + ((int64_t(b) * p.T + t) * p.H + h) * p.hd, acc, 1.f / l, p.hd, lane);
  if (lane == 0) p.lse[(int64_t(b) * p.H + h) * p.T + t] = m + logf(l);
}

template <class T, int NPER>
__global__ void attn_bwd_dq_simt_kernel(AttnParamsT<T> p) {
  const int64_t it = int64_t(blockIdx.x) * kSimtWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (it >= int64_t(p.B) * p.H * p.T) return;
  const int b = int(it / (int64_t(p.H) * p.T)), h = int((it / p.T) % p.H), t = int(it % p.T);
  const int hk = h / p.group;
  const int64_t qa = ((int64_t(b) * p.T + t) * p.H + h) * p.hd;
  const int64_t ra = (int64_t(b) * p.H + h) * p.T + t;
  float q[NPER], dO[NPER], acc[NPER];
  load_row<NPER>(q, p.q + qa, p.hd, lane);
  load_row<NPER>(dO, p.dout + qa, p.hd, lane);
#pragma unroll
  for (int i = 0; i < NPER; ++i) acc[i] = 0.f;
  const float L = p.lse[ra], Dt = p.D[ra];
  for (int j = 0; j <= t; ++j) {
    const int64_t kv = ((int64_t(b) * p.T + j) * p.Hkv + hk) * p.hd;
    const float pj = expf(p.scale * row_dot<NPER>(q, p.k + kv, p.hd, lane) - L);
    const float ds = pj * (row_dot<NPER>(dO, p.v + kv, p.hd, lane) - Dt);
#pragma unroll
    for (int i = 0; i < NPER; ++i) {
      const int c = lane + i * kWarp;
      if (c < p.hd) acc[i] += ds * to_f(p.k[kv + c]);
    }
  }
  store_row<NPER>(p.dq + qa, acc, p.scale, p.hd, lane);
}

template <class T, int NPER>
__global__ void attn_bwd_dkdv_simt_kernel(AttnParamsT<T> p) {
  const int64_t it = int64_t(blockIdx.x) * kSimtWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (it >= int64_t(p.B) * p.Hkv * p.T) return;
  const int b = int(it / (int64_t(p.Hkv) * p.T)), hk = int((it / p.T) % p.Hkv), j = int(it % p.T);
  const int64_t kv = ((int64_t(b) * p.T + j) * p.Hkv + hk) * p.hd;
  float k[NPER], v[NPER], ak[NPER], av[NPER];
  load_row<NPER>(k, p.k + kv, p.hd, lane);
  load_row<NPER>(v, p.v + kv, p.hd, lane);
#pragma unroll
  for (int i = 0; i < NPER; ++i) ak[i] = av[i] = 0.f;
  for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
    for (int t = j; t < p.T; ++t) {
      const int64_t qa = ((int64_t(b) * p.T + t) * p.H + h) * p.hd;
      const int64_t ra = (int64_t(b) * p.H + h) * p.T + t;
      const float pj = expf(p.scale * row_dot<NPER>(k, p.q + qa, p.hd, lane) - p.lse[ra]);
      const float ds = pj * (row_dot<NPER>(v, p.dout + qa, p.hd, lane) - p.D[ra]);
#pragma unroll
      for (int i = 0; i < NPER; ++i) {
        const int c = lane + i * kWarp;
        if (c < p.hd) {
          ak[i] += ds * to_f(p.q[qa + c]);
          av[i] += pj * to_f(p.dout[qa + c]);
        }
      }
    }
  }
  store_row<NPER>(p.dk + kv, ak, p.scale, p.hd, lane);
  store_row<NPER>(p.dv + kv, av, 1.f, p.hd, lane);
}

// ---- launchers --------------------------------------------------------------------------------
// Opts KERNEL in to `smem` bytes of dynamic shared memory above the default 48 KiB, once per
// process (each kernel always asks for the same amount; a process drives one device).
template <auto KERNEL>
void set_smem(size_t smem) {
  if (smem <= 48 * 1024) return;
  static const bool done = [smem] {
    CUDA_CHECK(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)done;
}

template <int HD, int MT>
size_t fwd_smem() {  // Q (MT m-tiles per warp), K and V
  return size_t(MT * kAttnTileRows + 2 * AttnTraits<HD>::kFwdKeys) * (HD + kAttnPad) * sizeof(bf16);
}
template <int HD>
size_t dq_smem() {  // Q, dO, V and two K tiles
  return size_t(2 * kAttnTileRows + 3 * AttnTraits<HD>::kDqKeys) * (HD + kAttnPad) * sizeof(bf16);
}
template <int HD>
size_t dkdv_smem() {  // K and V, and two buffers of Q, dO, lse and D
  constexpr int BQ = AttnTraits<HD>::kDkvQueries;
  return size_t(2 * kAttnTileRows + 4 * BQ) * (HD + kAttnPad) * sizeof(bf16) + 4 * BQ * sizeof(float);
}
template <int HD>
size_t bwd_smem() {
  return std::max(dq_smem<HD>(), dkdv_smem<HD>());
}

template <int HD, int MT>
void launch_attn_fwd_tc(const AttnParams& p, cudaStream_t stream) {
  const size_t smem = fwd_smem<HD, MT>();
  set_smem<attn_fwd_tc_kernel<HD, MT>>(smem);
  const dim3 grid(unsigned(ceil_div(p.T, MT * kAttnTileRows)), unsigned(p.B * p.H));
  attn_fwd_tc_kernel<HD, MT><<<grid, kAttnThreads, smem, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <int HD>
void launch_attn_bwd_tc(const AttnParams& p, cudaStream_t stream) {
  const size_t s1 = dq_smem<HD>(), s2 = dkdv_smem<HD>();
  set_smem<attn_bwd_dq_tc_kernel<HD>>(s1);
  set_smem<attn_bwd_dkdv_tc_kernel<HD>>(s2);
  const unsigned tiles = unsigned(ceil_div(p.T, kAttnTileRows));
  attn_bwd_dq_tc_kernel<HD><<<dim3(tiles, unsigned(p.B * p.H)), kAttnThreads, s1, stream>>>(p);
  CUDA_CHECK_LAUNCH();
  attn_bwd_dkdv_tc_kernel<HD><<<dim3(tiles, unsigned(p.B * p.Hkv)), kAttnThreads, s2, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <class T, int NPER>
void launch_attn_simt(const AttnParamsT<T>& p, bool backward, cudaStream_t stream) {
  const int threads = kSimtWarpsPerBlock * kWarp;
  const int64_t qrows = int64_t(p.B) * p.H * p.T, kvrows = int64_t(p.B) * p.Hkv * p.T;
  if (!backward) {
    attn_fwd_simt_kernel<T, NPER><<<unsigned(ceil_div(qrows, kSimtWarpsPerBlock)), threads, 0, stream>>>(p);
    CUDA_CHECK_LAUNCH();
    return;
  }
  attn_bwd_dq_simt_kernel<T, NPER><<<unsigned(ceil_div(qrows, kSimtWarpsPerBlock)), threads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
  attn_bwd_dkdv_simt_kernel<T, NPER><<<unsigned(ceil_div(kvrows, kSimtWarpsPerBlock)), threads, 0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_rowdot(const AttnParamsT<T>& p, int64_t rows, cudaStream_t stream) {
  attn_bwd_rowdot_kernel<T><<<unsigned(ceil_div(rows, kSimtWarpsPerBlock)), kSimtWarpsPerBlock * kWarp,
                              0, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <class T>
void dispatch_simt(const AttnParamsT<T>& p, bool backward, cudaStream_t stream) {
  if (p.hd <= 32) return launch_attn_simt<T, 1>(p, backward, stream);
  if (p.hd <= 64) return launch_attn_simt<T, 2>(p, backward, stream);
  if (p.hd <= 128) return launch_attn_simt<T, 4>(p, backward, stream);
  launch_attn_simt<T, 8>(p, backward, stream);
}

// ---- entries ----------------------------------------------------------------------------------
namespace {

constexpr int kAttnMaxHeadDim = 8 * kWarp;  // SIMT fallback limit

// The limits of these kernels, beyond the shared argument checks.
void check_kernel_limits(const char* op, const AttnShape& s) {
  MF_CHECK(s.hd <= kAttnMaxHeadDim, op, ": head_dim ", s.hd, " exceeds the CUDA kernels' limit ",
           kAttnMaxHeadDim);
  MF_CHECK(int64_t(s.B) * s.H <= 65535 && int64_t(s.B) * s.Hkv <= 65535, op, ": B*H = ",
           int64_t(s.B) * s.H, " exceeds the grid limit 65535");
}

// The shape, q, k, v and lse of one call in element type T (the caller has checked the dtypes).
template <class T>
AttnParamsT<T> make_params(const AttnShape& s, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& out, const Tensor& lse) {
  AttnParamsT<T> p{};
  p.q = static_cast<const T*>(q.ptr);
  p.k = static_cast<const T*>(k.ptr);
  p.v = static_cast<const T*>(v.ptr);
  p.out = static_cast<const T*>(out.ptr);
  p.lse = lse.data<float>();
  p.B = s.B; p.T = s.T; p.H = s.H; p.Hkv = s.Hkv; p.group = s.H / s.Hkv; p.hd = s.hd;
  p.scale = s.scale;
  p.scale_log2 = s.scale * kLog2e;
  return p;
}

template <class T>
AttnParamsT<T> make_bwd_params(const AttnShape& s, const Tensor& dout, const Tensor& q,
                               const Tensor& k, const Tensor& v, const Tensor& out,
                               const Tensor& lse, Tensor& dq, Tensor& dk, Tensor& dv, float* D) {
  AttnParamsT<T> p = make_params<T>(s, q, k, v, out, lse);
  p.dout = static_cast<const T*>(dout.ptr);
  p.dq = static_cast<T*>(dq.ptr);
  p.dk = static_cast<T*>(dk.ptr);
  p.dv = static_cast<T*>(dv.ptr);
  p.D = D;
  return p;
}

bool use_tensor_cores(const AttnShape& s, std::initializer_list<const void*> ptrs) {
  if (s.hd != 64 && s.hd != 128) return false;
  for (const void* q : ptrs)
    if (!aligned16(q)) return false;
  return true;
}

}  // namespace

namespace {
// 0 until first asked: then MF_ATTN_FWD_MTILES, or the default.
std::atomic<int> g_fwd_mtiles{0};
}  // namespace

int attention_fwd_mtiles() {
  if (g_fwd_mtiles == 0) {
    const char* e = std::getenv("MF_ATTN_FWD_MTILES");
    if (e == nullptr || *e == '\0') {
      g_fwd_mtiles = 2;
    } else {
      const std::string v(e);
      MF_CHECK(v == "1" || v == "2", "environment variable MF_ATTN_FWD_MTILES='", v,
               "': expected 1 or 2 (16-row m-tiles per warp in the hd-64 attention forward)");
      g_fwd_mtiles = v == "1" ? 1 : 2;
    }
  }
  return g_fwd_mtiles;
}

void set_attention_fwd_mtiles(int mt) {
  MF_CHECK(mt == 1 || mt == 2, "set_attention_fwd_mtiles: ", mt, " is not 1 or 2");
  g_fwd_mtiles = mt;
}

void op_attention_fwd(const Ctx& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                      Tensor& out, Tensor& lse, const AttnShape& s) {
  const char* op = "attention_fwd";
  contract::attention_fwd(contract::kCuda, op, q, k, v, out, lse, s);
  check_kernel_limits(op, s);
  if (q.dtype == DType::F32) {  // train.precision "fp32": the SIMT kernels in f32
    AttnParamsT<float> p = make_params<float>(s, q, k, v, out, lse);
    p.o = out.data<float>();
    return dispatch_simt(p, false, ctx.stream);
  }
  AttnParams p = make_params<bf16>(s, q, k, v, out, lse);
  p.o = static_cast<bf16*>(out.ptr);
  if (use_tensor_cores(s, {q.ptr, k.ptr, v.ptr, out.ptr})) {
    const int mt = s.hd == 64 ? attention_fwd_mtiles() : 1;
    const size_t smem = s.hd == 128 ? fwd_smem<128, 1>() : mt == 2 ? fwd_smem<64, 2>() : fwd_smem<64, 1>();
    MF_CHECK(smem <= ctx.max_smem_optin, op, ": the device has too little shared memory");
    if (s.hd == 128) return launch_attn_fwd_tc<128, 1>(p, ctx.stream);
    if (mt == 2) return launch_attn_fwd_tc<64, 2>(p, ctx.stream);
    return launch_attn_fwd_tc<64, 1>(p, ctx.stream);
  }
  dispatch_simt(p, false, ctx.stream);
}

void op_attention_bwd(const Ctx& ctx, const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& out, const Tensor& lse, Tensor& dq,
                      Tensor& dk, Tensor& dv, const AttnShape& s) {
  const char* op = "attention_bwd";
  contract::attention_bwd(contract::kCuda, op, dout, q, k, v, out, lse, dq, dk, dv, s);
  check_kernel_limits(op, s);
  const int64_t rows = int64_t(s.B) * s.H * s.T;
  Arena ar(ctx.scratch->get(size_t(rows) * sizeof(float)));
  float* D = ar.take<float>(size_t(rows));
  if (q.dtype == DType::F32) {  // train.precision "fp32": the SIMT kernels in f32
    auto p = make_bwd_params<float>(s, dout, q, k, v, out, lse, dq, dk, dv, D);
    launch_rowdot(p, rows, ctx.stream);
    return dispatch_simt(p, true, ctx.stream);
  }
  auto p = make_bwd_params<bf16>(s, dout, q, k, v, out, lse, dq, dk, dv, D);
  launch_rowdot(p, rows, ctx.stream);
  if (use_tensor_cores(s, {dout.ptr, q.ptr, k.ptr, v.ptr, dq.ptr, dk.ptr, dv.ptr})) {
    MF_CHECK((s.hd == 64 ? bwd_smem<64>() : bwd_smem<128>()) <= ctx.max_smem_optin, op,
             ": the device has too little shared memory");
    if (s.hd == 64) return launch_attn_bwd_tc<64>(p, ctx.stream);
    return launch_attn_bwd_tc<128>(p, ctx.stream);
  }
  dispatch_simt(p, true, ctx.stream);
}

}  // namespace mf::cuda
