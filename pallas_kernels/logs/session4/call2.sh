# Session 4, call 2: the fused backward with its dQ product deferred by one step
# (bwd_defer_dq), with and without the overlap of call 1: gradients against the float32
# reference, backward alone, and fwd+bwd through the op in interleaved rounds.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pallas_kernels.mosaic_bwd_bench --sections check,bwd,op \
  --variants fused,fused_defer,fused_ov_defer --op-rounds 2 \
  --experiments fused_defer:no_reduce > $OUT/bwd.log 2>&1
tail -n 16 $OUT/bwd.log
