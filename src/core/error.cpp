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
