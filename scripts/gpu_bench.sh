#!/usr/bin/env bash
# The GPU benchmark on the H200 device (../shared/device/DEVICE.md, benchmarks/gpu_bench.py). After
# the bundle's stash parts, one call that unpacks the wheels of `.devextra/` (carried; see
# scripts/gpu_checks.sh for how it is made, plus torch-rechub, scikit-learn, scipy, joblib,
# threadpoolctl for the peer), then the last part with this script:
#   sh .devbundle/p03/unpack.sh && sh scripts/gpu_bench.sh
# Sections (environment, 1 = on): BENCH_PREP=1 the bench training set (ROWS rows, 4M);
# BENCH_1GPU=1 one GPU with the torch-rechub peer (train.compile = BENCH_1GPU_COMPILE, default
# "step": the dense step as one CUDA graph, the fastest measured); BENCH_2GPU=1 two GPUs under torchrun
# (BENCH_TYPES: sharding types to force, one run each, e.g. "table_wise row_wise");
# BENCH_COMPILE=0 one GPU with train.compile set to each of BENCH_COMPILE_MODES (default
# "true cudagraphs step"); BENCH_SCORE=0 the forward's pairs/s at
# 8k-256k rows (gpu_bench.py score); BENCH_DEMO=0 the demo model at batch 512, 8192 and 32768
# with the large-batch recipe (train.lr_scaling auto-warm-up), 8192 without scaling, and 8192
# compiled.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site2
. scripts/device_env.sh  # PYTHONPATH and the rest; the packages' .pyc
W=/tmp/bench
nvidia-smi -L | tee -a "$OUT/gpus.txt"
if [ "${BENCH_PREP:-1}" = 1 ] && [ ! -f $W/dataset/manifest.json ]; then
  python benchmarks/gpu_bench.py prepare --work $W --rows "${ROWS:-4000000}" 2>&1 | tail -3
fi
if [ "${BENCH_1GPU:-1}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 python benchmarks/gpu_bench.py train --work $W --peer \
    --set train.compile=${BENCH_1GPU_COMPILE:-step} --out "$OUT/gpu_bench_1gpu.json" > "$OUT/gpu_bench_1gpu.log" 2>&1
  tail -4 "$OUT/gpu_bench_1gpu.log"
fi
if [ "${BENCH_COMPILE:-0}" = 1 ]; then
  for MODE in ${BENCH_COMPILE_MODES:-true cudagraphs step}; do
    CUDA_VISIBLE_DEVICES=0 python benchmarks/gpu_bench.py train --work $W \
      --set train.compile=$MODE --out "$OUT/gpu_bench_1gpu_compile_$MODE.json" \
      > "$OUT/gpu_bench_1gpu_compile_$MODE.log" 2>&1
    tail -2 "$OUT/gpu_bench_1gpu_compile_$MODE.log" | sed "s/^/compile=$MODE: /"
  done
fi
if [ "${BENCH_SCORE:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 python benchmarks/gpu_bench.py score --work $W \
    --out "$OUT/gpu_score.json" > "$OUT/gpu_score.log" 2>&1
  grep "^score" "$OUT/gpu_score.log" || tail -5 "$OUT/gpu_score.log"
fi
if [ "${BENCH_2GPU:-1}" = 1 ]; then
  python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu_bench.py train \
    --work $W --out "$OUT/gpu_bench_2gpu.json" > "$OUT/gpu_bench_2gpu.log" 2>&1
  tail -3 "$OUT/gpu_bench_2gpu.log"
  for T in ${BENCH_TYPES:-}; do
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu_bench.py train \
      --work $W --set "train.sharding.types=['$T']" --out "$OUT/gpu_bench_2gpu_$T.json" 2>&1 \
      | tail -2 | sed "s/^/$T: /"
  done
fi
if [ "${BENCH_DEMO:-0}" = 1 ]; then
  D=/tmp/bench-demo
  [ -f $D/dataset/manifest.json ] || { python -m recsys_moe.cli data synth --workdir $D -q \
    && python -m recsys_moe.cli features build --workdir $D -q; } >/dev/null 2>&1
  for RUN in "512" "8192" "32768" "8192 --set train.lr_scaling=none --set train.embedding_lr_scaling=none" \
             "8192 --set train.compile=true" ${DEMO_EXTRA:-}; do
    set -- $RUN; B=$1; shift
    CUDA_VISIBLE_DEVICES=0 python -m recsys_moe.cli train --workdir $D -q --set train.batch_size=$B \
      "$@" 2>&1 | grep -a "trained run" | cut -c1-200 \
      | sed "s/^/demo model, 1 GPU, batch $B $*: /" | tee -a "$OUT/demo_batches.txt"
  done
fi
