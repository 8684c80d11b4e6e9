// Reading JSON files. Two readers: a strict one whose errors name the file and what it is, and
// a lenient one for code that only peeks (is this a Hugging Face directory? what vocab_size did
// the checkpoint have?) and leaves a missing or broken file to a strict reader to report later.
// (A config file has its own reader in config/config.cpp: comments allowed, `base` chains.)
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace mf {

// The parsed file. Throws mf::Error: "cannot open WHAT 'PATH'" or "invalid JSON in WHAT 'PATH':
// <parser message>" (`what` e.g. "checkpoint state"; "file" when empty).
nlohmann::json read_json_file(const std::string& path, const std::string& what = "");

// The parsed file, or a discarded value (`.is_discarded()`) when it cannot be opened or is not
// valid JSON. Never throws. `comments`: allow // and /* */ comments, as config files may have.
nlohmann::json peek_json_file(const std::string& path, bool comments = false);

}  // namespace mf
