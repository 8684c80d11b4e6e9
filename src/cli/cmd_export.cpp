// Placeholder until this subcommand lands.
#include "cli/commands.h"
#include "core/error.h"
namespace mf {
int cmd_export(const Args&) { MF_FAIL("export: not built yet"); }
}  // namespace mf
