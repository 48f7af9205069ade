#!/usr/bin/env bash
# One device call: GPU tests of the pallas_mosaic backend, then the paper-shape benchmark.
# Logs go to $OUT (when set); the benchmark's table is printed last.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mosaic_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -rfE --durations=0 tests/test_mosaic_gpu.py -q ${PYTEST_ARGS:-} \
  -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40
timeout ${BENCH_TIMEOUT:-300} python3 -m pallas_kernels.mosaic_bench ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" | tail -60
