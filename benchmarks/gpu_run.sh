#!/usr/bin/env bash
# The one script for the GPU machine (torch 2.11 + CUDA 13, Python 3.12, nvcc,
# ninja, no internet), sized for one device call (600 s, 8 files back): builds
# the extension with its CUDA kernels in place, then runs the CUDA tests
# (pytest -m cuda), the GEMV and decode-layer benchmarks, the tuner, the
# Nsight Compute profile and compute-sanitizer memcheck, each under its own
# timeout (benchmarks/gpu_run.py says how). $OUT receives two files, rewritten
# after every step: summary.json and gpu_run.tar.gz (all logs and JSON).
#   git rev-parse --short HEAD > .qdec_commit     # here, before the call
#   OUT=/path bash benchmarks/gpu_run.sh          # there
#   QDEC_GPU_DRY_RUN=1 bash benchmarks/gpu_run.sh # plumbing only, any machine
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_run.py
