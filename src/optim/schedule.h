// Learning-rate schedule (DESIGN §4): a multiplier of the peak lr at each optimizer step.
#pragma once
#include "config/config.h"

namespace mf {

// Multiplier at 0-based step `step` of a run of `max_steps` steps:
//  - warmup: (step+1)/warmup for step < warmup;
//  - after warmup, with p = progress through the decay phase in [0, 1]:
//      constant: 1
//      cosine:   r + (1-r) * 0.5 * (1 + cos(pi p)),   p = (step - warmup) / (max_steps - warmup)
//      linear:   1 - (1-r) p,                         same p
//      wsd:      1 until the last wsd_decay_frac of the run, then 1 - (1-r) p with
//                p = (step - start) / (max_steps - start), start = max_steps - round(frac*max_steps)
//    where r = min_lr_ratio. p is clamped to [0, 1] (so step >= max_steps gives r), which means
//    the last step (max_steps-1) sits one step short of r, as in nanoGPT / modded-nanogpt.
double lr_multiplier(const ScheduleConfig& s, int max_steps, int step);

// Throws mf::Error naming the schedule.* field that is out of range or unknown.
void validate_schedule(const ScheduleConfig& s);

}  // namespace mf
