#!/usr/bin/env bash
# Candidate scoring on a GPU, checked against the CPU: the demo's data, a short training run and
# its registration, then `recsys-moe score` (serving.score.score, the CLI's function) on the same
# candidates with --device cpu, --device $DEVICE, and --quantize int8 on both. Prints pairs/s
# (median of $RUNS runs each; a run is the whole job: model load, features as of the store's
# latest time, partition, scoring, writing), the int8-vs-fp32 changes (the manifests'
# prediction_change, the top-10 overlap, click AUC and watch-time RMSE on the test split), and
# fails (exit 1) unless the $DEVICE outputs equal the CPU's within tolerance: the same top 10 for
# >= 99.9 % of the rows, scores within 1e-4 relative (fp32) or 1e-3 (int8).
#
# On a GPU machine (repo as cwd, torch/torchrec/fbgemm-gpu on PYTHONPATH; ~3-5 min on one GPU):
#   OUT=/tmp/out bash scripts/gpu_score_job.sh
# Here, on the CPU (the same path; small data):
#   PYTHON=.venv/bin/python DEVICE=cpu PAIRS=200000 RUNS=1 \
#     SETS="--set synth.users=2000 --set synth.days=5" bash scripts/gpu_score_job.sh
# Settings (environment): W workdir (/tmp/gpu-score, reused: delete it to retrain), OUT (JSON and
# logs, /tmp/out), DEVICE (cuda), PAIRS candidates (2,000,000), RUNS (3), EPOCHS (1), SETS (extra
# --set flags for every job), PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-/tmp/gpu-score}
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
PAIRS=${PAIRS:-2000000}
RUNS=${RUNS:-3}
EPOCHS=${EPOCHS:-1}
SETS=${SETS:-}
PY=${PYTHON:-python}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export W OUT DEVICE PAIRS RUNS SETS
mkdir -p "$OUT" "$W"
[ "$DEVICE" = cpu ] || nvidia-smi -L | tee "$OUT/gpu_score_gpus.txt"

cli() { # one job of the demo's batch path; its log under $OUT, its last lines shown
  local name=$1; shift
  # shellcheck disable=SC2086  # SETS is a list of flags
  if ! $PY -m recsys_moe.cli "$@" --workdir "$W" -q $SETS > "$OUT/gpu_score_$name.log" 2>&1; then
    tail -20 "$OUT/gpu_score_$name.log"; echo "error: $name failed (log: $OUT/gpu_score_$name.log)"
    exit 1
  fi
  tail -2 "$OUT/gpu_score_$name.log"
}
if [ ! -f "$W/.registered" ]; then
  t0=$(date +%s)
  cli synth data synth
  cli features features build
  cli train train --set train.epochs="$EPOCHS"
  cli evaluate evaluate --set eval.bootstrap=0
  cli register register
  touch "$W/.registered"
  echo "data, features, training ($EPOCHS epoch(s)), evaluation, registration: $(( $(date +%s) - t0 )) s"
fi

$PY - <<'PY'
import json, os, shlex, shutil, statistics, sys, time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, "benchmarks")
from score_bench import TOP_K, int8_change, write_candidates  # noqa: E402

from recsys_moe.config import DEMO_CONFIG, load_config  # noqa: E402
from serving.score import score  # noqa: E402

W, OUT, DEV = Path(os.environ["W"]), Path(os.environ["OUT"]), os.environ["DEVICE"]
RUNS, MODEL = int(os.environ["RUNS"]), "models:/recsys-moe-demo@champion"
sets = [a for a in shlex.split(os.environ["SETS"]) if a != "--set"]
cfg = load_config(DEMO_CONFIG, sets, workdir=W)
cands = write_candidates(W, int(os.environ["PAIRS"]))
jobs = {"cpu_fp32": ("cpu", "none"), "cpu_int8": ("cpu", "int8")}
if DEV != "cpu":
    jobs |= {f"{DEV}_fp32": (DEV, "none"), f"{DEV}_int8": (DEV, "int8")}
res: dict[str, dict] = {}
for name, (device, q) in jobs.items():
    walls = []
    for _ in range(RUNS):
        out = W / f"scores-{name}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        m = score(model_uri=MODEL, candidates=cands, output=out, top_k=TOP_K, cfg=cfg,
                  device=device, quantize=q)
        walls.append(time.perf_counter() - t)
    med = statistics.median(walls)
    res[name] = {"device": device, "quantize": q, "pairs": m["candidate_rows"],
                 "walls_s": walls, "median_s": med, "pairs_per_s": m["candidate_rows"] / med,
                 "prediction_change": m.get("prediction_change")}
    print(f"{name}: {m['candidate_rows']:,} pairs, median {med:.2f} s "
          f"({m['candidate_rows'] / med:,.0f} pairs/s)", flush=True)


def compare(a: str, b: str) -> dict:
    """Top-10 rows of job b against job a: the share of a's (request, item) rows that b has, the
    share with the same rank, and the largest relative score and absolute prediction changes."""
    x = pl.read_parquet(sorted((W / f"scores-{a}").glob("part-*.parquet")))
    y = pl.read_parquet(sorted((W / f"scores-{b}").glob("part-*.parquet")))
    j = x.join(y, on=["request_id", "item_id"], suffix="_b")
    rel = (j["score"] - j["score_b"]).abs() / j["score"].abs()
    finite = all(np.isfinite(y[c].to_numpy()).all() for c in ("p_click", "watch_time_s", "score"))
    return {"rows": x.height, "rows_b": y.height, "overlap": j.height / x.height,
            "same_rank": float((j["rank"] == j["rank_b"]).mean()), "finite": finite,
            "max_rel_score_diff": float(rel.max()),
            "max_abs_p_click_diff": float((j["p_click"] - j["p_click_b"]).abs().max()),
            "max_abs_watch_time_s_diff":
                float((j["watch_time_s"] - j["watch_time_s_b"]).abs().max())}


checks = {"cpu_int8_vs_cpu_fp32": compare("cpu_fp32", "cpu_int8")}
ok = True
if DEV != "cpu":
    for q, tol in (("fp32", 1e-4), ("int8", 1e-3)):
        c = checks[f"{DEV}_{q}_vs_cpu_{q}"] = compare(f"cpu_{q}", f"{DEV}_{q}")
        good = c["finite"] and c["overlap"] >= 0.999 and c["max_rel_score_diff"] <= tol
        ok &= good
        print(f"{DEV} {q} vs cpu {q}: {'OK' if good else 'DIFFERENT'} {c}")
    checks[f"{DEV}_int8_vs_{DEV}_fp32"] = compare(f"{DEV}_fp32", f"{DEV}_int8")
accuracy = int8_change(W, MODEL)  # the test split, fp32 vs int8 tables (on the CPU)
print(f"int8 vs fp32 (cpu): {checks['cpu_int8_vs_cpu_fp32']}")
print("int8 vs fp32 on the test split: " + ", ".join(f"{k} {v:.6g}" for k, v in accuracy.items()))
for name, r in res.items():
    if r["prediction_change"]:
        print(f"{name} prediction_change (manifest): {r['prediction_change']}")
ratio = {f"{DEV}_over_cpu_{q}": res[f"{DEV}_{q}"]["pairs_per_s"] / res[f"cpu_{q}"]["pairs_per_s"]
         for q in ("fp32", "int8") if DEV != "cpu"}
result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(), "device": DEV,
          "runs": RUNS, "top_k": TOP_K, "jobs": res, "checks": checks, "int8_accuracy": accuracy,
          "speedup": ratio, "ok": ok}
(OUT / "gpu_score_job.json").write_text(json.dumps(result, indent=2))
print("\n| job | pairs | median s | pairs/s |\n| --- | ---: | ---: | ---: |")
for name, r in res.items():
    print(f"| {name} | {r['pairs']:,} | {r['median_s']:.2f} | {r['pairs_per_s']:,.0f} |")
print(f"{ratio}\nwrote {OUT / 'gpu_score_job.json'}; outputs {'equal' if ok else 'DIFFER'}")
sys.exit(0 if ok else 1)
PY
