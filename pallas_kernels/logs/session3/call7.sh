# Session 3, call 7: fwd+bwd through the op, fused vs split backward, 3 interleaved rounds.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pallas_kernels.mosaic_bwd_bench --sections op --variants fused,split --op-rounds 3 > $OUT/op.log 2>&1
