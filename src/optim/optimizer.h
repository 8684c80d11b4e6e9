// Parameter groups, AdamW + Muon updates, LR schedule, weight decay and gradient clipping
// (DESIGN §4). The optimizer is written once against the Backend: the same code drives the
// fp32 CPU reference and the CUDA backend (fp32 master weights, grads and state).
//
// Groups:
//  - optim.name == "muon" (or another matrix optimizer: normuon, shampoo, soap, asgo, freon,
//    kaon; src/optim/matrix_opt.h): ParamKind::Hidden -> that optimizer; for muon: Muon (optim.lr, momentum, nesterov, ns_steps,
//    scale, wd); Embedding, LmHead, Norm, Router -> AdamW with optim.adamw.{lr,betas,eps,wd}.
//  - optim.name == "adamw": Hidden -> AdamW with optim.{lr,betas,eps,wd}; the rest as above.
//  - ParamKind::Bias and params with trainable == false are not optimized.
// Per parameter: lr_eff = group lr * schedule(step) * lr_mult. Weight decay factor, applied as
// p *= (1 - decay) before the update:
//    coupled:     decay = lr_eff * wd * wd_mult      (PyTorch AdamW / Muon)
//    independent: decay = schedule(step) * wd * wd_mult  (not multiplied by the peak lr)
// Muon: M = mu M + g; U = nesterov ? g + mu M : M; O = NS(U); p = p(1-decay) - lr_eff * s * O,
// s from optim.scale (shape | rms | spectral). 3-D hidden params [E, out, in] are orthogonalized
// one [out, in] slice at a time.
// Batched Newton-Schulz (muon, normuon, kaon): entries whose matrices share one [out, in] shape
// are grouped (a stacked [E, out, in] param brings E slices); per group the momentum outputs are
// written into consecutive slices of one stacked scratch and orthogonalised by ONE batched
// newton_schulz / newton_schulz_coeffs call (each slice normalised on its own), then each entry
// gets its NorMuon normalisation, decay and axpy as before. On the CPU every update is bitwise
// the per-matrix one. Freon (eigen path) stays per matrix. See kNsStackBudget for the scratch cap.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "config/config.h"
#include "model/params.h"
#include "optim/matrix_opt.h"

namespace mf {

// Newton-Schulz quintic coefficients (Keller Jordan's Muon).
constexpr float kNsA = 3.4445f, kNsB = -4.7750f, kNsC = 2.0315f;

// sqrt(sum over optimized params of sum(grad^2)) (params that are trainable and not Bias).
double global_grad_norm(const ParamList& params, Backend& be);
// min(1, clip / (norm + 1e-6)) when clip > 0, else 1.
double clip_factor(double norm, double clip);
// Muon update scale s for a [rows, cols] matrix and optim.scale mode.
double muon_scale(const std::string& mode, int64_t rows, int64_t cols);

// Whether a parameter of this kind is in the main group, the one optim.name, optim.lr and
// optim.wd govern (the hidden matrices; the MoE router too with optim.router = "matrix"), as
// opposed to the optim.adamw group (embeddings, lm_head, norms, and the router by default).
inline bool in_main_group(ParamKind k, const OptimConfig& o) {
  return k == ParamKind::Hidden || (k == ParamKind::Router && o.router == "matrix");
}

enum class OptKind { Muon, AdamW, NorMuon, Shampoo, Soap, Asgo, Freon, Kaon };
const char* opt_kind_name(OptKind k);

// One optimized parameter with its resolved hyper-parameters and its state.
struct OptEntry {
  Param* param = nullptr;
  OptKind kind = OptKind::AdamW;
  double lr = 0;       // peak lr = group lr * lr_mult
  double wd = 0;       // group wd (times wd_mult at update time)
  double wd_mult = 1;
  double b1 = 0.9, b2 = 0.95, eps = 1e-8;  // AdamW
  bool cautious = false;  // AdamW: cautious decay (hidden matrices under optim.name = adamw)
  double scale = 1;    // Muon s (per [out,in] matrix); 1 for shampoo, soap, asgo
  Tensor exp_avg, exp_avg_sq;  // AdamW state
  Tensor momentum;             // Muon state (also normuon, freon, kaon)
  Tensor normuon_v;            // NorMuon: per-row second moment, [out] or [E, out]
  std::shared_ptr<MatrixPreconditioner> pre;  // shampoo, soap, asgo
};

class Optimizer {
 public:
  Optimizer(const Config& cfg, const ParamList& params, Backend& be);

  // One update at 0-based training step `step` using the gradients accumulated in Param::grad,
  // each multiplied by `grad_scale` (clip factor, 1/accumulation...). Grads are left untouched.
  void step(int step, float grad_scale);
  // Zeroes the gradients of every optimized parameter.
  void zero_grad();
  // What step() does last to refresh the compute copies (bf16 on CUDA) from the updated masters.
  // By default one cast per optimized parameter; a model whose copies live in one arena passes
  // its one whole-arena cast (LlamaModel::sync_weights), and a data-parallel trainer that
  // refreshes after its all-gathers passes a no-op.
  void set_weight_refresh(std::function<void()> fn) { refresh_weights_ = std::move(fn); }

  double lr_multiplier(int step) const;  // schedule value at `step`
  double lr(int step) const;             // optim.lr * schedule (for logging)
  int64_t step_count() const { return t_; }  // updates applied so far (AdamW bias correction)
  const std::vector<OptEntry>& entries() const { return entries_; }
  // Batched Newton-Schulz across matrices of one shape (default on). Off: one NS call per
  // [out, in] matrix, the pre-batching path (tests compare the two bitwise on the CPU).
  void set_batch_newton_schulz(bool on) { batch_ns_ = on; }
  bool batch_newton_schulz() const { return batch_ns_; }
  // f32 elements of the U / NS-output scratch (the largest matrix param, or the largest stacked
  // group chunk when batching), for memory plans.
  int64_t muon_scratch_numel() const { return muon_scratch_.defined() ? muon_scratch_.numel() : 0; }
  int64_t muon_scratch_bytes() const { return int64_t(be_.held_bytes(muon_scratch_)); }
  // Largest number of [out, in] slices in one batched NS call (1 when nothing is batched).
  int64_t max_ns_batch() const;
  // Whether a step runs Newton-Schulz (muon, normuon, kaon entries; not Freon or the
  // preconditioners, which use the U scratch only for their direction).
  bool runs_newton_schulz() const;
  // Bytes of the tensors held besides state_tensors() and the U scratch: the preconditioners'
  // scaled gradients and block buffers, Freon's temporaries. For memory plans.
  int64_t work_bytes() const;
  // The largest matrices a step decomposes (SOAP's bases, Shampoo's / ASGO's roots, Freon).
  SymSizes sym_sizes() const;
  const OptimConfig& config() const { return ocfg_; }
  // Re-plans the batched groups with another cap on one call's stack (f32 elements; the
  // default is kNsStackBudget in optimizer.cpp, 64 MiB). For tests of the chunking.
  void set_ns_stack_budget(int64_t numel);

  // The optimizer's settings, then a table (kind, optimizer, peak lr, wd, scale, betas) with one
  // row per parameter, named, with its shape (per_param), or one per group of parameters that
  // share all of those, with their tensor and parameter counts (the console's summary).
  std::string describe(bool per_param = true) const;

  // State for checkpoints. Tensors are the live backend tensors (download them before writing;
  // on CPU they are host tensors), named "<param>.exp_avg", "<param>.exp_avg_sq",
  // "<param>.momentum_buffer" (+ "<param>.normuon_v"; Shampoo / SOAP / ASGO add their statistics,
  // see MatrixPreconditioner::state). Scalars: {"optimizer", "step_count"}.
  std::vector<std::pair<std::string, Tensor>> state_tensors() const;
  nlohmann::json state_json() const;
  // Restores state from host f32 tensors (as read from a checkpoint) and the scalars. Every
  // expected name must be present with the exact shape and no unknown names may appear;
  // otherwise mf::Error naming the tensor. `origin` (a file path) is used in messages.
  void load_state(const std::vector<std::pair<std::string, Tensor>>& host_tensors,
                  const nlohmann::json& scalars, const std::string& origin = "optimizer state");

 private:
  void step_adamw(OptEntry& e, double sched, float grad_scale);
  // One group chunk of the batched path: entries (indices into entries_) of one [rows, cols]
  // matrix shape and one kind, slices = sum of their matrices, numel = slices * rows * cols.
  struct NsChunk {
    std::vector<size_t> entries;
    int64_t rows = 0, cols = 0, slices = 0, numel = 0;
  };
  void step_muon(OptEntry& e, double sched, float grad_scale);
  void step_muon_chunk(const NsChunk& c, double sched, float grad_scale);
  // U (=) the orthogonalised U for the Muon-like kind (not Freon); U [r,c] or a stack [k,r,c].
  void orthogonalize(OptKind kind, Tensor& U);
  void finish_muon(OptEntry& e, Tensor& U, double sched);  // NorMuon, decay, axpy
  void plan_ns_chunks(int64_t budget);
  void step_preconditioned(OptEntry& e, double sched, float grad_scale);
  void apply_decay(OptEntry& e, double decay, const Tensor& update);
  // Refuses a peak decay of 1 or more (every step would zero or flip the weights), naming the keys.
  void check_decay(const OptEntry& e) const;
  double decay_factor(const OptEntry& e, double lr_eff, double sched) const;

  OptimConfig ocfg_;
  ScheduleConfig scfg_;
  int max_steps_ = 0;
  Backend& be_;
  std::vector<OptEntry> entries_;
  Tensor muon_scratch_;  // U / NS output: the largest Muon param, or the largest NsChunk
  std::vector<NsChunk> ns_chunks_;  // the batched groups (every Muon-like entry except Freon)
  int64_t largest_matrix_param_ = 0;  // elements of the largest matrix-optimizer param
  bool batch_ns_ = true;
  std::function<void()> refresh_weights_;  // set_weight_refresh; empty: per-parameter casts
  Tensor freon_work_;    // Freon's temporaries (freon_workspace), sized for the largest matrix
  int64_t t_ = 0;
};

}  // namespace mf
