#include "dist/communicator.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"  // json_leaves
#include "core/error.h"
#include "dist/env.h"
#include "dist/store.h"

#ifdef MF_HAS_GLOO
#include "dist/gloo_comm.h"
#endif
#ifdef MF_HAS_NCCL
#include "dist/nccl_comm.h"
#endif
#ifdef MF_HAS_CUDA
#include <cuda_runtime.h>
#endif

namespace mf {

void Communicator::scale(float* data, size_t n, float s) {
  for (size_t i = 0; i < n; ++i) data[i] *= s;
}

void Communicator::allreduce_avg(float* data, size_t n) {
  allreduce_sum(data, n);
  if (size() > 1) scale(data, n, 1.0f / float(size()));
}

namespace {

class DoneWork final : public CommWork {
 public:
  void wait() override {}
};

}  // namespace

std::unique_ptr<CommWork> Communicator::allreduce_avg_async(float* data, size_t n) {
  allreduce_avg(data, n);
  return std::make_unique<DoneWork>();
}

size_t shard_stride(size_t n, int world) {
  MF_CHECK(world >= 1, "shard_stride: world size ", world, " must be >= 1");
  const size_t per = (n + size_t(world) - 1) / size_t(world);
  return (per + 63) / 64 * 64;
}

ShardRange shard_range(size_t n, int world, int rank) {
  MF_CHECK(rank >= 0 && rank < world, "shard_range: rank ", rank, " of ", world, " is out of range");
  const size_t c = shard_stride(n, world);
  ShardRange r;
  r.lo = std::min(n, size_t(rank) * c);
  r.hi = std::min(n, r.lo + c);
  return r;
}

std::unique_ptr<CommWork> Communicator::reduce_scatter_avg_async(float* data, size_t n) {
  return allreduce_avg_async(data, n);
}

void Communicator::allgather_shards(float* data, size_t n) {
  // Host memory (Gloo): pad to size() equal shards in a temporary and use the plain all-gather.
  const int w = size();
  if (w == 1 || n == 0) return;
  const size_t c = shard_stride(n, w);
  const ShardRange mine = shard_range(n, w, rank());
  std::vector<float> tmp(c * size_t(w), 0.0f);
  std::copy(data + mine.lo, data + mine.hi, tmp.begin() + ptrdiff_t(size_t(rank()) * c));
  allgather(tmp.data() + size_t(rank()) * c, tmp.data(), c);
  std::copy(tmp.begin(), tmp.begin() + ptrdiff_t(n), data);
}

void Communicator::allgather_ranges(float* data,
                                    const std::vector<std::pair<size_t, size_t>>& ranges) {
  MF_CHECK(ranges.size() == size_t(size()), "allgather_ranges: ", ranges.size(), " ranges for ",
           size(), " ranks");
  if (size() == 1) return;
  for (int r = 0; r < size(); ++r) {
    const auto& [lo, hi] = ranges[size_t(r)];
    MF_CHECK(lo <= hi, "allgather_ranges: rank ", r, "'s range [", lo, ", ", hi, ") is reversed");
    if (hi > lo) broadcast(data + lo, hi - lo, r);
  }
}

namespace {

class SingleCommunicator final : public Communicator {
 public:
  SingleCommunicator(Device device, void* stream) : device_(device), stream_(stream) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* name() const override { return "single"; }
  void allreduce_sum(float*, size_t) override {}
  void allreduce_avg(float*, size_t) override {}
  void reduce_scatter_sum(const float* send, float* recv, size_t n) override { copy(recv, send, n); }
  void allgather(const float* send, float* recv, size_t n) override { copy(recv, send, n); }
  void broadcast(float*, size_t, int root) override {
    MF_CHECK(root == 0, "broadcast root ", root, " is out of range for 1 rank");
  }
  void barrier() override {}
  std::vector<std::string> allgather_bytes(const std::string& mine) override { return {mine}; }
  void broadcast_bytes(std::string&, int root) override {
    MF_CHECK(root == 0, "broadcast root ", root, " is out of range for 1 rank");
  }

 private:
  void copy(float* dst, const float* src, size_t n) {
    if (dst == src || n == 0) return;
    if (device_ == Device::CUDA) {
#ifdef MF_HAS_CUDA
      cudaError_t e = cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice,
                                      static_cast<cudaStream_t>(stream_));
      MF_CHECK(e == cudaSuccess, "cudaMemcpyAsync in the single-rank communicator: ", cudaGetErrorString(e));
      return;
#else
      MF_FAIL("the single-rank communicator was asked for CUDA memory in a build without CUDA");
#endif
    }
    std::memmove(dst, src, n * sizeof(float));
  }
  Device device_;
  void* stream_;
};

}  // namespace

std::unique_ptr<Communicator> make_single_communicator(Device device, void* cuda_stream) {
  return std::make_unique<SingleCommunicator>(device, cuda_stream);
}

std::unique_ptr<Communicator> make_communicator(const DistEnv& env, TcpStore* store, Device device,
                                                void* cuda_stream) {
  if (env.world_size == 1) return make_single_communicator(device, cuda_stream);
  MF_CHECK(store != nullptr, "make_communicator: a job of ", env.world_size, " ranks needs the rendezvous "
           "store (TcpStore::from_env)");
  if (device == Device::CPU) {
#ifdef MF_HAS_GLOO
    return make_gloo_communicator(env, *store);
#else
    MF_FAIL("this build has no Gloo, so CPU training cannot use ", env.world_size, " ranks; install "
            "libgloo-dev and re-run cmake, or run one process");
#endif
  }
#ifdef MF_HAS_NCCL
  return make_nccl_communicator(env, *store, cuda_stream);
#else
  MF_FAIL("this build has no NCCL, so CUDA training cannot use ", env.world_size, " ranks; rebuild with "
          "NCCL (NCCL_ROOT) or run one process");
#endif
}

uint64_t fnv1a64(const std::string& s) {
  uint64_t h = 14695981039346656037ULL;  // FNV offset basis
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

namespace {

std::string hex(uint64_t h) {
  std::ostringstream os;
  os << std::hex << h;
  return os.str();
}

std::string hash_bytes(uint64_t h) { return std::string(reinterpret_cast<const char*>(&h), 8); }

}  // namespace

void check_same(Communicator& comm, const std::string& what, const std::string& value) {
  if (comm.size() == 1) return;
  std::vector<std::string> all = comm.allgather_bytes(hash_bytes(fnv1a64(value)));
  for (int r = 1; r < comm.size(); ++r) {
    MF_CHECK(all[r] == all[0], "rank ", r, "'s ", what, " differs from rank 0's; every rank must run the "
             "same ", what, " (this is rank ", comm.rank(), ")");
  }
}

void check_same_json(Communicator& comm, const std::string& what, const nlohmann::json& value) {
  if (comm.size() == 1) return;
  std::string dump = value.dump();
  std::vector<std::string> all = comm.allgather_bytes(hash_bytes(fnv1a64(dump)));
  bool same = true;
  for (int r = 1; r < comm.size(); ++r) same = same && all[r] == all[0];
  if (same) return;
  // Second round (every rank takes it: they all saw the same hashes): per-key hashes.
  const std::map<std::string, std::string> leaves = json_leaves(value);
  std::string mine;
  for (auto& kv : leaves) mine += kv.first + "\t" + hex(fnv1a64(kv.second)) + "\n";
  std::vector<std::string> per_rank = comm.allgather_bytes(mine);
  auto parse = [](const std::string& s) {
    std::map<std::string, std::string> m;
    std::istringstream is(s);
    std::string line;
    while (std::getline(is, line)) {
      auto tab = line.find('\t');
      if (tab != std::string::npos) m[line.substr(0, tab)] = line.substr(tab + 1);
    }
    return m;
  };
  auto ref = parse(per_rank[0]);
  for (int r = 1; r < comm.size(); ++r) {
    auto other = parse(per_rank[r]);
    std::vector<std::string> diffs;
    for (auto& kv : ref) {
      auto it = other.find(kv.first);
      if (it == other.end())
        diffs.push_back(kv.first + " (missing on rank " + std::to_string(r) + ")");
      else if (it->second != kv.second)
        diffs.push_back(kv.first);
    }
    for (auto& kv : other) {
      if (!ref.count(kv.first)) diffs.push_back(kv.first + " (missing on rank 0)");
    }
    if (diffs.empty()) continue;  // key order or formatting only; compare the next rank
    std::string list;
    for (size_t i = 0; i < diffs.size() && i < 20; ++i) list += (i ? ", " : "") + diffs[i];
    if (diffs.size() > 20) list += ", ... (" + std::to_string(diffs.size()) + " keys)";
    MF_FAIL("rank ", r, "'s ", what, " differs from rank 0's at ", list, "; every rank must run the same ",
            what, " (this is rank ", comm.rank(), ")");
  }
  // Only the text differed (key order of an ordered object): the values agree.
}

}  // namespace mf
