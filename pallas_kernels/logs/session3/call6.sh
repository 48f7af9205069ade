# Session 3, call 6: backward pipeline depth 2 vs 3 (fused and split), fwd+bwd through the op.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pallas_kernels.mosaic_bwd_bench --sections bwd,op --variants fused,split --bwd-stages 2,3 > $OUT/bwd.log 2>&1
grep -i "error\|Traceback" $OUT/bwd.log | head -5
tail -9 $OUT/bwd.log
