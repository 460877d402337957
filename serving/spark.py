"""Candidate scoring in Spark, for candidate sets that outgrow one machine: the registered pyfunc
through ``mlflow.pyfunc.spark_udf``.

The same three steps as ``recsys-moe score`` (``serving.score``), as Spark DataFrame operations:

1. every entity's features in effect at ONE scoring time: per key the row with the greatest
   ``valid_from <= as_of``, dropped when older than the entity's TTL (those candidates are scored
   on the unknown path, as in the job), left-joined onto the candidates by key;
2. the registered model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) as a pandas UDF over
   the signature's columns, one struct column of the task outputs (``p_click``,
   ``watch_time_s``), and the job's combined score ``prod_t p_t ** w_t * (1 + y_t) ** w_t``;
3. the top K per request (per user without ``request_id``) by a window function, ranked by score,
   ties by item id (the job's order).

pyspark is an optional dependency (``requirements/spark.txt``); the executors' Python needs this
project and its pinned stack (``env_manager="local"``: the interpreter Spark starts,
``PYSPARK_PYTHON``). Times are compared as ``timestamp_ntz``: run the session with
``spark.sql.session.timeZone=UTC``, the store's convention (naive UTC times).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from feature_store import FeatureSet, OfflineStore
from recsys_moe.config import TaskConfig

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession


def _ntz(value: object) -> Column:
    from pyspark.sql import functions as F

    return F.lit(value).cast("timestamp_ntz")


def features_as_of(
    spark: SparkSession, store: OfflineStore, features: FeatureSet, entity: str, as_of: datetime
) -> DataFrame:
    """``entity``'s live feature rows at ``as_of``: its key and joined columns, one row per key
    (the latest ``valid_from <= as_of``, not older than the TTL)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ent = features.entities[entity]
    path = store.path(ent.table)
    table = spark.read.parquet(str(path / "**" / "*.parquet") if path.is_dir() else str(path))
    t = F.col(ent.time).cast("timestamp_ntz")
    latest = Window.partitionBy(ent.key).orderBy(t.desc())
    rows = (
        table.where(t <= _ntz(as_of.isoformat()))
        .withColumn("__n", F.row_number().over(latest))
        .where(F.col("__n") == 1)
    )
    if ent.ttl is not None:  # age > TTL: expired (age == TTL still in effect, as in the join)
        rows = rows.where(t >= _ntz((as_of - ent.ttl).isoformat()))
    return rows.select(ent.key, *features.joined_columns(entity))


def combined_score(tasks: list[TaskConfig], weights: dict[str, float]) -> Column:
    """``serving.model.combined_score`` as a Spark column."""
    from pyspark.sql import functions as F

    from recsys_moe.model.objectives import output_name

    expr = F.lit(1.0)
    for t in tasks:
        w = weights.get(t.name, 0.0)
        if w == 0.0:
            continue
        col = F.col(output_name(t))
        base = F.greatest(col, F.lit(0.0)) if t.kind == "binary" else col + 1.0
        expr = expr * F.pow(base, F.lit(w))
    return expr


def score_spark(
    spark: SparkSession,
    *,
    model_uri: str,
    candidates: DataFrame,
    store: str | Path,
    features: FeatureSet,
    tasks: list[TaskConfig],
    weights: dict[str, float],
    as_of: datetime,
    top_k: int,
) -> DataFrame:
    """The top ``top_k`` candidates per request (per user without ``request_id``), with the
    registered model's predictions, ``score`` and ``rank`` (1 = best). Lazy: nothing runs until
    the result is written or collected. The model is the registry's ``model_uri`` (the tracking
    and registry URI set in this process)."""
    import mlflow
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from recsys_moe.model.objectives import output_name

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    group = "request_id" if "request_id" in candidates.columns else "user_id"
    ids = [c for c in ("request_id", "user_id", "item_id") if c in candidates.columns]
    st = OfflineStore(Path(store))
    rows = candidates.select(*ids).dropDuplicates([group, "item_id"])
    for name in features.entities:
        if features.joined_columns(name):
            feats = features_as_of(spark, st, features, name, as_of)
            rows = rows.join(feats, on=features.entities[name].key, how="left")
    # a list column of an entity without a live row is null: the signature admits None in list
    # columns and the model reads it as the empty bag (serving.pyfunc)
    outputs = [output_name(t) for t in tasks]
    udf = mlflow.pyfunc.spark_udf(
        spark, model_uri, result_type=", ".join(f"{o} double" for o in outputs),
        env_manager="local",
    )  # fmt: skip
    scored = (
        rows.withColumn("__pred", udf(*[F.col(c) for c in features.input_columns]))
        .select(*ids, *[F.col(f"__pred.{o}").alias(o) for o in outputs])
        .withColumn("score", combined_score(tasks, weights))
    )
    order = Window.partitionBy(group).orderBy(F.col("score").desc(), F.col("item_id").asc())
    return scored.withColumn("rank", F.row_number().over(order).cast("int")).where(
        F.col("rank") <= top_k
    )
