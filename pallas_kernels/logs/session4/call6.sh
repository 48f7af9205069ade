# Session 4, call 6: a repeat of the kernel bench at (3,3,3) only (the fwd+bwd target's margin).
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false; python3 -m benchmarks.kernel_bench --out $OUT --backends cudnn,pallas_mosaic --windows "3,3,3" --tag kernel_bench_mosaic_session4_repeat_h100 > $OUT/kernel_bench.log 2>&1; sed -n '/^backend /,$p' $OUT/kernel_bench.log
