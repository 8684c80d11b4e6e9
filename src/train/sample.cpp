#include "train/sample.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "model/kv_decoder.h"

namespace mf {

int32_t pick_token(const std::vector<float>& logits, const SampleOptions& o, Rng& rng) {
  const int64_t V = int64_t(logits.size());
  MF_CHECK(V > 0, "sample: empty logits");
  MF_CHECK(o.temperature >= 0 && std::isfinite(o.temperature), "sample: temperature ",
           o.temperature, " must be a finite number >= 0");
  for (int64_t i = 0; i < V; ++i)
    MF_CHECK(std::isfinite(logits[size_t(i)]), "sample: logit of token ", i, " is ",
             logits[size_t(i)], " (the checkpoint's weights are not finite?)");
  if (o.temperature == 0.0)
    return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  // Candidates by descending logit, ties to the lower id; keep the top_k first.
  std::vector<int32_t> ids(static_cast<size_t>(V));
  std::iota(ids.begin(), ids.end(), 0);
  const int64_t k = o.top_k > 0 ? std::min<int64_t>(o.top_k, V) : V;
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
  };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), by_logit);
  const double top = logits[size_t(ids[0])];
  std::vector<double> w(static_cast<size_t>(k));
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    w[size_t(i)] = std::exp((double(logits[size_t(ids[size_t(i)])]) - top) / o.temperature);
    sum += w[size_t(i)];
  }
  double u = rng.uniform() * sum;
  for (int64_t i = 0; i < k; ++i) {
    u -= w[size_t(i)];
    if (u < 0) return ids[size_t(i)];
  }
  return ids[size_t(k - 1)];  // rounding left u a hair above the last weight
}

void check_prompt_ids(const std::vector<int32_t>& prompt, int64_t V) {
  for (size_t i = 0; i < prompt.size(); ++i)
    MF_CHECK(prompt[i] >= 0 && prompt[i] < V, "sample: prompt token ", i, " is ", prompt[i],
             ", outside the vocabulary 0..", V - 1, " (model.vocab_size ", V, ")");
}

std::vector<int32_t> generate(LlamaModel& model, const std::vector<int32_t>& prompt,
                              const SampleOptions& o,
                              const std::function<void(int32_t)>& on_token) {
  MF_CHECK(model.B() == 1, "sample: the model must be built with micro-batch 1, not ", model.B());
  MF_CHECK(!prompt.empty(), "sample: the prompt is empty (give at least one token)");
  MF_CHECK(o.max_new_tokens >= 0, "sample: --tokens ", o.max_new_tokens, " must be >= 0");
  const int64_t T = model.T();
  check_prompt_ids(prompt, model.config().vocab_size);
  Rng rng(o.seed, 0x5a4d504cULL);
  std::vector<int32_t> ctx = prompt, out, window(size_t(T), 0);
  if (o.kv_cache) {
    KvDecoder dec(model, model.backend(), int(T));
    // Feeds the newest `keep` tokens of the context into an empty cache; the last logits.
    auto refill = [&](int64_t keep) {
      dec.reset();
      std::vector<float> lg;
      for (auto it = ctx.end() - std::min<int64_t>(keep, int64_t(ctx.size())); it != ctx.end(); ++it)
        lg = dec.push(*it);
      return lg;
    };
    std::vector<float> logits = refill(T);
    for (int n = 0; n < o.max_new_tokens; ++n) {
      const int32_t tok = pick_token(logits, o, rng);
      ctx.push_back(tok);
      out.push_back(tok);
      if (on_token) on_token(tok);
      if (n + 1 == o.max_new_tokens) break;
      logits = dec.length() < dec.max_len() ? dec.push(tok) : refill(std::max<int64_t>(1, T / 2));
    }
    return out;
  }
  for (int n = 0; n < o.max_new_tokens; ++n) {
    const int64_t len = std::min<int64_t>(T, int64_t(ctx.size()));
    std::fill(window.begin(), window.end(), 0);
    std::copy(ctx.end() - len, ctx.end(), window.begin());
    const int32_t tok = pick_token(model.logits_row(window.data(), len - 1), o, rng);
    ctx.push_back(tok);
    out.push_back(tok);
    if (on_token) on_token(tok);
  }
  return out;
}
}  // namespace mf
