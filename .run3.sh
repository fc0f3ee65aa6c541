export PYTHONPATH=$PWD/src:$PWD/benchmarks:$PWD/tests/step3
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 45 python3 .dbg/graphs_debug.py > $OUT/graphs_debug.log 2>&1; echo rc=$?; grep -v "^ *$" $OUT/graphs_debug.log | tail -30
date -u
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/step3/test_decode_graphs.py tests/step3/test_rotary.py tests/step3/test_moe_router.py tests/step3/test_moe_decode.py tests/step3/test_fp8_activation_quant.py tests/step3/test_fp8_decode_linear.py tests/step3/test_launch_count.py -k "not triton_interpreter" > $OUT/gpu_tests_new_kernels.log 2>&1; echo rc=$?; grep -E "passed|failed|^FAILED|^ERROR" $OUT/gpu_tests_new_kernels.log | tail -25
date -u
cd benchmarks
timeout 70 python3 generate.py --shapes 16x2048 64x1024 --variants default > $OUT/generate_default_graphs.log 2>&1; echo rc=$?; tail -4 $OUT/generate_default_graphs.log
timeout 70 python3 generate.py --shapes 16x2048 64x1024 --variants default --eager-ffn > $OUT/generate_default_eager_ffn.log 2>&1; echo rc=$?; tail -4 $OUT/generate_default_eager_ffn.log
date -u
timeout 60 python3 afd_decode.py --connector inprocess --batches 128 512 --variants "static+mfa_decode+graphs" --steps 3 --warmup 2 --out $OUT/afd > $OUT/afd_inprocess_graphs.log 2>&1; echo rc=$?; tail -4 $OUT/afd_inprocess_graphs.log
date -u
timeout 140 python3 fp8_decode.py --batches 64 256 --contexts 4096 --prefill 1x4096 > $OUT/fp8_decode.log 2>&1; echo rc=$?; tail -12 $OUT/fp8_decode.log
date -u
cd ..
timeout 55 python3 -m pytest -q -p no:cacheprovider tests/step3/test_gpu.py -k "fp8 or greedy or defaults or decode_kernel" > $OUT/gpu_tests_test_gpu.log 2>&1; echo rc=$?; grep -E "passed|failed|^FAILED" $OUT/gpu_tests_test_gpu.log | tail -8
date -u
