// cuemu streams and events: what runs when.
//
// Kernels, GEMMs and copies run at once, on the thread that issues them: one stream's work is then
// in issue order, and work of two streams cannot overlap. Collectives (nccl_emu.cpp) are different:
// on the device they take as long as the slowest rank, and the code around them must order them
// with events. The emulator gives a collective the widest window the device could and checks both
// ends of it:
// - It reads its inputs as early as it may: when it is queued, or when the work queued on its
//   stream before it is done.
// - It exchanges and writes its outputs as late as it may, on the stream's own thread: when
//   something waits for it (cudaStreamWaitEvent, cudaEventSynchronize, cudaStreamSynchronize,
//   eager work issued to the same stream), or CUEMU_COMM_DELAY_MS after it was queued (default
//   2000: a rank blocked on the host, say in the rendezvous store, must not stop its peers'
//   collectives for ever). Code that reads a result without waiting for it reads the data from
//   before the collective, and the ranks disagree.
// - If its inputs changed in between, some work wrote them while the collective was in flight
//   (a race on the device): nccl_emu.cpp reports it.
// - When it is queued, its stream must already be ordered after all work issued so far to other
//   streams, by an event wait or a host synchronisation (ordered_after_all): otherwise the device
//   could run it before the kernels that write its inputs.
//
// Copies between the device and pinned host memory (cudaHostAlloc) are asynchronous on the device:
// the host may touch the host side only after a synchronisation that covers the copy (a stream or
// device sync, an event sync or a successful event query on an event recorded after it). The
// emulator gives those the widest window too:
// - a read-back (device to pinned host) takes its data at issue, fills the host buffer with 0xFF
//   bytes (NaN, -1), and lands the data only when such a synchronisation happens, so the host
//   reading it early reads poison;
// - an upload (pinned host to device) runs at issue, and keeps a copy of the host bytes; when a
//   synchronisation covers it, or when a later copy uses the same host bytes first, they must be
//   unchanged: a host write in between races with the device's copy (error on stderr, and the
//   next cudaGetLastError reports cudaErrorLaunchFailure).
//
// A copy or memset issued to a stream with queued work goes into the queue behind it (it runs as
// soon as the queue reaches it) if it is device to device, and otherwise waits for the queue
// (pageable host memory). An event stands for the stream's queue position and eager work count
// when it was recorded; the eager work before it is already done.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Stream;
// A vector clock: per stream, how many pieces of its eager work are ordered before this point.
using VClock = std::map<const Stream*, uint64_t>;
void merge(VClock& into, const VClock& from) {
  for (const auto& [k, v] : from) into[k] = std::max(into[k], v);
}

struct Stream {
  struct Item {
    uint64_t ticket;
    Clock::time_point due;
    std::function<void()> early, late;  // late: empty for copies and waits (no waiting for demand)
  };
  bool blocking = true;  // the legacy stream and streams made without cudaStreamNonBlocking
  std::mutex m;
  std::condition_variable cv;
  std::deque<Item> q;
  uint64_t issued = 0, done = 0, demand = 0;  // tickets of queued items
  bool worker = false, closing = false;
  // Ordering of eager work (ordered_after_all): how much has been issued to this stream, and the
  // other streams' work it has been made to wait for (directly or through their own waits).
  uint64_t eager = 0;
  VClock vc;
  // vc with this stream's own work up to now.
  VClock clock() const {
    VClock c = vc;
    c[this] = eager;
    return c;
  }
};

struct Event {
  bool timing = true;  // created without cudaEventDisableTiming
  Stream* s = nullptr;  // null until recorded
  uint64_t ticket = 0;
  VClock vc;  // the stream's clock when recorded
  double t_ms = 0;
  long work_seq = 0;  // cuemu::work_seq() when recorded (what a wait for it covers: stats)
};

std::chrono::milliseconds delay() {
  static const std::chrono::milliseconds d = [] {
    const char* e = std::getenv("CUEMU_COMM_DELAY_MS");
    if (!e || !*e) return std::chrono::milliseconds(2000);
    char* end = nullptr;
    const long v = std::strtol(e, &end, 10);
    if (*end || v < 0) {
      std::fprintf(stderr, "cuemu: CUEMU_COMM_DELAY_MS=%s: expected a number of milliseconds >= 0\n", e);
      std::exit(2);
    }
    return std::chrono::milliseconds(v);
  }();
  return d;
}

// Every stream ever made (never freed: an event may outlive its stream), the legacy one first.
std::mutex g_streams_m;
VClock g_host;  // the work the host has waited for (under g_streams_m)
std::vector<Stream*>& streams() {
  static auto* v = new std::vector<Stream*>{new Stream};
  return *v;
}
Stream* get(cudaStream_t s) {
  if (s) return reinterpret_cast<Stream*>(s);
  std::lock_guard<std::mutex> l(g_streams_m);
  return streams()[0];
}

void serve(Stream* s) {
  std::unique_lock<std::mutex> l(s->m);
  for (;;) {
    s->cv.wait(l, [&] { return !s->q.empty() || s->closing; });
    if (s->q.empty()) break;  // closing, and nothing left
    Stream::Item& head = s->q.front();
    const uint64_t t = head.ticket;
    if (head.early) {
      std::function<void()> early = std::move(head.early);
      head.early = nullptr;
      l.unlock();
      early();
      l.lock();
    }
    Stream::Item& item = s->q.front();  // only this thread pops
    if (item.late) {
      const Clock::time_point due = item.due;
      s->cv.wait_until(l, due, [&] { return s->demand >= t || s->closing; });
    }
    std::function<void()> late = std::move(s->q.front().late);
    s->q.pop_front();
    if (late) {
      l.unlock();
      late();
      l.lock();
    }
    s->done = t;
    s->cv.notify_all();
  }
  s->worker = false;
}

// Waits until `s` has run its queued work up to `ticket`.
void wait_for(Stream* s, uint64_t ticket) {
  std::unique_lock<std::mutex> l(s->m);
  if (s->done >= ticket) return;
  if (s->demand < ticket) s->demand = ticket;
  s->cv.notify_all();
  s->cv.wait(l, [&] { return s->done >= ticket; });
}

void ready(Stream* s) {
  uint64_t t;
  {
    std::lock_guard<std::mutex> l(s->m);
    t = s->issued;
  }
  wait_for(s, t);
}

bool busy(Stream* s) {
  std::lock_guard<std::mutex> l(s->m);
  return s->done < s->issued;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(Clock::now().time_since_epoch()).count();
}

// A copy of the stream list (taken under the lock; streams are never freed).
std::vector<Stream*> all_streams() {
  std::lock_guard<std::mutex> l(g_streams_m);
  return streams();
}

// Legacy-stream work (cudaMemcpy, launches on stream 0) waits for the blocking streams.
void legacy_ready() {
  for (Stream* s : all_streams())
    if (s->blocking) ready(s);
}

// Appends an item to `s`'s queue (s->m held) and starts its worker if needed.
void push_locked(Stream* s, std::function<void()> early, std::function<void()> late) {
  s->q.push_back({++s->issued, Clock::now() + delay(), std::move(early), std::move(late)});
  if (!s->worker) {
    s->worker = true;
    std::thread(serve, s).detach();
  }
  s->cv.notify_all();
}

// Copies between the device and pinned host memory not yet covered by a host synchronisation.
struct HostCopy {
  bool readback;           // device -> host (else host -> device)
  char* host;              // the host side
  size_t n;
  std::vector<char> data;  // readback: the data to land; upload: the host bytes at issue
  const Stream* s;
  uint64_t seq;            // the stream's eager count including this copy
};
std::mutex g_copies_m;
std::deque<HostCopy> g_copies;  // issue order (under g_copies_m)

bool overlaps(const HostCopy& c, const char* p, size_t n) { return p < c.host + c.n && c.host < p + n; }

// An upload's host bytes must not have changed since it was issued (reported once: the bytes seen
// become the reference).
void check_upload(HostCopy& c, const char* when) {
  if (c.readback || std::memcmp(c.host, c.data.data(), c.n) == 0) return;
  c.data.assign(c.host, c.host + c.n);
  std::fprintf(stderr,
               "cuemu: the host wrote pinned memory %p (%zu bytes) while the device could still be "
               "copying it to the device (cudaMemcpyAsync host to device; found %s)\n",
               static_cast<void*>(c.host), c.n, when);
  cuemu::fail_launch();
}

// Retires the copies that `covered` says are done: read-backs land, uploads are checked.
template <typename F>
void retire_copies(F covered) {
  std::lock_guard<std::mutex> l(g_copies_m);
  for (auto it = g_copies.begin(); it != g_copies.end();) {
    if (!covered(*it)) {
      ++it;
      continue;
    }
    if (it->readback)
      std::memcpy(it->host, it->data.data(), it->n);
    else
      check_upload(*it, "at the synchronisation that covers the copy");
    it = g_copies.erase(it);
  }
}

// The host has waited for the work of clock `c`.
void host_synced(const VClock& c) {
  {
    std::lock_guard<std::mutex> l(g_streams_m);
    merge(g_host, c);
  }
  retire_copies([&](const HostCopy& h) {
    auto it = c.find(h.s);
    return it != c.end() && it->second >= h.seq;
  });
}

// Whether the recorded event's stream has run its queue up to the event (never waits).
bool reached(const Event& e) {
  std::lock_guard<std::mutex> l(e.s->m);
  return e.s->done >= e.ticket;
}

// The host has waited for the work issued to `s` so far.
void synced_with(Stream* s) {
  VClock c;
  {
    std::lock_guard<std::mutex> l(s->m);
    c = s->clock();
  }
  host_synced(c);
}

}  // namespace

namespace cuemu {

bool stream_busy(cudaStream_t s) { return busy(get(s)); }

// An idle stream reaches the item at once: its early part (never a blocking one) runs here, in
// issue order with the eager work around it (on the worker it would race the host's next kernels).
void enqueue(cudaStream_t sh, std::function<void()> early, std::function<void()> late) {
  count_stat("queued");
  Stream* s = get(sh);
  std::lock_guard<std::mutex> l(s->m);
  if (early && s->q.empty() && s->done == s->issued) {
    early();
    early = nullptr;
  }
  push_locked(s, std::move(early), std::move(late));
}

void eager_work(cudaStream_t sh) {
  if (!sh) legacy_ready();
  Stream* s = get(sh);
  ready(s);
  std::lock_guard<std::mutex> l(s->m);
  ++s->eager;
}

std::string ordered_after_all(cudaStream_t sh) {
  Stream* s = get(sh);
  const std::vector<Stream*> all = all_streams();
  VClock host, mine;
  {
    std::lock_guard<std::mutex> l(g_streams_m);
    host = g_host;
  }
  {
    std::lock_guard<std::mutex> l(s->m);
    mine = s->vc;
  }
  std::string why;
  for (size_t i = 1; i < all.size(); ++i) {  // not the legacy stream: its copies are synchronous
    Stream* t = all[i];
    if (t == s) continue;
    uint64_t issued;
    {
      std::lock_guard<std::mutex> l(t->m);
      if (t->closing) continue;
      issued = t->eager;
    }
    const uint64_t ordered = std::max(mine[t], host[t]);
    if (issued > ordered)
      why += "stream " + std::to_string(i) + " has " + std::to_string(issued - ordered) +
             " launch(es) or copies this stream was never made to wait for; ";
  }
  return why;
}

void device_ready() {
  for (Stream* s : all_streams()) ready(s);
}

void pinned_copy(cudaStream_t sh, bool readback, void* host, const void* device, size_t n) {
  if (!n) return;
  Stream* s = get(sh);
  uint64_t seq;
  {
    std::lock_guard<std::mutex> l(s->m);
    seq = s->eager;  // eager_work has counted this copy
  }
  char* h = static_cast<char*>(host);
  std::lock_guard<std::mutex> l(g_copies_m);
  // Earlier uploads from these host bytes, not yet covered by a synchronisation: the bytes must
  // still be the ones they were issued with.
  for (HostCopy& c : g_copies)
    if (!c.readback && overlaps(c, h, n)) check_upload(c, "when a later copy used the same host bytes");
  HostCopy c{readback, h, n, {}, s, seq};
  if (readback) {
    c.data.assign(static_cast<const char*>(device), static_cast<const char*>(device) + n);
    std::memset(h, 0xFF, n);
  } else {
    c.data.assign(h, h + n);
    std::memcpy(const_cast<void*>(device), h, n);
  }
  g_copies.push_back(std::move(c));
}

void stream_synced(cudaStream_t sh) { synced_with(get(sh)); }

void legacy_synced() {
  for (Stream* s : all_streams())
    if (s->blocking) synced_with(s);  // the legacy stream is blocking too
}

void host_memory_freed(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  retire_copies([&](const HostCopy& h) { return overlaps(h, c, n); });
}

}  // namespace cuemu

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  auto* st = new Stream;
  st->blocking = (flags & cudaStreamNonBlocking) == 0;
  std::lock_guard<std::mutex> l(g_streams_m);
  streams().push_back(st);
  *s = reinterpret_cast<cudaStream_t>(st);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned f, int) { return cudaStreamCreateWithFlags(s, f); }
cudaError_t cudaDeviceGetStreamPriorityRange(int* lo, int* hi) { *lo = 0; *hi = -5; return cudaSuccess; }
// As on the device: returns at once; queued work still runs (now, no longer waiting to be asked).
cudaError_t cudaStreamDestroy(cudaStream_t sh) {
  if (!sh) return cudaErrorInvalidValue;
  Stream* s = get(sh);
  std::lock_guard<std::mutex> l(s->m);
  s->closing = true;
  s->cv.notify_all();
  return cudaSuccess;
}
namespace {
void stream_sync(cudaStream_t sh) {
  if (!sh) legacy_ready();
  Stream* s = get(sh);
  ready(s);
  synced_with(s);
}
}  // namespace
cudaError_t cudaStreamSynchronize(cudaStream_t sh) {
  cuemu::count_stat("stream_sync");
  stream_sync(sh);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  cuemu::count_stat("stream_sync");
  for (Stream* s : all_streams()) stream_sync(reinterpret_cast<cudaStream_t>(s));
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t sh, cudaEvent_t eh, unsigned) {
  if (!eh) return cudaErrorInvalidValue;
  const Event e = *reinterpret_cast<Event*>(eh);  // the event may be re-recorded or destroyed later
  Stream* s = get(sh);
  if (!e.s || e.s == s) return cudaSuccess;  // never recorded, or the stream's own order
  {
    std::lock_guard<std::mutex> l(s->m);
    merge(s->vc, e.vc);
  }
  {
    std::lock_guard<std::mutex> l(e.s->m);
    if (e.s->done >= e.ticket) return cudaSuccess;
  }
  {
    // The waiting stream has queued work: the wait joins its queue (checked and pushed under one
    // lock: a blocking wait must never run while a stream's lock is held).
    std::lock_guard<std::mutex> l(s->m);
    if (s->done < s->issued) {
      Stream* src = e.s;
      const uint64_t t = e.ticket;
      push_locked(s, [src, t] { wait_for(src, t); }, nullptr);
      return cudaSuccess;
    }
  }
  wait_for(e.s, e.ticket);  // eager work after this point must see the event's work done
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  auto* ev = new Event;
  ev->timing = !(flags & cudaEventDisableTiming);
  *e = reinterpret_cast<cudaEvent_t>(ev);
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventRecord(cudaEvent_t eh, cudaStream_t sh) {
  if (!eh) return cudaErrorInvalidValue;
  auto* e = reinterpret_cast<Event*>(eh);
  Stream* s = get(sh);
  std::lock_guard<std::mutex> l(s->m);
  e->s = s;
  e->ticket = s->issued;
  e->vc = s->clock();
  e->t_ms = now_ms();
  e->work_seq = cuemu::work_seq();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t eh) {
  if (!eh) return cudaErrorInvalidValue;
  const Event e = *reinterpret_cast<Event*>(eh);
  cuemu::count_event_wait(e.work_seq);
  if (e.s) {
    wait_for(e.s, e.ticket);
    host_synced(e.vc);
  }
  return cudaSuccess;
}
// Thread-safe (the NCCL watchdog polls from its own thread). Never asks for the work to run.
cudaError_t cudaEventQuery(cudaEvent_t eh) {
  if (!eh) return cudaErrorInvalidValue;
  const auto* e = reinterpret_cast<const Event*>(eh);
  if (!e->s) return cudaSuccess;
  if (!reached(*e)) return cudaErrorNotReady;
  host_synced(e->vc);  // the host now knows the work before the event is done
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete reinterpret_cast<Event*>(e); return cudaSuccess; }
// As the runtime: both events made with timing and recorded (else an invalid handle), both done
// (else not ready: it never waits). The time is the host's clock at the record.
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t ah, cudaEvent_t bh) {
  if (!ms) return cudaErrorInvalidValue;
  if (!ah || !bh) return cudaErrorInvalidResourceHandle;
  const auto* a = reinterpret_cast<const Event*>(ah);
  const auto* b = reinterpret_cast<const Event*>(bh);
  for (const Event* e : {a, b})
    if (!e->timing || !e->s) return cudaErrorInvalidResourceHandle;
  if (!reached(*a) || !reached(*b)) return cudaErrorNotReady;
  *ms = float(b->t_ms - a->t_ms);
  return cudaSuccess;
}
