// Where this process sits in a distributed job, read from the environment.
//
// Sources, first match wins:
//   1. torchrun / scripts/launch.py: RANK, WORLD_SIZE (both required once either is set), LOCAL_RANK,
//      LOCAL_WORLD_SIZE, GROUP_RANK (or NODE_RANK), MASTER_ADDR, MASTER_PORT.
//   2. Slurm (srun one task per rank): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID,
//      SLURM_TASKS_PER_NODE; the master address must come from MASTER_ADDR (Slurm does not say
//      which host runs rank 0 in a way we can trust); MASTER_PORT defaults to a port derived from
//      SLURM_JOB_ID so that two jobs sharing a node do not collide.
//   3. Nothing set: a single process (rank 0 of 1).
// Every bad value is an mf::Error that names the variable and its value.
#pragma once
#include <map>
#include <string>

namespace mf {

struct DistEnv {
  int rank = 0;              // global rank, 0 .. world_size-1
  int local_rank = 0;        // rank on this node; selects the GPU
  int world_size = 1;
  int local_world_size = 1;  // ranks on this node
  int node_rank = 0;         // torchrun's GROUP_RANK
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "single";  // "torchrun", "slurm" or "single"
  // Which start of the worker group this is: 0 first, then +1 per restart by scripts/launch.py
  // (MF_RESTART_COUNT; 0 without it, e.g. under torchrun, whose count differs across nodes). The
  // rendezvous store matches it so that a restarted rank never joins a group going down.
  int attempt = 0;

  bool distributed() const { return world_size > 1; }
  bool is_master() const { return rank == 0; }
  std::string str() const;  // one line for the log: "rank 1/4 (local 1/2, node 0) master host:port"
};

// Reads the process environment.
DistEnv read_dist_env();
// The same rules over an explicit variable map (tests; unset variables are simply absent).
DistEnv parse_dist_env(const std::map<std::string, std::string>& vars);

// Environment variable `name` parsed as seconds (fractions allowed), or `fallback` when unset.
// Used for MF_STORE_TIMEOUT. Errors name the variable.
double env_seconds(const char* name, double fallback);

}  // namespace mf
