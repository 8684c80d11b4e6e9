#include "model/moe.h"

#include <algorithm>
#include <cmath>

#include "backend/profiler.h"
#include "core/error.h"

namespace mf {

namespace {
int64_t shared_width(const MoeConfig& m) { return int64_t(m.n_shared) * m.d_expert; }

// Same rule as ref::moe_capacity (kept here so the model does not include the CPU reference).
int64_t capacity_of(double factor, int64_t N, int64_t k, int64_t E) {
  if (factor <= 0) return 0;
  // An expert receives each token at most once, so N is never a limit; capping there also keeps
  // a huge factor from overflowing the int64 conversion.
  return int64_t(std::min(double(N), std::ceil(factor * double(N) * double(k) / double(E))));
}
}  // namespace

MoeScratch::MoeScratch(const ModelConfig& cfg, Backend& be, int64_t N) {
  const MoeConfig& m = cfg.moe;
  const int64_t d = cfg.d_model, de = m.d_expert, k = m.top_k, E = m.n_experts;
  const int64_t fs = shared_width(m);
  const DType act = be.act_dtype();
  xg = be.empty({N * k, d}, act);
  dxg = be.empty({N * k, d}, act);
  dyg = be.empty({N * k, d}, act);
  dh = be.empty({N * k, de}, act);
  dgu = be.empty({N * k, 2 * de}, act);
  split_storage(dgu, dgate, dup);
  dtopk_w = be.empty({N, k}, DType::F32);
  dlogits = be.empty({N, E}, DType::F32);
  aux_grad = be.empty({E}, DType::F32);
  if (fs > 0) {
    sdh = be.empty({N, fs}, act);
    sdgu = be.empty({N, 2 * fs}, act);
    split_storage(sdgu, sdgate, sdup);
  }
  if (cfg.recompute != "none") acts = MoeExpertActs(cfg, be, N);
}

MoeExpertActs::MoeExpertActs(const ModelConfig& cfg, Backend& be, int64_t N) {
  const MoeConfig& m = cfg.moe;
  const int64_t d = cfg.d_model, de = m.d_expert, k = m.top_k, fs = shared_width(m);
  const DType act = be.act_dtype();
  gu = be.empty({N * k, 2 * de}, act);
  split_storage(gu, gate, up);
  h = be.empty({N * k, de}, act);
  yg = be.empty({N * k, d}, act);
  if (fs > 0) {
    sgu = be.empty({N, 2 * fs}, act);
    split_storage(sgu, sgate, sup);
    sh = be.empty({N, fs}, act);
  }
}

std::vector<const Tensor*> MoeScratch::buffers() const {
  std::vector<const Tensor*> out = {&xg,       &dxg,      &dyg, &dh,  &dgu, &dtopk_w,
                                    &dlogits,  &aux_grad, &sdh, &sdgu};
  for (const Tensor* t : acts.buffers()) out.push_back(t);
  return out;
}

std::vector<const Tensor*> MoeLayer::own_buffers() const {
  std::vector<const Tensor*> out = {&probs_, &topk_w_, &score_sum_, &topk_idx_, &counts_,
                                    &offsets_, &row_of_, &row_token_, &bias_step_};
  if (!s_.acts.gu.defined())
    for (const Tensor* t : x_.buffers()) out.push_back(t);
  return out;
}

MoeLayer::MoeLayer(const ModelConfig& cfg, Backend& be, int layer, int64_t N, MoeScratch& scratch,
                   const AddParamFn& add, double out_std)
    : mc_(cfg.moe), be_(be), layer_(layer), N_(N), d_(cfg.d_model), de_(cfg.moe.d_expert),
      fs_(shared_width(cfg.moe)), s_(scratch) {
  const int64_t E = mc_.n_experts, k = mc_.top_k;
  MF_CHECK(E > 0, "model.moe.n_experts = ", E, " must be > 0 for an MoE layer");
  MF_CHECK(k > 0 && k <= E, "model.moe.top_k = ", k, " must be in [1, model.moe.n_experts = ", E,
           "]");
  MF_CHECK(de_ > 0, "model.moe.d_expert = ", de_, " must be > 0");
  MF_CHECK(mc_.score == "softmax" || mc_.score == "sigmoid", "model.moe.score is \"", mc_.score,
           "\"; expected one of: softmax, sigmoid");
  MF_CHECK(mc_.balance == "aux_loss" || mc_.balance == "bias" || mc_.balance == "none",
           "model.moe.balance is \"", mc_.balance, "\"; expected one of: aux_loss, bias, none");
  MF_CHECK(mc_.route_scale > 0, "model.moe.route_scale = ", mc_.route_scale, " must be > 0");
  MF_CHECK(mc_.capacity_factor >= 0, "model.moe.capacity_factor = ", mc_.capacity_factor,
           " must be >= 0 (0 = dropless)");
  capacity_ = capacity_of(mc_.capacity_factor, N, k, E);

  const std::string p = "model.layers." + std::to_string(layer) + ".mlp.";
  router_ = add(p + "gate.weight", ParamKind::Router, {E, d_}, cfg.init_std);
  if (mc_.balance == "bias") {
    bias_ = add(p + "gate.e_score_correction_bias", ParamKind::Bias, {E}, 0.0);
    bias_step_ = be.empty({E}, DType::F32);
  }
  for (int64_t e = 0; e < E; ++e) {
    const std::string q = p + "experts." + std::to_string(e) + ".";
    gate_.add(add(q + "gate_proj.weight", ParamKind::Hidden, {de_, d_}, cfg.init_std));
    up_.add(add(q + "up_proj.weight", ParamKind::Hidden, {de_, d_}, cfg.init_std));
    down_.add(add(q + "down_proj.weight", ParamKind::Hidden, {d_, de_}, out_std));
  }
  if (fs_ > 0) {
    shared_.gate = add(p + "shared_experts.gate_proj.weight", ParamKind::Hidden, {fs_, d_},
                       cfg.init_std);
    shared_.up = add(p + "shared_experts.up_proj.weight", ParamKind::Hidden, {fs_, d_},
                     cfg.init_std);
    shared_.down = add(p + "shared_experts.down_proj.weight", ParamKind::Hidden, {d_, fs_},
                       out_std);
  }

  probs_ = be.empty({N, E}, DType::F32);
  topk_w_ = be.empty({N, k}, DType::F32);
  score_sum_ = be.empty({E}, DType::F32);
  topk_idx_ = be.empty({N, k}, DType::I32);
  counts_ = be.empty({E}, DType::I32);
  offsets_ = be.empty({E + 1}, DType::I32);
  row_of_ = be.empty({N, k}, DType::I32);
  row_token_ = be.empty({N * k}, DType::I32);
  // Activation recompute: shared by every MoE layer, rebuilt before each one's backward.
  x_ = scratch.acts.gu.defined() ? scratch.acts : MoeExpertActs(cfg, be, N);
  counts_h_.assign(size_t(E), 0);
  offsets_h_.assign(size_t(E + 1), 0);
  score_sum_h_.assign(size_t(E), 0.f);
  step_load_.assign(size_t(E), 0);
  readback_ = be.make_readback({&offsets_, &counts_, &score_sum_});
}

MoeLayer::~MoeLayer() = default;

void MoeLayer::stack_projections(bool allow) {
  const int64_t E = mc_.n_experts;
  gu_w_.clear();
  gu_g_.clear();
  gu_ = ExpertGroup{};
  routed_stacked_ = allow;
  for (int64_t e = 0; routed_stacked_ && e < E; ++e) {
    gu_w_.push_back(stacked(*gate_.w[size_t(e)], *up_.w[size_t(e)]));
    gu_g_.push_back(stacked(*gate_.g[size_t(e)], *up_.g[size_t(e)]));
    routed_stacked_ = gu_w_.back().defined() && gu_g_.back().defined();
  }
  if (routed_stacked_) {
    for (int64_t e = 0; e < E; ++e) {  // pointers taken once the vectors are full
      gu_.w.push_back(&gu_w_[size_t(e)]);
      gu_.g.push_back(&gu_g_[size_t(e)]);
    }
  } else {
    gu_w_.clear();
    gu_g_.clear();
  }
  shared_stacked_ = false;
  shared_gu_w_ = shared_gu_g_ = Tensor{};
  if (allow && fs_ > 0) {
    shared_gu_w_ = stacked(shared_.gate->weight, shared_.up->weight);
    shared_gu_g_ = stacked(shared_.gate->grad, shared_.up->grad);
    shared_stacked_ = shared_gu_w_.defined() && shared_gu_g_.defined();
  }
}

MoeRouterArgs MoeLayer::route_args() const {
  MoeRouterArgs a;
  a.E = mc_.n_experts;
  a.k = mc_.top_k;
  a.sigmoid = mc_.score == "sigmoid";
  a.norm_topk = mc_.norm_topk;
  a.route_scale = float(mc_.route_scale);
  return a;
}

int64_t MoeLayer::last_dropped() {
  settle();
  return N_ * mc_.top_k - int64_t(offsets_h_.back());
}

std::vector<int32_t> MoeLayer::last_routing() {
  Tensor h = host_tensor(topk_idx_.shape, DType::I32);
  be_.download(topk_idx_, h);
  return std::vector<int32_t>(h.i32(), h.i32() + h.numel());
}

void MoeLayer::settle() {
  if (!pending_) return;
  const int64_t E = mc_.n_experts, k = mc_.top_k;
  readback_->wait();
  pending_ = false;
  const int32_t* off = readback_->host(0).i32();
  const int32_t* cnt = readback_->host(1).i32();
  const float* ss = readback_->host(2).f32();
  std::copy(off, off + E + 1, offsets_h_.begin());
  std::copy(cnt, cnt + E, counts_h_.begin());
  std::copy(ss, ss + E, score_sum_h_.begin());
  const int64_t M = offsets_h_[size_t(E)];
  MF_CHECK(capacity_ > 0 || M == N_ * k, "MoE layer ", layer_, ": the dropless plan kept ", M,
           " of ", N_ * k, " rows");

  // Balance loss: coef * E * sum_i f_i P_i with f_i = counts_i / (N k), P_i = score_sum_i / N.
  aux_loss_ = 0;
  if (mc_.balance == "aux_loss") {
    double s = 0;
    for (int64_t e = 0; e < E; ++e)
      s += double(counts_h_[size_t(e)]) / double(N_ * k) * double(score_sum_h_[size_t(e)]) /
           double(N_);
    aux_loss_ = mc_.aux_coef * double(E) * s;
  }
  if (pending_record_) {
    for (int64_t e = 0; e < E; ++e) step_load_[size_t(e)] += counts_h_[size_t(e)];
    step_dropped_ += N_ * k - M;
    step_aux_sum_ += aux_loss_;
    ++step_passes_;
  }
}

void MoeLayer::forward(const Tensor& x, Tensor& out, bool record) {
  const int64_t E = mc_.n_experts;
  const MoeRouterArgs ra = route_args();
  // Router in fp32 on the master weights; the bias only steers the selection.
  ProfRegion r(be_, "router");
  be_.moe_router_fwd(x, router_->master, bias_ ? &bias_->master : nullptr, ra, probs_,
                     topk_idx_, topk_w_, counts_, score_sum_);  // (N,E) (N,k) (N,k) (E) (E)
  settle();  // the previous pass's read-back, before its buffers are refilled
  be_.moe_permute(topk_idx_, int(E), capacity_, offsets_, row_of_, row_token_);
  // The host reads the plan back for the statistics and the balance loss without waiting; the
  // expert GEMMs take the row blocks from offsets_ on the device. The row ops run over all N*k
  // slots (the row buffers' size): dropless, every row is kept; with a capacity the kept count
  // M = offsets[E] is known only on the device, and the rows past it gather zeros, the grouped
  // GEMMs leave them untouched and no slot's row_of points at them.
  readback_->start();
  pending_ = true;
  pending_record_ = record;
  r.end();
  expert_activations(x);
  // Shared experts (a dense SwiGLU of width n_shared * d_expert) write out first, then the
  // routed experts' rows are added with their weights.
  r.next("combine");
  if (fs_ > 0) be_.matmul_fwd(x_.sh, shared_.down->weight, out);  // (N,d)
  be_.moe_combine_fwd(x_.yg, topk_w_, row_of_, out, /*accumulate=*/fs_ > 0);
}

void MoeLayer::rebuild(const Tensor& x) { expert_activations(x); }

void MoeLayer::expert_activations(const Tensor& x) {
  // Routed experts: gather rows by expert, one SwiGLU per expert block (combined by the caller).
  ProfRegion r(be_, "gather");
  be_.moe_gather(x, row_token_, s_.xg);  // (N*k,d)
  r.next("experts");
  if (routed_stacked_) {
    be_.moe_expert_fwd(s_.xg, gu_.w, offsets_, x_.gu);  // (N*k,2de)
    be_.swiglu_packed_fwd(x_.gu, x_.h);
  } else {
    be_.moe_expert_fwd(s_.xg, gate_.w, offsets_, x_.gate);  // (N*k,de)
    be_.moe_expert_fwd(s_.xg, up_.w, offsets_, x_.up);
    be_.swiglu_fwd(x_.gate, x_.up, x_.h);
  }
  be_.moe_expert_fwd(x_.h, down_.w, offsets_, x_.yg);  // (N*k,d)
  if (fs_ > 0) {
    r.next("shared");
    if (shared_stacked_) {
      be_.matmul_fwd(x, shared_gu_w_, x_.sgu);  // (N,2fs)
      be_.swiglu_packed_fwd(x_.sgu, x_.sh);
    } else {
      be_.matmul_fwd(x, shared_.gate->weight, x_.sgate);  // (N,fs)
      be_.matmul_fwd(x, shared_.up->weight, x_.sup);
      be_.swiglu_fwd(x_.sgate, x_.sup, x_.sh);
    }
  }
}

void MoeLayer::backward(const Tensor& dout, const Tensor& x, Tensor& dx, float aux_grad_scale) {
  const int64_t E = mc_.n_experts, k = mc_.top_k;
  // Shared experts: dx (=).
  ProfRegion r(be_, "shared");
  if (fs_ > 0) {
    be_.matmul_bwd(dout, x_.sh, shared_.down->weight, &s_.sdh, &shared_.down->grad, false);
    if (shared_stacked_) {
      be_.swiglu_packed_bwd(s_.sdh, x_.sgu, s_.sdgu);
      be_.matmul_bwd(s_.sdgu, x, shared_gu_w_, &dx, &shared_gu_g_, false);
    } else {
      be_.swiglu_bwd(s_.sdh, x_.sgate, x_.sup, s_.sdgate, s_.sdup);
      be_.matmul_bwd(s_.sdgate, x, shared_.gate->weight, &dx, &shared_.gate->grad, false);
      be_.matmul_bwd(s_.sdup, x, shared_.up->weight, &dx, &shared_.up->grad, true);
    }
  } else {
    be_.zero(dx);
  }
  // Combine: gradients into the expert outputs (by row) and the combine weights.
  r.next("combine");
  be_.moe_combine_bwd(dout, x_.yg, topk_w_, row_of_, s_.dyg, s_.dtopk_w);
  r.next("gather");
  be_.moe_gather(x, row_token_, s_.xg);  // recomputed rather than kept per layer
  r.next("experts");
  be_.moe_expert_bwd(s_.dyg, x_.h, down_.w, offsets_, &s_.dh, &down_.g, false);
  if (routed_stacked_) {
    be_.swiglu_packed_bwd(s_.dh, x_.gu, s_.dgu);
    be_.moe_expert_bwd(s_.dgu, s_.xg, gu_.w, offsets_, &s_.dxg, &gu_.g, false);
  } else {
    be_.swiglu_bwd(s_.dh, x_.gate, x_.up, s_.dgate, s_.dup);
    be_.moe_expert_bwd(s_.dgate, s_.xg, gate_.w, offsets_, &s_.dxg, &gate_.g, false);
    be_.moe_expert_bwd(s_.dup, s_.xg, up_.w, offsets_, &s_.dxg, &up_.g, true);
  }
  r.next("gather");
  be_.moe_gather_bwd(s_.dxg, row_of_, dx);  // dx (+=)
  // Router: combine-weight gradients, plus the balance loss's gradient on the scores:
  // d(coef E sum_i f_i P_i)/d pn[n,i] = coef E f_i / N, times aux_grad_scale (= loss_scale * N).
  const Tensor* aux = nullptr;
  r.next("router");
  if (mc_.balance == "aux_loss" && mc_.aux_coef > 0) {
    settle();  // the counts
    Tensor h = host_tensor({E});
    for (int64_t e = 0; e < E; ++e)
      h.f32()[e] = float(double(aux_grad_scale) * mc_.aux_coef * double(E) *
                         double(counts_h_[size_t(e)]) / double(N_ * k) / double(N_));
    be_.upload(h, s_.aux_grad);
    aux = &s_.aux_grad;
  }
  be_.moe_router_bwd(s_.dtopk_w, aux, x, router_->master, probs_, topk_idx_, route_args(),
                     s_.dlogits, dx, router_->grad);
}

void MoeLayer::step_stats(nlohmann::json& m) {
  settle();
  const int64_t E = mc_.n_experts;
  int64_t mn = step_load_[0], mx = step_load_[0];
  double sum = 0, sq = 0;
  for (int64_t v : step_load_) {
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    sum += double(v);
  }
  const double mean = sum / double(E);
  for (int64_t v : step_load_) sq += (double(v) - mean) * (double(v) - mean);
  m["layer"] = layer_;
  m["load_min"] = mn;
  m["load_max"] = mx;
  m["load_cv"] = mean > 0 ? std::sqrt(sq / double(E)) / mean : 0.0;
  m["aux_loss"] = step_passes_ > 0 ? step_aux_sum_ / step_passes_ : 0.0;
  m["dropped"] = step_dropped_;
}

void MoeLayer::append_step_stats(std::vector<float>& out) {
  settle();
  for (int64_t v : step_load_) out.push_back(float(v));
  out.push_back(float(step_dropped_));
  out.push_back(float(step_aux_sum_));
  out.push_back(float(step_passes_));
}

size_t MoeLayer::set_step_stats(const std::vector<float>& in, size_t at) {
  settle();
  MF_CHECK(at + step_load_.size() + 3 <= in.size(), "MoE layer ", layer_,
           ": step statistics buffer too short");
  for (auto& v : step_load_) v = int64_t(std::llround(in[at++]));
  step_dropped_ = int64_t(std::llround(in[at++]));
  step_aux_sum_ = in[at++];
  step_passes_ = int(std::lround(in[at++]));
  return at;
}

void MoeLayer::post_step() {
  settle();
  const int64_t E = mc_.n_experts;
  nlohmann::json m;
  step_stats(m);
  if (bias_ && step_passes_ > 0 && mc_.bias_rate > 0) {
    // DeepSeek-V3: raise the bias of under-loaded experts, lower it for over-loaded ones. The
    // step (+-bias_rate or 0, from the loads the host already has) goes up without waiting and
    // is added on the device: bias (=) bias + float(rate * sign), one f32 rounding, as a
    // PyTorch `bias += rate * sign` on an f32 tensor.
    double sum = 0;
    for (int64_t v : step_load_) sum += double(v);
    const double mean = sum / double(E);
    Tensor h = host_tensor({E});
    for (int64_t e = 0; e < E; ++e) {
      const double load = double(step_load_[size_t(e)]);
      const double sgn = load < mean ? 1.0 : (load > mean ? -1.0 : 0.0);
      h.f32()[e] = float(mc_.bias_rate * sgn);
    }
    be_.upload(h, bias_step_);
    be_.axpy(1.f, bias_step_, bias_->master);
    if (bias_->weight.ptr != bias_->master.ptr) be_.copy(bias_->master, bias_->weight);
  }
  last_metrics_ = m;  // the bias range is added by metrics(), when asked
  std::fill(step_load_.begin(), step_load_.end(), 0);
  step_dropped_ = 0;
  step_aux_sum_ = 0;
  step_passes_ = 0;
}

nlohmann::json MoeLayer::metrics() {
  nlohmann::json m = last_metrics_;
  if (m.is_null()) {  // no completed step yet: the statistics so far
    step_stats(m);
    return m;
  }
  if (bias_) {  // read back here (log steps), not in every post_step
    const int64_t E = mc_.n_experts;
    Tensor h = host_tensor({E});
    be_.download(bias_->master, h);
    m["bias_min"] = *std::min_element(h.f32(), h.f32() + E);
    m["bias_max"] = *std::max_element(h.f32(), h.f32() + E);
  }
  return m;
}

}  // namespace mf
