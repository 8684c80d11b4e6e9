// cuemu runtime: memory and stream calls on the host, and the fiber scheduler that runs a grid.
//
// A block's threads are fibers on the calling OS thread (a register-only switch on x86-64,
// ucontext elsewhere: glibc's swapcontext makes a system call per switch, which made the
// emulator spend most of its time in the kernel). The scheduler resumes every
// runnable fiber in thread order; a fiber runs until it finishes or reaches a synchronisation
// point: __syncthreads (waits for every live thread of the block) or a warp collective (shuffle,
// ballot, __syncwarp, mma: waits for every live lane of its warp). When no fiber can run, the
// waiters whose condition holds are released; if none holds the kernel has a divergent barrier,
// which is reported as an error instead of hanging. Blocks run one after another, so a kernel's
// `static` (= __shared__) locals are the block's shared memory.
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <chrono>
#include <mutex>
#include <numeric>
#include <random>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runtime.h"

// Here the coordinates are the scheduler's own variables, not the executing thread's shorthands.
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

#if defined(__x86_64__)
// cuemu_switch(save, to): saves the callee-saved registers on the current stack, stores the stack
// pointer in *save, switches to the stack `to` and restores what a previous switch saved there.
extern "C" void cuemu_switch(void** save, void* to);
asm(R"(
.text
.globl cuemu_switch
.type cuemu_switch,@function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuemu_switch,.-cuemu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#endif

namespace cuemu {

Coords g_coords;

namespace {

enum class St { Run, Block, Warp, Done };

// One cp.async copy in flight: its destination and the bytes it will write there.
struct AsyncCopy {
  void* dst;
  int bytes;
  unsigned char data[16];
  const void* src;  // checked again at the wait: it must not have changed while in flight
  int src_bytes;
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  St st = St::Run;
  uint3 tid{0, 0, 0};
  int linear = 0;
  std::vector<AsyncCopy> open;                    // cp.async issued since the last commit
  std::deque<std::vector<AsyncCopy>> committed;   // groups in flight, oldest first
};

constexpr size_t kStack = 256 * 1024;

struct Grid {
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  std::vector<unsigned char> dyn;
  const void* kernel = nullptr;  // the launched kernel (null for a plain run_grid)
  size_t dyn_bytes = 0;          // the dynamic shared memory the launch asked for
  // Warp collectives: one slot per lane, read after every lane of the warp has written.
  std::vector<uint64_t> slots;
  std::vector<unsigned char> ballot;
};
Grid* g = nullptr;
cudaError_t g_last = cudaSuccess;
// Fiber stacks, kept from launch to launch (allocating 256 x 256 KiB per launch cost more than
// running most kernels).
std::vector<std::vector<char>> g_stacks;
std::map<std::string, long>& launch_counts() {
  static auto* m = new std::map<std::string, long>;  // never destroyed: read by the atexit report
  return *m;
}

void to_scheduler(Fiber* f) {
#if defined(__x86_64__)
  cuemu_switch(&f->sp, g->sched_sp);
#else
  swapcontext(&f->ctx, &g->sched);
#endif
}

void resume(Fiber* f) {
#if defined(__x86_64__)
  cuemu_switch(&g->sched_sp, f->sp);
#else
  swapcontext(&g->sched, &f->ctx);
#endif
}

void fiber_main() {
  g->body(g->body_ctx);
  g->cur->st = St::Done;
  to_scheduler(g->cur);  // never resumed
  std::abort();
}

void wait_as(St s) {
  Fiber* f = g->cur;
  f->st = s;
  to_scheduler(f);
}

// CUEMU_ORDER: the order in which blocks are run and a block's runnable threads resumed.
// `forward` (default): thread (and block) index order. `reverse`: the opposite. `shuffle[:SEED]`:
// a fresh random order for every block and every scheduling round. Results that change with the
// order come from threads that read what another thread writes without a barrier between.
enum class Order { Forward, Reverse, Shuffle };
struct Mode {
  Order order = Order::Forward;
  std::mt19937_64 rng{1};
};
Mode parse_order(const std::string& v) {
  Mode r;
  if (v.empty() || v == "forward") {
  } else if (v == "reverse") {
    r.order = Order::Reverse;
  } else if (v.rfind("shuffle", 0) == 0 && (v.size() == 7 || (v[7] == ':' && v.size() > 8))) {
    r.order = Order::Shuffle;
    if (v.size() > 8) {
      char* end = nullptr;
      r.rng.seed(std::strtoull(v.c_str() + 8, &end, 10));
      if (*end) throw std::invalid_argument("cuemu: order '" + v + "': the seed is not a number");
    }
  } else {
    throw std::invalid_argument("cuemu: order '" + v + "': expected forward, reverse or shuffle[:SEED]");
  }
  return r;
}

Mode& mode() {
  static Mode* m = [] {
    const char* e = std::getenv("CUEMU_ORDER");
    try {
      return new Mode(parse_order(e ? e : ""));
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "%s (CUEMU_ORDER)\n", ex.what());
      std::exit(2);
    }
  }();
  return *m;
}

// An index order of n items under the mode.
void arrange(std::vector<unsigned>& idx, size_t n) {
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), 0u);
  Mode& m = mode();
  if (m.order == Order::Reverse) std::reverse(idx.begin(), idx.end());
  if (m.order == Order::Shuffle) std::shuffle(idx.begin(), idx.end(), m.rng);
}

// The static __shared__ variables of every kernel that has run (register_shared).
struct Region { char* p; size_t bytes; };
std::vector<Region>& static_shared() {
  static auto* v = new std::vector<Region>;
  return *v;
}

// Shared memory starts every block as 0xFF bytes (NaN for f32/bf16/f64, -1 for integers): the
// device gives no initial contents, and a stale value from the previous block could pass a test.
void poison_shared() {
  for (const Region& r : static_shared()) std::memset(r.p, 0xFF, r.bytes);
  std::memset(g->dyn.data(), 0xFF, g->dyn.size());
}

void run_block(const Cfg& cfg) {
  poison_shared();
  const unsigned nt = cfg.block.x * cfg.block.y * cfg.block.z;
  g->fibers.assign(nt, Fiber{});
  if (g_stacks.size() < nt) g_stacks.resize(nt);
  for (unsigned i = 0; i < nt; ++i) {
    Fiber& f = g->fibers[i];
    f.linear = int(i);
    f.tid = {i % cfg.block.x, (i / cfg.block.x) % cfg.block.y, i / (cfg.block.x * cfg.block.y)};
    if (g_stacks[i].size() < kStack) g_stacks[i].resize(kStack);
#if defined(__x86_64__)
    // A fresh stack as cuemu_switch leaves one: six zeroed registers, then fiber_main as the
    // return address, placed so that fiber_main starts with the ABI's alignment (rsp = 8 mod 16).
    uintptr_t top = reinterpret_cast<uintptr_t>(g_stacks[i].data() + kStack) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 16);
    sp[0] = reinterpret_cast<void*>(&fiber_main);
    sp -= 6;
    for (int r = 0; r < 6; ++r) sp[r] = nullptr;
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g_stacks[i].data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#endif
  }
  const unsigned nwarps = (nt + 31) / 32;
  std::vector<unsigned> order, ready;
  unsigned lo = 0, n = nt;  // the fibers that may be runnable: all, or the warp just released
  while (true) {
    bool ran = false;
    arrange(order, n);
    for (unsigned i : order) {
      Fiber& f = g->fibers[lo + i];
      if (f.st != St::Run) continue;
      g->cur = &f;
      g_coords.threadIdx = f.tid;
      resume(&f);
      ran = true;
    }
    if (ran) continue;
    // Nobody can run: release one warp whose live lanes all wait at a warp collective, else the
    // block if all its live threads wait at __syncthreads. One warp at a time, so that warps drift
    // apart between barriers as far as they can: forward lets the lowest ready warp run ahead,
    // reverse the highest, shuffle a random one each time. A warp reading shared memory that
    // another warp rewrites without a barrier between them then sees the new data in one order
    // and the old in another.
    bool any_live = false, all_block = true;
    ready.clear();
    for (unsigned w = 0; w < nwarps; ++w) {
      bool live = false, all_warp = true;
      for (unsigned i = w * 32; i < std::min(nt, w * 32 + 32); ++i) {
        const St s = g->fibers[i].st;
        if (s == St::Done) continue;
        live = true;
        if (s != St::Warp) all_warp = false;
      }
      if (live && all_warp) ready.push_back(w);
    }
    if (!ready.empty()) {
      unsigned w = ready.front();
      if (mode().order == Order::Reverse) w = ready.back();
      if (mode().order == Order::Shuffle) w = ready[size_t(mode().rng() % ready.size())];
      for (unsigned i = w * 32; i < std::min(nt, w * 32 + 32); ++i)
        if (g->fibers[i].st == St::Warp) g->fibers[i].st = St::Run;
      lo = w * 32;
      n = std::min(nt, lo + 32) - lo;
      continue;
    }
    for (Fiber& f : g->fibers) {
      if (f.st == St::Done) continue;
      any_live = true;
      if (f.st != St::Block) all_block = false;
    }
    if (!any_live) break;
    if (!all_block)
      throw std::runtime_error("cuemu: deadlock in block (" + std::to_string(g_coords.blockIdx.x) + "," +
                               std::to_string(g_coords.blockIdx.y) + "," + std::to_string(g_coords.blockIdx.z) +
                               "): threads wait at __syncthreads and at warp collectives at once "
                               "(a barrier inside divergent code?)");
    for (Fiber& f : g->fibers) f.st = f.st == St::Block ? St::Run : f.st;
    lo = 0;
    n = nt;
  }
}

}  // namespace

namespace {
constexpr int kSmemDefault = 48 * 1024;  // dynamic shared memory a kernel may ask for by default
constexpr int kSmemStatic = 48 * 1024;   // static __shared__ per kernel (ptxas refuses more)
constexpr int kSmemOptin = 227 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin (H100/H200)
std::mutex& smem_mutex() { static std::mutex m; return m; }
std::map<const void*, int>& smem_limits() { static auto* m = new std::map<const void*, int>; return *m; }
// Static __shared__ bytes per kernel, summed as its variables register on its first run.
std::map<const void*, size_t>& static_smem_of() { static auto* m = new std::map<const void*, size_t>; return *m; }
int max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> l(smem_mutex());
  auto it = smem_limits().find(kernel);
  return it == smem_limits().end() ? kSmemDefault : it->second;
}
size_t static_smem(const void* kernel) {
  std::lock_guard<std::mutex> l(smem_mutex());
  auto it = static_smem_of().find(kernel);
  return it == static_smem_of().end() ? 0 : it->second;
}
// A static __shared__ variable of `kernel` registers during its first launch, which asked for
// `dyn` bytes of dynamic shared memory: the launch fails as the device's would if the static
// total passes 48 KiB (a ptxas error there), or static + dynamic, or static + the kernel's
// dynamic-size attribute (cudaFuncSetAttribute would have refused it), passes the opt-in limit.
void add_static_smem(const void* kernel, size_t bytes, size_t dyn) {
  size_t total = 0;
  int attr = -1;
  {
    std::lock_guard<std::mutex> l(smem_mutex());
    total = static_smem_of()[kernel] += bytes;
    auto it = smem_limits().find(kernel);
    if (it != smem_limits().end()) attr = it->second;
  }
  const char* what = nullptr;
  size_t with = 0;
  if (total > size_t(kSmemStatic)) what = "static shared memory alone";
  else if (total + dyn > size_t(kSmemOptin)) what = "static + the launch's dynamic shared memory", with = dyn;
  else if (attr >= 0 && total + size_t(attr) > size_t(kSmemOptin))
    what = "static + the MaxDynamicSharedMemorySize attribute", with = size_t(attr);
  if (!what) return;
  if (g_last == cudaSuccess)
    std::fprintf(stderr, "cuemu: a kernel has %zu bytes of static shared memory; %s (%zu bytes) "
                 "passes the device's limit (48 KiB static, 227 KiB in all)\n",
                 total, what, total + with);
  g_last = cudaErrorInvalidValue;
}
}  // namespace

void set_order(const std::string& order) { mode() = parse_order(order); }

bool register_shared(void* p, size_t bytes) {
  static_shared().push_back({static_cast<char*>(p), bytes});
  std::memset(p, 0xFF, bytes);  // registered by the first thread to reach it, before any use
  if (g && g->kernel) add_static_smem(g->kernel, bytes, g->dyn_bytes);
  return true;
}

void syncthreads() { wait_as(St::Block); }

int lane_id() { return g->cur->linear % 32; }

void syncwarp() { wait_as(St::Warp); }

uint64_t warp_exchange(uint64_t mine, int src) {
  const int me = g->cur->linear, base = me - me % 32;
  g->slots[size_t(me)] = mine;
  wait_as(St::Warp);  // every lane has written
  uint64_t r = mine;
  const int at = base + src;
  if (src >= 0 && src < 32 && size_t(at) < g->fibers.size() && g->fibers[size_t(at)].st != St::Done)
    r = g->slots[size_t(at)];
  wait_as(St::Warp);  // every lane has read before anyone writes again
  return r;
}

unsigned warp_ballot(bool pred) {
  const int me = g->cur->linear, base = me - me % 32;
  g->ballot[size_t(me)] = pred;
  wait_as(St::Warp);
  unsigned m = 0;
  for (int l = 0; l < 32 && size_t(base + l) < g->fibers.size(); ++l)
    if (g->fibers[size_t(base + l)].st != St::Done && g->ballot[size_t(base + l)]) m |= 1u << l;
  wait_as(St::Warp);
  return m;
}

unsigned char* dynamic_smem() { return g->dyn.data(); }

namespace {
std::atomic<long> g_work_seq{0};   // work issued so far (launch, gemm, device_copy, queued)
std::atomic<bool> g_issued{false};  // work issued since the last drain
std::mutex& stats_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::map<std::string, long>& stats_map() {
  static auto* m = new std::map<std::string, long>;  // never destroyed: read by the atexit writer
  return *m;
}
}  // namespace

void count_stat(const char* kind) {
  static const bool hooked = [] {
    if (const char* path = std::getenv("CUEMU_STATS"); path && *path) {
      static std::string file = path;
      std::atexit([] {
        FILE* f = std::fopen(file.c_str(), "w");
        if (!f) {
          std::fprintf(stderr, "cuemu: CUEMU_STATS=%s: cannot write the file\n", file.c_str());
          return;
        }
        std::fputc('{', f);
        bool first = true;
        for (const auto& [k, n] : stats()) {
          std::fprintf(f, "%s\"%s\": %ld", first ? "" : ", ", k.c_str(), n);
          first = false;
        }
        std::fputs("}\n", f);
        std::fclose(f);
      });
    }
    return true;
  }();
  (void)hooked;
  // A drain: the host waits for every stream while work has been issued since the last such
  // wait. The first of several read-backs in a row drains; the others find nothing to wait for.
  // (One flag for all streams: a wait on an idle stream while another has work counts too.)
  const std::string k = kind;
  bool drain = false;
  if (k == "launch" || k == "gemm" || k == "device_copy" || k == "queued") {
    g_work_seq.fetch_add(1);
    g_issued = true;
  } else if (k == "stream_sync" || k == "sync_copy" || k == "pageable_readback" || k == "free") {
    drain = g_issued.exchange(false);
  }
  std::lock_guard<std::mutex> l(stats_mutex());
  ++stats_map()[k];
  if (drain) ++stats_map()["drain"];
}

long work_seq() { return g_work_seq.load(); }

void count_event_wait(long seq_at_record) {
  // Waiting for an event recorded after the last work issued is waiting for all of it.
  const bool drain = seq_at_record == g_work_seq.load() && g_issued.exchange(false);
  std::lock_guard<std::mutex> l(stats_mutex());
  ++stats_map()["event_sync"];
  if (drain) ++stats_map()["drain"];
}

std::map<std::string, long> stats() {
  std::lock_guard<std::mutex> l(stats_mutex());
  return stats_map();
}

void count_launch(const char* name) {
  static const bool hooked = [] {
    if (std::getenv("CUEMU_REPORT")) {
      std::atexit([] {
        std::fprintf(stderr, "cuemu: launches per launch site (kernel as written at the launch)\n");
        for (auto& [k, n] : launch_counts()) std::fprintf(stderr, "  %8ld  %s\n", n, k.c_str());
      });
    }
    return true;
  }();
  (void)hooked;
  ++launch_counts()[name];
  count_stat("launch");
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  // The attribute plus the kernel's static shared memory may not pass the opt-in limit; the
  // static size is known once the kernel has run here (add_static_smem checks the first run).
  if (bytes < 0 || size_t(bytes) + static_smem(kernel) > size_t(kSmemOptin))
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> l(smem_mutex());
  smem_limits()[kernel] = bytes;
  return cudaSuccess;
}

void run_grid(const Cfg& cfg, void (*body)(void*), void* ctx, const void* kernel) {
  const unsigned nt = cfg.block.x * cfg.block.y * cfg.block.z;
  if (nt == 0 || nt > 1024 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 ||
      cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    g_last = cudaErrorInvalidValue;  // what the device reports for a bad configuration
    return;
  }
  // More dynamic shared memory than 48 KiB needs the kernel's attribute raised first.
  if (kernel && cfg.smem > size_t(max_dynamic_smem(kernel))) {
    if (g_last == cudaSuccess)
      std::fprintf(stderr,
                   "cuemu: launch with %zu bytes of dynamic shared memory; the kernel allows %d "
                   "(cudaFuncAttributeMaxDynamicSharedMemorySize, default 48 KiB, at most 227 KiB)\n",
                   cfg.smem, max_dynamic_smem(kernel));
    g_last = cudaErrorInvalidValue;
    return;
  }
  if (kernel && static_smem(kernel) + cfg.smem > size_t(kSmemOptin)) {
    if (g_last == cudaSuccess)
      std::fprintf(stderr, "cuemu: launch with %zu bytes of dynamic shared memory on top of the "
                   "kernel's %zu static bytes passes the 227 KiB opt-in limit\n",
                   cfg.smem, static_smem(kernel));
    g_last = cudaErrorInvalidValue;
    return;
  }
  eager_work(cfg.stream);  // the stream's queued collectives come first
  Grid grid;
  Grid* outer = g;
  g = &grid;
  grid.body = body;
  grid.body_ctx = ctx;
  grid.kernel = kernel;
  grid.dyn_bytes = cfg.smem;
  grid.dyn.assign(std::max<size_t>(cfg.smem, 16), 0xFF);
  grid.slots.assign(nt, 0);
  grid.ballot.assign(nt, 0);
  g_coords.blockDim = cfg.block;
  g_coords.gridDim = cfg.grid;
  try {
    const size_t nb = size_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
    std::vector<unsigned> blocks;  // empty: index order
    if (mode().order != Order::Forward) arrange(blocks, nb);
    for (size_t i = 0; i < nb; ++i) {
      const size_t b = blocks.empty() ? i : blocks[i];
      g_coords.blockIdx = {unsigned(b % cfg.grid.x), unsigned((b / cfg.grid.x) % cfg.grid.y),
                           unsigned(b / (size_t(cfg.grid.x) * cfg.grid.y))};
      run_block(cfg);
    }
  } catch (...) {
    g = outer;
    throw;
  }
  g = outer;
}

}  // namespace cuemu

// ---- runtime API ------------------------------------------------------------------------------
namespace {
// Device memory in use, for cudaMemGetInfo (memory plans and bench's peak figures).
std::map<void*, size_t>& allocations() {
  static auto* m = new std::map<void*, size_t>;
  return *m;
}
size_t g_allocated = 0;
constexpr size_t kDeviceBytes = size_t(141) << 30;  // an H200's 141 GB
size_t padded(size_t n) { return std::max<size_t>(256, (n + 255) / 256 * 256); }  // 256-byte pieces
// cudaHostAlloc's blocks (start -> bytes): copies to and from them are asynchronous. Under
// pinned_mutex(): cudaFreeHost may run on any thread (a tensor's deleter).
std::map<const char*, size_t>& pinned_blocks() {
  static auto* m = new std::map<const char*, size_t>;
  return *m;
}
std::mutex& pinned_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
bool pinned(const void* p, size_t n) {
  std::lock_guard<std::mutex> l(pinned_mutex());
  const char* c = static_cast<const char*>(p);
  auto it = pinned_blocks().upper_bound(c);
  if (it == pinned_blocks().begin()) return false;
  --it;
  return c >= it->first && c + n <= it->first + it->second;
}
}  // namespace

cudaError_t cudaMalloc(void** p, size_t n) {
  cuemu::count_stat("malloc");
  const size_t bytes = padded(n);
  if (bytes > kDeviceBytes - g_allocated) return cudaErrorMemoryAllocation;
  *p = std::aligned_alloc(256, bytes);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xFF, bytes);  // the device does not zero new memory either
  allocations()[*p] = bytes;
  g_allocated += bytes;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  cuemu::count_stat("free");
  cuemu::device_ready();  // as on the device: queued work that may still use the memory runs first
  auto it = allocations().find(p);
  if (it == allocations().end()) return cudaErrorInvalidValue;  // not from cudaMalloc
  g_allocated -= it->second;
  allocations().erase(it);
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  cuemu::count_stat("sync_copy");
  cuemu::eager_work(nullptr);
  if (n) std::memmove(d, s, n);
  cuemu::legacy_synced();
  return cudaSuccess;
}
// Device-to-device copies and memsets join a stream's queue when it has one (streams.cpp); a copy
// from or to host memory waits for the queue instead (pageable memory: the device's copy waits too).
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
  // Whether the host side, if any, is pinned (one lookup: the map is under a mutex).
  const bool pin = k == cudaMemcpyDeviceToHost ? pinned(d, n) : k == cudaMemcpyHostToDevice && pinned(s, n);
  if (k == cudaMemcpyDeviceToHost && !pin) {
    cuemu::count_stat("pageable_readback");  // the host waits for the stream and this copy
  } else {
    cuemu::count_stat("device_copy");
    if (k == cudaMemcpyHostToDevice && !pin) cuemu::count_stat("pageable_upload");
  }
  if (k == cudaMemcpyDeviceToDevice && cuemu::stream_busy(st)) {
    if (n) cuemu::enqueue(st, [d, s, n] { std::memmove(d, s, n); }, nullptr);
    return cudaSuccess;
  }
  cuemu::eager_work(st);
  if (k == cudaMemcpyDeviceToHost && pin) {
    cuemu::pinned_copy(st, true, d, s, n);
  } else if (k == cudaMemcpyHostToDevice && pin) {
    cuemu::pinned_copy(st, false, const_cast<void*>(s), d, n);
  } else {
    if (n) std::memmove(d, s, n);
    // To pageable memory the copy is synchronous: the stream's earlier work is done too.
    if (k == cudaMemcpyDeviceToHost) cuemu::stream_synced(st);
  }
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  cuemu::eager_work(nullptr);
  if (n) std::memset(p, v, n);
  cuemu::legacy_synced();
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t st) {
  cuemu::count_stat("device_copy");
  if (cuemu::stream_busy(st)) {
    if (n) cuemu::enqueue(st, [p, v, n] { std::memset(p, v, n); }, nullptr);
    return cudaSuccess;
  }
  cuemu::eager_work(st);
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                              size_t height, cudaMemcpyKind, cudaStream_t st) {
  cuemu::count_stat("device_copy");
  cuemu::eager_work(st);
  for (size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = cuemu::g_last;
  cuemu::g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cuemu::g_last; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024 : 132;  // an H100/H200
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    default: return "cuemu error";
  }
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError";
  }
}

template <typename T>
static T atomic_add(T* p, T v) {
  const T old = *p;  // fibers never run in parallel: a plain read-modify-write is atomic
  *p = old + v;
  return old;
}
int atomicAdd(int* p, int v) { return atomic_add(p, v); }
unsigned atomicAdd(unsigned* p, unsigned v) { return atomic_add(p, v); }
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return atomic_add(p, v); }
float atomicAdd(float* p, float v) { return atomic_add(p, v); }
double atomicAdd(double* p, double v) { return atomic_add(p, v); }
int atomicMax(int* p, int v) {
  const int old = *p;
  *p = std::max(old, v);
  return old;
}
int atomicMin(int* p, int v) {
  const int old = *p;
  *p = std::min(old, v);
  return old;
}

// ---- mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 ------------------------------------------------
// Every lane deposits its fragments; once the warp has, the first lane to run rebuilds A (16x16),
// B (16x8) and C (16x8) from the PTX ISA fragment layouts (kernels/mma.cuh) and computes the warp's
// D in f32; each lane then takes its four outputs.
namespace cuemu {
namespace {
struct MmaStage { uint32_t a[4], b[2]; float c[4]; };
struct MmaWarp { bool done = false; float D[16][8]; };
std::vector<MmaStage> g_mma;
std::vector<MmaWarp> g_mma_warp;
float bf_lo(uint32_t v) { return __uint_as_float(v << 16); }
float bf_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
// The rows and columns of a lane's accumulator fragment c[0..3].
int frag_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
int frag_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }
}  // namespace

void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int me = lane_id(), base = g->cur->linear - me;
  if (g_mma.size() < g->fibers.size()) {
    g_mma.resize(g->fibers.size());
    g_mma_warp.resize((g->fibers.size() + 31) / 32);
  }
  MmaStage& s = g_mma[size_t(g->cur->linear)];
  for (int i = 0; i < 4; ++i) s.a[i] = a[i], s.c[i] = d[i];
  s.b[0] = b[0];
  s.b[1] = b[1];
  wait_as(St::Warp);
  MmaWarp& w = g_mma_warp[size_t(base / 32)];
  if (!w.done) {
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const MmaStage& o = g_mma[size_t(base + l)];
      const int gi = l >> 2, t = l & 3;
      A[gi][2 * t] = bf_lo(o.a[0]);         A[gi][2 * t + 1] = bf_hi(o.a[0]);
      A[gi + 8][2 * t] = bf_lo(o.a[1]);     A[gi + 8][2 * t + 1] = bf_hi(o.a[1]);
      A[gi][2 * t + 8] = bf_lo(o.a[2]);     A[gi][2 * t + 9] = bf_hi(o.a[2]);
      A[gi + 8][2 * t + 8] = bf_lo(o.a[3]); A[gi + 8][2 * t + 9] = bf_hi(o.a[3]);
      B[2 * t][gi] = bf_lo(o.b[0]);         B[2 * t + 1][gi] = bf_hi(o.b[0]);
      B[2 * t + 8][gi] = bf_lo(o.b[1]);     B[2 * t + 9][gi] = bf_hi(o.b[1]);
      for (int i = 0; i < 4; ++i) w.D[frag_row(l, i)][frag_col(l, i)] = o.c[i];
    }
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 8; ++c) {
        float acc = w.D[r][c];
        for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];
        w.D[r][c] = acc;
      }
    w.done = true;
  }
  float out[4];
  for (int i = 0; i < 4; ++i) out[i] = w.D[frag_row(me, i)][frag_col(me, i)];
  wait_as(St::Warp);  // every lane has read the stage and the result
  // Lane 0 re-arms the warp's slot; no lane can reach the next mma's computation before lane 0
  // has arrived there, hence after this.
  if (me == 0) w.done = false;
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 ------------------------------------
// Lanes 8m..8m+7 give the row addresses of matrix m; after the warp has arrived each lane reads
// its elements of every matrix (PTX ISA fragment layout of ldmatrix). A row address that is not
// 16-byte aligned shared memory is the device's misaligned / illegal address: the launch fails.
namespace {
std::vector<const void*> g_ldsm;
bool in_shared(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (const Region& r : static_shared())
    if (c >= r.p && c + bytes <= r.p + r.bytes) return true;
  const char* d = reinterpret_cast<const char*>(g->dyn.data());
  return c >= d && c + bytes <= d + g->dyn.size();
}
}  // namespace

void ldmatrix(uint32_t* d, int nmat, bool trans, const void* row) {
  const int me = lane_id(), base = g->cur->linear - me;
  if (g_ldsm.size() < g->fibers.size()) g_ldsm.resize(g->fibers.size());
  g_ldsm[size_t(g->cur->linear)] = row;
  wait_as(St::Warp);
  const int gi = me >> 2, t = me & 3;
  for (int m = 0; m < nmat; ++m) {
    uint16_t v[2] = {0, 0};
    for (int e = 0; e < 2; ++e) {
      // Non-transposed: row gi, column 2t+e. Transposed: row 2t+e, column gi.
      const int r = trans ? 2 * t + e : gi, c = trans ? gi : 2 * t + e;
      const size_t src = size_t(base + 8 * m + r);
      const void* rp = src < g_ldsm.size() ? g_ldsm[src] : nullptr;
      if (!rp || reinterpret_cast<uintptr_t>(rp) % 16 != 0 || !in_shared(rp, 16)) {
        if (g_last == cudaSuccess)
          std::fprintf(stderr, "cuemu: ldmatrix: lane %d's row address %p is not 16-byte aligned shared memory\n",
                       8 * m + r, rp);
        g_last = cudaErrorLaunchFailure;
        continue;
      }
      std::memcpy(&v[e], static_cast<const char*>(rp) + 2 * c, 2);
    }
    d[m] = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
  }
  wait_as(St::Warp);  // every lane has read the addresses before any lane deposits again
}

// ---- cp.async.{ca,cg}.shared.global, commit_group, wait_group ---------------------------------
// The widest window the device allows: at issue the destination turns to poison (0xFF bytes), so
// a thread still reading the old tile there (a missing barrier before the copy) reads NaN; the
// data lands only when the issuing thread waits for its group, so a read before the wait and
// barrier reads poison too. The source is read at issue and compared at the wait: a write to it in
// between is a race with the copy and fails the launch. A misaligned or non-shared destination,
// or a misaligned source, fails the launch as on the device.
void fail_launch() {
  if (g_last == cudaSuccess) g_last = cudaErrorLaunchFailure;
}

void cp_async(void* smem, const void* gmem, int bytes, int src_bytes) {
  const bool ok_size = (bytes == 4 || bytes == 8 || bytes == 16) && src_bytes >= 0 && src_bytes <= bytes;
  if (!ok_size || reinterpret_cast<uintptr_t>(smem) % unsigned(bytes) != 0 || !in_shared(smem, size_t(bytes)) ||
      reinterpret_cast<uintptr_t>(gmem) % unsigned(bytes) != 0 || in_shared(gmem, 1)) {
    if (g_last == cudaSuccess)
      std::fprintf(stderr,
                   "cuemu: cp.async of %d bytes (%d from the source) from %p to %p: the destination must be "
                   "shared memory and both addresses %d-byte aligned\n",
                   bytes, src_bytes, gmem, smem, bytes);
    g_last = cudaErrorLaunchFailure;
    return;
  }
  AsyncCopy c{smem, bytes, {}, gmem, src_bytes};
  std::memcpy(c.data, gmem, size_t(src_bytes));  // the rest stays zero (zfill)
  std::memset(smem, 0xFF, size_t(bytes));
  g->cur->open.push_back(c);
}

void cp_async_commit() {
  Fiber* f = g->cur;
  f->committed.push_back(std::move(f->open));
  f->open.clear();
}

void cp_async_wait(int pending) {
  Fiber* f = g->cur;
  while (f->committed.size() > size_t(std::max(pending, 0))) {
    for (const AsyncCopy& c : f->committed.front()) {
      // The device may read the source at any moment between issue and wait, so a write to it
      // in that window (by this block: blocks run one at a time) races with the copy.
      if (c.src_bytes > 0 && std::memcmp(c.src, c.data, size_t(c.src_bytes)) != 0) {
        if (g_last == cudaSuccess)
          std::fprintf(stderr,
                       "cuemu: cp.async of %d bytes from %p to %p: the source was written while the "
                       "copy was in flight (between the cp.async and its wait)\n",
                       c.bytes, c.src, c.dst);
        fail_launch();
      }
      std::memcpy(c.dst, c.data, size_t(c.bytes));
    }
    f->committed.pop_front();
  }
}
}  // namespace cuemu

// ---- device, host memory (streams and events: streams.cpp) -------------------------------------
namespace {
const char* devices_env() {
  const char* e = std::getenv("CUEMU_DEVICES");
  return e && *e ? e : "1";
}
}  // namespace
cudaError_t cudaGetDeviceCount(int* n) {
  const std::string e = devices_env();
  if (e == "no-driver" || e == "old-driver") return cudaErrorInsufficientDriver;
  char* end = nullptr;
  const long v = std::strtol(e.c_str(), &end, 10);
  if (*end || v < 0 || v > 64) {
    std::fprintf(stderr, "cuemu: CUEMU_DEVICES='%s': expected a count, no-driver or old-driver\n", e.c_str());
    std::abort();
  }
  if (v == 0) return cudaErrorNoDevice;
  *n = int(v);
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  const std::string e = devices_env();
  *v = e == "no-driver" ? 0 : e == "old-driver" ? 12000 : 13000;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t* f, size_t* t) {
  *t = kDeviceBytes;
  *f = kDeviceBytes - g_allocated;
  return cudaSuccess;
}
// CUEMU_PINNED_MAX=BYTES: a pinned allocation larger than BYTES fails with
// cudaErrorMemoryAllocation, as when the host's page-locked memory runs out; callers must take
// their pageable path (or fail with a clear error).
size_t pinned_max() {
  static const size_t m = [] {
    const char* e = std::getenv("CUEMU_PINNED_MAX");
    if (!e || !*e) return std::numeric_limits<size_t>::max();
    char* end = nullptr;
    const unsigned long long v = std::strtoull(e, &end, 10);
    if (*end) {
      std::fprintf(stderr, "cuemu: CUEMU_PINNED_MAX=%s: expected a number of bytes\n", e);
      std::exit(2);
    }
    return size_t(v);
  }();
  return m;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) {
  if (n > pinned_max()) {
    *p = nullptr;
    return cuemu::g_last = cudaErrorMemoryAllocation;  // also what cudaGetLastError reports next
  }
  *p = std::aligned_alloc(256, padded(n));
  if (*p) {
    std::lock_guard<std::mutex> l(pinned_mutex());
    pinned_blocks()[static_cast<const char*>(*p)] = padded(n);
  }
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaMallocHost(void** p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void* p) {
  cuemu::device_ready();
  size_t n = 0;
  {
    std::lock_guard<std::mutex> l(pinned_mutex());
    auto it = pinned_blocks().find(static_cast<const char*>(p));
    if (it != pinned_blocks().end()) {
      n = it->second;
      pinned_blocks().erase(it);
    }
  }
  if (n) cuemu::host_memory_freed(p, n);
  std::free(p);
  return cudaSuccess;
}
