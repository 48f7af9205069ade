# Session 4, call 3: the op's fwd+bwd against its parts (kernels and XLA glue), and one
# fwd+bwd step (8 heads) under Nsight Compute: stall reasons and the most-sampled SASS lines.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pallas_kernels.op_glue_bench > $OUT/glue.log 2>&1
tail -n 22 $OUT/glue.log
NCU=/usr/local/cuda/bin/ncu
timeout 300 $NCU --clock-control none --profile-from-start off \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats \
  --section Occupancy --section SourceCounters --section MemoryWorkloadAnalysis \
  -o $OUT/step python3 -m pallas_kernels.profile_step > $OUT/ncu_run.log 2>&1
tail -n 5 $OUT/ncu_run.log
$NCU --import $OUT/step.ncu-rep --page details --csv > $OUT/details.csv 2> $OUT/details.err
$NCU --import $OUT/step.ncu-rep --page source --csv --print-source sass > $OUT/source.csv 2> $OUT/source.err
ls -la $OUT; head -c 600 $OUT/source.csv; cat $OUT/source.err | head -5
python3 -m pallas_kernels.ncu_summary $OUT/details.csv $OUT/source.csv > $OUT/ncu_summary.txt 2>&1
head -c 9000 $OUT/ncu_summary.txt
