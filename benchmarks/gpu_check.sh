#!/usr/bin/env bash
# One device call: GPU tests against the float32 reference, then the kernel (and optionally e2e)
# benchmarks beside cuDNN dense. Full logs and JSON go to $OUT (default ./out); a short table is
# printed last.
#   bash benchmarks/gpu_check.sh [tests] [kernel] [e2e]     (default: tests kernel)
# Env: BENCH_ARGS (extra kernel_bench flags), PYTEST_K (a pytest -k expression), TEST_TIMEOUT.
# The whole GPU test set compiles many Mosaic kernels (40-65 s a case): with the 10-minute device
# limit, run it on its own (`gpu_check.sh tests`) or pick cases with PYTEST_K.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
steps=${*:-tests kernel}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
rc=0
for step in $steps; do
  case $step in
    tests)
      timeout ${TEST_TIMEOUT:-540} $PY -m pytest -q -x -m gpu tests ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -25
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    kernel)
      $PY -m benchmarks.kernel_bench --out "$OUT" ${BENCH_ARGS:-} > "$OUT/kernel_bench.log" 2>&1
      [ $? = 0 ] || rc=1 ;;
    e2e)
      $PY -m benchmarks.e2e_bench --out "$OUT" ${E2E_ARGS:-} > "$OUT/e2e_bench.log" 2>&1
      [ $? = 0 ] || rc=1
      tail -20 "$OUT/e2e_bench.log" ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
echo "==== summary ===="
grep -E "passed|failed|error" "$OUT/gpu_tests.log" 2>/dev/null | tail -3
[ -f "$OUT/kernel_bench.log" ] && sed -n '/^backend /,$p' "$OUT/kernel_bench.log"
exit $rc
