// Distributed pieces: environment parsing, the TCP rendezvous store, the communicators (single and
// Gloo with 3 ranks as threads of this process), and the same-config checks. Every blocking call
// uses a short timeout so a bug fails the test instead of hanging it.
#include <catch2/catch.hpp>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "dist/buckets.h"
#include "dist/communicator.h"
#include "dist/env.h"
#include "dist/store.h"
#include "dist/watchdog.h"
#include "test_util.h"
#ifdef MF_HAS_GLOO
#include "dist/gloo_comm.h"
#endif

using namespace mf;
using Catch::Matchers::Contains;
using ms = std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

namespace {

using mf::test::error_of;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A socket listening on a free loopback port (a stand-in for a foreign service); -1 on failure.
int listening_socket(int* port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(fd, 4) != 0) {
    if (fd >= 0) ::close(fd);
    return -1;
  }
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  *port = ntohs(a.sin_port);
  return fd;
}

// A port nobody listens on right now (taken, read, released).
int unused_port() {
  int port = 0;
  const int fd = listening_socket(&port);
  ::close(fd);
  return port;
}

// Runs f(rank) on `n` threads; returns each thread's error text ("" when it returned normally).
std::vector<std::string> run_ranks(int n, const std::function<void(int)>& f) {
  std::vector<std::string> err(n);
  std::vector<std::thread> th;
  for (int r = 0; r < n; ++r) {
    th.emplace_back([&, r] {
      try {
        f(r);
      } catch (const std::exception& e) {
        err[r] = e.what();
        if (err[r].empty()) err[r] = "<empty error>";
      }
    });
  }
  for (auto& t : th) t.join();
  return err;
}

}  // namespace

// ---- environment -------------------------------------------------------------------------------

TEST_CASE("dist env: nothing set is a single process", "[dist][env]") {
  DistEnv e = parse_dist_env({});
  CHECK(e.rank == 0);
  CHECK(e.world_size == 1);
  CHECK(e.local_rank == 0);
  CHECK(e.local_world_size == 1);
  CHECK_FALSE(e.distributed());
  CHECK(e.source == "single");
}

TEST_CASE("dist env: torchrun variables", "[dist][env]") {
  DistEnv e = parse_dist_env({{"RANK", "5"}, {"LOCAL_RANK", "1"}, {"WORLD_SIZE", "8"},
                              {"LOCAL_WORLD_SIZE", "4"}, {"GROUP_RANK", "1"}, {"MASTER_ADDR", "node7"},
                              {"MASTER_PORT", "31337"}});
  CHECK(e.source == "torchrun");
  CHECK(e.rank == 5);
  CHECK(e.local_rank == 1);
  CHECK(e.world_size == 8);
  CHECK(e.local_world_size == 4);
  CHECK(e.node_rank == 1);
  CHECK(e.master_addr == "node7");
  CHECK(e.master_port == 31337);
  CHECK(e.distributed());
  CHECK_THAT(e.str(), Contains("rank 5/8") && Contains("node7:31337"));
  CHECK(e.attempt == 0);
  // Under torchrun itself its agent serves a c10d store on MASTER_PORT: ours goes one up.
  DistEnv t = parse_dist_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "node7"},
                              {"MASTER_PORT", "29500"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
  CHECK(t.master_port == 29501);
  CHECK_THAT(t.str(), Contains("MASTER_PORT + 1") && Contains("node7:29501"));
  CHECK(parse_dist_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "29500"},
                        {"TORCHELASTIC_USE_AGENT_STORE", "False"}}).master_port == 29500);

  // The restart count: the launcher's MF_RESTART_COUNT. Not torchrun's TORCHELASTIC_RESTART_COUNT,
  // which nodes do not keep in step.
  CHECK(parse_dist_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MF_RESTART_COUNT", "3"}}).attempt == 3);
  CHECK(parse_dist_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RESTART_COUNT", "2"}})
            .attempt == 0);
  CHECK(parse_dist_env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}, {"MF_RESTART_COUNT", "1"}})
            .attempt == 1);
  CHECK_THAT(parse_dist_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MF_RESTART_COUNT", "1"}}).str(),
             Contains("restart 1"));

  // Only RANK and WORLD_SIZE: one node assumed; NODE_RANK used when GROUP_RANK is absent.
  DistEnv m = parse_dist_env({{"RANK", "2"}, {"WORLD_SIZE", "3"}});
  CHECK(m.local_rank == 2);
  CHECK(m.local_world_size == 3);
  CHECK(m.node_rank == 0);
  CHECK(m.master_addr == "127.0.0.1");
  CHECK(m.master_port == 29500);
  DistEnv n = parse_dist_env({{"RANK", "6"}, {"WORLD_SIZE", "8"}, {"LOCAL_WORLD_SIZE", "4"},
                              {"NODE_RANK", "1"}, {"MASTER_ADDR", "h"}});
  CHECK(n.local_rank == 2);
  CHECK(n.node_rank == 1);

  // torchrun variables win over Slurm's (launch.py run inside srun).
  DistEnv both = parse_dist_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "0"},
                                 {"SLURM_NTASKS", "1"}});
  CHECK(both.source == "torchrun");
  CHECK(both.rank == 1);
}

TEST_CASE("dist env: bad torchrun values name the variable", "[dist][env]") {
  auto err = [](std::map<std::string, std::string> v) { return error_of([&] { parse_dist_env(v); }); };
  CHECK_THAT(err({{"RANK", "0"}}), Contains("WORLD_SIZE"));
  CHECK_THAT(err({{"WORLD_SIZE", "2"}}), Contains("RANK is not"));
  CHECK_THAT(err({{"RANK", "3"}, {"WORLD_SIZE", "2"}}), Contains("RANK=3") && Contains("WORLD_SIZE=2"));
  CHECK_THAT(err({{"RANK", "-1"}, {"WORLD_SIZE", "2"}}), Contains("RANK=-1"));
  CHECK_THAT(err({{"RANK", "abc"}, {"WORLD_SIZE", "2"}}), Contains("RANK='abc' is not an integer"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MF_RESTART_COUNT", "-1"}}),
             Contains("MF_RESTART_COUNT=-1"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MF_RESTART_COUNT", "x"}}),
             Contains("MF_RESTART_COUNT='x'"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "2x"}}), Contains("WORLD_SIZE='2x'"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "0"}}), Contains("WORLD_SIZE=0"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}),
             Contains("MASTER_PORT=70000") && Contains("65535"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", ""}}), Contains("MASTER_PORT=''"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_WORLD_SIZE", "2"}, {"LOCAL_RANK", "2"},
                  {"MASTER_ADDR", "h"}}),
             Contains("LOCAL_RANK=2"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_WORLD_SIZE", "2"}}),
             Contains("MASTER_ADDR is not set"));
  CHECK_THAT(err({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", ""}}), Contains("MASTER_ADDR"));
}

TEST_CASE("dist env: Slurm variables", "[dist][env]") {
  DistEnv e = parse_dist_env({{"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "1"},
                              {"SLURM_NODEID", "1"}, {"SLURM_TASKS_PER_NODE", "8(x2)"},
                              {"SLURM_JOB_ID", "123456"}, {"MASTER_ADDR", "gpu-a01"}});
  CHECK(e.source == "slurm");
  CHECK(e.rank == 9);
  CHECK(e.world_size == 16);
  CHECK(e.local_rank == 1);
  CHECK(e.local_world_size == 8);
  CHECK(e.node_rank == 1);
  CHECK(e.master_addr == "gpu-a01");
  CHECK(e.master_port == 15000 + 123456 % 20000);

  // Uneven nodes: "3(x2),2" -> the third node has 2 tasks. MASTER_PORT wins over the job id.
  DistEnv u = parse_dist_env({{"SLURM_PROCID", "7"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                              {"SLURM_NODEID", "2"}, {"SLURM_TASKS_PER_NODE", "3(x2),2"},
                              {"SLURM_JOB_ID", "5"}, {"MASTER_ADDR", "n0"}, {"MASTER_PORT", "40000"}});
  CHECK(u.local_world_size == 2);
  CHECK(u.master_port == 40000);

  // One task needs no master.
  DistEnv one = parse_dist_env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}});
  CHECK(one.world_size == 1);

  auto err = [](std::map<std::string, std::string> v) { return error_of([&] { parse_dist_env(v); }); };
  CHECK_THAT(err({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}}),
             Contains("MASTER_ADDR is not set") && Contains("scontrol show hostnames"));
  CHECK_THAT(err({{"SLURM_PROCID", "0"}}), Contains("SLURM_NTASKS"));
  CHECK_THAT(err({{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}, {"MASTER_ADDR", "n"}}),
             Contains("SLURM_PROCID=4"));
  CHECK_THAT(err({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_TASKS_PER_NODE", "2(y2)"},
                  {"MASTER_ADDR", "n"}}),
             Contains("SLURM_TASKS_PER_NODE"));
  CHECK_THAT(err({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_NODEID", "2"},
                  {"SLURM_TASKS_PER_NODE", "2(x2)"}, {"MASTER_ADDR", "n"}}),
             Contains("SLURM_NODEID=2"));
}

TEST_CASE("dist env: read from the process environment", "[dist][env]") {
  ::setenv("RANK", "1", 1);
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("MASTER_PORT", "23456", 1);
  DistEnv e = read_dist_env();
  ::unsetenv("RANK");
  ::unsetenv("WORLD_SIZE");
  ::unsetenv("MASTER_PORT");
  CHECK(e.rank == 1);
  CHECK(e.world_size == 2);
  CHECK(e.master_port == 23456);

  ::setenv("MF_STORE_TIMEOUT", "2.5", 1);
  CHECK(TcpStore::default_timeout() == ms(2500));
  ::setenv("MF_STORE_TIMEOUT", "soon", 1);
  CHECK_THAT(error_of([] { TcpStore::default_timeout(); }), Contains("MF_STORE_TIMEOUT='soon'"));
  ::unsetenv("MF_STORE_TIMEOUT");
  CHECK(TcpStore::default_timeout() == ms(300000));
}

// ---- store -------------------------------------------------------------------------------------

TEST_CASE("store: set/get/add/wait/check/erase across client threads", "[dist][store]") {
  TcpStore server("127.0.0.1", 0, true, ms(3000));
  REQUIRE(server.port() > 0);
  const int n = 3;
  std::atomic<int> before[5] = {}, after_wrong{0};
  std::vector<std::vector<std::string>> got(n);
  std::vector<int64_t> last_add(n);
  auto errs = run_ranks(n, [&](int r) {
    TcpStore c("127.0.0.1", server.port(), false, ms(3000));
    // Values with NUL bytes and different lengths; read every rank's (blocking until set).
    std::string mine = "v" + std::to_string(r) + std::string(1, '\0') + std::string(size_t(r) * 1000, 'x');
    c.set("k/" + std::to_string(r), mine);
    for (int o = 0; o < n; ++o) got[r].push_back(c.get("k/" + std::to_string(o)));
    for (int i = 0; i < 100; ++i) last_add[r] = c.add("counter", r + 1);
    // Barriers: nobody passes barrier b before all incremented before[b].
    for (int b = 0; b < 5; ++b) {
      before[b]++;
      c.barrier(n, "test");
      if (before[b].load() != n) after_wrong++;
    }
  });
  for (int r = 0; r < n; ++r) { INFO("rank " << r << ": " << errs[r]); CHECK(errs[r].empty()); }
  for (int r = 0; r < n; ++r) {
    REQUIRE(got[r].size() == size_t(n));
    for (int o = 0; o < n; ++o) {
      CHECK(got[r][o].size() == 3 + size_t(o) * 1000);
      CHECK(got[r][o].substr(0, 3) == "v" + std::to_string(o) + std::string(1, '\0'));
    }
  }
  CHECK(after_wrong.load() == 0);
  CHECK(server.add("counter", 0) == 100 * (1 + 2 + 3));
  CHECK(server.get("counter") == "600");
  CHECK(server.add("counter", -600) == 0);
  CHECK(server.check({"k/0", "k/1"}));
  CHECK_FALSE(server.check({"k/0", "nope"}));
  CHECK(server.erase("k/0"));
  CHECK_FALSE(server.erase("k/0"));
  CHECK_FALSE(server.check({"k/0"}));
  server.set("text", "abc");
  CHECK_THAT(error_of([&] { server.add("text", 1); }), Contains("non-integer"));
  server.wait({"k/1", "k/2"}, ms(100));  // present: returns at once
  CHECK(server.unique_prefix("gloo") == "gloo/0/");
  CHECK(server.unique_prefix("gloo") == "gloo/1/");
  CHECK(server.unique_prefix("nccl") == "nccl/0/");
}

TEST_CASE("store: missing keys and absent ranks time out with clear errors", "[dist][store]") {
  TcpStore server("127.0.0.1", 0, true, ms(3000));
  TcpStore c("127.0.0.1", server.port(), false, ms(3000));
  c.set("here", "1");

  auto t0 = Clock::now();
  std::string e = error_of([&] { c.get("never/set", ms(300)); });
  CHECK(seconds_since(t0) < 2.5);
  CHECK_THAT(e, Contains("timed out after 0.3 s") && Contains("'never/set'"));

  e = error_of([&] { c.wait({"here", "missing/a", "missing/b"}, ms(200)); });
  CHECK_THAT(e, Contains("'missing/a', 'missing/b'"));
  CHECK_THAT(e, !Contains("'here'"));

  // The connection survives a timeout.
  CHECK(c.get("here") == "1");

  t0 = Clock::now();
  e = error_of([&] { c.barrier(3, "lonely", ms(300)); });
  CHECK(seconds_since(t0) < 2.5);
  CHECK_THAT(e, Contains("barrier 'lonely'") && Contains("only 1 of 3 ranks arrived"));
}

TEST_CASE("store: a port in use and an absent master are reported", "[dist][store]") {
  TcpStore server("127.0.0.1", 0, true, ms(3000));
  std::string e = error_of([&] { TcpStore second("127.0.0.1", server.port(), true, ms(1000)); });
  CHECK_THAT(e, Contains("MASTER_PORT " + std::to_string(server.port()) + " on 127.0.0.1 is already in use"));

  int port = unused_port();
  auto t0 = Clock::now();
  e = error_of([&] { TcpStore c("127.0.0.1", port, false, ms(1000)); });
  double dt = seconds_since(t0);
  CHECK(dt >= 0.9);
  CHECK(dt < 5.0);
  CHECK_THAT(e, Contains("cannot reach master 127.0.0.1:" + std::to_string(port) + " after 1 s"));
  CHECK_THAT(e, Contains("Connection refused"));

  e = error_of([&] { TcpStore c("no-such-host.invalid", port, false, ms(300)); });
  CHECK_THAT(e, Contains("cannot reach master no-such-host.invalid") && Contains("resolve"));

  CHECK_THAT(error_of([] { TcpStore c("127.0.0.1", 0, false, ms(100)); }), Contains("MASTER_PORT=0"));
}

TEST_CASE("store: a client waiting on a dead server fails fast", "[dist][store]") {
  auto server = std::make_unique<TcpStore>("127.0.0.1", 0, true, ms(10000));
  TcpStore c("127.0.0.1", server->port(), false, ms(10000));
  std::string e;
  double dt = 0;
  std::thread t([&] {
    auto t0 = Clock::now();
    e = error_of([&] { c.get("never"); });
    dt = seconds_since(t0);
  });
  std::this_thread::sleep_for(ms(200));
  server.reset();  // rank 0 exits
  t.join();
  CHECK(dt < 5.0);
  CHECK_THAT(e, Contains("lost the connection to the store"));
  CHECK_THAT(error_of([&] { c.set("a", "b"); }), Contains("closed"));
}

TEST_CASE("store: a foreign service on the port is not mistaken for the store", "[dist][store]") {
  int port = 0;
  const int fd = listening_socket(&port);
  REQUIRE(fd >= 0);
  std::thread t([fd] {
    int c = ::accept(fd, nullptr, nullptr);  // accept and hang up without a word
    if (c >= 0) ::close(c);
  });
  std::string e = error_of([&] { TcpStore c("127.0.0.1", port, false, ms(2000)); });
  t.join();
  ::close(fd);
  CHECK_THAT(e, Contains("not a muonforge rendezvous store"));
}

TEST_CASE("store: a foreign service that answers with other bytes fails at once", "[dist][store]") {
  int port = 0;
  const int fd = listening_socket(&port);
  REQUIRE(fd >= 0);
  std::thread t([fd] {
    int c = ::accept(fd, nullptr, nullptr);
    if (c < 0) return;
    const char reply[] = "HTTP/1.1 400 Bad Request\r\n\r\n";
    (void)!::write(c, reply, sizeof(reply) - 1);
    char buf[64];
    (void)!::read(c, buf, sizeof(buf));
    ::close(c);
  });
  auto t0 = Clock::now();
  std::string e = error_of([&] { TcpStore c("127.0.0.1", port, false, ms(5000)); });
  double dt = seconds_since(t0);
  t.join();
  ::close(fd);
  CHECK_THAT(e, Contains("not a muonforge rendezvous store"));
  CHECK(dt < 2.0);  // no retrying a stranger until the timeout
}

// Rank 0 lives for the whole job: clients that come and go (retries, scanners, short tools) must
// not leave descriptors behind.
TEST_CASE("store: finished connections release their descriptors", "[dist][store]") {
  auto open_fds = [] {
    size_t n = 0;
    for (auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
      (void)e;
      ++n;
    }
    return n;
  };
  TcpStore server("127.0.0.1", 0, true, ms(5000));
  server.set("k", "v");
  for (int i = 0; i < 20; ++i) TcpStore("127.0.0.1", server.port(), false, ms(5000)).get("k");
  std::this_thread::sleep_for(ms(200));
  const size_t before = open_fds();
  for (int i = 0; i < 300; ++i) {
    TcpStore c("127.0.0.1", server.port(), false, ms(5000));
    CHECK(c.get("k") == "v");
  }
  std::this_thread::sleep_for(ms(300));  // the server's threads see the hang-ups
  const size_t after = open_fds();
  INFO("open descriptors before " << before << ", after 300 more clients " << after);
  CHECK(after <= before + 5);
}

// A restarted rank (generation g) may knock while the port still holds the store of the group that
// is going down (generation g-1): it must wait for its own group's store, not join the old one.
TEST_CASE("store: a restarted rank waits for the store of its own restart", "[dist][store]") {
  std::atomic<int> told_newer{0};  // on_superseded calls, with the newer generation (1)
  auto old_group = std::make_unique<TcpStore>("127.0.0.1", 0, true, ms(5000), 0, [&](uint32_t g) {
    told_newer += int(g);
  });
  const int port = old_group->port();
  std::unique_ptr<TcpStore> fresh;
  std::string e;
  std::thread client([&] {
    e = error_of([&] {
      TcpStore c("127.0.0.1", port, false, ms(8000), 1);
      c.set("joined", "yes");
    });
  });
  std::this_thread::sleep_for(ms(400));
  CHECK_FALSE(old_group->check({"joined"}));  // never talked to the old store
  CHECK(told_newer == 1);                      // but the old store heard of the new group
  old_group.reset();                           // the old rank 0 exits
  fresh = std::make_unique<TcpStore>("127.0.0.1", port, true, ms(5000), 1);
  client.join();
  CHECK(e == "<no error>");
  CHECK(fresh->get("joined", ms(1000)) == "yes");

  // Past the timeout the error says what it waited for.
  TcpStore stuck("127.0.0.1", 0, true, ms(5000), 0);
  auto t0 = Clock::now();
  e = error_of([&] { TcpStore c("127.0.0.1", stuck.port(), false, ms(700), 1); });
  CHECK(seconds_since(t0) < 4.0);
  CHECK_THAT(e, Contains("still belonged to restart 0") && Contains("this rank is restart 1"));

  // A rank older than the store is a node whose launcher fell behind: fail at once.
  TcpStore ahead("127.0.0.1", 0, true, ms(5000), 2);
  t0 = Clock::now();
  e = error_of([&] { TcpStore c("127.0.0.1", ahead.port(), false, ms(5000), 1); });
  CHECK(seconds_since(t0) < 2.0);
  CHECK_THAT(e, Contains("restart 1") && Contains("already serves restart 2") && Contains("out of step"));
}

// ---- watchdog ------------------------------------------------------------------------------------

TEST_CASE("watchdog: finished work is released, work past the timeout fires once", "[dist][watchdog]") {
  std::mutex mu;
  std::vector<std::string> fired;
  std::atomic<int> released{0};
  std::atomic<bool> started_here{false};
  const auto caller = std::this_thread::get_id();
  Watchdog::Hooks hooks;
  hooks.thread_start = [&] { started_here = std::this_thread::get_id() != caller; };
  hooks.fire = [&](const std::string& why) {
    std::lock_guard<std::mutex> lk(mu);
    fired.push_back(why);
  };
  std::atomic<bool> a_done{false}, b_done{false};
  {
    Watchdog w(ms(600), hooks, ms(20));
    w.watch("allreduce A", [&] { return a_done.load(); }, [&] { ++released; });
    w.watch("allreduce B", [&] { return b_done.load(); }, [&] { ++released; });
    CHECK(w.pending() == 2);
    std::this_thread::sleep_for(ms(150));
    a_done = true;  // A finishes well within the timeout
    auto t0 = Clock::now();
    while (w.pending() > 1 && seconds_since(t0) < 5) std::this_thread::sleep_for(ms(10));
    CHECK(w.pending() == 1);
    CHECK(released == 1);
    CHECK_FALSE(w.fired());
    // B never finishes: it fires once its 600 ms are up, and only once.
    t0 = Clock::now();
    while (!w.fired() && seconds_since(t0) < 5) std::this_thread::sleep_for(ms(10));
    CHECK(w.fired());
    std::this_thread::sleep_for(ms(200));
    CHECK(w.pending() == 1);
  }  // destruction releases B
  CHECK(released == 2);
  CHECK(started_here);
  REQUIRE(fired.size() == 1);
  CHECK_THAT(fired[0], Contains("allreduce B has not finished") && Contains("MF_COMM_TIMEOUT") &&
                           Contains("timeout 0.6 s"));
}

TEST_CASE("watchdog: an asynchronous communicator error fires at once", "[dist][watchdog]") {
  std::atomic<int> calls{0};
  std::string why;
  std::atomic<bool> broken{false};
  Watchdog::Hooks hooks;
  hooks.async_error = [&] { return broken ? std::string("remote process exited") : std::string(); };
  hooks.fire = [&](const std::string& w) {
    why = w;
    ++calls;
  };
  Watchdog w(ms(60000), hooks, ms(20));
  w.watch("broadcast", [] { return false; });
  std::this_thread::sleep_for(ms(100));
  CHECK(calls == 0);
  broken = true;
  auto t0 = Clock::now();
  while (calls == 0 && seconds_since(t0) < 5) std::this_thread::sleep_for(ms(10));
  CHECK(seconds_since(t0) < 2);
  std::this_thread::sleep_for(ms(100));
  CHECK(calls == 1);
  CHECK_THAT(why, Contains("remote process exited"));
  CHECK_THAT(error_of([] { Watchdog bad(ms(0), {nullptr, nullptr, [](const std::string&) {}}); }),
             Contains("MF_COMM_TIMEOUT"));
}

// ---- communicators -----------------------------------------------------------------------------

TEST_CASE("fnv1a64 matches the reference values", "[dist]") {
  CHECK(fnv1a64("") == 0xcbf29ce484222325ULL);
  CHECK(fnv1a64("a") == 0xaf63dc4c8601ec8cULL);
  CHECK(fnv1a64("foobar") == 0x85944171f73967e8ULL);
}

TEST_CASE("single-process communicator", "[dist][comm]") {
  DistEnv env;
  auto c = make_communicator(env, nullptr, Device::CPU);
  CHECK(std::string(c->name()) == "single");
  CHECK(c->rank() == 0);
  CHECK(c->size() == 1);
  std::vector<float> x = {1.5f, -2.0f, 3.25f}, y(3, 0.0f);
  c->allreduce_sum(x.data(), 3);
  c->allreduce_avg(x.data(), 3);
  CHECK(x == std::vector<float>{1.5f, -2.0f, 3.25f});
  c->allgather(x.data(), y.data(), 3);
  CHECK(y == x);
  std::fill(y.begin(), y.end(), 0.0f);
  c->reduce_scatter_sum(x.data(), y.data(), 3);
  CHECK(y == x);
  c->broadcast(x.data(), 3, 0);
  CHECK_THAT(error_of([&] { c->broadcast(x.data(), 3, 1); }), Contains("root 1"));
  CHECK(c->allgather_bytes("abc") == std::vector<std::string>{"abc"});
  c->barrier();
  check_same(*c, "config", "anything");
  check_same_json(*c, "config", nlohmann::json{{"a", 1}});

  DistEnv two = parse_dist_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}});
  CHECK_THAT(error_of([&] { make_communicator(two, nullptr, Device::CPU); }), Contains("store"));
}

#ifdef MF_HAS_GLOO

namespace {

// Runs f(rank, comm) on 3 threads, each with its own store client and Gloo communicator.
std::vector<std::string> with_gloo(int n, const std::function<void(int, Communicator&)>& f,
                                   ms timeout = ms(5000)) {
  TcpStore server("127.0.0.1", 0, true, timeout);
  return run_ranks(n, [&](int r) {
    TcpStore store("127.0.0.1", server.port(), false, timeout);
    auto comm = make_gloo_communicator(r, n, store, "127.0.0.1", timeout);
    MF_CHECK(comm->rank() == r && comm->size() == n, "wrong rank/size");
    f(r, *comm);
    comm->barrier();  // nobody tears down while a peer still talks to it
  });
}

std::vector<float> ints(int rank, size_t n) {  // integer-valued floats: sums are exact in any order
  Rng rng(1234 + uint64_t(rank));
  std::vector<float> v(n);
  for (auto& x : v) x = float(int64_t(rng.below(2001)) - 1000);
  return v;
}

std::vector<float> normals(int rank, size_t n) {
  Rng rng(99 + uint64_t(rank));
  std::vector<float> v(n);
  for (auto& x : v) x = float(rng.normal());
  return v;
}

}  // namespace

TEST_CASE("gloo: collectives over 3 ranks give exact results", "[dist][gloo]") {
  const int n = 3;
  const size_t N = 1037;  // awkward length, spans several ring chunks
  std::vector<std::vector<float>> sum(n), avg(n), rs(n), ag(n), ag_inplace(n), bc(n), noisy(n);
  std::vector<std::vector<std::string>> bytes(n);
  std::vector<std::string> bcast_bytes(n);
  std::atomic<int> arrived{0};
  std::vector<int> seen_after_barrier(n);
  auto errs = with_gloo(n, [&](int r, Communicator& c) {
    MF_CHECK(std::string(c.name()) == "gloo", "wrong communicator ", c.name());
    sum[r] = ints(r, N);
    c.allreduce_sum(sum[r].data(), N);
    avg[r] = ints(r, N);
    c.allreduce_avg(avg[r].data(), N);
    noisy[r] = normals(r, N);
    c.allreduce_sum(noisy[r].data(), N);

    const size_t chunk = 17;
    std::vector<float> send = ints(r + 10, chunk * n);
    rs[r].assign(chunk, 0.0f);
    c.reduce_scatter_sum(send.data(), rs[r].data(), chunk);

    std::vector<float> mine = ints(r + 20, 5);
    ag[r].assign(5 * n, 0.0f);
    c.allgather(mine.data(), ag[r].data(), 5);
    ag_inplace[r].assign(5 * n, -7.0f);
    std::copy(mine.begin(), mine.end(), ag_inplace[r].begin() + 5 * r);
    c.allgather(ag_inplace[r].data() + 5 * r, ag_inplace[r].data(), 5);

    bc[r] = ints(r + 30, N);
    c.broadcast(bc[r].data(), N, 2);

    std::this_thread::sleep_for(ms(50 * r));
    arrived++;
    c.barrier();
    seen_after_barrier[r] = arrived.load();

    std::string b = r == 1 ? std::string() : std::string(size_t(r + 1) * 3, char('a' + r)) + '\0';
    bytes[r] = c.allgather_bytes(b);
    bcast_bytes[r] = r == 1 ? std::string("from rank 1\0!", 13) : "junk";
    c.broadcast_bytes(bcast_bytes[r], 1);

    c.allreduce_sum(nullptr, 0);  // empty ops are no-ops
    c.allgather(nullptr, nullptr, 0);
  });
  for (int r = 0; r < n; ++r) { INFO("rank " << r << ": " << errs[r]); REQUIRE(errs[r].empty()); }

  std::vector<float> want(N, 0.0f), want_rs(17, 0.0f), want_ag;
  for (int r = 0; r < n; ++r) {
    auto x = ints(r, N);
    for (size_t i = 0; i < N; ++i) want[i] += x[i];
    auto m = ints(r + 20, 5);
    want_ag.insert(want_ag.end(), m.begin(), m.end());
  }
  for (int r = 0; r < n; ++r) {
    CHECK(sum[r] == want);
    for (size_t i = 0; i < N; ++i) REQUIRE(avg[r][i] == Approx(want[i] / 3.0f).epsilon(1e-6));
    CHECK(noisy[r] == noisy[0]);  // every rank ends with the same bits
    std::vector<float> want_rs_r(17, 0.0f);
    for (int o = 0; o < n; ++o) {
      auto s = ints(o + 10, 17 * n);
      for (size_t i = 0; i < 17; ++i) want_rs_r[i] += s[size_t(r) * 17 + i];
    }
    CHECK(rs[r] == want_rs_r);
    CHECK(ag[r] == want_ag);
    CHECK(ag_inplace[r] == want_ag);
    CHECK(bc[r] == ints(2 + 30, N));
    CHECK(seen_after_barrier[r] == n);
    REQUIRE(bytes[r].size() == size_t(n));
    CHECK(bytes[r][0] == std::string("aaa") + '\0');
    CHECK(bytes[r][1].empty());
    CHECK(bytes[r][2] == std::string("ccccccccc") + '\0');
    CHECK(bcast_bytes[r] == std::string("from rank 1\0!", 13));
  }
  std::vector<float> ref(N, 0.0f);
  for (int r = 0; r < n; ++r) {
    auto x = normals(r, N);
    for (size_t i = 0; i < N; ++i) ref[i] += x[i];
  }
  for (size_t i = 0; i < N; ++i) REQUIRE(noisy[0][i] == Approx(ref[i]).margin(1e-5));
}

TEST_CASE("gloo: sharded reduce-scatter and all-gather in place (ZeRO-1)", "[dist][gloo][zero]") {
  for (int n : {3, 2, 4}) {
  // 1037: shards of 384 floats, the last one short; 100: rank 0 holds it all, the others nothing.
  for (size_t N : {size_t(1037), size_t(100), size_t(64 * 3)}) {
    std::vector<std::vector<float>> rs(n), ag(n);
    auto errs = with_gloo(n, [&](int r, Communicator& c) {
      rs[r] = ints(r + 40, N);
      c.reduce_scatter_avg_async(rs[r].data(), N)->wait();
      ag[r] = ints(r + 50, N);  // every rank's input differs: only its own shard may survive
      c.allgather_shards(ag[r].data(), N);
    });
    for (int r = 0; r < n; ++r) { INFO("rank " << r << ": " << errs[r]); REQUIRE(errs[r].empty()); }
    std::vector<float> mean(N, 0.0f), gathered(N, 0.0f);
    for (int r = 0; r < n; ++r) {
      auto x = ints(r + 40, N);
      for (size_t i = 0; i < N; ++i) mean[i] += x[i];
      const ShardRange sh = shard_range(N, n, r);
      auto y = ints(r + 50, N);
      for (size_t i = sh.lo; i < sh.hi; ++i) gathered[i] = y[i];
    }
    for (int r = 0; r < n; ++r) {
      INFO("world " << n << " N " << N << " rank " << r);
      const ShardRange sh = shard_range(N, n, r);
      for (size_t i = sh.lo; i < sh.hi; ++i) REQUIRE(rs[r][i] == Approx(mean[i] / float(n)).epsilon(1e-6));
      CHECK(ag[r] == gathered);
      // A true reduce-scatter: outside its shard a rank holds its input or partial sums, not the
      // mean an all-reduce would leave there.
      if (N == 1037) {
        size_t at_mean = 0;
        for (size_t i = 0; i < N; ++i)
          if ((i < sh.lo || i >= sh.hi) && rs[r][i] == mean[i] / float(n)) ++at_mean;
        CHECK(at_mean < (N - sh.size()) / 2);
      }
    }
  }
  }
}

TEST_CASE("gloo: all-gather of unequal ranges in place (distributed Muon)", "[dist][gloo]") {
  const int n = 3;
  const size_t N = 1000;
  // Rank 0 owns [10, 400), rank 1 nothing, rank 2 [400, 999); 0-10 and 999 belong to nobody.
  const std::vector<std::pair<size_t, size_t>> ranges = {{10, 400}, {0, 0}, {400, 999}};
  std::vector<std::vector<float>> got(n);
  std::vector<std::string> wrong_count(n);
  auto errs = with_gloo(n, [&](int r, Communicator& c) {
    got[r] = ints(r + 60, N);  // every rank's input differs: only the owner's range may survive
    c.allgather_ranges(got[r].data(), ranges);
    wrong_count[r] = error_of([&] { c.allgather_ranges(got[r].data(), {{0, 1}}); });
  });
  for (int r = 0; r < n; ++r) { INFO("rank " << r << ": " << errs[r]); REQUIRE(errs[r].empty()); }
  for (int r = 0; r < n; ++r) {
    INFO("rank " << r);
    const auto own = ints(r + 60, N), r0 = ints(60, N), r2 = ints(62, N);
    for (size_t i = 0; i < N; ++i) {
      const float want = (i >= 10 && i < 400) ? r0[i] : (i >= 400 && i < 999) ? r2[i] : own[i];
      REQUIRE(got[r][i] == want);
    }
    CHECK_THAT(wrong_count[r], Contains("1 ranges for 3 ranks"));
  }
}

TEST_CASE("partition_contiguous: balanced contiguous runs in rank order", "[dist]") {
  Rng rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int w = 1 + int(rng.below(8));
    std::vector<int64_t> sizes(rng.below(40));
    for (auto& s : sizes) s = int64_t(rng.below(5)) == 0 ? int64_t(rng.below(100000)) : int64_t(rng.below(1000));
    const std::vector<int> rank = partition_contiguous(sizes, w);
    REQUIRE(rank.size() == sizes.size());
    double total = 0;
    int64_t biggest = 0;
    for (auto s : sizes) { total += double(s); biggest = std::max(biggest, s); }
    std::vector<double> load(size_t(w), 0.0);
    for (size_t i = 0; i < sizes.size(); ++i) {
      REQUIRE(rank[i] >= 0);
      REQUIRE(rank[i] < w);
      if (i > 0) REQUIRE(rank[i] >= rank[i - 1]);  // contiguous, in rank order
      load[size_t(rank[i])] += double(sizes[i]);
    }
    INFO("trial " << trial << " world " << w << " items " << sizes.size());
    // Every boundary lies within half an item of its target, so a load is off by at most one item.
    for (double l : load) REQUIRE(std::abs(l - total / w) <= double(biggest) + 1e-9);
  }
  // Equal items split evenly; more ranks than items leaves ranks empty.
  CHECK(partition_contiguous({5, 5, 5, 5, 5, 5}, 3) == std::vector<int>{0, 0, 1, 1, 2, 2});
  CHECK(partition_contiguous({100, 1, 1, 1}, 2) == std::vector<int>{0, 1, 1, 1});
  CHECK(partition_contiguous({4, 4}, 4).size() == 2);
  CHECK(partition_contiguous({}, 3).empty());
  CHECK_THAT(error_of([] { partition_contiguous({1}, 0); }), Contains("0 ranks"));
}

TEST_CASE("shard_range: contiguous aligned shards that cover the buffer", "[dist][zero]") {
  for (size_t n : {size_t(0), size_t(1), size_t(63), size_t(64), size_t(1000), size_t(12345)})
    for (int w : {1, 2, 3, 8}) {
      INFO("n " << n << " world " << w);
      size_t next = 0;
      for (int r = 0; r < w; ++r) {
        ShardRange sh = shard_range(n, w, r);
        CHECK(sh.lo == next);  // in rank order, no gaps
        CHECK(sh.lo <= sh.hi);
        CHECK(sh.size() <= shard_stride(n, w));
        if (sh.size() > 0) CHECK(sh.lo % 64 == 0);
        next = sh.hi;
      }
      CHECK(next == n);
      CHECK(shard_stride(n, w) * size_t(w) >= n);
      CHECK(shard_stride(n, w) % 64 == 0);
      // Balanced: no rank holds more than a shard's worth above the even split.
      CHECK(shard_stride(n, w) < (n + size_t(w) - 1) / size_t(w) + 64);
    }
  CHECK_THAT(error_of([] { shard_range(10, 2, 2); }), Contains("rank 2 of 2"));
}

TEST_CASE("gloo: check_same names the rank and the differing keys", "[dist][gloo]") {
  const int n = 3;
  std::vector<std::string> same_errs(n);
  auto errs = with_gloo(n, [&](int r, Communicator& c) {
    check_same(c, "config", "identical text");
    same_errs[r] = error_of([&] { check_same(c, "data", r == 2 ? "shards-B" : "shards-A"); });
    nlohmann::json j = {{"model", {{"d_model", 64}, {"n_layer", r == 1 ? 3 : 2}}},
                        {"train", {{"seed", 1337}, {"betas", {0.9, 0.95}}}}};
    if (r == 1) j["train"]["extra"] = true;
    check_same_json(c, "config", nlohmann::json{{"same", 1}});
    std::string e = error_of([&] { check_same_json(c, "config", j); });
    // Every rank throws the same diagnosis.
    MF_CHECK(e.find("rank 1's config differs from rank 0's at model.n_layer, train.extra") != std::string::npos,
             "rank ", r, " got: ", e);
    MF_CHECK(e.find("d_model") == std::string::npos && e.find("seed") == std::string::npos, "rank ", r,
             " named a key that agrees: ", e);
  });
  for (int r = 0; r < n; ++r) { INFO("rank " << r << ": " << errs[r]); CHECK(errs[r].empty()); }
  for (int r = 0; r < n; ++r) CHECK_THAT(same_errs[r], Contains("rank 2's data differs from rank 0's"));
}

TEST_CASE("gloo: a rank that never joins fails the others within the timeout", "[dist][gloo]") {
  const int n = 3;
  TcpStore server("127.0.0.1", 0, true, ms(1000));
  auto t0 = Clock::now();
  auto errs = run_ranks(n, [&](int r) {
    if (r == 2) return;  // never shows up
    TcpStore store("127.0.0.1", server.port(), false, ms(1000));
    make_gloo_communicator(r, n, store, "127.0.0.1", ms(1000));
  });
  CHECK(seconds_since(t0) < 10.0);
  CHECK_THAT(errs[0], Contains("timed out"));
  CHECK_THAT(errs[1], Contains("timed out"));
}

TEST_CASE("gloo: a peer that dies mid-run makes the collective fail, not hang", "[dist][gloo]") {
  const int n = 3;
  // Rank 2 takes part in the first collective, then "crashes": its communicator and connections
  // go away while the others start the second.
  auto peer_dies = [&](const std::function<void(Communicator&, std::vector<float>&)>& op) {
    TcpStore server("127.0.0.1", 0, true, ms(3000));
    auto t0 = Clock::now();
    auto errs = run_ranks(n, [&](int r) {
      TcpStore store("127.0.0.1", server.port(), false, ms(3000));
      auto comm = make_gloo_communicator(r, n, store, "127.0.0.1", ms(2000));
      std::vector<float> x(1000, 1.0f);
      op(*comm, x);
      if (r == 2) return;
      std::this_thread::sleep_for(ms(200));
      op(*comm, x);
    });
    CHECK(seconds_since(t0) < 15.0);
    CHECK(errs[2].empty());
    return errs;
  };
  SECTION("all-reduce") {
    auto errs = peer_dies([](Communicator& c, std::vector<float>& x) { c.allreduce_sum(x.data(), x.size()); });
    CHECK_THAT(errs[0], Contains("gloo allreduce failed on rank 0 of 3"));
    CHECK_THAT(errs[1], Contains("gloo allreduce failed on rank 1 of 3"));
  }
  SECTION("reduce-scatter (ZeRO-1)") {
    auto errs = peer_dies([](Communicator& c, std::vector<float>& x) {
      c.reduce_scatter_avg_async(x.data(), x.size())->wait();
    });
    CHECK_THAT(errs[0], Contains("gloo reduce_scatter (async) failed on rank 0 of 3"));
    CHECK_THAT(errs[1], Contains("gloo reduce_scatter (async) failed on rank 1 of 3"));
  }
}

TEST_CASE("make_communicator picks Gloo for CPU jobs", "[dist][gloo]") {
  const int n = 2;
  TcpStore server("127.0.0.1", 0, true, ms(5000));
  std::vector<std::string> names(n);
  std::vector<float> sums(n);
  auto errs = run_ranks(n, [&](int r) {
    DistEnv env = parse_dist_env({{"RANK", std::to_string(r)}, {"WORLD_SIZE", "2"},
                                  {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", std::to_string(server.port())}});
    TcpStore store(env.master_addr, env.master_port, false, ms(5000));
    auto comm = make_communicator(env, &store, Device::CPU);
    names[r] = comm->name();
    float x = float(r + 1);
    comm->allreduce_sum(&x, 1);
    sums[r] = x;
    comm->barrier();
  });
  for (int r = 0; r < n; ++r) {
    INFO(errs[r]);
    CHECK(errs[r].empty());
    CHECK(names[r] == "gloo");
    CHECK(sums[r] == 3.0f);
  }
}

#endif  // MF_HAS_GLOO
