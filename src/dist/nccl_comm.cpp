#include "dist/nccl_comm.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "dist/env.h"
#include "dist/store.h"
#include "dist/watchdog.h"

namespace mf {

namespace {

using Clock = std::chrono::steady_clock;

void cuda_ok(cudaError_t e, const char* what) {
  MF_CHECK(e == cudaSuccess, "CUDA error in ", what, ": ", cudaGetErrorString(e));
}

// An all-reduce queued on the communication stream; wait() makes the compute stream wait for the
// event recorded after it (no host block).
class NcclWork final : public CommWork {
 public:
  NcclWork(cudaStream_t compute, cudaEvent_t done) : compute_(compute), done_(done) {}
  ~NcclWork() override {
    if (!done_) return;
    cudaStreamWaitEvent(compute_, done_, 0);  // later compute never races the all-reduce
    cudaEventDestroy(done_);
  }
  void wait() override {
    if (!done_) return;
    cudaEvent_t e = done_;
    done_ = nullptr;
    cudaError_t r = cudaStreamWaitEvent(compute_, e, 0);
    cudaEventDestroy(e);
    cuda_ok(r, "cudaStreamWaitEvent (all-reduce wait)");
  }

 private:
  cudaStream_t compute_;
  cudaEvent_t done_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const DistEnv& env, TcpStore& store, cudaStream_t stream)
      : rank_(env.rank), size_(env.world_size), store_(store), stream_(stream) {
    cuda_ok(cudaGetDevice(&device_), "cudaGetDevice");
    init_timeout_ = std::max(std::chrono::milliseconds(120000), store.timeout());
    // Read (and checked) before NCCL is initialised, so a bad value leaks no communicator.
    comm_timeout_ = comm_timeout_from_env();
    MF_CHECK(comm_timeout_.count() > 0, "MF_COMM_TIMEOUT must be positive (seconds)");
    ncclUniqueId id;
    std::string key = store.unique_prefix("nccl") + "unique_id";
    if (rank_ == 0) {
      nccl_ok(ncclGetUniqueId(&id), "ncclGetUniqueId");
      store.set(key, std::string(id.internal, sizeof(id.internal)));
    } else {
      std::string v = store.get(key);
      MF_CHECK(v.size() == sizeof(id.internal), "NCCL unique id from rank 0 has ", v.size(),
               " bytes, expected ", sizeof(id.internal), " (different NCCL versions on the nodes?)");
      std::memcpy(id.internal, v.data(), v.size());
    }
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // so that a missing peer ends in a timeout instead of a hang
    ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    try {
      settle(r, "ncclCommInitRankConfig", init_timeout_);
      cuda_ok(cudaMalloc(&scratch_, sizeof(float)), "cudaMalloc");
      start_watchdog();
    } catch (...) {  // no destructor runs for a half-built object: release the communicator here
      if (comm_) ncclCommAbort(comm_);
      comm_ = nullptr;
      if (scratch_) cudaFree(scratch_);
      scratch_ = nullptr;
      throw;
    }
  }

  ~NcclCommunicator() override {
    watchdog_.reset();  // before the teardown below: no async-error poll races finalize or abort
    if (comm_stream_) {
      try {
        join_comm_stream();
      } catch (const std::exception&) {  // nothing to report to at teardown
      }
      cudaStreamDestroy(comm_stream_);  // destruction is deferred until its work is done
    }
    if (comm_) {
      // Finalize flushes pending work; errors here cannot be reported, so abort on any.
      ncclResult_t r = ncclCommFinalize(comm_);
      ncclResult_t state = r;
      auto deadline = Clock::now() + std::chrono::seconds(30);
      while (state == ncclInProgress && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ncclCommGetAsyncError(comm_, &state);
      }
      if (state == ncclSuccess) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    // Freed after the communicator is gone: cudaFree waits for the device, which a collective
    // stuck on a dead peer would keep busy until the abort above.
    if (scratch_) cudaFree(scratch_);
    if (pad_) cudaFree(pad_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "nccl"; }

  // The all-reduce runs on a second (non-blocking, higher-priority) stream after an event recorded
  // on the compute stream, so kernels queued on the compute stream later (the rest of backward)
  // run while it communicates.
  std::unique_ptr<CommWork> allreduce_avg_async(float* data, size_t n) override {
    if (n == 0) return Communicator::allreduce_avg_async(data, n);
    begin_async();
    settle_call(
        [&] { return ncclAllReduce(data, data, n, ncclFloat32, ncclAvg, comm_, comm_stream_); },
        "ncclAllReduce(avg, async)");
    queued(comm_stream_, "ncclAllReduce(avg, async)");
    return end_async();
  }

  // A true reduce-scatter. NCCL wants size() equal chunks: when n is not size() shard strides
  // the gradients go through a zero-padded scratch buffer (device copies, cheap next to the wire).
  std::unique_ptr<CommWork> reduce_scatter_avg_async(float* data, size_t n) override {
    if (n == 0 || size_ == 1) return Communicator::allreduce_avg_async(data, n);
    begin_async();
    const size_t c = shard_stride(n, size_), padded = c * size_t(size_);
    const ShardRange mine = shard_range(n, size_, rank_);
    if (padded == n) {  // in place: recv = send + rank * count
      settle_call(
          [&] {
            return ncclReduceScatter(data, data + size_t(rank_) * c, c, ncclFloat32, ncclAvg, comm_,
                                     comm_stream_);
          },
          "ncclReduceScatter(avg, async)");
    } else {
      float* buf = pad_buffer(padded);
      cuda_ok(cudaMemcpyAsync(buf, data, n * sizeof(float), cudaMemcpyDeviceToDevice, comm_stream_),
              "cudaMemcpyAsync (reduce-scatter in)");
      cuda_ok(cudaMemsetAsync(buf + n, 0, (padded - n) * sizeof(float), comm_stream_),
              "cudaMemsetAsync (reduce-scatter padding)");
      settle_call(
          [&] {
            return ncclReduceScatter(buf, buf + size_t(rank_) * c, c, ncclFloat32, ncclAvg, comm_,
                                     comm_stream_);
          },
          "ncclReduceScatter(avg, async)");
      if (mine.size() > 0)
        cuda_ok(cudaMemcpyAsync(data + mine.lo, buf + size_t(rank_) * c, mine.size() * sizeof(float),
                                cudaMemcpyDeviceToDevice, comm_stream_),
                "cudaMemcpyAsync (reduce-scatter out)");
    }
    queued(comm_stream_, "ncclReduceScatter(avg, async)");
    return end_async();
  }

  void allgather_shards(float* data, size_t n) override {
    if (n == 0 || size_ == 1) return;
    join_comm_stream();
    const size_t c = shard_stride(n, size_), padded = c * size_t(size_);
    const ShardRange mine = shard_range(n, size_, rank_);
    if (padded == n) {
      settle_call(
          [&] { return ncclAllGather(data + size_t(rank_) * c, data, c, ncclFloat32, comm_, stream_); },
          "ncclAllGather(shards)");
      queued(stream_, "ncclAllGather(shards)");
      return;
    }
    float* buf = pad_buffer(padded);
    if (mine.size() > 0)
      cuda_ok(cudaMemcpyAsync(buf + size_t(rank_) * c, data + mine.lo, mine.size() * sizeof(float),
                              cudaMemcpyDeviceToDevice, stream_),
              "cudaMemcpyAsync (all-gather in)");
    settle_call(
        [&] { return ncclAllGather(buf + size_t(rank_) * c, buf, c, ncclFloat32, comm_, stream_); },
        "ncclAllGather(shards)");
    queued(stream_, "ncclAllGather(shards)");
    cuda_ok(cudaMemcpyAsync(data, buf, n * sizeof(float), cudaMemcpyDeviceToDevice, stream_),
            "cudaMemcpyAsync (all-gather out)");
  }

  void allreduce_sum(float* data, size_t n) override {
    if (n == 0) return;
    join_comm_stream();
    settle_call(
        [&] { return ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, stream_); },
        "ncclAllReduce");
    queued(stream_, "ncclAllReduce");
  }
  void allreduce_avg(float* data, size_t n) override {
    if (n == 0) return;
    join_comm_stream();
    settle_call(
        [&] { return ncclAllReduce(data, data, n, ncclFloat32, ncclAvg, comm_, stream_); },
        "ncclAllReduce(avg)");
    queued(stream_, "ncclAllReduce(avg)");
  }
  void reduce_scatter_sum(const float* send, float* recv, size_t n) override {
    if (n == 0) return;
    join_comm_stream();
    settle_call(
        [&] { return ncclReduceScatter(send, recv, n, ncclFloat32, ncclSum, comm_, stream_); },
        "ncclReduceScatter");
    queued(stream_, "ncclReduceScatter");
  }
  void allgather(const float* send, float* recv, size_t n) override {
    if (n == 0) return;
    join_comm_stream();
    // NCCL accepts send == recv + rank*n (in place).
    settle_call(
        [&] { return ncclAllGather(send, recv, n, ncclFloat32, comm_, stream_); },
        "ncclAllGather");
    queued(stream_, "ncclAllGather");
  }
  void broadcast(float* data, size_t n, int root) override {
    MF_CHECK(root >= 0 && root < size_, "broadcast root ", root, " is out of range for ", size_, " ranks");
    if (n == 0) return;
    join_comm_stream();
    settle_call(
        [&] { return ncclBroadcast(data, data, n, ncclFloat32, root, comm_, stream_); },
        "ncclBroadcast");
    queued(stream_, "ncclBroadcast");
  }
  // One broadcast per rank's range, grouped into a single NCCL launch (an in-place all-gatherv).
  void allgather_ranges(float* data, const std::vector<std::pair<size_t, size_t>>& ranges) override {
    MF_CHECK(ranges.size() == size_t(size_), "allgather_ranges: ", ranges.size(), " ranges for ",
             size_, " ranks");
    if (size_ == 1) return;
    join_comm_stream();
    std::lock_guard<std::mutex> api(api_mu_);  // settle below, not settle_call
    nccl_ok(ncclGroupStart(), "ncclGroupStart (all-gather of ranges)");
    ncclResult_t first = ncclSuccess;
    for (int r = 0; r < size_; ++r) {
      const auto& [lo, hi] = ranges[size_t(r)];
      if (hi <= lo) continue;
      const ncclResult_t b = ncclBroadcast(data + lo, data + lo, hi - lo, ncclFloat32, r, comm_, stream_);
      if (first == ncclSuccess && b != ncclSuccess && b != ncclInProgress) first = b;
    }
    const ncclResult_t end = ncclGroupEnd();
    nccl_ok(first, "ncclBroadcast (all-gather of ranges)");
    settle(end, "ncclGroupEnd (all-gather of ranges)");
    queued(stream_, "ncclBroadcast (all-gather of ranges)");
  }
  void barrier() override {
    join_comm_stream();
    settle_call(
        [&] { return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_); },
        "barrier");
    queued(stream_, "barrier");
    cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (barrier)");
  }

  // Host metadata goes through the store (small, rare: config and data hashes at start-up).
  std::vector<std::string> allgather_bytes(const std::string& mine) override {
    std::string prefix = store_.unique_prefix("nccl-bytes");
    store_.set(prefix + std::to_string(rank_), mine);
    std::vector<std::string> out;
    for (int r = 0; r < size_; ++r) out.push_back(r == rank_ ? mine : store_.get(prefix + std::to_string(r)));
    return out;
  }
  void broadcast_bytes(std::string& data, int root) override {
    MF_CHECK(root >= 0 && root < size_, "broadcast root ", root, " is out of range for ", size_, " ranks");
    std::string key = store_.unique_prefix("nccl-bcast") + "data";
    if (rank_ == root) store_.set(key, data);
    else data = store_.get(key);
  }

 private:
  // Asynchronous collectives: the communication stream (created on first use) waits for the work
  // queued so far on the compute stream; end_async records the event the returned work waits on.
  void begin_async() {
    if (!comm_stream_) {
      int lo = 0, hi = 0;
      cuda_ok(cudaDeviceGetStreamPriorityRange(&lo, &hi), "cudaDeviceGetStreamPriorityRange");
      cuda_ok(cudaStreamCreateWithPriority(&comm_stream_, cudaStreamNonBlocking, hi),
              "cudaStreamCreateWithPriority (communication stream)");
    }
    cudaEvent_t ready = nullptr;
    cuda_ok(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(ready, stream_), "cudaEventRecord (gradients ready)");
    cudaError_t w = cudaStreamWaitEvent(comm_stream_, ready, 0);
    cudaEventDestroy(ready);  // released once the wait is satisfied
    cuda_ok(w, "cudaStreamWaitEvent (communication stream)");
  }
  std::unique_ptr<CommWork> end_async() {
    cudaEvent_t done = nullptr;
    cuda_ok(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(done, comm_stream_), "cudaEventRecord (collective done)");
    comm_pending_ = true;
    return std::make_unique<NcclWork>(stream_, done);
  }

  // The padding buffer of the sharded collectives, grown to `n` floats. Both streams use it, one
  // at a time: collectives on the compute stream first join the communication stream, and async
  // ones start after the compute stream's earlier work. Growing frees the old buffer only after
  // both streams are done with it (rare: the buffer only ever grows).
  float* pad_buffer(size_t n) {
    if (n > pad_cap_) {
      if (pad_) {
        cuda_ok(cudaStreamSynchronize(comm_stream_), "cudaStreamSynchronize (padding buffer)");
        cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (padding buffer)");
        cuda_ok(cudaFree(pad_), "cudaFree (padding buffer)");
      }
      pad_ = nullptr;
      cuda_ok(cudaMalloc(&pad_, n * sizeof(float)), "cudaMalloc (sharded collective padding)");
      pad_cap_ = n;
    }
    return pad_;
  }

  // Any other collective first makes the compute stream wait for the pending asynchronous ones, so
  // the communicator's kernels never run on two streams at once and their order is the issue order.
  void join_comm_stream() {
    if (!comm_pending_) return;
    comm_pending_ = false;
    cudaEvent_t e = nullptr;
    cuda_ok(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    cuda_ok(cudaEventRecord(e, comm_stream_), "cudaEventRecord (communication stream)");
    cudaError_t w = cudaStreamWaitEvent(stream_, e, 0);
    cudaEventDestroy(e);
    cuda_ok(w, "cudaStreamWaitEvent (join the communication stream)");
  }

  void nccl_ok(ncclResult_t r, const char* what) {
    MF_CHECK(r == ncclSuccess, "NCCL error in ", what, " on rank ", rank_, " (device ", device_, "): ",
             ncclGetErrorString(r), comm_ ? std::string(" ") + ncclGetLastError(comm_) : std::string());
  }
  // One NCCL call and its settling, holding api_mu_: NCCL calls on one communicator must not run
  // on two threads at once, and the watchdog thread polls ncclCommGetAsyncError (which may
  // complete a pending group job, joining and freeing it). The watchdog only try-locks.
  template <class Call>
  void settle_call(Call&& call, const char* what, std::chrono::milliseconds timeout = {}) {
    std::lock_guard<std::mutex> api(api_mu_);
    settle(call(), what, timeout);
  }
  // Non-blocking communicators may answer ncclInProgress; wait (bounded) until the call is done.
  // Bounded by MF_COMM_TIMEOUT (a collective stuck at enqueue), or `timeout` when given (init).
  void settle(ncclResult_t r, const char* what, std::chrono::milliseconds timeout = {}) {
    if (timeout.count() <= 0) timeout = comm_timeout_;
    auto deadline = Clock::now() + timeout;
    while (r == ncclInProgress) {
      if (Clock::now() > deadline) {
        watchdog_.reset();
        ncclCommAbort(comm_);
        comm_ = nullptr;
        MF_FAIL(what, " on rank ", rank_, " of ", size_, " did not finish within ", timeout.count() / 1000,
                " s; a rank is missing or stuck (check every rank started and reached the same point)");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      r = state;
    }
    nccl_ok(r, what);
  }

  // A dead or stuck peer never makes a queued collective fail: it spins, and the next stream
  // synchronisation would block forever. Every collective is watched (an event recorded after it
  // on its stream); one that has not finished MF_COMM_TIMEOUT after it was queued, or an
  // asynchronous NCCL error (a peer's connection closed), ends the process with exit code 1 and
  // a message naming the collective, so that the launcher restarts the group from the latest
  // checkpoint (PyTorch's NCCL watchdog does the same). No checkpoint is written: the device state
  // is not trustworthy after a collective failed half-way.
  void start_watchdog() {
    Watchdog::Hooks h;
    h.thread_start = [dev = device_] { cudaSetDevice(dev); };
    h.async_error = [this]() -> std::string {
      std::unique_lock<std::mutex> api(api_mu_, std::try_to_lock);
      if (!api.owns_lock()) return {};  // the main thread is in an NCCL call: poll next time
      ncclResult_t st = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess) return "ncclCommGetAsyncError failed";
      if (st == ncclSuccess || st == ncclInProgress) return {};
      return std::string(ncclGetErrorString(st)) + " " + ncclGetLastError(comm_);
    };
    h.fire = [rank = rank_, size = size_](const std::string& why) {
      spdlog::error("NCCL on rank {} of {}: {}; exiting with code 1 so that the launcher can restart "
                    "the group from the latest checkpoint", rank, size, why);
      spdlog::default_logger()->flush();
      std::fflush(nullptr);
      std::_Exit(1);
    };
    watchdog_ = std::make_unique<Watchdog>(comm_timeout_, std::move(h));
  }
  void queued(cudaStream_t s, const char* what) {
    if (!watchdog_) return;
    cudaEvent_t e = nullptr;
    cuda_ok(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate (watchdog)");
    cuda_ok(cudaEventRecord(e, s), "cudaEventRecord (watchdog)");
    watchdog_->watch(std::string(what) + " on rank " + std::to_string(rank_) + " of " + std::to_string(size_),
                     [e] { return cudaEventQuery(e) != cudaErrorNotReady; },
                     [e] { cudaEventDestroy(e); });
  }

  int rank_, size_;
  int device_ = 0;
  TcpStore& store_;
  cudaStream_t stream_;
  cudaStream_t comm_stream_ = nullptr;  // asynchronous all-reduces (created on first use)
  bool comm_pending_ = false;           // async work issued since the last join
  ncclComm_t comm_ = nullptr;
  float* scratch_ = nullptr;
  float* pad_ = nullptr;  // pad_buffer
  size_t pad_cap_ = 0;
  std::chrono::milliseconds init_timeout_{120000};
  std::chrono::milliseconds comm_timeout_{1800000};  // MF_COMM_TIMEOUT
  std::mutex api_mu_;  // held around every NCCL call on comm_ after init (settle_call)
  std::unique_ptr<Watchdog> watchdog_;  // declared last: stopped first
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const DistEnv& env, TcpStore& store, void* cuda_stream) {
  return std::make_unique<NcclCommunicator>(env, store, static_cast<cudaStream_t>(cuda_stream));
}

}  // namespace mf
