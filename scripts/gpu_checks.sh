#!/usr/bin/env bash
# GPU checks on the H200 device (../shared/device/DEVICE.md). Run as the last device call, after
# the bundle's stash parts, with `.devbundle/p03` and `.devextra` carried:
#   sh .devbundle/p03/unpack.sh && sh scripts/gpu_checks.sh
# `.devextra/` holds pure-Python wheels the device may lack (torchmetrics, pandas, ...), made by
#   .venv/bin/pip download -d .devextra --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 torchmetrics==1.0.3 lightning-utilities tqdm \
#     pyre-extensions typing-inspect mypy-extensions pandas==3.1.1 python-dateutil six tzdata
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site2
for whl in .devextra/*.whl; do
  mod=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
  case $mod in python_dateutil) mod=dateutil ;; lightning_utilities) mod=lightning_utilities ;; esac
  PYTHONPATH=/tmp/site python -c "import $mod" 2>/dev/null || python -m zipfile -e "$whl" /tmp/site2
done
export PYTHONPATH=/tmp/site:$PWD:/tmp/site2 NCCL_NVLS_ENABLE=0 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
nvidia-smi -L | tee "$OUT/gpus.txt"
python -c "import torch, torchrec, fbgemm_gpu, polars, mlflow, pandas, torchmetrics; print(torch.__version__, torchrec.__version__, polars.__version__, mlflow.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpus.txt"
python -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
( time python -m recsys_moe.cli demo --workdir /tmp/gpu-demo ) > "$OUT/demo.log" 2>&1
tail -25 "$OUT/demo.log"
