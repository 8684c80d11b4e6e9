#!/usr/bin/env bash
# Which kernel and CUDA backend code do the emulated [gpu] tests never run?
#
#   tests/cuemu/coverage.sh [BUILD_DIR]        (default: build-cov, beside the other build dirs)
#   tests/cuemu/coverage.sh --report BUILD_DIR (the report alone, from an earlier run)
#
# Configures BUILD_DIR as a CPU build with gcc --coverage, builds the emulated test programs,
# runs their ctest entries in the default thread order (about 30 minutes on 2 cores: the e2e
# training runs dominate), then prints tests/cuemu/coverage_report.py's summary: per file the
# template instantiations and lines no test reached. Needs gcc and gcov (Debian's gcc has both).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = "--report" ]; then
  exec python3 "$root/tests/cuemu/coverage_report.py" "${2:?--report needs the build dir}" "$root"
fi
build=${1:-$root/build-cov}
command -v gcov > /dev/null || { echo "coverage.sh: gcov not found (apt-get install gcc)" >&2; exit 1; }
cmake -S "$root" -B "$build" -DMUONFORGE_CUDA=OFF -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS="--coverage -fprofile-update=atomic" -DCMAKE_EXE_LINKER_FLAGS=--coverage > /dev/null
targets=(cuemu_test_ops cuemu_test_cuda_smoke cuemu_test_cuda_attention cuemu_test_cuda_matrix_opt
         cuemu_test_cuda_moe cuemu_test_gpu_e2e muonforge_cuemu)
cmake --build "$build" -j "${JOBS:-2}" --target "${targets[@]}"
find "$build" -name '*.gcda' -delete  # counts from this run only
(cd "$build" && ctest -j "${JOBS:-2}" --output-on-failure \
  -R 'cuemu_test_(ops|cuda_smoke|cuda_attention|cuda_matrix_opt|cuda_moe|gpu_e2e)$|cuemu_test_ops_simt|cuemu_cli|cuemu_dist|cuemu_step_costs')
python3 "$root/tests/cuemu/coverage_report.py" "$build" "$root"
