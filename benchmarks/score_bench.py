"""Candidate scoring throughput: the scoring job vs a pandas loop over the registered pyfunc.

    .venv/bin/recsys-moe demo --workdir demo-run          # once: store + registered model
    .venv/bin/python benchmarks/score_bench.py --work demo-run [--pairs 1000000] [--runs 3]

Both score the same candidates (``--pairs`` (user, item) pairs in requests of 100, users and
items drawn from the store, seeded; a folder of 4 Parquet files under ``WORK/bench-score/``) with
the same registered version, as of the store's latest feature time, and keep the top 10 per
request:

- ``ours``: ``serving.score.score`` (what ``recsys-moe score`` runs): features as of one time
  mapped and passed through the embedding tower once per user and item, gathered per candidate.
- ``peer``: the straightforward job: ``mlflow.pyfunc.load_model``, the users' and items' rows in
  effect at the as-of time (pandas, TTL applied), then per chunk of 100,000 candidates
  (``pyarrow`` ``iter_batches`` → pandas) two ``merge``s and ``pyfunc.predict``, the combined
  score, and at the end ``sort_values`` + ``groupby().head(10)``.

Each run is a fresh subprocess (model load included, ``OMP_WAIT_POLICY=PASSIVE`` as in the other
benchmarks), ours and the peer's alternating; the two outputs are compared (same top-10 rows,
scores within 1e-5 relative: the pyfunc's signature casts some inputs to float32) before any
figure is reported. Medians go to
``benchmarks/results/score_bench.json`` and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_REQUEST, TOP_K, FILES, CHUNK = 100, 10, 4, 100_000


def write_candidates(work: Path, pairs: int, seed: int = 0) -> Path:
    import numpy as np
    import polars as pl

    out = work / "bench-score" / f"candidates-{pairs}"
    if out.is_dir():
        return out
    store = work / "data"
    users = pl.read_parquet(store / "users.parquet")["user_id"].unique().sort().to_numpy()
    items = pl.read_parquet(store / "items.parquet")["item_id"].unique().sort().to_numpy()
    rng = np.random.default_rng(seed)
    requests = -(-pairs // PER_REQUEST)
    frame = pl.DataFrame(
        {
            "request_id": np.repeat(np.arange(requests, dtype=np.int64), PER_REQUEST)[:pairs],
            "user_id": np.repeat(rng.choice(users, requests), PER_REQUEST)[:pairs],
            "item_id": rng.choice(items, pairs),
        }
    ).unique(["request_id", "item_id"], maintain_order=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    step = -(-frame.height // FILES)
    for i in range(FILES):
        frame.slice(i * step, step).write_parquet(tmp / f"part-{i}.parquet")
    tmp.rename(out)
    return out


def job_ours(work: Path, model: str, cands: Path, out: Path, sets: list[str] | None = None) -> dict:
    from recsys_moe.config import DEMO_CONFIG, load_config
    from serving.score import score

    cfg = load_config(DEMO_CONFIG, sets or [], workdir=work)
    m = score(model_uri=model, candidates=cands, output=out, top_k=TOP_K, cfg=cfg)
    return {"pairs": m["candidate_rows"], "as_of": m["as_of"], "version": m["model_version"],
            "shards": len(m["shards"])}  # fmt: skip


def job_peer(work: Path, model: str, cands: Path, out: Path) -> dict:
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from recsys_moe.config import DEMO_CONFIG, load_config
    from recsys_moe.tracking import use_tracking_uri

    cfg = load_config(DEMO_CONFIG, [], workdir=work)
    use_tracking_uri(cfg.tracking_uri())
    pyfunc = mlflow.pyfunc.load_model(model)
    bundle = pyfunc.unwrap_python_model().bundle
    feats = bundle.features
    as_of = None
    tables = {}
    for name, ent in feats.entities.items():
        t = pd.read_parquet(cfg.store_dir / f"{ent.table}.parquet")
        as_of = max(as_of or t[ent.time].max(), t[ent.time].max())
        tables[name] = (ent, t)
    frames = {}
    for name, (ent, t) in tables.items():
        t = t[t[ent.time] <= as_of].sort_values(ent.time).groupby(ent.key).tail(1)
        if ent.ttl is not None:
            t = t[as_of - t[ent.time] <= ent.ttl]
        cols = [c for c in feats.joined_columns(name)]
        frames[name] = t[[ent.key, *cols]]
    weights = cfg.score.weights
    parts = []
    for f in sorted(cands.glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK):
            df = batch.to_pandas()
            for name, ent in feats.entities.items():
                if name in frames:
                    df = df.merge(frames[name], on=ent.key, how="left")
            preds = pyfunc.predict(df[list(feats.input_columns)])
            s = (preds["p_click"].clip(lower=0) ** weights.get("click", 0.0)) * (
                (1 + preds["watch_time_s"]) ** weights.get("watch_time", 0.0)
            )
            parts.append(
                df[["request_id", "user_id", "item_id"]].assign(
                    p_click=preds["p_click"].to_numpy(),
                    watch_time_s=preds["watch_time_s"].to_numpy(),
                    score=s.to_numpy(),
                )
            )
    scored = pd.concat(parts, ignore_index=True)
    top = (
        scored.sort_values(["request_id", "score", "item_id"], ascending=[True, False, True])
        .groupby("request_id")
        .head(TOP_K)
    )
    out.mkdir(parents=True, exist_ok=True)
    top.to_parquet(out / "top.parquet", index=False)
    return {"pairs": len(scored), "as_of": str(as_of)}


def int8_change(work: Path, model: str) -> dict:
    """Click AUC and watch-time RMSE (clicked rows, seconds) of the model with fp32 and with int8
    embedding tables on the training set's test split (labelled rows, raw features)."""
    import mlflow
    import numpy as np
    import polars as pl

    from recsys_moe.config import DEMO_CONFIG, load_config
    from recsys_moe.evaluation.metrics import auc
    from recsys_moe.evaluation.predict import predict_frame
    from recsys_moe.tracking import use_tracking_uri
    from serving.quantize import quantize_embeddings

    cfg = load_config(DEMO_CONFIG, [], workdir=work)
    use_tracking_uri(cfg.tracking_uri())
    b = mlflow.pyfunc.load_model(model).unwrap_python_model().bundle
    rows = pl.read_parquet(cfg.dataset_dir / "test.parquet")
    out = {"rows": rows.height}
    click = rows["click"].to_numpy()
    clicked = click == 1
    for name, m in (("fp32", b.model), ("int8", quantize_embeddings(b.model))):
        p = predict_frame(m, b.features, b.mappings, b.config.tasks, rows, batch_size=8192)
        w = rows["watch_time_s"].to_numpy()[clicked]
        out[f"{name}_click_auc"] = auc(p["p_click"], click)
        out[f"{name}_watch_time_rmse_s"] = float(
            np.sqrt(np.mean((p["watch_time_s"][clicked] - w) ** 2))
        )
    out["click_auc_change"] = out["int8_click_auc"] - out["fp32_click_auc"]
    out["watch_time_rmse_change_s"] = out["int8_watch_time_rmse_s"] - out["fp32_watch_time_rmse_s"]
    return out


def same_top_k(ours: Path, peer: Path) -> dict:
    import numpy as np
    import polars as pl

    a = pl.read_parquet(sorted(ours.glob("part-*.parquet"))).sort("request_id", "rank")
    b = pl.read_parquet(peer / "top.parquet").sort("request_id", "score", descending=[False, True])
    same_rows = (
        a.select("request_id", "item_id")
        .sort(pl.all())
        .equals(b.select("request_id", "item_id").sort(pl.all()))
    )
    j = a.join(b, on=["request_id", "item_id"], suffix="_peer")
    x, y = j["score"].to_numpy(), j["score_peer"].to_numpy()
    diff = float((np.abs(x - y) / np.abs(y)).max())
    return {"same_rows": bool(same_rows), "rows": a.height, "max_relative_score_diff": diff}


def run_child(
    kind: str, work: Path, model: str, cands: Path, out: Path, sets: tuple[str, ...] = ()
) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--job", kind, "--work", str(work), "--model", model,
         "--cands", str(cands), "--out", str(out), *[f"--set={x}" for x in sets]],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "demo-run", help="a demo workdir")
    ap.add_argument("--model", default="models:/recsys-moe-demo@champion")
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/score_bench.json")
    ap.add_argument("--int8", action="store_true", help="only the int8-vs-fp32 accuracy check")
    ap.add_argument(
        "--memory", action="store_true",
        help="only ours' peak RSS at --pairs and 4x --pairs, score.shard_rows = --shard-rows",
    )  # fmt: skip
    ap.add_argument("--shard-rows", type=int, default=250_000)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--cands", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work.resolve()
    if args.job:  # a child: one job, its result as the last stdout line
        import resource

        if args.job == "ours":
            res = job_ours(work, args.model, args.cands, args.out, args.set)
        else:
            res = job_peer(work, args.model, args.cands, args.out)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res | {"peak_rss_mib": rss}))
        return
    if args.int8:
        change = int8_change(work, args.model)
        path = args.json.with_name("score_int8.json")
        path.write_text(json.dumps(change, indent=2))
        print(json.dumps(change, indent=2), f"\nwrote {path}")
        return
    if args.memory:
        memory(work, args)
        return
    cands = write_candidates(work, args.pairs)
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    check = None
    for r in range(args.runs):
        for kind in ("ours", "peer"):
            out = work / "bench-score" / f"out-{kind}-{r}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            res = run_child(kind, work, args.model, cands, out)
            runs[kind].append(res)
            print(f"run {r} {kind}: {res['pairs']:,} pairs in {res['wall_s']:.1f} s", flush=True)
        if check is None:
            check = same_top_k(
                work / "bench-score" / "out-ours-0", work / "bench-score" / "out-peer-0"
            )
            if not check["same_rows"] or check["max_relative_score_diff"] > 1e-5:
                raise SystemExit(f"outputs differ, no figures reported: {check}")
    rows = {}
    for kind, rs in runs.items():
        walls = [x["wall_s"] for x in rs]
        med = statistics.median(walls)
        rows[kind] = {"pairs": rs[0]["pairs"], "median_s": med, "min_s": min(walls),
                      "max_s": max(walls), "pairs_per_s": rs[0]["pairs"] / med,
                      "peak_rss_mib": max(x["peak_rss_mib"] for x in rs)}  # fmt: skip
    ratio = rows["ours"]["pairs_per_s"] / rows["peer"]["pairs_per_s"]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
        "pairs": args.pairs, "runs": args.runs, "top_k": TOP_K, "model": args.model,
        "check": check, "jobs": rows, "ours_over_peer": ratio,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print("\n| job | pairs | median s | min s | max s | pairs/s | × peer | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, r in rows.items():
        x = r["pairs_per_s"] / rows["peer"]["pairs_per_s"]
        print(f"| {kind} | {r['pairs']:,} | {r['median_s']:.1f} | {r['min_s']:.1f} | "
              f"{r['max_s']:.1f} | {r['pairs_per_s']:,.0f} | {x:.2f} | "
              f"{r['peak_rss_mib']:,.0f} |")  # fmt: skip
    print(f"\nsame top {TOP_K}: {check}; wrote {args.json}")


def memory(work: Path, args: argparse.Namespace) -> None:
    """Peak RSS of the scoring job at 1x and 4x the candidates, the same shard size: candidates
    are streamed (one row group, then one shard at a time), so the peak should not grow with
    them; what stays in memory is the model and the users' and items' tower rows."""
    sets = (f"score.shard_rows={args.shard_rows}",)
    rows = {}
    for scale in (1, 4):
        cands = write_candidates(work, args.pairs * scale)
        res = []
        for r in range(args.runs):
            out = work / "bench-score" / f"out-memory-{scale}x"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            res.append(run_child("ours", work, args.model, cands, out, sets))
            print(f"{scale}x run {r}: {res[-1]['pairs']:,} pairs, {res[-1]['shards']} shards, "
                  f"{res[-1]['wall_s']:.1f} s, peak RSS {res[-1]['peak_rss_mib']:,.0f} MiB",
                  flush=True)  # fmt: skip
        walls = [x["wall_s"] for x in res]
        rows[f"{scale}x"] = {
            "pairs": res[0]["pairs"], "shards": res[0]["shards"],
            "median_s": statistics.median(walls),
            "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in res),
            "peak_rss_mib_runs": [x["peak_rss_mib"] for x in res],
        }  # fmt: skip
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}",
        "work": str(work), "model": args.model, "shard_rows": args.shard_rows, "runs": args.runs,
        "jobs": rows,
        "rss_4x_over_1x": rows["4x"]["peak_rss_mib"] / rows["1x"]["peak_rss_mib"],
    }  # fmt: skip
    path = args.json.with_name("score_memory.json")
    path.write_text(json.dumps(result, indent=2))
    print("\n| candidates | pairs | shards | median s | pairs/s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, r in rows.items():
        print(f"| {k} | {r['pairs']:,} | {r['shards']} | {r['median_s']:.1f} | "
              f"{r['pairs'] / r['median_s']:,.0f} | {r['peak_rss_mib']:,.0f} |")  # fmt: skip
    print(f"\n4x / 1x peak RSS: {result['rss_4x_over_1x']:.3f}; wrote {path}")


if __name__ == "__main__":
    main()
