#include "backend/profiler.h"

#include <algorithm>

#include "core/error.h"

namespace mf {

OpProfiler::OpProfiler(Backend& be) : be_(be) {
  MF_CHECK(be_.profiler() == nullptr, "a profiler is already attached to the ", be_.name(),
           " backend");
  be_.clear_marks();
  be_.set_profiler(this);
}

OpProfiler::~OpProfiler() {
  be_.set_profiler(nullptr);
  be_.clear_marks();
}

int OpProfiler::region_of(const std::string& path) {
  auto it = index_.find(path);
  if (it != index_.end()) return it->second;
  const int i = int(regions_.size());
  regions_.push_back(Region{path, 0.0, 0});
  index_.emplace(path, i);
  return i;
}

void OpProfiler::mark() {
  spans_.push_back(Span{be_.record_mark(), open_.empty() ? -1 : open_.back()});
}

void OpProfiler::enter(const std::string& name) {
  const std::string path = open_.empty() ? name : regions_[size_t(open_.back())].path + "/" + name;
  const int r = region_of(path);
  regions_[size_t(r)].calls++;
  open_.push_back(r);
  mark();
}

void OpProfiler::leave() {
  MF_CHECK(!open_.empty(), "profiler: leave() without an open region");
  open_.pop_back();
  mark();
}

void OpProfiler::flush() {
  if (!spans_.empty()) {
    mark();  // ends the last span here; each span runs to the next mark
    for (size_t i = 0; i + 1 < spans_.size(); ++i)
      if (spans_[i].region >= 0)
        regions_[size_t(spans_[i].region)].ms += be_.marks_elapsed_ms(spans_[i].mark, spans_[i + 1].mark);
  }
  spans_.clear();
  be_.clear_marks();
  if (!open_.empty()) mark();  // the innermost open region keeps running
}

std::vector<OpProfiler::Region> OpProfiler::regions() const {
  std::vector<Region> out = regions_;
  std::stable_sort(out.begin(), out.end(), [](const Region& a, const Region& b) { return a.ms > b.ms; });
  return out;
}

double OpProfiler::total_ms() const {
  double t = 0;
  for (const Region& r : regions_) t += r.ms;
  return t;
}

void OpProfiler::reset() {
  for (Region& r : regions_) {
    r.ms = 0;
    r.calls = 0;
  }
}

}  // namespace mf
