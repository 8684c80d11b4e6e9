#include "backend/attention_check.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/log.h"  // spdlog, and with it fmt::format

namespace mf {

double normalized_max_error(const std::vector<float>& got, const std::vector<float>& want) {
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

std::string attention_disagreement(const AttnOutputs& ref, const AttnOutputs& other) {
  struct Part {
    const char* name;
    const std::vector<float>& want;
    const std::vector<float>& got;
    double tol;
  };
  const Part parts[] = {{"out", ref.out, other.out, kAttnAgreeOut},
                        {"lse", ref.lse, other.lse, kAttnAgreeLse},
                        {"dq", ref.dq, other.dq, kAttnAgreeGrad},
                        {"dk", ref.dk, other.dk, kAttnAgreeGrad},
                        {"dv", ref.dv, other.dv, kAttnAgreeGrad}};
  for (const Part& p : parts) {
    const double e = normalized_max_error(p.got, p.want);
    if (!(e <= p.tol)) return fmt::format("{}: error {:.3g} > {:.3g}", p.name, e, p.tol);
  }
  return "";
}

}  // namespace mf
