export PYTHONPATH=$PWD/src:$PWD/benchmarks:$PWD/tests/step3
date -u
timeout 90 python3 .dbg/graphs_debug.py > $OUT/graphs_debug.log 2>&1; echo rc=$?; grep -v "^ *$" $OUT/graphs_debug.log | tail -40
date -u
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/step3/test_decode_graphs.py tests/step3/test_rotary.py tests/step3/test_moe_router.py tests/step3/test_moe_decode.py tests/step3/test_fp8_activation_quant.py tests/step3/test_fp8_decode_linear.py tests/step3/test_launch_count.py -k "not triton_interpreter" > $OUT/gpu_tests_new_kernels.log 2>&1; echo rc=$?; grep -E "passed|failed|^FAILED|^ERROR" $OUT/gpu_tests_new_kernels.log | tail -25
date -u
cd benchmarks
timeout 120 python3 generate.py --shapes 16x2048 64x1024 --variants default > $OUT/generate_default_graphs.log 2>&1; echo rc=$?; tail -5 $OUT/generate_default_graphs.log
timeout 120 python3 generate.py --shapes 16x2048 64x1024 --variants default --eager-ffn > $OUT/generate_default_eager_ffn.log 2>&1; echo rc=$?; tail -5 $OUT/generate_default_eager_ffn.log
date -u
