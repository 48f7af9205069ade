# Session 4, call 5 (final code: fused backward at 240/24 registers): the kernel bench beside
# cuDNN dense (pallas_mosaic), then the Mosaic GPU tests (not autotune).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m benchmarks.kernel_bench --out $OUT --backends cudnn,pallas_mosaic \
  --tag kernel_bench_mosaic_session4_h100 > $OUT/kernel_bench.log 2>&1
sed -n '/^backend /,$p' $OUT/kernel_bench.log
timeout 470 python3 -m pytest -q -m gpu tests/test_mosaic_gpu.py -k "not autotune" \
  --durations=0 > $OUT/gpu_tests.log 2>&1
tail -n 25 $OUT/gpu_tests.log
