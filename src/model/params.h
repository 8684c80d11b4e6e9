// The parameter table: the contract between the model, the optimizers, checkpoints and
// Hugging Face I/O. Names follow Hugging Face (DESIGN §4); weights are [out, in].
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mf {

// What a parameter is, which decides its optimizer group and µP rules.
enum class ParamKind {
  Embedding,  // model.embed_tokens.weight [V,d]
  LmHead,     // lm_head.weight [V,d] (absent when tied)
  Hidden,     // 2-D hidden matrices: q/k/v/o, gate/up/down, experts (Muon's share)
  Norm,       // RMSNorm gains [d]
  Router,     // MoE router mlp.gate.weight [E,d]
  Bias,       // non-trained buffers updated by rule (e_score_correction_bias)
};
const char* param_kind_name(ParamKind k);
// Whether weight decay applies: not to RMSNorm gains (decay would pull them toward 0, not toward
// their init of 1; nanoGPT and Megatron-LM exclude them too) nor to Bias buffers.
inline bool weight_decayed(ParamKind k) { return k != ParamKind::Norm && k != ParamKind::Bias; }

struct Param {
  std::string name;  // Hugging Face name
  ParamKind kind = ParamKind::Hidden;
  Shape shape;
  Tensor master;     // f32 master weights (the tensor optimizers update)
  Tensor weight;     // compute copy in act_dtype (same tensor as master on CPU)
  Tensor grad;       // f32, same shape; accumulated over micro-batches
  double init_std = 0;  // std used at init (0 = ones for norms)
  // Per-parameter multipliers set from the µP section (1 when µP is off).
  double lr_mult = 1.0;
  double wd_mult = 1.0;
  bool trainable = true;
  int64_t numel() const { return shape_numel(shape); }
  int64_t rows() const { return shape.size() == 2 ? shape[0] : 1; }
  int64_t cols() const { return shape.size() == 2 ? shape[1] : shape_numel(shape); }
};

using ParamList = std::vector<Param*>;

}  // namespace mf
