#include "dist/watchdog.h"

#include <sstream>
#include <utility>
#include <vector>

#include "core/error.h"
#include "dist/env.h"

namespace mf {

Watchdog::Watchdog(ms timeout, Hooks hooks, ms poll)
    : timeout_(timeout), poll_(poll), hooks_(std::move(hooks)) {
  MF_CHECK(timeout.count() > 0, "watchdog timeout must be positive (MF_COMM_TIMEOUT)");
  MF_CHECK(poll.count() > 0, "watchdog poll interval must be positive");
  MF_CHECK(bool(hooks_.fire), "watchdog needs a fire hook");
  thread_ = std::thread([this] { loop(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (Item& it : items_) {
    if (it.release) it.release();
  }
}

void Watchdog::watch(std::string what, std::function<bool()> done, std::function<void()> release) {
  std::lock_guard<std::mutex> lk(mu_);
  items_.push_back({std::move(what), std::move(done), std::move(release),
                    std::chrono::steady_clock::now()});
}

size_t Watchdog::pending() const {
  std::lock_guard<std::mutex> lk(mu_);
  return items_.size();
}

bool Watchdog::fired() const {
  std::lock_guard<std::mutex> lk(mu_);
  return fired_;
}

void Watchdog::loop() {
  if (hooks_.thread_start) hooks_.thread_start();
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    cv_.wait_for(lk, poll_, [this] { return stop_; });
    if (stop_ || fired_) continue;
    lk.unlock();
    check();
    lk.lock();
  }
}

// One poll: retire finished work, then fire on an asynchronous error or on the oldest item past
// its deadline. Probes and releases run without the lock (they may be slow driver calls): the
// probes of the first n items are copied out, and only this thread removes items, so those n are
// still the first n when the lock is taken again (the owner only appends).
void Watchdog::check() {
  std::vector<Item> finished;
  std::string reason;
  {
    std::unique_lock<std::mutex> lk(mu_);
    std::vector<std::function<bool()>> probes;
    for (const Item& it : items_) probes.push_back(it.done);
    const size_t n = probes.size();
    lk.unlock();
    std::vector<bool> done(n);
    for (size_t i = 0; i < n; ++i) done[i] = probes[i]();
    lk.lock();
    const auto now = std::chrono::steady_clock::now();
    std::deque<Item> keep;
    for (size_t i = 0; i < items_.size(); ++i) {
      if (i < n && done[i]) {
        finished.push_back(std::move(items_[i]));
      } else {
        if (reason.empty() && i < n && now - items_[i].queued > timeout_) {
          const double s = std::chrono::duration<double>(now - items_[i].queued).count();
          std::ostringstream os;
          os << items_[i].what << " has not finished " << s << " s after it was queued (timeout "
             << double(timeout_.count()) / 1000.0 << " s, MF_COMM_TIMEOUT): a peer rank died or is stuck";
          reason = os.str();
        }
        keep.push_back(std::move(items_[i]));
      }
    }
    items_.swap(keep);
  }
  for (Item& it : finished) {
    if (it.release) it.release();
  }
  if (reason.empty() && hooks_.async_error) {
    std::string e = hooks_.async_error();
    if (!e.empty()) reason = "the communicator reported an error: " + e;
  }
  if (reason.empty()) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (fired_) return;
    fired_ = true;
  }
  hooks_.fire(reason);
}

Watchdog::ms comm_timeout_from_env() {
  return Watchdog::ms(int64_t(env_seconds("MF_COMM_TIMEOUT", 1800.0) * 1000.0));
}

}  // namespace mf
