# Sourced by the H200 device scripts (scripts/gpu_bench.sh, scripts/gpu_checks.sh) after the
# bundle's unpack: the environment they run the project in.
export PYTHONPATH=/tmp/site:$PWD:/tmp/site2 NCCL_NVLS_ENABLE=0 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
# the device sets PYTHONDONTWRITEBYTECODE=1 and the unpacked bundle has no .pyc: without this
# every process compiles its imports' source again (12-15 s of a 38 s demo run; 2.4 s once here),
# which an installed environment (pip writes .pyc) does not pay (benchmarks/README, session 15)
python -m compileall -q -j 0 /tmp/site /tmp/site2 recsys_moe pipelines feature_store serving \
  benchmarks >/dev/null 2>&1 || true
