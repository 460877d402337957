"""Scoring in Spark (``serving.spark``): the registered pyfunc through ``mlflow.pyfunc.spark_udf``
on a local Spark session gives the same top K, predictions and scores as ``recsys-moe score`` on
the same candidates, including candidates whose user is unknown to the store or whose features
are past the TTL (both scored on the unknown path).

pyspark comes from ``make spark-setup`` (requirements/spark.txt; needs Java 17). Without it the
test is skipped, or fails where ``RECSYS_MOE_REQUIRE_SPARK=1`` (CI, .ci/run).
"""

from __future__ import annotations

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

from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.tracking import client_for
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
pytestmark = [pytest.mark.spark, pytest.mark.slow]  # trains a model, starts Spark (~1-3 min)


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
    (past the 400-day TTL); candidates with every 7th row's user unknown to the store."""
    _pyspark()
    work = tmp_path_factory.mktemp("spark")
    m = registered_model(work, TINY)
    cfg = m.cfg
    store = work / "aged-store"
    store.mkdir()
    (store / "items.parquet").write_bytes((cfg.store_dir / "items.parquet").read_bytes())
    users = pl.read_parquet(cfg.store_dir / "users.parquet")
    old = users["user_id"].unique().sort().head(20)
    users.with_columns(
        pl.when(pl.col("user_id").is_in(old.implode()))
        .then(pl.col("valid_from") - timedelta(days=500))
        .otherwise(pl.col("valid_from"))
    ).write_parquet(store / "users.parquet")
    cands = pl.read_parquet(cfg.store_dir / "candidates.parquet")
    requests = cands["request_id"].unique().sort().head(150)
    cands = (
        cands.filter(pl.col("request_id").is_in(requests.implode()))
        .with_row_index("i")
        .with_columns(
            user_id=pl.when(pl.col("i") % 7 == 0).then(pl.col("user_id") + 10**9)
            .otherwise(pl.col("user_id"))
        )
        .drop("i")
    )  # fmt: skip
    path = work / "candidates.parquet"
    cands.write_parquet(path)
    return SimpleNamespace(cfg=cfg, meta=m.meta, reg=m.reg, store=store, cands=cands, path=path)


def test_spark_udf_top_k_equals_the_scoring_job(
    spark: object, run: SimpleNamespace, tmp_path: Path
) -> None:
    import mlflow

    from serving.spark import score_spark

    cfg = load_config(
        DEMO_CONFIG, [*TINY, "score.max_missing_share=0.5", f"data.store={run.store}"],
        workdir=run.cfg.workdir,
    )  # fmt: skip
    as_of = datetime.fromisoformat(run.meta["scoring_time"])
    m = score(model_uri=run.reg.uri, candidates=run.path, output=tmp_path / "job", top_k=TOP_K,
              cfg=cfg, as_of=as_of)  # fmt: skip
    assert m["unknown_users"] > 0 and m["expired_user_features"] > 0  # both paths exercised
    job = pl.read_parquet(list((tmp_path / "job").glob("part-*.parquet")))

    client_for(cfg)  # this process's tracking (and registry) URI: the test's SQLite store
    assert run.reg.uri.endswith("@champion")
    features = mlflow.pyfunc.load_model(run.reg.uri).unwrap_python_model().bundle.features
    top = score_spark(
        spark, model_uri=run.reg.uri, candidates=spark.createDataFrame(run.cands.to_pandas()),
        store=run.store, features=features, tasks=cfg.tasks, weights=cfg.score.weights,
        as_of=as_of, top_k=TOP_K,
    ).toPandas()  # fmt: skip
    got = pl.from_pandas(top)

    keys = ["request_id", "item_id"]
    assert got.height == job.height == m["rows"]
    assert (
        got.select(*keys, "user_id", "rank")
        .sort(keys)
        .equals(job.select(*keys, "user_id", "rank").sort(keys))
    )
    both = got.sort(keys).join(job.sort(keys), on=keys, suffix="_job", maintain_order="left")
    for col in ("p_click", "watch_time_s", "score"):
        a, b = both[col].to_numpy(), both[f"{col}_job"].to_numpy()
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=col)
    # unknown users (every 7th candidate) got the unknown path's scores, not a failure or NaN
    unknown = both.filter(pl.col("user_id") >= 10**9)
    assert unknown.height > 0
