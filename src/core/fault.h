// Fault points: a testing aid for crash recovery, unset in normal use. MF_FAULT_KILL_AT names one
// point at which the process SIGKILLs itself, on the first attempt only (MF_RESTART_COUNT unset
// or 0, so a restarted group runs through):
//   STEP[:RANK]  rank RANK (default 0), right after step STEP and its checkpoint
//   setup:RANK   rank RANK in setup, once the run directory is settled, before the model is built
//   prune:STEP   part-way through deleting a checkpoint that the save of step STEP prunes or
//                replaces, once that checkpoint's state.json is gone
// Any other value is an error that names the variable (a typo would otherwise test nothing).
#pragma once

namespace mf {

enum class FaultPoint { Step, Setup, Prune };

// SIGKILLs the process when MF_FAULT_KILL_AT names this point: `n` is the step (Step, Prune),
// `rank` this process's rank (Step, Setup).
void fault_point(FaultPoint point, int n, int rank);

}  // namespace mf
