// One Mixture-of-Experts MLP block (DeepSeek-V3 / Moonlight style), written once against the
// Backend: router (fp32) -> top-k -> permutation by expert -> per-expert SwiGLU -> weighted
// combine, plus always-active shared experts. Forward and backward are spelled out; buffers are
// allocated once for a fixed number of tokens N.
//
// Parameters (Hugging Face DeepSeek-V3 names, DESIGN §4), under "model.layers.{i}.mlp.":
//   gate.weight [E,d]                       Router (AdamW)
//   gate.e_score_correction_bias [E]        Bias (balance = "bias" only; updated by post_step)
//   experts.{e}.{gate,up}_proj.weight [de,d], experts.{e}.down_proj.weight [d,de]   Hidden
//   shared_experts.{gate,up}_proj.weight [n_shared*de,d], ...down_proj.weight [d,n_shared*de]
// Each expert matrix is its own 2-D Param, so Muon orthogonalises every expert separately.
//
// Balance (model.moe.balance):
//   aux_loss: L_aux = aux_coef * E * sum_i f_i P_i, f_i = (tokens choosing i) / (N k) (no
//             gradient), P_i = mean over tokens of pn[n,i] (pn: softmax probs, or sigmoid scores
//             normalised per token). Added to the loss; its gradient flows into the router.
//   bias:     DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to the scores
//             for selection only; after each optimizer step (post_step) b_i += bias_rate *
//             sign(mean load - load_i), loads counted over the step's training micro-batches.
//   none.
// capacity_factor > 0: expert i keeps at most ceil(cf * N k / E) tokens (first in token order);
// the overflow is dropped (contributes nothing) and counted.
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

// Creates a parameter in the model's table: (name, kind, shape, init std) -> Param*.
using AddParamFn = std::function<Param*(const std::string&, ParamKind, Shape, double)>;

// What an MoE layer's backward needs of its experts' forward: routed rows gate, up, h = silu(gate)
// * up (N*k, de) and their outputs yg (N*k, d); the shared experts' sgate, sup, sh (N, n_shared*de;
// undefined without shared experts). Default-constructed: nothing allocated.
// gate and up live in one buffer gu (N*k, 2de), which holds either layout: gate | up per row,
// written by one grouped GEMM against the stacked [W_gate_e; W_up_e] (MoeLayer::routed_stacked),
// or the two (N*k, de) halves of its storage, `gate` and `up`, for separate GEMMs. Likewise sgu
// for the shared experts.
struct MoeExpertActs {
  MoeExpertActs() = default;
  MoeExpertActs(const ModelConfig& cfg, Backend& be, int64_t N);
  Tensor gu, h, yg;
  Tensor gate, up;  // views of gu's storage
  Tensor sgu, sh;
  Tensor sgate, sup;  // views of sgu's storage
  std::vector<const Tensor*> buffers() const { return {&gu, &h, &yg, &sgu, &sh}; }
};

// Scratch shared by every MoE layer of a model (used within one layer's forward or backward).
struct MoeScratch {
  MoeScratch(const ModelConfig& cfg, Backend& be, int64_t N);
  Tensor xg;                 // (N*k, d)   tokens gathered by expert
  Tensor dxg, dyg;           // (N*k, d)
  Tensor dh;                 // (N*k, de)
  Tensor dgu, dgate, dup;    // (N*k, 2de), and the halves of its storage (as MoeExpertActs::gu)
  Tensor dtopk_w;            // (N, k) f32
  Tensor dlogits;            // (N, E) f32
  Tensor aux_grad;           // (E) f32
  Tensor sdh;                // (N, n_shared*de) shared experts
  Tensor sdgu, sdgate, sdup;  // (N, 2 n_shared*de), and the halves of its storage
  // model.recompute != "none": the expert activations backward needs, shared by every MoE layer
  // (each layer but the last rebuilds its own with MoeLayer::rebuild before its backward).
  MoeExpertActs acts;
  std::vector<const Tensor*> buffers() const;
};

class MoeLayer {
 public:
  // Adds this layer's parameters (in table order) through `add`; `out_std` is the init std of
  // the residual output projections (down_proj).
  MoeLayer(const ModelConfig& cfg, Backend& be, int layer, int64_t N, MoeScratch& scratch,
           const AddParamFn& add, double out_std);
  ~MoeLayer();

  // out (=) shared(x) + sum_j topk_w[n,j] expert_{idx[n,j]}(x[n]).  x, out (N, d).
  // Keeps what backward needs. `record`: count this pass in the step's load statistics (training
  // passes; evaluation passes leave them alone).
  void forward(const Tensor& x, Tensor& out, bool record);
  // dx (=) dL/dx for dout = dL/dout (N, d); parameter grads (+=). aux_grad_scale multiplies the
  // gradient of the balance loss (loss_scale * N: the same units as the cross-entropy gradient).
  void backward(const Tensor& dout, const Tensor& x, Tensor& dx, float aux_grad_scale);
  // Activation recompute: recomputes the expert activations of the last forward from the same
  // input x (the routing is kept), bitwise as forward made them. Needed before backward when the
  // layer's activations live in the shared MoeScratch buffers and another layer ran since.
  void rebuild(const Tensor& x);
  // This layer's own buffers (what forward keeps for backward), for the memory plan; tensors
  // shared with MoeScratch (activation recompute) are not included.
  std::vector<const Tensor*> own_buffers() const;
  // Once the parameters sit in their arenas: with `allow` (model.stack_projections), each
  // expert's gate and up, and the shared experts' gate and up, run as one GEMM against the
  // stacked [W_gate; W_up] view when the two are adjacent in the weight and gradient arenas.
  // Before this call (or without `allow`) they run as separate GEMMs.
  void stack_projections(bool allow);
  bool routed_stacked() const { return routed_stacked_; }
  bool shared_stacked() const { return shared_stacked_; }

  // Balance loss of the last forward (0 unless balance == "aux_loss").
  double aux_loss() {
    settle();
    return aux_loss_;
  }
  // The step's statistics as floats (E loads, dropped, aux-loss sum, passes), appended to `out`;
  // set_step_stats reads them back from `in` at `at` (after a sum over data-parallel ranks, so
  // every rank applies the same bias update) and returns the position after them.
  void append_step_stats(std::vector<float>& out);
  size_t set_step_stats(const std::vector<float>& in, size_t at);
  // After each optimizer step: the bias update (balance == "bias") and the step's statistics.
  void post_step();
  // Statistics of the last completed step (see post_step): layer, load_min, load_max, load_cv,
  // aux_loss, dropped, and bias_min / bias_max when there is a bias.
  nlohmann::json metrics();

  int layer() const { return layer_; }
  Param* router() const { return router_; }
  Param* bias() const { return bias_; }
  // Host copies of the last forward's routing, for tests and inspection.
  const std::vector<int32_t>& last_counts() {
    settle();
    return counts_h_;
  }
  const std::vector<int32_t>& last_offsets() {
    settle();
    return offsets_h_;
  }
  int64_t last_dropped();
  // The last forward's expert choices, (N, k) row-major (top_k per token, dropped pairs
  // included): what `train --dump-routing` records for a reference to route by.
  std::vector<int32_t> last_routing();

 private:
  struct Expert {
    Param *gate, *up, *down;
  };
  MoeRouterArgs route_args() const;
  // Gathered rows -> expert gate/up/h/yg, and the shared experts' gate/up/h (not their output).
  void expert_activations(const Tensor& x);
  void step_stats(nlohmann::json& out);
  // Takes in the last forward's routing read-back (offsets, counts, score sums) once it has
  // arrived: the host copies, the balance loss and, for a training pass, the step statistics.
  // Forward only starts the read-back (no wait, with or without a capacity); whatever needs the
  // numbers calls settle() first.
  void settle();

  MoeConfig mc_;
  Backend& be_;
  int layer_;
  int64_t N_, d_, de_, fs_;  // tokens, model width, expert width, shared width
  int64_t capacity_;         // 0 = dropless
  MoeScratch& s_;
  Param* router_ = nullptr;
  Param* bias_ = nullptr;
  // The routed experts' weights and gradients by projection, in expert order: the operands of
  // the grouped moe_expert_fwd / moe_expert_bwd.
  struct ExpertGroup {
    std::vector<const Tensor*> w;
    std::vector<Tensor*> g;
    void add(Param* p) {
      w.push_back(&p->weight);
      g.push_back(&p->grad);
    }
  };
  ExpertGroup gate_, up_, down_;
  Expert shared_{nullptr, nullptr, nullptr};
  // stack_projections: [W_gate_e; W_up_e] per expert (views; gu_ points into them) and the
  // shared experts' [gate; up] (weight and gradient views).
  std::vector<Tensor> gu_w_, gu_g_;
  ExpertGroup gu_;
  Tensor shared_gu_w_, shared_gu_g_;
  bool routed_stacked_ = false, shared_stacked_ = false;

  // Kept from forward for backward.
  Tensor probs_, topk_w_, score_sum_;                  // (N,E) (N,k) (E) f32
  Tensor topk_idx_, counts_, offsets_, row_of_, row_token_;  // i32
  Tensor bias_step_;  // f32 (E): the bias update of post_step (balance == "bias")
  MoeExpertActs x_;  // its own, or MoeScratch::acts under activation recompute
  std::vector<int32_t> counts_h_, offsets_h_;
  std::vector<float> score_sum_h_;
  double aux_loss_ = 0;
  std::unique_ptr<Backend::Readback> readback_;  // offsets_, counts_, score_sum_
  bool pending_ = false, pending_record_ = false;  // a read-back not yet settled; its `record`

  // Statistics of the step in progress (training passes) and of the last completed step.
  std::vector<int64_t> step_load_;
  int64_t step_dropped_ = 0;
  double step_aux_sum_ = 0;
  int step_passes_ = 0;
  nlohmann::json last_metrics_;
};

}  // namespace mf
