// Option parsing shared by the subcommands: every error names the subcommand, the option and
// the value (e.g. "bench: --steps needs an integer, got 'x'").
#pragma once
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "cli/commands.h"
#include "core/error.h"

namespace mf {

// The argument after args[i] (advancing i), or an error when args[i] is the last one.
inline std::string option_value(const Args& args, size_t& i, const char* cmd) {
  MF_CHECK(i + 1 < args.size(), cmd, ": option ", args[i], " needs a value");
  return args[++i];
}

// v as a whole integer / number, or an error naming cmd, opt and v.
inline int64_t option_int(const char* cmd, const std::string& opt, const std::string& v) {
  std::istringstream in(v);
  long long x = 0;
  in >> x;
  MF_CHECK(!v.empty() && in && in.peek() == EOF, cmd, ": ", opt, " needs an integer, got '", v,
           "'");
  return int64_t(x);
}

inline double option_double(const char* cmd, const std::string& opt, const std::string& v) {
  std::istringstream in(v);
  double x = 0;
  in >> x;
  MF_CHECK(!v.empty() && in && in.peek() == EOF, cmd, ": ", opt, " needs a number, got '", v,
           "'");
  return x;
}

// The argument after args[i] (advancing i) as an integer / number, errors naming args[i].
inline int64_t next_int(const Args& args, size_t& i, const char* cmd) {
  const std::string opt = args[i];
  return option_int(cmd, opt, option_value(args, i, cmd));
}

// The same as an int in [lo, hi]: an error naming cmd, the option and the value otherwise (no
// silent wrap of a value past 32 bits).
inline int next_int_in(const Args& args, size_t& i, const char* cmd, int64_t lo,
                       int64_t hi = std::numeric_limits<int>::max()) {
  const std::string opt = args[i];
  const int64_t v = next_int(args, i, cmd);
  MF_CHECK(v >= lo, cmd, ": ", opt, " must be >= ", lo, ", got ", v);
  MF_CHECK(v <= hi, cmd, ": ", opt, " must be at most ", hi, ", got ", v);
  return int(v);
}

inline double next_double(const Args& args, size_t& i, const char* cmd) {
  const std::string opt = args[i];
  return option_double(cmd, opt, option_value(args, i, cmd));
}

}  // namespace mf
