export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_CACHE_AUTOTUNING=1
mkdir -p $OUT/variants
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_sla_triton.py -k radix 2>&1 | tee $OUT/tests.log | tail -5
timeout 80 python benchmarks/sla_forward_variants.py --frames 32 --launch 4x3r168 --no-flex --out $OUT/variants 2>&1 | tee $OUT/variants.log | grep steps
E2E_FLAGS="--cuda-graphs --bf16-all-heads --head-frames-chunk 4" bash benchmarks/gpu_session.sh whole:420 > $OUT/session.log 2>&1
rm -f $OUT/triton_cache.tar.gz
tail -30 $OUT/whole.log
