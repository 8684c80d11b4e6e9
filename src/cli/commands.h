// Subcommands of the muonforge binary. Each takes the arguments after its name and returns the
// process exit code; errors are thrown as mf::Error and printed by main.
#pragma once
#include <string>
#include <vector>

namespace mf {

using Args = std::vector<std::string>;

int cmd_train(const Args& args);    // src/cli/cmd_train.cpp
int cmd_eval(const Args& args);     // src/cli/cmd_train.cpp
int cmd_inspect(const Args& args);  // src/cli/cmd_inspect.cpp
int cmd_export(const Args& args);   // src/cli/cmd_export.cpp
int cmd_import(const Args& args);   // src/cli/cmd_export.cpp: a Hugging Face model as a checkpoint
int cmd_config(const Args& args);   // src/cli/cmd_config.cpp: print the resolved config
int cmd_bench(const Args& args);    // src/cli/cmd_bench.cpp: throughput / MFU / memory
int cmd_sample(const Args& args);   // src/cli/cmd_sample.cpp: generate text from a checkpoint

}  // namespace mf
