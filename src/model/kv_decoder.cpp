#include "model/kv_decoder.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "backend/cpu/ref_ops.h"
#include "core/error.h"

namespace mf {

namespace {

std::vector<float> host_copy(Backend& be, const Param* p) {
  MF_CHECK(p != nullptr, "KvDecoder: a parameter is missing from the model");
  Tensor h = host_tensor(p->shape);
  be.download(p->master, h);
  return std::vector<float>(h.f32(), h.f32() + h.numel());
}

// y[out] (=) W[out, in] x[in]
void matvec(const std::vector<float>& W, const float* x, int64_t out, int64_t in, float* y) {
  ref::gemm<float>(false, true, 1, out, in, 1.0f, x, in, W.data(), in, 0.0f, y, out);
}

}  // namespace

KvDecoder::KvDecoder(LlamaModel& model, Backend& be, int max_len)
    : cfg_(model.config()), scales_(model.scales()), attn_scale_(model.attn_scale()),
      max_len_(max_len) {
  MF_CHECK(max_len >= 1, "KvDecoder: max_len ", max_len, " must be >= 1");
  MF_CHECK(max_len <= cfg_.max_seq_len, "KvDecoder: max_len ", max_len,
           " exceeds model.max_seq_len ", cfg_.max_seq_len);
  const int64_t d = cfg_.d_model, hd = cfg_.head_dim(), kv = int64_t(cfg_.n_kv_heads) * hd;
  wte_ = host_copy(be, model.find("model.embed_tokens.weight"));
  norm_f_ = host_copy(be, model.find("model.norm.weight"));
  head_ = cfg_.tie_embeddings ? wte_ : host_copy(be, model.find("lm_head.weight"));
  const MoeConfig& mc = cfg_.moe;
  for (int l = 0; l < cfg_.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto get = [&](const std::string& name) { return host_copy(be, model.find(p + name)); };
    auto mlp = [&](const std::string& q, int64_t f) {
      Mlp m;
      m.gate = get(q + "gate_proj.weight");
      m.up = get(q + "up_proj.weight");
      m.down = get(q + "down_proj.weight");
      m.f = f;
      return m;
    };
    Layer L;
    L.ln1 = get("input_layernorm.weight");
    L.ln2 = get("post_attention_layernorm.weight");
    L.wq = get("self_attn.q_proj.weight");
    L.wk = get("self_attn.k_proj.weight");
    L.wv = get("self_attn.v_proj.weight");
    L.wo = get("self_attn.o_proj.weight");
    if (mc.n_experts > 0 && l >= mc.first_dense) {
      L.router = get("mlp.gate.weight");
      if (mc.balance == "bias") L.bias = get("mlp.gate.e_score_correction_bias");
      for (int e = 0; e < mc.n_experts; ++e)
        L.experts.push_back(mlp("mlp.experts." + std::to_string(e) + ".", mc.d_expert));
      if (mc.n_shared > 0) L.shared = mlp("mlp.shared_experts.", int64_t(mc.n_shared) * mc.d_expert);
    } else {
      L.mlp = mlp("mlp.", cfg_.d_ff);
    }
    L.kcache.assign(size_t(int64_t(max_len) * kv), 0.0f);
    L.vcache.assign(size_t(int64_t(max_len) * kv), 0.0f);
    layers_.push_back(std::move(L));
  }
  // The rotation's frequencies, rounded to float as the forward's rope does.
  for (int64_t i = 0; i < hd / 2; ++i)
    inv_freq_.push_back(float(std::pow(cfg_.rope_theta, -2.0 * double(i) / double(hd))));
  int64_t widest = std::max<int64_t>(cfg_.d_ff, 1);
  if (mc.n_experts > 0) widest = std::max<int64_t>({widest, mc.d_expert, int64_t(mc.n_shared) * mc.d_expert});
  x_.resize(size_t(d));
  h_.resize(size_t(d));
  tmp_.resize(size_t(d));
  q_.resize(size_t(int64_t(cfg_.n_heads) * hd));
  att_.resize(q_.size());
  k_.resize(size_t(kv));
  v_.resize(size_t(kv));
  scores_.resize(size_t(std::max<int64_t>(max_len, mc.n_experts)));
  g_.resize(size_t(widest));
  u_.resize(size_t(widest));
  route_.E = mc.n_experts;
  route_.k = mc.top_k;
  route_.sigmoid = mc.score == "sigmoid";
  route_.norm_topk = mc.norm_topk;
  route_.route_scale = mc.route_scale;
  route_idx_.resize(size_t(mc.top_k));
  route_w_.resize(size_t(mc.top_k));
  route_counts_.resize(size_t(std::max(mc.n_experts, 1)));
}

// out[d] (+)= scale * down(silu(gate x) * up x)
void KvDecoder::mlp_add(const Mlp& m, const float* x, float scale, float* out) {
  const int64_t d = cfg_.d_model;
  matvec(m.gate, x, m.f, d, g_.data());
  matvec(m.up, x, m.f, d, u_.data());
  ref::swiglu_fwd(g_.data(), u_.data(), m.f, g_.data());
  matvec(m.down, g_.data(), d, m.f, tmp_.data());
  for (int64_t c = 0; c < d; ++c) out[c] += scale * tmp_[size_t(c)];
}

std::vector<float> KvDecoder::push(int32_t token) {
  const int64_t V = cfg_.vocab_size, d = cfg_.d_model, hd = cfg_.head_dim();
  const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, group = H / Hkv, kv = Hkv * hd;
  MF_CHECK(token >= 0 && token < V, "KvDecoder: token ", token, " outside the vocabulary 0..",
           V - 1);
  MF_CHECK(len_ < max_len_, "KvDecoder: the cache is full (", max_len_, " positions)");
  const int64_t pos = len_;
  const float eps = float(cfg_.norm_eps), rmult = float(scales_.residual_mult);
  float rstd = 0;
  std::copy(wte_.begin() + token * d, wte_.begin() + (token + 1) * d, x_.begin());
  // Rotate-half RoPE at this position, angles in double as the forward's.
  auto rope = [&](float* v, int64_t heads) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; ++i) {
      const double f = double(pos) * double(inv_freq_[size_t(i)]);
      const float c = float(std::cos(f)), s = float(std::sin(f));
      for (int64_t h = 0; h < heads; ++h) {
        float* r = v + h * hd;
        const float a = r[i], b = r[i + half];
        r[i] = a * c - b * s;
        r[i + half] = b * c + a * s;
      }
    }
  };
  for (Layer& L : layers_) {
    ref::add_rmsnorm_fwd<float>(x_.data(), nullptr, x_.data(), L.ln1.data(), 1, d, eps, h_.data(),
                                &rstd);
    matvec(L.wq, h_.data(), H * hd, d, q_.data());
    matvec(L.wk, h_.data(), kv, d, k_.data());
    matvec(L.wv, h_.data(), kv, d, v_.data());
    rope(q_.data(), H);
    rope(k_.data(), Hkv);
    std::copy(k_.begin(), k_.end(), L.kcache.begin() + pos * kv);
    std::copy(v_.begin(), v_.end(), L.vcache.begin() + pos * kv);
    // Causal attention of this query over positions 0..pos.
    for (int64_t h = 0; h < H; ++h) {
      const float* q = q_.data() + h * hd;
      const int64_t g = h / group;
      float mx = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        const float s = float(attn_scale_) * ref::dot(q, L.kcache.data() + j * kv + g * hd, hd);
        scores_[size_t(j)] = s;
        mx = std::max(mx, s);
      }
      double sum = 0;
      for (int64_t j = 0; j <= pos; ++j) {
        scores_[size_t(j)] = std::exp(scores_[size_t(j)] - mx);
        sum += scores_[size_t(j)];
      }
      float* o = att_.data() + h * hd;
      std::fill(o, o + hd, 0.0f);
      for (int64_t j = 0; j <= pos; ++j) {
        const float p = float(scores_[size_t(j)] / sum);
        const float* vr = L.vcache.data() + j * kv + g * hd;
        for (int64_t c = 0; c < hd; ++c) o[c] += p * vr[c];
      }
    }
    matvec(L.wo, att_.data(), d, H * hd, tmp_.data());
    for (int64_t c = 0; c < d; ++c) x_[size_t(c)] += rmult * tmp_[size_t(c)];
    ref::add_rmsnorm_fwd<float>(x_.data(), nullptr, x_.data(), L.ln2.data(), 1, d, eps, h_.data(),
                                &rstd);
    if (L.router.empty()) {
      mlp_add(L.mlp, h_.data(), rmult, x_.data());
      continue;
    }
    // MoE: route this token (top-k of the scores, the bias only choosing), then its experts.
    ref::moe_router_fwd<float>(h_.data(), L.router.data(), L.bias.empty() ? nullptr : L.bias.data(),
                               1, d, route_, scores_.data(), route_idx_.data(), route_w_.data(),
                               route_counts_.data(), nullptr);
    for (size_t j = 0; j < route_idx_.size(); ++j)
      mlp_add(L.experts[size_t(route_idx_[j])], h_.data(), rmult * route_w_[j], x_.data());
    if (L.shared.f > 0) mlp_add(L.shared, h_.data(), rmult, x_.data());
  }
  ref::add_rmsnorm_fwd<float>(x_.data(), nullptr, x_.data(), norm_f_.data(), 1, d, eps, h_.data(),
                              &rstd);
  std::vector<float> logits(static_cast<size_t>(V));
  matvec(head_, h_.data(), V, d, logits.data());
  for (float& v : logits) v *= float(scales_.logit_mult);
  ++len_;
  return logits;
}

}  // namespace mf
