// Where a step's time goes, region by region, on the backend's own timeline (muonforge bench
// --profile).
//
// Code marks regions with ProfRegion (RAII): `ProfRegion r(be, "fwd.qkv"); ...; r.next("fwd.rope");`.
// When a profiler is attached to the backend (Backend::set_profiler), every region entry and exit
// records a mark on the backend's timeline (CUDA: an event on its stream, so the time is the GPU's,
// not the host's enqueue time; CPU: the clock). The time between two marks goes to the innermost
// region open between them (exclusive time), so the regions of a step add up to the time from its
// first mark to its last, minus the gaps outside every region. A region nested in another is
// reported under its path, "outer/inner", so recompute or MoE sub-steps stay apart from the
// plain forward. Without a profiler a ProfRegion costs one pointer test.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace mf {

class OpProfiler {
 public:
  // Attaches itself to `be` (be.set_profiler(this)) until destroyed.
  explicit OpProfiler(Backend& be);
  ~OpProfiler();
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;

  void enter(const std::string& name);  // opens a region inside the current one
  void leave();                         // closes the innermost region
  // Waits for the backend's work, turns the marks recorded since the last flush into time per
  // region and clears them (the backend's marks too). Regions still open stay open.
  void flush();

  struct Region {
    std::string path;  // "fwd.qkv", or "bwd.recompute/fwd.qkv" when nested
    double ms = 0;     // exclusive time, summed over flushes
    int64_t calls = 0; // times entered
  };
  std::vector<Region> regions() const;  // largest time first
  double total_ms() const;              // sum over regions
  void reset();                         // forgets the totals (not the open regions)

 private:
  int region_of(const std::string& path);
  void mark();  // a mark after which the innermost open region (or none) is running

  Backend& be_;
  std::vector<int> open_;  // region indices, innermost last
  struct Span {
    size_t mark;
    int region;  // running from this mark to the next; -1: none
  };
  std::vector<Span> spans_;
  std::vector<Region> regions_;
  std::map<std::string, int> index_;
};

// A region on `be`'s profiler (none attached: does nothing).
class ProfRegion {
 public:
  ProfRegion(Backend& be, const char* name) : p_(be.profiler()) {
    if (p_) p_->enter(name);
    open_ = p_ != nullptr;
  }
  // Never throws: a destructor that threw while a CUDA error unwinds the stack would terminate
  // the process before the error is printed.
  ~ProfRegion() {
    try {
      end();
    } catch (...) {
    }
  }
  // Closes this region (if open) and opens `name` in its place.
  void next(const char* name) {
    end();
    if (p_) p_->enter(name);
    open_ = p_ != nullptr;
  }
  // Closes it early (before calling code that has regions of its own that should not nest).
  void end() {
    if (open_) p_->leave();
    open_ = false;
  }
  ProfRegion(const ProfRegion&) = delete;
  ProfRegion& operator=(const ProfRegion&) = delete;

 private:
  OpProfiler* p_;
  bool open_ = false;
};

}  // namespace mf
