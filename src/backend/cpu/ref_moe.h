// The math of the Mixture-of-Experts ops, written once as templates on the scalar type T
// (the contracts are the comments of the moe_* entries in backend/backend.h).
//
// CpuBackend calls the T=float instantiations after checking its arguments; tests/test_moe.cpp
// runs the T=double ones for finite-difference checks. No argument checking here.
//
// Determinism: OpenMP only over independent outputs (tokens, rows, experts); the plan
// (moe_permute) and the counts are sequential scans in token order; column sums walk the rows in
// order and accumulate in double. Nothing depends on the number of threads.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "backend/cpu/ref_ops.h"

namespace mf::ref {

struct MoeRoute {
  int64_t E = 0, k = 0;
  bool sigmoid = false;
  bool norm_topk = true;
  double route_scale = 1.0;
};

// Denominator guard of the top-k renormalisation (as DeepSeek-V3's reference code).
constexpr double kMoeNormEps = 1e-20;

// probs [N,E]: logits in, scores out (in place): softmax over each row, or sigmoid.
template <class T>
void moe_scores(T* probs, int64_t N, int64_t E, bool sigmoid) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* p = probs + n * E;
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) p[e] = T(1) / (T(1) + std::exp(-p[e]));
    } else {
      T mx = p[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, p[e]);
      double s = 0;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(p[e] - mx);
        s += double(p[e]);
      }
      const T inv = T(1.0 / s);
      for (int64_t e = 0; e < E; ++e) p[e] *= inv;
    }
  }
}

// Top-k selection and combine weights from probs [N,E] (see Backend::moe_router_fwd).
// bias [E] may be null. idx, w [N,k]; counts [E]; score_sum [E] (may be null).
template <class T>
void moe_topk(const T* probs, const T* bias, int64_t N, const MoeRoute& a, int32_t* idx, T* w,
              int32_t* counts, T* score_sum) {
  const int64_t E = a.E, k = a.k;
#pragma omp parallel
  {
    std::vector<char> taken(static_cast<size_t>(E));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* p = probs + n * E;
      std::fill(taken.begin(), taken.end(), char(0));
      int32_t* id = idx + n * k;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        T best_v = T(0);
        for (int64_t e = 0; e < E; ++e) {
          if (taken[size_t(e)]) continue;
          const T v = bias ? T(p[e] + bias[e]) : p[e];
          if (best < 0 || v > best_v) {  // strict: ties go to the lower index
            best = e;
            best_v = v;
          }
        }
        taken[size_t(best)] = 1;
        id[j] = int32_t(best);
      }
      T* wr = w + n * k;
      double s = 0;
      for (int64_t j = 0; j < k; ++j) s += double(p[id[j]]);
      const T scale = a.norm_topk ? T(a.route_scale / (s + kMoeNormEps)) : T(a.route_scale);
      for (int64_t j = 0; j < k; ++j) wr[j] = p[id[j]] * scale;
    }
  }
  std::fill(counts, counts + E, 0);
  for (int64_t i = 0; i < N * k; ++i) ++counts[idx[i]];
  if (!score_sum) return;
  // pn = probs (softmax) or probs / row sum (sigmoid); summed over tokens in order.
  std::vector<double> inv_row(static_cast<size_t>(N), 1.0);
  if (a.sigmoid) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t e = 0; e < E; ++e) s += double(probs[n * E + e]);
      inv_row[size_t(n)] = 1.0 / s;
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < E; ++e) {
    double s = 0;
    for (int64_t n = 0; n < N; ++n) s += double(probs[n * E + e]) * inv_row[size_t(n)];
    score_sum[e] = T(s);
  }
}

// Router forward: probs (=) score(x Wr^T), then moe_topk.  x [N,d], Wr [E,d].
template <class T>
void moe_router_fwd(const T* x, const T* Wr, const T* bias, int64_t N, int64_t d,
                    const MoeRoute& a, T* probs, int32_t* idx, T* w, int32_t* counts,
                    T* score_sum) {
  gemm<T>(false, true, N, a.E, d, T(1), x, d, Wr, d, T(0), probs, a.E);
  moe_scores(probs, N, a.E, a.sigmoid);
  moe_topk(probs, bias, N, a, idx, w, counts, score_sum);
}

// dlogits [N,E] (=) from dw [N,k] and aux_grad [E] (nullable):
//  weights:  w_j = rs a_j / D (D = sum_i a_i + eps) or rs a_j, a_j = p[idx_j];
//            da_j = rs (dw_j / D - sum_i dw_i a_i / D^2)  or rs dw_j;  dp[idx_j] += da_j
//  aux:      softmax dp += g;  sigmoid (pn = p / S): dp_e += (g_e - sum_i g_i pn_i) / S
//  scores:   softmax dl = p (dp - sum_e dp_e p_e);  sigmoid dl = dp p (1 - p)
template <class T>
void moe_route_bwd(const T* dw, const T* aux_grad, const T* probs, const int32_t* idx, int64_t N,
                   const MoeRoute& a, T* dlogits) {
  const int64_t E = a.E, k = a.k;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* p = probs + n * E;
    const int32_t* id = idx + n * k;
    const T* g = dw + n * k;
    T* dl = dlogits + n * E;  // holds dp first, then dlogits
    std::fill(dl, dl + E, T(0));
    const T rs = T(a.route_scale);
    if (a.norm_topk) {
      double s = 0, dot = 0;
      for (int64_t j = 0; j < k; ++j) {
        s += double(p[id[j]]);
        dot += double(g[j]) * double(p[id[j]]);
      }
      const double D = s + kMoeNormEps;
      const T c = T(dot / (D * D));
      const T invD = T(1.0 / D);
      for (int64_t j = 0; j < k; ++j) dl[id[j]] += rs * (g[j] * invD - c);
    } else {
      for (int64_t j = 0; j < k; ++j) dl[id[j]] += rs * g[j];
    }
    if (aux_grad) {
      if (a.sigmoid) {
        double S = 0, dot = 0;
        for (int64_t e = 0; e < E; ++e) S += double(p[e]);
        for (int64_t e = 0; e < E; ++e) dot += double(aux_grad[e]) * double(p[e]) / S;
        for (int64_t e = 0; e < E; ++e) dl[e] += T((double(aux_grad[e]) - dot) / S);
      } else {
        for (int64_t e = 0; e < E; ++e) dl[e] += aux_grad[e];
      }
    }
    if (a.sigmoid) {
      for (int64_t e = 0; e < E; ++e) dl[e] = dl[e] * p[e] * (T(1) - p[e]);
    } else {
      double dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += double(dl[e]) * double(p[e]);
      for (int64_t e = 0; e < E; ++e) dl[e] = p[e] * (dl[e] - T(dot));
    }
  }
}

// Router backward: dlogits (=), dx (+=) dlogits Wr, dWr (+=) dlogits^T x.
template <class T>
void moe_router_bwd(const T* dw, const T* aux_grad, const T* x, const T* Wr, const T* probs,
                    const int32_t* idx, int64_t N, int64_t d, const MoeRoute& a, T* dlogits,
                    T* dx, T* dWr) {
  moe_route_bwd(dw, aux_grad, probs, idx, N, a, dlogits);
  gemm<T>(false, false, N, d, a.E, T(1), dlogits, a.E, Wr, d, T(1), dx, d);
  gemm<T>(true, false, a.E, d, N, T(1), dlogits, a.E, x, d, T(1), dWr, d);
}

// Expert capacity rule shared by the model and the tests: ceil(factor * N * k / E), 0 when the
// factor is 0 (dropless).
inline int64_t moe_capacity(double factor, int64_t N, int64_t k, int64_t E) {
  if (factor <= 0) return 0;
  // At most N: an expert receives each token at most once (and no int64 overflow).
  return int64_t(std::min(double(N), std::ceil(factor * double(N) * double(k) / double(E))));
}

// Permutation plan (Backend::moe_permute). idx [N,k]; offsets [E+1]; row_of [N,k];
// row_token [N*k]. Sequential scans: token order within each expert by construction.
inline void moe_permute(const int32_t* idx, int64_t N, int64_t k, int64_t E, int64_t capacity,
                        int32_t* offsets, int32_t* row_of, int32_t* row_token) {
  std::vector<int64_t> cnt(static_cast<size_t>(E), 0), cur(static_cast<size_t>(E), 0);
  for (int64_t i = 0; i < N * k; ++i) ++cnt[size_t(idx[i])];
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t kept = capacity > 0 ? std::min(cnt[size_t(e)], capacity) : cnt[size_t(e)];
    offsets[e + 1] = int32_t(offsets[e] + kept);
  }
  std::fill(row_token, row_token + N * k, -1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[n * k + j];
      const int64_t pos = cur[size_t(e)]++;
      if (capacity > 0 && pos >= capacity) {
        row_of[n * k + j] = -1;
        continue;
      }
      const int64_t r = offsets[e] + pos;
      row_of[n * k + j] = int32_t(r);
      row_token[r] = int32_t(n);
    }
}

// xg[r,:] (=) x[row_token[r],:] for r < M; zeros where row_token[r] < 0 (a row past the kept).
template <class T>
void moe_gather(const T* x, const int32_t* row_token, int64_t M, int64_t d, T* xg) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < M; ++r) {
    if (row_token[r] < 0) {
      std::fill(xg + r * d, xg + (r + 1) * d, T(0));
      continue;
    }
    const T* src = x + int64_t(row_token[r]) * d;
    std::copy(src, src + d, xg + r * d);
  }
}

// dx[n,:] (+=) sum_j dxg[row_of[n,j],:], j in order.
template <class T>
void moe_gather_bwd(const T* dxg, const int32_t* row_of, int64_t N, int64_t k, int64_t d, T* dx) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* o = dx + n * d;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_of[n * k + j];
      if (r < 0) continue;
      const T* g = dxg + r * d;
      for (int64_t c = 0; c < d; ++c) o[c] += g[c];
    }
  }
}

// out[n,:] (= or +=) sum_j w[n,j] yg[row_of[n,j],:].
template <class T>
void moe_combine_fwd(const T* yg, const T* w, const int32_t* row_of, int64_t N, int64_t k,
                     int64_t d, T* out, bool accumulate) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * d;
    if (!accumulate) std::fill(o, o + d, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_of[n * k + j];
      if (r < 0) continue;
      const T wj = w[n * k + j];
      const T* y = yg + r * d;
      for (int64_t c = 0; c < d; ++c) o[c] += wj * y[c];
    }
  }
}

// dyg[row_of[n,j],:] (=) w[n,j] dout[n,:];  dw[n,j] (=) dout[n,:] . yg[row_of[n,j],:] (0 if dropped).
template <class T>
void moe_combine_bwd(const T* dout, const T* yg, const T* w, const int32_t* row_of, int64_t N,
                     int64_t k, int64_t d, T* dyg, T* dw) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dout + n * d;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_of[n * k + j];
      if (r < 0) {
        dw[n * k + j] = T(0);
        continue;
      }
      const T wj = w[n * k + j];
      const T* y = yg + r * d;
      T* dy = dyg + r * d;
      double dot = 0;
      for (int64_t c = 0; c < d; ++c) {
        dy[c] = wj * g[c];
        dot += double(g[c]) * double(y[c]);
      }
      dw[n * k + j] = T(dot);
    }
  }
}

}  // namespace mf::ref
