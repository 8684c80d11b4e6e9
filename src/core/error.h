// Error handling used everywhere: one exception type, one check macro.
// Every message should name what the user must fix (file, key path, value).
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace mf {

// All user-facing failures throw mf::Error; the CLI prints e.what() and exits non-zero.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// `what` without the " [src/file.cpp:123]" that MF_CHECK / MF_FAIL append: the CLI prints this
// on the console (MF_ERROR_SOURCE=1 keeps the location there too) and the whole in log.txt.
std::string without_source(const std::string& what);

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace mf

// MF_CHECK(cond, a, b, c...) throws mf::Error("a b c (at file:line)") when cond is false.
#define MF_CHECK(cond, ...)                                                                    \
  do {                                                                                         \
    if (!(cond)) ::mf::detail::throw_error(__FILE__, __LINE__, ::mf::detail::cat(__VA_ARGS__)); \
  } while (0)

// MF_FAIL(a, b, ...) always throws.
#define MF_FAIL(...) ::mf::detail::throw_error(__FILE__, __LINE__, ::mf::detail::cat(__VA_ARGS__))
