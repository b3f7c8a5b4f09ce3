#!/usr/bin/env bash
# Compiles every CUDA source listed in csrc/sources.txt with nvcc, so CUDA code
# that does not compile never lands, on a machine with neither a GPU nor a
# CUDA build of torch. Nothing is linked or run.
#
# The CPU torch wheel ships the c10/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in is put first on the
# include path (it only tells c10 that it is built as a shared library).
# The flags are those torch's BuildExtension would pass for setup.py's
# extension (.ci/torch_build_flags.py), so a standard or macro that torch adds
# (-std, -D__CUDA_NO_HALF_OPERATORS__) is checked too.
# Environment: QDEC_CI_CUDA_ARCH (default sm_90), NVCC (default nvcc), PYTHON;
# QDEC_TORCH_DIR, a torch package directory (its include/ and
# utils/cpp_extension.py) to check against instead of the installed torch's
# (.ci/check_torch211.sh passes torch 2.11's).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PY=${PYTHON:-python}
ARCH=${QDEC_CI_CUDA_ARCH:-sm_90}
mapfile -t SOURCES < <(sed -n '/^\[cuda\]/,/^\[/p' csrc/sources.txt | grep -v '^\[' | sed 's/#.*//' | awk 'NF')
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "no CUDA sources listed in csrc/sources.txt"
  exit 0
fi
command -v "$NVCC" >/dev/null || { echo "nvcc not found: cannot check CUDA sources" >&2; exit 1; }
TORCH=${QDEC_TORCH_DIR:-$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')}
mapfile -t FLAGS < <("$PY" .ci/torch_build_flags.py "$TORCH/utils/cpp_extension.py" nvcc)
[ ${#FLAGS[@]} -gt 0 ] || { echo "no nvcc flags from .ci/torch_build_flags.py" >&2; exit 1; }
echo "torch headers: $TORCH/include; flags: ${FLAGS[*]}"
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$SHIM/c10/cuda/impl/cuda_cmake_macros.h"
failed=0
for src in "${SOURCES[@]}"; do
  echo "nvcc -arch=$ARCH $src"
  if ! "$NVCC" "${FLAGS[@]}" -arch="$ARCH" -c "$src" -o "$SHIM/$(basename "$src").o" \
      -DQDEC_WITH_CUDA=1 -Xcompiler -fPIC \
      -I"$SHIM" -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" \
      -Icsrc/include -Icsrc 2> "$SHIM/log"; then
    grep -v "Wc++20-extensions\|bit-fields only available" "$SHIM/log" | grep -B2 -A6 "error" >&2 || cat "$SHIM/log" >&2
    failed=1
  fi
done
[ $failed -eq 0 ] && echo "all ${#SOURCES[@]} CUDA sources compile" || exit 1
