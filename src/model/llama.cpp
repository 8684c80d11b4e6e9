#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "backend/profiler.h"
#include "core/log.h"  // spdlog, and with it fmt::format
#include "core/rng.h"
#include "model/moe.h"

namespace mf {

namespace {
// Before anything is allocated: a model whose weights, gradients and residual stream alone exceed
// the device's memory fails here with the shape keys named, not later with "out of host memory"
// or std::bad_alloc from whichever allocation came first. A lower bound on what the model needs
// (optimizer state and most activations come on top), so it never refuses what would fit.
void check_fits_memory(const ModelConfig& cfg, const Backend& be, int B, int T) {
  const MemoryInfo mi = be.memory_info();
  if (mi.total == 0) return;  // unknown
  const double act = be.act_dtype() == DType::F32 ? 4 : 2;
  const double params = cfg.param_count();
  // f32 master weights and gradients, plus the compute copy when activations are not f32
  const double per_param = 8 + (act == 4 ? 0 : act);
  const double weights = params * per_param;
  // the residual stream entering each layer's attention, plus the model-wide (N, d) buffers
  // (branch, r_final, xf, dresid, dbranch, dxf, dxn)
  const double tokens = double(B) * double(T);
  const double acts = tokens * double(cfg.d_model) * act * (double(cfg.n_layers) + 7);
  if (weights + acts <= double(mi.total)) return;
  const auto size = format_bytes;
  const bool gpu = be.device() == Device::CUDA;
  MF_FAIL("the model does not fit in ", gpu ? "GPU" : "host",
          " memory: its weights and gradients need ", size(weights), " (",
          fmt::format("{:.4g}", params), " parameters x ", per_param, " bytes; ", cfg.shape_keys(),
          ") and its activations at least ", size(acts), " (micro-batch ", B, " x seq_len ", T,
          " tokens), more than the ", size(double(mi.total)), " this ", gpu ? "GPU" : "machine",
          " has; make the model smaller, or lower train.micro_batch / train.seq_len");
}
}  // namespace

struct LlamaModel::Layer {
  Param *ln1, *wq, *wk, *wv, *wo, *ln2, *wgate, *wup, *wdown;
  MoeLayer* moe = nullptr;  // MoE: the MLP is an MoE block (wgate/wup/wdown are null)
  // [Wq; Wk; Wv] [qd+2kvd, d] and [W_gate; W_up] [2f,d] as views of the weight and of the
  // gradient arena (when LlamaModel::qkv_stacked_ / gate_up_stacked_; undefined otherwise).
  Tensor qkv_weight, qkv_grad, gu_weight, gu_grad;
};

// Activations kept for backward, and scratch for the gradient pass. Shapes in comments.
struct LlamaModel::Acts {
  Tensor tokens, targets;               // i32 (N)
  struct PerLayer {
    Tensor r_attn, rstd1, xn1;          // (N,d) (N) (N,d): residual entering attention, its norm
    Tensor q, k, v, ao, lse;            // (N,H*hd) (N,Hkv*hd) x2 (N,H*hd) (B,H,T)
    Tensor r_mlp, rstd2, xn2;           // residual entering the MLP, its norm
    Tensor gate, up, h;                 // (N,f) x3 (dense MLP layers only)
    Tensor gu;                          // (N,2f) gate | up per row, replacing gate and up when
                                        // the layer's gate and up run as one GEMM
  };
  std::vector<PerLayer> L;
  Tensor branch;                        // (N,d) output of o_proj / down_proj before the add
  Tensor r_final, rstd_f, xf;           // final norm
  Tensor losses;                        // (N) f32
  Tensor loss_sum;                      // (N) f32: losses summed over deferred micro-batches
  // backward scratch
  Tensor dresid, dbranch, dxf, dxn;     // (N,d)
  Tensor dh, dgate, dup;                // (N,f)
  Tensor dgu;                           // (N,2f) (stacked gate/up)
  Tensor qkv;                           // (N,qd+2kvd) stacked q/k/v: the GEMM's output before
                                        // the split, and dqkv in backward
  Tensor dao, dq, dk, dv;               // (N,H*hd) (N,Hkv*hd)
};

LlamaModel::LlamaModel(const ModelConfig& cfg, Backend& be, int B, int T, ModelScales scales)
    : cfg_(cfg), be_(be), B_(B), T_(T), scales_(scales) {
  MF_CHECK(T <= cfg.max_seq_len, "seq_len ", T, " exceeds model.max_seq_len ", cfg.max_seq_len);
  check_fits_memory(cfg, be, B, T);
  // MoE: scratch shared by the MoE layers, needed by build_params (which creates them).
  if (cfg.moe.n_experts > 0)
    moe_scratch_ = std::make_unique<MoeScratch>(cfg, be, int64_t(B) * T);
  build_params();

  const int64_t N = int64_t(B) * T, d = cfg.d_model, f = cfg.d_ff, hd = cfg.head_dim();
  const int64_t qd = cfg.n_heads * hd, kvd = cfg.n_kv_heads * hd;
  const DType act = be.act_dtype();
  auto A = [&](Shape s) { return be_.empty(s, act); };
  auto F = [&](Shape s) { return be_.empty(s, DType::F32); };
  acts_ = std::make_unique<Acts>();
  Acts& a = *acts_;
  a.tokens = be_.empty({N}, DType::I32);
  a.targets = be_.empty({N}, DType::I32);
  a.L.resize(cfg.n_layers);
  // Activation recompute: layers > 0 share layer 0's buffers for what backward recomputes
  // ("mlp": gate, up, h; "full": everything but the residual stream entering the layer). MoE
  // layers keep their routing and rebuild their expert activations (shared in MoeScratch) in
  // either mode. (Dense layers lead, model.moe.first_dense, so a dense layer i > 0 always has a
  // dense layer 0.)
  const bool rc_full = cfg.recompute == "full", rc_mlp = rc_full || cfg.recompute == "mlp";
  bool any_dense = false;
  for (int i = 0; i < cfg.n_layers; ++i) {
    auto& l = a.L[i];
    l.r_attn = A({N, d});
    if (rc_full && i > 0) {
      Tensor keep = l.r_attn;
      l = a.L[0];
      l.r_attn = keep;
      continue;
    }
    l.rstd1 = F({N}); l.xn1 = A({N, d});
    l.q = A({N, qd}); l.k = A({N, kvd}); l.v = A({N, kvd}); l.ao = A({N, qd});
    l.lse = F({int64_t(B), int64_t(cfg.n_heads), int64_t(T)});
    l.r_mlp = A({N, d}); l.rstd2 = F({N}); l.xn2 = A({N, d});
    if (layers_[i].moe) continue;  // MoE: the block keeps its own activations
    any_dense = true;
    if (rc_mlp && i > 0) {
      l.gate = a.L[0].gate; l.up = a.L[0].up; l.gu = a.L[0].gu; l.h = a.L[0].h;
    } else if (gate_up_stacked_) {
      l.gu = A({N, 2 * f}); l.h = A({N, f});
    } else {
      l.gate = A({N, f}); l.up = A({N, f}); l.h = A({N, f});
    }
  }
  a.branch = A({N, d});
  a.r_final = A({N, d}); a.rstd_f = F({N}); a.xf = A({N, d});
  a.losses = F({N});
  a.loss_sum = F({N});
  a.dresid = A({N, d}); a.dbranch = A({N, d}); a.dxf = A({N, d}); a.dxn = A({N, d});
  if (any_dense) {
    a.dh = A({N, f});
    if (gate_up_stacked_) {
      a.dgu = A({N, 2 * f});
    } else {
      a.dgate = A({N, f}); a.dup = A({N, f});
    }
  }
  a.dao = A({N, qd}); a.dq = A({N, qd}); a.dk = A({N, kvd}); a.dv = A({N, kvd});
  if (qkv_stacked_) a.qkv = A({N, qd + 2 * kvd});
}

LlamaModel::~LlamaModel() = default;

void LlamaModel::build_params() {
  const int64_t V = cfg_.vocab_size, d = cfg_.d_model, f = cfg_.d_ff, hd = cfg_.head_dim();
  const int64_t qd = cfg_.n_heads * hd, kvd = cfg_.n_kv_heads * hd;
  const double out_std = cfg_.init_std / std::sqrt(2.0 * cfg_.n_layers);
  auto add = [&](const std::string& name, ParamKind kind, Shape shape, double std) {
    auto p = std::make_unique<Param>();
    p->name = name;
    p->kind = kind;
    p->shape = shape;
    p->init_std = std;
    // master and grad become views into the two arenas placed below (weight too on f32 backends)
    params_.push_back(std::move(p));
    return params_.back().get();
  };
  wte_ = add("model.embed_tokens.weight", ParamKind::Embedding, {V, d}, cfg_.init_std);
  for (int i = 0; i < cfg_.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    Layer l;
    l.ln1 = add(p + "input_layernorm.weight", ParamKind::Norm, {d}, 0);
    l.wq = add(p + "self_attn.q_proj.weight", ParamKind::Hidden, {qd, d}, cfg_.init_std);
    l.wk = add(p + "self_attn.k_proj.weight", ParamKind::Hidden, {kvd, d}, cfg_.init_std);
    l.wv = add(p + "self_attn.v_proj.weight", ParamKind::Hidden, {kvd, d}, cfg_.init_std);
    l.wo = add(p + "self_attn.o_proj.weight", ParamKind::Hidden, {d, qd}, out_std);
    l.ln2 = add(p + "post_attention_layernorm.weight", ParamKind::Norm, {d}, 0);
    if (cfg_.moe.n_experts > 0 && i >= cfg_.moe.first_dense) {
      // MoE: router, experts and shared experts under mlp. (model/moe.h has the table).
      l.wgate = l.wup = l.wdown = nullptr;
      moe_layers_.push_back(std::make_unique<MoeLayer>(cfg_, be_, i, int64_t(B_) * T_,
                                                       *moe_scratch_, add, out_std));
      l.moe = moe_layers_.back().get();
      layers_.push_back(l);
      continue;
    }
    l.wgate = add(p + "mlp.gate_proj.weight", ParamKind::Hidden, {f, d}, cfg_.init_std);
    l.wup = add(p + "mlp.up_proj.weight", ParamKind::Hidden, {f, d}, cfg_.init_std);
    l.wdown = add(p + "mlp.down_proj.weight", ParamKind::Hidden, {d, f}, out_std);
    layers_.push_back(l);
  }
  norm_f_ = add("model.norm.weight", ParamKind::Norm, {d}, 0);
  lm_head_ = cfg_.tie_embeddings ? wte_
                                 : add("lm_head.weight", ParamKind::LmHead, {V, d}, cfg_.init_std);

  // Gradient groups in the order backward finishes them, and the arena laid out in that order.
  auto index_of = [&](const Param* p) {
    for (size_t j = 0; j < params_.size(); ++j)
      if (params_[j].get() == p) return j;
    MF_FAIL("internal: parameter not in the table");
  };
  std::vector<size_t> head = {index_of(norm_f_)};
  if (!cfg_.tie_embeddings) head.push_back(index_of(lm_head_));
  grad_groups_.push_back(head);
  for (int i = cfg_.n_layers - 1; i >= 0; --i) {  // layer i: every name under model.layers.i.
    const std::string pre = "model.layers." + std::to_string(i) + ".";
    grad_groups_.emplace_back();
    for (size_t j = 0; j < params_.size(); ++j)
      if (params_[j]->name.compare(0, pre.size(), pre) == 0) grad_groups_.back().push_back(j);
  }
  grad_groups_.push_back({index_of(wte_)});
  const int64_t align = 64;  // floats (256 bytes): every gradient starts as aligned as a fresh one
  std::vector<int64_t> offset(params_.size(), -1);
  int64_t total = 0;
  for (auto& g : grad_groups_)
    for (size_t j : g) {
      MF_CHECK(offset[j] < 0, "internal: parameter ", params_[j]->name, " in two gradient groups");
      offset[j] = total;
      total += (params_[j]->numel() + align - 1) / align * align;
    }
  for (size_t j = 0; j < params_.size(); ++j)
    MF_CHECK(offset[j] >= 0, "internal: parameter ", params_[j]->name, " in no gradient group");
  grad_arena_ = be_.empty({std::max<int64_t>(total, 1)}, DType::F32);
  master_arena_ = be_.empty({std::max<int64_t>(total, 1)}, DType::F32);
  // The compute copies (bf16 on CUDA) in a third arena with the same layout.
  if (be_.act_dtype() != DType::F32)
    weight_arena_ = be_.empty({std::max<int64_t>(total, 1)}, be_.act_dtype());
  // The padding between tensors is copied around by ZeRO-1's all-gather: zero it. Host tensors
  // are zero-filled when allocated (large ones as untouched pages, which a memset would make
  // resident: `muonforge config --params` builds a model only to list its parameters).
  if (master_arena_.device != Device::CPU) be_.zero(master_arena_);
  for (size_t j = 0; j < params_.size(); ++j) {
    Param& p = *params_[j];
    // Views keep their arena alive (owner).
    p.grad = grad_arena_.slice0(offset[j], offset[j] + p.numel()).view(p.shape);
    p.master = master_arena_.slice0(offset[j], offset[j] + p.numel()).view(p.shape);
    p.weight = be_.act_dtype() == DType::F32
                   ? p.master
                   : weight_arena_.slice0(offset[j], offset[j] + p.numel()).view(p.shape);
  }
  // q, k, v as one [qd+2kvd, d] matrix and the dense MLP's gate and up as one [2f, d]: each
  // follows the other in the table, so in the arenas too when no alignment gap comes between.
  qkv_stacked_ = gate_up_stacked_ = cfg_.stack_projections;
  for (Layer& l : layers_) {
    l.qkv_weight = stacked(stacked(l.wq->weight, l.wk->weight), l.wv->weight);
    l.qkv_grad = stacked(stacked(l.wq->grad, l.wk->grad), l.wv->grad);
    qkv_stacked_ = qkv_stacked_ && l.qkv_weight.defined() && l.qkv_grad.defined();
    if (l.moe) continue;
    l.gu_weight = stacked(l.wgate->weight, l.wup->weight);
    l.gu_grad = stacked(l.wgate->grad, l.wup->grad);
    gate_up_stacked_ = gate_up_stacked_ && l.gu_weight.defined() && l.gu_grad.defined();
  }
  for (auto& m : moe_layers_) m->stack_projections(cfg_.stack_projections);
}

std::vector<ParamList> LlamaModel::grad_groups() {
  std::vector<ParamList> out;
  for (auto& g : grad_groups_) {
    out.emplace_back();
    for (size_t j : g) out.back().push_back(params_[j].get());
  }
  return out;
}

ParamList LlamaModel::params() {
  ParamList out;
  for (auto& p : params_) out.push_back(p.get());
  return out;
}

Param* LlamaModel::find(const std::string& name) {
  for (auto& p : params_)
    if (p->name == name) return p.get();
  return nullptr;
}

int64_t LlamaModel::num_params() const {
  int64_t n = 0;
  for (auto& p : params_) n += p->numel();
  return n;
}

void LlamaModel::init_weights(uint64_t seed) {
  // One host RNG stream walked in table order, so every backend starts from identical weights.
  Rng rng(seed, /*stream=*/0x1a11a);
  for (auto& p : params_) {
    Tensor h = host_tensor(p->shape);
    float* w = h.f32();
    if (p->kind == ParamKind::Norm) {
      for (int64_t i = 0; i < h.numel(); ++i) w[i] = 1.0f;
    } else if (p->kind == ParamKind::Bias) {
      // MoE: the selection bias starts at zero (host_tensor is zero-filled).
    } else {
      for (int64_t i = 0; i < h.numel(); ++i) w[i] = float(rng.normal() * p->init_std);
    }
    be_.upload(h, p->master);
  }
  sync_weights();
}

void LlamaModel::sync_weights() {
  // One cast over the whole arena (both have the same layout, padding included), not one launch
  // per parameter. On f32 backends the weights are the masters.
  if (weight_arena_.defined()) be_.copy(master_arena_, weight_arena_);
}

void LlamaModel::zero_grads() { be_.zero(grad_arena_); }

// (N, h*hd) -> (B, T, h, hd) view, the layout rope and attention take.
Tensor LlamaModel::heads(const Tensor& x, int h) const {
  return x.view({int64_t(B_), int64_t(T_), int64_t(h), int64_t(cfg_.head_dim())});
}

AttnShape LlamaModel::attn_shape() const {
  return AttnShape{B_, T_, cfg_.n_heads, cfg_.n_kv_heads, cfg_.head_dim(), float(attn_scale())};
}

// Layer i's q, k (rotated) and v from its normed input xn1; `r` (if given) moves on to
// "fwd.rope" after the GEMMs.
void LlamaModel::project_qkv(int i, ProfRegion* r) {
  Acts& a = *acts_;
  Layer& w = layers_[i];
  Acts::PerLayer& l = a.L[i];
  const float theta = float(cfg_.rope_theta);
  Tensor q4 = heads(l.q, cfg_.n_heads), k4 = heads(l.k, cfg_.n_kv_heads);
  if (qkv_stacked_) {
    be_.matmul_fwd(l.xn1, w.qkv_weight, a.qkv);  // (N,(H+2Hkv)*hd)
    if (r) r->next("fwd.rope");
    Tensor v4 = heads(l.v, cfg_.n_kv_heads);
    be_.qkv_rope_split(heads(a.qkv, cfg_.n_heads + 2 * cfg_.n_kv_heads), q4, k4, v4, theta);
    return;
  }
  be_.matmul_fwd(l.xn1, w.wq->weight, l.q);  // (N,H*hd)
  be_.matmul_fwd(l.xn1, w.wk->weight, l.k);  // (N,Hkv*hd)
  be_.matmul_fwd(l.xn1, w.wv->weight, l.v);
  if (r) r->next("fwd.rope");
  be_.rope_fwd(q4, q4, theta);
  be_.rope_fwd(k4, k4, theta);
}

// Layer i from its normed input xn1 to the normed MLP input xn2 (and r_mlp): the attention
// branch and the second residual add.
void LlamaModel::attention_block(int i) {
  Acts& a = *acts_;
  Layer& w = layers_[i];
  Acts::PerLayer& l = a.L[i];
  const float rmult = float(scales_.residual_mult);
  ProfRegion r(be_, "fwd.qkv");
  project_qkv(i, &r);
  Tensor q4 = heads(l.q, cfg_.n_heads), k4 = heads(l.k, cfg_.n_kv_heads);
  Tensor v4 = heads(l.v, cfg_.n_kv_heads), ao4 = heads(l.ao, cfg_.n_heads);
  r.next("fwd.attention");
  be_.attention_fwd(q4, k4, v4, ao4, l.lse, attn_shape());
  r.next("fwd.o_proj");
  be_.matmul_fwd(l.ao, w.wo->weight, a.branch);  // (N,d)
  if (rmult != 1.f) be_.scale(a.branch, rmult);
  r.next("fwd.norm");
  be_.add_rmsnorm_fwd(l.r_attn, &a.branch, l.r_mlp, w.ln2->weight, float(cfg_.norm_eps), l.xn2,
                      l.rstd2);
}

// The dense MLP's activations that backward needs: gate, up, h = silu(gate) * up.
void LlamaModel::mlp_hidden(int i) {
  Layer& w = layers_[i];
  Acts::PerLayer& l = acts_->L[i];
  ProfRegion r(be_, "fwd.mlp_up");
  if (gate_up_stacked_) {
    be_.matmul_fwd(l.xn2, w.gu_weight, l.gu);  // (N,2f)
    r.next("fwd.swiglu");
    be_.swiglu_packed_fwd(l.gu, l.h);
    return;
  }
  be_.matmul_fwd(l.xn2, w.wgate->weight, l.gate);  // (N,f)
  be_.matmul_fwd(l.xn2, w.wup->weight, l.up);
  r.next("fwd.swiglu");
  be_.swiglu_fwd(l.gate, l.up, l.h);
}

void LlamaModel::run_forward(const int32_t* inputs, bool train) {
  Acts& a = *acts_;
  const int64_t N = int64_t(B_) * T_;
  Tensor in_host;
  in_host.ptr = const_cast<int32_t*>(inputs);
  in_host.shape = {N};
  in_host.dtype = DType::I32;
  ProfRegion r(be_, "fwd.upload");
  be_.upload(in_host, a.tokens);

  const float eps = float(cfg_.norm_eps);
  const float rmult = float(scales_.residual_mult);
  r.next("fwd.embedding");
  be_.embedding_fwd(a.tokens, wte_->weight, a.L[0].r_attn);  // (N,d)
  for (int i = 0; i < cfg_.n_layers; ++i) {
    Layer& w = layers_[i];
    Acts::PerLayer& l = a.L[i];
    // Residual stream entering attention: the embedding, or the last layer's stream + MLP out.
    r.next("fwd.norm");
    if (i == 0)
      be_.add_rmsnorm_fwd(l.r_attn, nullptr, l.r_attn, w.ln1->weight, eps, l.xn1, l.rstd1);
    else
      be_.add_rmsnorm_fwd(a.L[i - 1].r_mlp, &a.branch, l.r_attn, w.ln1->weight, eps, l.xn1,
                          l.rstd1);
    r.end();
    attention_block(i);
    if (w.moe) {
      r.next("fwd.moe");
      w.moe->forward(l.xn2, a.branch, train);  // MoE: (N,d)
    } else {
      mlp_hidden(i);
      r.next("fwd.mlp_down");
      be_.matmul_fwd(l.h, w.wdown->weight, a.branch);  // (N,d)
    }
    if (rmult != 1.f) be_.scale(a.branch, rmult);
  }
  r.next("fwd.norm");
  be_.add_rmsnorm_fwd(a.L.back().r_mlp, &a.branch, a.r_final, norm_f_->weight, eps, a.xf,
                      a.rstd_f);
}

double LlamaModel::loss_from_host(const Tensor& losses) {
  ProfRegion r(be_, "loss.readback");
  Tensor h = host_tensor(losses.shape);
  be_.download(losses, h);
  double s = 0;
  for (int64_t i = 0; i < h.numel(); ++i) s += h.f32()[i];
  return s / double(h.numel());
}

double LlamaModel::forward(const int32_t* inputs, const int32_t* targets) {
  Acts& a = *acts_;
  run_forward(inputs);
  Tensor t_host;
  t_host.ptr = const_cast<int32_t*>(targets);
  t_host.shape = {int64_t(B_) * T_};
  t_host.dtype = DType::I32;
  be_.upload(t_host, a.targets);
  be_.lmhead_xent(a.xf, lm_head_->weight, a.targets, float(scales_.logit_mult), a.losses,
                  nullptr, nullptr, 1.f);
  return loss_from_host(a.losses);
}

double LlamaModel::forward_backward(const int32_t* inputs, const int32_t* targets,
                                    float loss_scale, bool grads_final) {
  MF_CHECK(deferred_count_ == 0, "forward_backward: ", deferred_count_,
           " deferred micro-batch loss(es) not taken yet (call take_loss first)");
  forward_backward_deferred(inputs, targets, loss_scale, grads_final);
  return take_loss();
}

double LlamaModel::take_loss() {
  MF_CHECK(deferred_count_ > 0, "take_loss: no micro-batch since the last take_loss");
  const double loss = (loss_from_host(acts_->loss_sum) + deferred_aux_) / deferred_count_;
  be_.zero(acts_->loss_sum);
  deferred_count_ = 0;
  deferred_aux_ = 0;
  return loss;
}

void LlamaModel::forward_backward_deferred(const int32_t* inputs, const int32_t* targets,
                                           float loss_scale, bool grads_final) {
  Acts& a = *acts_;
  // The targets go up before the forward is queued. The CUDA upload does not wait for the stream
  // (pinned staging ring), but should it fall back to its synchronous path (no pinned memory),
  // the stream is idle here, while after the forward the host would stall until it had run.
  Tensor t_host;
  t_host.ptr = const_cast<int32_t*>(targets);
  t_host.shape = {int64_t(B_) * T_};
  t_host.dtype = DType::I32;
  {
    ProfRegion up(be_, "fwd.upload");
    be_.upload(t_host, a.targets);
  }
  run_forward(inputs, /*train=*/true);
  ProfRegion r(be_, "loss.lm_head_xent");
  // Loss and its gradient w.r.t. the final normed stream and the lm head, in one fused pass.
  be_.lmhead_xent(a.xf, lm_head_->weight, a.targets, float(scales_.logit_mult), a.losses, &a.dxf,
                  &lm_head_->grad, loss_scale);

  const float theta = float(cfg_.rope_theta);
  const float rmult = float(scales_.residual_mult);
  const AttnShape s = attn_shape();
  // dresid holds dL/d(residual stream) as we walk back; branch gradients are read from it
  // (times the residual multiplier) before the norm's backward adds into it.
  r.next("bwd.norm");
  be_.zero(a.dresid);
  be_.rmsnorm_bwd(a.dxf, a.r_final, norm_f_->weight, a.rstd_f, a.dresid, norm_f_->grad);
  r.next("bwd.grads_ready");
  int group = 0;
  grads_ready(group++, grads_final);  // final norm (and the untied lm head)
  auto branch_grad = [&]() -> Tensor& {
    if (rmult == 1.f) return a.dresid;
    r.next("bwd.residual_scale");
    be_.copy(a.dresid, a.dbranch);
    be_.scale(a.dbranch, rmult);
    return a.dbranch;
  };
  for (int i = cfg_.n_layers - 1; i >= 0; --i) {
    Layer& w = layers_[i];
    Acts::PerLayer& l = a.L[i];
    // Activation recompute: rebuild what the shared buffers lost, from what was kept. The ops
    // are deterministic, so the gradients are bitwise those of a run without recompute.
    // MoE layers rebuild their expert activations (routing kept) instead of a dense MLP; they
    // share them in MoeScratch, which the last layer's forward wrote last.
    if (cfg_.recompute != "none" && i < cfg_.n_layers - 1) {
      r.next("bwd.recompute");
      if (cfg_.recompute == "full") {
        be_.add_rmsnorm_fwd(l.r_attn, nullptr, l.r_attn, w.ln1->weight, float(cfg_.norm_eps),
                            l.xn1, l.rstd1);
        attention_block(i);
      }
      if (w.moe)
        w.moe->rebuild(l.xn2);
      else
        mlp_hidden(i);
    }
    // MLP branch: r_out = r_mlp + down(silu(gate(xn2)) * up(xn2))
    Tensor& dmlp = branch_grad();
    if (w.moe) {
      r.next("bwd.moe");
      // MoE: dxn (=); the balance loss gradient in the units of loss_scale * sum of losses.
      w.moe->backward(dmlp, l.xn2, a.dxn, loss_scale * float(int64_t(B_) * T_));
    } else {
      r.next("bwd.mlp_down");
      be_.matmul_bwd(dmlp, l.h, w.wdown->weight, &a.dh, &w.wdown->grad, false);
      r.next("bwd.swiglu");
      if (gate_up_stacked_) {
        be_.swiglu_packed_bwd(a.dh, l.gu, a.dgu);
        r.next("bwd.mlp_up");
        be_.matmul_bwd(a.dgu, l.xn2, w.gu_weight, &a.dxn, &w.gu_grad, false);
      } else {
        be_.swiglu_bwd(a.dh, l.gate, l.up, a.dgate, a.dup);
        r.next("bwd.mlp_up");
        be_.matmul_bwd(a.dgate, l.xn2, w.wgate->weight, &a.dxn, &w.wgate->grad, false);
        be_.matmul_bwd(a.dup, l.xn2, w.wup->weight, &a.dxn, &w.wup->grad, true);
      }
    }
    r.next("bwd.norm");
    be_.rmsnorm_bwd(a.dxn, l.r_mlp, w.ln2->weight, l.rstd2, a.dresid, w.ln2->grad);
    // Attention branch: r_mlp = r_attn + o(attn(rope(q), rope(k), v))
    Tensor& dattn = branch_grad();
    r.next("bwd.o_proj");
    be_.matmul_bwd(dattn, l.ao, w.wo->weight, &a.dao, &w.wo->grad, false);
    Tensor dq4 = heads(a.dq, cfg_.n_heads), dk4 = heads(a.dk, cfg_.n_kv_heads);
    Tensor dv4 = heads(a.dv, cfg_.n_kv_heads);
    r.next("bwd.attention");
    be_.attention_bwd(heads(a.dao, cfg_.n_heads), heads(l.q, cfg_.n_heads),
                      heads(l.k, cfg_.n_kv_heads), heads(l.v, cfg_.n_kv_heads),
                      heads(l.ao, cfg_.n_heads), l.lse, dq4, dk4, dv4, s);
    r.next("bwd.rope");
    if (qkv_stacked_) {
      Tensor dqkv4 = heads(a.qkv, cfg_.n_heads + 2 * cfg_.n_kv_heads);
      be_.qkv_rope_merge_bwd(dq4, dk4, dv4, dqkv4, theta);
      r.next("bwd.qkv");
      be_.matmul_bwd(a.qkv, l.xn1, w.qkv_weight, &a.dxn, &w.qkv_grad, false);
    } else {
      be_.rope_bwd(dq4, dq4, theta);
      be_.rope_bwd(dk4, dk4, theta);
      r.next("bwd.qkv");
      be_.matmul_bwd(a.dq, l.xn1, w.wq->weight, &a.dxn, &w.wq->grad, false);
      be_.matmul_bwd(a.dk, l.xn1, w.wk->weight, &a.dxn, &w.wk->grad, true);
      be_.matmul_bwd(a.dv, l.xn1, w.wv->weight, &a.dxn, &w.wv->grad, true);
    }
    r.next("bwd.norm");
    be_.rmsnorm_bwd(a.dxn, l.r_attn, w.ln1->weight, l.rstd1, a.dresid, w.ln1->grad);
    r.next("bwd.grads_ready");
    grads_ready(group++, grads_final);  // layer i
  }
  r.next("bwd.embedding");
  be_.embedding_bwd(a.tokens, a.dresid, wte_->grad);
  r.next("bwd.grads_ready");
  grads_ready(group++, grads_final);  // embedding
  r.next("loss.accumulate");
  // Exact for the first micro-batch (0 + 1 * x), so one micro-batch reads back what it computed.
  be_.axpy(1.f, a.losses, a.loss_sum);
  r.end();
  ++deferred_count_;
  deferred_aux_ += moe_aux_loss();
}

// ---- MoE hooks -------------------------------------------------------------------------------

double LlamaModel::moe_aux_loss() const {
  double s = 0;
  for (auto& m : moe_layers_) s += m->aux_loss();
  return s;
}

void LlamaModel::post_step(const std::function<void(std::vector<float>&)>& sum_over_ranks) {
  if (moe_layers_.empty()) return;
  if (sum_over_ranks) {
    std::vector<float> stats;
    for (auto& m : moe_layers_) m->append_step_stats(stats);
    sum_over_ranks(stats);
    size_t at = 0;
    for (auto& m : moe_layers_) at = m->set_step_stats(stats, at);
  }
  for (auto& m : moe_layers_) m->post_step();
}

nlohmann::json LlamaModel::moe_metrics() const {
  nlohmann::json layers = nlohmann::json::array();
  double aux = 0, cv_max = 0;
  int64_t dropped = 0;
  for (auto& m : moe_layers_) {
    nlohmann::json j = m->metrics();
    aux += j.value("aux_loss", 0.0);
    dropped += j.value("dropped", int64_t(0));
    cv_max = std::max(cv_max, j.value("load_cv", 0.0));
    layers.push_back(std::move(j));
  }
  return {{"aux_loss", aux}, {"dropped", dropped}, {"load_cv_max", cv_max}, {"layers", layers}};
}

std::vector<MoeLayer*> LlamaModel::moe_layers() {
  std::vector<MoeLayer*> out;
  for (auto& m : moe_layers_) out.push_back(m.get());
  return out;
}

std::vector<float> LlamaModel::logits(const int32_t* inputs) {
  run_forward(inputs);
  return head_logits(acts_->xf);
}

std::vector<float> LlamaModel::logits_row(const int32_t* inputs, int64_t row) {
  const int64_t N = int64_t(B_) * T_;
  MF_CHECK(row >= 0 && row < N, "logits_row: row ", row, " outside 0..", N - 1);
  run_forward(inputs);
  return head_logits(acts_->xf.slice0(row, row + 1));
}

// lm_head applied to final-norm rows x [n, d], times the µP logit multiplier, on the host.
std::vector<float> LlamaModel::head_logits(const Tensor& x) {
  const int64_t n = x.dim(0), V = cfg_.vocab_size;
  Tensor lg = be_.empty({n, V}, be_.act_dtype());
  be_.matmul_fwd(x, lm_head_->weight, lg);
  Tensor h = host_tensor({n, V});
  be_.download(lg, h);
  std::vector<float> out(h.f32(), h.f32() + n * V);
  for (auto& v : out) v *= float(scales_.logit_mult);
  return out;
}

double LlamaModel::attn_scale() const {
  return scales_.attn_scale > 0 ? scales_.attn_scale : 1.0 / std::sqrt(double(cfg_.head_dim()));
}

// With recompute = "full" only the residual stream entering each layer is kept, so q and k of
// the last micro-batch are rebuilt (into the shared buffers) when asked for.
void LlamaModel::rebuild_qk(int layer) {
  MF_CHECK(layer >= 0 && layer < cfg_.n_layers, "attention q/k: layer ", layer, " out of range");
  if (cfg_.recompute != "full") return;
  Layer& w = layers_[layer];
  Acts::PerLayer& l = acts_->L[layer];
  be_.add_rmsnorm_fwd(l.r_attn, nullptr, l.r_attn, w.ln1->weight, float(cfg_.norm_eps), l.xn1,
                      l.rstd1);
  project_qkv(layer, nullptr);  // as the forward did, so q and k come out the same
}

Tensor LlamaModel::attn_q(int layer) {
  rebuild_qk(layer);
  return heads(acts_->L[layer].q, cfg_.n_heads);
}

Tensor LlamaModel::attn_k(int layer) {
  rebuild_qk(layer);
  return heads(acts_->L[layer].k, cfg_.n_kv_heads);
}

int64_t LlamaModel::activation_bytes() const {
  const Acts& a = *acts_;
  std::vector<const Tensor*> all = {&a.tokens, &a.targets, &a.branch, &a.r_final, &a.rstd_f,
                                    &a.xf,     &a.losses,  &a.loss_sum, &a.dresid, &a.dbranch, &a.dxf,
                                    &a.dxn,    &a.dh,      &a.dgate,  &a.dup,     &a.dgu,
                                    &a.dao,    &a.dq,      &a.dk,     &a.dv,      &a.qkv};
  for (auto& l : a.L)
    for (const Tensor* t : {&l.r_attn, &l.rstd1, &l.xn1, &l.q, &l.k, &l.v, &l.ao, &l.lse,
                            &l.r_mlp, &l.rstd2, &l.xn2, &l.gate, &l.up, &l.gu, &l.h})
      all.push_back(t);
  if (moe_scratch_)
    for (const Tensor* t : moe_scratch_->buffers()) all.push_back(t);
  for (const auto& m : moe_layers_)
    for (const Tensor* t : m->own_buffers()) all.push_back(t);
  std::vector<const void*> seen;
  int64_t bytes = 0;
  for (const Tensor* t : all) {
    if (!t->defined() || std::find(seen.begin(), seen.end(), t->ptr) != seen.end()) continue;
    seen.push_back(t->ptr);
    bytes += int64_t(be_.held_bytes(*t));
  }
  return bytes;
}

int64_t LlamaModel::weight_bytes() const {
  return int64_t(be_.held_bytes(master_arena_) + be_.held_bytes(weight_arena_));
}

int64_t LlamaModel::grad_bytes() const { return int64_t(be_.held_bytes(grad_arena_)); }

double LlamaModel::active_matmul_params() const {
  // Weights multiplied per token: embedding lookup excluded, lm head included (twice the
  // embedding when tied: it is a matmul there). MoE: routed expert weights count
  // top_k / n_experts (the active share); norms and biases not at all.
  const std::string expert_tag = ".mlp.experts.";
  const double active = cfg_.moe.n_experts > 0 ? double(cfg_.moe.top_k) / cfg_.moe.n_experts : 1;
  double n = 0;
  for (auto& p : params_) {
    if (p->kind == ParamKind::Embedding || p->kind == ParamKind::Norm ||
        p->kind == ParamKind::Bias)
      continue;
    n += double(p->numel()) * (p->name.find(expert_tag) != std::string::npos ? active : 1.0);
  }
  if (cfg_.tie_embeddings) n += double(wte_->numel());
  return n;
}

double LlamaModel::flops_per_token() const {
  // PaLM / llm.c convention: 6 FLOPs per multiplied weight per token (forward + backward), plus
  // 12 * L * d * T for the attention scores and values (not halved for causality).
  return 6.0 * active_matmul_params() + 12.0 * cfg_.n_layers * double(cfg_.d_model) * T_;
}

}  // namespace mf
