# Session 3, call 3: fused-backward query-list start (stride 37 / 0 / 1) and ablations in the new
# launch order; the general forward beside the overlap one (new order), padded-spec checks.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pallas_kernels.mosaic_bwd_bench --sections bwd --variants split --experiments fused,fused@0,fused@1,fused@3,fused:no_reduce,fused:private_dq > $OUT/bwd.log 2>&1
grep -i "error\|Traceback" $OUT/bwd.log | head -5
python3 -m pallas_kernels.mosaic_fwd_bench --variants overlap,general --windows 5x5x5 --no-cudnn > $OUT/fwd.log 2>&1
grep -i "error\|Traceback" $OUT/fwd.log | head -5
tail -9 $OUT/bwd.log; tail -6 $OUT/fwd.log
