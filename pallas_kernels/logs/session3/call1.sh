export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv | tee $OUT/gpu.txt
which ncu nsys 2>&1 | head -2
python3 -m pallas_kernels.clock_log run $OUT/clk_fwd.csv -- python3 -m pallas_kernels.mosaic_fwd_bench --variants overlap,unpadded --windows 3x3x3,5x5x5 --no-padded-check --experiments overlap:static_kv > $OUT/fwd.log 2>&1
grep -v "^ *$" $OUT/fwd.log | grep -i "error\|Traceback" | head -5
python3 -m pallas_kernels.clock_log run $OUT/clk_bwd.csv -- python3 -m pallas_kernels.mosaic_bwd_bench --sections bwd --variants split --experiments fused,fused:private_dq,fused:no_reduce > $OUT/bwd.log 2>&1
grep -i "error\|Traceback" $OUT/bwd.log | head -5
tail -12 $OUT/fwd.log; tail -8 $OUT/bwd.log
python3 -m pallas_kernels.clock_log summary $OUT/clk_fwd.csv $OUT/fwd_bench.json
python3 -m pallas_kernels.clock_log summary $OUT/clk_bwd.csv $OUT/bwd_bench.json
