"""Candidate scoring in Spark, for candidate sets that outgrow one machine: the registered pyfunc
through ``mlflow.pyfunc.spark_udf``, with the contract of ``recsys-moe score`` (``serving.score``)
as far as Spark allows.

The same steps as the scoring job, as Spark DataFrame operations:

1. candidates with a null id dropped, repeated (request, item) pairs (user, item without
   ``request_id``) dropped, both counted;
2. every entity's features in effect at ONE scoring time (``as_of``, default the store's latest
   feature time, never the wall clock; one before the store's first row is refused): per key the
   row with the greatest ``valid_from <= as_of``, its columns nulled when older than the entity's
   TTL (expired), left-joined onto the candidates by key (no row: unknown). Both are scored on the
   unknown path and counted;
3. the counts (``unknown_users``, ``unknown_items``, ``expired_<entity>_features``,
   ``expired_features``, ``missing_features``, ``null_ids_dropped``, ``duplicates_dropped``,
   ``short_requests``, ``groups``, ``rows``) in ONE Spark aggregation, before any model runs;
   above ``score.max_missing_share`` the job fails as the scoring job does
   (``serving.asof.check_missing_share``), and nothing is written;
4. the registered model (``models:/NAME@ALIAS`` resolved once to ``models:/NAME/VERSION``) as a
   pandas UDF over the signature's columns, the combined score (``serving.model.combined_score``
   as a Spark column), the top K per request (per user without ``request_id``) by
   ``row_number()`` ranked by score, ties by item id (the job's order).

Output protocol. Spark writes the parts into a hidden sibling of ``output``
(``pipelines.atomic.replacing_dir``); the predictions and scores are checked finite, then
``_run.json`` (what the output is: model version and run, feature fingerprint, as-of, store, a
fingerprint of the candidates, K, weights) and ``_manifest.json`` (the scoring job's keys where
they apply, and per part file its rows and sha256) are written into it, the manifest last, and
the folder is renamed into place: no partial output is ever visible under ``output``. A rerun
whose ``output`` holds the same run returns its manifest without scoring again; another run's
output (another model version, as-of, candidates, ...) is refused unless ``overwrite``. An output
that is, contains or sits inside an input (the store, the candidate files, the MLflow store) is
refused before anything runs. What Spark does not give: resuming a killed job part-way (Spark
retries failed tasks; a killed driver starts over) and byte-identical reruns (part files follow
Spark's partitioning).

Differences from the scoring job: of repeated pairs of one request with different user ids the
smallest user id is kept (the job keeps the first in input order, which Spark does not define);
the missing share is checked over all candidates (the job checks each shard). ``output`` is a
path on the driver's file system (local, or a shared mount the executors also write), since the
rename and the manifest are the driver's.

pyspark is an optional dependency (``requirements/spark.txt``); the executors' Python needs this
project and its pinned stack (``env_manager="local"``: the interpreter Spark starts,
``PYSPARK_PYTHON``). Times are compared as ``timestamp_ntz``: run the session with
``spark.sql.session.timeZone=UTC``, the store's convention (naive UTC times). While the model
runs, ``spark.sql.execution.pythonUDF.pandas.preferIntExtensionDtype`` is ``true``: a long column
with nulls (an unknown item's ``author``) reaches the model as pandas ``Int64``, exact, instead
of float64 (which holds ids only up to 2**53; the signature declares such columns ``Any``,
``feature_store.signature``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from feature_store import DataError, FeatureSet, OfflineStore
from pipelines.atomic import check_output, replacing_dir, write_text_atomic
from recsys_moe.config import Config, TaskConfig
from serving.asof import (
    check_entity_features,
    check_missing_share,
    scoring_time,
)
from serving.candidates import check_id_columns
from serving.output import RUN, same_run, sha256

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

MANIFEST = "_manifest.json"
INT_EXT = "spark.sql.execution.pythonUDF.pandas.preferIntExtensionDtype"
ROWS, VALID, HASH = "__rows", "__valid", "__hash"  # per pair: input rows, rows with every id


def _ntz(value: object) -> Column:
    from pyspark.sql import functions as F

    return F.lit(value).cast("timestamp_ntz")


def _expired(entity: str) -> str:
    return f"__expired_{entity}"


def features_as_of(
    spark: SparkSession, store: OfflineStore, features: FeatureSet, entity: str, as_of: datetime
) -> DataFrame:
    """``entity``'s feature rows in effect at ``as_of``, one per key (the latest ``valid_from <=
    as_of``): its key, joined columns (null where the row is older than the TTL) and
    ``__expired_<entity>`` (a key without a row is not there: unknown after a left join)."""
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
    # age > TTL: expired (age == TTL still in effect, as in the join and the scoring job)
    expired = t < _ntz((as_of - ent.ttl).isoformat()) if ent.ttl is not None else F.lit(False)
    return rows.select(
        ent.key,
        *[F.when(~expired, F.col(c)).alias(c) for c in features.joined_columns(entity)],
        expired.alias(_expired(entity)),
    )


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


def _candidate_rows(
    spark: SparkSession, store: OfflineStore, features: FeatureSet, candidates: DataFrame,
    ids: list[str], as_of: datetime,
) -> DataFrame:  # fmt: skip
    """One row per unique (group, item) pair of the input (null-id rows among them, with
    ``__valid`` 0), with ``__rows`` and ``__valid`` and every entity's joined columns and
    ``__expired_<entity>``."""
    from pyspark.sql import functions as F

    group = ids[0]
    every_id = reduce(lambda a, b: a & b, [F.col(c).isNotNull() for c in ids])
    valid = F.when(every_id, 1).otherwise(0)
    user = (
        [] if group == "user_id" else [F.min(F.when(every_id, F.col("user_id"))).alias("user_id")]
    )
    # the input's fingerprint (order-independent): the sum of the rows' xxhash64, as a decimal
    h = F.xxhash64(*[F.col(c) for c in ids]).cast("decimal(38,0)")
    pairs = (
        candidates.select(*[F.col(c).cast("long") for c in ids])
        .groupBy(group, "item_id")
        .agg(F.count(F.lit(1)).alias(ROWS), F.sum(valid).alias(VALID), F.sum(h).alias(HASH), *user)
    )
    for name in features.entities:
        if features.joined_columns(name):
            feats = features_as_of(spark, store, features, name, as_of)
            pairs = pairs.join(feats, on=features.entities[name].key, how="left")
    return pairs


def _counts(rows: DataFrame, ids: list[str], entities: list[str], top_k: int) -> dict[str, int]:
    """The counts of the scoring job (``AsOfFeatures.gather``'s, duplicates, short requests,
    groups, rows) and the input's rows, null ids and fingerprint, in one aggregation (one Spark
    job over the candidates and the store)."""
    from pyspark.sql import functions as F

    group = ids[0]
    kept = F.col(VALID) > 0
    flags: dict[str, Column] = {}
    for e in entities:
        flags[f"unknown_{e}s"] = F.col(_expired(e)).isNull()
        flags[f"expired_{e}_features"] = F.coalesce(F.col(_expired(e)), F.lit(False))

    def any_of(cols: list[Column]) -> Column:
        return reduce(lambda a, b: a | b, cols, F.lit(False))

    expired_any = any_of([flags[f"expired_{e}_features"] for e in entities])
    unknown_any = any_of([flags[f"unknown_{e}s"] for e in entities])
    flags["expired_features"] = expired_any
    flags["missing_features"] = unknown_any | expired_any

    def n(cond: Column) -> Column:
        return F.sum(F.when(kept & cond, 1).otherwise(0))

    per_group = rows.groupBy(group).agg(
        F.sum(HASH).alias("xxhash64_sum"),
        F.sum(ROWS).alias("input_rows"),
        F.sum(F.col(ROWS) - F.col(VALID)).alias("null_ids"),
        F.sum(F.greatest(F.col(VALID) - 1, F.lit(0))).alias("duplicates_dropped"),
        n(F.lit(True)).alias("candidates"),
        *[n(c).alias(k) for k, c in flags.items()],
    )
    sizes = F.col("candidates")
    total = per_group.agg(
        *[F.sum(c).cast("long").alias(c) for c in ["input_rows", "null_ids",
                                                   "duplicates_dropped", "candidates", *flags]],
        F.sum(F.when(sizes > 0, 1).otherwise(0)).alias("groups"),
        F.sum(F.when((sizes > 0) & (sizes < top_k), 1).otherwise(0)).alias("short_requests"),
        F.sum(F.least(sizes, F.lit(top_k))).cast("long").alias("rows"),
        F.sum("xxhash64_sum").alias("xxhash64_sum"),
    ).collect()[0]  # fmt: skip
    return {k: str(v or 0) if k == "xxhash64_sum" else int(v or 0)
            for k, v in total.asDict().items()}  # fmt: skip


def _local_paths(files: list[str]) -> dict[str, Path]:
    """The local files among Spark's input files (``file:`` URIs or plain paths)."""
    out = {}
    for i, f in enumerate(files):
        u = urlparse(f)
        if u.scheme in ("", "file"):
            out[f"candidate file {i}"] = Path(unquote(u.path))
    return out


@contextmanager
def _conf(spark: SparkSession, key: str, value: str) -> Iterator[None]:
    before = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


def score_spark(
    spark: SparkSession,
    *,
    cfg: Config,
    model_uri: str,
    candidates: DataFrame | str | Path,
    output: str | Path,
    top_k: int,
    as_of: datetime | None = None,
    store: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Score ``candidates`` (a DataFrame, or a Parquet file or folder) with the registry model
    ``model_uri`` and write the top ``top_k`` per request (per user without ``request_id``) to
    ``output`` (Parquet parts, ``_run.json``, ``_manifest.json``); the manifest (plus
    ``output``, and ``skipped``: whether ``output`` already held this run). ``cfg`` gives the
    registry (its tracking URI), the store (unless ``store``), the weights and
    ``score.max_missing_share``."""
    import mlflow
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from recsys_moe.model.objectives import output_name
    from serving.model import resolve_model
    from serving.score import count_fields, model_fields, run_identity

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    output = Path(output)
    store_path = Path(store or cfg.store_dir)
    inputs = cfg.protected_paths() | {"store": store_path}
    if isinstance(candidates, str | Path):
        frame = spark.read.parquet(str(candidates))
        where = str(Path(candidates).resolve())
        inputs["candidates"] = Path(candidates)
    else:
        frame = candidates
        where = ""
    files = sorted(frame.inputFiles())
    if not where:
        where = f"(a DataFrame of {len(files)} files)" if files else "(a DataFrame, no files)"
    check_output(
        output, what="output",
        inputs=inputs | _local_paths(files),
        roots={"workdir": Path(cfg.workdir), "current folder": Path.cwd()},
    )  # fmt: skip
    ints = ("tinyint", "smallint", "int", "bigint")
    ids = check_id_columns(where, dict(frame.dtypes), lambda t: t in ints, "cast it to bigint")
    ref = resolve_model(cfg, model_uri)
    version_uri = f"models:/{ref.name}/{ref.version}"
    bundle = mlflow.pyfunc.load_model(version_uri).unwrap_python_model().bundle
    features, tasks = bundle.features, bundle.config.tasks
    check_entity_features(features)
    st = OfflineStore(store_path)
    as_of_given = as_of is not None
    as_of, ranges = scoring_time(as_of, st, features)

    entities = [e for e in features.entities if features.joined_columns(e)]
    rows = _candidate_rows(spark, st, features, frame, ids, as_of)
    counts = _counts(rows, ids, entities, top_k)
    if counts["input_rows"] == 0:
        raise DataError(f"candidates {where}: no rows; nothing to score (previous output kept)")
    if counts["candidates"] == 0:
        raise DataError(
            f"candidates {where}: all {counts['input_rows']} rows have a null id "
            f"({', '.join(ids)}); nothing to score"
        )
    fingerprint = {k: counts[k] for k in ("input_rows", "xxhash64_sum")}
    identity = run_identity(
        ref, features, as_of, store_path, {"files": files} | fingerprint, top_k, cfg
    ) | {"engine": "spark"}
    if (
        same_run(output, identity, overwrite=overwrite, python=True)
        and (output / MANIFEST).is_file()
    ):
        return json.loads((output / MANIFEST).read_text()) | {
            "output": str(output), "skipped": True,
        }  # fmt: skip
    gathered = {k: counts[k] for k in counts if k.startswith(("unknown_", "expired_", "missing_"))}
    check_missing_share(
        gathered, counts["candidates"], max_share=cfg.score.max_missing_share, as_of=as_of,
        ranges=ranges, store=st, candidates=where,
    )  # fmt: skip

    outputs = [output_name(t) for t in tasks]
    udf = mlflow.pyfunc.spark_udf(
        spark, version_uri, result_type=", ".join(f"{o} double" for o in outputs),
        env_manager="local",
    )  # fmt: skip
    group = ids[0]
    order = Window.partitionBy(group).orderBy(F.col("score").desc(), F.col("item_id").asc())
    time_col = features.events.time
    top = (
        rows.where(F.col(VALID) > 0)
        .withColumn("__pred", udf(*[F.col(c) for c in features.input_columns]))
        .select(*ids, _ntz(as_of.isoformat()).alias(time_col),
                *[F.col(f"__pred.{o}").alias(o) for o in outputs])
        .withColumn("score", combined_score(tasks, cfg.score.weights))
        .withColumn("rank", F.row_number().over(order).cast("int"))
        .where(F.col("rank") <= top_k)
        .sortWithinPartitions(group, "rank")
    )  # fmt: skip
    with replacing_dir(output) as tmp:
        with _conf(spark, INT_EXT, "true"):
            top.write.mode("append").parquet(str(tmp))
        _check_finite(spark, tmp, [*outputs, "score"], ids, where)
        parts = [_part(p) for p in sorted(tmp.glob("part-*.parquet"))]
        written = sum(p["rows"] for p in parts)
        if written != counts["rows"]:
            raise DataError(
                f"output {output}: Spark wrote {written} rows, the counts expected "
                f"{counts['rows']} (min(K, candidates) per group); nothing written"
            )
        manifest = {
            **model_fields(ref, identity, as_of_given),
            "candidates": where,
            **count_fields(
                counts, input_rows=counts["input_rows"], null_ids=counts["null_ids"],
                entities=entities, max_share=cfg.score.max_missing_share, group=group,
                top_k=top_k,
            ),
            "engine": "spark",
            "parts": parts,
            "files": [p["file"] for p in parts],
        }  # fmt: skip
        write_text_atomic(tmp / RUN, json.dumps(identity, indent=2, sort_keys=True))
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))
    return manifest | {"output": str(output), "skipped": False}


def _part(path: Path) -> dict:
    import pyarrow.parquet as pq

    return {"file": path.name, "rows": pq.ParquetFile(path).metadata.num_rows,
            "sha256": sha256(path)}  # fmt: skip


def _check_finite(
    spark: SparkSession, folder: Path, columns: list[str], ids: list[str], where: str
) -> None:
    """Every written prediction and score finite (NaN ranks first in Spark's descending order,
    so a group with one has it in its top K), else a ``DataError`` naming one row."""
    from pyspark.sql import functions as F

    out = spark.read.parquet(str(folder))
    bad = reduce(
        lambda a, b: a | b,
        [F.col(c).isNull() | F.isnan(c) | (F.abs(c) == float("inf")) for c in columns],
    )
    rows = out.where(bad)
    first = rows.select(*ids, *columns).limit(1).collect()
    if first:
        raise DataError(
            f"candidates {where}: {rows.count()} top-K rows got a score that is not a finite "
            f"number (e.g. {first[0].asDict()}); nothing written. Check those rows' features in "
            "the store for NaN or infinite values"
        )
