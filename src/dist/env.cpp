#include "dist/env.h"

#include <cerrno>
#include <cstdlib>
#include <sstream>
#include <vector>

#include "core/error.h"

namespace mf {

namespace {

using Vars = std::map<std::string, std::string>;

const std::string* find(const Vars& v, const char* name) {
  auto it = v.find(name);
  return it == v.end() ? nullptr : &it->second;
}

// Strict base-10 integer: no trailing junk, no empty string.
long long parse_int(const char* name, const std::string& s) {
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(s.c_str(), &end, 10);
  MF_CHECK(!s.empty() && end && *end == '\0' && errno == 0, "environment variable ", name, "='", s,
           "' is not an integer");
  return x;
}

int get_int(const Vars& v, const char* name, int fallback, bool* found = nullptr) {
  const std::string* s = find(v, name);
  if (found) *found = s != nullptr;
  if (!s) return fallback;
  long long x = parse_int(name, *s);
  MF_CHECK(x >= -1000000000LL && x <= 1000000000LL, "environment variable ", name, "=", *s,
           " is out of range");
  return int(x);
}

// Slurm's SLURM_TASKS_PER_NODE, e.g. "8(x2),4" -> {8, 8, 4}.
std::vector<int> parse_tasks_per_node(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    int reps = 1;
    auto paren = item.find('(');
    std::string count = item.substr(0, paren);
    if (paren != std::string::npos) {
      MF_CHECK(item.size() > paren + 3 && item[paren + 1] == 'x' && item.back() == ')',
               "environment variable SLURM_TASKS_PER_NODE='", s, "' is not in Slurm's form like 8(x2),4");
      reps = int(parse_int("SLURM_TASKS_PER_NODE", item.substr(paren + 2, item.size() - paren - 3)));
    }
    int n = int(parse_int("SLURM_TASKS_PER_NODE", count));
    for (int i = 0; i < reps; ++i) out.push_back(n);
  }
  return out;
}

void validate(DistEnv& e, const char* rank_var, const char* world_var, const char* local_rank_var,
              const char* local_world_var) {
  MF_CHECK(e.world_size >= 1, "environment variable ", world_var, "=", e.world_size, " must be >= 1");
  MF_CHECK(e.rank >= 0 && e.rank < e.world_size, "environment variable ", rank_var, "=", e.rank,
           " must be in 0..", e.world_size - 1, " (", world_var, "=", e.world_size, ")");
  MF_CHECK(e.local_world_size >= 1 && e.local_world_size <= e.world_size, "environment variable ",
           local_world_var, "=", e.local_world_size, " must be in 1..", world_var, "=", e.world_size);
  MF_CHECK(e.local_rank >= 0 && e.local_rank < e.local_world_size, "environment variable ",
           local_rank_var, "=", e.local_rank, " must be in 0..", e.local_world_size - 1, " (",
           local_world_var, "=", e.local_world_size, ")");
  MF_CHECK(e.node_rank >= 0, "node rank ", e.node_rank, " must be >= 0");
  MF_CHECK(e.master_port >= 1 && e.master_port <= 65535, "environment variable MASTER_PORT=",
           e.master_port, " is out of range 1..65535");
  MF_CHECK(!e.master_addr.empty(), "environment variable MASTER_ADDR is empty");
}

// Only scripts/launch.py's count: its launchers restart every node once per failure. torchrun's
// TORCHELASTIC_RESTART_COUNT is not kept in step across nodes (a node restarted by another's
// failure keeps its count), and torchrun gives every rendezvous round a fresh store anyway.
void read_attempt(const Vars& v, DistEnv& e) {
  e.attempt = get_int(v, "MF_RESTART_COUNT", 0);
  MF_CHECK(e.attempt >= 0, "environment variable MF_RESTART_COUNT=", e.attempt, " must be >= 0");
}

DistEnv from_torchrun(const Vars& v) {
  DistEnv e;
  e.source = "torchrun";
  bool has_rank = false, has_world = false;
  e.rank = get_int(v, "RANK", 0, &has_rank);
  e.world_size = get_int(v, "WORLD_SIZE", 1, &has_world);
  MF_CHECK(has_rank, "environment variable WORLD_SIZE is set but RANK is not; set both (the launcher "
           "scripts/launch.py or torchrun does)");
  MF_CHECK(has_world, "environment variable RANK is set but WORLD_SIZE is not; set both (the launcher "
           "scripts/launch.py or torchrun does)");
  bool has_lws = false;
  e.local_world_size = get_int(v, "LOCAL_WORLD_SIZE", e.world_size, &has_lws);
  // Without LOCAL_* assume one node: local rank = rank.
  e.local_rank = get_int(v, "LOCAL_RANK", has_lws && e.local_world_size > 0 ? e.rank % e.local_world_size
                                                                               : e.rank);
  bool has_group = false;
  e.node_rank = get_int(v, "GROUP_RANK", 0, &has_group);
  if (!has_group) {
    e.node_rank = get_int(v, "NODE_RANK", e.local_world_size > 0 ? e.rank / e.local_world_size : 0,
                          &has_group);
  }
  const std::string* addr = find(v, "MASTER_ADDR");
  if (addr) {
    e.master_addr = *addr;
  } else {
    MF_CHECK(e.world_size == e.local_world_size, "environment variable MASTER_ADDR is not set but the "
             "job spans several nodes (WORLD_SIZE=", e.world_size, ", LOCAL_WORLD_SIZE=",
             e.local_world_size, "); set MASTER_ADDR to the host of rank 0");
  }
  e.master_port = get_int(v, "MASTER_PORT", 29500);
  // Under torchrun (torch.distributed.run) the agent on node 0 serves its own c10d store on
  // MASTER_PORT, which muonforge's store does not speak: rank 0 hosts ours one port up.
  if (const std::string* agent = find(v, "TORCHELASTIC_USE_AGENT_STORE")) {
    if (*agent == "True" || *agent == "true" || *agent == "1") {
      MF_CHECK(e.master_port < 65535, "MASTER_PORT=", e.master_port, " under torchrun: muonforge's "
               "store takes MASTER_PORT + 1, out of range");
      e.master_port += 1;
      e.source = "torchrun, store on MASTER_PORT + 1 beside torchrun's own";
    }
  }
  validate(e, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE");
  read_attempt(v, e);
  return e;
}

DistEnv from_slurm(const Vars& v) {
  DistEnv e;
  e.source = "slurm";
  e.rank = get_int(v, "SLURM_PROCID", 0);
  const char* world_var = find(v, "SLURM_NTASKS") ? "SLURM_NTASKS" : "SLURM_NPROCS";
  bool has_world = false;
  e.world_size = get_int(v, world_var, 1, &has_world);
  MF_CHECK(has_world, "environment variable SLURM_PROCID is set but SLURM_NTASKS is not; run under "
           "srun with --ntasks (one task per rank) or use scripts/launch.py");
  e.local_rank = get_int(v, "SLURM_LOCALID", 0);
  e.node_rank = get_int(v, "SLURM_NODEID", 0);
  e.local_world_size = e.world_size;
  if (const std::string* tpn = find(v, "SLURM_TASKS_PER_NODE")) {
    std::vector<int> per_node = parse_tasks_per_node(*tpn);
    MF_CHECK(e.node_rank >= 0 && size_t(e.node_rank) < per_node.size(), "environment variable "
             "SLURM_NODEID=", e.node_rank, " has no entry in SLURM_TASKS_PER_NODE='", *tpn, "'");
    e.local_world_size = per_node[e.node_rank];
  } else if (find(v, "SLURM_NTASKS_PER_NODE")) {
    e.local_world_size = get_int(v, "SLURM_NTASKS_PER_NODE", 1);
  }
  if (const std::string* addr = find(v, "MASTER_ADDR")) {
    e.master_addr = *addr;
  } else {
    MF_CHECK(e.world_size == 1, "running under Slurm with SLURM_NTASKS=", e.world_size,
             " but MASTER_ADDR is not set; set it in the sbatch script to the first node, e.g. "
             "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)");
  }
  if (find(v, "MASTER_PORT")) {
    e.master_port = get_int(v, "MASTER_PORT", 29500);
  } else if (find(v, "SLURM_JOB_ID")) {
    // Two jobs sharing a node get different ports; every rank of one job computes the same one.
    e.master_port = 15000 + int(parse_int("SLURM_JOB_ID", v.at("SLURM_JOB_ID")) % 20000);
  }
  validate(e, "SLURM_PROCID", world_var, "SLURM_LOCALID",
           find(v, "SLURM_TASKS_PER_NODE") ? "SLURM_TASKS_PER_NODE" : "SLURM_NTASKS_PER_NODE");
  read_attempt(v, e);
  return e;
}

}  // namespace

std::string DistEnv::str() const {
  std::ostringstream os;
  os << "rank " << rank << "/" << world_size << " (local " << local_rank << "/" << local_world_size
     << ", node " << node_rank << ", from " << source << ")";
  if (distributed()) os << " master " << master_addr << ":" << master_port;
  if (attempt > 0) os << ", restart " << attempt;
  return os.str();
}

DistEnv parse_dist_env(const Vars& v) {
  if (find(v, "RANK") || find(v, "WORLD_SIZE")) return from_torchrun(v);
  if (find(v, "SLURM_PROCID")) return from_slurm(v);
  DistEnv e;
  if (const std::string* addr = find(v, "MASTER_ADDR")) e.master_addr = *addr;
  return e;
}

DistEnv read_dist_env() {
  static const char* names[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                                "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_NODEID",
                                "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_ID",
                                "MF_RESTART_COUNT"};
  Vars v;
  for (const char* n : names) {
    if (const char* s = std::getenv(n)) v[n] = s;
  }
  return parse_dist_env(v);
}

double env_seconds(const char* name, double fallback) {
  const char* s = std::getenv(name);
  if (!s) return fallback;
  char* end = nullptr;
  errno = 0;
  double x = std::strtod(s, &end);
  MF_CHECK(*s && end && *end == '\0' && errno == 0 && x > 0 && x < 1e7, "environment variable ", name,
           "='", s, "' must be a positive number of seconds");
  return x;
}

}  // namespace mf
