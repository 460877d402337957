"""Checks on raw tables before they feed a training set or a scoring job.

Schema checks (columns, dtypes) cost nothing; value checks on events run as one aggregated
``collect``. Every message names the file, the column, what is wrong (dtype, bad value, how many
rows) and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl


class DataError(ValueError):
    """Input data that cannot be used as is (missing columns, wrong dtypes, bad values)."""


def _check_columns(schema: pl.Schema, required: dict[str, str], *, path: str, what: str) -> None:
    for column, why in required.items():
        if column not in schema:
            raise DataError(
                f"{what} file {path}: missing required column {column!r} (needed as: {why}); "
                f"columns present: {list(schema.names())}"
            )


def _check_int(schema: pl.Schema, column: str, *, path: str, what: str) -> None:
    dtype = schema[column]
    if not dtype.is_integer():
        hint = " (float ids lose precision and break joins)" if dtype.is_float() else ""
        raise DataError(
            f"{what} file {path}: id column {column!r} has dtype {dtype}, expected an integer"
            f"{hint}; cast it to Int64 at the source"
        )


def _check_time(schema: pl.Schema, column: str, *, path: str, what: str) -> None:
    dtype = schema[column]
    if not isinstance(dtype, pl.Datetime):
        raise DataError(
            f"{what} file {path}: time column {column!r} has dtype {dtype}, expected Datetime; "
            "parse or cast it to a timestamp (e.g. Datetime('us')) at the source"
        )


def _check_label_dtype(schema: pl.Schema, column: str, *, path: str) -> None:
    dtype = schema[column]
    if not (dtype.is_numeric() or dtype == pl.Boolean):
        raise DataError(
            f"events file {path}: label column {column!r} has dtype {dtype}, expected a number; "
            "cast it to a numeric type at the source"
        )


def validate_events(
    lf: pl.LazyFrame,
    *,
    path: str,
    required: dict[str, str],
    int_ids: list[str],
    binary_labels: list[str],
    nonneg_labels: list[str],
    time_column: str,
    unique_keys: Sequence[str] = (),
) -> None:
    """Raise ``DataError`` unless the events frame can be used.

    ``required`` maps each required column to why it is needed. Checks: required columns exist;
    ``int_ids`` are integer and never null; ``time_column`` is Datetime and never null; binary
    labels are 0 or 1; ``nonneg_labels`` are finite and >= 0 (nulls count as bad in both); the
    frame has rows; no two rows share the same ``unique_keys`` (an event's identity).
    """
    schema = lf.collect_schema()
    _check_columns(schema, required, path=path, what="events")
    for column in [*int_ids, *binary_labels, *nonneg_labels, time_column]:
        if column not in schema:
            raise DataError(
                f"events file {path}: missing column {column!r}; "
                f"columns present: {list(schema.names())}"
            )
    for column in int_ids:
        _check_int(schema, column, path=path, what="events")
    _check_time(schema, time_column, path=path, what="events")
    for column in [*binary_labels, *nonneg_labels]:
        _check_label_dtype(schema, column, path=path)

    # One pass: per check, the number of bad rows and one example of a bad (non-null) value.
    aggs: list[pl.Expr] = [pl.len().alias("__rows")]
    checks: list[tuple[str, str, str]] = []  # (alias, column, what a good value is)
    for column in dict.fromkeys([*int_ids, time_column]):
        checks.append((f"null:{column}", column, "not null"))
        aggs.append(pl.col(column).is_null().sum().alias(f"null:{column}"))
    for column in binary_labels:
        x = pl.col(column).cast(pl.Float64)
        bad = x.is_null() | ~((x == 0.0) | (x == 1.0))
        checks.append((f"binary:{column}", column, "0 or 1"))
        aggs += [bad.sum().alias(f"binary:{column}"), _example(column, bad, f"binary:{column}")]
    for column in nonneg_labels:
        x = pl.col(column).cast(pl.Float64)
        bad = x.is_null() | ~x.is_finite() | (x < 0.0)
        checks.append((f"nonneg:{column}", column, "finite and >= 0"))
        aggs += [bad.sum().alias(f"nonneg:{column}"), _example(column, bad, f"nonneg:{column}")]
    keys = list(unique_keys)
    if keys:
        dup = pl.struct(keys).is_duplicated()
        checks.append(("dup", ", ".join(keys), "unique per event"))
        aggs += [dup.sum().alias("dup"), pl.struct(keys).filter(dup).first().alias("dup:example")]
    stats = lf.select(aggs).collect().row(0, named=True)

    rows = stats["__rows"]
    if rows == 0:
        raise DataError(
            f"events file {path}: has no rows; write the events before building a training set"
        )
    for alias, column, good in checks:
        n_bad = stats[alias]
        if not n_bad:
            continue
        example = stats.get(f"{alias}:example")
        shown = "null" if example is None else repr(example)
        what = f"column {column!r}" if alias != "dup" else f"the key ({column})"
        raise DataError(
            f"events file {path}: {what} must be {good}, but {n_bad} of {rows} rows "
            f"are not (e.g. {shown}); fix or drop those rows at the source"
        )


def _example(column: str, bad: pl.Expr, alias: str) -> pl.Expr:
    """First bad non-null value (null when every bad row is null)."""
    col = pl.col(column)
    return col.filter(bad & col.is_not_null()).first().alias(f"{alias}:example")


def validate_table(
    lf: pl.LazyFrame, *, path: str, key: str, time: str, columns: dict[str, str]
) -> None:
    """Schema checks of an entity table (users, items): the key, time and feature columns exist,
    the key is an integer and the time a Datetime. ``columns`` maps column → why it is needed."""
    schema = lf.collect_schema()
    required = {key: "entity key", time: "validity time (valid_from)", **columns}
    _check_columns(schema, required, path=path, what="entity table")
    _check_int(schema, key, path=path, what="entity table")
    _check_time(schema, time, path=path, what="entity table")
