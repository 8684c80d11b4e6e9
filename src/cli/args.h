// Option parsing shared by the subcommands: every error names the subcommand, the option and
// the value (e.g. "bench: --steps needs an integer, got 'x'").
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "cli/commands.h"
#include "config/config.h"
#include "core/error.h"

namespace mf {

// The argument after args[i] (advancing i), or an error when args[i] is the last one.
inline std::string option_value(const Args& args, size_t& i, const char* cmd) {
  MF_CHECK(i + 1 < args.size(), cmd, ": option ", args[i], " needs a value");
  return args[++i];
}

// The KEY=VALUE of `--set KEY=VALUE` or `--set=KEY=VALUE` at args[i] (advancing i past the
// value of the first form). Without '=' it is an error that shows the form, so that
// `--set optim.lr 0.01` does not go on to read 0.01 as a config file.
inline std::string set_value(const Args& args, size_t& i, const char* cmd) {
  const bool joined = args[i].rfind("--set=", 0) == 0;
  MF_CHECK(joined || i + 1 < args.size(), cmd, ": --set needs KEY=VALUE, e.g. --set optim.lr=3e-3");
  const std::string kv = joined ? args[i].substr(6) : args[++i];
  MF_CHECK(kv.find('=') != std::string::npos && kv[0] != '=', cmd, ": --set needs KEY=VALUE, got '",
           kv, "'", kv.empty() || kv[0] == '-' ? "" : " (write --set " + kv + "=VALUE)");
  return kv;
}

// For an unknown option of a command that takes --set: "; config keys are set with --set: --set
// train.max_steps=VALUE" when the option's name is a key's ("--max-steps", "--weight_decay"),
// else "".
inline std::string set_hint(const std::string& opt) {
  std::string name = opt.substr(opt.find_first_not_of('-') == std::string::npos
                                    ? opt.size()
                                    : opt.find_first_not_of('-'));
  name = name.substr(0, name.find('='));
  std::replace(name.begin(), name.end(), '-', '_');
  const std::vector<std::string> keys = config_keys_for(name);
  if (keys.empty() || keys.size() > 3) return "";
  std::string out = "; config keys are set with --set: ";
  for (size_t k = 0; k < keys.size(); ++k) out += (k ? " or --set " : "--set ") + keys[k] + "=VALUE";
  return out;
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
