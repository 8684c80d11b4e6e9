// Text generation from a trained model: `muonforge sample` (src/cli/cmd_sample.cpp).
//
// The context window is the model's T. By default tokens go through a KvDecoder
// (model/kv_decoder.h): each new token costs one position, not a window forward. When the
// cache is full it is refilled with the newest T/2 tokens (rotary positions restart at 0), so a
// token sees between T/2 and T tokens of context. With kv_cache = false every token reruns the
// model's own forward over the newest T tokens (positions after the context hold token 0; causal
// attention keeps them from the logits that are read): the reference the cache is tested
// against, and the way to sample on the GPU backend. Meant for looking at what a pretraining
// run has learned, not for serving.
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
  bool kv_cache = true;      // false: a full window forward per token (see above)
};

// Draws one token from logits[V]: argmax at temperature 0 (ties to the lower id), else
// softmax(logits / temperature) restricted to the top_k largest (ties to the lower id).
int32_t pick_token(const std::vector<float>& logits, const SampleOptions& o, Rng& rng);

// Throws, naming the first one, unless every prompt token is in the vocabulary 0..vocab_size-1.
void check_prompt_ids(const std::vector<int32_t>& prompt, int64_t vocab_size);

// Appends o.max_new_tokens tokens to `prompt` with a model built for B = 1; on_token sees each
// new token as it is drawn. Returns the new tokens only.
std::vector<int32_t> generate(LlamaModel& model, const std::vector<int32_t>& prompt,
                              const SampleOptions& o,
                              const std::function<void(int32_t)>& on_token = nullptr);

}  // namespace mf
