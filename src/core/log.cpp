#include "core/log.h"

#include <algorithm>
#include <cstdlib>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>

namespace mf {

void setup_logging(int rank) {
  auto logger = spdlog::default_logger();
  static bool done = false;
  if (!done) {
    logger = std::make_shared<spdlog::logger>("muonforge",
                                              std::make_shared<spdlog::sinks::stdout_sink_mt>());
    spdlog::set_default_logger(logger);
    done = true;
  }
  spdlog::set_pattern("[%H:%M:%S] %^%l%$: %v");
  // Info lines carry no level tag: they are the normal output.
  logger->set_pattern("[%H:%M:%S] %v");
  const char* all = std::getenv("MF_LOG_ALL_RANKS");
  bool quiet = rank != 0 && !(all && std::string(all) == "1");
  logger->set_level(quiet ? spdlog::level::warn : spdlog::level::info);
  logger->flush_on(spdlog::level::info);
}

namespace {
// The run log's sink (one at a time: a second Trainer in the same process replaces the first's).
std::shared_ptr<spdlog::sinks::sink> g_log_file;
}  // namespace

void add_log_file(const std::string& path) {
  std::shared_ptr<spdlog::sinks::sink>& current = g_log_file;
  auto& sinks = spdlog::default_logger()->sinks();
  if (current) sinks.erase(std::remove(sinks.begin(), sinks.end(), current), sinks.end());
  current = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, /*truncate=*/false);
  current->set_pattern("[%Y-%m-%d %H:%M:%S] %v");
  sinks.push_back(current);
}

void log_file_only(const std::string& line) {
  if (!g_log_file) return;
  g_log_file->log(spdlog::details::log_msg(spdlog::source_loc{}, "", spdlog::level::err, line));
  g_log_file->flush();
}

void log_info(const std::string& line, bool console) {
  if (console) spdlog::info("{}", line);
  else log_file_only(line);
}

std::string format_bytes(double bytes) {
  return bytes >= double(1ull << 30) ? fmt::format("{:.1f} GiB", bytes / double(1ull << 30))
                                     : fmt::format("{:.0f} MiB", bytes / double(1ull << 20));
}

}  // namespace mf
