#include "core/fault.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace mf {
namespace {

struct Spec {
  bool set = false;
  FaultPoint point = FaultPoint::Step;
  int a = -1, b = 0;  // Step: step, rank; Setup: rank; Prune: step
};

// A whole non-negative integer, or -1.
int whole(const std::string& s) {
  if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::atoi(s.c_str());
}

Spec parse(const char* env) {
  Spec s;
  if (!env || !*env) return s;
  const std::string v = env;
  s.set = true;
  const size_t colon = v.find(':');
  const std::string head = v.substr(0, colon), tail = colon == std::string::npos ? "" : v.substr(colon + 1);
  if (head == "setup" || head == "prune") {
    s.point = head == "setup" ? FaultPoint::Setup : FaultPoint::Prune;
    s.a = whole(tail);
  } else {
    s.a = whole(head);
    s.b = colon == std::string::npos ? 0 : whole(tail);
  }
  MF_CHECK(s.a >= 0 && s.b >= 0, "MF_FAULT_KILL_AT='", v,
           "': expected STEP, STEP:RANK, setup:RANK or prune:STEP (a testing aid; unset it for "
           "normal runs)");
  return s;
}

}  // namespace

void fault_point(FaultPoint point, int n, int rank) {
  static const Spec spec = parse(std::getenv("MF_FAULT_KILL_AT"));
  if (!spec.set || spec.point != point) return;
  const char* attempt = std::getenv("MF_RESTART_COUNT");
  if (attempt && std::atoi(attempt) != 0) return;
  const bool hit = point == FaultPoint::Step    ? spec.a == n && spec.b == rank
                   : point == FaultPoint::Setup ? spec.a == rank
                                                : spec.a == n;
  if (!hit) return;
  std::fflush(nullptr);
  std::raise(SIGKILL);
}

size_t fault_host_memory() {
  // Read at every call (memory_info is not called in hot loops), so a test can set it in-process.
  const char* e = std::getenv("MF_FAULT_HOST_MEMORY");
  if (!e || !*e) return 0;
  const std::string v = e;
  const bool digits = v.size() <= 18 && v.find_first_not_of("0123456789") == std::string::npos;
  const size_t n = digits ? size_t(std::stoull(v)) : 0;
  MF_CHECK(n > 0, "MF_FAULT_HOST_MEMORY='", v,
           "': expected a positive number of bytes (a testing aid; unset it for normal runs)");
  return n;
}

}  // namespace mf
