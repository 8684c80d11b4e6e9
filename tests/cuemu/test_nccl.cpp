// The emulator's streams (queued work runs late: when waited for, or after CUEMU_COMM_DELAY_MS)
// and its NCCL: the two ordering errors it reports on one rank (a collective not ordered after
// other streams' work, an input written while in flight); 2 ranks as 2 processes (fork): every
// collective's values, a mismatch between ranks reported on both, a dead peer reported as
// ncclRemoteError.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"
#include "nccl.h"

namespace {

std::vector<float> down(const float* d, size_t n) {
  std::vector<float> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost);
  return h;
}
float* up(const std::vector<float>& h) {
  float* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(float));
  cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice);
  return d;
}

// The communicator's asynchronous state once stream `s` has run its queued collectives.
ncclResult_t state_after(ncclComm_t comm, cudaStream_t s) {
  cudaStreamSynchronize(s);
  ncclResult_t st = ncclInProgress;
  ncclCommGetAsyncError(comm, &st);
  return st;
}

// Settles a call on a non-blocking communicator: polls while the state is ncclInProgress (at
// most 10 s), as src/dist/nccl_comm.cpp does. Returns the state it settled on.
ncclResult_t settled(ncclComm_t comm, ncclResult_t r) {
  const auto t0 = std::chrono::steady_clock::now();
  while (r == ncclInProgress && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (ncclCommGetAsyncError(comm, &r) != ncclSuccess) return ncclInternalError;
  }
  return r;
}

// A one-rank communicator (no sockets).
ncclComm_t one_rank() {
  ncclUniqueId id;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  ncclComm_t comm = nullptr;
  REQUIRE(ncclCommInitRankConfig(&comm, 1, id, 0, nullptr) == ncclSuccess);
  return comm;
}

// Runs `body(rank)` as rank 0 here and as rank 1 in a forked child; returns the child's exit
// status (0 when its body returned 0). The child makes its own stream (no worker thread survives
// a fork) and ends with _exit.
template <typename F>
int two_ranks(F body) {
  ncclUniqueId id;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int fails = 0;
    try {
      fails = body(1, id);
    } catch (...) {
      fails = 100;
    }
    _exit(fails);
  }
  const int mine = body(0, id);
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(mine == 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 200;
}

}  // namespace

TEST_CASE("cuemu streams: queued work runs when waited for, and in stream order", "[cuemu][streams]") {
  cudaStream_t s = nullptr, other = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
  REQUIRE(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking) == cudaSuccess);
  float* a = up({0.f});
  float* b = up({-1.f});
  std::atomic<bool> ran{false};
  cuemu::enqueue(s, nullptr, [&] {
    float one = 1.f;
    std::memcpy(a, &one, sizeof one);
    ran = true;
  });
  CHECK(cuemu::stream_busy(s));
  // A device-to-device copy issued behind it joins the queue (it must see a == 1).
  REQUIRE(cudaMemcpyAsync(b, a, sizeof(float), cudaMemcpyDeviceToDevice, s) == cudaSuccess);
  cudaEvent_t e;
  cudaEventCreate(&e);
  cudaEventRecord(e, s);
  CHECK(cudaEventQuery(e) == cudaErrorNotReady);  // asking does not make it run
  CHECK_FALSE(ran);
  // Another stream's wait on the event makes it run before that stream's later work.
  REQUIRE(cudaStreamWaitEvent(other, e, 0) == cudaSuccess);
  CHECK(ran);
  CHECK(cudaEventQuery(e) == cudaSuccess);
  CHECK(down(b, 1)[0] == 1.f);
  CHECK_FALSE(cuemu::stream_busy(s));
  // Nobody waits: it still runs, after CUEMU_COMM_DELAY_MS (2 s by default).
  ran = false;
  cuemu::enqueue(s, nullptr, [&] { ran = true; });
  const auto t0 = std::chrono::steady_clock::now();
  while (!ran && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(20))
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(ran);
  cudaEventDestroy(e);
  cudaFree(a);
  cudaFree(b);
  cudaStreamDestroy(s);
  cudaStreamDestroy(other);
}

TEST_CASE("cuemu NCCL: two processes, every collective", "[cuemu][nccl]") {
  const size_t n = 6;
  const int child = two_ranks([&](int rank, ncclUniqueId id) {
    int bad = 0;
    auto expect = [&](bool ok) { bad += !ok; };
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    ncclComm_t comm = nullptr;
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    const ncclResult_t init = ncclCommInitRankConfig(&comm, 2, id, rank, &cfg);
    expect(init == ncclInProgress);  // non-blocking: it connects in the background
    if (settled(comm, init) != ncclSuccess) return 50;
    std::vector<float> x(n), x2(2 * n);
    for (size_t i = 0; i < n; ++i) x[i] = float(i) + 100.f * float(rank);
    for (size_t i = 0; i < 2 * n; ++i) x2[i] = float(i) + 100.f * float(rank);
    float* d = up(x);
    float* r = up(std::vector<float>(2 * n, -7.f));
    float* d2 = up(x2);
    expect(settled(comm, ncclAllReduce(d, r, n, ncclFloat32, ncclSum, comm, s)) == ncclSuccess);  // out of place
    expect(settled(comm, ncclAllReduce(d, d, n, ncclFloat32, ncclAvg, comm, s)) == ncclSuccess);  // in place
    cudaStreamSynchronize(s);
    std::vector<float> sum = down(r, n), avg = down(d, n);
    for (size_t i = 0; i < n; ++i) {
      expect(sum[i] == 2.f * float(i) + 100.f);
      expect(avg[i] == float(i) + 50.f);
    }
    expect(settled(comm, ncclReduceScatter(d2, r, n, ncclFloat32, ncclSum, comm, s)) == ncclSuccess);  // rank k: chunk k
    cudaStreamSynchronize(s);
    std::vector<float> rs = down(r, n);
    for (size_t i = 0; i < n; ++i) expect(rs[i] == 2.f * float(i + size_t(rank) * n) + 100.f);
    // All-gather in place: each rank's part sits at recv + rank * n.
    std::vector<float> g(2 * n, -1.f);
    for (size_t i = 0; i < n; ++i) g[size_t(rank) * n + i] = float(i) + 1000.f * float(rank);
    float* dg = up(g);
    expect(settled(comm, ncclAllGather(dg + size_t(rank) * n, dg, n, ncclFloat32, comm, s)) == ncclSuccess);
    // In a group the calls answer ncclSuccess and ncclGroupEnd answers for them.
    expect(ncclGroupStart() == ncclSuccess);
    expect(ncclBroadcast(d2, d2, 2 * n, ncclFloat32, 1, comm, s) == ncclSuccess);  // rank 1's x2 everywhere
    const ncclResult_t end = ncclGroupEnd();
    expect(end == ncclInProgress);
    expect(settled(comm, end) == ncclSuccess);
    cudaStreamSynchronize(s);
    std::vector<float> ag = down(dg, 2 * n), bc = down(d2, 2 * n);
    for (size_t k = 0; k < 2; ++k)
      for (size_t i = 0; i < n; ++i) expect(ag[k * n + i] == float(i) + 1000.f * float(k));
    for (size_t i = 0; i < 2 * n; ++i) expect(bc[i] == float(i) + 100.f);
    expect(state_after(comm, s) == ncclSuccess);
    const ncclResult_t fin = ncclCommFinalize(comm);
    expect(fin == ncclInProgress);
    expect(settled(comm, fin) == ncclSuccess);
    expect(ncclCommDestroy(comm) == ncclSuccess);
    return bad;
  });
  CHECK(child == 0);
}

TEST_CASE("cuemu NCCL: ranks that call different collectives both get the error", "[cuemu][nccl]") {
  const int child = two_ranks([&](int rank, ncclUniqueId id) {
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    ncclComm_t comm = nullptr;
    if (ncclCommInitRankConfig(&comm, 2, id, rank, nullptr) != ncclSuccess) return 50;
    float* d = up(std::vector<float>(16, 1.f));
    ncclAllReduce(d, d, rank == 0 ? 8 : 9, ncclFloat32, ncclSum, comm, s);
    const ncclResult_t st = state_after(comm, s);
    const std::string why = ncclGetLastError(comm);
    const bool named = why.find("count 9") != std::string::npos && why.find("count 8") != std::string::npos;
    ncclCommAbort(comm);
    if (rank == 0) {
      CHECK(st == ncclInvalidUsage);
      CHECK(named);
      INFO(why);
    }
    return st == ncclInvalidUsage && named ? 0 : 1;
  });
  CHECK(child == 0);
}

TEST_CASE("cuemu NCCL: a peer that exits is ncclRemoteError, not a hang", "[cuemu][nccl]") {
  const int child = two_ranks([&](int rank, ncclUniqueId id) {
    ncclComm_t comm = nullptr;
    if (ncclCommInitRankConfig(&comm, 2, id, rank, nullptr) != ncclSuccess) return 50;
    if (rank == 1) _exit(0);  // dies before its first collective
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    float* d = up(std::vector<float>(4, 1.f));
    ncclAllReduce(d, d, 4, ncclFloat32, ncclSum, comm, s);
    CHECK(state_after(comm, s) == ncclRemoteError);
    CHECK(std::string(ncclGetLastError(comm)).find("rank 1 closed its connection") != std::string::npos);
    ncclCommAbort(comm);
    return 0;
  });
  CHECK(child == 0);
}

TEST_CASE("cuemu NCCL: a collective must be ordered after the other streams' work", "[cuemu][nccl]") {
  cudaStream_t compute, comm_stream;
  cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking);
  cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking);
  ncclComm_t comm = one_rank();
  std::vector<float> h(8, 2.f);
  float* d = up(std::vector<float>(8, 0.f));
  // The input written on the compute stream, the collective on another stream with no wait.
  REQUIRE(cudaMemcpyAsync(d, h.data(), 8 * sizeof(float), cudaMemcpyHostToDevice, compute) == cudaSuccess);
  CHECK(ncclAllReduce(d, d, 8, ncclFloat32, ncclSum, comm, comm_stream) == ncclInvalidUsage);
  CHECK(std::string(ncclGetLastError(nullptr)).find("not ordered after") != std::string::npos);
  // With the event wait it is accepted, and so it is after a host synchronisation.
  cudaEvent_t e;
  cudaEventCreate(&e);
  cudaEventRecord(e, compute);
  cudaStreamWaitEvent(comm_stream, e, 0);
  CHECK(ncclAllReduce(d, d, 8, ncclFloat32, ncclSum, comm, comm_stream) == ncclSuccess);
  cudaStreamSynchronize(comm_stream);  // before the compute stream writes d again
  REQUIRE(cudaMemcpyAsync(d, h.data(), 8 * sizeof(float), cudaMemcpyHostToDevice, compute) == cudaSuccess);
  cudaStreamSynchronize(compute);
  CHECK(ncclAllReduce(d, d, 8, ncclFloat32, ncclSum, comm, comm_stream) == ncclSuccess);
  CHECK(state_after(comm, comm_stream) == ncclSuccess);
  CHECK(down(d, 8)[3] == 2.f);
  cudaEventDestroy(e);
  ncclCommDestroy(comm);
  cudaStreamDestroy(compute);
  cudaStreamDestroy(comm_stream);
}

TEST_CASE("cuemu NCCL: an input written while its collective is in flight is an error", "[cuemu][nccl]") {
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  ncclComm_t comm = one_rank();
  float* d = up(std::vector<float>(8, 1.f));
  std::vector<float> h(8, 5.f);
  REQUIRE(ncclAllReduce(d, d, 8, ncclFloat32, ncclSum, comm, s) == ncclSuccess);
  // The legacy-stream copy does not wait for a non-blocking stream: a race on the device.
  cudaMemcpy(d, h.data(), 8 * sizeof(float), cudaMemcpyHostToDevice);
  CHECK(state_after(comm, s) == ncclInvalidUsage);
  CHECK(std::string(ncclGetLastError(comm)).find("changed while the collective was in flight") != std::string::npos);
  ncclCommAbort(comm);
  cudaStreamDestroy(s);
}

TEST_CASE("cuemu NCCL: a non-blocking call made before the last one settled is refused", "[cuemu][nccl]") {
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  ncclUniqueId id;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  ncclComm_t comm = nullptr;
  REQUIRE(ncclCommInitRankConfig(&comm, 1, id, 0, &cfg) == ncclInProgress);
  REQUIRE(settled(comm, ncclInProgress) == ncclSuccess);
  float* d = up(std::vector<float>(8, 3.f));
  const ncclResult_t first = ncclAllReduce(d, d, 8, ncclFloat32, ncclSum, comm, s);
  CHECK(first == ncclInProgress);
  // Not settled: the next call is refused, and the communicator's state says why.
  CHECK(ncclAllReduce(d, d, 8, ncclFloat32, ncclSum, comm, s) == ncclInvalidUsage);
  ncclResult_t st = ncclSuccess;
  ncclCommGetAsyncError(comm, &st);
  CHECK(st == ncclInvalidUsage);
  const std::string why = ncclGetLastError(comm);
  INFO(why);
  CHECK(why.find("ncclAllReduce called while ncclAllReduce is still in progress") != std::string::npos);
  ncclCommAbort(comm);
  cudaStreamDestroy(s);
}

TEST_CASE("cuemu NCCL: an init whose peer never comes can be aborted while in progress", "[cuemu][nccl]") {
  ncclUniqueId id;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  ncclComm_t comm = nullptr;
  REQUIRE(ncclCommInitRankConfig(&comm, 2, id, 0, &cfg) == ncclInProgress);  // rank 1 never calls
  ncclResult_t st = ncclSuccess;
  for (int i = 0; i < 50; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    ncclCommGetAsyncError(comm, &st);
  }
  CHECK(st == ncclInProgress);
  // A collective on a communicator still connecting is refused.
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  float* d = up(std::vector<float>(4, 1.f));
  CHECK(ncclAllReduce(d, d, 4, ncclFloat32, ncclSum, comm, s) == ncclInvalidUsage);
  CHECK(std::string(ncclGetLastError(comm)).find("while ncclCommInitRankConfig is still in progress") !=
        std::string::npos);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(ncclCommAbort(comm) == ncclSuccess);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
  cudaStreamDestroy(s);
}

TEST_CASE("cuemu NCCL: two threads inside calls on one communicator are reported", "[cuemu][nccl]") {
  ncclComm_t comm = nullptr;
  {
    ncclUniqueId id;
    REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    REQUIRE(settled(comm, ncclCommInitRankConfig(&comm, 1, id, 0, &cfg)) == ncclSuccess);
  }
  // Each poll stays inside the call for a while: two threads polling for 300 ms overlap.
  std::atomic<bool> stop{false};
  auto poll = [&] {
    while (!stop) {
      ncclResult_t st;
      ncclCommGetAsyncError(comm, &st);
    }
  };
  std::thread other(poll);
  const auto t0 = std::chrono::steady_clock::now();
  ncclResult_t st = ncclSuccess;
  while (st == ncclSuccess && std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(300))
    ncclCommGetAsyncError(comm, &st);
  stop = true;
  other.join();
  ncclCommGetAsyncError(comm, &st);
  CHECK(st == ncclInvalidUsage);
  CHECK(std::string(ncclGetLastError(comm)).find("two threads called NCCL on one communicator at once") !=
        std::string::npos);
  ncclCommAbort(comm);
}
