#!/usr/bin/env bash
# The one script for the GPU machine (torch 2.11 + CUDA 13, Python 3.12, nvcc,
# ninja, no internet): builds the extension with its CUDA kernels in place,
# runs the whole Python test suite (CUDA tests included), the benchmarks and the
# tuner, and writes logs and JSON under $OUT (default ./gpu_out).
#   OUT=/path bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
"$PY" - <<'PYEOF' > "$OUT/env.json"
import json, subprocess, torch
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "commit": commit or "unknown"}, indent=1))
PYEOF
status=0
QDEC_USE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
# No -x: device minutes are scarce, so one call should report every failure.
"$PY" -m pytest tests/python -q --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log" | tail -30 || status=1
# Decode-GEMV benchmark (qdec kernels vs cuBLAS fp16 and tinygemm int4).
"$PY" benchmarks/bench_gemv.py --device cuda --batches 1,2,4,8,16 \
  --out "$OUT/bench_gemv_cuda.json" > "$OUT/bench_gemv.log" 2>&1 || status=1
tail -40 "$OUT/bench_gemv.log"
# Tuner (k per projection for 2.5/5/10 % slowdown), then one Llama-3-8B decoder
# layer's linears: fp16, tinygemm int4, qdec W4/W3, W3 + 0.8 % compensation and
# the tuned k, side by side. The config also belongs under configs/ (commit it).
"$PY" -m qdec.cli tune --device cuda --no-progress --overwrite \
  --out "$OUT/tune_llama3-8b_w3g128r4.json" > "$OUT/tune.log" 2>&1 || status=1
tail -8 "$OUT/tune.log"
"$PY" benchmarks/bench_decode_layer.py --device cuda \
  $( [ -f "$OUT/tune_llama3-8b_w3g128r4.json" ] && echo --tune-config "$OUT/tune_llama3-8b_w3g128r4.json" ) \
  --out "$OUT/bench_decode_layer_cuda.json" > "$OUT/bench_decode_layer.log" 2>&1 || status=1
tail -15 "$OUT/bench_decode_layer.log"
# Hardware counters of each decode kernel (what bounds it: DRAM, issue or
# latency), to explain any gap to a target. --clock-control none: leave the
# clocks as they are (device METHOD.md).
if command -v ncu >/dev/null; then
  ncu --clock-control none --profile-from-start off --print-units base --csv \
    --metrics "$("$PY" benchmarks/profile_gemv.py metrics)" --log-file "$OUT/ncu_gemv.csv" \
    "$PY" benchmarks/profile_gemv.py launch --manifest "$OUT/ncu_manifest.json" \
    > "$OUT/ncu.log" 2>&1 &&
  "$PY" benchmarks/profile_gemv.py summarize "$OUT/ncu_gemv.csv" "$OUT/ncu_manifest.json" \
    --out "$OUT/profile_gemv.json" >> "$OUT/ncu.log" 2>&1 || status=1
  tail -20 "$OUT/ncu.log"
fi
# memcheck slows kernels by 10-100x: the small-shape CUDA tests only, and a
# time cap so the device call's 600 s are not spent here.
if command -v compute-sanitizer >/dev/null; then
  timeout 180 compute-sanitizer --tool memcheck "$PY" -m pytest tests/python/test_cuda_ops.py \
    -q -x -k "not 14336 and not 4096" > "$OUT/memcheck.log" 2>&1 || status=1
  tail -5 "$OUT/memcheck.log"
fi
exit $status
