#!/usr/bin/env bash
# The GPU tests against the float32 reference, then the benchmarks, in one run. Full logs and
# JSON go to the output folder; a short table of each step is printed last.
#   bash benchmarks/gpu_check.sh [--out DIR] [tests] [kernel] [shapes] [features] [mosaic] [e2e]
#        [compile] [ncu] [fp8] [options] [pending] [fp8kernels] [trace]
# (default steps: tests kernel; default DIR: ./out; GPU_CHECK_COMPILE=1 adds compile at the end)
#   tests   pytest -m gpu tests/ on PYTEST_WORKERS xdist workers (default 4; 0: one process):
#           each GPU test case compiles Mosaic kernels for 30-50 s, so the workers overlap them
#   kernel  python -m benchmarks.kernel_bench (+ BENCH_ARGS) under benchmarks.tools.clock_log
#           (kernel_clock.csv; kernel_clocks.txt: the SM clock per row): the paper shape
#           beside cuDNN dense, with the 8-bit forwards (precision "qk_int8", "int8", "fp8")
#           beside the bf16 one. BASELINE=<commit> also runs the kernel bench of that commit
#           (a git worktree outside DIR), alternating with this tree's, BASELINE_ROUNDS times
#           (default 2), so a change is measured against its base in one run
#           (kernel_bench_base<r>.* beside kernel_bench_<r>.*); a base before 4c10570 warms up
#           by call count only (no 1 s GPU warm-up): give both the same warm-up with
#           BENCH_ARGS="--warmup 40 ..." (about a second at the paper shape)
#   shapes  python -m benchmarks.shapes_bench (+ SHAPES_ARGS) under benchmarks.tools.clock_log
#           (shapes_clock.csv, shapes_clocks.txt): real-model shapes beside cuDNN,
#           with 8-bit forward rows per shape ("qk_int8", "int8", "fp8"); SHAPES_ARGS="--shapes
#           beyond" runs the shapes no model row has (head_dim 64, short key lists, 128-token
#           tiles)
#   features python -m benchmarks.features_bench (+ FEATURES_ARGS): text_lengths, text first,
#           GQA, causal time and the row-major entry point beside the plain call
#   mosaic  python -m benchmarks.kernels.mosaic (+ MOSAIC_ARGS): the Hopper kernels by section,
#           once per shape of MOSAIC_SHAPES (default: paper), e.g. the mask-path comparison:
#           MOSAIC_SHAPES="paper wan14b_720p hunyuan_544p image_2048" MOSAIC_ARGS="--sections fwd
#           --fwd-configs default,masked,partial --rounds 1"
#   e2e     python -m benchmarks.e2e_bench (+ E2E_ARGS): one DiT denoising step, full vs STA
#   compile python -m benchmarks.compile_bench (+ COMPILE_ARGS): first-call trace/lower/compile
#           times of jit(fwd) and jit(grad) in fresh processes, without and with the persistent
#           cache; then python -m benchmarks.tools.mosaic_compile_times (+ COMPILE_TIMES_ARGS):
#           each Mosaic GPU kernel's compile alone and ptxas alone (about 3 minutes in all)
#   ncu     Nsight Compute on one op call per shape of NCU_SHAPES (default: paper), the Mosaic
#           GPU kernels only: python -m benchmarks.tools.profile_step (+ NCU_ARGS, e.g.
#           "--mode fwd --heads 8 --set overlap_exp=True"), its report's details and SASS
#           source pages as CSV, and python -m benchmarks.tools.ncu_summary of them
#           (ncu_<shape>[_NCU_TAG].txt); NCU_KERNELS (default regex:mosaic) picks other
#           kernels, e.g. every kernel of the 8-bit forward, its quantization passes too:
#           NCU_KERNELS=regex:. NCU_ARGS="--mode fwd --heads 24 --precision fp8" NCU_TAG=fp8
#           NCU_METRICS (a comma list of metric names) adds those, e.g. the pipes' utilization:
#           sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
#   fp8     python -m benchmarks.fp8_bench (+ FP8_ARGS): the 8-bit forwards at the paper shape
#           beside the bf16 forward and cuDNN dense, with their errors; then
#           python -m benchmarks.fp8_sample (+ FP8_SAMPLE_ARGS): the DiT's sample with 8-bit
#           attention beside bf16 and float32
#   pending what is to be timed next, kernels alone under the clock log
#           (pending_clocks_<shape>.txt: timed SM clock and cycles per row): forward configs
#           PENDING_FWD (default: default,window+long4) and fused backward variants
#           PENDING_VARIANTS (default: fused,fused_long4,fused_window: the work items launched
#           with only lists over 4x the median first, in the sequence's order and in the
#           window's, MosaicConfig.launch_order and long_items_first), PENDING_ROUNDS (default
#           3) interleaved rounds at PENDING_SHAPES (default: wan14b_720p_w311 wan14b_720p
#           hunyuan_544p), each under PENDING_TIMEOUT seconds (default 290)
#   fp8kernels the 8-bit forwards' options as kernels alone in PENDING_ROUNDS (default 3)
#           interleaved rounds: the exponentials before the wait for P V (ox:
#           MosaicConfig.overlap_exp; noab+ox: without Pallas's automatic barriers too) and
#           192-row query blocks on three compute warpgroups (wg3) for qk_int8 and fp8,
#           beside their defaults and the bf16 forward kernel, at each shape of
#           FP8KERNELS_SHAPES (default: paper hunyuan_544p; python -m benchmarks.fp8_bench
#           --kernels-only --rounds
#           PENDING_ROUNDS --no-cudnn --options FP8_OPTIONS --option-recipes FP8_OPTION_RECIPES;
#           defaults ox,noab+ox,wg3 and qk_int8,fp8): on 2026-12-07 Nsight Compute put the
#           8-bit step at about the sum of its tensor and exponential time, and the ping-pong
#           lost; ox was timed only through the op before, wg3 never
#   options the kernel options that are off until timed (MosaicConfig.overlap_exp, auto_barriers,
#           rescale_under_qk, persistent, exp2_fma_columns) beside the defaults:
#           python -m benchmarks.kernels.mosaic at each shape of OPTIONS_SHAPES (default: paper
#           hunyuan_544p; + OPTIONS_ARGS), the forward configs default,noab,ox+noab,ox+noab+rq,
#           pers,pers+ox+noab+rq, kv192 and kv192+ox+noab (192-key steps: the paper shape
#           only, elsewhere an error row says why), together (each item's masked steps in
#           one key loop with the others; at the paper shape nothing is masked and it runs
#           the default), fma32 and fma32+ox+noab (32 of a step's exponentials on the FMA
#           pipe) and the backward variants fused, fused_late (its lse and dQ row loaded
#           where they are used), fused_2026_12_04 (the fused backward before its options
#           became defaults), lean (every option, forward too), split, split_lean (kernels
#           alone, then the op's fwd+bwd in interleaved rounds); then
#           python -m benchmarks.fp8_bench --options noab,noab+ox,preg,noab+preg,sb,fma32
#           (fp8_options.log), and at Wan-14B 720p --options together,noab+ox
#           (fp8_options_wan14b.log)
#   trace   python -m benchmarks.tools.load_trace under benchmarks.tools.clock_log at each shape
#           of TRACE_SHAPES (default: paper wan14b_720p): the op's forward call by call
#           from idle for 8 s, then cuDNN dense for 4 s, then the forward again for 8 s
#           (trace_<shape>.json, trace_clock_<shape>.csv): how long the GPU takes to reach
#           the speed it keeps, which the benches' warm-up must cover
# Env: PYTEST_K (a pytest -k expression), PYTEST_WORKERS, TEST_TIMEOUT (seconds, default 900),
# TEST_SHARD ("i/n": the i-th of n disjoint shares of the tests, JSTA_TEST_SHARD in
# tests/conftest.py; the whole GPU suite is compile-bound: 99 of its 100 tests ran in 540 s on
# 14 workers on 2026-12-05, before each padding test ran both kinds of garbage through one
# compiled program instead of compiling it twice),
# PY (python interpreter, default python3).
set -u
dest=$PWD/out
if [ "${1:-}" = "--out" ]; then dest=$2; shift 2; fi
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)   # absolute: the baseline's kernel bench runs from another folder
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # several test workers share the GPU
PY=${PY:-python3}
steps=${*:-tests kernel}
if [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && [[ " $steps " != *" compile "* ]]; then
  steps="$steps compile"
fi
workers=${PYTEST_WORKERS:-4}
# A bench under benchmarks.tools.clock_log (SM clock, power and throttle reasons every 50 ms),
# and the clocks per timed row (a median depends on the clock sustained load leaves).
clocked() { local log=$1; shift; $PY -m benchmarks.tools.clock_log run "$log" -- "$@"; }
clock_summary() {
  [ -s "$1" ] && [ -f "$2" ] && $PY -m benchmarks.tools.clock_log summary "$1" "$2" > "$3" 2>&1
  return 0
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader | tee "$dest/gpu.txt"
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$dest/gpu.txt"
rc=0
for step in $steps; do
  case $step in
    tests)
      xdist=""
      [ "$workers" != 0 ] && xdist="-n $workers"
      # Failures are written to failures.log as they happen (the summary comes only at the end).
      JSTA_TEST_SHARD=${TEST_SHARD:-} JSTA_FAILURE_LOG="$dest/failures.log" timeout ${TEST_TIMEOUT:-900} $PY -m pytest -q -m gpu \
        $xdist -p benchmarks.tools.live_failures -p no:benchmark --durations=10 tests \
        ${PYTEST_K:+-k "$PYTEST_K"} > "$dest/gpu_tests.log" 2>&1
      [ $? = 0 ] || rc=1
      tail -25 "$dest/gpu_tests.log" ;;
    kernel)
      if [ -z "${BASELINE:-}" ]; then
        clocked "$dest/kernel_clock.csv" $PY -m benchmarks.kernel_bench --out "$dest" \
          ${BENCH_ARGS:-} > "$dest/kernel_bench.log" 2>&1
        [ $? = 0 ] || rc=1
        clock_summary "$dest/kernel_clock.csv" "$dest/kernel_bench.json" "$dest/kernel_clocks.txt"
      else
        base=${TMPDIR:-/tmp}/jsta_baseline_$BASELINE
        [ -d "$base" ] || git worktree add -f --detach "$base" "$BASELINE" > /dev/null || rc=1
        for r in $(seq 1 "${BASELINE_ROUNDS:-2}"); do
          (cd "$base" && PYTHONPATH=$base $PY -m benchmarks.kernel_bench --out "$dest" \
            --tag "kernel_bench_base$r" ${BENCH_ARGS:-} > "$dest/kernel_bench_base$r.log" 2>&1) || rc=1
          $PY -m benchmarks.kernel_bench --out "$dest" --tag "kernel_bench_$r" ${BENCH_ARGS:-} \
            > "$dest/kernel_bench_$r.log" 2>&1 || rc=1
        done
      fi ;;
    shapes)
      timeout ${SHAPES_TIMEOUT:-900} $PY -m benchmarks.tools.clock_log run \
        "$dest/shapes_clock.csv" -- $PY -m benchmarks.shapes_bench --out "$dest" ${SHAPES_ARGS:-} \
        > "$dest/shapes_bench.log" 2>&1
      [ $? = 0 ] || rc=1
      clock_summary "$dest/shapes_clock.csv" "$dest/shapes_bench.json" "$dest/shapes_clocks.txt" ;;
    features)
      timeout ${FEATURES_TIMEOUT:-600} $PY -m benchmarks.features_bench --out "$dest" \
        ${FEATURES_ARGS:-} > "$dest/features_bench.log" 2>&1
      [ $? = 0 ] || rc=1 ;;
    mosaic)
      : > "$dest/mosaic.log"
      for shape in ${MOSAIC_SHAPES:-paper}; do
        echo "==== $shape" >> "$dest/mosaic.log"
        $PY -m benchmarks.kernels.mosaic --shape "$shape" --out "$dest" --tag "mosaic_$shape" \
          ${MOSAIC_ARGS:-} >> "$dest/mosaic.log" 2>&1
        [ $? = 0 ] || rc=1
      done ;;
    e2e)
      $PY -m benchmarks.e2e_bench --out "$dest" ${E2E_ARGS:-} > "$dest/e2e_bench.log" 2>&1
      [ $? = 0 ] || rc=1 ;;
    compile)
      timeout ${COMPILE_TIMEOUT:-900} $PY -m benchmarks.compile_bench --out "$dest" \
        ${COMPILE_ARGS:-} > "$dest/compile_bench.log" 2>&1
      [ $? = 0 ] || rc=1
      timeout ${COMPILE_TIMEOUT:-900} $PY -m benchmarks.tools.mosaic_compile_times --out "$dest" \
        ${COMPILE_TIMES_ARGS:-} > "$dest/mosaic_compile_times.log" 2>&1
      [ $? = 0 ] || rc=1 ;;
    ncu)
      for shape in ${NCU_SHAPES:-paper}; do
        rep="$dest/ncu_$shape${NCU_TAG:+_$NCU_TAG}"
        timeout ${NCU_TIMEOUT:-600} ncu --clock-control none --profile-from-start off \
          --kernel-name "${NCU_KERNELS:-regex:mosaic}" --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section SchedulerStats --section WarpStateStats --section LaunchStats \
          --section Occupancy --section SourceCounters --section ComputeWorkloadAnalysis \
          ${NCU_METRICS:+--metrics "$NCU_METRICS"} -f -o "$rep" \
          $PY -m benchmarks.tools.profile_step --shape "$shape" ${NCU_ARGS:-} > "$rep.log" 2>&1 || rc=1
        if [ -f "$rep.ncu-rep" ]; then
          ncu --import "$rep.ncu-rep" --page details --csv > "${rep}_details.csv" 2>> "$rep.log"
          ncu --import "$rep.ncu-rep" --page source --csv --print-source sass \
            > "${rep}_source.csv" 2>> "$rep.log"
          $PY -m benchmarks.tools.ncu_summary "${rep}_details.csv" "${rep}_source.csv" > "$rep.txt" \
            2>> "$rep.log" || rc=1
        fi
      done ;;
    fp8)
      timeout ${FP8_TIMEOUT:-600} $PY -m benchmarks.fp8_bench --out "$dest" ${FP8_ARGS:-} \
        > "$dest/fp8_bench.log" 2>&1
      [ $? = 0 ] || rc=1
      timeout ${FP8_TIMEOUT:-600} $PY -m benchmarks.fp8_sample --out "$dest" \
        ${FP8_SAMPLE_ARGS:-} > "$dest/fp8_sample.log" 2>&1
      [ $? = 0 ] || rc=1 ;;
    pending)
      # What is to be timed next, with the clock and the cycles of the timed calls (under the
      # 700 W cap a change can save energy without a cycle, or cycles without energy:
      # docs/PERFORMANCE.md, "How it is measured"): the forward configs PENDING_FWD (empty:
      # the bwd section alone) and the fused backward variants PENDING_VARIANTS,
      # kernels alone, PENDING_ROUNDS interleaved rounds, at each shape of PENDING_SHAPES,
      # under the clock log (pending_clocks_<shape>.txt: timed SM clock, power and M cycles).
      : > "$dest/pending.log"
      pending_fwd=${PENDING_FWD-default,window+long4}
      for shape in ${PENDING_SHAPES:-wan14b_720p_w311 wan14b_720p hunyuan_544p}; do
        echo "==== $shape" >> "$dest/pending.log"
        clocked "$dest/pending_clock_$shape.csv" timeout ${PENDING_TIMEOUT:-290} \
          $PY -m benchmarks.kernels.mosaic --shape "$shape" --out "$dest" \
          --tag "pending_$shape" --sections "${pending_fwd:+fwd,}bwd" \
          --fwd-configs "${pending_fwd:-default}" \
          --variants "${PENDING_VARIANTS:-fused,fused_long4,fused_window}" \
          --rounds "${PENDING_ROUNDS:-3}" >> "$dest/pending.log" 2>&1
        [ $? = 0 ] || rc=1
        clock_summary "$dest/pending_clock_$shape.csv" "$dest/pending_$shape.json" \
          "$dest/pending_clocks_$shape.txt"
      done ;;
    trace)
      : > "$dest/trace.log"
      for shape in ${TRACE_SHAPES:-paper wan14b_720p}; do
        timeout 120 $PY -m benchmarks.tools.clock_log run "$dest/trace_clock_$shape.csv" -- \
          $PY -m benchmarks.tools.load_trace --shape "$shape" --out "$dest/trace_$shape.json" \
          ${TRACE_ARGS:-} >> "$dest/trace.log" 2>&1 || rc=1
      done ;;
    fp8kernels)
      : > "$dest/fp8kernels.log"
      for shape in ${FP8KERNELS_SHAPES:-paper hunyuan_544p}; do
        echo "==== $shape" >> "$dest/fp8kernels.log"
        timeout 240 $PY -m benchmarks.fp8_bench --shape "$shape" --out "$dest/fp8kernels_$shape" \
          --kernels-only --rounds "${PENDING_ROUNDS:-3}" --no-cudnn \
          --options "${FP8_OPTIONS:-ox,noab+ox,wg3}" --option-recipes "${FP8_OPTION_RECIPES:-qk_int8,fp8}" \
          >> "$dest/fp8kernels.log" 2>&1 || rc=1
      done ;;
    options)
      : > "$dest/options.log"
      for shape in ${OPTIONS_SHAPES:-paper hunyuan_544p}; do
        echo "==== $shape" >> "$dest/options.log"
        $PY -m benchmarks.kernels.mosaic --shape "$shape" --out "$dest" --tag "options_$shape" \
          --sections fwd,bwd,op --fwd-configs default,noab,ox+noab,ox+noab+rq,pers,pers+ox+noab+rq,kv192,kv192+ox+noab,together,fma32,fma32+ox+noab \
          --variants fused,fused_late,fused_2026_12_04,lean,split,split_lean --rounds 2 ${OPTIONS_ARGS:-} \
          >> "$dest/options.log" 2>&1
        [ $? = 0 ] || rc=1
      done
      timeout ${FP8_TIMEOUT:-600} $PY -m benchmarks.fp8_bench --out "$dest/fp8_options" --no-cudnn \
        --options noab,noab+ox,preg,noab+preg,sb,fma32 > "$dest/fp8_options.log" 2>&1
      [ $? = 0 ] || rc=1
      # The 8-bit forward's masked steps in one loop with the others, at a model shape.
      timeout ${FP8_TIMEOUT:-600} $PY -m benchmarks.fp8_bench --shape wan14b_720p \
        --out "$dest/fp8_options_wan14b" --no-cudnn --options together,noab+ox \
        > "$dest/fp8_options_wan14b.log" 2>&1
      [ $? = 0 ] || rc=1 ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
echo "==== summary ===="
[ -f "$dest/gpu_tests.log" ] && grep -E "passed|failed|error" "$dest/gpu_tests.log" | tail -3
[ -f "$dest/failures.log" ] && grep "^==== " "$dest/failures.log"
for f in "$dest"/kernel_bench.log "$dest"/kernel_bench_base*.log "$dest"/kernel_bench_[0-9]*.log; do
  [ -f "$f" ] && { echo "== ${f##*/}"; sed -n '/^backend /,$p' "$f"; }
done
for f in "$dest"/ncu_*.txt; do
  [ -f "$f" ] && { echo "== ${f##*/}"; grep -E "^## |Duration|Throughput|L2 Hit|Registers|stall_" "$f" | head -60; }
done
for f in "$dest"/kernel_clocks.txt "$dest"/shapes_clocks.txt "$dest"/pending_clocks_*.txt; do
  [ -f "$f" ] && { echo "== ${f##*/}"; head -40 "$f"; }
done
[ -f "$dest/shapes_bench.log" ] && sed -n '/^shape  /,$p' "$dest/shapes_bench.log"
[ -f "$dest/features_bench.log" ] && sed -n '/^variant /,$p' "$dest/features_bench.log"
[ -f "$dest/mosaic.log" ] && grep -E '^(==== |\| )' "$dest/mosaic.log"
[ -f "$dest/options.log" ] && grep -E '^(==== |\| )' "$dest/options.log"
[ -f "$dest/pending.log" ] && awk '/^==== /{print} /^\| /{print} /^variant /{t=1}
  t&&/^$/{t=0} t{print}' "$dest/pending.log"
[ -f "$dest/fp8kernels.log" ] && awk '/^==== /{print} /^variant /{t=1} t&&/^$/{t=0} t{print}' \
  "$dest/fp8kernels.log"
[ -f "$dest/trace.log" ] && grep -E '^(\| |[a-z0-9_]+: batch)' "$dest/trace.log"
[ -f "$dest/fp8_options.log" ] && tail -12 "$dest/fp8_options.log"
[ -f "$dest/fp8_options_wan14b.log" ] && tail -12 "$dest/fp8_options_wan14b.log"
[ -f "$dest/e2e_bench.log" ] && tail -20 "$dest/e2e_bench.log"
[ -f "$dest/compile_bench.log" ] && sed -n '/^program  run/,$p' "$dest/compile_bench.log"
[ -f "$dest/mosaic_compile_times.log" ] && grep -E "^(fwd|grad):|compile_s|Traceback|Error" \
  "$dest/mosaic_compile_times.log"
[ -f "$dest/fp8_bench.log" ] && tail -15 "$dest/fp8_bench.log"
[ -f "$dest/fp8_sample.log" ] && grep -E -A 12 '"rel_l2"|Error' "$dest/fp8_sample.log" | head -30
exit $rc
