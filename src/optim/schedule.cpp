#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mf {

void validate_schedule(const ScheduleConfig& s) {
  MF_CHECK(s.decay == "constant" || s.decay == "cosine" || s.decay == "linear" || s.decay == "wsd",
           "schedule.decay is \"", s.decay, "\"; expected one of: constant, cosine, linear, wsd");
  MF_CHECK(s.warmup >= 0, "schedule.warmup must be >= 0, got ", s.warmup);
  MF_CHECK(s.min_lr_ratio >= 0 && s.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in [0, 1], got ",
           s.min_lr_ratio);
  MF_CHECK(s.wsd_decay_frac >= 0 && s.wsd_decay_frac <= 1,
           "schedule.wsd_decay_frac must be in [0, 1], got ", s.wsd_decay_frac);
}

namespace {
double progress(int step, int start, int max_steps) {
  const int span = max_steps - start;
  if (span <= 0) return 1.0;
  return std::clamp(double(step - start) / double(span), 0.0, 1.0);
}
}  // namespace

double lr_multiplier(const ScheduleConfig& s, int max_steps, int step) {
  validate_schedule(s);
  MF_CHECK(step >= 0, "lr schedule asked for negative step ", step);
  if (step < s.warmup) return double(step + 1) / double(s.warmup);
  const double r = s.min_lr_ratio;
  if (s.decay == "constant") return 1.0;
  if (s.decay == "cosine") {
    const double p = progress(step, s.warmup, max_steps);
    return r + (1.0 - r) * 0.5 * (1.0 + std::cos(M_PI * p));
  }
  if (s.decay == "linear") return 1.0 - (1.0 - r) * progress(step, s.warmup, max_steps);
  // wsd: stable until the final decay phase (which never starts before warmup ends).
  const int decay_steps = int(std::lround(s.wsd_decay_frac * max_steps));
  const int start = std::max(s.warmup, max_steps - decay_steps);
  if (step < start) return 1.0;
  return 1.0 - (1.0 - r) * progress(step, start, max_steps);
}

}  // namespace mf
