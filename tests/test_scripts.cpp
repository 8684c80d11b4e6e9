// scripts/sweep.py and scripts/plot.py end to end: tests/test_sweep_plot.py runs the shipped CPU
// sweep in its reduced form with this build's muonforge binary, checks results.csv, skipping of
// finished runs, refusal of changed configs, resume after SIGINT, bad sweep files, and the PNGs
// (the plot part is skipped with a warning when matplotlib is not importable); and
// scripts/gpu_sweep.sh sitting by sitting (tests/test_gpu_sweep_script.py).
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include "test_util.h"

namespace {

using mf::test::run_capture;


}  // namespace

TEST_CASE("sweep.py and plot.py on the reduced CPU sweep", "[scripts][python]") {
  if (std::system("python3 --version > /dev/null 2>&1") != 0) {
    WARN("python3 not found: skipping tests/test_sweep_plot.py");
    return;
  }
  int rc = 0;
  const std::string log = run_capture(
      "python3 " + std::string(MF_TEST_DIR) + "/test_sweep_plot.py " + std::string(MF_BINARY), &rc);
  INFO(log);
  CHECK(rc == 0);
  CHECK(log.find("ok: reduced sweep finished") != std::string::npos);
  if (log.find("SKIP-PLOT") != std::string::npos)
    WARN("matplotlib is not importable: plot.py was not tested (pip install matplotlib)");
  else
    CHECK(log.find("ok: speedup.csv has both widths") != std::string::npos);
}

TEST_CASE("gpu_sweep.sh sittings on the CPU: carry-over, budget stop, the shipped sweep",
          "[scripts][python]") {
  // tests/test_gpu_sweep_script.py drives scripts/gpu_sweep.sh with --binary (no device setup).
  if (std::system("python3 --version > /dev/null 2>&1") != 0 ||
      std::system("test -r /usr/share/common-licenses/GPL-3") != 0) {
    WARN("python3 or /usr/share/common-licenses missing: skipping tests/test_gpu_sweep_script.py");
    return;
  }
  int rc = 0;
  const std::string log = run_capture("python3 " + std::string(MF_TEST_DIR) +
                                          "/test_gpu_sweep_script.py " + std::string(MF_BINARY),
                                      &rc);
  INFO(log);
  CHECK(rc == 0);
  CHECK(log.find("ok: sitting 2 skipped the carried runs") != std::string::npos);
  CHECK(log.find("ok: a sitting stops at its budget") != std::string::npos);
  CHECK(log.find("ok: the sitting sweep file expands to 18 runs") != std::string::npos);
}
