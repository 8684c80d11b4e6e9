#!/usr/bin/env bash
# Builds everything (scripts/setup.sh) and runs the whole test suite. Extra arguments go to ctest,
# e.g. scripts/test.sh -R config, scripts/test.sh -j2. Exits with ctest's status.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
build_dir=${MUONFORGE_BUILD_DIR:-build}
set +e
ctest --test-dir "$build_dir" --output-on-failure --no-tests=error "$@"
status=$?
set -e
exit $status
