#!/usr/bin/env bash
# GPU checks on the H200 device (../shared/device/DEVICE.md). Run as the last device call, after
# the bundle's stash parts, with `.devbundle/p03` and `.devextra` carried:
#   sh .devbundle/p03/unpack.sh && sh scripts/gpu_checks.sh
# `.devextra/` holds pure-Python wheels the device may lack (torchmetrics, pandas, ...), made by
#   .venv/bin/pip download -d .devextra --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 torchmetrics==1.0.3 lightning-utilities tqdm \
#     pyre-extensions typing-inspect mypy-extensions pandas==3.1.1 python-dateutil six tzdata
# Sections (environment, 1 = on): GPU_TESTS=1 `pytest -m gpu`; GPU_DEMO=1 the demo;
# GPU_BF16_PROBE=0 valid AUC with and without bf16; GPU_TPUT=1 throughput at batch 8192 and 32768
# on 1 and 2 GPUs, or with GPU_LOADERS=1 instead: train.loader memory vs stream (1 and 2 GPUs);
# GPU_STEP=0 batch-512 step time under thread, pipeline and sharding-type settings;
# GPU_RECIPE=0 the demo at batch 512 and 32768 (Muon, the default there, and Adam), seeds
# GPU_RECIPE_SEEDS (0 1 2), 3 epochs; GPU_RECIPE_RUNS: other runs ("batch [--set ..]",
# separated by |).
# Later calls in the same lease skip the unpack: /tmp/site stays while the machine is warm.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site2
for whl in .devextra/*.whl; do
  mod=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
  case $mod in python_dateutil) mod=dateutil ;; lightning_utilities) mod=lightning_utilities ;; esac
  PYTHONPATH=/tmp/site python -c "import $mod" 2>/dev/null || python -m zipfile -e "$whl" /tmp/site2
done
. scripts/device_env.sh  # PYTHONPATH and the rest; the packages' .pyc
nvidia-smi -L | tee "$OUT/gpus.txt"
python -c "import torch, torchrec, fbgemm_gpu, polars, mlflow, pandas, torchmetrics; print(torch.__version__, torchrec.__version__, polars.__version__, mlflow.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpus.txt"
if [ "${GPU_TESTS:-1}" = 1 ]; then
  python -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
fi
if [ "${GPU_DEMO:-1}" = 1 ]; then
  ( time python -m recsys_moe.cli demo --workdir /tmp/gpu-demo ) > "$OUT/demo.log" 2>&1
  tail -25 "$OUT/demo.log"
fi
if [ "${GPU_BF16_PROBE:-0}" = 1 ]; then  # valid AUC with and without bf16 autocast
  W=/tmp/gpu-bf16; S="--set synth.users=3000 --set synth.items=600 --set synth.days=6 --set train.epochs=2"
  python -m recsys_moe.cli data synth --out $W/data --users 3000 --items 600 --days 6 >/dev/null 2>&1
  python -m recsys_moe.cli features build --workdir $W $S >/dev/null 2>&1
  for bf in true false; do
    python -m recsys_moe.cli train --workdir $W $S --set train.batch_size=2048 --set train.bf16=$bf 2>&1 \
      | grep -a "trained run" | cut -c1-120 | sed "s/^/1 GPU bf16=$bf: /" | tee -a "$OUT/bf16.txt"
  done
fi
if [ "${GPU_RECIPE:-0}" = 1 ]; then  # large batches: 512 vs 32768 (Muon, auto) vs 32768 on Adam
  W=/tmp/gpu-recipe
  python -m recsys_moe.cli data synth --out $W/data >/dev/null 2>&1
  python -m recsys_moe.cli features build --workdir $W >/dev/null 2>&1
  RUNS=${GPU_RECIPE_RUNS:-512|32768|32768 --set train.dense_optimizer=adam}
  for SEED in ${GPU_RECIPE_SEEDS:-0 1 2}; do
    IFS='|'; set -f; for RUN in $RUNS; do unset IFS; set +f
      set -- $RUN; B=$1; shift
      python -m recsys_moe.cli train --workdir $W -q --set train.batch_size=$B --set train.seed=$SEED \
        "$@" 2>&1 | grep -a "trained run" | cut -c1-120 | sed "s/^/seed $SEED, batch $B $*: /" \
        | tee -a "$OUT/recipe.txt"
    done
  done
  python - "$W/mlflow.db" > "$OUT/recipe.jsonl" <<'PY'  # each run: settings, epoch curve
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
for (run,) in db.execute("select run_uuid from runs order by start_time"):
    p = dict(db.execute("select key, value from params where run_uuid=?", (run,)))
    m = lambda k: [v for (v,) in db.execute(  # noqa: E731
        "select value from metrics where run_uuid=? and key=? order by step", (run, k))]
    keep = [k for k in p if k.endswith("_effective") or k in ("train.batch_size", "train.seed")]
    print(json.dumps({"run": run, **{k: p[k] for k in keep}, "click_auc": m("valid/click_auc"),
                      "watch_time_rmse_log": m("valid/watch_time_rmse_log"),
                      "selected_epoch": m("train/selected_epoch"),
                      "samples_per_s_steady": m("train/samples_per_s_steady")}))
PY
fi
if [ "${GPU_STEP:-0}" = 1 ]; then  # batch-512 step time: what costs the most on one GPU
  W=/tmp/gpu-step; S="--set train.epochs=1 --set train.batch_size=512"
  python -m recsys_moe.cli data synth --out $W/data --users 3000 --items 1500 >/dev/null 2>&1
  python -m recsys_moe.cli features build --workdir $W >/dev/null 2>&1
  step() {  # name, VAR=value for the environment, extra --set
    env "$2" python -m recsys_moe.cli train --workdir $W $S $3 2>&1 | grep -a "trained run" \
      | cut -c1-80 | sed "s/^/1 GPU, batch 512, $1: /" | tee -a "$OUT/step.txt"
  }
  step default X=1 ""
  [ "${GPU_STEP_ONLY_DEFAULT:-0}" = 1 ] && exit 0
  step "OMP_NUM_THREADS=4" OMP_NUM_THREADS=4 ""
  step "pipeline=plain" X=1 "--set train.pipeline=plain"
  step "table_wise" X=1 "--set train.sharding.types=['table_wise']"
  step "table_wise, OMP 4" OMP_NUM_THREADS=4 "--set train.sharding.types=['table_wise']"
  step "plain, table_wise, OMP 4" OMP_NUM_THREADS=4 "--set train.pipeline=plain --set train.sharding.types=['table_wise']"
fi
[ "${GPU_TPUT:-1}" = 1 ] || exit 0
# throughput of the demo model at a GPU-sized batch: one GPU, then two under torchrun
W=/tmp/gpu-tput
python -m recsys_moe.cli data synth --out $W/data --users 12000 --items 1500 >/dev/null 2>&1
python -m recsys_moe.cli features build --workdir $W >/dev/null 2>&1
if [ "${GPU_LOADERS:-0}" = 1 ]; then  # train.loader memory vs stream, and stream's thread settings
  S="--set train.epochs=2 --set train.lr=2e-2 --set train.embedding_lr=0.2"
  run1() {  # name, one VAR=value for the environment, loader kind
    env "$2" python -m recsys_moe.cli train --workdir $W $S --set train.batch_size=32768 --set train.loader=$3 \
      2>&1 | grep -a "trained run" | cut -c1-80 | sed "s/^/1 GPU, batch 32768, $1: /" | tee -a "$OUT/loaders.txt"
  }
  run1 memory X=1 memory
  run1 stream X=1 stream
  run1 "stream, cpu_threads=16" X=1 "stream --set train.cpu_threads=16"
  for kind in memory stream; do
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m recsys_moe.cli train --workdir $W $S \
      --set train.batch_size=16384 --set train.loader=$kind 2>&1 | grep -a "trained run" | cut -c1-80 \
      | sed "s/^/2 GPUs, batch 16384 per rank, $kind: /" | tee -a "$OUT/loaders.txt"
  done
  exit 0
fi
for bs in 8192 32768; do
  S="--set train.batch_size=$bs --set train.epochs=2 --set train.lr=2e-2 --set train.embedding_lr=0.2"
  python -m recsys_moe.cli train --workdir $W $S 2>&1 | grep -a "trained run" | sed "s/^/1 GPU, batch $bs: /" | tee -a "$OUT/throughput.txt"
  python -m torch.distributed.run --standalone --nproc-per-node 2 -m recsys_moe.cli train --workdir $W $S \
    --set train.batch_size=$((bs / 2)) 2>&1 | grep -a "trained run" | sed "s/^/2 GPUs, batch $((bs / 2)) per rank: /" | tee -a "$OUT/throughput.txt"
done
