#!/usr/bin/env bash
# Compiles every C++ and CUDA source of the extension against torch 2.11's
# headers, with the flags torch 2.11's BuildExtension would pass (the GPU
# machine has torch 2.11 + CUDA 13 and Python 3.12; CI's own torch is 2.13).
# Torch 2.11 adds -std=c++17 unless the extension names a standard, and these
# sources are C++20: setup.py names it, and this check fails if that stops.
#
# Only the wheel's include/ and utils/cpp_extension.py are used: nothing of
# torch 2.11 is installed or imported. PyPI's linux wheel is the CUDA build
# (~530 MB download, CPython 3.12 as on the GPU machine; headers do not differ
# between Python versions). Nothing is linked or run.
# Environment: QDEC_TORCH211_WHEEL, a wheel already on disk (skips the
# download); PYTHON (default python; needs pip); plus check_cuda.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

WHEEL=${QDEC_TORCH211_WHEEL:-}
if [ -z "$WHEEL" ]; then
  "$PY" -m pip download -q torch==2.11.0 --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d "$WORK/wheel"
  WHEEL=$(ls "$WORK"/wheel/torch-2.11.0-*.whl)
fi
# The package directory layout check_cuda.sh expects: torch/include, torch/utils.
"$PY" - "$WHEEL" "$WORK" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if n.startswith("torch/include/")
             or n in ("torch/utils/cpp_extension.py", "torch/version.py")]
    z.extractall(dest, names)
print(f"extracted {len(names)} files of {wheel.rsplit('/', 1)[-1]}")
PYEOF
TORCH=$WORK/torch
grep -m1 '^__version__' "$TORCH/version.py"

mapfile -t CXXFLAGS < <("$PY" .ci/torch_build_flags.py "$TORCH/utils/cpp_extension.py" cxx)
[ ${#CXXFLAGS[@]} -gt 0 ] || { echo "no C++ flags from .ci/torch_build_flags.py" >&2; exit 1; }
echo "C++ flags of torch 2.11's BuildExtension: ${CXXFLAGS[*]}"
mapfile -t CPU_SOURCES < <(sed -n '/^\[cpu\]/,/^\[/p' csrc/sources.txt | grep -v '^\[' | sed 's/#.*//' | awk 'NF')
failed=0
for src in "${CPU_SOURCES[@]}"; do
  echo "c++ -fsyntax-only $src"
  # Syntax and template instantiation are what depend on the headers; code
  # generation does not, so it is skipped to keep CI short.
  "${CXX:-c++}" "${CXXFLAGS[@]}" -fsyntax-only -fPIC "$src" \
    -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" -Icsrc/include -Icsrc || failed=1
done
[ $failed -eq 0 ] && echo "all ${#CPU_SOURCES[@]} C++ sources compile against torch 2.11" \
  || { echo "C++ sources fail against torch 2.11" >&2; exit 1; }
QDEC_TORCH_DIR=$TORCH PYTHON="$PY" bash .ci/check_cuda.sh
