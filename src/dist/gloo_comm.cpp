#include "dist/gloo_comm.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include "core/error.h"
#include "dist/env.h"
#include "dist/store.h"
#include "dist/watchdog.h"

namespace mf {

namespace {

using ms = std::chrono::milliseconds;

// gloo::rendezvous::Store over our TcpStore, every key under `prefix`.
class GlooStoreAdapter : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(TcpStore& store, std::string prefix, ms timeout)
      : store_(store), prefix_(std::move(prefix)), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    store_.set(prefix_ + key, std::string(data.begin(), data.end()));
  }
  std::vector<char> get(const std::string& key) override {
    std::string v = store_.get(prefix_ + key, timeout_);
    return std::vector<char>(v.begin(), v.end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const ms& timeout) override {
    std::vector<std::string> full;
    for (auto& k : keys) full.push_back(prefix_ + k);
    try {
      store_.wait(full, timeout);
    } catch (const Error& e) {
      // Gloo waits for each peer's address under its rank number: name the ranks that never
      // came, and the usual reasons, before the store's own message.
      std::string who;
      bool ranks = true;
      for (auto& k : keys) {
        ranks = ranks && !k.empty() && k.find_first_not_of("0123456789") == std::string::npos;
        who += (who.empty() ? "" : ", ") + k;
      }
      if (!ranks) throw;
      throw Error("rank(s) " + who + " never joined the group: their node's launcher did not "
                  "start, or started with other --nnodes / --node-rank / --master-addr / "
                  "--master-port (or came up later than MF_STORE_TIMEOUT allows). " + e.what());
    }
  }

 private:
  TcpStore& store_;
  std::string prefix_;
  ms timeout_;
};

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// The local IP of the interface that routes to host:port (a UDP "connect" sends nothing).
std::string local_ip_towards(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return "";
  std::string ip;
  for (addrinfo* a = res; a && ip.empty(); a = a->ai_next) {
    int fd = ::socket(a->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
      char buf[INET6_ADDRSTRLEN] = {0};
      const void* src = ss.ss_family == AF_INET
                            ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&ss)->sin_addr)
                            : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr);
      if (::inet_ntop(ss.ss_family, src, buf, sizeof(buf))) ip = buf;
    }
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return ip;
}

// The first non-loopback IPv4 address of an interface that is up, or "".
std::string first_external_ipv4() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return "";
  std::string ip;
  for (ifaddrs* a = list; a && ip.empty(); a = a->ifa_next) {
    if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET || !(a->ifa_flags & IFF_UP) ||
        (a->ifa_flags & IFF_LOOPBACK))
      continue;
    char buf[INET_ADDRSTRLEN] = {0};
    if (::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof(buf)))
      ip = buf;
  }
  ::freeifaddrs(list);
  return ip;
}

// A collective queued on the communication thread; wait() blocks until the thread ran it.
class GlooWork final : public CommWork {
 public:
  explicit GlooWork(std::shared_future<void> done) : done_(std::move(done)) {}
  ~GlooWork() override {
    if (done_.valid()) done_.wait();  // never leave the thread writing into a freed buffer
  }
  void wait() override {
    if (!done_.valid()) return;
    std::shared_future<void> f = std::move(done_);
    f.get();  // rethrows the collective's error
  }

 private:
  std::shared_future<void> done_;
};

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(int rank, int size, TcpStore& store, const gloo::transport::tcp::attr& attr,
                   ms op_timeout)
      : rank_(rank), size_(size), timeout_(op_timeout) {
    MF_CHECK(size >= 1 && rank >= 0 && rank < size, "gloo communicator: rank ", rank, " of ", size,
             " is out of range");
    GlooStoreAdapter adapter(store, store.unique_prefix("gloo"), store.timeout());
    try {
      auto dev = gloo::transport::tcp::CreateDevice(attr);
      auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
      ctx->setTimeout(store.timeout());  // connection setup: bounded like every store wait
      ctx->connectFullMesh(adapter, dev);
      ctx->setTimeout(op_timeout);
      ctx_ = ctx;
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      MF_FAIL("gloo connection setup failed on rank ", rank, " of ", size, " (listening on '",
              attr.iface.empty() ? attr.hostname : "interface " + attr.iface, "'): ", e.what(),
              "; if peers cannot reach this address set GLOO_SOCKET_IFNAME or MF_GLOO_HOSTNAME");
    }
  }

  ~GlooCommunicator() override {
    if (!worker_.joinable()) return;
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();  // the thread finishes the queue first
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "gloo"; }

  void allreduce_sum(float* data, size_t n) override {
    if (n == 0 || size_ == 1) return;
    drain();
    ring_allreduce(data, n, next_tag(), "allreduce");
  }

  std::unique_ptr<CommWork> allreduce_avg_async(float* data, size_t n) override {
    return enqueue(Job::Allreduce, data, n);
  }

  // A ring reduce-scatter over the shard_range chunks (ring_reduce_scatter): each rank sends and
  // receives (W-1)/W of the buffer once, half the traffic of the all-reduce it replaces.
  std::unique_ptr<CommWork> reduce_scatter_avg_async(float* data, size_t n) override {
    return enqueue(Job::ReduceScatter, data, n);
  }

  // Gloo 0.5's options API has no reduce-scatter (only the legacy halving-doubling algorithm
  // class), so this is our own ring over gloo's point-to-point buffers.
  void reduce_scatter_sum(const float* send, float* recv, size_t n) override {
    drain();
    if (n == 0) return;
    std::vector<float> tmp(send, send + n * size_t(size_));
    const uint32_t tag = take_tags(ring_steps());
    ring_reduce_scatter(tmp.data(), tmp.size(), [n](int k) { return ShardRange{size_t(k) * n, size_t(k + 1) * n}; },
                        tag, "reduce_scatter");
    std::memcpy(recv, tmp.data() + size_t(rank_) * n, n * sizeof(float));
  }

  void allgather(const float* send, float* recv, size_t n) override {
    drain();
    if (n == 0) return;
    std::vector<float> own(send, send + n);  // send may alias our chunk of recv
    guard("allgather", [&] {
      gloo::AllgatherOptions opts(ctx_);
      opts.setInput(own.data(), n);
      opts.setOutput(recv, n * size_t(size_));
      opts.setTag(next_tag());
      gloo::allgather(opts);
    });
  }

  void broadcast(float* data, size_t n, int root) override {
    drain();
    check_root(root);
    if (n == 0 || size_ == 1) return;
    guard("broadcast", [&] {
      gloo::BroadcastOptions opts(ctx_);
      opts.setOutput(data, n);
      opts.setRoot(root);
      opts.setTag(next_tag());
      gloo::broadcast(opts);
    });
  }

  void barrier() override {
    drain();
    guard("barrier", [&] {
      gloo::BarrierOptions opts(ctx_);
      opts.setTag(next_tag());
      gloo::barrier(opts);
    });
  }

  std::vector<std::string> allgather_bytes(const std::string& mine) override {
    drain();
    std::vector<uint64_t> lens(static_cast<size_t>(size_), 0);
    uint64_t my_len = mine.size();
    guard("allgather", [&] {
      gloo::AllgatherOptions opts(ctx_);
      opts.setInput(&my_len, 1);
      opts.setOutput(lens.data(), lens.size());
      opts.setTag(next_tag());
      gloo::allgather(opts);
    });
    uint64_t max_len = 0;
    for (uint64_t l : lens) max_len = std::max(max_len, l);
    std::vector<std::string> out(static_cast<size_t>(size_));
    if (max_len == 0) return out;
    std::vector<char> in(max_len, 0), all(max_len * size_t(size_), 0);
    std::memcpy(in.data(), mine.data(), mine.size());
    guard("allgather", [&] {
      gloo::AllgatherOptions opts(ctx_);
      opts.setInput(in.data(), in.size());
      opts.setOutput(all.data(), all.size());
      opts.setTag(next_tag());
      gloo::allgather(opts);
    });
    for (int r = 0; r < size_; ++r) out[size_t(r)].assign(all.data() + size_t(r) * max_len, lens[size_t(r)]);
    return out;
  }

  void broadcast_bytes(std::string& data, int root) override {
    drain();
    check_root(root);
    if (size_ == 1) return;
    uint64_t len = data.size();
    guard("broadcast", [&] {
      gloo::BroadcastOptions opts(ctx_);
      opts.setOutput(&len, 1);
      opts.setRoot(root);
      opts.setTag(next_tag());
      gloo::broadcast(opts);
    });
    data.resize(len);
    if (len == 0) return;
    guard("broadcast", [&] {
      gloo::BroadcastOptions opts(ctx_);
      opts.setOutput(&data[0], len);
      opts.setRoot(root);
      opts.setTag(next_tag());
      gloo::broadcast(opts);
    });
  }

 private:
  struct Job {
    enum Kind { Allreduce, ReduceScatter } kind;
    float* data;
    size_t n;
    uint32_t tag;  // the first of the tags the job uses
    std::promise<void> done;
  };

  // Queues an asynchronous mean (all-reduce or sharded reduce-scatter) on the communication thread.
  std::unique_ptr<CommWork> enqueue(Job::Kind kind, float* data, size_t n) {
    const bool noop = n == 0 || size_ == 1;
    // The tags are taken now, on the issuing thread, so they follow the issue order on every rank.
    uint32_t tag = 0;
    if (!noop) tag = kind == Job::Allreduce ? next_tag() : take_tags(ring_steps());
    Job job{kind, data, n, tag, {}};
    std::shared_future<void> done = job.done.get_future().share();
    if (noop) {
      job.done.set_value();
      return std::make_unique<GlooWork>(std::move(done));
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!worker_.joinable()) worker_ = std::thread([this] { work_loop(); });
      queue_.push_back(std::move(job));
      ++pending_;
    }
    cv_.notify_all();
    return std::make_unique<GlooWork>(std::move(done));
  }

  int ring_steps() const { return size_ - 1; }

  // In place over data[0..n), cut into size() chunks chunk(k) (disjoint, any may be empty): at the
  // end this rank's chunk chunk(rank()) holds the sum over ranks; the other chunks hold partial sums.
  // Step s (0 <= s < W-1) sends chunk (r-s-1) mod W, as summed so far, to rank r+1 and adds the chunk
  // (r-s-2) mod W received from rank r-1; after W-1 steps chunk r has passed every rank. Step s uses
  // the tag tag0+s. Every rank adds in the same ring order, so results do not depend on timing.
  template <typename ChunkFn>
  void ring_reduce_scatter(float* data, size_t n, ChunkFn chunk, uint32_t tag0, const char* op) {
    if (n == 0 || size_ == 1) return;
    guard(op, [&] {
      const int w = size_;
      const int next = (rank_ + 1) % w, prev = (rank_ + w - 1) % w;
      size_t max_chunk = 0;
      for (int k = 0; k < w; ++k) max_chunk = std::max(max_chunk, chunk(k).size());
      std::vector<float> scratch(std::max<size_t>(max_chunk, 1));
      auto out = ctx_->createUnboundBuffer(data, n * sizeof(float));
      auto in = ctx_->createUnboundBuffer(scratch.data(), scratch.size() * sizeof(float));
      for (int s = 0; s < w - 1; ++s) {
        const uint64_t slot = gloo::Slot::build(kRingSlotPrefix, (tag0 + uint32_t(s)) & 0x7fffffffu);
        const ShardRange send = chunk(((rank_ - s - 1) % w + w) % w);
        const ShardRange recv = chunk(((rank_ - s - 2) % w + w) % w);
        if (send.size() > 0) out->send(next, slot, send.lo * sizeof(float), send.size() * sizeof(float));
        if (recv.size() > 0) in->recv(prev, slot, 0, recv.size() * sizeof(float));
        if (recv.size() > 0) {
          MF_CHECK(in->waitRecv(timeout_), "receive from rank ", prev, " was aborted");
          float* dst = data + recv.lo;
          for (size_t i = 0; i < recv.size(); ++i) dst[i] += scratch[i];
        }
        // The next step sends the chunk just summed; this one's buffer region must be free again.
        if (send.size() > 0) MF_CHECK(out->waitSend(timeout_), "send to rank ", next, " was aborted");
      }
    });
  }

  // Sum over ranks in place (the calling thread owns the context for the duration).
  void ring_allreduce(float* data, size_t n, uint32_t tag, const char* op) {
    if (n == 0 || size_ == 1) return;
    guard(op, [&] {
      gloo::AllreduceOptions opts(ctx_);
      opts.setOutput(data, n);
      opts.setReduceFunction(
          static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      opts.setTag(tag);
      gloo::allreduce(opts);
    });
  }

  // The communication thread: runs queued collectives in issue order. After a failure the rest of
  // the queue fails at once with the first error (the context is no longer usable).
  void work_loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      Job job = std::move(queue_.front());
      queue_.pop_front();
      const std::string failed = failed_;
      lk.unlock();
      try {
        MF_CHECK(failed.empty(), "gloo ", job.kind == Job::Allreduce ? "allreduce" : "reduce_scatter",
                 " (async) on rank ", rank_, " skipped: an earlier "
                 "asynchronous collective failed: ", failed);
        if (job.kind == Job::Allreduce) {
          ring_allreduce(job.data, job.n, job.tag, "allreduce (async)");
          scale(job.data, job.n, 1.0f / float(size_));  // the same sum-then-scale as allreduce_avg
        } else {
          const size_t n = job.n;
          const int w = size_;
          ring_reduce_scatter(job.data, n, [n, w](int k) { return shard_range(n, w, k); }, job.tag,
                              "reduce_scatter (async)");
          const ShardRange mine = shard_range(n, w, rank_);
          scale(job.data + mine.lo, mine.size(), 1.0f / float(w));
        }
        job.done.set_value();
      } catch (const std::exception& e) {
        {
          std::lock_guard<std::mutex> g(mu_);
          if (failed_.empty()) failed_ = e.what();
        }
        job.done.set_exception(std::current_exception());
      }
      lk.lock();
      --pending_;
      idle_.notify_all();
    }
  }

  // Blocks until the communication thread has finished every queued collective, so that this
  // thread may use the context. Errors stay with the works (wait() reports them).
  void drain() {
    std::unique_lock<std::mutex> lk(mu_);
    idle_.wait(lk, [&] { return pending_ == 0; });
  }

  template <typename F>
  void guard(const char* op, F&& f) {
    try {
      f();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      MF_FAIL("gloo ", op, " failed on rank ", rank_, " of ", size_, ": ", e.what(),
              " (a peer rank died or is stuck; collective timeout ", timeout_.count() / 1000.0,
              " s, MF_COMM_TIMEOUT)");
    }
  }
  void check_root(int root) const {
    MF_CHECK(root >= 0 && root < size_, "broadcast root ", root, " is out of range for ", size_, " ranks");
  }
  uint32_t next_tag() { return tag_++ & 0x7fffffffu; }
  uint32_t take_tags(int k) {  // k consecutive tags (at least one), the first returned
    const uint32_t t = tag_ & 0x7fffffffu;
    tag_ += uint32_t(std::max(k, 1));
    return t;
  }
  // Our own point-to-point collectives' slot prefix, clear of gloo's (0x01..0x08).
  static constexpr uint8_t kRingSlotPrefix = 0x40;

  int rank_, size_;
  ms timeout_;
  uint32_t tag_ = 0;
  std::shared_ptr<gloo::Context> ctx_;
  // Asynchronous means (allreduce_avg_async, reduce_scatter_avg_async): a queue served by one thread, started lazily.
  std::mutex mu_;
  std::condition_variable cv_, idle_;
  std::deque<Job> queue_;
  size_t pending_ = 0;  // queued or running
  bool stop_ = false;
  std::string failed_;  // the first async failure's message
  std::thread worker_;
};

}  // namespace

std::unique_ptr<Communicator> make_gloo_communicator(int rank, int size, TcpStore& store,
                                                     const std::string& hostname, ms op_timeout) {
  gloo::transport::tcp::attr attr;
  attr.hostname = hostname;
  return std::make_unique<GlooCommunicator>(rank, size, store, attr, op_timeout);
}

std::unique_ptr<Communicator> make_gloo_communicator(const DistEnv& env, TcpStore& store) {
  gloo::transport::tcp::attr attr;
  if (const char* iface = std::getenv("GLOO_SOCKET_IFNAME"); iface && *iface) {
    attr.iface = iface;
  } else if (const char* host = std::getenv("MF_GLOO_HOSTNAME"); host && *host) {
    attr.hostname = host;
  } else if (is_loopback(env.master_addr)) {
    attr.hostname = "127.0.0.1";
  } else {
    attr.hostname = local_ip_towards(env.master_addr, env.master_port);  // "" = gloo's own guess
    // Rank 0's node may map its own name to 127.0.1.1 (Debian's /etc/hosts); peers on other nodes
    // cannot reach that.
    if (is_loopback(attr.hostname) && env.world_size > env.local_world_size)
      attr.hostname = first_external_ipv4();
  }
  ms op_timeout = comm_timeout_from_env();
  return std::make_unique<GlooCommunicator>(env.rank, env.world_size, store, attr, op_timeout);
}

}  // namespace mf
