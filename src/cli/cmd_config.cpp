// Placeholder until this subcommand lands.
#include "cli/commands.h"
#include "core/error.h"
namespace mf {
int cmd_config(const Args&) { MF_FAIL("config: not built yet"); }
}  // namespace mf
