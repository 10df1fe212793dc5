export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_CACHE_AUTOTUNING=1
mkdir -p $OUT/variants
timeout 50 python -m pytest -q -p no:cacheprovider tests/test_sla_triton.py -k "early_exit or block_map" 2>&1 | tee $OUT/tests.log | tail -3
timeout 100 python benchmarks/sla_forward_variants.py --frames 8 32 --launch 4x3r168 --no-flex --out $OUT/variants 2>&1 | tee $OUT/variants.log | grep -v "^  N="
