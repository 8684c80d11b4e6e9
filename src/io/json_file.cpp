#include "io/json_file.h"

#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace mf {

nlohmann::json read_json_file(const std::string& path, const std::string& what) {
  const std::string name = what.empty() ? std::string("file") : what;
  std::error_code ec;
  MF_CHECK(!std::filesystem::is_directory(path, ec), name, " '", path,
           "' is a directory, not a JSON file");
  std::ifstream in(path);
  MF_CHECK(in, "cannot open ", name, " '", path, "'");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e400
    std::string msg = e.what();
    const size_t close = msg.find("] ");  // drop the "[json.exception.parse_error.101] " prefix
    if (close != std::string::npos) msg = msg.substr(close + 2);
    MF_FAIL("invalid JSON in ", name, " '", path, "': ", msg);
  }
}

nlohmann::json peek_json_file(const std::string& path, bool comments) {
  std::ifstream in(path);
  if (!in) return nlohmann::json(nlohmann::json::value_t::discarded);
  try {
    return nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false, comments);
  } catch (const std::exception&) {  // a read error mid-file
    return nlohmann::json(nlohmann::json::value_t::discarded);
  }
}

}  // namespace mf
