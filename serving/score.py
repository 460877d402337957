"""Candidate scoring, a batch job over a registered model.

    recsys-moe score --config configs/demo.toml --model models:/recsys-moe-demo@champion \\
        --candidates demo-run/data/candidates.parquet --output demo-run/scores --top-k 10

Candidates (``user_id``, ``item_id``, optional ``request_id``, optional event-time column) get
their features as of the scoring time from the offline store (the same point-in-time join as the
training set), then the registry model's predictions (``p_click``, ``watch_time_s``) and a combined
score ``prod_t p_t ** w_t`` (binary tasks) ``* (1 + y_t) ** w_t`` (regression tasks). The top K per
request (or per user, without ``request_id``) are written, ranked, to ``OUTPUT/part-00000.parquet``
with ``OUTPUT/_manifest.json``; the folder is written under a temporary name and renamed when
complete, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import polars as pl

from feature_store import DataError, FeatureSet, OfflineStore, join_features
from feature_store.pit import features_found
from pipelines.atomic import check_output, replacing_dir
from recsys_moe.config import Config, TaskConfig
from recsys_moe.tracking import client_for

log = logging.getLogger(__name__)

PART = "part-00000.parquet"
MANIFEST = "_manifest.json"


def parse_model_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` → (NAME, ALIAS)."""
    if not uri.startswith("models:/") or "@" not in uri:
        raise ValueError(
            f"--model {uri!r}: expected models:/NAME@ALIAS, e.g. models:/demo@champion"
        )
    name, alias = uri.removeprefix("models:/").rsplit("@", 1)
    return name, alias


def read_candidates(path: Path, *, time_column: str) -> pl.LazyFrame:
    if not path.exists():
        raise DataError(f"candidates {path}: no such file")
    try:
        lf = pl.scan_parquet(path)
        schema = lf.collect_schema()
    except Exception as e:  # a truncated or non-Parquet file
        raise DataError(f"candidates {path}: not a readable Parquet file ({e})") from e
    for col in ("user_id", "item_id"):
        if col not in schema:
            raise DataError(
                f"candidates {path}: missing required column {col!r}; columns: {schema.names()}"
            )
        if not schema[col].is_integer():
            raise DataError(
                f"candidates {path}: column {col!r} has dtype {schema[col]}, expected an integer "
                "id (cast to Int64 where the file is written)"
            )
    if "request_id" in schema and not schema["request_id"].is_integer():
        raise DataError(f"candidates {path}: column 'request_id' must be an integer id")
    if time_column in schema and not isinstance(schema[time_column], pl.Datetime):
        raise DataError(f"candidates {path}: column {time_column!r} must be a Datetime")
    return lf


def clean_candidates(lf: pl.LazyFrame, path: Path) -> tuple[pl.LazyFrame, dict[str, int]]:
    """Candidates without null ids and without repeated (request or user, item) pairs (the first
    kept), and the count of each kind dropped; none left is a ``DataError``."""
    schema = lf.collect_schema()
    ids = [c for c in ("request_id", "user_id", "item_id") if c in schema]
    group = "request_id" if "request_id" in schema else "user_id"
    frame = lf.with_row_index("__row").collect()
    total = frame.height
    if total == 0:
        raise DataError(f"candidates {path}: no rows; nothing to score (previous output kept)")
    no_null = frame.drop_nulls(ids)
    unique = no_null.unique([group, "item_id"], keep="first", maintain_order=True)
    dropped = {"null_id": total - no_null.height, "duplicate": no_null.height - unique.height}
    if unique.height == 0:
        raise DataError(
            f"candidates {path}: all {total} rows have a null id ({', '.join(ids)}); nothing to "
            "score (previous output kept)"
        )
    for kind, n in dropped.items():
        if n:
            log.warning("candidates %s: dropped %d of %d rows (%s)", path, n, total, kind)
    return unique.drop("__row").lazy(), dropped


COVERAGE_WARNING = 0.9  # a share of candidates with an entity's features under this is reported


def feature_coverage(
    rows: pl.DataFrame, features: FeatureSet, store: OfflineStore, path: Path
) -> dict[str, float]:
    """Per entity, the share of candidates whose features were found as of the scoring time
    (the others are scored as unknown: row 0 of every table, the mean of every numeric). Under
    ``COVERAGE_WARNING`` a warning; none found at all is a ``DataError`` (a wrong store, or a
    scoring time before every row)."""
    out: dict[str, float] = {}
    found = features_found(features)
    if not found:
        return out
    counts = rows.select(*[e.sum().alias(name) for name, e in found.items()]).row(0, named=True)
    for name in found:
        ent = features.entities[name]
        share = counts[name] / rows.height
        out[name] = round(share, 6)
        if share == 0:
            raise DataError(
                f"candidates {path}: none of the {rows.height} candidates found features of "
                f"entity {name} in {store.path(ent.table)} as of the scoring time; check the "
                "store (--store), the ids and --as-of (before every row's valid_from?)"
            )
        if share < COVERAGE_WARNING:
            log.warning(
                "candidates %s: %.1f%% of the candidates found features of entity %s; the rest "
                "are scored as unknown (ids not in %s, or not yet valid as of the scoring time)",
                path, 100 * share, name, store.path(ent.table),
            )  # fmt: skip
    return out


def check_finite(frame: pl.DataFrame, columns: list[str], keys: list[str], path: Path) -> None:
    """Every prediction and score finite, else a ``DataError`` naming how many rows and one."""
    bad = pl.any_horizontal([~pl.col(c).is_finite() | pl.col(c).is_null() for c in columns])
    rows = frame.filter(bad)
    if rows.height:
        example = rows.select(keys + columns).row(0, named=True)
        raise DataError(
            f"candidates {path}: {rows.height} of {frame.height} rows got a score that is not a "
            f"finite number (e.g. {example}); nothing written. Check those rows' features in the "
            "store for NaN or infinite values"
        )


def combined_score(tasks: list[TaskConfig], weights: dict[str, float]) -> pl.Expr:
    """``prod_t p_t ** w_t`` (binary tasks) ``* (1 + y_t) ** w_t`` (regression tasks); tasks
    without a weight (or weight 0) do not count."""
    from recsys_moe.model.objectives import output_name

    expr = pl.lit(1.0)
    for t in tasks:
        w = weights.get(t.name, 0.0)
        if w == 0.0:
            continue
        col = pl.col(output_name(t))
        expr = expr * (col.clip(lower_bound=0.0) if t.kind == "binary" else 1.0 + col).pow(w)
    return expr


def score(
    *,
    model_uri: str,
    candidates: str | Path,
    output: str | Path,
    top_k: int,
    cfg: Config,
    as_of: datetime | None = None,
    store_dir: str | Path | None = None,
) -> dict:
    """Score ``candidates`` with the registry model ``model_uri``; write the top ``top_k``.

    Refused before anything is read when ``output`` would replace or delete an input. Candidates
    with a null id and repeated (request or user, item) pairs are dropped and counted; no
    candidate left, or any score that is not a finite number, fails the job with the previous
    output untouched."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    store_path = Path(store_dir or cfg.store_dir)
    check_output(
        output, what="--output",
        inputs=cfg.protected_paths() | {"candidates": Path(candidates), "store": store_path},
        roots={"workdir": Path(cfg.workdir), "current folder": Path.cwd()},
    )  # fmt: skip
    name, alias = parse_model_uri(model_uri)
    client = client_for(cfg)
    version = client.get_model_version_by_alias(name, alias).version
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    model = pyfunc.unwrap_python_model()
    features = model.bundle.features
    mcfg = model.bundle.config
    time_col = features.events.time
    candidates, output = Path(candidates), Path(output)
    lf, dropped = clean_candidates(read_candidates(candidates, time_column=time_col), candidates)
    has_time = time_col in lf.collect_schema()
    if as_of is not None or not has_time:
        stamp = (as_of or datetime.now(UTC)).replace(tzinfo=None)
        lf = lf.with_columns(pl.lit(stamp).cast(pl.Datetime("us")).alias(time_col))
    store = OfflineStore(store_path)
    rows = join_features(lf, store, features, event_time=time_col).collect()
    coverage = feature_coverage(rows, features, store, candidates)

    preds = model.predict_polars(rows)
    group = "request_id" if "request_id" in rows.columns else "user_id"
    keys = [c for c in ("request_id", "user_id", "item_id") if c in rows.columns]
    scored = pl.concat([rows.select(keys + [time_col]), preds], how="horizontal").with_columns(
        # the model's tasks, the scoring job's weights ([score] of --config)
        score=combined_score(mcfg.tasks, cfg.score.weights)
    )
    check_finite(scored, [*preds.columns, "score"], keys, candidates)
    ranked = (
        scored.sort([group, "score", "item_id"], descending=[False, True, False])
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over(group).cast(pl.Int32))
        .filter(pl.col("rank") <= top_k)
    )
    manifest = {
        "model_uri": model_uri,
        "model_name": name,
        "model_version": version,
        "candidates": str(candidates.resolve()),
        "candidate_rows": rows.height,
        "dropped": dropped,
        "coverage": coverage,
        "groups": int(ranked[group].n_unique()),
        "group_by": group,
        "top_k": top_k,
        "rows": ranked.height,
        "as_of": None if as_of is None and has_time else str(ranked[time_col].min()),
        "files": [PART],
        "written_at": datetime.now(UTC).isoformat(),
    }
    _write_atomic(output, ranked, manifest)
    return manifest | {"output": str(output)}


def _write_atomic(output: Path, frame: pl.DataFrame, manifest: dict) -> None:
    with replacing_dir(output) as tmp:
        frame.write_parquet(tmp / PART)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
