// Fault points: a testing aid for crash recovery, unset in normal use. MF_FAULT_KILL_AT names one
// point at which the process SIGKILLs itself, on the first attempt only (MF_RESTART_COUNT unset
// or 0, so a restarted group runs through):
//   STEP[:RANK]  rank RANK (default 0), right after step STEP and its checkpoint
//   setup:RANK   rank RANK in setup, once the run directory is settled, before the model is built
//   prune:STEP   part-way through deleting a checkpoint that the save of step STEP prunes or
//                replaces, once that checkpoint's state.json is gone
// Any other value is an error that names the variable (a typo would otherwise test nothing).
//
// MF_FAULT_HOST_MEMORY=BYTES makes the CPU side report a machine of BYTES of memory (MemTotal,
// and MemAvailable capped by it), so the memory checks can be tested without filling a machine.
#pragma once

#include <cstddef>

namespace mf {

enum class FaultPoint { Step, Setup, Prune };

// SIGKILLs the process when MF_FAULT_KILL_AT names this point: `n` is the step (Step, Prune),
// `rank` this process's rank (Step, Setup).
void fault_point(FaultPoint point, int n, int rank);

// MF_FAULT_HOST_MEMORY in bytes, or 0 when unset. A value that is not a positive whole number
// is an error naming the variable.
size_t fault_host_memory();

}  // namespace mf
