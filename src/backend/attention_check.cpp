#include "backend/attention_check.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/log.h"  // spdlog, and with it fmt::format

namespace mf {

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
