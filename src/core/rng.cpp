#include "core/rng.h"

#include <cmath>

namespace mf {

double Rng::normal() {
  // Box-Muller; u1 in (0,1] so log is finite. One sample per call keeps the state simple.
  double u1 = 1.0 - uniform();
  double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace mf
