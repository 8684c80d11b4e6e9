// A small TCP key-value store for rendezvous (POSIX sockets, no dependencies).
//
// Rank 0 hosts the server (one thread per connected client) and every rank, rank 0 included, talks
// to it through one TcpStore client. NCCL's unique id and Gloo's connection addresses travel through
// it; it is not meant for bulk data.
//
// Every blocking call is bounded by a timeout (default 300 s, env MF_STORE_TIMEOUT in seconds) and
// ends in an mf::Error naming what it waited for, so a dead or missing peer never hangs a rank:
//   - the server's port is taken          -> "MASTER_PORT 29500 on host is already in use ..."
//   - no server answers within the timeout -> "cannot reach master host:port after 300 s ..."
//   - get/wait on keys nobody sets          -> "timed out after 300 s waiting for key(s) ..."
//   - the server goes away mid-call         -> "lost the connection to the store at host:port ..."
//   - the port holds an earlier attempt's store past the timeout -> "... still belonged to restart N"
// Thread-safe: calls from several threads on one client are serialised.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace mf {

struct DistEnv;
class StoreServer;  // defined in store.cpp

class TcpStore {
 public:
  using ms = std::chrono::milliseconds;

  // is_server: also host the server, listening on all interfaces at `port` (port 0 picks a free
  // one; port() tells which). Then connect as a client to host:port, retrying until `timeout`.
  // `generation` is the job's restart count (DistEnv::attempt): a client only talks to a server of
  // its own generation. It waits (within `timeout`) while the port still holds the store of an
  // earlier one, or a store that hangs up as it goes down, and fails at once on a later one.
  // on_superseded (server only) runs once, on a server thread, when a client of a later
  // generation greets this server: the job was restarted elsewhere without this group.
  // from_env makes it end the process (exit code 1), so the new group gets the port at once
  // instead of waiting for this one to fail on its own.
  TcpStore(const std::string& host, int port, bool is_server, ms timeout = default_timeout(),
           uint32_t generation = 0, std::function<void(uint32_t)> on_superseded = {});
  ~TcpStore();
  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  // The store for a distributed job: rank 0 hosts, everyone connects to MASTER_ADDR:MASTER_PORT.
  static std::unique_ptr<TcpStore> from_env(const DistEnv& env);
  // MF_STORE_TIMEOUT (seconds) or 300 s.
  static ms default_timeout();

  void set(const std::string& key, const std::string& value);
  // Blocks until `key` exists (or the timeout passes: mf::Error naming the key).
  std::string get(const std::string& key);
  std::string get(const std::string& key, ms timeout);
  // Atomically adds `delta` to the integer at `key` (absent = 0) and returns the new value.
  int64_t add(const std::string& key, int64_t delta);
  // Blocks until every key exists.
  void wait(const std::vector<std::string>& keys);
  void wait(const std::vector<std::string>& keys, ms timeout);
  // Non-blocking: do all keys exist?
  bool check(const std::vector<std::string>& keys);
  // Removes a key; returns whether it existed.
  bool erase(const std::string& key);

  // All `world_size` ranks must call it the same number of times (counter + done key per call).
  void barrier(int world_size, const std::string& name = "barrier");
  void barrier(int world_size, const std::string& name, ms timeout);

  // A fresh key prefix for one user of the store ("gloo/0/", "gloo/1/", ...). Ranks that create
  // their users in the same order get the same prefixes.
  std::string unique_prefix(const std::string& what);

  int port() const { return port_; }
  const std::string& host() const { return host_; }
  ms timeout() const { return timeout_; }
  bool is_server() const { return server_ != nullptr; }

 private:
  std::string request(uint8_t op, const std::string& body, ms reply_timeout, uint8_t* status);
  std::string where() const;

  std::string host_;
  int port_ = 0;
  ms timeout_;
  uint32_t generation_ = 0;
  int fd_ = -1;
  std::unique_ptr<StoreServer> server_;
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace mf
