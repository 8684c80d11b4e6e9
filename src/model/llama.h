// The Llama model written once against the Backend interface (llm.c style: forward and backward
// spelled out layer by layer, every buffer allocated once for a fixed micro-batch B x T).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "config/config.h"
#include "model/params.h"

namespace mf {

class MoeLayer;
struct MoeScratch;
class ProfRegion;

// Scalars the µP section (or the standard parametrisation) decides; all 1 when µP is off.
struct ModelScales {
  double logit_mult = 1.0;     // readout multiplier applied to the logits
  double attn_scale = 0.0;     // softmax scale; 0 = 1/sqrt(head_dim)
  double residual_mult = 1.0;  // branch multiplier (CompleteP: base_depth / depth)
};

class LlamaModel {
 public:
  LlamaModel(const ModelConfig& cfg, Backend& be, int B, int T, ModelScales scales = {});
  ~LlamaModel();
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  // Every parameter, in a fixed order (the Hugging Face table order).
  ParamList params();
  Param* find(const std::string& name);
  int64_t num_params() const;
  // Normal(0, init_std) init from a host RNG (identical on every backend); residual output
  // projections (o_proj, down_proj) use init_std / sqrt(2 n_layers); norm gains are 1.
  // Param::init_std, when already set > 0 by the caller (µP), overrides the default.
  void init_weights(uint64_t seed);
  // Master -> compute copies (no-op on CPU), after loading or updating master weights.
  void sync_weights();
  void zero_grads();

  // One micro-batch: tokens i32 host [B*T]. Returns the mean loss over B*T positions.
  // Forward only:
  double forward(const int32_t* inputs, const int32_t* targets);
  // Forward + backward; gradients of (loss_scale * sum of per-position losses) are added into
  // Param::grad. Returns the mean loss of this micro-batch. `grads_final`: this is the last
  // micro-batch before the gradients are used, so the grad-ready hook (if set) is called.
  double forward_backward(const int32_t* inputs, const int32_t* targets, float loss_scale,
                          bool grads_final = true);
  // The same, but the micro-batch's per-position losses stay on the device, added into a
  // running sum; take_loss() reads them once for all the micro-batches since the last call. The
  // trainer uses this so that no micro-batch waits for the device (forward_backward reads its
  // loss back at once, which drains the queue).
  void forward_backward_deferred(const int32_t* inputs, const int32_t* targets, float loss_scale,
                                 bool grads_final = true);
  // Mean over the deferred micro-batches of each one's mean loss (plus the mean of their MoE
  // balance losses), then resets the sum. Throws if there was none.
  double take_loss();

  // ---- Gradient communication (data parallelism; the model itself never communicates) ----
  // Every Param::grad is a view into one flat f32 arena (zero_grads clears it in one op). The
  // arena holds the gradients in the order backward finishes them: grad_groups()[0] first, each
  // tensor's start aligned to 64 floats (the gaps stay zero). Groups: the final norm and the
  // untied lm head; then layers n_layers-1 .. 0 (each with its MoE router and experts); then the
  // embedding (last: with tied embeddings it also takes the lm head's gradient).
  std::vector<ParamList> grad_groups();
  Tensor grad_arena() const { return grad_arena_; }
  // The f32 master weights live in a second arena with the same layout (Param::master of a tensor
  // sits at the same offset as its Param::grad), so a gradient bucket's range is also the range of
  // its weights (ZeRO-1 all-gathers updated weights over the bucket ranges).
  Tensor master_arena() const { return master_arena_; }
  // Called by forward_backward(..., grads_final = true) with the index of each group right after
  // the calls that finish its gradients have been issued to the backend (finished on the host for
  // the CPU; queued on the device stream for CUDA). Null = none.
  using GradReadyHook = std::function<void(int group)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_hook_ = std::move(hook); }
  // Full logits [B*T, V] of the last forward (recomputed; for tests and inspection).
  std::vector<float> logits(const int32_t* inputs);
  // Logits [V] of one position (row b * T + t) after a forward over `inputs` (sampling).
  std::vector<float> logits_row(const int32_t* inputs, int64_t row);

  // ---- Mixture of Experts (model.moe.n_experts > 0; model/moe.h) ----
  // forward_backward returns the mean cross-entropy plus the balance loss of every MoE layer
  // (balance = "aux_loss"); forward returns the cross-entropy only.
  bool is_moe() const { return !moe_layers_.empty(); }
  double moe_aux_loss() const;  // sum over MoE layers, from the last forward
  // Call after every optimizer step: bias updates (balance = "bias") and the step's load
  // statistics. A no-op for dense models. With data parallelism pass `sum_over_ranks`, which
  // must replace each float of its argument by the sum over ranks (host memory): every rank then
  // balances on the global loads and the biases stay identical. (Loads are summed as floats:
  // exact below 2^24 assignments per expert per step.)
  void post_step(const std::function<void(std::vector<float>&)>& sum_over_ranks = nullptr);
  // {"aux_loss", "dropped", "load_cv_max", "layers": [{layer, load_min, load_max, load_cv,
  // aux_loss, dropped, bias_min, bias_max}]} of the last completed step.
  nlohmann::json moe_metrics() const;
  std::vector<MoeLayer*> moe_layers();

  // 6N + attention FLOPs per token for a forward+backward pass (MFU accounting).
  double flops_per_token() const;
  // Weights multiplied per token (MoE: routed experts at their top_k / n_experts share); the
  // "active parameters" of MoE papers, counting the lm head but not the embedding lookup.
  double active_matmul_params() const;
  const ModelConfig& config() const { return cfg_; }
  const ModelScales& scales() const { return scales_; }
  Backend& backend() { return be_; }
  // Softmax scale the attention uses (ModelScales::attn_scale, or 1/sqrt(head_dim) when 0).
  double attn_scale() const;
  // Rotated q (B,T,H,hd) and k (B,T,Hkv,hd) of layer `layer` from the last forward, in act_dtype
  // (diagnostics: max attention logit, QK-clip). Valid until the next forward.
  Tensor attn_q(int layer);
  Tensor attn_k(int layer);
  // Bytes of the activation and gradient-scratch buffers this model allocated (shared buffers
  // counted once; MoE layers' buffers and their shared scratch included).
  int64_t activation_bytes() const;
  // Bytes of the parameter arenas as allocated (every tensor starts 256-byte aligned in them):
  // the f32 masters plus the compute copies when those are another dtype (bf16 on CUDA), and
  // the f32 gradients.
  int64_t weight_bytes() const;
  int64_t grad_bytes() const;
  // Whether the layers run q, k and v as one GEMM, and the dense layers gate and up as one
  // (ModelConfig::stack_projections, and the weights adjacent in the arenas).
  bool qkv_stacked() const { return qkv_stacked_; }
  bool gate_up_stacked() const { return gate_up_stacked_; }
  int B() const { return B_; }
  int T() const { return T_; }

 private:
  struct Layer;
  struct Acts;
  void build_params();
  void run_forward(const int32_t* inputs, bool train = false);
  double loss_from_host(const Tensor& losses);
  std::vector<float> head_logits(const Tensor& x);  // logits(), logits_row()
  int deferred_count_ = 0;    // micro-batches summed into Acts::loss_sum since take_loss()
  double deferred_aux_ = 0;   // their MoE balance losses (host values)
  Tensor heads(const Tensor& x, int h) const;
  AttnShape attn_shape() const;
  void project_qkv(int i, ProfRegion* r);
  void attention_block(int i);
  void mlp_hidden(int i);
  void rebuild_qk(int layer);

  ModelConfig cfg_;
  Backend& be_;
  int B_, T_;
  ModelScales scales_;
  std::vector<std::unique_ptr<Param>> params_;
  Param* wte_ = nullptr;
  Param* lm_head_ = nullptr;  // == wte_ when tied
  Param* norm_f_ = nullptr;
  std::vector<Layer> layers_;
  std::unique_ptr<MoeScratch> moe_scratch_;
  std::vector<std::unique_ptr<MoeLayer>> moe_layers_;
  std::unique_ptr<Acts> acts_;
  // Gradient arena and the groups of grad_groups() as indices into params_.
  Tensor grad_arena_, master_arena_;
  Tensor weight_arena_;  // the compute copies when act_dtype is not f32 (same layout)
  bool gate_up_stacked_ = false;  // every dense layer runs gate and up as one GEMM
  bool qkv_stacked_ = false;      // every layer runs q, k and v as one GEMM
  std::vector<std::vector<size_t>> grad_groups_;
  GradReadyHook grad_hook_;
  void grads_ready(int group, bool grads_final) {
    if (grad_hook_ && grads_final) grad_hook_(group);
  }
};

}  // namespace mf
