"""Scoring in Spark (``serving.spark``): the registered pyfunc through ``mlflow.pyfunc.spark_udf``
on a local Spark session gives the same top K, predictions, scores and counts as ``recsys-moe
score`` on the same candidates, including candidates whose user or item is unknown to the store,
whose user's features are past the TTL (all scored on the unknown path), repeated pairs and null
ids (dropped and counted), and an item whose integer ``author`` id is above 2**53 next to unknown
items' null ``author`` in the same Arrow batch. The output protocol: a manifest, a rerun that
skips, another run's output refused, an output inside an input refused, too many candidates
without features failing the job with nothing written.

pyspark comes from ``make spark-setup`` (requirements/spark.txt; needs Java 17). Without it the
tests are skipped, or fail where ``RECSYS_MOE_REQUIRE_SPARK=1`` (CI, .ci/run).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from fixtures import registered_model

from feature_store import DataError
from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.tracking import client_for
from serving.output import sha256
from serving.score import score

REQUIRE_SPARK = "RECSYS_MOE_REQUIRE_SPARK"  # "1" (CI): pyspark missing fails the test
TINY = [
    "synth.users=300",
    "synth.items=60",
    "synth.days=3",
    "train.epochs=1",
    "train.batch_size=256",
    "train.log_every=50",
    "mlflow.experiment=spark",
    "mlflow.registered_model=spark-model",
    "eval.bootstrap=0",  # register needs test metrics, not their intervals
]
TOP_K = 4
UNKNOWN = 10**9
BIG_AUTHOR = 2**53 + 1  # a float64 would round it to 2**53
pytestmark = [pytest.mark.spark, pytest.mark.slow]  # trains a model, starts Spark (~2-3 min)


def _pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        if os.environ.get(REQUIRE_SPARK) == "1":
            pytest.fail(f"pyspark is not installed and {REQUIRE_SPARK}=1: run make spark-setup")
        pytest.skip(f"pyspark not installed (make spark-setup); with {REQUIRE_SPARK}=1 a failure")


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    _pyspark()
    from pyspark.sql import SparkSession

    before = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers import this venv's packages
    session = (
        SparkSession.builder.master("local[1]")  # one Python worker: one model load
        .appName("recsys-moe-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if before is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = before


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny registered model; a store in which the first 20 users' rows are 500 days older
    (past the 400-day TTL) and one item's author is ``BIG_AUTHOR``; candidates (a folder) with
    every 7th row's user and every 5th row's item unknown to the store, 9 repeated pairs, 3
    rows with a null id and a request of 2 candidates; ``recsys-moe score``'s output and
    manifest on them."""
    _pyspark()
    work = tmp_path_factory.mktemp("spark")
    m = registered_model(work, TINY)
    store = work / "aged-store"
    store.mkdir()
    users = pl.read_parquet(m.cfg.store_dir / "users.parquet")
    old = users["user_id"].unique().sort().head(20)
    users.with_columns(
        pl.when(pl.col("user_id").is_in(old.implode()))
        .then(pl.col("valid_from") - timedelta(days=500))
        .otherwise(pl.col("valid_from"))
    ).write_parquet(store / "users.parquet")
    cands = pl.read_parquet(m.cfg.store_dir / "candidates.parquet")
    requests = cands["request_id"].unique().sort().head(150)
    cands = cands.filter(pl.col("request_id").is_in(requests.implode())).with_row_index("i")
    big = cands["item_id"][1]  # scored in a batch with unknown items (null author): Int64
    items = pl.read_parquet(m.cfg.store_dir / "items.parquet")
    items.with_columns(
        author=pl.when(pl.col("item_id") == big).then(BIG_AUTHOR).otherwise(pl.col("author"))
    ).write_parquet(store / "items.parquet")
    cands = cands.with_columns(
        user_id=pl.when(pl.col("i") % 7 == 0).then(pl.col("user_id") + UNKNOWN)
        .otherwise(pl.col("user_id")),
        item_id=pl.when(pl.col("i") % 5 == 0).then(pl.col("item_id") + UNKNOWN)
        .otherwise(pl.col("item_id")),
    ).drop("i")  # fmt: skip
    nulls = cands.head(3).with_columns(
        user_id=pl.Series([None, 1, 1], dtype=pl.Int64),
        item_id=pl.Series([1, None, 1], dtype=pl.Int64),
        request_id=pl.Series([1, 1, None], dtype=pl.Int64),
    )
    folder = work / "candidates"
    folder.mkdir()
    cands.slice(0, 500).write_parquet(folder / "a.parquet")
    short = cands.slice(10, 2).with_columns(request_id=pl.lit(10**12, pl.Int64))  # 2 < K
    pl.concat([cands.slice(500), cands.slice(100, 9), nulls, short]).write_parquet(
        folder / "b.parquet"
    )
    cfg = load_config(
        DEMO_CONFIG, [*TINY, "score.max_missing_share=0.5", f"data.store={store}"],
        workdir=m.cfg.workdir,
    )  # fmt: skip
    as_of = datetime.fromisoformat(m.meta["scoring_time"])
    job = score(model_uri=m.reg.uri, candidates=folder, output=work / "job", top_k=TOP_K,
                cfg=cfg, as_of=as_of)  # fmt: skip
    rows = pl.read_parquet(list((work / "job").glob("part-*.parquet")))
    return SimpleNamespace(cfg=cfg, reg=m.reg, work=work, folder=folder, as_of=as_of, job=job,
                           rows=rows)  # fmt: skip


@pytest.fixture(scope="module")
def spark_run(spark: object, run: SimpleNamespace) -> SimpleNamespace:
    from serving.spark import score_spark

    client_for(run.cfg)  # this process's tracking (and registry) URI: the test's SQLite store
    out = run.work / "spark-scores"
    manifest = score_spark(spark, cfg=run.cfg, model_uri=run.reg.uri, candidates=run.folder,
                           output=out, top_k=TOP_K, as_of=run.as_of)  # fmt: skip
    return SimpleNamespace(out=out, manifest=manifest)


def test_spark_job_equals_the_scoring_job(run: SimpleNamespace, spark_run: SimpleNamespace) -> None:
    job, m = run.job, spark_run.manifest
    assert not m["skipped"]
    # every path exercised: unknown and expired users, unknown items, repeats, null ids
    assert m["unknown_users"] > 0 and m["expired_user_features"] > 0 and m["unknown_items"] > 0
    assert m["duplicates_dropped"] == 9 and m["null_ids_dropped"] == 3
    assert m["short_requests"] == 1
    # the counts, model, features and as-of keys: exactly the scoring job's
    shared = set(job) & set(m) - {"files", "candidates", "output"}
    assert {"unknown_items", "expired_features", "missing_features", "coverage", "groups",
            "rows", "model_run_id", "features_fingerprint", "as_of"} <= shared  # fmt: skip
    assert {k: m[k] for k in shared} == {k: job[k] for k in shared}

    files = sorted(p.name for p in spark_run.out.glob("part-*.parquet"))
    assert m["files"] == files and sum(p["rows"] for p in m["parts"]) == m["rows"]
    assert all(p["sha256"] == sha256(spark_run.out / p["file"]) for p in m["parts"])
    assert json.loads((spark_run.out / "_manifest.json").read_text()) == {
        k: v for k, v in m.items() if k not in ("output", "skipped")
    }
    assert not list(run.work.glob(".spark-scores.*"))  # no temporary sibling left

    got = pl.read_parquet([spark_run.out / f for f in files])
    assert got.schema == run.rows.schema  # the same columns and types as the job's parts
    keys = ["request_id", "item_id"]
    assert got.height == run.rows.height == job["rows"]
    cols = [*keys, "user_id", "ts", "rank"]
    assert got.select(cols).sort(keys).equals(run.rows.select(cols).sort(keys))
    both = got.sort(keys).join(run.rows.sort(keys), on=keys, suffix="_job", maintain_order="left")
    # float32 model outputs: the pandas UDF's batches are not the job's, so a few rows' matmuls
    # round differently in the last bits (2 of 602 rows here, relative 2.5e-7)
    for col in ("p_click", "watch_time_s", "score"):
        a, b = both[col].to_numpy(), both[f"{col}_job"].to_numpy()
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=col)
        assert (a == b).mean() > 0.9, col
    assert both.filter(pl.col("item_id") >= UNKNOWN).height > 0


def test_spark_rerun_skips_and_another_run_is_refused(
    spark: object, run: SimpleNamespace, spark_run: SimpleNamespace
) -> None:
    from serving.spark import score_spark

    before = {p.name: p.stat().st_mtime_ns for p in spark_run.out.iterdir()}
    again = score_spark(spark, cfg=run.cfg, model_uri=run.reg.uri,
                        candidates=spark.read.parquet(str(run.folder)), output=spark_run.out,
                        top_k=TOP_K, as_of=run.as_of)  # fmt: skip
    assert again["skipped"] and again["files"] == spark_run.manifest["files"]
    assert {p.name: p.stat().st_mtime_ns for p in spark_run.out.iterdir()} == before
    with pytest.raises(ValueError, match=r"holds scores of another run \(as_of: .*overwrite=True"):
        score_spark(spark, cfg=run.cfg, model_uri=run.reg.uri, candidates=run.folder,
                    output=spark_run.out, top_k=TOP_K,
                    as_of=run.as_of - timedelta(hours=1))  # fmt: skip
    fewer = run.work / "fewer"
    fewer.mkdir()
    pl.read_parquet(run.folder / "a.parquet").write_parquet(fewer / "a.parquet")
    with pytest.raises(ValueError, match=r"holds scores of another run \(candidates: "):
        score_spark(spark, cfg=run.cfg, model_uri=run.reg.uri, candidates=fewer,
                    output=spark_run.out, top_k=TOP_K, as_of=run.as_of)  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in spark_run.out.iterdir()} == before


def test_spark_job_refusals_write_nothing(
    spark: object, run: SimpleNamespace, spark_run: SimpleNamespace
) -> None:
    from serving.spark import score_spark

    def job(output: Path, cfg: object = run.cfg, as_of: datetime = run.as_of) -> dict:
        return score_spark(spark, cfg=cfg, model_uri=run.reg.uri, candidates=run.folder,
                           output=output, top_k=TOP_K, as_of=as_of)  # fmt: skip

    with pytest.raises(ValueError, match=r"output .*/candidates/out sits inside the candidates"):
        job(run.folder / "out")
    with pytest.raises(ValueError, match=r"output .* sits inside the store"):
        job(run.cfg.store_dir / "scores")
    # the config's share of candidates without features (1 %): the job fails before scoring,
    # naming the counts, as recsys-moe score does
    strict = load_config(DEMO_CONFIG, [*TINY, f"data.store={run.cfg.store_dir}"],
                         workdir=run.cfg.workdir)  # fmt: skip
    assert strict.score.max_missing_share == 0.01
    with pytest.raises(DataError, match=r"lack features, above score.max_missing_share \(1%\)"
                       r".*unknown_users \d+.*Nothing written"):  # fmt: skip
        job(run.work / "strict", cfg=strict)
    assert not (run.work / "strict").exists() and not list(run.work.glob(".strict.*"))
    with pytest.raises(DataError, match="before the first feature row"):
        job(run.work / "early", as_of=datetime(2000, 1, 1))
