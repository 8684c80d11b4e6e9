#pragma once

namespace mf {

// The project's version (CMakeLists.txt, project VERSION) and the git commit the binary was
// built from ("1a2b3c4d5e6f", "...-dirty" with uncommitted changes, "unknown" outside git);
// written at build time by src/core/version.cmake.
const char* version();
const char* build_commit();

}  // namespace mf
