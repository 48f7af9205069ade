# Session 4, call 7: the pallas_triton GPU tests (launch order changed this session).
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false; timeout 190 python3 -m pytest -q -m gpu tests/test_triton_gpu.py --durations=5 > $OUT/gpu_tests_triton.log 2>&1; tail -n 14 $OUT/gpu_tests_triton.log
