// Training diagnostics (DESIGN §6: records in metrics.jsonl) and MuonClip's QK-clip.
//
// Every train.diag_every steps the trainer writes one record
//   {"step": S, "diag": {"matrices": {NAME: {"sv_entropy", "spectral_norm", "weight_rms",
//                                            "update_rms"}, ...},
//                        "sv_entropy_mean": mean over hidden matrices,
//                        "max_attn_logit": [per layer], "qk_clipped": heads clipped this step,
//                        "seconds": time spent}}
// for every 2-D parameter (embedding, lm head, hidden matrices, router):
//  - sv_entropy: Moonlight's SVD entropy, -(1/log n) sum_i p_i log p_i with
//    p_i = sigma_i^2 / sum_j sigma_j^2 over the n = min(rows, cols) singular values (1 = flat
//    spectrum, 0 = rank one);
//  - spectral_norm: sigma_max;  weight_rms: sqrt(mean(W^2)) after the step;
//  - update_rms: sqrt(mean((W_after - W_before)^2)) of this step's update (optimizer + QK-clip).
// Singular values come from the eigenvalues of the smaller Gram matrix (W^T W or W W^T, double,
// OpenBLAS dsyrk) by Householder tridiagonalisation and implicit-shift QL, on the host: weights
// are downloaded, so a diagnostic step costs O(rows * n^2) per matrix. Keep diag_every large on
// big models (0 disables).
//
// Max attention logit: max over heads and causal pairs (j <= i) of scale * q_i . k_j, computed on
// the host from the rotated q and k the model kept from its last forward (the last micro-batch
// of the step), using its first kMaxLogitSeqs sequences, so it is a sample of the step's logits.
//
// QK-clip (optim.qk_clip_tau = tau > 0, Kimi K2's MuonClip), run after every optimizer step: for
// each query head h whose max logit S_h exceeds tau, gamma_h = tau / S_h. With kv group g (the
// query heads sharing one kv head) and gamma_g = min over the group, Wk's rows of kv head g are
// scaled by sqrt(gamma_g) and Wq's rows of head h by gamma_h / sqrt(gamma_g): without GQA this is
// Kimi's sqrt(gamma) on both; with GQA each head's logits are scaled by exactly gamma_h (heads
// under tau keep theirs). Master weights are updated (download, scale, upload) and the compute
// copies re-synced.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "config/config.h"
#include "model/params.h"

namespace mf {

class LlamaModel;

constexpr int kMaxLogitSeqs = 1;

// Eigenvalues of the symmetric n x n row-major matrix `a` (destroyed), ascending.
// Throws mf::Error if QL does not converge (non-finite input).
std::vector<double> symmetric_eigenvalues(std::vector<double>& a, int n);
// Singular values of a row-major [rows, cols] matrix, descending (min(rows, cols) of them).
std::vector<double> singular_values(const float* w, int64_t rows, int64_t cols);
// Moonlight's normalised SVD entropy of singular values `sv` (in [0, 1]; 1 when n == 1; 0 for
// an all-zero matrix).
double sv_entropy(const std::vector<double>& sv);

// Per layer, per query head: max over the first `max_seqs` sequences and causal pairs of
// scale * q.k, from the model's last forward.
std::vector<std::vector<double>> max_attention_logits(LlamaModel& model, Backend& be,
                                                      int max_seqs = kMaxLogitSeqs);

// Applies QK-clip to the model given per-head max logits; returns the number of heads clipped.
int apply_qk_clip(LlamaModel& model, Backend& be, double tau,
                  const std::vector<std::vector<double>>& max_logits);

class Diagnostics {
 public:
  Diagnostics(int diag_every, double qk_clip_tau)
      : every_(diag_every), tau_(qk_clip_tau) {}
  explicit Diagnostics(const Config& cfg)
      : Diagnostics(cfg.train.diag_every, cfg.optim.qk_clip_tau) {}

  // Whether 0-based step `step` (the update about to run) records diagnostics.
  bool due(int step) const { return every_ > 0 && (step + 1) % every_ == 0; }
  // Snapshot of the 2-D parameters' master weights (call before the optimizer step, only on due
  // steps: it downloads every matrix).
  void before_step(const ParamList& params, Backend& be);
  // QK-clip, when optim.qk_clip_tau > 0 (call after every optimizer step); returns the number of
  // heads clipped. No-op (0) otherwise. `combine`, when given, turns this process's per-head max
  // logits into the job's (data parallel: the max over ranks), so that every rank applies the same
  // clip to the same weights and they stay identical without sending any weights.
  int qk_clip(LlamaModel& model, Backend& be,
              const std::function<void(std::vector<std::vector<double>>&)>& combine = nullptr);
  // The record for completed step `done` (call after the optimizer step and qk_clip).
  nlohmann::json after_step(LlamaModel& model, Backend& be, int done);

 private:
  int every_ = 0;
  double tau_ = 0;
  std::vector<std::vector<float>> before_;        // per tracked param, host copy
  std::vector<std::vector<double>> last_logits_;  // from qk_clip this step (pre-clip)
  int last_clipped_ = 0;
  bool have_logits_ = false;
};

}  // namespace mf
