#include "optim/mup.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "core/error.h"
#include "optim/matrix_opt.h"
#include "optim/optimizer.h"

namespace mf {

namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}


std::string shape_text(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string g(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}

std::string pad(const std::string& s, size_t w) { return s.size() >= w ? s : s + std::string(w - s.size(), ' '); }

}  // namespace

bool is_residual_out_proj(const std::string& name) {
  return ends_with(name, "o_proj.weight") || ends_with(name, "down_proj.weight");
}

std::string parametrization_name(const Config& cfg) {
  if (cfg.mup.enabled) return "mup";
  // Moonlight's rms matching: every optimizer that takes optim.scale (muon, normuon, freon, kaon)
  if (is_muon_like(cfg.optim.name) && cfg.optim.scale == "rms") return "rms";
  return "sp";
}

ModelScales mup_model_scales(const Config& cfg) {
  ModelScales s;
  if (!cfg.mup.enabled) return s;
  const std::string where = cfg.source.empty() ? "" : " (in " + cfg.source + ")";
  MF_CHECK(cfg.mup.base_width > 0, "mup.base_width must be > 0, got ", cfg.mup.base_width, where);
  MF_CHECK(cfg.mup.base_depth > 0, "mup.base_depth must be > 0, got ", cfg.mup.base_depth, where);
  const double m = double(cfg.model.d_model) / cfg.mup.base_width;
  s.logit_mult = 1.0 / m;
  // sqrt(base_hd) / hd: 1/sqrt(hd) at the base head_dim (so µP equals SP at the base shape),
  // falling as 1/hd when head_dim grows with width (the µP attention rule).
  const double hd = double(cfg.model.head_dim());
  MF_CHECK(cfg.mup.base_head_dim >= 0, "mup.base_head_dim must be >= 0, got ",
           cfg.mup.base_head_dim, where);
  const double base_hd = cfg.mup.base_head_dim > 0 ? double(cfg.mup.base_head_dim) : hd;
  s.attn_scale = std::sqrt(base_hd) / hd;
  s.residual_mult = double(cfg.mup.base_depth) / double(cfg.model.n_layers);
  return s;
}

MupResult apply_mup(const Config& cfg, const ParamList& params) {
  MupResult r;
  r.parametrization = parametrization_name(cfg);
  r.scales = mup_model_scales(cfg);
  const bool mup = cfg.mup.enabled;
  // Any matrix optimizer (muon, normuon, shampoo, soap, asgo, freon, kaon) takes the hidden
  // matrices; its lr rule is matrix_mup_lr_mult (src/optim/matrix_opt.h).
  const bool muon = is_matrix_optimizer(cfg.optim.name);
  if (mup) {
    r.width_mult = double(cfg.model.d_model) / cfg.mup.base_width;
    r.depth_mult = double(cfg.model.n_layers) / cfg.mup.base_depth;
    if (is_muon_like(cfg.optim.name) && cfg.optim.scale == "rms")
      r.warnings.push_back(
          "mup.enabled with optim.scale=rms: Muon's update scale 0.2*sqrt(max(rows, cols)) grows "
          "with width, so learning rates will not transfer; use optim.scale=spectral (Qiu et al.)");
  }
  const double m = r.width_mult;
  const bool independent = cfg.optim.wd_mode == "independent";

  for (Param* p : params) {
    MF_CHECK(p, "apply_mup: null entry in the parameter list");
    const bool optimized = p->trainable && p->kind != ParamKind::Bias;
    // Hidden-like: 2-D matrices whose fan-in and fan-out both scale with width (and the MoE
    // router, whose fan-in does; treated the same way until MoE µP is studied).
    const bool hidden = p->kind == ParamKind::Hidden || p->kind == ParamKind::Router;
    const bool on_muon = optimized && muon && in_main_group(p->kind, cfg.optim);

    p->lr_mult = 1.0;
    p->wd_mult = 1.0;
    if (mup) {
      if (hidden) {
        // AdamW: fan-in rule; matrix optimizers: their own rule (Muon: 1).
        p->lr_mult = on_muon ? matrix_mup_lr_mult(cfg.optim, p->shape, m) : 1.0 / m;
        // The decay per step scales as 1/m in both modes (Qiu et al.: independent wd x 1/width):
        // independent decays sched*wd*wd_mult; coupled decays lr*lr_mult*sched*wd*wd_mult, where
        // AdamW's lr_mult already carries the 1/m (wd_mult 1) and a matrix optimizer's does not
        // (Muon: wd_mult 1/m).
        p->wd_mult = independent ? 1.0 / m : 1.0 / (m * p->lr_mult);
        double std = cfg.model.init_std / std::sqrt(m);
        if (is_residual_out_proj(p->name)) std /= std::sqrt(2.0 * cfg.mup.base_depth);
        p->init_std = std;
      } else if (p->kind == ParamKind::Embedding || p->kind == ParamKind::LmHead) {
        p->init_std = cfg.model.init_std;
      }
      // Norm gains stay ones (init_std 0), Bias buffers are untouched.
    }

    MupRow row;
    row.name = p->name;
    row.kind = param_kind_name(p->kind);
    row.shape = shape_text(p->shape);
    row.lr_mult = p->lr_mult;
    row.wd_mult = p->wd_mult;
    row.init_std = p->init_std;
    if (!optimized) {
      row.optimizer = "none";
    } else if (on_muon) {
      row.optimizer = cfg.optim.name;
      row.lr = cfg.optim.lr * p->lr_mult;
      row.wd = cfg.optim.wd * p->wd_mult;
      const int64_t rows = p->shape[p->shape.size() - 2], cols = p->shape.back();
      row.muon_scale = is_muon_like(cfg.optim.name) ? muon_scale(cfg.optim.scale, rows, cols) : 1.0;
    } else {
      row.optimizer = "adamw";
      const bool main_group = in_main_group(p->kind, cfg.optim);  // only when optim.name == adamw
      row.lr = (main_group ? cfg.optim.lr : cfg.optim.adamw.lr) * p->lr_mult;
      row.wd = weight_decayed(p->kind) ? (main_group ? cfg.optim.wd : cfg.optim.adamw.wd) * p->wd_mult : 0.0;
    }
    r.rows.push_back(row);
  }
  return r;
}

std::string MupResult::table() const {
  std::ostringstream o;
  o << "parametrization " << parametrization << ": width_mult " << g(width_mult)
    << ", depth_mult " << g(depth_mult) << "; logit_mult " << g(scales.logit_mult)
    << ", attn_scale "
    << (scales.attn_scale > 0 ? g(scales.attn_scale) : std::string("1/sqrt(head_dim)"))
    << ", residual_mult " << g(scales.residual_mult) << "\n";
  size_t wn = 4;
  for (auto& r : rows) wn = std::max(wn, r.name.size());
  o << pad("param", wn) << "  " << pad("kind", 9) << "  " << pad("shape", 14) << "  "
    << pad("opt", 7) << "  " << pad("lr", 11) << "  " << pad("lr_mult", 9) << "  "
    << pad("wd", 11) << "  " << pad("wd_mult", 9) << "  " << pad("init_std", 11) << "  scale\n";
  for (auto& r : rows) {
    o << pad(r.name, wn) << "  " << pad(r.kind, 9) << "  " << pad(r.shape, 14) << "  "
      << pad(r.optimizer, 7) << "  " << pad(g(r.lr), 11) << "  " << pad(g(r.lr_mult), 9) << "  "
      << pad(g(r.wd), 11) << "  " << pad(g(r.wd_mult), 9) << "  "
      << pad(r.init_std > 0 ? g(r.init_std) : r.kind == param_kind_name(ParamKind::Bias)
                                                  ? std::string("zeros")
                                                  : std::string("ones"),
             11)
      << "  "
      << (r.optimizer != "adamw" && r.optimizer != "none" ? g(r.muon_scale) : std::string("-"))
      << "\n";
  }
  for (auto& w : warnings) o << "warning: " << w << "\n";
  return o.str();
}

std::string MupResult::csv() const {
  std::ostringstream o;
  o << "param,kind,shape,optimizer,lr,lr_mult,wd,wd_mult,init_std,muon_scale\n";
  for (auto& r : rows) {
    std::string shape = r.shape.substr(1, r.shape.size() - 2);  // "[a, b]" -> "a x b"
    for (size_t p = shape.find(", "); p != std::string::npos; p = shape.find(", "))
      shape.replace(p, 2, "x");
    o << r.name << "," << r.kind << "," << shape << "," << r.optimizer << "," << g(r.lr) << ","
      << g(r.lr_mult) << "," << g(r.wd) << "," << g(r.wd_mult) << "," << g(r.init_std) << ","
      << g(r.muon_scale) << "\n";
  }
  return o.str();
}

}  // namespace mf
