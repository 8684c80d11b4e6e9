// µP: per-parameter learning-rate, weight-decay and init multipliers, and the model scalars
// (readout multiplier, attention scale, residual multiplier), DESIGN §4.
//
// Three parametrisations, told apart by the config:
//   "sp"   mup.enabled = false (standard parametrisation: every multiplier 1, the model's default
//          init, attention 1/sqrt(head_dim)); Muon's update scale is optim.scale as configured.
//   "rms"  mup.enabled = false and optim.scale = "rms" with Muon: Moonlight's RMS matching
//          (Muon's update RMS = 0.2, the AdamW range, so both groups can share lr and wd); no
//          width scaling.
//   "mup"  mup.enabled = true, following Qiu et al. 2025 (arXiv 2512.05620) Table 1 plus
//          CompleteP for depth. With width_mult m = d_model / base_width and
//          depth_mult = n_layers / base_depth (every hidden dimension, d_ff and n_heads*head_dim,
//          is assumed to scale with d_model, as in the shipped sweeps):
//
//          parameter           optimizer  lr mult      init std                   wd mult
//          embed_tokens        AdamW      1            init_std                   1
//          lm_head (readout)   AdamW      1            init_std                   1
//          norm gains          AdamW      1            ones                       1
//          hidden matrices     AdamW      1/m          init_std / sqrt(m)  (*)    1/m (independent)
//          hidden matrices     Muon       1 (**)       init_std / sqrt(m)  (*)    1/m (independent)
//
//          (*)  fan-in rule: std proportional to 1/sqrt(fan_in), equal to the SP init at the base
//               width. o_proj / down_proj keep the GPT-2 factor 1/sqrt(2 * base_depth) (fixed at
//               the base depth: the residual multiplier handles depth).
//          (**) Muon's lr x sqrt(d_out/d_in) comes from optim.scale = "spectral"
//               (s = sqrt(rows/cols)); "shape" also transfers across width when aspect ratios
//               are fixed (it differs from spectral by a width-independent factor per matrix);
//               "rms" grows as sqrt(width) and breaks transfer (a warning says so).
//          Model scalars: logits x 1/m; attention scale sqrt(base_head_dim)/head_dim (the µP
//          1/head_dim rule, anchored so that it is 1/sqrt(head_dim) at the base head_dim;
//          base_head_dim 0 = the model's own head_dim); residual branches x
//          base_depth/n_layers. Weight decay of hidden matrices shrinks as 1/m per step in
//          both modes: with optim.wd_mode = "independent" lambda is multiplied by 1/m (the
//          optimizer applies wd_mult); with "coupled" the decay lr_eff * wd * wd_mult gets
//          wd_mult = 1/(m * lr_mult): 1 for AdamW (its lr_mult carries the 1/m), 1/m for Muon.
//          At the base shape (m = 1, depth_mult = 1, head_dim = base_head_dim) µP equals SP.
#pragma once
#include <string>
#include <vector>

#include "config/config.h"
#include "model/llama.h"
#include "model/params.h"

namespace mf {

// True for the last projection of a residual branch (o_proj, and every down_proj: dense MLP,
// routed and shared experts): the GPT-2 1/sqrt(2 L) init factor and µP's residual multiplier
// (folded into these weights on export) apply to them.
bool is_residual_out_proj(const std::string& name);

// "mup", "sp" or "rms" (see above).
std::string parametrization_name(const Config& cfg);

// The model scalars of the config's parametrisation (all defaults when µP is off). They are
// needed to construct the LlamaModel, before its parameters exist.
ModelScales mup_model_scales(const Config& cfg);

// One row of the resolved table.
struct MupRow {
  std::string name;
  std::string kind;       // param_kind_name
  std::string shape;      // "[out, in]"
  std::string optimizer;  // optim.name for hidden matrices (muon, shampoo, ...) | adamw | none
  double lr = 0;          // peak lr = group lr x lr_mult
  double lr_mult = 1;
  double wd = 0;          // group wd x wd_mult (the lambda the optimizer applies)
  double wd_mult = 1;
  double init_std = 0;    // 0: not random (norm gains start at ones, Bias buffers at zeros)
  double muon_scale = 0;  // Muon's update scale s (0 for AdamW)
};

struct MupResult {
  std::string parametrization;  // mup | sp | rms
  double width_mult = 1, depth_mult = 1;
  ModelScales scales;
  std::vector<MupRow> rows;
  std::vector<std::string> warnings;
  std::string table() const;  // human-readable, for the log
  std::string csv() const;    // header + one line per parameter
};

// Sets Param::lr_mult, wd_mult and init_std on every parameter for the config's
// parametrisation and returns the model scalars plus the resolved table. Call after
// constructing the model (with mup_model_scales) and before constructing the Optimizer (it
// reads lr_mult / wd_mult) and before init_weights (it reads init_std). Under SP the model's
// own init_std values are kept and lr_mult = wd_mult = 1.
MupResult apply_mup(const Config& cfg, const ParamList& params);

}  // namespace mf
