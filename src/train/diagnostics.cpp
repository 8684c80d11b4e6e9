#include "train/diagnostics.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "model/llama.h"

namespace mf {

namespace {

// The parameters that get matrix statistics.
bool tracked(const Param& p) {
  return p.shape.size() == 2 && p.kind != ParamKind::Norm && p.kind != ParamKind::Bias;
}

std::vector<float> download_host(Backend& be, const Tensor& t) {
  Tensor h = host_tensor(t.shape);
  be.download(t, h);
  return std::vector<float>(h.f32(), h.f32() + h.numel());
}

nlohmann::json num_or_null(double x) {
  return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr);
}

// Householder reduction of the symmetric matrix `a` (n x n, row-major, destroyed) to tridiagonal
// form: diagonal d[0..n), off-diagonal e[0..n-1) (e[i] couples d[i] and d[i+1]), e[n-1] = 0.
// Step k zeroes column k below the sub-diagonal with H = I - beta v v^T acting on rows/cols
// k+1..n-1: the trailing block becomes A - v w^T - w v^T with p = beta A v,
// w = p - (beta/2)(p.v) v.
void tridiagonalize(std::vector<double>& a, int n, std::vector<double>& d, std::vector<double>& e) {
  d.assign(n, 0.0);
  e.assign(n, 0.0);
  std::vector<double> v(n), p(n);
  for (int k = 0; k + 2 < n; ++k) {
    const int m0 = k + 1;  // first row of the trailing block
    double sigma = 0;
    for (int i = m0; i < n; ++i) sigma += a[size_t(i) * n + k] * a[size_t(i) * n + k];
    const double x0 = a[size_t(m0) * n + k];
    const double tail = sigma - x0 * x0;
    d[k] = a[size_t(k) * n + k];
    if (tail <= 0) {  // already tridiagonal in this column
      e[k] = x0;
      continue;
    }
    const double alpha = x0 >= 0 ? -std::sqrt(sigma) : std::sqrt(sigma);
    // v = x - alpha e1 (on rows m0..n-1), beta = 2 / (v.v)
    for (int i = m0; i < n; ++i) v[i] = a[size_t(i) * n + k];
    v[m0] -= alpha;
    const double vv = tail + v[m0] * v[m0];
    const double beta = 2.0 / vv;
    // p = beta * A22 v
#pragma omp parallel for schedule(static) if (n - m0 > 128)
    for (int i = m0; i < n; ++i) {
      const double* row = &a[size_t(i) * n];
      double s = 0;
      for (int j = m0; j < n; ++j) s += row[j] * v[j];
      p[i] = beta * s;
    }
    double pv = 0;  // in index order: the same bits for any number of threads
    for (int i = m0; i < n; ++i) pv += p[i] * v[i];
    const double half = 0.5 * beta * pv;
    for (int i = m0; i < n; ++i) p[i] -= half * v[i];  // p is now w
#pragma omp parallel for schedule(static) if (n - m0 > 128)
    for (int i = m0; i < n; ++i) {
      double* row = &a[size_t(i) * n];
      const double vi = v[i], wi = p[i];
      for (int j = m0; j < n; ++j) row[j] -= vi * p[j] + wi * v[j];
    }
    e[k] = alpha;
  }
  if (n >= 2) {
    d[n - 2] = a[size_t(n - 2) * n + (n - 2)];
    e[n - 2] = a[size_t(n - 1) * n + (n - 2)];
  }
  if (n >= 1) d[n - 1] = a[size_t(n - 1) * n + (n - 1)];
  if (n >= 1) e[n - 1] = 0;
}

// Eigenvalues of the symmetric tridiagonal (d, e) by QL with implicit Wilkinson-type shifts
// (eigenvalues only; the rotations are not accumulated). d is overwritten with the eigenvalues.
void tridiagonal_ql(std::vector<double>& d, std::vector<double>& e) {
  const int n = int(d.size());
  const double eps = std::numeric_limits<double>::epsilon();
  for (int l = 0; l < n; ++l) {
    int iter = 0;
    while (true) {
      int m = l;
      for (; m < n - 1; ++m) {
        const double dd = std::fabs(d[m]) + std::fabs(d[m + 1]);
        if (std::fabs(e[m]) <= eps * dd) break;
      }
      if (m == l) break;
      MF_CHECK(++iter <= 100, "singular values: the eigen-solver did not converge (non-finite "
                              "weights?)");
      // Shift from the leading 2x2 block.
      double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
      double r = std::hypot(g, 1.0);
      g = d[m] - d[l] + e[l] / (g + (g >= 0 ? r : -r));
      double s = 1, c = 1, p = 0;
      int i = m - 1;
      bool underflow = false;
      for (; i >= l; --i) {
        double f = s * e[i], b = c * e[i];
        r = std::hypot(f, g);
        e[i + 1] = r;
        if (r == 0.0) {  // split: recover and retry
          d[i + 1] -= p;
          e[m] = 0;
          underflow = true;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2.0 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
      }
      if (underflow) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0;
    }
  }
}

}  // namespace

std::vector<double> symmetric_eigenvalues(std::vector<double>& a, int n) {
  MF_CHECK(n >= 0 && a.size() == size_t(n) * size_t(n), "symmetric_eigenvalues: expected ", n,
           "x", n, " values, got ", a.size());
  for (double x : a) MF_CHECK(std::isfinite(x), "symmetric_eigenvalues: non-finite entry");
  std::vector<double> d, e;
  tridiagonalize(a, n, d, e);
  tridiagonal_ql(d, e);
  std::sort(d.begin(), d.end());
  return d;
}

std::vector<double> singular_values(const float* w, int64_t rows, int64_t cols) {
  MF_CHECK(rows > 0 && cols > 0, "singular_values: empty matrix [", rows, ", ", cols, "]");
  const int n = int(std::min(rows, cols));
  std::vector<double> wd(size_t(rows * cols));
  for (size_t i = 0; i < wd.size(); ++i) wd[i] = w[i];
  std::vector<double> gram(size_t(n) * n, 0.0);
  if (cols <= rows)  // W^T W, [cols, cols]
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, n, int(rows), 1.0, wd.data(), int(cols),
                0.0, gram.data(), n);
  else  // W W^T, [rows, rows]
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, n, int(cols), 1.0, wd.data(), int(cols),
                0.0, gram.data(), n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) gram[size_t(i) * n + j] = gram[size_t(j) * n + i];
  std::vector<double> ev = symmetric_eigenvalues(gram, n);
  std::vector<double> sv(n);
  for (int i = 0; i < n; ++i) sv[i] = std::sqrt(std::max(0.0, ev[n - 1 - i]));
  return sv;
}

double sv_entropy(const std::vector<double>& sv) {
  const size_t n = sv.size();
  if (n <= 1) return 1.0;
  double total = 0;
  for (double s : sv) total += s * s;
  if (!(total > 0)) return 0.0;
  double h = 0;
  for (double s : sv) {
    const double p = s * s / total;
    if (p > 0) h -= p * std::log(p);
  }
  return h / std::log(double(n));
}

std::vector<std::vector<double>> max_attention_logits(LlamaModel& model, Backend& be,
                                                      int max_seqs) {
  const ModelConfig& c = model.config();
  const int B = model.B(), T = model.T(), H = c.n_heads, Hkv = c.n_kv_heads, hd = c.head_dim();
  const int nseq = std::max(1, std::min(max_seqs, B));
  const int group = H / Hkv;
  const float scale = float(model.attn_scale());
  std::vector<std::vector<double>> out(c.n_layers, std::vector<double>(H, -INFINITY));
  std::vector<float> scores(size_t(T) * T);
  for (int l = 0; l < c.n_layers; ++l) {
    // Only the first nseq sequences are needed: download the leading rows.
    Tensor q = model.attn_q(l).slice0(0, nseq), k = model.attn_k(l).slice0(0, nseq);
    std::vector<float> qh = download_host(be, q), kh = download_host(be, k);
    for (int b = 0; b < nseq; ++b) {
      for (int h = 0; h < H; ++h) {
        const int g = h / group;
        const float* Q = qh.data() + (size_t(b) * T * H + h) * hd;    // rows stride H*hd
        const float* K = kh.data() + (size_t(b) * T * Hkv + g) * hd;  // rows stride Hkv*hd
        // scores [T,T] = scale * Q K^T
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, scale, Q, H * hd, K,
                    Hkv * hd, 0.f, scores.data(), T);
        double mx = out[l][h];
        for (int i = 0; i < T; ++i) {
          const float* row = scores.data() + size_t(i) * T;
          for (int j = 0; j <= i; ++j) mx = std::max(mx, double(row[j]));
        }
        out[l][h] = mx;
      }
    }
  }
  return out;
}

int apply_qk_clip(LlamaModel& model, Backend& be, double tau,
                  const std::vector<std::vector<double>>& max_logits) {
  MF_CHECK(tau > 0, "optim.qk_clip_tau must be > 0 to clip, got ", tau);
  const ModelConfig& c = model.config();
  const int H = c.n_heads, Hkv = c.n_kv_heads, hd = c.head_dim(), group = H / Hkv;
  MF_CHECK(int(max_logits.size()) == c.n_layers, "apply_qk_clip: ", max_logits.size(),
           " layers of logits for a ", c.n_layers, "-layer model");
  int clipped = 0;
  for (int l = 0; l < c.n_layers; ++l) {
    MF_CHECK(int(max_logits[l].size()) == H, "apply_qk_clip: layer ", l, " has ",
             max_logits[l].size(), " heads of logits, the model ", H);
    std::vector<double> gamma(H, 1.0);
    bool any = false;
    for (int h = 0; h < H; ++h)
      if (max_logits[l][h] > tau) {
        gamma[h] = tau / max_logits[l][h];
        any = true;
        ++clipped;
      }
    if (!any) continue;
    const std::string pre = "model.layers." + std::to_string(l) + ".self_attn.";
    Param* wq = model.find(pre + "q_proj.weight");
    Param* wk = model.find(pre + "k_proj.weight");
    MF_CHECK(wq && wk, "apply_qk_clip: layer ", l, " has no q_proj / k_proj");
    Tensor hq = host_tensor(wq->shape), hk = host_tensor(wk->shape);
    be.download(wq->master, hq);
    be.download(wk->master, hk);
    const int64_t d_in = wq->shape[1];
    for (int g = 0; g < Hkv; ++g) {
      double gmin = 1.0;
      for (int h = g * group; h < (g + 1) * group; ++h) gmin = std::min(gmin, gamma[h]);
      if (gmin >= 1.0) continue;
      const float ks = float(std::sqrt(gmin));
      float* krows = hk.f32() + int64_t(g) * hd * d_in;
      for (int64_t i = 0; i < int64_t(hd) * d_in; ++i) krows[i] *= ks;
      for (int h = g * group; h < (g + 1) * group; ++h) {
        const float qs = float(gamma[h] / std::sqrt(gmin));
        float* qrows = hq.f32() + int64_t(h) * hd * d_in;
        for (int64_t i = 0; i < int64_t(hd) * d_in; ++i) qrows[i] *= qs;
      }
    }
    be.upload(hq, wq->master);
    be.upload(hk, wk->master);
    if (wq->weight.ptr != wq->master.ptr) be.copy(wq->master, wq->weight);
    if (wk->weight.ptr != wk->master.ptr) be.copy(wk->master, wk->weight);
  }
  return clipped;
}

// ---- Diagnostics ---------------------------------------------------------------------------

void Diagnostics::before_step(const ParamList& params, Backend& be) {
  before_.clear();
  for (const Param* p : params)
    if (p && tracked(*p)) before_.push_back(download_host(be, p->master));
}

int Diagnostics::qk_clip(LlamaModel& model, Backend& be,
                         const std::function<void(std::vector<std::vector<double>>&)>& combine) {
  have_logits_ = false;
  last_clipped_ = 0;
  if (!(tau_ > 0)) return 0;
  last_logits_ = max_attention_logits(model, be);
  if (combine) combine(last_logits_);
  have_logits_ = true;
  last_clipped_ = apply_qk_clip(model, be, tau_, last_logits_);
  return last_clipped_;
}

nlohmann::json Diagnostics::after_step(LlamaModel& model, Backend& be, int done) {
  const auto t0 = std::chrono::steady_clock::now();
  nlohmann::json mats = nlohmann::json::object();
  double ent_sum = 0;
  int ent_n = 0;
  size_t idx = 0;
  const bool have_before = !before_.empty();
  for (const Param* p : model.params()) {
    if (!tracked(*p)) continue;
    std::vector<float> w = download_host(be, p->master);
    const int64_t rows = p->shape[0], cols = p->shape[1];
    std::vector<double> sv = singular_values(w.data(), rows, cols);
    double ss = 0;
    for (float x : w) ss += double(x) * x;
    nlohmann::json m;
    const double ent = sv_entropy(sv);
    m["sv_entropy"] = num_or_null(ent);
    m["spectral_norm"] = num_or_null(sv.empty() ? 0.0 : sv[0]);
    m["weight_rms"] = num_or_null(std::sqrt(ss / double(w.size())));
    if (have_before && idx < before_.size() && before_[idx].size() == w.size()) {
      double du = 0;
      const std::vector<float>& b = before_[idx];
      for (size_t i = 0; i < w.size(); ++i) {
        const double dx = double(w[i]) - double(b[i]);
        du += dx * dx;
      }
      m["update_rms"] = num_or_null(std::sqrt(du / double(w.size())));
    } else {
      m["update_rms"] = nullptr;
    }
    if (p->kind == ParamKind::Hidden && std::isfinite(ent)) {
      ent_sum += ent;
      ++ent_n;
    }
    mats[p->name] = m;
    ++idx;
  }
  before_.clear();

  std::vector<std::vector<double>> logits =
      have_logits_ ? last_logits_ : max_attention_logits(model, be);
  nlohmann::json per_layer = nlohmann::json::array();
  for (auto& layer : logits) {
    double mx = -INFINITY;
    for (double x : layer) mx = std::max(mx, x);
    per_layer.push_back(num_or_null(mx));
  }
  nlohmann::json d;
  d["matrices"] = mats;
  d["sv_entropy_mean"] = ent_n ? nlohmann::json(ent_sum / ent_n) : nlohmann::json(nullptr);
  d["max_attn_logit"] = per_layer;
  d["qk_clipped"] = last_clipped_;
  d["seconds"] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  have_logits_ = false;
  last_clipped_ = 0;
  return {{"step", done}, {"diag", d}};
}

}  // namespace mf
