// Collective communication over the ranks of a job.
//
// Float buffers are raw f32 pointers in the communicator's memory: host memory for the single-process
// and Gloo communicators, device memory (on the communicator's CUDA stream) for NCCL. Byte/string
// helpers (allgather_bytes, broadcast_bytes) always take host memory; they carry hashes and small
// metadata, never tensors.
//
// Every rank must call the same collectives in the same order with the same sizes.
// Failures (a peer died, a timeout) are mf::Error naming the op and the rank.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "core/tensor.h"

namespace mf {

struct DistEnv;
class TcpStore;

// The part of an n-float buffer that one rank owns in the sharded collectives
// (reduce_scatter_avg_async, allgather_shards): rank r owns [r*C, min((r+1)*C, n)) with
// C = ceil(n / world) rounded up to a multiple of 64 floats, so every shard starts 256 bytes past
// an aligned buffer start. The last ranks' shards may be short or empty.
struct ShardRange {
  size_t lo = 0, hi = 0;
  size_t size() const { return hi - lo; }
};
size_t shard_stride(size_t n, int world);  // C above
ShardRange shard_range(size_t n, int world, int rank);

// A collective started by an *_async call. wait() returns once the result may be used: on the host
// (single, Gloo) the buffer holds it; with NCCL the communicator's stream waits for it, so work queued
// on that stream afterwards sees it. wait() rethrows the collective's error. A work destroyed without
// wait() waits itself (errors are then lost), so a buffer is never freed under a running collective.
class CommWork {
 public:
  virtual ~CommWork() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* name() const = 0;  // "single", "gloo", "nccl"

  // data[0..n) <- sum over ranks (in place).
  virtual void allreduce_sum(float* data, size_t n) = 0;
  // data[0..n) <- mean over ranks (in place).
  virtual void allreduce_avg(float* data, size_t n);
  // Starts data[0..n) <- mean over ranks and returns at once; do not touch data until wait().
  // Works run one at a time in issue order (every rank must issue the same sequence), overlapping
  // the caller's compute: Gloo runs them on one communication thread, NCCL on a communication
  // stream that waits for the work already queued on the communicator's stream. Any other
  // collective first finishes every pending work. The default (single process) runs it at once.
  virtual std::unique_ptr<CommWork> allreduce_avg_async(float* data, size_t n);
  // Starts the sharded mean over ranks, in place: once wait() returns, this rank's shard of
  // data[0..n) (shard_range(n, size(), rank())) holds the mean over ranks of that range; the rest of
  // data is unspecified (it may hold the input, partial sums or the full mean). Queued like
  // allreduce_avg_async. The default all-reduces the whole buffer (correct, with twice the
  // traffic); Gloo runs a ring reduce-scatter, NCCL ncclReduceScatter.
  virtual std::unique_ptr<CommWork> reduce_scatter_avg_async(float* data, size_t n);
  // In place: every rank's shard of data[0..n) (shard_range) is sent to every other rank, so all
  // ranks end with the same buffer. The inverse of reduce_scatter_avg_async (ZeRO-1's parameter
  // all-gather).
  virtual void allgather_shards(float* data, size_t n);
  // In place: rank r's range data[ranges[r].first, ranges[r].second) is sent to every other rank
  // (an all-gather of unequal, disjoint ranges; the distributed matrix optimizer's update, each
  // rank's matrices being one run of the master arena). `ranges` has size() entries, the same on
  // every rank; empty ranges are skipped. The default broadcasts each range from its rank; NCCL
  // groups those broadcasts into one launch.
  virtual void allgather_ranges(float* data, const std::vector<std::pair<size_t, size_t>>& ranges);
  // send holds size() chunks of `recv_count` floats; recv[0..recv_count) <- sum over ranks of chunk
  // rank(). send and recv must not overlap.
  virtual void reduce_scatter_sum(const float* send, float* recv, size_t recv_count) = 0;
  // recv[r*send_count .. (r+1)*send_count) <- rank r's send[0..send_count). send may be the own
  // chunk of recv (recv + rank()*send_count) or a separate buffer.
  virtual void allgather(const float* send, float* recv, size_t send_count) = 0;
  // data[0..n) <- root's data[0..n).
  virtual void broadcast(float* data, size_t n, int root) = 0;
  virtual void barrier() = 0;

  // Host-memory helpers for metadata (lengths may differ between ranks).
  virtual std::vector<std::string> allgather_bytes(const std::string& mine) = 0;
  virtual void broadcast_bytes(std::string& data, int root) = 0;

 protected:
  // Scale n floats by s in the communicator's memory (host by default; NCCL overrides avg instead).
  virtual void scale(float* data, size_t n, float s);
};

// The communicator for this process:
//   world_size 1           -> a single-process communicator (no store needed; `store` may be null);
//   device CPU, world > 1  -> Gloo over TCP, connected through `store` (error if built without Gloo);
//   device CUDA, world > 1 -> NCCL on the current CUDA device and `cuda_stream` (a cudaStream_t;
//                             null = default stream); the unique id goes through `store`.
// The store must outlive the connection setup; keep it for the whole run (rank 0 hosts it).
std::unique_ptr<Communicator> make_communicator(const DistEnv& env, TcpStore* store, Device device,
                                                void* cuda_stream = nullptr);

// A communicator of one rank. Out-of-place copies use memmove, or cudaMemcpyAsync on `cuda_stream`
// when `device` is CUDA (CUDA builds only).
std::unique_ptr<Communicator> make_single_communicator(Device device = Device::CPU,
                                                       void* cuda_stream = nullptr);

// 64-bit FNV-1a of the bytes (stable across runs and machines).
uint64_t fnv1a64(const std::string& s);

// Every rank passes its own `value`; if any rank's differs from rank 0's, every rank throws
// "rank R's <what> differs from rank 0's (...)". Collective: all ranks must call it.
void check_same(Communicator& comm, const std::string& what, const std::string& value);

// Like check_same for a JSON object, but the error names the differing key paths ("model.n_layer",
// "train.seed"; arrays count as one value) and keys present on one rank only.
void check_same_json(Communicator& comm, const std::string& what, const nlohmann::json& value);

}  // namespace mf
