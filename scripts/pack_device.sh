#!/usr/bin/env bash
# Build muonforge for the lent H200 (sm_90a only) HERE, where there is no GPU, and pack what the
# device machine needs into .devbuild/ (git-ignored), which a device call carries:
#
#   .devbuild/devbuild.tar.xz   build-device/muonforge, build-device/tests/<[gpu] tests>, lib/
#   .devbuild/MANIFEST.txt      commit, date, files and sizes, libraries left to the device
#
# The libraries packed are the non-CUDA shared libraries the binaries need (ldd): spdlog, fmt,
# OpenBLAS (+ gfortran, quadmath), gomp, gloo, ... CUDA's own (libcuda, libcudart, libcublas*,
# libcudnn*, libnccl*, nvrtc, nvJitLink) come from the device (its CUDA toolkit and the Python
# nvidia-* packages; scripts/gpu_check.sh finds them). glibc, libstdc++ and libgcc_s are the
# device's own (this Debian 12 build needs glibc >= 2.34 and GLIBCXX 3.4.30; Ubuntu 24.04 has more).
#
# usage: scripts/pack_device.sh [--no-build] [--jobs N]
#        scripts/pack_device.sh --status
#        scripts/pack_device.sh --sweep-data [SHARED_DATA_DIR]
#   --status: say whether .devbuild/ was packed from the sources now checked out (what the binaries
#   are built from: src, kernels, tests, third_party, CMakeLists.txt); exit 0 when current, 1 when
#   stale or missing (then run this script without options)
#   --sweep-data: only copy what scripts/gpu_sweep.sh needs into .devdata/ (git-ignored): the
#   Gutenberg books (train-150MB.txt.xz, val.txt.xz) and the GPT-2 tokenizer files from
#   ../shared/data (about 45 MB; with .devbuild it stays under the 64 MiB carry limit)
#   env BUILD_DIR (default build-device), MAX_MIB (default 56: the carry limit is 64 MiB together
#   with the working tree)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${BUILD_DIR:-$REPO/build-device}"
OUTDIR="$REPO/.devbuild"
MAX_MIB="${MAX_MIB:-56}"
JOBS=2
BUILD_IT=1
while [ $# -gt 0 ]; do
  case "$1" in
    --sweep-data)
      SHARED="${2:-$REPO/../shared/data}"
      for f in gutenberg/train-150MB.txt.xz gutenberg/val.txt.xz tokenizers/gpt2/encoder.json \
               tokenizers/gpt2/vocab.bpe; do
        [ -f "$SHARED/$f" ] || { echo "pack_device: $SHARED/$f not found (pass the shared data folder)" >&2; exit 1; }
      done
      rm -rf "$REPO/.devdata"
      mkdir -p "$REPO/.devdata/gpt2"
      cp "$SHARED/gutenberg/train-150MB.txt.xz" "$SHARED/gutenberg/val.txt.xz" "$REPO/.devdata/"
      cp "$SHARED/tokenizers/gpt2/encoder.json" "$SHARED/tokenizers/gpt2/vocab.bpe" "$REPO/.devdata/gpt2/"
      chmod -R u+w "$REPO/.devdata"
      echo "pack_device: .devdata/ $(du -sm "$REPO/.devdata" | cut -f1) MiB," \
           ".devbuild/ $(du -sm "$REPO/.devbuild" 2>/dev/null | cut -f1) MiB (carry limit 64 MiB with the tree)"
      exit 0 ;;
    --status)
      M="$REPO/.devbuild/MANIFEST.txt"
      [ -f "$M" ] && [ -f "$REPO/.devbuild/devbuild.tar.xz" ] || { echo "pack_device: no .devbuild/ pack"; exit 1; }
      C=$(sed -n 's/^commit: \([0-9a-f]*\).*/\1/p' "$M")
      DIRTY=$(grep -c '^commit: .*uncommitted' "$M" || true)
      PATHS=(src kernels tests third_party CMakeLists.txt)
      CHANGED=$( (git -C "$REPO" diff --name-only "$C" -- "${PATHS[@]}" 2>/dev/null || echo "(commit $C unknown)") | sort -u)
      if [ "$DIRTY" = 0 ] && [ -z "$CHANGED" ]; then
        echo "pack_device: .devbuild/ is current (packed at ${C:0:12}, $(sed -n 's/^date: *//p' "$M"))"; exit 0
      fi
      echo "pack_device: .devbuild/ is stale (packed at ${C:0:12}$([ "$DIRTY" != 0 ] && echo ' with uncommitted changes'));" \
           "changed since: $(echo "$CHANGED" | grep -c .) file(s)"
      echo "$CHANGED" | head -20 | sed 's/^/  /'
      exit 1 ;;
    --no-build) BUILD_IT=0 ;;
    --jobs) JOBS="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "pack_device.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

# Test executables with [gpu] cases (the only ones the device needs to run).
GPU_TESTS=()
for f in "$REPO"/tests/test_*.cpp; do
  if grep -q '\[gpu\]' "$f"; then GPU_TESTS+=("$(basename "${f%.cpp}")"); fi
done
echo "pack_device: [gpu] tests: ${GPU_TESTS[*]}"

if [ "$BUILD_IT" = 1 ]; then
  command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || {
    echo "pack_device: no nvcc here: cannot build the CUDA backend" >&2; exit 1; }
  cmake -S "$REPO" -B "$BUILD" -DMUONFORGE_CUDA=ON -DMUONFORGE_CUDA_ARCHS=90a \
        -DCMAKE_BUILD_TYPE=Release >"$REPO/.devbuild.cmake.log" 2>&1 || {
    cat "$REPO/.devbuild.cmake.log" >&2; exit 1; }
  rm -f "$REPO/.devbuild.cmake.log"
  cmake --build "$BUILD" --target muonforge "${GPU_TESTS[@]}" -j"$JOBS"
fi

for t in muonforge; do [ -x "$BUILD/$t" ] || { echo "pack_device: $BUILD/$t missing" >&2; exit 1; }; done
grep -q 'MUONFORGE_CUDA_ARCHS:STRING=90a$' "$BUILD/CMakeCache.txt" || \
  echo "pack_device: warning: $BUILD was not configured with MUONFORGE_CUDA_ARCHS=90a" >&2

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/build-device/tests" "$STAGE/lib"
cp "$BUILD/muonforge" "$STAGE/build-device/"
for t in "${GPU_TESTS[@]}"; do
  if [ -x "$BUILD/tests/$t" ]; then cp "$BUILD/tests/$t" "$STAGE/build-device/tests/"
  else echo "pack_device: warning: $BUILD/tests/$t not built" >&2; fi
done
strip --strip-unneeded "$STAGE"/build-device/muonforge "$STAGE"/build-device/tests/* 2>/dev/null || true

# Non-CUDA shared libraries, by their soname, dereferenced.
LEFT="$STAGE/left.txt"
: >"$LEFT"
for bin in "$STAGE"/build-device/muonforge "$STAGE"/build-device/tests/*; do
  ldd "$bin" | awk '/=>/ {print $1, $3}'
done | sort -u | while read -r soname path; do
  case "$soname" in
    linux-vdso*|ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libutil.so*|\
    libstdc++.so*|libgcc_s.so*)
      ;;  # the device's own
    libcuda.so*|libcudart.so*|libcublas*|libcudnn*|libnccl*|libnvrtc*|libnvJitLink*|libcufft*|\
    libcurand*|libcusolver*|libcusparse*|libnvidia*)
      echo "$soname" >>"$LEFT" ;;
    *)
      if [ "$path" = "not" ] || [ ! -e "$path" ]; then
        echo "pack_device: $soname not found here (ldd): cannot pack it" >&2; exit 1
      fi
      [ -e "$STAGE/lib/$soname" ] || cp -L "$path" "$STAGE/lib/$soname" ;;
  esac
done
strip --strip-unneeded "$STAGE"/lib/* 2>/dev/null || true
chmod u+w "$STAGE"/lib/* 2>/dev/null || true

mkdir -p "$OUTDIR"
rm -f "$OUTDIR/devbuild.tar.xz" "$OUTDIR/MANIFEST.txt"
RAW=$(du -sb "$STAGE/build-device" "$STAGE/lib" | awk '{s+=$1} END {print s}')
tar -C "$STAGE" -cf - build-device lib | xz -T2 -6 >"$OUTDIR/devbuild.tar.xz"
{
  echo "muonforge device pack"
  echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- src kernels tests third_party CMakeLists.txt 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "source: $REPO"
  echo "date:   $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "built:  $BUILD (sm_90a), $(/usr/local/cuda/bin/nvcc --version 2>/dev/null | tail -2 | head -1)"
  echo "host:   $(. /etc/os-release; echo "$PRETTY_NAME"), $(ldd --version | head -1)"
  echo "left to the device (CUDA libraries): $(sort -u "$LEFT" | tr '\n' ' ')"
  echo "files (uncompressed bytes):"
  (cd "$STAGE" && find build-device lib -type f -printf '  %10s %p\n' | sort -k2)
  echo "uncompressed total: $RAW bytes"
} >"$OUTDIR/MANIFEST.txt"
SIZE=$(stat -c %s "$OUTDIR/devbuild.tar.xz")
cat "$OUTDIR/MANIFEST.txt"
awk -v s="$SIZE" -v r="$RAW" 'BEGIN {printf "pack_device: .devbuild/devbuild.tar.xz = %.1f MiB (uncompressed %.1f MiB)\n", s / 1048576, r / 1048576}'
if [ "$SIZE" -gt $((MAX_MIB * 1048576)) ]; then
  echo "pack_device: over the ${MAX_MIB} MiB budget: the device call cannot carry it" >&2
  exit 1
fi
echo "pack_device: carry [\".devbuild\"] and run: bash scripts/gpu_check.sh \$OUT --part 1 (see docs/gpu.md)"
