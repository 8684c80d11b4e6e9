// The op harness's tolerances, in one place.
//
// A backend output is compared with its reference by the normalized max error
//     err = max_i |got_i - want_i| / max_i |want_i|
// (NaN anywhere counts as infinite error), which stays meaningful where single elements cancel
// to ~0. The allowed err depends on the dtype of the backend's activations: f32 for the CPU
// backend against the double reference, bf16 for the CUDA backend against the CPU backend (both
// fed the same bf16-representable inputs). Ops whose reductions are long or that chain several
// roundings get a per-op override.
#pragma once
#include <map>
#include <string>

#include "core/tensor.h"

namespace mf::test {

struct DTypeTol {
  double f32;
  double bf16;
};

constexpr DTypeTol kDefaultTol{1e-5, 2e-2};

inline DTypeTol op_tolerance(const std::string& op) {
  static const std::map<std::string, DTypeTol> overrides = {
      // dq/dk/dv sum P*(dP - D) over up to T keys and H/Hkv heads: cancellation in dP - D.
      {"attention_bwd", {3e-5, 4e-2}},
      // softmax - onehot summed over the vocabulary, then two GEMMs.
      {"lmhead_xent", {2e-5, 3e-2}},
      // dx = r w dy - x r^3 mean(dy w x) cancels; dw sums over every row.
      {"rmsnorm_bwd", {2e-5, 3e-2}},
  };
  auto it = overrides.find(op);
  return it == overrides.end() ? kDefaultTol : it->second;
}

inline double op_tolerance(const std::string& op, DType act_dtype) {
  const DTypeTol t = op_tolerance(op);
  return act_dtype == DType::BF16 ? t.bf16 : t.f32;
}

// Finite-difference gradient checks run in double: central differences with step kFdStep,
// compared with the analytic gradient by the same normalized max error.
constexpr double kFdStep = 1e-5;
constexpr double kFdTol = 1e-6;
// Agreement required between two double computations of the same math (e.g. the reference op
// against a naive formula).
constexpr double kDoubleTol = 1e-11;

}  // namespace mf::test
