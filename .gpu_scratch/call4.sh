export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_CACHE_AUTOTUNING=1
mkdir -p $OUT/quant $OUT/s8
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv | tee $OUT/gpu.txt; nproc; lscpu | grep "Model name"
timeout 200 python benchmarks/e2e.py --models vggt-1b --bf16-dense-heads --frames 8 --variants dense_eager student_fp8_sla --cuda-graphs --no-correctness --no-exact-check --breakdown-frames --no-gemm --no-plot --time-budget-s 180 --name e2e_s8 --out $OUT/s8 2>&1 | tee $OUT/s8.log | tail -12
timeout 60 python benchmarks/fp8_quant.py --frames 8 32 --out $OUT/quant 2>&1 | tee $OUT/quant.log | grep triton
