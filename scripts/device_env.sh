# Sourced by scripts/gpu_check.sh and scripts/gpu_sweep.sh on the device machine: finds the
# muonforge binaries and the libraries they need. Needs REPO (the checkout) and DEV_WORK (an empty
# scratch folder); sets BIN_DIR, BIN, TESTS, and exports LD_LIBRARY_PATH, MF_BINARY,
# PYTHONUNBUFFERED and OMP_NUM_THREADS. Returns non-zero (with a message) when there are no
# binaries.
#
# The binaries come from .devbuild/devbuild.tar.xz (scripts/pack_device.sh) or, failing that,
# from build-device/ or build/ built on the device itself (see docs/gpu.md, "plan B").
DEV=""
if [ -f "$REPO/.devbuild/devbuild.tar.xz" ]; then
  DEV="$DEV_WORK/dev"
  mkdir -p "$DEV"
  if ! tar -C "$DEV" -xJf "$REPO/.devbuild/devbuild.tar.xz" 2>"$DEV_WORK/unpack.err"; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$REPO/.devbuild/devbuild.tar.xz" "$DEV" || { echo "device_env: cannot unpack the pack" >&2; return 1; }
  fi
  BIN_DIR="$DEV/build-device"
  # The binaries were compiled with absolute paths of the checkout they were built in (test
  # fixtures, scripts, the muonforge binary): make those paths lead here.
  SRC="$(sed -n 's/^source: *//p' "$REPO/.devbuild/MANIFEST.txt" 2>/dev/null | head -1)"
  if [ -n "$SRC" ] && [ "$SRC" != "$REPO" ] && [ ! -e "$SRC" ]; then
    mkdir -p "$(dirname "$SRC")" && ln -s "$REPO" "$SRC" && echo "device_env: linked $SRC -> $REPO"
  fi
  [ -e "$REPO/build-device" ] || ln -s "$BIN_DIR" "$REPO/build-device"
elif [ -x "$REPO/build-device/muonforge" ]; then
  BIN_DIR="$REPO/build-device"
elif [ -x "$REPO/build/muonforge" ]; then
  BIN_DIR="$REPO/build"
else
  echo "device_env: no binaries: carry .devbuild (scripts/pack_device.sh) or build here first" >&2
  return 1
fi
BIN="$BIN_DIR/muonforge"
TESTS="$BIN_DIR/tests"

# Order: the packed non-CUDA libraries, then the Python nvidia-* packages' folders, then the
# toolkit's. PyTorch loads its CUDA libraries from those packages (RUNPATH, which LD_LIBRARY_PATH
# overrides), so they go before the toolkit: an older toolkit copy of the same soname would
# otherwise be forced on torch. muonforge was built with the 13.0 toolkit and runs on any 13.x
# library of the same soname; cuDNN and NCCL exist only in the packages.
LIBS=""
[ -n "$DEV" ] && LIBS="$DEV/lib"
PYLIBS="$(python3 - <<'EOF' 2>/dev/null
import os
seen = []
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
for r in roots:
    for dp, dn, fn in sorted(os.walk(r)):
        if os.path.basename(dp) == "stubs":  # link-time stubs (a stub libcuda breaks everything)
            continue
        if any(f.startswith("lib") and ".so" in f for f in fn) and dp not in seen:
            seen.append(dp)
print(":".join(seen))
EOF
)"
[ -n "$PYLIBS" ] && LIBS="$LIBS:$PYLIBS"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 \
         /usr/local/nvidia/lib; do
  [ -d "$d" ] && LIBS="$LIBS:$d"
done
export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MF_BINARY="$BIN" PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# An NCCL set-up failure then says why in the log (the default is silent).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
