export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_CACHE_AUTOTUNING=1
mkdir -p $OUT/quant $OUT/variants
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv | tee $OUT/gpu.txt
timeout 150 python -m pytest -q -p no:cacheprovider -n 4 tests/test_gelu_quant.py tests/test_sla_triton.py -k "gelu or radix or kernel or form or saturates" 2>&1 | tee $OUT/tests.log | tail -25
timeout 150 python benchmarks/fp8_quant.py --frames 8 32 --out $OUT/quant 2>&1 | tee $OUT/quant.log
timeout 200 python benchmarks/sla_forward_variants.py --frames 32 --launch 4x3r168 --no-flex --out $OUT/variants 2>&1 | tee $OUT/variants.log
