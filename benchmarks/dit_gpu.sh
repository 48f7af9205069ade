#!/usr/bin/env bash
# The model results in one run: train the small DiT with full attention, fine-tune it with STA
# from that checkpoint (loss curves), calibrate per-head windows on it, compare the calibrated
# sample with full attention, and time the hunyuan-shape model per step.
#   bash benchmarks/dit_gpu.sh [--out DIR] [train] [calib] [e2e]   (default: all three; DIR ./out)
# Everything the steps write (logs, loss curves, strategy, sample comparison, e2e JSON) is packed
# into DIR/dit_results.tgz. Env: FULL_STEPS (300), STA_STEPS (200), ERROR_BUDGET (0.1),
# KEEP_FULL (2), E2E_ARGS, RUNS (checkpoints, default /tmp/runs), PY (default python3).
set -u
final_out=$PWD/out
if [ "${1:-}" = "--out" ]; then final_out=$2; shift 2; fi
work=$final_out/work
RUNS=${RUNS:-/tmp/runs}
mkdir -p "$work" "$RUNS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
steps=${*:-train calib e2e}
rc=0
for step in $steps; do
  case $step in
    train)
      $PY -m models.train --preset small --attention full --steps ${FULL_STEPS:-300} --batch 8 \
        --no-progress --out "$RUNS/small_full" > "$work/train_full.log" 2>&1 || rc=1
      $PY -m models.train --preset small --attention sta --steps ${STA_STEPS:-200} --batch 8 \
        --no-progress --init-from "$RUNS/small_full/ckpt" --out "$RUNS/small_sta" \
        > "$work/train_sta.log" 2>&1 || rc=1
      for r in small_full small_sta; do
        for f in "$RUNS/$r"/*.json "$RUNS/$r"/*.png; do [ -f "$f" ] && cp "$f" "$work/${r}_$(basename "$f")"; done
      done
      tail -2 "$work/train_full.log" "$work/train_sta.log" ;;
    calib)
      $PY -m models.calibrate --checkpoint "$RUNS/small_full/ckpt" \
        --candidates "1,1,1;3,3,1;3,3,3;full" --error-budget ${ERROR_BUDGET:-0.1} --num-inputs 4 \
        --out "$RUNS/calib" > "$work/calibrate.log" 2>&1 || rc=1
      cp "$RUNS/calib/strategy.json" "$work/calib_strategy.json" 2>/dev/null
      cp "$RUNS/calib/recall_heatmap.png" "$work/calib_recall_heatmap.png" 2>/dev/null
      $PY -m benchmarks.calibrated_sample --checkpoint "$RUNS/small_full/ckpt" \
        --strategy "$RUNS/calib/strategy.json" --steps 20 --full-steps ${KEEP_FULL:-2} --out "$work" \
        > "$work/calibrated_sample.log" 2>&1 || rc=1
      tail -25 "$work/calibrate.log"; tail -22 "$work/calibrated_sample.log" ;;
    e2e)
      $PY -m benchmarks.e2e_bench --out "$work" ${E2E_ARGS:-} > "$work/e2e_bench.log" 2>&1 || rc=1
      tail -15 "$work/e2e_bench.log" ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
tar czf "$final_out/dit_results.tgz" -C "$work" . && rm -rf "$work"
exit $rc
