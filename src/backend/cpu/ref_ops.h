// The math of every model op, written once as templates on the scalar type T.
//
// CpuBackend calls the T=float instantiations (after checking its arguments); the op tests call
// the T=double ones for finite-difference gradient checks and as the reference the float and
// CUDA backends are compared against. No argument checking here: callers pass valid sizes.
//
// Parallelism: OpenMP over independent outputs only (rows, column blocks, query rows, key rows),
// never atomics or thread-count-dependent reductions, so results are deterministic and do not
// depend on the number of threads. Long row reductions accumulate in double.
//
// GEMMs go through ref::gemm<T>: plain loops for double, OpenBLAS sgemm for float (the float
// specialization below: slabs of C on the OpenMP threads, the same bits for any thread count).
// Called inside an OpenMP parallel region (Newton-Schulz over a stack of matrices, one per
// thread), ref::gemm runs its slabs on the calling thread: the same bits.
#pragma once
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/error.h"

namespace mf::ref {

// Below this much work (elements or multiply-adds) an op runs on one thread: forking a team
// costs more than it saves, and a lot more on an oversubscribed machine.
constexpr int64_t kMinParallelWork = int64_t(1) << 15;
// Column block of the ops that reduce over rows (embedding_bwd, rmsnorm_bwd's dw): each thread
// owns whole columns and walks the rows in order.
constexpr int64_t kColBlock = 64;
// Keys processed per online-softmax step in attention_fwd.
constexpr int64_t kAttnKeyBlock = 64;
// lmhead_xent holds at most about this many logits at once (>= kXentMinRows rows).
constexpr int64_t kXentChunkElems = int64_t(1) << 22;
constexpr int64_t kXentMinRows = 64;

// Sum of f(p[i]) in double with a fixed association: chunks of 4096 summed in index order, so
// the result is bitwise the same for any thread count (an exact resume, and the grad norm and
// Muon's normalisation matching between runs, rely on it).
template <class F>
double ordered_sum(const float* p, int64_t n, F f) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = n > 0 ? (n + kChunk - 1) / kChunk : 0;
  std::vector<double> part(size_t(chunks), 0.0);
#pragma omp parallel for schedule(static) if (n >= kMinParallelWork)
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) s += f(double(p[i]));
    part[size_t(c)] = s;
  }
  double s = 0;
  for (double v : part) s += v;
  return s;
}

inline double ordered_sum_squares(const float* p, int64_t n) {
  return ordered_sum(p, n, [](double v) { return v * v; });
}

// ---- GEMM -------------------------------------------------------------------------------------
// C[M,N] (=) alpha * op(A) op(B) + beta * C, row-major, op(A) [M,K], op(B) [K,N]. With beta == 0
// C is not read (it may hold garbage), as in BLAS.
template <class T>
void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
#pragma omp parallel for schedule(static) if (M * N * K >= kMinParallelWork)
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      T acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const T a = transA ? A[k * lda + i] : A[i * lda + k];
        const T b = transB ? B[j * ldb + k] : B[k * ldb + j];
        acc += a * b;
      }
      T& c = C[i * ldc + j];
      c = beta == T(0) ? alpha * acc : alpha * acc + beta * c;
    }
  }
}

// The float GEMM's slabs: C is cut into slabs of whole rows (or, when it is wider than tall,
// whole columns), one single-threaded sgemm each, run by the OpenMP threads. The slab width
// depends on the shape only, so the result does not depend on the number of threads (a slab's
// elements are computed by the same sgemm call whatever thread runs it). Widths are multiples of
// 32 between 64 and 256, about an eighth of the split dimension; shapes below kGemmSlabWork
// multiply-adds are one call. OpenBLAS runs single-threaded (CpuBackend): its own pool and our
// OpenMP threads spin against each other. With OPENBLAS_NUM_THREADS > 1 the slabs run one after
// another and BLAS threads each (the same bits).
constexpr int64_t kGemmSlabWork = int64_t(1) << 20;
inline int64_t gemm_slab(int64_t dim) {
  return std::clamp<int64_t>((dim / 8 + 31) / 32 * 32, 64, 256);
}
bool blas_threaded();  // cpu_memory.cpp: OPENBLAS_NUM_THREADS > 1

template <>
inline void gemm<float>(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
                        const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                        float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS implementations disagree on lda checks for K = 0: do it by hand
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  for (int64_t v : {M, N, K, lda, ldb, ldc})
    MF_CHECK(v <= INT_MAX, "sgemm dimension ", v, " exceeds the 32-bit BLAS interface");
  const CBLAS_TRANSPOSE ta = transA ? CblasTrans : CblasNoTrans, tb = transB ? CblasTrans : CblasNoTrans;
  const bool by_rows = M >= N;
  const int64_t dim = by_rows ? M : N, slab = gemm_slab(dim);
  const int64_t slabs = M * N * K < kGemmSlabWork ? 1 : (dim + slab - 1) / slab;
  if (slabs == 1) {
    cblas_sgemm(CblasRowMajor, ta, tb, int(M), int(N), int(K), alpha, A, int(lda), B, int(ldb), beta,
                C, int(ldc));
    return;
  }
#pragma omp parallel for schedule(static) if (!blas_threaded())
  for (int64_t s = 0; s < slabs; ++s) {
    const int64_t lo = s * slab, n = std::min(dim, lo + slab) - lo;
    if (by_rows) {  // rows lo.. of op(A) and C
      const float* a = transA ? A + lo : A + lo * lda;
      cblas_sgemm(CblasRowMajor, ta, tb, int(n), int(N), int(K), alpha, a, int(lda), B, int(ldb), beta,
                  C + lo * ldc, int(ldc));
    } else {  // columns lo.. of op(B) and C
      const float* b = transB ? B + lo * ldb : B + lo;
      cblas_sgemm(CblasRowMajor, ta, tb, int(M), int(n), int(K), alpha, A, int(lda), b, int(ldb), beta,
                  C + lo, int(ldc));
    }
  }
}

// ---- embedding --------------------------------------------------------------------------------
// out[n,:] (=) wte[tok[n],:]
template <class T>
void embedding_fwd(const int32_t* tok, const T* wte, int64_t N, int64_t d, T* out) {
#pragma omp parallel for schedule(static) if (N * d >= kMinParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* src = wte + int64_t(tok[n]) * d;
    T* dst = out + n * d;
    for (int64_t c = 0; c < d; ++c) dst[c] = src[c];
  }
}

// dwte[tok[n],:] (+=) dout[n,:]; tokens are visited in order n = 0..N-1 for every column, so
// repeated tokens accumulate in a fixed order.
template <class T>
void embedding_bwd(const int32_t* tok, const T* dout, int64_t N, int64_t d, T* dwte) {
  const int64_t nblk = (d + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (N * d >= kMinParallelWork)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * kColBlock, c1 = std::min(d, c0 + kColBlock);
    for (int64_t n = 0; n < N; ++n) {
      T* row = dwte + int64_t(tok[n]) * d;
      const T* g = dout + n * d;
      for (int64_t c = c0; c < c1; ++c) row[c] += g[c];
    }
  }
}

// ---- RMSNorm with fused residual add ----------------------------------------------------------
// r = rin (+ branch); rout (=) r (rout may alias rin); rstd[n] (=) 1/sqrt(mean(r^2) + eps);
// y (=) r * rstd * w.   rin, branch, rout, y [N,d]; w [d]; rstd [N]
template <class T>
void add_rmsnorm_fwd(const T* rin, const T* branch, T* rout, const T* w, int64_t N, int64_t d,
                     T eps, T* y, T* rstd) {
#pragma omp parallel for schedule(static) if (N * d >= kMinParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* a = rin + n * d;
    T* r = rout + n * d;
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) {
      const T v = branch ? T(a[c] + branch[n * d + c]) : a[c];
      r[c] = v;
      ss += double(v) * double(v);
    }
    const T rs = T(1.0 / std::sqrt(ss / double(d) + double(eps)));
    rstd[n] = rs;
    T* yr = y + n * d;
    for (int64_t c = 0; c < d; ++c) yr[c] = r[c] * rs * w[c];
  }
}

// Backward of y = x * rstd * w:  with r = rstd,
//   dx (+=) r * w * dy - x * r^3 / d * sum_c(dy_c w_c x_c);   dw (+=) sum_n dy * x * r.
template <class T>
void rmsnorm_bwd(const T* dy, const T* x, const T* w, const T* rstd, int64_t N, int64_t d, T* dx,
                 T* dw) {
#pragma omp parallel for schedule(static) if (N * d >= kMinParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dy + n * d;
    const T* xr = x + n * d;
    const T r = rstd[n];
    double dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += double(g[c]) * double(w[c]) * double(xr[c]);
    const T coef = T(dot * double(r) * double(r) * double(r) / double(d));
    T* o = dx + n * d;
    for (int64_t c = 0; c < d; ++c) o[c] += r * w[c] * g[c] - xr[c] * coef;
  }
  const int64_t nblk = (d + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (N * d >= kMinParallelWork)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t c0 = blk * kColBlock, c1 = std::min(d, c0 + kColBlock);
    double acc[kColBlock] = {};
    for (int64_t n = 0; n < N; ++n) {
      const double r = double(rstd[n]);
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += double(dy[n * d + c]) * double(x[n * d + c]) * r;
    }
    for (int64_t c = c0; c < c1; ++c) dw[c] += T(acc[c - c0]);
  }
}

// ---- linear -----------------------------------------------------------------------------------
// y (=) x W^T.   x [N,in], W [out,in], y [N,out]
template <class T>
void matmul_fwd(const T* x, const T* W, int64_t N, int64_t in, int64_t out, T* y) {
  gemm<T>(false, true, N, out, in, T(1), x, in, W, in, T(0), y, out);
}

// dx (= or += when accumulate_dx) dy W;  dW (+=) dy^T x.  dx or dW may be null.
template <class T>
void matmul_bwd(const T* dy, const T* x, const T* W, int64_t N, int64_t in, int64_t out, T* dx,
                T* dW, bool accumulate_dx) {
  if (dx) gemm<T>(false, false, N, in, out, T(1), dy, out, W, in, T(accumulate_dx ? 1 : 0), dx, in);
  if (dW) gemm<T>(true, false, out, in, N, T(1), dy, out, x, in, T(1), dW, in);
}

// ---- rotary embedding -------------------------------------------------------------------------
// Hugging Face rotate-half RoPE at positions t = 0..T-1 over x [B,T,H,hd] (y may alias x).
// inv_freq_i = theta^(-2i/hd) is computed in double and rounded to T (as HF keeps it in the
// model's dtype); the angle and its cos/sin are computed in double. inverse = true applies the
// transposed (inverse) rotation, which is the backward. ldx, ldy: elements from one position
// (b,t) to the next (H*hd when contiguous; the row width of a packed qkv when x or y is a part
// of one).
template <class T>
void rope_strided(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t B, int64_t Tn, int64_t H,
                  int64_t hd, double theta, bool inverse) {
  const int64_t half = hd / 2;
  std::vector<T> cs(size_t(Tn * half)), sn(size_t(Tn * half));
  for (int64_t i = 0; i < half; ++i) {
    const T inv_freq = T(std::pow(theta, -2.0 * double(i) / double(hd)));
    for (int64_t t = 0; t < Tn; ++t) {
      const double f = double(t) * double(inv_freq);
      cs[t * half + i] = T(std::cos(f));
      sn[t * half + i] = T(inverse ? -std::sin(f) : std::sin(f));
    }
  }
  const int64_t rows = B * Tn * H;
#pragma omp parallel for schedule(static) if (rows * hd >= kMinParallelWork)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t bt = row / H, h = row % H, t = bt % Tn;
    const T* c = cs.data() + t * half;
    const T* s = sn.data() + t * half;
    const T* xr = x + bt * ldx + h * hd;
    T* yr = y + bt * ldy + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const T a = xr[i], b = xr[i + half];
      yr[i] = a * c[i] - b * s[i];
      yr[i + half] = b * c[i] + a * s[i];
    }
  }
}
template <class T>
void rope(const T* x, T* y, int64_t B, int64_t Tn, int64_t H, int64_t hd, double theta,
          bool inverse) {
  rope_strided(x, H * hd, y, H * hd, B, Tn, H, hd, theta, inverse);
}

// The packed projections: qkv [B,T,H+2Hkv,hd] (one GEMM against [Wq; Wk; Wv]) holds per position
// H query heads, then Hkv key heads, then Hkv value heads. Split: q [B,T,H,hd] (=) rope(q part),
// k [B,T,Hkv,hd] (=) rope(k part), v (=) v part. Merge (the backward): dqkv (=) [rope^T(dq) |
// rope^T(dk) | dv] per position.
template <class T>
void qkv_rope_split(const T* qkv, T* q, T* k, T* v, int64_t B, int64_t Tn, int64_t H,
                    int64_t Hkv, int64_t hd, double theta) {
  const int64_t W = (H + 2 * Hkv) * hd, kvd = Hkv * hd;
  rope_strided(qkv, W, q, H * hd, B, Tn, H, hd, theta, false);
  rope_strided(qkv + H * hd, W, k, kvd, B, Tn, Hkv, hd, theta, false);
  for (int64_t bt = 0; bt < B * Tn; ++bt)
    std::copy(qkv + bt * W + (H + Hkv) * hd, qkv + bt * W + W, v + bt * kvd);
}
template <class T>
void qkv_rope_merge_bwd(const T* dq, const T* dk, const T* dv, T* dqkv, int64_t B, int64_t Tn,
                        int64_t H, int64_t Hkv, int64_t hd, double theta) {
  const int64_t W = (H + 2 * Hkv) * hd, kvd = Hkv * hd;
  rope_strided(dq, H * hd, dqkv, W, B, Tn, H, hd, theta, true);
  rope_strided(dk, kvd, dqkv + H * hd, W, B, Tn, Hkv, hd, theta, true);
  for (int64_t bt = 0; bt < B * Tn; ++bt)
    std::copy(dv + bt * kvd, dv + bt * kvd + kvd, dqkv + bt * W + (H + Hkv) * hd);
}

// ---- causal grouped-query attention -----------------------------------------------------------
// q, out [B,T,H,hd]; k, v [B,T,Hkv,hd]; lse [B,H,T]. Query head h reads kv head h / (H/Hkv).
struct AttnDims {
  int64_t B, T, H, Hkv, hd;
  int64_t q_at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * hd; }
  int64_t kv_at(int64_t b, int64_t t, int64_t g) const { return ((b * T + t) * Hkv + g) * hd; }
  int64_t row_at(int64_t b, int64_t h, int64_t t) const { return (b * H + h) * T + t; }
};

template <class T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The float path (CpuBackend) runs tiled versions of the two attention functions below
// (attention_tiled.cpp): the same operations in the same order, rearranged so that the compiler
// can vectorise them, and bitwise equal to these row-at-a-time loops (tests/test_ops.cpp).
void attention_fwd_tiled(const float* q, const float* k, const float* v, float* out, float* lse,
                         const AttnDims& s, float scale);
// Auto: one fused pass per (batch, kv head) when there are enough of them for the threads, else
// a dq pass by query tiles and a dk/dv pass by key tiles. Both give the same bits.
enum class AttnBwdPath { Auto, TwoPass, Fused };
void attention_bwd_tiled(const float* dout, const float* q, const float* k, const float* v,
                         const float* out, const float* lse, float* dq, float* dk, float* dv,
                         const AttnDims& s, float scale, AttnBwdPath path = AttnBwdPath::Auto);

// Flash-style forward: for each (b, h, query t) an online softmax over key blocks of
// kAttnKeyBlock keys j <= t, so only one block of scores is ever held.
template <class T>
void attention_fwd_rows(const T* q, const T* k, const T* v, T* out, T* lse, const AttnDims& s, T scale) {
  const int64_t group = s.H / s.Hkv, hd = s.hd;
  const int64_t items = s.B * s.H * s.T;
#pragma omp parallel if (items * (s.T / 2 + 1) * hd >= kMinParallelWork)
  {
    std::vector<T> acc(static_cast<size_t>(hd)), sc(static_cast<size_t>(kAttnKeyBlock));
    // Row t costs O(t): dynamic scheduling balances the causal triangle. Rows are independent,
    // so the result does not depend on the schedule.
#pragma omp for schedule(dynamic, 8)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / (s.H * s.T), h = (it / s.T) % s.H, t = it % s.T, g = h / group;
      const T* qr = q + s.q_at(b, t, h);
      T m = -std::numeric_limits<T>::infinity(), l = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = 0; j0 <= t; j0 += kAttnKeyBlock) {
        const int64_t j1 = std::min(t + 1, j0 + kAttnKeyBlock);
        T mb = m;
        for (int64_t j = j0; j < j1; ++j) {
          sc[j - j0] = scale * dot(qr, k + s.kv_at(b, j, g), hd);
          mb = std::max(mb, sc[j - j0]);
        }
        const T corr = std::exp(m - mb);  // 0 on the first block (m = -inf)
        l *= corr;
        for (int64_t c = 0; c < hd; ++c) acc[c] *= corr;
        for (int64_t j = j0; j < j1; ++j) {
          const T p = std::exp(sc[j - j0] - mb);
          l += p;
          const T* vr = v + s.kv_at(b, j, g);
          for (int64_t c = 0; c < hd; ++c) acc[c] += p * vr[c];
        }
        m = mb;
      }
      T* o = out + s.q_at(b, t, h);
      const T inv_l = T(1) / l;
      for (int64_t c = 0; c < hd; ++c) o[c] = acc[c] * inv_l;
      lse[s.row_at(b, h, t)] = m + std::log(l);
    }
  }
}

// Backward, recomputing the probabilities P = exp(scale q.k - lse):
//   dP = dO V^T,  D = rowsum(dO * O),  dS = P * (dP - D),
//   dq (=) scale dS K,  dk (=) scale dS^T Q,  dv (=) P^T dO,
// dk/dv summed over the query heads of their group. Two passes with no shared writes: dq by
// query row, then dk/dv by key row (heads of the group, then queries, in a fixed order).
template <class T>
void attention_bwd_rows(const T* dout, const T* q, const T* k, const T* v, const T* out,
                        const T* lse, T* dq, T* dk, T* dv, const AttnDims& s, T scale) {
  const int64_t group = s.H / s.Hkv, hd = s.hd;
  std::vector<T> D(size_t(s.B * s.H * s.T));
  const int64_t qitems = s.B * s.H * s.T;
#pragma omp parallel if (qitems * (s.T / 2 + 1) * hd >= kMinParallelWork)
  {
    std::vector<T> acc(static_cast<size_t>(hd));
#pragma omp for schedule(dynamic, 8)
    for (int64_t it = 0; it < qitems; ++it) {
      const int64_t b = it / (s.H * s.T), h = (it / s.T) % s.H, t = it % s.T, g = h / group;
      const T* qr = q + s.q_at(b, t, h);
      const T* dor = dout + s.q_at(b, t, h);
      const T Dt = dot(dor, out + s.q_at(b, t, h), hd);
      const T L = lse[s.row_at(b, h, t)];
      D[size_t(s.row_at(b, h, t))] = Dt;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j = 0; j <= t; ++j) {
        const T* kr = k + s.kv_at(b, j, g);
        const T p = std::exp(scale * dot(qr, kr, hd) - L);
        const T ds = p * (dot(dor, v + s.kv_at(b, j, g), hd) - Dt);
        for (int64_t c = 0; c < hd; ++c) acc[c] += ds * kr[c];
      }
      T* o = dq + s.q_at(b, t, h);
      for (int64_t c = 0; c < hd; ++c) o[c] = scale * acc[c];
    }
  }
  const int64_t kitems = s.B * s.Hkv * s.T;
#pragma omp parallel if (kitems * (s.T / 2 + 1) * hd * group >= kMinParallelWork)
  {
    std::vector<T> ak(static_cast<size_t>(hd)), av(static_cast<size_t>(hd));
#pragma omp for schedule(dynamic, 8)
    for (int64_t it = 0; it < kitems; ++it) {
      const int64_t b = it / (s.Hkv * s.T), g = (it / s.T) % s.Hkv, j = it % s.T;
      const T* kr = k + s.kv_at(b, j, g);
      const T* vr = v + s.kv_at(b, j, g);
      std::fill(ak.begin(), ak.end(), T(0));
      std::fill(av.begin(), av.end(), T(0));
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t t = j; t < s.T; ++t) {
          const T* qr = q + s.q_at(b, t, h);
          const T* dor = dout + s.q_at(b, t, h);
          const int64_t r = s.row_at(b, h, t);
          const T p = std::exp(scale * dot(qr, kr, hd) - lse[r]);
          const T ds = p * (dot(dor, vr, hd) - D[size_t(r)]);
          for (int64_t c = 0; c < hd; ++c) {
            ak[c] += ds * qr[c];
            av[c] += p * dor[c];
          }
        }
      }
      T* ok = dk + s.kv_at(b, j, g);
      T* ov = dv + s.kv_at(b, j, g);
      for (int64_t c = 0; c < hd; ++c) {
        ok[c] = scale * ak[c];
        ov[c] = av[c];
      }
    }
  }
}

template <class T>
void attention_fwd(const T* q, const T* k, const T* v, T* out, T* lse, const AttnDims& s, T scale) {
  if constexpr (std::is_same_v<T, float>)
    attention_fwd_tiled(q, k, v, out, lse, s, scale);
  else
    attention_fwd_rows(q, k, v, out, lse, s, scale);
}

template <class T>
void attention_bwd(const T* dout, const T* q, const T* k, const T* v, const T* out, const T* lse,
                   T* dq, T* dk, T* dv, const AttnDims& s, T scale) {
  if constexpr (std::is_same_v<T, float>)
    attention_bwd_tiled(dout, q, k, v, out, lse, dq, dk, dv, s, scale);
  else
    attention_bwd_rows(dout, q, k, v, out, lse, dq, dk, dv, s, scale);
}

// ---- SwiGLU -----------------------------------------------------------------------------------
// h = silu(g) * u, silu(x) = x * sigmoid(x); its gradients dg = dh * u * sig * (1 + g (1 - sig)),
// du = dh * silu(g). One element each, so the flat and the packed forms share the formulas.
template <class T>
inline T swiglu_elem(T g, T u) {
  return g / (T(1) + std::exp(-g)) * u;
}
template <class T>
inline void swiglu_elem_bwd(T d, T g, T u, T& dg, T& du) {
  const T sig = T(1) / (T(1) + std::exp(-g));
  dg = d * u * sig * (T(1) + g * (T(1) - sig));
  du = d * g * sig;
}

// h (=) silu(gate) * up over n elements.
template <class T>
void swiglu_fwd(const T* gate, const T* up, int64_t n, T* h) {
#pragma omp parallel for schedule(static) if (n >= kMinParallelWork)
  for (int64_t i = 0; i < n; ++i) h[i] = swiglu_elem(gate[i], up[i]);
}

// dgate (=), dup (=).  Outputs may alias dh.
template <class T>
void swiglu_bwd(const T* dh, const T* gate, const T* up, int64_t n, T* dgate, T* dup) {
#pragma omp parallel for schedule(static) if (n >= kMinParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    T dg, du;
    swiglu_elem_bwd(dh[i], gate[i], up[i], dg, du);
    dgate[i] = dg;
    dup[i] = du;
  }
}

// Packed: gu [N,2f] holds gate in columns [0,f) and up in [f,2f); h [N,f] (=).
template <class T>
void swiglu_packed_fwd(const T* gu, int64_t N, int64_t f, T* h) {
#pragma omp parallel for schedule(static) if (N * f >= kMinParallelWork)
  for (int64_t r = 0; r < N; ++r) {
    const T* g = gu + r * 2 * f;
    for (int64_t j = 0; j < f; ++j) h[r * f + j] = swiglu_elem(g[j], g[f + j]);
  }
}

// dgu [N,2f] (=): dgate in columns [0,f), dup in [f,2f). dh [N,f].
template <class T>
void swiglu_packed_bwd(const T* dh, const T* gu, int64_t N, int64_t f, T* dgu) {
#pragma omp parallel for schedule(static) if (N * f >= kMinParallelWork)
  for (int64_t r = 0; r < N; ++r) {
    const T* g = gu + r * 2 * f;
    T* dg = dgu + r * 2 * f;
    for (int64_t j = 0; j < f; ++j) swiglu_elem_bwd(dh[r * f + j], g[j], g[f + j], dg[j], dg[f + j]);
  }
}

// ---- fused lm-head + softmax cross-entropy ----------------------------------------------------
// Rows per chunk of logits: about kXentChunkElems logits, at least kXentMinRows rows.
inline int64_t xent_chunk_rows(int64_t N, int64_t V) {
  return std::max<int64_t>(1, std::min(N, std::max(kXentMinRows, kXentChunkElems / std::max<int64_t>(V, 1))));
}

// logits = logit_scale * x W^T, one chunk of rows at a time (never N*V at once);
// losses[n] (=) logsumexp(logits[n]) - logits[n, tgt[n]].  If dx / dW are non-null, gradients of
// loss_scale * sum_n losses[n]:  dlogits = loss_scale * logit_scale * (softmax - onehot),
// dx (=) dlogits W,  dW (+=) dlogits^T x.   x [N,d], W [V,d], tgt [N], losses [N].
// chunk_rows > 0 overrides the chunk size (the tests use it to cross chunk boundaries cheaply).
template <class T>
void lmhead_xent(const T* x, const T* W, const int32_t* tgt, int64_t N, int64_t d, int64_t V,
                 T logit_scale, T* losses, T* dx, T* dW, T loss_scale, int64_t chunk_rows = 0) {
  const int64_t R = chunk_rows > 0 ? std::min(chunk_rows, std::max<int64_t>(N, 1))
                                   : xent_chunk_rows(N, V);
  std::vector<T> logits(size_t(R * V));
  const bool grads = dx || dW;
  const T gscale = loss_scale * logit_scale;
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const T* xc = x + r0 * d;
    gemm<T>(false, true, rows, V, d, logit_scale, xc, d, W, d, T(0), logits.data(), V);
#pragma omp parallel for schedule(static) if (rows * V >= kMinParallelWork)
    for (int64_t r = 0; r < rows; ++r) {
      T* z = logits.data() + r * V;
      T mx = z[0];
      for (int64_t j = 1; j < V; ++j) mx = std::max(mx, z[j]);
      double sum = 0;
      for (int64_t j = 0; j < V; ++j) sum += double(std::exp(z[j] - mx));
      const T lse = mx + T(std::log(sum));
      const int64_t y = tgt[r0 + r];
      losses[r0 + r] = lse - z[y];
      if (grads) {
        for (int64_t j = 0; j < V; ++j) z[j] = gscale * std::exp(z[j] - lse);
        z[y] -= gscale;
      }
    }
    if (dx) gemm<T>(false, false, rows, d, V, T(1), logits.data(), V, W, d, T(0), dx + r0 * d, d);
    if (dW) gemm<T>(true, false, V, d, rows, T(1), logits.data(), V, xc, d, T(1), dW, d);
  }
}

}  // namespace mf::ref
