"""Raw feature values → model inputs, the same at training and at scoring time.

Fitted on the training split only:

- categorical / multi_categorical with ``mapping = "vocab"``: a vocabulary of the training values
  seen at least ``min_count`` times (list elements counted one by one), at most
  ``num_embeddings - 1`` of them, numbered 1.. by descending count then ascending value. Index 0 is
  every unknown, rare, cut-off or missing value.
- ``mapping = "hash"``: nothing to fit; integer ids go through a fixed 64-bit mix (splitmix64's
  finalizer) modulo ``num_embeddings - 1``, plus 1. Stable across processes and versions.
- numeric: mean and population std (ddof=0, floored at 1e-6) after the feature's transform, over
  the finite values only (NaN and ±inf are missing values, like nulls; the feature's
  ``non_finite`` policy decides upstream whether they may exist at all), checked finite. Applying
  maps every null or non-finite result to 0.0, so no NaN or inf reaches a tensor.

Saved as one Parquet file per vocabulary plus ``numeric.json``; no pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from feature_store import DataError, Feature, FeatureSet

STD_FLOOR = 1e-6
_VOCAB_SCHEMA = ("value", "index", "count")
_NUMERIC_FILE = "numeric.json"
_MASK64 = (1 << 64) - 1


@dataclass
class Mappings:
    """Fitted mappings: ``vocabs[name]`` has columns value, index (Int64), count (Int64);
    ``numeric[name]`` has ``mean`` and ``std``. Hashed features have no entry."""

    vocabs: dict[str, pl.DataFrame] = field(default_factory=dict)
    numeric: dict[str, dict[str, float]] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, vocab in self.vocabs.items():
            vocab.write_parquet(directory / f"vocab_{name}.parquet")
        (directory / _NUMERIC_FILE).write_text(json.dumps(self.numeric, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path, features: FeatureSet) -> Mappings:
        directory = Path(directory)
        numeric_path = directory / _NUMERIC_FILE
        if not numeric_path.is_file():
            raise ValueError(f"mappings {directory}: no {_NUMERIC_FILE}; was it written by save()?")
        numeric = json.loads(numeric_path.read_text())
        vocabs: dict[str, pl.DataFrame] = {}
        for f in features.sparse:
            if f.mapping != "vocab":
                continue
            path = directory / f"vocab_{f.name}.parquet"
            if not path.is_file():
                raise ValueError(
                    f"mappings {directory}: no vocabulary for feature {f.name!r} ({path.name}); "
                    "the mappings were fitted for other feature definitions; refit them"
                )
            vocabs[f.name] = pl.read_parquet(path)
        for f in features.dense:
            if f.name not in numeric:
                raise ValueError(
                    f"mappings {directory}: no statistics for numeric feature {f.name!r}; refit"
                )
        return cls(vocabs=vocabs, numeric={f.name: numeric[f.name] for f in features.dense})


# ---- fitting -------------------------------------------------------------------------------------


def _transform(f: Feature) -> pl.Expr:
    x = pl.col(f.column).cast(pl.Float64)
    return x.log1p() if f.transform == "log1p" else x


def _vocab_query(train: pl.LazyFrame, f: Feature) -> pl.LazyFrame:
    values = train.select(pl.col(f.column).alias("value"))
    if f.kind == "multi_categorical":
        values = values.explode("value")
    return (
        values.drop_nulls()
        .group_by("value")
        .agg(pl.len().cast(pl.Int64).alias("count"))
        .filter(pl.col("count") >= f.min_count)
        .sort(["count", "value"], descending=[True, False])
        .head(f.num_embeddings - 1)
        .with_row_index("index", offset=1)
        .select("value", pl.col("index").cast(pl.Int64), "count")
    )


def fit_mappings(train: pl.LazyFrame, features: FeatureSet) -> Mappings:
    """Fit vocabularies and numeric statistics on the training split (one streaming collect)."""
    schema = train.collect_schema()
    for f in features.features:
        _check_column(schema, f)
    vocab_features = [f for f in features.sparse if f.mapping == "vocab"]
    for f in features.sparse:
        if f.mapping == "hash":
            _check_hashable(schema, f)
    stats = train.select(pl.lit(0).alias("__dummy"), *_numeric_aggs(features.dense))
    queries = [_vocab_query(train, f) for f in vocab_features] + [stats]
    *vocabs, row = pl.collect_all(queries, engine="streaming")  # group-bys: memory ~ #values
    numeric = {f.name: _numeric_stats(f, row) for f in features.dense}
    return Mappings(
        vocabs={f.name: v for f, v in zip(vocab_features, vocabs, strict=True)}, numeric=numeric
    )


def _numeric_aggs(dense: Sequence[Feature]) -> list[pl.Expr]:
    """Per numeric feature: the count of non-finite (transformed) values, mean and std of all
    values, and mean and std of the finite ones."""
    aggs: list[pl.Expr] = []
    for f in dense:
        x = _transform(f)
        # non-finite → null, not a filter: a filter would turn the whole select into another
        # (non-streaming) reduction whose plain std differs in the last bit
        finite = pl.when(x.is_finite()).then(x)
        aggs += [
            (~x.is_finite()).sum().alias(f"{f.name}:non_finite"),
            x.mean().alias(f"{f.name}:mean"),
            x.std(ddof=0).alias(f"{f.name}:std"),
            finite.mean().alias(f"{f.name}:finite_mean"),
            finite.std(ddof=0).alias(f"{f.name}:finite_std"),
        ]
    return aggs


def _numeric_stats(f: Feature, row: pl.DataFrame) -> dict[str, float]:
    """Mean and std over the finite values. Without a non-finite value those are the plain
    statistics, taken as computed over every row (the very numbers written before non-finite
    values were skipped: a clean training set maps exactly as it did)."""
    which = "finite_" if row[f"{f.name}:non_finite"].item() else ""
    mean, std = row[f"{f.name}:{which}mean"].item(), row[f"{f.name}:{which}std"].item()
    if mean is None:  # no finite value at all: leave the feature centred at 0
        return {"mean": 0.0, "std": 1.0}
    if not (math.isfinite(mean) and std is not None and math.isfinite(std)):
        raise DataError(
            f"numeric feature {f.name!r} (column {f.column!r}, transform {f.transform}): its "
            f"training-split statistics are not finite (mean={mean}, std={std}) although every "
            "value used is: the values are too large to standardize; rescale the column at the "
            'source or set transform = "log1p"'
        )
    return {"mean": float(mean), "std": max(float(std), STD_FLOOR)}


# ---- applying ------------------------------------------------------------------------------------


def _check_column(schema: pl.Schema, f: Feature) -> None:
    if f.column not in schema:
        raise ValueError(
            f"feature {f.name!r}: column {f.column!r} not in the frame; "
            f"columns present: {list(schema.names())}"
        )
    dtype = schema[f.column]
    if f.kind == "multi_categorical" and not isinstance(dtype, pl.List):
        raise ValueError(
            f"feature {f.name!r} is multi_categorical but column {f.column!r} has dtype {dtype}; "
            "expected a List"
        )
    if f.kind == "numeric" and not dtype.is_numeric():
        raise ValueError(f"feature {f.name!r} is numeric but column {f.column!r} has dtype {dtype}")


def _scalar_dtype(schema: pl.Schema, f: Feature) -> pl.DataType:
    dtype = schema[f.column]
    return dtype.inner if isinstance(dtype, pl.List) else dtype


def _check_hashable(schema: pl.Schema, f: Feature) -> None:
    dtype = _scalar_dtype(schema, f)
    if not dtype.is_integer():
        raise ValueError(
            f"feature {f.name!r} uses mapping = 'hash', which takes integer ids only, but column "
            f"{f.column!r} holds {dtype}; use mapping = 'vocab' or cast the ids to Int64"
        )


def hash_index(x: pl.Expr, num_embeddings: int) -> pl.Expr:
    """Integer ids → 1..num_embeddings-1 (splitmix64 finalizer, wrapping UInt64 arithmetic);
    null → 0."""
    u64 = pl.UInt64
    z = x.cast(pl.Int64).reinterpret(signed=False) + pl.lit(0x9E3779B97F4A7C15, dtype=u64)
    z = (z ^ (z // (1 << 30))) * pl.lit(0xBF58476D1CE4E5B9, dtype=u64)
    z = (z ^ (z // (1 << 27))) * pl.lit(0x94D049BB133111EB, dtype=u64)
    z = z ^ (z // (1 << 31))
    return (z % (num_embeddings - 1) + 1).cast(pl.Int64).fill_null(0)


def hash_index_py(value: int, num_embeddings: int) -> int:
    """Reference implementation of ``hash_index`` for one Python int (tests, debugging)."""
    z = ((value & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z % (num_embeddings - 1) + 1


def _vocab_index(x: pl.Expr, f: Feature, vocab: pl.DataFrame, dtype: pl.DataType) -> pl.Expr:
    vocab_dtype = vocab.schema["value"]
    if dtype != vocab_dtype:
        if dtype.is_integer() and vocab_dtype.is_integer():
            x = x.cast(vocab_dtype)
        else:
            raise ValueError(
                f"feature {f.name!r}: column {f.column!r} holds {dtype} but its vocabulary was "
                f"fitted on {vocab_dtype}; cast the column to {vocab_dtype} (or refit)"
            )
    return x.replace_strict(vocab["value"], vocab["index"], default=0, return_dtype=pl.Int64)


def _apply_one(schema: pl.Schema, f: Feature, mappings: Mappings) -> pl.Expr:
    _check_column(schema, f)
    col = pl.col(f.column)
    if f.kind == "numeric":
        if f.name not in mappings.numeric:
            raise ValueError(f"feature {f.name!r}: no fitted mean/std in the mappings; refit")
        s = mappings.numeric[f.name]
        z = ((_transform(f) - s["mean"]) / s["std"]).cast(pl.Float32)
        # null, NaN, ±inf (and a z-score beyond Float32's range) → 0.0, the missing value
        return pl.when(z.is_finite()).then(z).otherwise(0.0).cast(pl.Float32).alias(f.name)
    dtype = _scalar_dtype(schema, f)
    if f.mapping == "hash":
        _check_hashable(schema, f)
    elif f.name not in mappings.vocabs:
        raise ValueError(f"feature {f.name!r}: no fitted vocabulary in the mappings; refit")
    if f.kind == "categorical":
        return _index(col, f, mappings, dtype).alias(f.name)
    empty = pl.lit([], dtype=pl.List(pl.Int64))
    return col.list.eval(_index(pl.element(), f, mappings, dtype)).fill_null(empty).alias(f.name)


def _index(x: pl.Expr, f: Feature, mappings: Mappings, dtype: pl.DataType) -> pl.Expr:
    if f.mapping == "hash":
        return hash_index(x, f.num_embeddings)
    return _vocab_index(x, f, mappings.vocabs[f.name], dtype)


def apply_mappings(
    lf: pl.LazyFrame, features: FeatureSet, mappings: Mappings, *, keep: Sequence[str] = ()
) -> pl.LazyFrame:
    """The feature columns, named ``feature.name`` in definition order, then the ``keep``
    columns unchanged, same rows: categorical → Int64 index (0 = unknown / null),
    multi_categorical → List(Int64) (null list → empty list, unknown element → 0), numeric →
    Float32 standardized (null, NaN, ±inf → 0.0)."""
    schema = lf.collect_schema()
    names = {f.name for f in features.features}
    clash = [c for c in keep if c in names]
    if clash:
        raise ValueError(f"column(s) {clash} are both kept and a feature's name; rename one")
    missing = [c for c in keep if c not in schema]
    if missing:
        raise ValueError(f"column(s) {missing} to keep are not in the frame: {schema.names()}")
    return lf.select(*[_apply_one(schema, f, mappings) for f in features.features], *keep)
