"""The training-set build at scale: wall time and peak RSS of the build alone (issue #3, item 4).

    .venv/bin/python benchmarks/scale_build.py --data /tmp/synth10m [--synth]

``--synth`` first writes the synthetic data set (100k users, 20k items, 14 days, 0.72 requests a
user a day, 10 items a request: ~10.1M impressions; that takes ~9 minutes and ~9 GB of RAM on
2 cores, which is the generator's own cost, not the pipeline's). The build then runs in a child
process; its peak RSS is ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which covers only that child.
Writes ``benchmarks/results/scale_build.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = """
import sys
from feature_store import FeatureSet, OfflineStore
from pipelines.training_set import build_training_set
m = build_training_set(store=OfflineStore(sys.argv[1]), out=sys.argv[2],
    features=FeatureSet.load("configs/features/synth.toml"),
    labels={"click": "binary", "watch_time_s": "regression"}, valid_days=1, test_days=1)
print(sum(m["rows"].values()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="synthetic data set directory")
    parser.add_argument("--out", type=Path, default=None, help="dataset output (default DATA-ds)")
    parser.add_argument("--synth", action="store_true", help="write the data set first")
    results = ROOT / "benchmarks/results/scale_build.json"
    parser.add_argument("--results", type=Path, default=results, help="results JSON")
    args = parser.parse_args()
    if args.synth:
        from pipelines.synth import synthesize

        synthesize(args.data, users=100_000, items=20_000, days=14, requests_per_user_day=0.72,
                   items_per_request=10)  # fmt: skip
    out = args.out or args.data.with_name(args.data.name + "-ds")
    load_avg = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BUILD, str(args.data), str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - t0  # includes the child's start (~1 s of imports)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rows = int(proc.stdout.strip().splitlines()[-1])
    report = {
        "command": " ".join(["benchmarks/scale_build.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "shared": True, "load_avg_at_start": load_avg},
        "impressions": rows,
        "build_seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "peak_rss_gib": round(peak / 2**30, 2),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
