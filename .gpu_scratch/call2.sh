export E2E_FLAGS="--frames 8 32 --variants dense_eager dense_compiled student_fp8_sla --cuda-graphs"
bash benchmarks/gpu_session.sh e2e:570 > $OUT/session.log 2>&1
rm -f $OUT/triton_cache.tar.gz
tail -45 $OUT/e2e.log
