// Tiled float attention for the CPU backend (declared in ref_ops.h).
//
// The row-at-a-time loops in ref_ops.h compute each score as a serial dot product of length hd.
// A float reduction cannot be reordered, so the compiler leaves it scalar and every add waits for
// the one before. Here a tile of rows shares one transposed block of keys (or queries), and the
// inner loops run across independent scores, so they vectorise while each single score still
// adds its hd products in the same order. Every other operation (scale, max, exp, the running
// sums and the accumulations into dq, dk, dv) happens in the same order as in the row loops, so
// the results are bitwise equal to attention_fwd_rows / attention_bwd_rows<float>
// (tests/test_ops.cpp checks this on awkward shapes).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include "backend/cpu/ref_ops.h"

namespace mf::ref {
namespace {

constexpr int64_t kQTile = 16;   // query rows per forward / dq tile
constexpr int64_t kKTile = 16;   // key rows per dk/dv tile
constexpr int64_t kQChunk = 64;  // queries transposed at once in the dk/dv pass

// dst[c * ld + r] = rows[r][c] for r < n: rows r of a [.., stride] matrix, hd columns each.
inline void transpose_rows(const float* first, int64_t stride, int64_t n, int64_t hd, float* dst,
                           int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    const float* row = first + r * stride;
    for (int64_t c = 0; c < hd; ++c) dst[c * ld + r] = row[c];
  }
}

// out[j] = sum_c a[c] * bt[c * ld + j] for j in [j0, j1), c in order (a serial dot per j).
inline void dots(const float* a, const float* bt, int64_t ld, int64_t hd, int64_t j0, int64_t j1,
                 float* out) {
  for (int64_t j = j0; j < j1; ++j) out[j] = 0.0f;
  for (int64_t c = 0; c < hd; ++c) {
    const float ac = a[c];
    const float* b = bt + c * ld;
    for (int64_t j = j0; j < j1; ++j) out[j] += ac * b[j];
  }
}

}  // namespace

// One copy per vector width, picked at load time by the CPU's features (GCC/Clang function
// multi-versioning on x86-64). The build keeps FP contraction off for this file (CMakeLists.txt),
// so no clone fuses a multiply and an add and every clone gives the same bits.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MF_NO_CLONES)
#define MF_ATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MF_ATTN_CLONES
#endif

MF_ATTN_CLONES void attention_fwd_tiled(const float* q, const float* k, const float* v, float* out, float* lse,
                         const AttnDims& s, float scale) {
  const int64_t group = s.H / s.Hkv, hd = s.hd, T = s.T, KB = kAttnKeyBlock;
  const int64_t ntiles = (T + kQTile - 1) / kQTile;
  const int64_t items = s.B * s.H * ntiles;
#pragma omp parallel if (s.B * s.H * s.T * (s.T / 2 + 1) * hd >= kMinParallelWork)
  {
    std::vector<float> kt(size_t(hd * KB)), sc(size_t(kQTile * KB)), acc(size_t(kQTile * hd));
    std::vector<float> m(kQTile), l(kQTile);
    // The last tiles of a head see the most keys: hand them out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t bh = it / ntiles, tile = ntiles - 1 - it % ntiles;
      const int64_t b = bh / s.H, h = bh % s.H, g = h / group;
      const int64_t t0 = tile * kQTile, t1 = std::min(T, t0 + kQTile);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j0 = 0; j0 < t1; j0 += KB) {
        transpose_rows(k + s.kv_at(b, j0, g), s.Hkv * hd, std::min(t1, j0 + KB) - j0, hd,
                       kt.data(), KB);
        for (int64_t t = std::max(t0, j0); t < t1; ++t) {
          const int64_t i = t - t0, nj = std::min(t + 1, j0 + KB) - j0;
          float* si = sc.data() + i * KB;
          dots(q + s.q_at(b, t, h), kt.data(), KB, hd, 0, nj, si);
          float mb = m[size_t(i)];
          for (int64_t j = 0; j < nj; ++j) {
            si[j] = scale * si[j];
            mb = std::max(mb, si[j]);
          }
          const float corr = std::exp(m[size_t(i)] - mb);  // 0 on the first block (m = -inf)
          float li = l[size_t(i)] * corr;
          float* ai = acc.data() + i * hd;
          for (int64_t c = 0; c < hd; ++c) ai[c] *= corr;
          for (int64_t j = 0; j < nj; ++j) {
            const float p = std::exp(si[j] - mb);
            li += p;
            const float* vr = v + s.kv_at(b, j0 + j, g);
            for (int64_t c = 0; c < hd; ++c) ai[c] += p * vr[c];
          }
          l[size_t(i)] = li;
          m[size_t(i)] = mb;
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t - t0;
        float* o = out + s.q_at(b, t, h);
        const float inv_l = 1.0f / l[size_t(i)];
        for (int64_t c = 0; c < hd; ++c) o[c] = acc[size_t(i * hd + c)] * inv_l;
        lse[s.row_at(b, h, t)] = m[size_t(i)] + std::log(l[size_t(i)]);
      }
    }
  }
}

namespace {

#if defined(__GNUC__) || defined(__clang__)
#define MF_ALWAYS_INLINE inline __attribute__((always_inline))  // compiled into each clone
#define MF_LAMBDA_INLINE __attribute__((always_inline))
#else
#define MF_ALWAYS_INLINE inline
#define MF_LAMBDA_INLINE
#endif

// Per-thread scratch of one query tile's backward.
struct DqScratch {
  std::vector<float> kt, vt, acc, P, dS;
  explicit DqScratch(int64_t hd)
      : kt(size_t(hd * kAttnKeyBlock)), vt(size_t(hd * kAttnKeyBlock)), acc(size_t(kQTile * hd)),
        P(size_t(kQTile * kAttnKeyBlock)), dS(size_t(kQTile * kAttnKeyBlock)) {}
};

// The backward of query rows [t0, t1) of head h: Dt[t - t0] (=) rowsum(dO * O) of row t, then,
// key block by key block, each row's probabilities P and dS (kept in w.P / w.dS, row i at
// i * kAttnKeyBlock, valid for keys j <= t) added into dq in key order; on_block(j0, jn) runs
// after each block (the fused pass accumulates dk, dv from P and dS there). Writes dq's rows.
template <class OnBlock>
MF_ALWAYS_INLINE void dq_tile(const float* dout, const float* q, const float* k, const float* v,
                              const float* out, const float* lse, float* dq, const AttnDims& s,
                              float scale, int64_t b, int64_t h, int64_t t0, int64_t t1,
                              DqScratch& w, float* Dt, OnBlock on_block) {
  const int64_t hd = s.hd, g = h / (s.H / s.Hkv), KB = kAttnKeyBlock;
  for (int64_t t = t0; t < t1; ++t)
    Dt[t - t0] = dot(dout + s.q_at(b, t, h), out + s.q_at(b, t, h), hd);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  for (int64_t j0 = 0; j0 < t1; j0 += KB) {
    const int64_t jn = std::min(t1, j0 + KB) - j0;
    transpose_rows(k + s.kv_at(b, j0, g), s.Hkv * hd, jn, hd, w.kt.data(), KB);
    transpose_rows(v + s.kv_at(b, j0, g), s.Hkv * hd, jn, hd, w.vt.data(), KB);
    for (int64_t t = std::max(t0, j0); t < t1; ++t) {
      const int64_t i = t - t0, nj = std::min(t + 1, j0 + KB) - j0;
      float* pi = w.P.data() + i * KB;
      float* di = w.dS.data() + i * KB;
      dots(q + s.q_at(b, t, h), w.kt.data(), KB, hd, 0, nj, pi);
      dots(dout + s.q_at(b, t, h), w.vt.data(), KB, hd, 0, nj, di);
      const float L = lse[s.row_at(b, h, t)], Di = Dt[i];
      float* ai = w.acc.data() + i * hd;
      for (int64_t j = 0; j < nj; ++j) {
        const float p = std::exp(scale * pi[j] - L);
        const float ds = p * (di[j] - Di);
        pi[j] = p;
        di[j] = ds;
        const float* kr = k + s.kv_at(b, j0 + j, g);
        for (int64_t c = 0; c < hd; ++c) ai[c] += ds * kr[c];
      }
    }
    on_block(j0, jn);
  }
  for (int64_t t = t0; t < t1; ++t) {
    float* o = dq + s.q_at(b, t, h);
    const float* ai = w.acc.data() + (t - t0) * hd;
    for (int64_t c = 0; c < hd; ++c) o[c] = scale * ai[c];
  }
}

// Backward in one pass per (batch, kv head): each probability and dS is computed once and feeds
// dq (by query row) and dk, dv (by key row). Each output still adds its terms in the row loops'
// order: dq over keys ascending; dk, dv over the group's heads, then queries ascending.
MF_ATTN_CLONES void attention_bwd_fused(const float* dout, const float* q, const float* k,
                                        const float* v, const float* out, const float* lse,
                                        float* dq, float* dk, float* dv, const AttnDims& s,
                                        float scale) {
  const int64_t group = s.H / s.Hkv, hd = s.hd, T = s.T, KB = kAttnKeyBlock;
  const int64_t items = s.B * s.Hkv;
#pragma omp parallel if (s.B * s.H * s.T * (s.T / 2 + 1) * hd >= kMinParallelWork)
  {
    DqScratch w(hd);
    std::vector<float> Dt(kQTile), ak(size_t(T * hd)), av(size_t(T * hd));
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / s.Hkv, g = it % s.Hkv;
      std::fill(ak.begin(), ak.end(), 0.0f);
      std::fill(av.begin(), av.end(), 0.0f);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t t0 = 0; t0 < T; t0 += kQTile) {
          const int64_t t1 = std::min(T, t0 + kQTile);
          // dk, dv of the block's keys from the rows' P and dS, queries in order.
          dq_tile(dout, q, k, v, out, lse, dq, s, scale, b, h, t0, t1, w, Dt.data(),
                  [=, &ak, &av, &w](int64_t j0, int64_t jn) MF_LAMBDA_INLINE {
                    const float* P = w.P.data();
                    const float* dS = w.dS.data();
                    for (int64_t j = 0; j < jn; ++j) {
                      float* akj = ak.data() + (j0 + j) * hd;
                      float* avj = av.data() + (j0 + j) * hd;
                      for (int64_t t = std::max(t0, j0 + j); t < t1; ++t) {
                        const int64_t i = t - t0;
                        const float* qr = q + s.q_at(b, t, h);
                        const float* dor = dout + s.q_at(b, t, h);
                        const float ds = dS[i * KB + j], p = P[i * KB + j];
                        for (int64_t c = 0; c < hd; ++c) akj[c] += ds * qr[c];
                        for (int64_t c = 0; c < hd; ++c) avj[c] += p * dor[c];
                      }
                    }
                  });
        }
      }
      for (int64_t j = 0; j < T; ++j) {
        float* ok = dk + s.kv_at(b, j, g);
        float* ov = dv + s.kv_at(b, j, g);
        for (int64_t c = 0; c < hd; ++c) {
          ok[c] = scale * ak[size_t(j * hd + c)];
          ov[c] = av[size_t(j * hd + c)];
        }
      }
    }
  }
}

}  // namespace

MF_ATTN_CLONES void attention_bwd_tiled(const float* dout, const float* q, const float* k,
                                        const float* v, const float* out, const float* lse,
                                        float* dq, float* dk, float* dv, const AttnDims& s,
                                        float scale, AttnBwdPath path) {
  // The fused pass has B * Hkv work items: take it when that keeps every thread busy.
  if (path == AttnBwdPath::Fused ||
      (path == AttnBwdPath::Auto && s.B * s.Hkv >= 4 * int64_t(omp_get_max_threads()))) {
    attention_bwd_fused(dout, q, k, v, out, lse, dq, dk, dv, s, scale);
    return;
  }
  const int64_t group = s.H / s.Hkv, hd = s.hd, T = s.T;
  std::vector<float> D(size_t(s.B * s.H * T));
  // Pass 1: dq, by tiles of query rows (and D = rowsum(dO * O) for pass 2).
  const int64_t ntiles = (T + kQTile - 1) / kQTile;
  const int64_t qitems = s.B * s.H * ntiles;
#pragma omp parallel if (s.B * s.H * s.T * (s.T / 2 + 1) * hd >= kMinParallelWork)
  {
    DqScratch w(hd);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < qitems; ++it) {
      const int64_t bh = it / ntiles, tile = ntiles - 1 - it % ntiles;
      const int64_t b = bh / s.H, h = bh % s.H;
      const int64_t t0 = tile * kQTile, t1 = std::min(T, t0 + kQTile);
      dq_tile(dout, q, k, v, out, lse, dq, s, scale, b, h, t0, t1, w,
              D.data() + s.row_at(b, h, t0), [](int64_t, int64_t) {});
    }
  }
  // Pass 2: dk, dv, by tiles of key rows; each key sums its group's heads, then queries in order.
  const int64_t nktiles = (T + kKTile - 1) / kKTile;
  const int64_t kitems = s.B * s.Hkv * nktiles;
#pragma omp parallel if (s.B * s.Hkv * s.T * (s.T / 2 + 1) * hd * group >= kMinParallelWork)
  {
    std::vector<float> qt(size_t(hd * kQChunk)), dot_t(size_t(hd * kQChunk));
    std::vector<float> sc(static_cast<size_t>(kQChunk)), dp(static_cast<size_t>(kQChunk));
    std::vector<float> ak(size_t(kKTile * hd)), av(size_t(kKTile * hd));
    // The first key tiles see the most queries; items come in that order.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < kitems; ++it) {
      const int64_t bg = it / nktiles, tile = it % nktiles;
      const int64_t b = bg / s.Hkv, g = bg % s.Hkv;
      const int64_t j0 = tile * kKTile, j1 = std::min(T, j0 + kKTile);
      std::fill(ak.begin(), ak.end(), 0.0f);
      std::fill(av.begin(), av.end(), 0.0f);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t ta = j0; ta < T; ta += kQChunk) {
          const int64_t nt = std::min(T, ta + kQChunk) - ta;
          transpose_rows(q + s.q_at(b, ta, h), s.H * hd, nt, hd, qt.data(), kQChunk);
          transpose_rows(dout + s.q_at(b, ta, h), s.H * hd, nt, hd, dot_t.data(), kQChunk);
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t first = std::max(ta, j) - ta;  // queries t >= j only
            if (first >= nt) continue;
            const float* kr = k + s.kv_at(b, j, g);
            const float* vr = v + s.kv_at(b, j, g);
            dots(kr, qt.data(), kQChunk, hd, first, nt, sc.data());
            dots(vr, dot_t.data(), kQChunk, hd, first, nt, dp.data());
            float* akj = ak.data() + (j - j0) * hd;
            float* avj = av.data() + (j - j0) * hd;
            for (int64_t i = first; i < nt; ++i) {
              const int64_t t = ta + i, r = s.row_at(b, h, t);
              const float p = std::exp(scale * sc[size_t(i)] - lse[r]);
              const float ds = p * (dp[size_t(i)] - D[size_t(r)]);
              const float* qr = q + s.q_at(b, t, h);
              const float* dor = dout + s.q_at(b, t, h);
              for (int64_t c = 0; c < hd; ++c) akj[c] += ds * qr[c];
              for (int64_t c = 0; c < hd; ++c) avj[c] += p * dor[c];
            }
          }
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        float* ok = dk + s.kv_at(b, j, g);
        float* ov = dv + s.kv_at(b, j, g);
        for (int64_t c = 0; c < hd; ++c) {
          ok[c] = scale * ak[size_t((j - j0) * hd + c)];
          ov[c] = av[size_t((j - j0) * hd + c)];
        }
      }
    }
  }
}

}  // namespace mf::ref
