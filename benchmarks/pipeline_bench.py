"""Training-set build and loader throughput: Polars (the project's pipeline) vs plain pandas.

    .venv/bin/python benchmarks/pipeline_bench.py [--rows 2000000] [--runs 3]

Jobs, each run ``--runs`` times in a fresh subprocess (peak RSS = that process's ru_maxrss):

- ``build/polars``: ``pipelines.training_set.build_training_set`` (validate, point-in-time joins
  of users and items onto the impressions, time split, write, fit mappings, manifest).
- ``build/pandas``: the same job written straightforwardly in pandas: ``read_parquet``, the same
  value checks, ``pd.merge_asof(by=key, tolerance=ttl)`` per entity, split by day, ``to_parquet``,
  vocabularies by ``value_counts`` and numeric mean/std. Its output is compared with Polars' on a
  sample of rows before any number is reported.
- ``load/streaming``: ``recsys_moe.training.loader.ParquetLoader`` over the train split, batch 4096,
  mapping included (Parquet → mapped ids → ``Batch`` with a ``KeyedJaggedTensor``).
- ``load/in-memory``: what ``recsys_moe.training.loader.MemoryLoader`` does: collect the split,
  ``apply_mappings``, ``to_tensor_data``, ``iterate_batches``.

Every job runs with ``OMP_WAIT_POLICY=PASSIVE``, except the one marked "(OMP spin)": on 2 cores
shared with other jobs, torch's OpenMP threads spinning for work (the default policy) starve the
loader's reader threads and cut its throughput several-fold.

Medians over the runs go to ``benchmarks/results/pipeline.json`` and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ROOT / "configs" / "features" / "synth.toml"
LABELS = {"click": "binary", "watch_time_s": "regression"}
VALID_DAYS, TEST_DAYS = 1, 1
DAYS, RATE, PER_REQUEST, ITEMS = 14, 0.72, 10, 5000  # ~100.8 impressions per user
SPLITS = ("train", "valid", "test")
BATCH = 4096


# ---- jobs (run in a child process: `pipeline_bench.py --job NAME DATA OUT`) --------------------


def job_build_polars(data: Path, out: Path) -> int:
    from feature_store import FeatureSet, OfflineStore
    from pipelines.training_set import build_training_set

    manifest = build_training_set(
        store=OfflineStore(data),
        out=out,
        features=FeatureSet.load(FEATURES),
        labels=LABELS,
        valid_days=VALID_DAYS,
        test_days=TEST_DAYS,
    )
    return sum(manifest["rows"].values())


def job_build_pandas(data: Path, out: Path) -> int:
    import numpy as np
    import pandas as pd

    from feature_store import FeatureSet

    features = FeatureSet.load(FEATURES)
    ev_def = features.events
    columns = list(dict.fromkeys([*ev_def.keys, ev_def.time, *features.input_columns, *LABELS]))
    ev = pd.read_parquet(data / f"{ev_def.table}.parquet")
    ev = ev[[c for c in ev.columns if c in columns]]
    for c in [*ev_def.keys, ev_def.time]:
        if ev[c].isna().any():
            raise ValueError(f"null {c}")
    if not ev["click"].isin([0, 1]).all():
        raise ValueError("click not 0/1")
    wt = ev["watch_time_s"]
    if wt.isna().any() or not np.isfinite(wt).all() or (wt < 0).any():
        raise ValueError("bad watch_time_s")

    ev["__row"] = np.arange(len(ev))
    ev = ev.sort_values(ev_def.time, kind="stable")
    for name, ent in features.entities.items():
        cols = [
            c for c in dict.fromkeys(f.column for f in features.for_entity(name)) if c != ent.key
        ]
        if not cols:
            continue
        table = pd.read_parquet(data / f"{ent.table}.parquet", columns=[ent.key, ent.time, *cols])
        table = table.dropna(subset=[ent.key, ent.time]).sort_values(ent.time, kind="stable")
        ev = pd.merge_asof(
            ev,
            table.rename(columns={ent.time: "__valid_from"}),
            left_on=ev_def.time,
            right_on="__valid_from",
            by=ent.key,
            direction="backward",
            tolerance=pd.Timedelta(ent.ttl),
        ).drop(columns="__valid_from")
    ev = ev.sort_values("__row").drop(columns="__row")[columns].reset_index(drop=True)

    day = ev[ev_def.time].dt.normalize()
    present = np.sort(day.unique())
    valid_start, test_start = present[-(VALID_DAYS + TEST_DAYS)], present[-TEST_DAYS]
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        "train": ev[day < valid_start],
        "valid": ev[(day >= valid_start) & (day < test_start)],
        "test": ev[day >= test_start],
    }
    for split, frame in parts.items():
        frame.to_parquet(out / f"{split}.parquet", index=False)

    train = parts["train"]
    vocabs, numeric = {}, {}
    for f in features.sparse:
        values = train[f.column].explode() if f.kind == "multi_categorical" else train[f.column]
        counts = values.dropna().value_counts()
        counts = counts[counts >= f.min_count].reset_index()
        counts.columns = ["value", "count"]
        counts = counts.sort_values(["count", "value"], ascending=[False, True])
        vocabs[f.name] = counts.head(f.num_embeddings - 1)
        vocabs[f.name].to_parquet(out / f"vocab_{f.name}.parquet", index=False)
    for f in features.dense:
        x = train[f.column].astype("float64")
        x = np.log1p(x) if f.transform == "log1p" else x
        numeric[f.name] = {"mean": float(x.mean()), "std": float(x.std(ddof=0))}
    (out / "numeric.json").write_text(json.dumps(numeric))
    return len(ev)


def _loader_setup(out: Path):
    from feature_store import FeatureSet
    from pipelines.mappings import Mappings

    features = FeatureSet.load(FEATURES)
    return features, Mappings.load(out / "mappings", features)


def job_load_streaming(data: Path, out: Path) -> int:
    from recsys_moe.training.loader import ParquetLoader

    features, _ = _loader_setup(out)
    loader = ParquetLoader.from_split(
        out, "train", features=features, labels=list(LABELS), batch_size=BATCH
    )
    return sum(len(b) for b in loader)


def job_load_in_memory(data: Path, out: Path) -> int:
    from recsys_moe.data import iterate_batches
    from recsys_moe.training.loader import read_mapped

    features, _ = _loader_setup(out)
    tensors = read_mapped(out, "train", features, list(LABELS))
    return sum(len(b) for b in iterate_batches(tensors, BATCH))


OMP_ACTIVE = " (OMP spin)"
JOBS = {
    "build/polars": job_build_polars,
    "build/pandas": job_build_pandas,
    "load/streaming": job_load_streaming,
    "load/streaming" + OMP_ACTIVE: job_load_streaming,
    "load/in-memory": job_load_in_memory,
}


def child(name: str, data: Path, out: Path) -> None:
    # Imports are not timed (a training process has them loaded already) and a build job does
    # not import torch, whose ~0.4 GB would count in its peak RSS.
    if name.startswith("load/"):
        import recsys_moe.training.loader  # noqa: F401  (torch, torchrec, polars, pyarrow)
    else:
        import pandas  # noqa: F401

        import pipelines.training_set  # noqa: F401
    t0 = time.perf_counter()
    rows = JOBS[name](data, out)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_bytes": peak}))


# ---- driver -------------------------------------------------------------------------------------


def run_job(name: str, data: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--job", name, str(data), str(out)]
    env = dict(os.environ)
    if name.endswith(OMP_ACTIVE):
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # see the module docstring
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synth(rows: int, work: Path) -> Path:
    from pipelines.synth import synthesize

    users = max(100, round(rows / (DAYS * RATE * PER_REQUEST)))
    data = work / f"synth-{users}u"
    if not (data / "meta.json").is_file():
        synthesize(data, users=users, items=ITEMS, days=DAYS, requests_per_user_day=RATE,
                   items_per_request=PER_REQUEST)  # fmt: skip
    return data


def check_same(polars_out: Path, pandas_out: Path, sample: int = 20_000) -> int:
    """Polars' and pandas' splits hold the same rows and values (checked on a sample of
    request ids in every split); returns the number of rows compared."""
    import polars as pl

    from pipelines.training_set import load_split

    compared = 0
    for split in SPLITS:
        a = load_split(polars_out, split).collect()
        b = pl.read_parquet(pandas_out / f"{split}.parquet")
        if a.height != b.height:
            raise AssertionError(f"{split}: {a.height} rows (Polars) vs {b.height} (pandas)")
        ids = a["request_id"].unique().sample(min(sample // 10, a["request_id"].n_unique()), seed=0)
        a = a.filter(pl.col("request_id").is_in(ids.implode()))
        b = b.filter(pl.col("request_id").is_in(ids.implode())).select(a.columns).cast(a.schema)
        if not a.equals(b):  # same order: both keep the events' order
            raise AssertionError(f"{split}: Polars and pandas outputs differ on the sample")
        compared += a.height
    return compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="impressions to synthesize")
    parser.add_argument("--runs", type=int, default=3, help="runs per job (median reported)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-moe-bench"),
                        help="where the synthetic data and outputs go")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pipeline.json",
                        help="results JSON")  # fmt: skip
    parser.add_argument("--job", nargs=3, metavar=("NAME", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:  # a child process: one job, one JSON line
        child(args.job[0], Path(args.job[1]), Path(args.job[2]))
        return

    data = synth(args.rows, args.work)
    outs = {"build/polars": args.work / "ds-polars", "build/pandas": args.work / "ds-pandas"}
    load_avg = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in JOBS}
    for _ in range(args.runs):
        for name in JOBS:
            out = outs.get(name, outs["build/polars"])
            runs[name].append(run_job(name, data, out))
        if not runs.get("checked"):
            runs["checked"] = [{"rows": check_same(outs["build/polars"], outs["build/pandas"])}]

    results = {}
    for name in JOBS:
        seconds = statistics.median(r["seconds"] for r in runs[name])
        peak = statistics.median(r["peak_rss_bytes"] for r in runs[name])
        rows = runs[name][0]["rows"]
        results[name] = {
            "rows": rows,
            "median_seconds": round(seconds, 3),
            "min_seconds": round(min(r["seconds"] for r in runs[name]), 3),
            "rows_per_s": round(rows / seconds),
            "median_peak_rss_mib": round(peak / 2**20),
            "runs_seconds": [round(r["seconds"], 3) for r in runs[name]],
        }
    report = {
        "command": " ".join(["benchmarks/pipeline_bench.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "shared": "yes: other engineers' jobs ran concurrently",
            "load_avg_at_start": [round(x, 2) for x in load_avg],
            "python": platform.python_version(),
        },
        "versions": _versions(),
        "data": {"impressions": args.rows, "dir": str(data)},
        "checked_rows_equal": runs["checked"][0]["rows"],
        "results": results,
        "ratio_polars_over_pandas_build": round(
            results["build/pandas"]["median_seconds"] / results["build/polars"]["median_seconds"], 2
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def _versions() -> dict[str, str]:
    import pandas as pd
    import polars as pl
    import pyarrow as pa
    import torch

    return {"polars": pl.__version__, "pandas": pd.__version__, "pyarrow": pa.__version__,
            "torch": torch.__version__}  # fmt: skip


def table(report: dict) -> str:
    lines = [
        "| job | rows | median s | rows/s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['rows']:,} | {r['median_seconds']:.2f} | {r['rows_per_s']:,} "
                     f"| {r['median_peak_rss_mib']:,} |")  # fmt: skip
    lines.append(f"\nbuild speed-up Polars / pandas: {report['ratio_polars_over_pandas_build']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
