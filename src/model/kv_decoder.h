// Token-by-token decoding with a key/value cache, on the host in fp32 (`muonforge sample`).
//
// The model's forward always runs a whole window (B x T positions), so sampling with it costs
// one window forward per new token. KvDecoder keeps each layer's rotated keys and values of the
// positions seen so far and computes only the new position: O(position) attention and one
// matrix-vector product per weight per token. It reads the weights once from a LlamaModel (any
// backend; the f32 masters are downloaded) and then runs on the CPU with the reference ops'
// formulas, so its logits match LlamaModel::logits_row on the same context to fp32 rounding
// (tests/test_train.cpp, "KvDecoder").
//
// MoE layers route each token alone, so decoding is dropless whatever model.moe.capacity_factor
// says (capacity is a training-batch notion).
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/ref_moe.h"
#include "model/llama.h"

namespace mf {

class KvDecoder {
 public:
  // Copies the weights of `model` (its masters, downloaded from `be`); positions 0..max_len-1.
  KvDecoder(LlamaModel& model, Backend& be, int max_len);

  // Feeds `token` at the next position and returns the logits [V] for the position after it.
  // Throws when the cache is full (length() == max_len()): reset() and feed the context again.
  std::vector<float> push(int32_t token);
  void reset() { len_ = 0; }
  int length() const { return len_; }
  int max_len() const { return max_len_; }

 private:
  struct Mlp {
    std::vector<float> gate, up, down;  // [f, d], [f, d], [d, f]
    int64_t f = 0;
  };
  struct Layer {
    std::vector<float> ln1, ln2, wq, wk, wv, wo;
    Mlp mlp;                     // dense layers
    std::vector<float> router;   // MoE: [E, d]
    std::vector<float> bias;     // MoE, balance = "bias": [E] (selection only)
    std::vector<Mlp> experts;
    Mlp shared;                  // f = 0 when there are no shared experts
    std::vector<float> kcache, vcache;  // [max_len, Hkv * hd] each, rotated keys
  };
  void mlp_add(const Mlp& m, const float* x, float scale, float* out);

  ModelConfig cfg_;
  ModelScales scales_;
  double attn_scale_ = 1.0;
  int max_len_ = 0, len_ = 0;
  std::vector<float> wte_, norm_f_, head_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
  // Scratch for one position.
  std::vector<float> x_, h_, q_, k_, v_, att_, tmp_, scores_, g_, u_;
  // MoE routing of one token: the rule (from model.moe) and the chosen experts and weights.
  ref::MoeRoute route_;
  std::vector<int32_t> route_idx_, route_counts_;
  std::vector<float> route_w_;
};

}  // namespace mf
