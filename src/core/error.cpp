#include "core/error.h"

#include <cstring>

namespace mf::detail {

void throw_error(const char* file, int line, const std::string& msg) {
  // Keep only the path below src/ so messages stay short and stable.
  const char* rel = std::strstr(file, "src/");
  std::ostringstream os;
  os << msg << " [" << (rel ? rel : file) << ":" << line << "]";
  throw Error(os.str());
}

}  // namespace mf::detail

namespace mf {

std::string without_source(const std::string& what) {
  // " [" PATH ":" DIGITS "]" at the very end, PATH without spaces.
  if (what.size() < 6 || what.back() != ']') return what;
  const size_t open = what.rfind(" [");
  if (open == std::string::npos) return what;
  const std::string tag = what.substr(open + 2, what.size() - open - 3);
  const size_t colon = tag.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == tag.size() ||
      tag.find(' ') != std::string::npos)
    return what;
  for (size_t i = colon + 1; i < tag.size(); ++i)
    if (tag[i] < '0' || tag[i] > '9') return what;
  return what.substr(0, open);
}

}  // namespace mf
