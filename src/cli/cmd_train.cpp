// Placeholder until the trainer lands (issue 3).
#include "cli/commands.h"
#include "core/error.h"
namespace mf {
int cmd_train(const Args&) { MF_FAIL("train: not built yet"); }
int cmd_eval(const Args&) { MF_FAIL("eval: not built yet"); }
}  // namespace mf
