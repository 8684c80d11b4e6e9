// cuemu NCCL: collectives between processes that run the CUDA backend on the CPU emulator, so that
// src/dist/nccl_comm.cpp and the trainer's device-side data parallelism (bucketed all-reduce on the
// communication stream, ZeRO-1, the distributed matrix optimizer) run in CI with 2 or 3 ranks.
//
// Transport: rank 0 is a hub. ncclGetUniqueId opens a listening socket on 127.0.0.1 and puts its
// port and a random nonce in the id; every other rank connects to it in ncclCommInitRankConfig.
// A collective is queued on its stream (streams.cpp) and, when it runs, each rank sends rank 0 a
// header (kind, count, root, its sequence number) and its contribution; rank 0 checks that every
// rank called the same collective, reduces in rank order (sum, then * 1/n for ncclAvg, as the Gloo
// communicator does) and sends each rank its result. A mismatch (ranks calling collectives in a
// different order or with different sizes: a hang or garbage on the device) becomes an error on
// every rank, reported through ncclCommGetAsyncError with a message naming both calls. A rank that
// dies closes its socket: the others get ncclRemoteError, as from NCCL, and their watchdog ends them.
//
// A non-blocking communicator (config.blocking = 0) answers as NCCL's may: ncclCommInitRankConfig
// returns ncclInProgress at once and connects on a thread; a collective outside a group, ncclGroupEnd
// and ncclCommFinalize return ncclInProgress, and ncclCommGetAsyncError says ncclInProgress for the
// next CUEMU_NCCL_INPROGRESS_POLLS polls (default 2) before it says how the call ended. The caller
// must settle a call (poll until it is not ncclInProgress) before the next one: a call made earlier
// is refused with ncclInvalidUsage, naming both. So is a call on a communicator another thread is
// inside of (NCCL's calls on one communicator are not thread-safe; ncclCommAbort is exempt).
#include "nccl.h"

#include "dist/sockio.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using mf::recv_all;
using mf::send_all;
using Clock = std::chrono::steady_clock;
constexpr char kMagic[] = "cuemu-nccl-v1";
constexpr uint32_t kWire = 0x4e43434cu;  // 'NCCL'
constexpr std::chrono::seconds kInitTimeout(120);

enum Kind : uint32_t { kAllReduce = 1, kReduceScatter = 2, kAllGather = 3, kBroadcast = 4 };
const char* kind_name(uint32_t k) {
  switch (k) {
    case kAllReduce: return "ncclAllReduce";
    case kReduceScatter: return "ncclReduceScatter";
    case kAllGather: return "ncclAllGather";
    case kBroadcast: return "ncclBroadcast";
    default: return "?";
  }
}

struct Header {
  uint32_t wire, kind;
  uint64_t count;
  int32_t root, rank, op;
  uint32_t pad = 0;
  uint64_t seq;
};
struct Reply {
  int32_t status;
  uint32_t msg_len;
};
struct Hello {
  uint32_t wire;
  int32_t rank, nranks;
  uint32_t pad = 0;
  uint64_t nonce;
};

struct State {
  int rank = 0, n = 1;
  std::vector<int> fd;  // rank 0: fd[r] for every other rank r; others: fd[0] is rank 0
  std::mutex op_m;      // one collective of this communicator at a time
  uint64_t next_seq = 0;
  std::atomic<int> err{ncclSuccess};
  std::atomic<bool> aborted{false};
  std::mutex m;
  std::condition_variable cv;
  int pending = 0;
  std::string last;
  // Non-blocking mode (config.blocking = 0).
  bool nonblocking = false;
  std::atomic<bool> ready{true};       // the init thread has finished (false while it connects)
  std::atomic<int> polls_left{0};      // ncclInProgress answers left for the last unsettled call
  std::atomic<const char*> unsettled{nullptr};  // that call's name
  std::thread init_thread;
  std::atomic<int> in_api{0};          // threads inside a call on this communicator
  std::atomic<const char*> in_api_what{nullptr};

  ~State() {
    if (init_thread.joinable()) init_thread.detach();  // not reached: abort and destroy join it
  }
  void join_init() {
    if (init_thread.joinable() && init_thread.get_id() != std::this_thread::get_id()) init_thread.join();
  }

  // fd changes under m (and op_m): at the end of the init and in ncclCommDestroy.
  void fail(ncclResult_t code, const std::string& why) {
    std::lock_guard<std::mutex> l(m);
    if (err.load() == ncclSuccess) {
      last = "cuemu NCCL rank " + std::to_string(rank) + ": " + why;
      err = code;
    }
    for (int f : fd)
      if (f >= 0) ::shutdown(f, SHUT_RDWR);  // the peers' collectives fail rather than hang
  }
};

struct Op {
  uint32_t kind;
  const float* send;
  float* recv;
  size_t count;
  int root;
  ncclRedOp_t red;
  uint64_t seq;
  std::shared_ptr<std::vector<float>> in;  // this rank's part, as read when the collective started
};

size_t contrib_len(const Op& o, int rank, int n) {
  switch (o.kind) {
    case kReduceScatter: return o.count * size_t(n);
    case kBroadcast: return rank == o.root ? o.count : 0;
    default: return o.count;
  }
}
size_t result_len(const Op& o, int n) { return o.kind == kAllGather ? o.count * size_t(n) : o.count; }

std::string describe(const Header& h) {
  std::string s = std::string(kind_name(h.kind)) + "(count " + std::to_string(h.count);
  if (h.kind == kBroadcast) s += ", root " + std::to_string(h.root);
  return s + ") as collective #" + std::to_string(h.seq);
}

// Rank 0: gather, check, reduce, answer.
void run_hub(State& st, const Op& o) {
  const int n = st.n;
  const Header mine{kWire, o.kind, o.count, o.root, 0, int32_t(o.red), 0, o.seq};
  std::vector<std::vector<float>> in(static_cast<size_t>(n));
  in[0] = *o.in;
  std::string mismatch;
  for (int r = 1; r < n; ++r) {
    Header h{};
    if (!recv_all(st.fd[size_t(r)], &h, sizeof h) || h.wire != kWire) {
      st.fail(ncclRemoteError, "rank " + std::to_string(r) + " closed its connection (did it exit?) during " +
                                   describe(mine));
      return;
    }
    if (h.rank != r) {
      st.fail(ncclInternalError, "the connection of rank " + std::to_string(r) + " carries rank " +
                                     std::to_string(h.rank) + "'s header");
      return;
    }
    if (h.kind != mine.kind || h.count != mine.count || h.root != mine.root || h.seq != mine.seq ||
        h.op != mine.op) {
      if (mismatch.empty())
        mismatch = "rank " + std::to_string(r) + " called " + describe(h) + " where rank 0 called " + describe(mine);
    }
    const Op theirs{h.kind, nullptr, nullptr, size_t(h.count), h.root, ncclRedOp_t(h.op), h.seq};
    in[size_t(r)].resize(contrib_len(theirs, r, n));
    if (!recv_all(st.fd[size_t(r)], in[size_t(r)].data(), in[size_t(r)].size() * sizeof(float))) {
      st.fail(ncclRemoteError, "rank " + std::to_string(r) + " closed its connection (did it exit?)");
      return;
    }
  }
  if (!mismatch.empty()) {
    const Reply rep{int32_t(ncclInvalidUsage), uint32_t(mismatch.size())};
    for (int r = 1; r < n; ++r) {
      send_all(st.fd[size_t(r)], &rep, sizeof rep);
      send_all(st.fd[size_t(r)], mismatch.data(), mismatch.size());
    }
    st.fail(ncclInvalidUsage, mismatch);
    return;
  }
  // Reduced values, in rank order.
  std::vector<float> red;
  if (o.kind == kAllReduce || o.kind == kReduceScatter) {
    red = in[0];
    for (int r = 1; r < n; ++r)
      for (size_t i = 0; i < red.size(); ++i) red[i] += in[size_t(r)][i];
    if (o.red == ncclAvg) {
      const float inv = 1.0f / float(n);
      for (float& v : red) v *= inv;
    }
  }
  auto result = [&](int r) -> std::vector<float> {
    switch (o.kind) {
      case kAllReduce: return red;
      case kReduceScatter:
        return std::vector<float>(red.begin() + std::ptrdiff_t(size_t(r) * o.count),
                                  red.begin() + std::ptrdiff_t(size_t(r + 1) * o.count));
      case kAllGather: {
        std::vector<float> all;
        for (int k = 0; k < n; ++k) all.insert(all.end(), in[size_t(k)].begin(), in[size_t(k)].end());
        return all;
      }
      default: return in[size_t(o.root)];
    }
  };
  const Reply ok{0, 0};
  for (int r = 1; r < n; ++r) {
    const std::vector<float> v = result(r);
    if (!send_all(st.fd[size_t(r)], &ok, sizeof ok) ||
        !send_all(st.fd[size_t(r)], v.data(), v.size() * sizeof(float))) {
      st.fail(ncclRemoteError, "rank " + std::to_string(r) + " closed its connection (did it exit?)");
      return;
    }
  }
  const std::vector<float> v = result(0);
  std::copy(v.begin(), v.end(), o.recv);
}

void run_peer(State& st, const Op& o) {
  const int fd = st.fd[0];
  const Header h{kWire, o.kind, o.count, o.root, st.rank, int32_t(o.red), 0, o.seq};
  const size_t len = contrib_len(o, st.rank, st.n);
  Reply rep{};
  if (!send_all(fd, &h, sizeof h) || !send_all(fd, o.in->data(), len * sizeof(float)) ||
      !recv_all(fd, &rep, sizeof rep)) {
    st.fail(ncclRemoteError, "rank 0 closed its connection (did it exit?) during " + describe(h));
    return;
  }
  if (rep.status != 0) {
    std::string why(rep.msg_len, '\0');
    recv_all(fd, why.data(), why.size());
    st.fail(ncclResult_t(rep.status), why);
    return;
  }
  if (!recv_all(fd, o.recv, result_len(o, st.n) * sizeof(float)))
    st.fail(ncclRemoteError, "rank 0 closed its connection (did it exit?) during " + describe(h));
}

void run(State& st, const Op& o) {
  std::lock_guard<std::mutex> l(st.op_m);
  if (st.aborted || st.err.load() != ncclSuccess) return;  // NCCL's errors are sticky too
  // The device reads the input somewhere between the start and the end: a change in between is
  // work that wrote it without being ordered around the collective.
  if (!o.in->empty() && std::memcmp(o.in->data(), o.send, o.in->size() * sizeof(float)) != 0) {
    const Header h{kWire, o.kind, o.count, o.root, st.rank, int32_t(o.red), 0, o.seq};
    st.fail(ncclInvalidUsage, "the input of " + describe(h) + " changed while the collective was in flight: "
                              "work on another stream (or the host) wrote it without waiting for the collective");
    return;
  }
  if (st.n == 1) {
    std::copy(o.in->begin(), o.in->end(), o.recv);
    return;
  }
  if (st.rank == 0) run_hub(st, o);
  else run_peer(st, o);
}

// Listening sockets made by ncclGetUniqueId, by nonce, until rank 0's init takes them.
std::mutex g_listen_m;
std::map<uint64_t, int>& listeners() {
  static auto* m = new std::map<uint64_t, int>;
  return *m;
}

struct Id {
  char magic[sizeof kMagic];
  uint16_t port;
  uint64_t nonce;
};
static_assert(sizeof(Id) <= sizeof(ncclUniqueId), "the id must fit NCCL's 128 bytes");

thread_local std::string t_last;

}  // namespace

struct cuemuNcclComm {
  std::shared_ptr<State> st;
};

ncclResult_t ncclGetUniqueId(ncclUniqueId* out) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return ncclSystemError;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 64) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    return ncclSystemError;
  }
  Id id{};
  std::memcpy(id.magic, kMagic, sizeof kMagic);
  id.port = ntohs(a.sin_port);
  id.nonce = std::random_device{}() | (uint64_t(std::random_device{}()) << 32);
  {
    std::lock_guard<std::mutex> l(g_listen_m);
    listeners()[id.nonce] = fd;
  }
  std::memset(out->internal, 0, sizeof out->internal);
  std::memcpy(out->internal, &id, sizeof id);
  return ncclSuccess;
}

namespace {
// The connection of this rank to the others: rank 0 accepts every other rank on the id's listening
// socket `lfd`, the others connect to it. Gives up after kInitTimeout, or soon after st.aborted.
ncclResult_t handshake(State& st, const Id& id, int lfd, std::string& why) {
  const int nranks = st.n, rank = st.rank;
  const auto deadline = Clock::now() + kInitTimeout;
  std::vector<int> fds;
  auto close_all = [&] {
    for (int f : fds)
      if (f >= 0) ::close(f);
    if (lfd >= 0) ::close(lfd);
  };
  if (rank == 0) {
    fds.assign(size_t(nranks), -1);
    for (int got = 1; got < nranks;) {
      if (st.aborted) {
        why = "cuemu NCCL: rank 0's init was aborted";
        close_all();
        return ncclSystemError;
      }
      pollfd p{lfd, POLLIN, 0};
      const int left = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (left <= 0) {
        why = "cuemu NCCL: rank 0 waited " + std::to_string(kInitTimeout.count()) + " s for " +
              std::to_string(nranks - got) + " more rank(s)";
        close_all();
        return ncclSystemError;
      }
      if (::poll(&p, 1, std::min(left, 100)) <= 0) continue;  // wakes to see an abort
      const int c = ::accept(lfd, nullptr, nullptr);
      if (c < 0) continue;
      timeval tv{10, 0};  // a connection that never says hello must not hold up the others
      ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      Hello h{};
      if (!recv_all(c, &h, sizeof h) || h.wire != kWire || h.nonce != id.nonce || h.nranks != nranks ||
          h.rank <= 0 || h.rank >= nranks || fds[size_t(h.rank)] >= 0) {
        ::close(c);  // a stranger, or a rank of another job
        continue;
      }
      const int one = 1;
      ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      tv = timeval{0, 0};  // collectives wait as long as the watchdog allows
      ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      fds[size_t(h.rank)] = c;
      ++got;
    }
    ::close(lfd);
    lfd = -1;
  } else {
    int c = -1;
    for (;;) {
      c = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      a.sin_port = htons(id.port);
      if (c >= 0 && ::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) break;
      if (c >= 0) ::close(c);
      if (st.aborted) {
        why = "cuemu NCCL: rank " + std::to_string(rank) + "'s init was aborted";
        return ncclSystemError;
      }
      if (Clock::now() > deadline) {
        why = "cuemu NCCL: rank " + std::to_string(rank) + " could not reach rank 0 on port " + std::to_string(id.port);
        return ncclSystemError;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    const int one = 1;
    ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    const Hello h{kWire, rank, nranks, 0, id.nonce};
    if (!send_all(c, &h, sizeof h)) {
      ::close(c);
      why = "cuemu NCCL: rank " + std::to_string(rank) + " could not greet rank 0";
      return ncclSystemError;
    }
    fds.assign(1, c);
  }
  std::lock_guard<std::mutex> l(st.op_m);
  std::lock_guard<std::mutex> l2(st.m);
  if (st.aborted) {  // the abort's shutdown did not see these sockets
    close_all();
    why = "cuemu NCCL: rank " + std::to_string(rank) + "'s init was aborted";
    return ncclSystemError;
  }
  st.fd = std::move(fds);
  return ncclSuccess;
}

int inprogress_polls() {
  static const int n = [] {
    const char* e = std::getenv("CUEMU_NCCL_INPROGRESS_POLLS");
    return e && *e ? std::max(1, std::atoi(e)) : 2;
  }();
  return n;
}

// Every call on a communicator but ncclCommAbort holds one: it reports a second thread inside a
// call on the same communicator, and (non-blocking) a call made before the last one was settled.
class Api {
 public:
  Api(State& st, const char* what, bool settling_call = false) : st_(st) {
    owner_ = st.in_api.fetch_add(1) == 0;
    if (!owner_) {
      const char* other = st.in_api_what.load();
      fail_ = std::string("two threads called NCCL on one communicator at once (") + what + " while " +
              (other ? other : "another call") + " had not returned): NCCL calls on a communicator "
              "are not thread-safe";
    } else {
      st.in_api_what = what;
    }
    if (fail_.empty() && !settling_call && st.nonblocking) {
      if (!st.ready)
        fail_ = std::string(what) + " called while ncclCommInitRankConfig is still in progress: poll "
                "ncclCommGetAsyncError until it is not ncclInProgress first";
      else if (st.polls_left > 0)
        fail_ = std::string(what) + " called while " + st.unsettled.load() + " is still in progress: poll "
                "ncclCommGetAsyncError until it is not ncclInProgress first";
    }
    if (!fail_.empty()) st.fail(ncclInvalidUsage, fail_);
    // Widen the window in which a second thread's call is seen (the watchdog polls every 100 ms).
    if (st.nonblocking) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  ~Api() {
    if (owner_) st_.in_api_what = nullptr;
    st_.in_api.fetch_sub(1);
  }
  bool refused() const { return !fail_.empty(); }
  // A non-blocking communicator answers ncclInProgress; the state settles after a few polls.
  ncclResult_t in_progress(const char* what) {
    if (!st_.nonblocking) return ncclSuccess;
    st_.unsettled = what;
    st_.polls_left = inprogress_polls();
    return ncclInProgress;
  }

 private:
  State& st_;
  bool owner_ = false;  // the only thread inside a call when this one began
  std::string fail_;
};

// Collectives between ncclGroupStart and ncclGroupEnd, by thread: their communicators.
thread_local int t_group_depth = 0;
thread_local std::vector<std::shared_ptr<State>> t_group;
}  // namespace

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId uid, int rank, ncclConfig_t* config) {
  Id id;
  std::memcpy(&id, uid.internal, sizeof id);
  if (std::memcmp(id.magic, kMagic, sizeof kMagic) != 0 || nranks < 1 || rank < 0 || rank >= nranks)
    return ncclInvalidArgument;
  auto st = std::make_shared<State>();
  st->rank = rank;
  st->n = nranks;
  st->nonblocking = config && config->blocking == 0;
  int lfd = -1;
  if (rank == 0) {
    std::lock_guard<std::mutex> l(g_listen_m);
    auto it = listeners().find(id.nonce);
    if (it == listeners().end()) return ncclInvalidUsage;  // rank 0 must make the id itself
    lfd = it->second;
    listeners().erase(it);
  }
  if (!st->nonblocking) {
    std::string why;
    const ncclResult_t r = handshake(*st, id, lfd, why);
    if (r != ncclSuccess) {
      t_last = why;
      return r;
    }
    *comm = new cuemuNcclComm{std::move(st)};
    return ncclSuccess;
  }
  st->ready = false;
  st->init_thread = std::thread([st = st.get(), id, lfd] {
    std::string why;
    const ncclResult_t r = handshake(*st, id, lfd, why);
    if (r != ncclSuccess) st->fail(r, why.substr(std::min(why.size(), std::strlen("cuemu NCCL: "))));
    st->ready = true;
  });
  *comm = new cuemuNcclComm{std::move(st)};
  return ncclInProgress;
}

namespace {
// Queues the collective: its input is read when its stream reaches it, the exchange and the
// output happen late (streams.cpp). Refused when the stream is not ordered after the work already
// issued to other streams: on the device the collective could then run before that work.
ncclResult_t submit(ncclComm_t comm, cudaStream_t stream, Op o) {
  if (!comm) return ncclInvalidArgument;
  std::shared_ptr<State> st = comm->st;
  Api api(*st, kind_name(o.kind));
  if (api.refused()) return ncclInvalidUsage;
  const std::string unordered = cuemu::ordered_after_all(stream);
  if (!unordered.empty()) {
    t_last = std::string("cuemu NCCL: ") + kind_name(o.kind) + " queued on a stream that is not ordered after "
             "earlier work (record an event after it and cudaStreamWaitEvent on this stream): " + unordered;
    return ncclInvalidUsage;
  }
  {
    std::lock_guard<std::mutex> l(st->m);
    o.seq = st->next_seq++;
    ++st->pending;
  }
  o.in = std::make_shared<std::vector<float>>();
  auto in = o.in;
  const float* src = o.send;
  const size_t len = contrib_len(o, st->rank, st->n);
  cuemu::enqueue(
      stream,
      [st, in, src, len] {
        if (!st->aborted) in->assign(src, src + len);  // an aborted communicator's memory may be gone
      },
      [st, o] {
        run(*st, o);
        std::lock_guard<std::mutex> l(st->m);
        --st->pending;
        st->cv.notify_all();
      });
  if (t_group_depth > 0) {  // in a group: ncclGroupEnd answers for it
    if (std::find(t_group.begin(), t_group.end(), st) == t_group.end()) t_group.push_back(st);
    return ncclSuccess;
  }
  return api.in_progress(kind_name(o.kind));
}
ncclResult_t check(ncclDataType_t t, ncclRedOp_t op) {
  if (t != ncclFloat32) {
    t_last = "cuemu NCCL: only ncclFloat32 is emulated";
    return ncclInvalidArgument;
  }
  if (op != ncclSum && op != ncclAvg) {
    t_last = "cuemu NCCL: only ncclSum and ncclAvg are emulated";
    return ncclInvalidArgument;
  }
  return ncclSuccess;
}
}  // namespace

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
  if (ncclResult_t r = check(type, op)) return r;
  return submit(comm, stream, {kAllReduce, static_cast<const float*>(send), static_cast<float*>(recv), count, 0, op, 0});
}
ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t type, ncclRedOp_t op,
                               ncclComm_t comm, cudaStream_t stream) {
  if (ncclResult_t r = check(type, op)) return r;
  return submit(comm, stream,
                {kReduceScatter, static_cast<const float*>(send), static_cast<float*>(recv), recvcount, 0, op, 0});
}
ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream) {
  if (ncclResult_t r = check(type, ncclSum)) return r;
  return submit(comm, stream,
                {kAllGather, static_cast<const float*>(send), static_cast<float*>(recv), sendcount, 0, ncclSum, 0});
}
ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                           ncclComm_t comm, cudaStream_t stream) {
  if (ncclResult_t r = check(type, ncclSum)) return r;
  if (!comm || root < 0 || root >= comm->st->n) return ncclInvalidArgument;
  return submit(comm, stream, {kBroadcast, static_cast<const float*>(send), static_cast<float*>(recv), count, root,
                               ncclSum, 0});
}
// Calls inside a group are queued one by one, in the same order on every rank: the same result.
// ncclGroupEnd answers ncclInProgress when a non-blocking communicator took part.
ncclResult_t ncclGroupStart() {
  ++t_group_depth;
  return ncclSuccess;
}
ncclResult_t ncclGroupEnd() {
  if (t_group_depth == 0) {
    t_last = "cuemu NCCL: ncclGroupEnd without ncclGroupStart";
    return ncclInvalidUsage;
  }
  if (--t_group_depth > 0) return ncclSuccess;
  std::vector<std::shared_ptr<State>> group;
  group.swap(t_group);
  ncclResult_t r = ncclSuccess;
  for (const auto& st : group) {
    Api api(*st, "ncclGroupEnd", /*settling_call=*/true);
    if (api.refused()) return ncclInvalidUsage;
    if (api.in_progress("ncclGroupEnd") == ncclInProgress) r = ncclInProgress;
  }
  return r;
}

// Waits (bounded) for the queued collectives; they run by then, asked for or not (streams.cpp).
ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  State& st = *comm->st;
  Api api(st, "ncclCommFinalize");
  if (api.refused()) return ncclInvalidUsage;
  std::unique_lock<std::mutex> l(st.m);
  st.cv.wait_for(l, std::chrono::seconds(60), [&] { return st.pending == 0; });
  if (st.pending != 0) return ncclInternalError;
  l.unlock();
  return api.in_progress("ncclCommFinalize");
}
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  std::shared_ptr<State> st = comm->st;
  {
    Api api(*st, "ncclCommDestroy");
    if (api.refused()) return ncclInvalidUsage;
  }
  st->join_init();
  {
    std::lock_guard<std::mutex> l(st->op_m);
    std::lock_guard<std::mutex> l2(st->m);
    for (int& f : st->fd)
      if (f >= 0) ::close(f), f = -1;
    st->aborted = true;
  }
  delete comm;
  return ncclSuccess;
}
// Unblocks a collective in flight (its sockets are shut down) and drops the queued ones; an init
// still connecting gives up within 100 ms. May be called from any thread, at any time.
ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (!comm) return ncclInvalidArgument;
  std::shared_ptr<State> st = comm->st;
  st->aborted = true;
  st->join_init();
  {
    std::lock_guard<std::mutex> l(st->m);
    for (int f : st->fd)
      if (f >= 0) ::shutdown(f, SHUT_RDWR);
  }
  delete comm;  // the queued collectives keep the state alive; its sockets leak until exit
  return ncclSuccess;
}
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  if (!comm) return ncclInvalidArgument;
  State& st = *comm->st;
  Api api(st, "ncclCommGetAsyncError", /*settling_call=*/true);
  const int err = st.err.load();
  if (err != ncclSuccess) {
    *state = ncclResult_t(err);
  } else if (!st.ready) {
    *state = ncclInProgress;
  } else if (st.polls_left > 0) {
    *state = --st.polls_left > 0 ? ncclInProgress : ncclSuccess;
  } else {
    *state = ncclSuccess;
  }
  if (*state != ncclInProgress) st.polls_left = 0;
  return ncclSuccess;
}
const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
  }
  return "unknown result code";
}
const char* ncclGetLastError(ncclComm_t comm) {
  if (comm) {
    std::lock_guard<std::mutex> l(comm->st->m);
    if (!comm->st->last.empty()) t_last = comm->st->last;
  }
  return t_last.c_str();
}
