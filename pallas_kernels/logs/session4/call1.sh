# Session 4, call 1: the fused backward with FA3's overlap (bwd_overlap) against the current one
# (gradients checked against the float32 reference, backward alone, ablations, and fwd+bwd
# through the op in interleaved rounds); the pallas_triton kernels in both launch orders.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv > $OUT/gpu.txt
python3 -m pallas_kernels.mosaic_bwd_bench --sections check,bwd,op --variants fused,fused_ov \
  --op-rounds 2 --experiments fused:no_dq,fused_ov:no_dq,fused_ov:no_reduce > $OUT/bwd.log 2>&1
python3 -m pallas_kernels.triton_order_bench > $OUT/triton.log 2>&1
tail -n 14 $OUT/bwd.log; tail -n 11 $OUT/triton.log
