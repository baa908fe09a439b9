#!/usr/bin/env bash
# Build and run the standalone check of fn.objcrop.crop's GPU kernels (no DALI: a compiler and this repository).
#
#   bash csrc/check/run.sh                    # nvcc, the real GPU: every case (< 1 min on an H100/H200)
#   bash csrc/check/run.sh --sanitize         # + compute-sanitizer memcheck and racecheck on the small cases
#   bash csrc/check/run.sh --emulate          # g++ only: the same cases with the kernels emulated on the CPU
#   options: --out DIR (JSON and logs; default ./crop_check_out), --cases all|small|NAME,...,
#            --arch SM (nvcc -arch, default native)
# Exit status: 0 all cases passed (and no sanitizer finding), 1 a case failed, 3 a sanitizer finding,
# 2 a build error or bad usage.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DALI_SRC="$HERE/../dali"
EMULATE=0 SANITIZE=0 OUT_DIR="${PWD}/crop_check_out" CASES=all ARCH="${CROP_CHECK_ARCH:-native}"
while [ $# -gt 0 ]; do
  case "$1" in
    --emulate) EMULATE=1 ;;
    --sanitize) SANITIZE=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --cases) CASES="$2"; shift ;;
    --arch) ARCH="$2"; shift ;;
    *) echo "usage: bash csrc/check/run.sh [--emulate] [--sanitize] [--out DIR] [--cases C] [--arch SM]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
BIN="$OUT_DIR/bin"
mkdir -p "$BIN"
# the plugin's floating-point contract: no FMA contraction on either side, so the GPU can equal the CPU bit for bit
HOST_FLAGS=(-std=c++17 -O2 -ffp-contract=off -fno-fast-math)
if [ "$EMULATE" = 1 ]; then
  EXE="$BIN/crop_check_emu"
  "${CXX:-g++}" "${HOST_FLAGS[@]}" -I"$DALI_SRC" -I"$HERE" "$HERE/crop_check.cpp" "$HERE/crop_check_emu.cpp" \
    "$HERE/crop_emulate.cpp" -o "$EXE" || exit 2
else
  EXE="$BIN/crop_check"
  NVCC="${NVCC:-nvcc}"
  "$NVCC" -std=c++17 -O2 -fmad=false -Xcompiler=-ffp-contract=off,-fno-fast-math -arch="$ARCH" -I"$DALI_SRC" \
    -I"$HERE" "$HERE/crop_check.cpp" "$HERE/crop_check_gpu.cu" -o "$EXE" || exit 2
fi
"$EXE" --cases "$CASES" --json "$OUT_DIR/crop_check.json"
rc=$?
if [ "$SANITIZE" = 1 ] && [ "$EMULATE" = 0 ]; then
  for tool in memcheck racecheck; do
    if compute-sanitizer --tool "$tool" --error-exitcode 3 "$EXE" --cases small --json "$OUT_DIR/sanitize_$tool.json" \
        > "$OUT_DIR/sanitize_$tool.log" 2>&1; then
      echo "compute-sanitizer $tool: no finding ($(tail -n 1 "$OUT_DIR/sanitize_$tool.log"))"
    else
      src=$?
      echo "compute-sanitizer $tool: exit $src"; tail -n 30 "$OUT_DIR/sanitize_$tool.log"
      [ "$rc" = 0 ] && rc=3
    fi
  done
fi
exit "$rc"
