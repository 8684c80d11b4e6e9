// Text generation from a trained model: `muonforge sample` (src/cli/cmd_sample.cpp).
//
// No KV cache: every new token reruns the forward over the context window (the model's T, the
// last T tokens when the context is longer). Positions after the context hold token 0; causal
// attention keeps them from touching the logits that are read. Enough to look at what a small
// pretraining run has learned, not a serving engine.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/llama.h"

namespace mf {

struct SampleOptions {
  int max_new_tokens = 200;
  double temperature = 1.0;  // 0: greedy (argmax)
  int top_k = 0;             // 0: the whole vocabulary
  uint64_t seed = 1337;
};

// Draws one token from logits[V]: argmax at temperature 0 (ties to the lower id), else
// softmax(logits / temperature) restricted to the top_k largest (ties to the lower id).
int32_t pick_token(const std::vector<float>& logits, const SampleOptions& o, Rng& rng);

// Appends o.max_new_tokens tokens to `prompt` with a model built for B = 1; on_token sees each
// new token as it is drawn. Returns the new tokens only.
std::vector<int32_t> generate(LlamaModel& model, const std::vector<int32_t>& prompt,
                              const SampleOptions& o,
                              const std::function<void(int32_t)>& on_token = nullptr);

// A checkpoint directory (it has config.json and model.safetensors) as given, or a run
// directory's newest complete checkpoint; a clear error otherwise.
std::string resolve_checkpoint_dir(const std::string& path);

}  // namespace mf
