#!/usr/bin/env bash
# The GPU plan of benchmarks/NOTES.md as named stages, for the lent machine (device tool), where
# one call may run 10 minutes and the session has 30. Each stage has its own time limit (LIMIT
# below, seconds), so a stage that runs long costs its own budget and not the next stage's
# results; each writes its log to $OUT/<stage>.log and its outputs under $OUT/<stage>/.
#
#   bash benchmarks/gpu_session.sh tests kernels          # one call: GPU tests, then the kernel benchmark
#   bash benchmarks/gpu_session.sh distill                # next call (within 30 s keeps the machine warm)
#   bash benchmarks/gpu_session.sh distill:360 kernels:220  # NAME:SECONDS replaces a stage's limit
#
# `e2e` passes $E2E_FLAGS on to benchmarks/e2e.py (e.g. --cuda-graphs). It runs its most important runs first and saves after each; one call fits about three compiled
# VGGT-1B runs (a compile takes ~3 minutes). To go on in the next call, copy $OUT/e2e/e2e.json into
# the working tree and name it: E2E_RESUME=benchmarks/results/e2e_partial.json bash ... e2e
#
# `teacher` passes $TEACHER_FLAGS on to benchmarks/train_teacher.py (e.g. --distinct-walls).
# `whole` compiles the whole model (not block by block) at S=32, for the memory target: dense
# eager against the fp8+SLA student (E2E_FLAGS="--cuda-graphs --bf16-all-heads --head-frames-chunk 4"
# is session 8's 2.68x). `whole1` does the same at S=1 for dense compiled against FP8 alone, the
# host-bound case where the eager glue between compiled blocks is what is left to remove.
#
# `quality` studies the teacher in benchmarks/assets (the committed one, trained on a CPU at
# 112x112, unless a `teacher` stage of the same call replaced it with a GPU-trained one at 224),
# with $QUALITY_FLAGS passed on (e.g. --teacher ... --dense-special-rows --only ...); it starts no
# new variant in its last two minutes, so the table it has is written.
#
# Triton compiles and autotunes every kernel shape on its first call (benchmarks/NOTES.md, cold
# start: 14-30 s a shape). The cache lives in ./.triton_cache (git-ignored) and is packed into
# $OUT/triton_cache.tar.gz at the end: unpack it here into .triton_cache and name it in the device
# tool's `carry` so the next machine starts warm.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
export OUT
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"

declare -A LIMIT=(
    [tests]=240 [overhead]=240 [kernels]=300 [variants]=360 [quant]=200 [upsample]=150 [distill]=480 [e2e]=540 [whole]=420 [whole1]=560
    [teacher]=570 [quality]=540
)

# A stage with a time budget of its own gets its limit less the time to build, save and plot.
stage() {
    local name=$1 limit=$2
    local dir=$OUT/$name
    mkdir -p "$dir"
    case $name in
    # the time goes into compiling Triton kernels (ptxas, CPU-bound): 4 workers compile 4 tests at once
    tests) python -m pytest -m gpu -q -n 4 -p no:cacheprovider tests ;;
    overhead) python benchmarks/compile_overhead.py --out "$dir" ;;
    kernels) python benchmarks/sla_kernel.py --out "$dir" ;;
    variants) python benchmarks/sla_forward_variants.py --frames 8 32 --out "$dir" ;;
    quant) python benchmarks/fp8_quant.py --frames 8 32 --layernorm --out "$dir" ;;
    upsample) python benchmarks/upsample.py --sources --out "$dir" ;;
    distill) python benchmarks/distill.py --model vggt-1b --frames 8 --steps 200 --full-steps 20 \
        --workers 16 --scenes 16 --time-budget-s $((limit - 60)) --out "$dir" ;;
    # then the Triton source of the hottest Inductor kernels, to read after the machine is gone
    e2e) python benchmarks/e2e.py --models vggt-1b da3-large --bf16-dense-heads ${E2E_FLAGS:-} --time-budget-s $((limit - 60)) \
        ${E2E_RESUME:+--resume "$E2E_RESUME"} --out "$dir" \
        ; python benchmarks/kernel_sources.py "$dir/e2e.json" --top 12 --out "$dir/kernels" \
        && tar -czf "$dir/kernels.tar.gz" -C "$dir" kernels && rm -r "$dir/kernels" ;;
    whole) python benchmarks/e2e.py --models vggt-1b --frames 32 --variants dense_eager student_fp8_sla \
        --compile-scope model --bf16-dense-heads ${E2E_FLAGS:-} --breakdown-frames --time-budget-s $((limit - 60)) \
        --name e2e_whole --out "$dir" ;;
    whole1) python benchmarks/e2e.py --models vggt-1b --frames 1 --variants dense_compiled student_fp8_only \
        --compile-scope model --bf16-dense-heads ${E2E_FLAGS:-} --breakdown-frames 1 --no-exact-check \
        --time-budget-s $((limit - 60)) --name e2e_whole1 --out "$dir" ;;
    teacher) python benchmarks/train_teacher.py --minutes 8 ${TEACHER_FLAGS:-} --out "$dir" ;;
    quality) python benchmarks/quality.py --block-q 32 --block-k 32 --long-steps 800 ${QUALITY_FLAGS:-} \
        --time-budget-s $((limit - 120)) --out "$dir" ;;
    *) echo "gpu_session: unknown stage '$name' (known: ${!LIMIT[*]})" >&2; return 2 ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
status=0
for arg in "$@"; do
    name=${arg%%:*}
    limit=${LIMIT[$name]:-}
    [ "$arg" != "$name" ] && [ -n "$limit" ] && limit=${arg#*:}
    if [ -z "$limit" ]; then
        echo "gpu_session: unknown stage '$name' (known: ${!LIMIT[*]})" >&2
        status=2
        continue
    fi
    start=$(date +%s)
    echo "=== $name (limit ${limit} s)"
    # the stage runs in a subshell under timeout; its output goes to the log as it is written
    export -f stage
    timeout --signal=INT --kill-after=20 "$limit" bash -c "stage $name $limit" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -ne 0 ] && status=$rc
done
# compressed: the plain tar of one session (distill + kernels) was too large to come back
tar -czf "$OUT/triton_cache.tar.gz" .triton_cache
exit $status
