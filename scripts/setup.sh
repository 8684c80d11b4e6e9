#!/usr/bin/env bash
# Installs the Debian packages muonforge needs (only the missing ones), then configures and builds
# into build/ (CPU backend always; CUDA backend when nvcc is found). Safe to run again: it does
# nothing that is already done, and an up-to-date build is a no-op.
#
#   scripts/setup.sh [extra cmake configure args]
#
# Environment:
#   MUONFORGE_CUDA=AUTO|ON|OFF   CUDA backend (default AUTO: build it when nvcc is found)
#   MUONFORGE_BUILD_DIR=dir      build directory (default build)
#   MUONFORGE_JOBS=n             parallel build jobs (default: nproc)
#   MUONFORGE_NO_PIP=1           do not pip-install matplotlib (for scripts/plot.py)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(cmake g++ make python3 nlohmann-json3-dev libspdlog-dev catch2 libopenblas-dev libgloo-dev)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing missing Debian packages: ${missing[*]}"
  if ! command -v apt-get >/dev/null; then
    echo "setup: apt-get not found; install these packages by hand: ${missing[*]}" >&2
    exit 1
  fi
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null; then
      echo "setup: not root and sudo is missing; as root run: apt-get install ${missing[*]}" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "setup: Debian packages present"
fi

# matplotlib for scripts/plot.py (optional: plots are skipped without it). Quiet, only when
# missing, and a failure (offline machine) is only a note. MUONFORGE_NO_PIP=1 skips it.
if [[ -z ${MUONFORGE_NO_PIP:-} ]] && command -v python3 >/dev/null &&
   ! python3 -c "import matplotlib" >/dev/null 2>&1; then
  echo "setup: installing matplotlib for scripts/plot.py (pip, optional)"
  if ! python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 10 matplotlib >/dev/null 2>&1 &&
     ! python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 10 --user matplotlib >/dev/null 2>&1; then
    echo "setup: note: could not install matplotlib (offline?); scripts/plot.py needs it, the rest does not"
  fi
fi

build_dir=${MUONFORGE_BUILD_DIR:-build}
cuda=${MUONFORGE_CUDA:-AUTO}
jobs=${MUONFORGE_JOBS:-$(nproc)}

echo "setup: configuring $build_dir (MUONFORGE_CUDA=$cuda)"
cmake -S . -B "$build_dir" -DMUONFORGE_CUDA="$cuda" "$@"
echo "setup: building with $jobs jobs"
cmake --build "$build_dir" -j "$jobs"
echo "setup: done; binary at $build_dir/muonforge"
