export PYTHONPATH=$PWD/src:$PWD/benchmarks:$PWD/tests/step3
date -u
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/step3/test_decode_graphs.py tests/step3/test_rotary.py tests/step3/test_rms_norm.py -k "not triton_interpreter" > $OUT/gpu_tests_graphs_rope.log 2>&1; echo rc=$?; tail -15 $OUT/gpu_tests_graphs_rope.log
date -u
cd benchmarks
timeout 170 python3 generate.py --shapes 16x2048 64x1024 128x1024 --variants default > $OUT/generate_default_graphs.log 2>&1; echo rc=$?; tail -8 $OUT/generate_default_graphs.log
date -u
timeout 170 python3 generate.py --shapes 16x2048 64x1024 128x1024 --variants default --eager-ffn > $OUT/generate_default_eager_ffn.log 2>&1; echo rc=$?; tail -8 $OUT/generate_default_eager_ffn.log
date -u
