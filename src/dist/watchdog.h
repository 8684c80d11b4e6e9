// A watchdog for asynchronous collectives that never fail on their own.
//
// An NCCL collective whose peer died or hangs does not return an error: its kernel spins, and the
// host blocks in the next stream synchronisation forever. The NCCL communicator therefore hands
// every collective it queues to a Watchdog: a thread polls each one's `done` probe (an event
// query) and the communicator's asynchronous error, and fires once when a collective is still
// running `timeout` after it was queued, or when the error probe reports a failure. What firing
// does is the owner's choice (the NCCL communicator logs, aborts NCCL and exits, so that the
// launcher restarts the group from the latest checkpoint, as PyTorch's NCCL watchdog does).
//
// Plain C++ (no CUDA), so the logic is tested on the CPU with fake probes.
#pragma once
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace mf {

class Watchdog {
 public:
  using ms = std::chrono::milliseconds;
  struct Hooks {
    std::function<void()> thread_start;            // runs first on the watchdog thread (cudaSetDevice)
    std::function<std::string()> async_error;      // polled; non-empty text = the communicator failed
    std::function<void(const std::string&)> fire;  // once, on the watchdog thread, with the reason
  };

  Watchdog(ms timeout, Hooks hooks, ms poll = ms(100));
  ~Watchdog();  // stops the thread, then releases every item still watched
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Watches one piece of work queued now: `done` is polled (from the watchdog thread) until it says
  // true; then `release` runs (also at destruction for work never seen done). `what` names it in
  // the reason given to `fire`.
  void watch(std::string what, std::function<bool()> done, std::function<void()> release = {});

  size_t pending() const;  // items not yet seen done
  bool fired() const;
  ms timeout() const { return timeout_; }

 private:
  struct Item {
    std::string what;
    std::function<bool()> done;
    std::function<void()> release;
    std::chrono::steady_clock::time_point queued;
  };
  void loop();
  void check();

  ms timeout_, poll_;
  Hooks hooks_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> items_;
  bool stop_ = false;
  bool fired_ = false;
  std::thread thread_;
};

// MF_COMM_TIMEOUT in seconds (default 1800, PyTorch's), the bound on one collective for every
// communicator.
Watchdog::ms comm_timeout_from_env();

}  // namespace mf
