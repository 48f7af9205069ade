# Session 4, call 4: the fused backward with 240 registers per compute thread (24 for the
# producer) against the default 232/40: call 3's profile showed wgmma descriptors spilled to
# local memory and reloaded at every step (18 LDL per step in the loop).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pallas_kernels.mosaic_bwd_bench --sections none --variants fused \
  --experiments fused,fused#240,fused,fused#240 > $OUT/bwd.log 2>&1
tail -n 8 $OUT/bwd.log
