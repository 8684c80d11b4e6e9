// Placeholder until this subcommand lands.
#include "cli/commands.h"
#include "core/error.h"
namespace mf {
int cmd_inspect(const Args&) { MF_FAIL("inspect: not built yet"); }
}  // namespace mf
