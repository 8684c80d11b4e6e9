#include "dist/store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "dist/env.h"
#include "dist/sockio.h"

namespace mf {

// ---- wire format -------------------------------------------------------------------------------
// Request: u8 op, u32 body length, body. Reply: u8 status, u32 payload length, payload.
// Strings inside a body are u32 length + bytes; integers are host-order (all ranks of a job share
// one architecture). The first request on a connection is HELLO with the magic, the version and the
// client's generation (restart count); the reply carries the magic and the server's generation.
namespace {

constexpr uint32_t kMagic = 0x4d465354;  // "MFST"
constexpr uint32_t kVersion = 2;
constexpr uint32_t kMaxFrame = 1u << 30;

enum Op : uint8_t { HELLO = 1, SET = 2, GET = 3, ADD = 4, WAIT = 5, CHECK = 6, ERASE = 7 };
enum Status : uint8_t { OK = 0, TIMEOUT = 1, FAILED = 2 };

using Clock = std::chrono::steady_clock;
using ms = std::chrono::milliseconds;

std::string errno_str(int e) { return std::strerror(e); }

std::string secs(ms t) {
  std::ostringstream os;
  os << double(t.count()) / 1000.0 << " s";
  return os.str();
}

struct Writer {
  std::string buf;
  void u32(uint32_t x) { buf.append(reinterpret_cast<const char*>(&x), 4); }
  void u64(uint64_t x) { buf.append(reinterpret_cast<const char*>(&x), 8); }
  void str(const std::string& s) {
    u32(uint32_t(s.size()));
    buf += s;
  }
};

struct Reader {
  const std::string& buf;
  size_t pos = 0;
  explicit Reader(const std::string& b) : buf(b) {}
  void need(size_t n) {
    if (pos + n > buf.size()) throw std::runtime_error("truncated store message");
  }
  uint32_t u32() {
    need(4);
    uint32_t x;
    std::memcpy(&x, buf.data() + pos, 4);
    pos += 4;
    return x;
  }
  uint64_t u64() {
    need(8);
    uint64_t x;
    std::memcpy(&x, buf.data() + pos, 8);
    pos += 8;
    return x;
  }
  std::string str() {
    uint32_t n = u32();
    need(n);
    std::string s = buf.substr(pos, n);
    pos += n;
    return s;
  }
};

bool send_frame(int fd, uint8_t tag, const std::string& body) {
  std::string f(5, '\0');
  f[0] = char(tag);
  uint32_t n = uint32_t(body.size());
  std::memcpy(&f[1], &n, 4);
  f += body;
  return send_all(fd, f.data(), f.size());
}

bool recv_frame(int fd, uint8_t* tag, std::string* body) {
  char head[5];
  if (!recv_all(fd, head, 5)) return false;
  *tag = uint8_t(head[0]);
  uint32_t n;
  std::memcpy(&n, head + 1, 4);
  if (n > kMaxFrame) {
    errno = EPROTO;
    return false;
  }
  body->resize(n);
  return n == 0 || recv_all(fd, &(*body)[0], n);
}

void set_recv_timeout(int fd, ms t) {
  timeval tv{};
  tv.tv_sec = long(t.count() / 1000);
  tv.tv_usec = long((t.count() % 1000) * 1000);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

// Address family MASTER_ADDR resolves to (AF_INET unless it is IPv6-only).
int family_of(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &res);
  MF_CHECK(rc == 0, "cannot resolve MASTER_ADDR '", host, "': ", gai_strerror(rc));
  int fam = AF_INET6;
  for (addrinfo* a = res; a; a = a->ai_next) {
    if (a->ai_family == AF_INET) fam = AF_INET;
  }
  ::freeaddrinfo(res);
  return fam;
}

}  // namespace

// ---- server ------------------------------------------------------------------------------------

class StoreServer {
 public:
  StoreServer(const std::string& host, int port, uint32_t generation,
              std::function<void(uint32_t)> on_newer)
      : generation_(generation), on_newer_(std::move(on_newer)) {
    int fam = family_of(host);
    listen_fd_ = ::socket(fam, SOCK_STREAM | SOCK_CLOEXEC, 0);
    MF_CHECK(listen_fd_ >= 0, "cannot create the store's socket: ", errno_str(errno));
    int one = 1;
    // Lets a restarted group bind the port while the old connections sit in TIME_WAIT; it does not
    // let two live servers share it.
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    int rc;
    // Listen on every interface: MASTER_ADDR may resolve to a loopback alias on rank 0's own host.
    if (fam == AF_INET) {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_ANY);
      a.sin_port = htons(uint16_t(port));
      rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    } else {
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_any;
      a.sin6_port = htons(uint16_t(port));
      rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    }
    if (rc != 0) {
      int e = errno;
      ::close(listen_fd_);
      MF_CHECK(e != EADDRINUSE, "MASTER_PORT ", port, " on ", host, " is already in use (another job or "
               "an old run still holds it); pick another with MASTER_PORT or launch.py --master-port, "
               "or use --standalone");
      MF_FAIL("cannot bind the store to MASTER_PORT ", port, " on ", host, ": ", errno_str(e));
    }
    if (::listen(listen_fd_, 1024) != 0) {
      int e = errno;
      ::close(listen_fd_);
      MF_FAIL("cannot listen on MASTER_PORT ", port, " on ", host, ": ", errno_str(e));
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len);
    port_ = ss.ss_family == AF_INET ? ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port)
                                    : ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
    accept_thread_ = std::thread([this] { accept_loop(); });
  }

  ~StoreServer() {
    stop_ = true;
    accept_thread_.join();
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);  // wakes threads blocked in recv
    }
    cv_.notify_all();  // wakes threads blocked in get/wait
    for (auto& t : conn_threads_) t.join();
    for (int fd : conn_fds_) ::close(fd);
    ::close(listen_fd_);
  }

  int port() const { return port_; }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        // Out of descriptors (EMFILE) or a connection gone before accept: do not spin on it.
        std::this_thread::sleep_for(ms(50));
        continue;
      }
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      std::lock_guard<std::mutex> lk(mu_);
      conn_fds_.push_back(fd);
      conn_threads_.emplace_back([this, fd] { serve(fd); });
    }
  }

  void serve(int fd) {
    uint8_t op;
    std::string body;
    bool hello = false;
    while (!stop_ && recv_frame(fd, &op, &body)) {
      uint8_t status = OK;
      std::string reply;
      try {
        Reader r(body);
        if (!hello) {
          // Anything but our greeting is a stranger (port scanner, wrong service): hang up.
          if (op != HELLO || r.u32() != kMagic || r.u32() != kVersion) break;
          hello = true;
          // A rank of a later restart knocking means the job was restarted without this group:
          // tell the owner once (the trainer exits, so the new group gets the port).
          const uint32_t theirs = r.u32();
          if (theirs > generation_ && on_newer_ && !told_newer_.exchange(true)) on_newer_(theirs);
          Writer w;
          w.u32(kMagic);
          w.u32(generation_);  // the client compares it with its own
          reply = w.buf;
        } else if (op == SET) {
          std::string k = r.str();
          std::string v = r.str();
          {
            std::lock_guard<std::mutex> lk(mu_);
            data_[k] = std::move(v);
          }
          cv_.notify_all();
        } else if (op == GET || op == WAIT) {
          std::vector<std::string> keys;
          if (op == GET) {
            keys.push_back(r.str());
          } else {
            uint32_t n = r.u32();
            for (uint32_t i = 0; i < n; ++i) keys.push_back(r.str());
          }
          auto deadline = Clock::now() + ms(r.u64());
          std::unique_lock<std::mutex> lk(mu_);
          auto all_there = [&] {
            for (auto& k : keys)
              if (!data_.count(k)) return false;
            return true;
          };
          if (!cv_.wait_until(lk, deadline, [&] { return stop_ || all_there(); }) || !all_there()) {
            status = TIMEOUT;
            for (auto& k : keys) {
              if (!data_.count(k)) reply += (reply.empty() ? "" : ", ") + ("'" + k + "'");
            }
          } else if (op == GET) {
            reply = data_[keys[0]];
          }
        } else if (op == ADD) {
          std::string k = r.str();
          int64_t d = int64_t(r.u64());
          {
            std::lock_guard<std::mutex> lk(mu_);
            int64_t cur = 0;
            auto it = data_.find(k);
            if (it != data_.end()) {
              char* end = nullptr;
              cur = std::strtoll(it->second.c_str(), &end, 10);
              if (it->second.empty() || *end != '\0')
                throw std::runtime_error("key '" + k + "' holds a non-integer value; add() needs an integer");
            }
            cur += d;
            data_[k] = std::to_string(cur);
            reply = data_[k];
          }
          cv_.notify_all();
        } else if (op == CHECK) {
          uint32_t n = r.u32();
          bool all = true;
          std::lock_guard<std::mutex> lk(mu_);
          for (uint32_t i = 0; i < n; ++i) all = all && data_.count(r.str());
          reply = all ? "1" : "0";
        } else if (op == ERASE) {
          std::string k = r.str();
          std::lock_guard<std::mutex> lk(mu_);
          reply = data_.erase(k) ? "1" : "0";
        } else {
          throw std::runtime_error("unknown store op " + std::to_string(op));
        }
      } catch (const std::exception& ex) {
        status = FAILED;
        reply = ex.what();
      }
      if (!send_frame(fd, status, reply)) break;
    }
    // Close at once (not at the server's end): clients that retry, or a scanner, must not pile up
    // descriptors in a long-lived rank 0.
    std::lock_guard<std::mutex> lk(mu_);
    ::shutdown(fd, SHUT_RDWR);
    ::close(fd);
    conn_fds_.erase(std::remove(conn_fds_.begin(), conn_fds_.end(), fd), conn_fds_.end());
  }

  int listen_fd_ = -1;
  int port_ = 0;
  uint32_t generation_ = 0;
  std::function<void(uint32_t)> on_newer_;
  std::atomic<bool> told_newer_{false};
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> data_;
  std::vector<int> conn_fds_;
  std::vector<std::thread> conn_threads_;
};

// ---- client ------------------------------------------------------------------------------------

struct TcpStore::State {
  std::mutex mu;  // one request/reply at a time on the socket
  std::mutex counters_mu;
  std::map<std::string, int64_t> counters;
};

namespace {

// One attempt to open a TCP connection within `budget`; returns fd or -1 with *err filled.
int try_connect(const std::string& host, int port, ms budget, std::string* err) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string port_s = std::to_string(port);
  int rc = ::getaddrinfo(host.c_str(), port_s.c_str(), &hints, &res);
  if (rc != 0) {
    *err = std::string("cannot resolve '") + host + "': " + gai_strerror(rc);
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      *err = errno_str(errno);
      continue;
    }
    int c = ::connect(fd, a->ai_addr, a->ai_addrlen);
    if (c != 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int pr = ::poll(&p, 1, int(std::max<int64_t>(1, budget.count())));
      int soerr = ETIMEDOUT;
      socklen_t len = sizeof(soerr);
      if (pr > 0) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
      c = soerr == 0 ? 0 : -1;
      errno = soerr;
    }
    if (c != 0) {
      *err = errno_str(errno);
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(res);
  if (fd >= 0) {
    int flags = ::fcntl(fd, F_GETFL);
    ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  return fd;
}

}  // namespace

TcpStore::ms TcpStore::default_timeout() {
  // Minutes, not seconds: on several nodes the launchers start when their nodes come up, and a
  // rank waits at the rendezvous for the last of them (torchrun's default is 900 s).
  return ms(int64_t(env_seconds("MF_STORE_TIMEOUT", 300.0) * 1000.0));
}

std::unique_ptr<TcpStore> TcpStore::from_env(const DistEnv& env) {
  const int attempt = env.attempt;
  auto superseded = [attempt](uint32_t newer) {
    // Called on a store thread of rank 0: this group's peers are gone (a launcher restarted its
    // workers), and the new group needs this port. Leave at once; the launcher restarts us too.
    std::fprintf(stderr, "error: a rank of restart %u knocked on this job's rendezvous store, which "
                 "serves restart %d: the job was restarted on another node without this group; "
                 "exiting so that this node restarts too\n", newer, attempt);
    std::fflush(nullptr);
    std::_Exit(1);
  };
  return std::make_unique<TcpStore>(env.master_addr, env.master_port, env.rank == 0, default_timeout(),
                                    uint32_t(env.attempt), superseded);
}

TcpStore::TcpStore(const std::string& host, int port, bool is_server, ms timeout, uint32_t generation,
                   std::function<void(uint32_t)> on_superseded)
    : host_(host), port_(port), timeout_(timeout), generation_(generation),
      state_(std::make_unique<State>()) {
  MF_CHECK(timeout.count() > 0, "store timeout must be positive");
  MF_CHECK(port >= (is_server ? 0 : 1) && port <= 65535, "MASTER_PORT=", port, " is out of range 1..65535");
  if (is_server) {
    server_ = std::make_unique<StoreServer>(host, port, generation, std::move(on_superseded));
    port_ = server_->port();
  }
  auto deadline = Clock::now() + timeout;
  // Connect and greet until a store of our own attempt answers. A store that hangs up without a
  // word is retried (a group going down after a failure closes its store while restarted ranks may
  // already knock); so is one of an earlier attempt. Anything else that answers is a stranger.
  enum { UNREACHABLE, HUNG_UP, EARLIER } last = UNREACHABLE;
  std::string err = "no attempt";
  uint32_t seen = 0;
  ms backoff(50);
  while (true) {
    auto left = std::chrono::duration_cast<ms>(deadline - Clock::now());
    if (left.count() <= 0) break;
    int fd = try_connect(host_, port_, std::min(left, ms(5000)), &err);
    if (fd < 0) last = UNREACHABLE;
    if (fd >= 0) {
      Writer w;
      w.u32(kMagic);
      w.u32(kVersion);
      w.u32(generation_);
      set_recv_timeout(fd, std::max(std::min(left, ms(5000)), ms(1)));
      char reply[13];  // status u8, length u32 (= 8), magic u32, generation u32
      // The first byte apart: none at all is a hang-up, a short or wrong reply a stranger.
      const bool first = send_frame(fd, HELLO, w.buf) && recv_all(fd, reply, 1);
      const bool whole = first && recv_all(fd, reply + 1, sizeof(reply) - 1);
      uint32_t len = 0, magic = 0;
      if (whole) {
        std::memcpy(&len, reply + 1, 4);
        std::memcpy(&magic, reply + 5, 4);
        std::memcpy(&seen, reply + 9, 4);
      }
      if (whole && reply[0] == char(OK) && len == 8 && magic == kMagic) {
        if (seen == generation_) {
          fd_ = fd;
          break;
        }
        ::close(fd);
        MF_CHECK(seen < generation_, "this rank is restart ", generation_, " of the job but the store "
                 "at ", where(), " already serves restart ", seen, ": the launchers on the nodes are "
                 "out of step (a node restarted its workers more often than the others); start the "
                 "job again");
        last = EARLIER;
      } else {
        ::close(fd);
        // Hanging up, or staying silent, before a single byte is what a store going down (or a
        // frozen one) does: retry until the timeout. Bytes that are not our reply come from
        // something else.
        MF_CHECK(!first, "the service at ", where(), " is not a muonforge rendezvous store (wrong "
                 "greeting); another program may be using MASTER_PORT ", port_);
        last = HUNG_UP;
      }
    }
    std::this_thread::sleep_for(std::min(backoff, std::chrono::duration_cast<ms>(deadline - Clock::now())));
    backoff = std::min(backoff * 2, ms(1000));
  }
  if (fd_ >= 0) return;
  MF_CHECK(last != EARLIER, "the store at ", where(), " still belonged to restart ", seen, " of the job "
           "after ", secs(timeout), " while this rank is restart ", generation_, ": rank 0's node "
           "did not restart its workers (timeout: MF_STORE_TIMEOUT)");
  MF_CHECK(last != HUNG_UP, "the service at ", host_, ":", port_, " hung up or stayed silent "
           "instead of greeting for ", secs(timeout), ": it is not a muonforge rendezvous store "
           "(another program may be using MASTER_PORT ", port_, "), or rank 0 is stuck or keeps "
           "failing as it starts");
  MF_FAIL("cannot reach master ", host_, ":", port_, " after ", secs(timeout), " (last error: ",
          err, "); check MASTER_ADDR/MASTER_PORT, that rank 0 started, and that the port is open "
          "between the nodes (timeout: MF_STORE_TIMEOUT)");
}

TcpStore::~TcpStore() {
  if (fd_ >= 0) ::close(fd_);
  server_.reset();
}

std::string TcpStore::where() const { return host_ + ":" + std::to_string(port_); }

std::string TcpStore::request(uint8_t op, const std::string& body, ms reply_timeout, uint8_t* status) {
  std::lock_guard<std::mutex> lk(state_->mu);
  MF_CHECK(fd_ >= 0, "the store connection to ", where(), " is closed");
  set_recv_timeout(fd_, reply_timeout);
  std::string reply;
  if (!send_frame(fd_, op, body) || !recv_frame(fd_, status, &reply)) {
    int e = errno;
    ::close(fd_);
    fd_ = -1;
    MF_CHECK(!(e == EAGAIN || e == EWOULDBLOCK), "the store at ", where(), " did not answer within ",
             secs(reply_timeout), " (is rank 0 stuck?)");
    MF_FAIL("lost the connection to the store at ", where(), " (", e ? errno_str(e) : "closed by peer",
            "); rank 0 probably exited or crashed");
  }
  MF_CHECK(*status != FAILED, "store at ", where(), " refused the request: ", reply);
  return reply;
}

void TcpStore::set(const std::string& key, const std::string& value) {
  Writer w;
  w.str(key);
  w.str(value);
  uint8_t st;
  request(SET, w.buf, timeout_, &st);
}

std::string TcpStore::get(const std::string& key) { return get(key, timeout_); }

std::string TcpStore::get(const std::string& key, ms timeout) {
  Writer w;
  w.str(key);
  w.u64(uint64_t(timeout.count()));
  uint8_t st;
  std::string v = request(GET, w.buf, timeout + timeout_, &st);
  MF_CHECK(st == OK, "timed out after ", secs(timeout), " waiting for key ", v, " in the store at ",
           where(), " (the rank that should set it died or is stuck?)");
  return v;
}

int64_t TcpStore::add(const std::string& key, int64_t delta) {
  Writer w;
  w.str(key);
  w.u64(uint64_t(delta));
  uint8_t st;
  return std::stoll(request(ADD, w.buf, timeout_, &st));
}

void TcpStore::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void TcpStore::wait(const std::vector<std::string>& keys, ms timeout) {
  Writer w;
  w.u32(uint32_t(keys.size()));
  for (auto& k : keys) w.str(k);
  w.u64(uint64_t(timeout.count()));
  uint8_t st;
  std::string missing = request(WAIT, w.buf, timeout + timeout_, &st);
  MF_CHECK(st == OK, "timed out after ", secs(timeout), " waiting for key(s) ", missing,
           " in the store at ", where(), " (the rank that should set them died or is stuck?)");
}

bool TcpStore::check(const std::vector<std::string>& keys) {
  Writer w;
  w.u32(uint32_t(keys.size()));
  for (auto& k : keys) w.str(k);
  uint8_t st;
  return request(CHECK, w.buf, timeout_, &st) == "1";
}

bool TcpStore::erase(const std::string& key) {
  Writer w;
  w.str(key);
  uint8_t st;
  return request(ERASE, w.buf, timeout_, &st) == "1";
}

std::string TcpStore::unique_prefix(const std::string& what) {
  std::lock_guard<std::mutex> lk(state_->counters_mu);
  return what + "/" + std::to_string(state_->counters["prefix/" + what]++) + "/";
}

void TcpStore::barrier(int world_size, const std::string& name) { barrier(world_size, name, timeout_); }

void TcpStore::barrier(int world_size, const std::string& name, ms timeout) {
  MF_CHECK(world_size >= 1, "barrier '", name, "': world size ", world_size, " must be >= 1");
  std::string key = "__barrier/" + unique_prefix(name);
  int64_t arrived = add(key + "count", 1);
  if (arrived == world_size) set(key + "done", "");
  try {
    wait({key + "done"}, timeout);
  } catch (const Error&) {
    int64_t n = -1;
    try {
      n = add(key + "count", 0);
    } catch (const Error&) {
    }
    if (n < 0) throw;  // the connection itself failed: keep that message
    MF_FAIL("barrier '", name, "' timed out after ", secs(timeout), ": only ", n, " of ", world_size,
            " ranks arrived (a rank died or is stuck before the barrier)");
  }
}

}  // namespace mf
