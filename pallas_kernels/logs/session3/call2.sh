# Session 3, call 2: CTA launch order (MosaicConfig.blocks_fastest) for the forwards and backwards.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pallas_kernels.clock_log run $OUT/clk_fwd.csv -- python3 -m pallas_kernels.mosaic_fwd_bench --variants overlap,unpadded --windows 3x3x3,5x5x5,5x7x11 --blocks-fastest 1,0 --no-padded-check > $OUT/fwd.log 2>&1
grep -i "error\|Traceback" $OUT/fwd.log | head -5
python3 -m pallas_kernels.clock_log run $OUT/clk_bwd.csv -- python3 -m pallas_kernels.mosaic_bwd_bench --sections bwd,op --variants split,fused --blocks-fastest 1,0 > $OUT/bwd.log 2>&1
grep -i "error\|Traceback" $OUT/bwd.log | head -5
tail -16 $OUT/fwd.log; tail -9 $OUT/bwd.log
python3 -m pallas_kernels.clock_log summary $OUT/clk_fwd.csv $OUT/fwd_bench.json | cut -c1-80
