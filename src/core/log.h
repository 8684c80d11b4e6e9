// Logging: spdlog with one console format for every subcommand. Rank-aware once distributed
// training sets the rank (non-zero ranks log warnings and errors only, unless MF_LOG_ALL_RANKS=1).
#pragma once
#include <string>

#include <spdlog/spdlog.h>

namespace mf {

// Console sink, pattern "[HH:MM:SS] message" (warnings/errors tagged). Idempotent.
void setup_logging(int rank = 0);
// Also append everything to `path` (the run directory's log.txt).
void add_log_file(const std::string& path);
// Append `line` to that file alone (no console), if one was added: main() puts the error that
// ends a run there, so log.txt tells how the run ended.
void log_file_only(const std::string& line);
// An info line for the console and the run log when `console`, else for the run log alone
// (`train --quiet`).
void log_info(const std::string& line, bool console);

// A byte count for messages: "%.1f GiB" from 1 GiB up, else "%.0f MiB".
std::string format_bytes(double bytes);

}  // namespace mf
