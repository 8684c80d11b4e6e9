#include "optim/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <tuple>

#include "backend/profiler.h"
#include "core/error.h"
#include "optim/schedule.h"

namespace {
// NorMuon: eps in O / (sqrt(v) + eps).
constexpr float kNorMuonEps = 1e-8f;
// Cap of the stacked scratch of one batched Newton-Schulz call: 16 Mi f32 elements (64 MiB).
// A group of same-shape matrices is cut into chunks of whole entries (a param is never split,
// so a chunk may exceed the cap by one param: the cap is max(largest param, this)). Why 64 MiB:
// the batching pays off once a call has a few dozen matrices (the 124M config's 48 768x768
// attention projections fit 28 to a chunk), while the optimizer's U scratch grows from one
// matrix to one chunk, and on CUDA the NS kernels add their bf16 X / Xn / A / B buffers (at most
// 2x the chunk's bytes, 4x on the f32 newton_schulz_coeffs path) to the shared Scratch.
constexpr int64_t kNsStackBudget = int64_t(16) << 20;
}  // namespace

namespace mf {

// ---- free helpers --------------------------------------------------------------------------

namespace {
bool is_optimized(const Param& p) { return p.trainable && p.kind != ParamKind::Bias; }

std::string in_file(const Config& c) { return c.source.empty() ? "" : " (in " + c.source + ")"; }

void validate_optim(const Config& c) {
  const OptimConfig& o = c.optim;
  const std::string where = in_file(c);
  {
    const auto& names = optimizer_names();
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    MF_CHECK(std::find(names.begin(), names.end(), o.name) != names.end(), "optim.name is \"",
             o.name, "\"; expected one of: ", list, where);
  }
  MF_CHECK(o.ns == "quintic" || o.ns == "polar_express", "optim.ns is \"", o.ns,
           "\"; expected one of: quintic, polar_express", where);
  MF_CHECK(o.wd_mode == "coupled" || o.wd_mode == "independent", "optim.wd_mode is \"",
           o.wd_mode, "\"; expected one of: coupled, independent", where);
  MF_CHECK(o.scale == "shape" || o.scale == "rms" || o.scale == "spectral", "optim.scale is \"",
           o.scale, "\"; expected one of: shape, rms, spectral", where);
  MF_CHECK(o.lr >= 0, "optim.lr must be >= 0, got ", o.lr, where);
  MF_CHECK(o.adamw.lr >= 0, "optim.adamw.lr must be >= 0, got ", o.adamw.lr, where);
  MF_CHECK(o.wd >= 0, "optim.wd must be >= 0, got ", o.wd, where);
  MF_CHECK(o.adamw.wd >= 0, "optim.adamw.wd must be >= 0, got ", o.adamw.wd, where);
  MF_CHECK(o.momentum >= 0 && o.momentum < 1, "optim.momentum must be in [0, 1), got ",
           o.momentum, where);
  MF_CHECK(o.ns_steps >= 1 && o.ns_steps <= 100, "optim.ns_steps must be in [1, 100], got ",
           o.ns_steps, where);
  MF_CHECK(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables), got ", o.grad_clip,
           where);
  for (int i = 0; i < 2; ++i) {
    MF_CHECK(o.betas[i] >= 0 && o.betas[i] < 1, "optim.betas[", i, "] must be in [0, 1), got ",
             o.betas[i], where);
    MF_CHECK(o.adamw.betas[i] >= 0 && o.adamw.betas[i] < 1, "optim.adamw.betas[", i,
             "] must be in [0, 1), got ", o.adamw.betas[i], where);
  }
  MF_CHECK(o.eps > 0, "optim.eps must be > 0, got ", o.eps, where);
  MF_CHECK(o.adamw.eps > 0, "optim.adamw.eps must be > 0, got ", o.adamw.eps, where);
}
}  // namespace

double global_grad_norm(const ParamList& params, Backend& be) {
  std::vector<const Tensor*> grads;
  for (const Param* p : params)
    if (p && is_optimized(*p) && p->grad.defined()) grads.push_back(&p->grad);
  double ss = 0;
  for (double s : be.sum_squares_each(grads)) ss += s;  // in parameter order
  return std::sqrt(ss);
}

double clip_factor(double norm, double clip) {
  if (clip <= 0) return 1.0;
  return std::min(1.0, clip / (norm + 1e-6));
}

double muon_scale(const std::string& mode, int64_t rows, int64_t cols) {
  const double r = double(rows), c = double(cols);
  if (mode == "shape") return std::sqrt(std::max(1.0, r / c));
  if (mode == "rms") return 0.2 * std::sqrt(std::max(r, c));
  if (mode == "spectral") return std::sqrt(r / c);
  MF_FAIL("optim.scale is \"", mode, "\"; expected one of: shape, rms, spectral");
}

const char* opt_kind_name(OptKind k) {
  switch (k) {
    case OptKind::Muon: return "muon";
    case OptKind::AdamW: return "adamw";
    case OptKind::NorMuon: return "normuon";
    case OptKind::Shampoo: return "shampoo";
    case OptKind::Soap: return "soap";
    case OptKind::Asgo: return "asgo";
    case OptKind::Freon: return "freon";
    case OptKind::Kaon: return "kaon";
  }
  return "?";
}

namespace {
OptKind kind_of(const std::string& name) {
  if (name == "muon") return OptKind::Muon;
  if (name == "normuon") return OptKind::NorMuon;
  if (name == "shampoo") return OptKind::Shampoo;
  if (name == "soap") return OptKind::Soap;
  if (name == "asgo") return OptKind::Asgo;
  if (name == "freon") return OptKind::Freon;
  if (name == "kaon") return OptKind::Kaon;
  return OptKind::AdamW;
}
bool muon_like(OptKind k) {
  return k == OptKind::Muon || k == OptKind::NorMuon || k == OptKind::Freon || k == OptKind::Kaon;
}
}  // namespace

// ---- Optimizer -----------------------------------------------------------------------------

Optimizer::Optimizer(const Config& cfg, const ParamList& params, Backend& be)
    : ocfg_(cfg.optim), scfg_(cfg.schedule), max_steps_(cfg.train.max_steps), be_(be) {
  validate_optim(cfg);
  validate_schedule(cfg.schedule);
  const bool muon = is_matrix_optimizer(ocfg_.name);
  const OptKind mkind = kind_of(ocfg_.name);
  std::map<std::string, int> seen;
  int64_t scratch = 0, freon_need = 0;
  for (Param* p : params) {
    MF_CHECK(p, "optimizer: null entry in the parameter list");
    MF_CHECK(seen.emplace(p->name, 1).second, "optimizer: parameter \"", p->name,
             "\" appears twice in the parameter list");
    if (!is_optimized(*p)) continue;
    MF_CHECK(p->master.defined() && p->master.dtype == DType::F32 && p->master.shape == p->shape,
             "optimizer: parameter \"", p->name, "\" needs an f32 master tensor of shape ",
             shape_str(p->shape));
    MF_CHECK(p->grad.defined() && p->grad.dtype == DType::F32 && p->grad.shape == p->shape,
             "optimizer: parameter \"", p->name, "\" needs an f32 grad tensor of shape ",
             shape_str(p->shape));
    OptEntry e;
    e.param = p;
    e.wd_mult = p->wd_mult;
    if (in_main_group(p->kind, ocfg_) && muon) {
      MF_CHECK(p->shape.size() == 2 || p->shape.size() == 3, "optimizer: ", ocfg_.name,
               " parameter \"", p->name, "\" must be a matrix [out,in] or a stack [E,out,in], got ",
               shape_str(p->shape));
      const int64_t rows = p->shape[p->shape.size() - 2], cols = p->shape.back();
      e.kind = mkind;
      e.lr = ocfg_.lr * p->lr_mult;
      e.wd = ocfg_.wd;
      if (muon_like(mkind)) {
        e.scale = muon_scale(ocfg_.scale, rows, cols);
        e.momentum = be.empty(p->shape, DType::F32);
        if (mkind == OptKind::NorMuon) {
          Shape vs(p->shape.begin(), p->shape.end() - 1);  // one entry per output row
          e.normuon_v = be.empty(vs, DType::F32);
        }
      } else {
        e.scale = 1.0;
        e.pre = make_preconditioner(ocfg_, p->shape, be);
      }
      scratch = std::max(scratch, p->numel());
      if (e.kind == OptKind::Freon) freon_need = std::max(freon_need, freon_workspace(p->shape));
    } else {
      e.kind = OptKind::AdamW;
      const bool hidden = in_main_group(p->kind, ocfg_);  // only when optim.name == adamw
      e.lr = (hidden ? ocfg_.lr : ocfg_.adamw.lr) * p->lr_mult;
      e.wd = !weight_decayed(p->kind) ? 0.0 : hidden ? ocfg_.wd : ocfg_.adamw.wd;
      e.b1 = hidden ? ocfg_.betas[0] : ocfg_.adamw.betas[0];
      e.b2 = hidden ? ocfg_.betas[1] : ocfg_.adamw.betas[1];
      e.eps = hidden ? ocfg_.eps : ocfg_.adamw.eps;
      e.cautious = hidden && ocfg_.cautious_wd;  // optim.* governs the hidden group only
      e.exp_avg = be.empty(p->shape, DType::F32);
      e.exp_avg_sq = be.empty(p->shape, DType::F32);
    }
    check_decay(e);
    entries_.push_back(std::move(e));
  }
  largest_matrix_param_ = scratch;
  plan_ns_chunks(kNsStackBudget);  // also allocates muon_scratch_ (largest param or chunk)
  if (freon_need > 0) freon_work_ = be.empty({freon_need}, DType::F32);
}

// Batched NS groups: Muon-like entries except Freon (its eigen path is per matrix), keyed by
// kind and [rows, cols], in the order of the entries; each group is cut into chunks of whole
// entries of at most max(largest param, budget) elements. Grows the U scratch to the largest chunk.
void Optimizer::plan_ns_chunks(int64_t budget) {
  MF_CHECK(budget >= 1, "optimizer: the Newton-Schulz stack budget must be >= 1 element, got ",
           budget);
  const int64_t cap = std::max(largest_matrix_param_, budget);
  ns_chunks_.clear();
  std::map<std::tuple<int, int64_t, int64_t>, size_t> open;  // key -> index of the open chunk
  int64_t need = largest_matrix_param_;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const OptEntry& e = entries_[i];
    if (e.pre || !muon_like(e.kind) || e.kind == OptKind::Freon) continue;
    const Shape& s = e.param->shape;
    const int64_t rows = s[s.size() - 2], cols = s.back();
    if (rows == 0 || cols == 0) continue;  // nothing to orthogonalise: the per-matrix path
    const int64_t n = e.param->numel();
    const auto key = std::make_tuple(int(e.kind), rows, cols);
    auto it = open.find(key);
    if (it == open.end() || ns_chunks_[it->second].numel + n > cap) {
      NsChunk c;
      c.rows = rows;
      c.cols = cols;
      ns_chunks_.push_back(c);
      it = open.insert_or_assign(key, ns_chunks_.size() - 1).first;
    }
    NsChunk& c = ns_chunks_[it->second];
    c.entries.push_back(i);
    c.slices += n / (rows * cols);
    c.numel += n;
    need = std::max(need, c.numel);
  }
  if (need > muon_scratch_numel()) muon_scratch_ = be_.empty({need}, DType::F32);
}

void Optimizer::set_ns_stack_budget(int64_t numel) { plan_ns_chunks(numel); }

double Optimizer::lr_multiplier(int step) const { return mf::lr_multiplier(scfg_, max_steps_, step); }
double Optimizer::lr(int step) const { return ocfg_.lr * lr_multiplier(step); }

double Optimizer::decay_factor(const OptEntry& e, double lr_eff, double sched) const {
  if (ocfg_.wd_mode == "independent") return sched * e.wd * e.wd_mult;
  return lr_eff * e.wd * e.wd_mult;
}

void Optimizer::check_decay(const OptEntry& e) const {
  // The schedule peaks at 1, so this is the largest fraction of the weights one step removes.
  const double decay = decay_factor(e, e.lr, 1.0);
  if (decay < 1) return;
  const bool hidden = in_main_group(e.param->kind, ocfg_);
  const std::string lr_key = hidden ? "optim.lr" : "optim.adamw.lr";
  const std::string wd_key = hidden ? "optim.wd" : "optim.adamw.wd";
  const double group_lr = hidden ? ocfg_.lr : ocfg_.adamw.lr;
  std::ostringstream why;
  if (ocfg_.wd_mode == "independent")
    why << wd_key << " " << e.wd << " x wd_mult " << e.wd_mult << " (optim.wd_mode independent)";
  else
    why << lr_key << " " << group_lr << " x lr_mult " << e.lr / group_lr << " x " << wd_key << " "
        << e.wd << " x wd_mult " << e.wd_mult << " (optim.wd_mode coupled)";
  MF_FAIL("weight decay would scale ", e.param->name, " by 1 - ", decay, " = ", 1 - decay,
          " per step at the peak of the schedule (decay ", why.str(),
          "): a decay of 1 or more zeroes or flips the weights every step. Lower ", wd_key,
          ocfg_.wd_mode == "coupled" ? " (coupled decay is lr x wd: wd 0.1 at lr 3e-4 removes 3e-5)"
                                     : " (independent decay is wd itself, per step: e.g. 1e-4)");
}

void Optimizer::step(int step, float grad_scale) {
  const double sched = lr_multiplier(step);
  std::vector<bool> batched(entries_.size(), false);
  if (batch_ns_)
    for (const NsChunk& c : ns_chunks_)
      for (size_t i : c.entries) batched[i] = true;
  // Profiler regions by kind of update (switched only when the kind changes).
  ProfRegion r(be_, "opt.adamw");
  const char* region = "opt.adamw";
  auto in_region = [&](const char* name) {
    if (std::strcmp(name, region) != 0) r.next(name);
    region = name;
  };
  for (size_t i = 0; i < entries_.size(); ++i) {
    OptEntry& e = entries_[i];
    if (e.kind == OptKind::AdamW) {
      in_region("opt.adamw");
      step_adamw(e, sched, grad_scale);
    } else if (e.pre) {
      in_region("opt.preconditioned");
      step_preconditioned(e, sched, grad_scale);
    } else if (!batched[i]) {
      in_region("opt.matrix");
      step_muon(e, sched, grad_scale);
    }
  }
  in_region("opt.matrix_batched");
  if (batch_ns_)
    for (const NsChunk& c : ns_chunks_) step_muon_chunk(c, sched, grad_scale);
  ++t_;
  in_region("opt.weight_cast");
  // CUDA: refresh the bf16 compute copy from the fp32 master.
  if (refresh_weights_) {
    refresh_weights_();
    return;
  }
  for (OptEntry& e : entries_) {
    Param& p = *e.param;
    if (p.weight.defined() && p.weight.ptr != p.master.ptr) be_.copy(p.master, p.weight);
  }
}

void Optimizer::step_adamw(OptEntry& e, double sched, float grad_scale) {
  Param& p = *e.param;
  const double lr_eff = e.lr * sched;
  const double t = double(t_ + 1);
  AdamWArgs a;
  a.lr = float(lr_eff);
  a.b1 = float(e.b1);
  a.b2 = float(e.b2);
  a.eps = float(e.eps);
  a.decay = float(decay_factor(e, lr_eff, sched));
  a.bc1 = float(1.0 - std::pow(e.b1, t));
  a.bc2 = float(1.0 - std::pow(e.b2, t));
  a.grad_scale = grad_scale;
  a.cautious = e.cautious;
  be_.adamw_update(p.master, p.grad, e.exp_avg, e.exp_avg_sq, a);
}

int64_t Optimizer::max_ns_batch() const {
  int64_t k = 1;
  if (batch_ns_)
    for (const NsChunk& c : ns_chunks_) k = std::max(k, c.slices);
  return k;
}

bool Optimizer::runs_newton_schulz() const {
  for (const OptEntry& e : entries_)
    if (!e.pre && muon_like(e.kind) && e.kind != OptKind::Freon) return true;
  return false;
}

int64_t Optimizer::work_bytes() const {
  int64_t b = int64_t(be_.held_bytes(freon_work_));
  for (const OptEntry& e : entries_)
    if (e.pre) b += e.pre->work_bytes();
  return b;
}

SymSizes Optimizer::sym_sizes() const {
  SymSizes s;
  for (const OptEntry& e : entries_) {
    if (e.pre) {
      const SymSizes p = e.pre->sym_sizes();
      s.eig_n = std::max(s.eig_n, p.eig_n);
      s.func_n = std::max(s.func_n, p.func_n);
    } else if (e.kind == OptKind::Freon) {  // the Gram matrix of the smaller side
      const Shape& sh = e.param->shape;
      s.func_n = std::max(s.func_n, std::min(sh[sh.size() - 2], sh.back()));
    }
  }
  return s;
}

void Optimizer::orthogonalize(OptKind kind, Tensor& U) {
  if (kind == OptKind::Kaon) {
    be_.newton_schulz_coeffs(U, U, kaon_coefficients(ocfg_.kaon.steps), 1.0f);
    be_.scale(U, 1.0f / kKaonNorm);
  } else if (ocfg_.ns == "polar_express") {
    be_.newton_schulz_coeffs(U, U, ns_coefficients(ocfg_.ns, ocfg_.ns_steps),
                             kPolarExpressNormMult);
  } else {
    be_.newton_schulz(U, U, ocfg_.ns_steps, kNsA, kNsB, kNsC);
  }
}

// The per-matrix path (Freon, or batching off): one orthogonalisation per [out, in] matrix.
void Optimizer::step_muon(OptEntry& e, double sched, float grad_scale) {
  Param& p = *e.param;
  Tensor U = muon_scratch_.slice0(0, p.numel()).view(p.shape);
  be_.muon_momentum(p.grad, e.momentum, U, float(ocfg_.momentum), ocfg_.nesterov, grad_scale);
  const int64_t rows = p.shape[p.shape.size() - 2], cols = p.shape.back();
  const int64_t n_mat = p.shape.size() == 2 ? 1 : p.shape[0];
  // Stacked experts: each [out, in] matrix is orthogonalized on its own.
  for (int64_t x = 0; x < n_mat; ++x) {
    Tensor m = n_mat == 1 ? U : U.slice0(x, x + 1).view({rows, cols});
    if (e.kind == OptKind::Freon)
      freon_orthogonalize(be_, m, m, ocfg_.freon.c, ocfg_.freon.eps, &freon_work_);
    else
      orthogonalize(e.kind, m);
  }
  finish_muon(e, U, sched);
}

// The batched path: the chunk's momentum outputs fill consecutive slices of the scratch, one NS
// call orthogonalises the stack [slices, rows, cols], then each entry finishes on its own slices.
void Optimizer::step_muon_chunk(const NsChunk& c, double sched, float grad_scale) {
  int64_t off = 0;
  for (size_t i : c.entries) {
    OptEntry& e = entries_[i];
    Param& p = *e.param;
    Tensor U = muon_scratch_.slice0(off, off + p.numel()).view(p.shape);
    be_.muon_momentum(p.grad, e.momentum, U, float(ocfg_.momentum), ocfg_.nesterov, grad_scale);
    off += p.numel();
  }
  Tensor S = muon_scratch_.slice0(0, c.numel).view({c.slices, c.rows, c.cols});
  orthogonalize(entries_[c.entries.front()].kind, S);
  off = 0;
  for (size_t i : c.entries) {
    OptEntry& e = entries_[i];
    Tensor U = muon_scratch_.slice0(off, off + e.param->numel()).view(e.param->shape);
    finish_muon(e, U, sched);
    off += e.param->numel();
  }
}

// NorMuon's row normalisation (per [out, in] matrix), the weight decay and p -= lr s U.
void Optimizer::finish_muon(OptEntry& e, Tensor& U, double sched) {
  Param& p = *e.param;
  const double lr_eff = e.lr * sched;
  if (e.kind == OptKind::NorMuon) {
    const int64_t rows = p.shape[p.shape.size() - 2], cols = p.shape.back();
    const int64_t n_mat = p.shape.size() == 2 ? 1 : p.shape[0];
    for (int64_t x = 0; x < n_mat; ++x) {
      Tensor m = n_mat == 1 ? U : U.slice0(x, x + 1).view({rows, cols});
      Tensor v = n_mat == 1 ? e.normuon_v : e.normuon_v.slice0(x, x + 1).view({rows});
      be_.normuon_normalize(m, v, float(ocfg_.normuon_beta2), kNorMuonEps);
    }
  }
  apply_decay(e, decay_factor(e, lr_eff, sched), U);
  be_.axpy(float(-lr_eff * e.scale), U, p.master);
}

void Optimizer::step_preconditioned(OptEntry& e, double sched, float grad_scale) {
  Param& p = *e.param;
  const double lr_eff = e.lr * sched;
  Tensor D = muon_scratch_.slice0(0, p.numel()).view(p.shape);
  e.pre->direction(p.grad, grad_scale, t_ + 1, D);
  if (!e.pre->updates_at(t_ + 1)) return;  // SOAP's first step: statistics only, no decay
  apply_decay(e, decay_factor(e, lr_eff, sched), D);
  be_.axpy(float(-lr_eff * e.scale), D, p.master);
}

void Optimizer::apply_decay(OptEntry& e, double decay, const Tensor& update) {
  if (decay == 0) return;
  if (ocfg_.cautious_wd)
    be_.cautious_decay(e.param->master, update, float(decay));
  else
    be_.scale(e.param->master, float(1.0 - decay));
}

void Optimizer::zero_grad() {
  for (OptEntry& e : entries_) be_.zero(e.param->grad);
}

// ---- description ---------------------------------------------------------------------------

std::string Optimizer::describe(bool per_param) const {
  size_t wname = 5;
  for (const OptEntry& e : entries_) wname = std::max(wname, e.param->name.size());
  std::ostringstream os;
  int64_t n_muon = 0, n_adamw = 0;
  for (const OptEntry& e : entries_) (e.kind != OptKind::AdamW ? n_muon : n_adamw) += e.param->numel();
  const std::string matrix_name = ocfg_.name == "muon" ? std::string("Muon") : ocfg_.name;
  os << "optimizer " << ocfg_.name << ": " << n_muon << " params in "
     << (is_matrix_optimizer(ocfg_.name) ? matrix_name : std::string("Muon")) << ", " << n_adamw
     << " in AdamW; wd_mode " << ocfg_.wd_mode << "; schedule " << scfg_.decay << " (warmup "
     << scfg_.warmup << ", min_lr_ratio " << scfg_.min_lr_ratio << ", max_steps " << max_steps_
     << "); grad_clip " << ocfg_.grad_clip << "\n";
  if (ocfg_.name == "muon")
    os << "muon: momentum " << ocfg_.momentum << (ocfg_.nesterov ? " nesterov" : "")
       << ", ns_steps " << ocfg_.ns_steps << ", scale " << ocfg_.scale << "\n";
  if (ocfg_.name == "muon" && ocfg_.ns != "quintic") os << "ns " << ocfg_.ns << "\n";
  if (ocfg_.name == "normuon")
    os << "normuon: momentum " << ocfg_.momentum << (ocfg_.nesterov ? " nesterov" : "")
       << ", ns " << ocfg_.ns << " x" << ocfg_.ns_steps << ", beta2 " << ocfg_.normuon_beta2
       << ", scale " << ocfg_.scale << "\n";
  if (ocfg_.name == "freon")
    os << "freon: momentum " << ocfg_.momentum << ", c " << ocfg_.freon.c << " (Schatten q "
       << 2 - 2 * ocfg_.freon.c << "), eps " << ocfg_.freon.eps << ", scale " << ocfg_.scale << "\n";
  if (ocfg_.name == "kaon")
    os << "kaon: momentum " << ocfg_.momentum << ", steps " << ocfg_.kaon.steps << ", scale "
       << ocfg_.scale << "\n";
  if (ocfg_.cautious_wd)
    os << "cautious weight decay on the hidden matrices (" << ocfg_.name
       << "); the optim.adamw group decays as usual (norm gains never)\n";
  for (const OptEntry& e : entries_)
    if (e.pre) {
      os << e.pre->describe() << " (first matrix: " << e.param->name << ")\n";
      break;
    }
  auto scale_extra = [](const OptEntry& e) {
    std::string extra = "-", scale = "-";
    if (e.kind == OptKind::AdamW) {
      char b[96];
      std::snprintf(b, sizeof b, "%g,%g/%g", e.b1, e.b2, e.eps);
      extra = b;
    } else {
      char b[32];
      std::snprintf(b, sizeof b, "%.4g", e.scale);
      scale = b;
    }
    return std::make_pair(scale, extra);
  };
  char buf[512];
  if (!per_param) {
    // Groups in order of first appearance; the key is the row as printed.
    struct Group {
      std::string row;
      int tensors = 0;
      int64_t params = 0;
    };
    std::vector<Group> groups;
    for (const OptEntry& e : entries_) {
      const auto [scale, extra] = scale_extra(e);
      std::snprintf(buf, sizeof buf, "%-9s  %-7s  %-10.4g  %-10.4g  %-7s  %-14s",
                    param_kind_name(e.param->kind), opt_kind_name(e.kind), e.lr,
                    e.wd * e.wd_mult, scale.c_str(), extra.c_str());
      auto it = std::find_if(groups.begin(), groups.end(),
                             [&](const Group& g) { return g.row == buf; });
      if (it == groups.end()) it = groups.insert(groups.end(), Group{buf});
      it->tensors += 1;
      it->params += e.param->numel();
    }
    std::snprintf(buf, sizeof buf, "%-9s  %-7s  %-10s  %-10s  %-7s  %-14s  %7s  %s\n", "kind", "opt",
                  "lr", "wd", "scale", "betas/eps", "tensors", "params");
    os << buf;
    for (const Group& g : groups) {
      std::snprintf(buf, sizeof buf, "%s  %7d  %lld\n", g.row.c_str(), g.tensors,
                    (long long)g.params);
      os << buf;
    }
    return os.str();
  }
  std::snprintf(buf, sizeof buf, "%-*s  %-9s  %-14s  %-7s  %-10s  %-10s  %-7s  %s\n", int(wname),
                "param", "kind", "shape", "opt", "lr", "wd", "scale", "betas/eps");
  os << buf;
  for (const OptEntry& e : entries_) {
    const Param& p = *e.param;
    const auto [scale, extra] = scale_extra(e);
    std::snprintf(buf, sizeof buf, "%-*s  %-9s  %-14s  %-7s  %-10.4g  %-10.4g  %-7s  %s\n",
                  int(wname), p.name.c_str(), param_kind_name(p.kind), shape_str(p.shape).c_str(),
                  opt_kind_name(e.kind), e.lr, e.wd * e.wd_mult, scale.c_str(), extra.c_str());
    os << buf;
  }
  return os.str();
}

// ---- state ---------------------------------------------------------------------------------

std::vector<std::pair<std::string, Tensor>> Optimizer::state_tensors() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const OptEntry& e : entries_) {
    const std::string& n = e.param->name;
    if (e.pre) {
      for (auto& kv : e.pre->state()) out.emplace_back(n + kv.first, kv.second);
    } else if (e.kind != OptKind::AdamW) {
      out.emplace_back(n + ".momentum_buffer", e.momentum);
      if (e.normuon_v.defined()) out.emplace_back(n + ".normuon_v", e.normuon_v);
    } else {
      out.emplace_back(n + ".exp_avg", e.exp_avg);
      out.emplace_back(n + ".exp_avg_sq", e.exp_avg_sq);
    }
  }
  return out;
}

nlohmann::json Optimizer::state_json() const {
  nlohmann::json j = {{"optimizer", ocfg_.name}, {"router", ocfg_.router}, {"step_count", t_}};
  // The settings that decide how a state tensor's elements are laid out. Shampoo, SOAP and ASGO
  // keep each block's statistics in one flat tensor per matrix, whose size often does not
  // change with the block size: read under another one, they pass the shape check and are
  // silently scrambled. load_checkpoint refuses a resume across any of these.
  nlohmann::json layout = nlohmann::json::object();
  if (ocfg_.name == "shampoo") {
    layout["optim.shampoo.block_size"] = ocfg_.shampoo.block_size;
    layout["optim.shampoo.graft"] = ocfg_.shampoo.graft;
  } else if (ocfg_.name == "soap") {
    layout["optim.soap.block_size"] = ocfg_.soap.block_size;
  } else if (ocfg_.name == "asgo") {
    layout["optim.asgo.block_size"] = ocfg_.asgo.block_size;
  }
  if (!layout.empty()) j["layout"] = layout;
  return j;
}

void Optimizer::load_state(const std::vector<std::pair<std::string, Tensor>>& host_tensors,
                           const nlohmann::json& scalars, const std::string& origin) {
  MF_CHECK(scalars.is_object() && scalars.contains("step_count") &&
               scalars["step_count"].is_number_integer() && scalars["step_count"].get<int64_t>() >= 0,
           "optimizer state in ", origin, ": missing or invalid \"step_count\" (got ",
           scalars.dump(), ")");
  if (scalars.contains("optimizer")) {
    MF_CHECK(scalars["optimizer"].is_string(), "optimizer state in ", origin,
             ": \"optimizer\" must be a string");
    const std::string saved = scalars["optimizer"].get<std::string>();
    MF_CHECK(saved == ocfg_.name, "optimizer state in ", origin, " was saved with optim.name=",
             saved, " but this run uses optim.name=", ocfg_.name);
  }
  std::map<std::string, const Tensor*> given;
  for (const auto& kv : host_tensors)
    MF_CHECK(given.emplace(kv.first, &kv.second).second, "optimizer state in ", origin,
             ": tensor \"", kv.first, "\" appears twice");
  // Check everything first so that a failed load leaves the state untouched.
  auto expected = state_tensors();
  for (const auto& kv : expected) {
    auto it = given.find(kv.first);
    MF_CHECK(it != given.end(), "optimizer state in ", origin, ": missing tensor \"", kv.first,
             "\" (expected shape ", shape_str(kv.second.shape), ")");
    const Tensor& src = *it->second;
    MF_CHECK(src.shape == kv.second.shape, "optimizer state in ", origin, ": tensor \"", kv.first,
             "\" has shape ", shape_str(src.shape), ", expected ", shape_str(kv.second.shape));
    MF_CHECK(src.dtype == DType::F32 && src.device == Device::CPU && src.defined(),
             "optimizer state in ", origin, ": tensor \"", kv.first,
             "\" must be a host f32 tensor, got ", dtype_name(src.dtype));
  }
  if (given.size() != expected.size()) {
    std::map<std::string, int> want;
    for (const auto& kv : expected) want.emplace(kv.first, 1);
    for (const auto& kv : given)
      MF_CHECK(want.count(kv.first), "optimizer state in ", origin, ": unexpected tensor \"",
               kv.first, "\" (no optimized parameter of that name/state in this run)");
  }
  for (auto& kv : expected) be_.upload(*given.at(kv.first), kv.second);
  t_ = scalars["step_count"].get<int64_t>();
}

}  // namespace mf
