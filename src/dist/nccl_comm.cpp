#include "dist/nccl_comm.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "core/error.h"
#include "dist/env.h"
#include "dist/store.h"

namespace mf {

namespace {

using Clock = std::chrono::steady_clock;

void cuda_ok(cudaError_t e, const char* what) {
  MF_CHECK(e == cudaSuccess, "CUDA error in ", what, ": ", cudaGetErrorString(e));
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const DistEnv& env, TcpStore& store, cudaStream_t stream)
      : rank_(env.rank), size_(env.world_size), store_(store), stream_(stream) {
    cuda_ok(cudaGetDevice(&device_), "cudaGetDevice");
    init_timeout_ = std::max(std::chrono::milliseconds(120000), store.timeout());
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
    settle(r, "ncclCommInitRankConfig", init_timeout_);
    cuda_ok(cudaMalloc(&scratch_, sizeof(float)), "cudaMalloc");
  }

  ~NcclCommunicator() override {
    if (scratch_) cudaFree(scratch_);
    if (comm_) {
      // Finalize flushes pending work; errors here cannot be reported, so abort on any.
      ncclResult_t r = ncclCommFinalize(comm_);
      ncclResult_t state = r;
      auto deadline = Clock::now() + std::chrono::seconds(30);
      while (state == ncclInProgress && Clock::now() < deadline) ncclCommGetAsyncError(comm_, &state);
      if (state == ncclSuccess) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "nccl"; }

  void allreduce_sum(float* data, size_t n) override {
    if (n == 0) return;
    settle(ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce");
  }
  void allreduce_avg(float* data, size_t n) override {
    if (n == 0) return;
    settle(ncclAllReduce(data, data, n, ncclFloat32, ncclAvg, comm_, stream_), "ncclAllReduce(avg)");
  }
  void reduce_scatter_sum(const float* send, float* recv, size_t n) override {
    if (n == 0) return;
    settle(ncclReduceScatter(send, recv, n, ncclFloat32, ncclSum, comm_, stream_), "ncclReduceScatter");
  }
  void allgather(const float* send, float* recv, size_t n) override {
    if (n == 0) return;
    // NCCL accepts send == recv + rank*n (in place).
    settle(ncclAllGather(send, recv, n, ncclFloat32, comm_, stream_), "ncclAllGather");
  }
  void broadcast(float* data, size_t n, int root) override {
    MF_CHECK(root >= 0 && root < size_, "broadcast root ", root, " is out of range for ", size_, " ranks");
    if (n == 0) return;
    settle(ncclBroadcast(data, data, n, ncclFloat32, root, comm_, stream_), "ncclBroadcast");
  }
  void barrier() override {
    settle(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_), "barrier");
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
  void nccl_ok(ncclResult_t r, const char* what) {
    MF_CHECK(r == ncclSuccess, "NCCL error in ", what, " on rank ", rank_, " (device ", device_, "): ",
             ncclGetErrorString(r), comm_ ? std::string(" ") + ncclGetLastError(comm_) : std::string());
  }
  // Non-blocking communicators may answer ncclInProgress; wait (bounded) until the call is done.
  void settle(ncclResult_t r, const char* what, std::chrono::milliseconds timeout = std::chrono::minutes(30)) {
    auto deadline = Clock::now() + timeout;
    while (r == ncclInProgress) {
      if (Clock::now() > deadline) {
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

  int rank_, size_;
  int device_ = 0;
  TcpStore& store_;
  cudaStream_t stream_;
  ncclComm_t comm_ = nullptr;
  float* scratch_ = nullptr;
  std::chrono::milliseconds init_timeout_{120000};
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const DistEnv& env, TcpStore& store, void* cuda_stream) {
  return std::make_unique<NcclCommunicator>(env, store, static_cast<cudaStream_t>(cuda_stream));
}

}  // namespace mf
