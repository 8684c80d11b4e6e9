// scripts/launch.py, driven through the shell: variables, "[rank]" prefixes, per-rank logs, exit
// codes, restarts, stopping hung workers, signal forwarding, and an end-to-end run of 3 C++ ranks
// (this test binary itself, hidden case "e2e worker") through the store and the Gloo communicator.
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/env.h"
#include "dist/store.h"

using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;

namespace {

const std::string kLaunch = std::string(MF_SOURCE_DIR) + "/scripts/launch.py";
const std::string kWorker = std::string(MF_TEST_DIR) + "/dist_worker.py";

struct Run {
  int code = -1;
  std::string out;
  double secs = 0;
};

// Every folder these tests make lives under one root, removed when the test binary exits; the
// launcher's own temporary log folders too (TMPDIR), which it keeps after a failed job.
const std::string& temp_root() {
  static const std::string root = [] {
    char tmpl[] = "/tmp/mf_launch_test_XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    static const struct Cleanup {
      std::string path;
      ~Cleanup() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
      }
    } cleanup{tmpl};
    return cleanup.path;
  }();
  return root;
}

// Runs a shell command, stdout and stderr together.
Run sh(const std::string& cmd) {
  Run r;
  auto t0 = Clock::now();
  FILE* f = ::popen(("export TMPDIR=" + temp_root() + "; (" + cmd + ") 2>&1").c_str(), "r");
  REQUIRE(f != nullptr);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) r.out.append(buf, n);
  int st = ::pclose(f);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.secs = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

std::string temp_dir() {
  std::string tmpl = temp_root() + "/dXXXXXX";
  REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
  return tmpl;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string launch(const std::string& flags, const std::string& worker_args) {
  return "python3 " + kLaunch + " " + flags + " python3 " + kWorker + " " + worker_args;
}

std::string self_exe() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  REQUIRE(n > 0);
  return std::string(buf, size_t(n));
}

int unused_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

size_t count(const std::string& s, const std::string& what) {
  size_t c = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++c;
  return c;
}

}  // namespace

TEST_CASE("launcher: variables, prefixes and per-rank logs", "[launcher]") {
  std::string dir = temp_dir();
  Run r = sh("OMP_NUM_THREADS=2 " + launch("--standalone --nproc-per-node 3 --log-dir " + dir, "env"));
  INFO(r.out);
  REQUIRE(r.code == 0);
  for (int k = 0; k < 3; ++k) {
    std::string rk = std::to_string(k);
    CHECK_THAT(r.out, Contains("[" + rk + "] ENV RANK=" + rk + " LOCAL_RANK=" + rk +
                               " WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 GROUP_RANK=0 NODE_RANK=0 MASTER_ADDR=127.0.0.1"));
    CHECK_THAT(r.out, Contains("[" + rk + "] stderr line from rank " + rk));
    std::string log = slurp(dir + "/rank_" + rk + ".log");
    CHECK_THAT(log, Contains("ENV RANK=" + rk + " "));
    CHECK_THAT(log, Contains("stderr line from rank " + rk));
    CHECK_THAT(log, Contains("attempt 0"));
    CHECK(count(log, "ENV RANK=") == 1);  // only its own lines
  }
  CHECK(count(r.out, "OMP_NUM_THREADS=2 ") == 3);  // an explicit setting is kept
  CHECK(count(r.out, "MF_RESTART_COUNT=0") == 3);
  // Every rank sees the same master port.
  auto p = r.out.find("MASTER_PORT=");
  REQUIRE(p != std::string::npos);
  std::string port = r.out.substr(p, r.out.find(' ', p) - p);
  CHECK(count(r.out, port + " ") == 3);

  // Without OMP_NUM_THREADS: the CPUs this process may use // nproc, at least 1.
  cpu_set_t set;
  REQUIRE(::sched_getaffinity(0, sizeof(set), &set) == 0);
  long cpus = CPU_COUNT(&set);
  Run d = sh("env -u OMP_NUM_THREADS " + launch("--standalone --nproc-per-node 2 --log-dir " + dir, "env"));
  REQUIRE(d.code == 0);
  CHECK(count(d.out, "OMP_NUM_THREADS=" + std::to_string(std::max(1L, cpus / 2)) + " ") == 2);
  // Logs are appended across runs.
  CHECK(count(slurp(dir + "/rank_0.log"), "ENV RANK=0 ") == 2);
}

TEST_CASE("launcher: a failure stops hung workers and propagates the exit code", "[launcher]") {
  std::string dir = temp_dir();
  // Ranks 0 and 2 ignore SIGTERM and sleep 10 minutes: only SIGKILL after the grace period ends them.
  Run r = sh(launch("--standalone --nproc-per-node 3 --grace-period 1 --log-dir " + dir, "fail 1 7"));
  INFO(r.out);
  CHECK(r.code == 7);
  CHECK(r.secs < 30.0);
  CHECK_THAT(r.out, Contains("[0] rank 0 hanging") && Contains("[2] rank 2 hanging"));
  CHECK_THAT(r.out, Contains("[1] line 0 of rank 1"));
  auto summary = r.out.find("rank 1 (local rank 1");
  REQUIRE(summary != std::string::npos);
  std::string tail = r.out.substr(summary);
  CHECK_THAT(tail, Contains("failed with exit code 7"));
  CHECK_THAT(tail, Contains("last 20 line(s)") && Contains(dir + "/rank_1.log"));
  CHECK_THAT(tail, Contains("line 10 of rank 1") && Contains("line 29 of rank 1"));
  CHECK_THAT(tail, !Contains("line 9 of rank 1"));
  CHECK(count(slurp(dir + "/rank_1.log"), "of rank 1") == 30);
}

TEST_CASE("launcher: restarts the group after a failure", "[launcher]") {
  std::string dir = temp_dir();
  Run r = sh(launch("--standalone --nproc-per-node 3 --max-restarts 2 --grace-period 2 --log-dir " + dir,
                    "fail-once 2 5"));
  INFO(r.out);
  CHECK(r.code == 0);
  CHECK(r.secs < 30.0);
  CHECK_THAT(r.out, Contains("[2] rank 2 failing on attempt 0"));
  CHECK_THAT(r.out, Contains("rank 2 failed (exit code 5)") && Contains("restart 1 of 2"));
  for (int k = 0; k < 3; ++k) CHECK_THAT(r.out, Contains("[" + std::to_string(k) + "] rank " +
                                                         std::to_string(k) + " ok on attempt 1"));
  CHECK(count(r.out, "ok on attempt 0") == 0);  // the others were stopped, not left to finish
  CHECK(count(r.out, "restarting the group") == 1);
  std::string log = slurp(dir + "/rank_2.log");
  CHECK_THAT(log, Contains("attempt 0") && Contains("attempt 1") && Contains("failing on attempt 0"));

  // No restarts left: the failing rank's code.
  Run n = sh(launch("--standalone --nproc-per-node 2 --grace-period 2 --log-dir " + dir, "fail-once 1 5"));
  INFO(n.out);
  CHECK(n.code == 5);
  CHECK_THAT(n.out, Contains("rank 1 (local rank 1") && Contains("rank 1 failing on attempt 0"));
}

TEST_CASE("launcher: SIGTERM and SIGINT are forwarded to the workers", "[launcher]") {
  for (std::string sig : {"TERM", "INT"}) {
    std::string dir = temp_dir();
    std::string cmd = launch("--standalone --nproc-per-node 3 --grace-period 5 --log-dir " + dir,
                             "signal " + dir + "/got") +
                      " & pid=$!; for i in $(seq 300); do n=$(cat " + dir +
                      "/rank_*.log 2>/dev/null | grep -c '^ready'); [ \"$n\" -ge 3 ] && break; sleep 0.1; "
                      "done; kill -" + sig + " $pid; wait $pid; echo \"launcher rc=$?\"";
    Run r = sh(cmd);
    INFO(r.out);
    CHECK_THAT(r.out, Contains("launcher rc=" + std::to_string(sig == "TERM" ? 143 : 130)));
    CHECK_THAT(r.out, Contains("got SIG" + sig + "; forwarding it"));
    for (int k = 0; k < 3; ++k) CHECK(slurp(dir + "/got." + std::to_string(k)) == "SIG" + sig + "\n");
  }
}

TEST_CASE("launcher: a repeated SIGTERM is one stop; workers get --stop-timeout to checkpoint",
          "[launcher]") {
  // As under Slurm (scancel, the time limit): SIGTERM to the launcher twice. The workers take 2 s
  // to "checkpoint", past --grace-period (which is for stopping the others after a failure).
  auto stop = [](const std::string& dir, const std::string& timeout) {
    return sh(launch("--standalone --nproc-per-node 2 --grace-period 0.5 --stop-timeout " + timeout +
                         " --log-dir " + dir, "checkpoint 2 " + dir + "/saved") +
              " & pid=$!; for i in $(seq 300); do n=$(cat " + dir +
              "/rank_*.log 2>/dev/null | grep -c '^ready'); [ \"$n\" -ge 2 ] && break; sleep 0.1; "
              "done; kill -TERM $pid; sleep 0.2; kill -TERM $pid; wait $pid; echo \"launcher rc=$?\"");
  };
  std::string dir = temp_dir();
  Run r = stop(dir, "30");
  INFO(r.out);
  CHECK_THAT(r.out, Contains("launcher rc=143"));
  for (int k = 0; k < 2; ++k)
    CHECK_THAT(slurp(dir + "/saved." + std::to_string(k)), Contains("saved after"));
  CHECK_THAT(r.out, !Contains("killing"));
  // Past --stop-timeout they are killed, and the launcher says so.
  dir = temp_dir();
  r = stop(dir, "0.5");
  INFO(r.out);
  CHECK_THAT(r.out, Contains("launcher rc=143"));
  CHECK_THAT(r.out, Contains("rank(s) 0, 1 still running 0.5 s after the stop: killing them"));
  CHECK(slurp(dir + "/saved.0").empty());
}

TEST_CASE("launcher: torchrun's rendezvous flags, --local-ranks-filter, temporary logs removed",
          "[launcher]") {
  const int port = unused_port();
  const std::string dir = temp_dir();
  Run r = sh(launch("--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" + std::to_string(port) +
                        " --rdzv-id job7 --nnodes 1 --nproc-per-node 2 --local-ranks-filter 1"
                        " --log-dir " + dir, "env"));
  INFO(r.out);
  REQUIRE(r.code == 0);
  CHECK_THAT(r.out, Contains("[1] ENV RANK=1 ") && Contains("MASTER_PORT=" + std::to_string(port)));
  CHECK_THAT(r.out, !Contains("[0] ENV"));  // filtered from the console...
  CHECK_THAT(slurp(dir + "/rank_0.log"), Contains("ENV RANK=0 "));  // ...not from its log
  r = sh("python3 " + kLaunch + " --rdzv-backend etcd true");
  CHECK(r.code == 2);
  CHECK_THAT(r.out, Contains("only c10d and static"));
  // Without --log-dir the logs go to a temporary folder, removed again when the job succeeds.
  r = sh(launch("--standalone --nproc-per-node 1", "env"));
  REQUIRE(r.code == 0);
  const size_t at = r.out.find("logs in ");
  REQUIRE(at != std::string::npos);
  const std::string tmp = r.out.substr(at + 8, r.out.find('\n', at) - at - 8);
  CHECK(tmp.rfind(temp_root() + "/mf_launch_", 0) == 0);  // tempfile: under TMPDIR
  CHECK(::access(tmp.c_str(), F_OK) != 0);
}

TEST_CASE("launcher: under nohup (SIGHUP ignored) a hang-up neither stops nor reaches the workers",
          "[launcher]") {
  std::string dir = temp_dir();
  std::string cmd = "(trap '' HUP; exec " +
                    launch("--standalone --nproc-per-node 2 --grace-period 5 --log-dir " + dir,
                           "signal " + dir + "/got") +
                    ") & pid=$!; for i in $(seq 300); do n=$(cat " + dir +
                    "/rank_*.log 2>/dev/null | grep -c '^ready'); [ \"$n\" -ge 2 ] && break; sleep 0.1; "
                    "done; kill -HUP $pid; sleep 1; kill -TERM $pid; wait $pid; echo \"launcher rc=$?\"";
  Run r = sh(cmd);
  INFO(r.out);
  CHECK_THAT(r.out, Contains("launcher rc=143"));  // still running at the SIGTERM, which stopped it
  for (int k = 0; k < 2; ++k) CHECK(slurp(dir + "/got." + std::to_string(k)) == "SIGTERM\n");
}

TEST_CASE("launcher: a signal while a failed group is being stopped ends the job, no restart",
          "[launcher]") {
  // Rank 0 fails; rank 1 takes its time to exit after SIGTERM. SIGINT arrives in that window:
  // the user asked to stop, so no new group may be started (it would only be SIGKILLed after
  // the grace period, without a checkpoint).
  std::string dir = temp_dir();
  std::string cmd = launch("--standalone --nproc-per-node 2 --max-restarts 2 --grace-period 20 --log-dir " + dir,
                           "slow-stop 0 3 " + dir + "/stopping") +
                    " & pid=$!; for i in $(seq 300); do [ -e " + dir +
                    "/stopping.1 ] && break; sleep 0.05; done; kill -INT $pid; wait $pid; "
                    "echo \"launcher rc=$?\"";
  Run r = sh(cmd);
  INFO(r.out);
  CHECK_THAT(r.out, Contains("launcher rc=130"));
  CHECK_THAT(r.out, Contains("rank 0 attempt 0"));
  CHECK(count(r.out, "attempt 1") == 0);
  CHECK_THAT(r.out, !Contains("restarting the group"));
  CHECK(r.secs < 15.0);
}

TEST_CASE("launcher: bad arguments are reported", "[launcher]") {
  Run r = sh("python3 " + kLaunch + " --nproc-per-node 0 true");
  CHECK(r.code == 2);
  CHECK_THAT(r.out, Contains("--nproc-per-node 0 must be >= 1"));
  r = sh("CUDA_VISIBLE_DEVICES= python3 " + kLaunch + " --nproc-per-node gpu true");
  CHECK(r.code == 2);
  CHECK_THAT(r.out, Contains("no GPU found"));
  r = sh("python3 " + kLaunch + " --nproc-per-node 1 /no/such/program");
  CHECK(r.code == 2);
  CHECK_THAT(r.out, Contains("cannot find the program '/no/such/program'"));
  r = sh("env -u MASTER_ADDR python3 " + kLaunch + " --nnodes 2 --node-rank 0 true");
  CHECK(r.code == 2);
  CHECK_THAT(r.out, Contains("needs --master-addr"));
  r = sh("python3 " + kLaunch + " --nnodes 2 --node-rank 2 --master-addr h true");
  CHECK_THAT(r.out, Contains("--node-rank 2 must be in 0..1"));
  r = sh("python3 " + kLaunch + " --standalone --nnodes 2 true");
  CHECK_THAT(r.out, Contains("--standalone runs on one node"));
  r = sh("python3 " + kLaunch + " --nnodes 1:2 true");
  CHECK_THAT(r.out, Contains("elastic"));
  r = sh("python3 " + kLaunch + " --nproc-per-node cpu true");
  CHECK(r.code == 0);
}

// ---- end to end: 3 processes of this binary, store + Gloo through launch.py -------------------

// Hidden: run only by name, as a worker under launch.py (MF_E2E_MODE = ok | mismatch | fail-once).
TEST_CASE("e2e worker", "[.e2e]") {
  const char* mode_c = std::getenv("MF_E2E_MODE");
  if (!mode_c) return;
  std::string mode = mode_c;
  mf::DistEnv env = mf::read_dist_env();
  auto store = mf::TcpStore::from_env(env);
  auto comm = mf::make_communicator(env, store.get(), mf::Device::CPU);
  std::vector<float> x = {float(env.rank + 1), float(10 * env.rank), -1.0f};
  comm->allreduce_sum(x.data(), x.size());
  std::cout << "E2E rank " << env.rank << "/" << comm->size() << " via " << comm->name() << " sums " << x[0]
            << " " << x[1] << " " << x[2] << std::endl;
  mf::check_same(*comm, "config", mode == "mismatch" && env.rank == 1 ? "cfg-B" : "cfg-A");
  if (mode == "fail-once" && env.rank == 1 && std::string(std::getenv("MF_RESTART_COUNT")) == "0") {
    std::cout << "E2E rank 1 crashing" << std::endl;
    std::_Exit(9);
  }
  comm->barrier();
  std::cout << "E2E rank " << env.rank << " done" << std::endl;
}

TEST_CASE("launcher: 3 C++ ranks rendezvous, all-reduce and check their config", "[launcher][e2e]") {
#ifndef MF_HAS_GLOO
  WARN("built without Gloo: skipping the multi-process end-to-end test");
  return;
#endif
  std::string dir = temp_dir();
  std::string worker = self_exe() + " \"e2e worker\"";
  Run r = sh("MF_STORE_TIMEOUT=20 MF_COMM_TIMEOUT=20 MF_E2E_MODE=ok python3 " + kLaunch +
             " --standalone --nproc-per-node 3 --log-dir " + dir + " " + worker);
  INFO(r.out);
  CHECK(r.code == 0);
  for (int k = 0; k < 3; ++k) {
    std::string rk = std::to_string(k);
    CHECK_THAT(r.out, Contains("[" + rk + "] E2E rank " + rk + "/3 via gloo sums 6 30 -3"));
    CHECK_THAT(r.out, Contains("[" + rk + "] E2E rank " + rk + " done"));
  }

  // Different configs: every rank stops with the diagnosis; the launcher reports a failure.
  Run m = sh("MF_STORE_TIMEOUT=20 MF_COMM_TIMEOUT=20 MF_E2E_MODE=mismatch python3 " + kLaunch +
             " --standalone --nproc-per-node 3 --grace-period 5 --log-dir " + dir + " " + worker);
  INFO(m.out);
  CHECK(m.code != 0);
  CHECK_THAT(m.out, Contains("rank 1's config differs from rank 0's"));

  // A crash after rank 0 hosted the store on a fixed port: the restarted group binds the same port.
  int port = unused_port();
  Run f = sh("MF_STORE_TIMEOUT=20 MF_COMM_TIMEOUT=20 MF_E2E_MODE=fail-once python3 " + kLaunch +
             " --nproc-per-node 3 --master-addr 127.0.0.1 --master-port " + std::to_string(port) +
             " --max-restarts 1 --grace-period 5 --log-dir " + dir + " " + worker);
  INFO(f.out);
  CHECK(f.code == 0);
  CHECK_THAT(f.out, Contains("[1] E2E rank 1 crashing"));
  CHECK_THAT(f.out, Contains("rank 1 failed (exit code 9)"));
  CHECK(count(f.out, "master 127.0.0.1:" + std::to_string(port)) == 2);
  for (int k = 0; k < 3; ++k)
    CHECK_THAT(f.out, Contains("[" + std::to_string(k) + "] E2E rank " + std::to_string(k) + " done"));
}
