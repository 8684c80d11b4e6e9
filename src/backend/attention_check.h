// Cross-check of two attention implementations on the same inputs: model.attention = "auto"
// only switches a shape to cuDNN when cuDNN's outputs agree with flash's (besides being faster),
// so a cuDNN graph that computes something else never trains silently.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mf {

// Host copies (f32) of one forward + backward of attention: out [B,T,H,hd], lse [B,H,T],
// dq [B,T,H,hd], dk and dv [B,T,Hkv,hd].
struct AttnOutputs {
  std::vector<float> out, lse, dq, dk, dv;
};

// Allowed normalized max error, max|other - ref| / max|ref|, between two bf16 implementations:
// twice the op harness's bf16 tolerance against the fp32 reference (tests/op_tolerance.h), since
// each may be off by that much on its own. lse is fp32 statistics of the same bf16 inputs.
constexpr double kAttnAgreeOut = 4e-2;
constexpr double kAttnAgreeLse = 2e-3;
constexpr double kAttnAgreeGrad = 8e-2;

// max|got - want| / max|want| (the plain max difference when want is all zeros); a size mismatch
// or a non-finite value in either gives infinity. Also the op harness's error measure
// (tests/test_util.h norm_err, tests/op_tolerance.h), so the tolerances above compare like with
// like.
template <class T>
double normalized_max_error(const std::vector<T>& got, const std::vector<T>& want) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (got.size() != want.size()) return kInf;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) return kInf;
    num = std::max(num, std::abs(double(got[i]) - double(want[i])));
    den = std::max(den, std::abs(double(want[i])));
  }
  return den > 0 ? num / den : num;
}

// "" when `other` agrees with `ref` within the tolerances above; otherwise the first output that
// does not, e.g. "dk: error 0.53 > 0.08".
std::string attention_disagreement(const AttnOutputs& ref, const AttnOutputs& other);

}  // namespace mf
