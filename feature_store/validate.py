"""Checks on raw tables before they feed a training set or a scoring job: the data contracts.

Schema checks (columns, dtypes) cost nothing; value checks run as one aggregated ``collect`` per
table (events: ``validate_events``; entity tables: ``validate_table``). Every message names the
file, the column, what is wrong (dtype, bad value, how many rows, an example) and what to do
about it. Numeric features follow their ``non_finite`` policy (``feature_store.definitions``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from feature_store.definitions import Feature


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


@dataclass(frozen=True)
class _Check:
    """One value check of an aggregated pass: ``alias`` counts the bad rows, ``alias:example``
    (when aggregated) holds one of them."""

    alias: str
    subject: str  # "column 'x'", "the key (a, b)"
    good: str  # what every row must be
    example: str = "e.g."  # how the example is introduced
    fix: str = "fix or drop those rows at the source"
    raw: bool = False  # the example is preformatted text: shown as is, not repr'd


def _run_checks(
    lf: pl.LazyFrame, aggs: list[pl.Expr], checks: list[_Check], *, head: str, empty: str
) -> None:
    """One ``collect`` of ``aggs`` (plus the row count); the first failing check raises."""
    stats = lf.select(pl.len().alias("__rows"), *aggs).collect().row(0, named=True)
    rows = stats["__rows"]
    if rows == 0:
        raise DataError(f"{head}: has no rows; {empty}")
    for c in checks:
        n_bad = stats[c.alias]
        if not n_bad:
            continue
        example = stats.get(f"{c.alias}:example")
        shown = "null" if example is None else example if c.raw else repr(example)
        raise DataError(
            f"{head}: {c.subject} must be {c.good}, but {n_bad} of {rows} rows are not "
            f"({c.example} {shown}); {c.fix}"
        )


def _example(column: str, bad: pl.Expr, alias: str) -> pl.Expr:
    """First bad non-null value (null when every bad row is null)."""
    col = pl.col(column)
    return col.filter(bad & col.is_not_null()).first().alias(f"{alias}:example")


def _numeric_checks(
    schema: pl.Schema, numeric: Sequence[Feature], *, head: str
) -> tuple[list[pl.Expr], list[_Check]]:
    """Numeric features' columns: a number, and (policy ``non_finite = "reject"``, the default)
    finite after the transform: not NaN nor ±inf, with ``log1p`` also > -1. Nulls are missing
    values, not errors."""
    by_column: dict[str, list[Feature]] = {}
    for f in numeric:
        if f.kind == "numeric":
            by_column.setdefault(f.column, []).append(f)
    aggs: list[pl.Expr] = []
    checks: list[_Check] = []
    for column, feats in by_column.items():
        dtype = schema[column]
        names = ", ".join(f.name for f in feats)
        if not dtype.is_numeric():
            raise DataError(
                f"{head}: column {column!r} (numeric feature {names}) has dtype {dtype}, expected "
                "a number; cast it to Float64 at the source"
            )
        rejecting = [f for f in feats if f.non_finite == "reject"]
        if not rejecting:
            continue  # non_finite = "missing": the mappings treat such values as nulls
        log1p = any(f.transform == "log1p" for f in rejecting)
        x = pl.col(column)
        if dtype.is_float():
            bad = ~x.is_finite() | (x <= -1.0) if log1p else ~x.is_finite()
        elif dtype.is_integer() and log1p:
            bad = x <= -1
        else:
            continue  # integers are finite; decimals too
        alias = f"finite:{column}"
        good = "finite and > -1 (its transform is log1p)" if log1p else "finite (not NaN or ±inf)"
        checks.append(
            _Check(
                alias,
                f"column {column!r} (numeric feature {names})",
                good,
                fix='fix or drop those values at the source, or set non_finite = "missing" on '
                "the feature in the feature definitions to treat them as missing values",
            )
        )
        aggs += [bad.sum().alias(alias), _example(column, bad, alias)]
    return aggs, checks


def _utc_naive(schema: pl.Schema, column: str) -> pl.Expr:
    """A Datetime column as naive UTC (naive columns are taken as UTC already)."""
    dtype = schema[column]
    col = pl.col(column)
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        return col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return col


def as_utc_naive(t: datetime) -> datetime:
    """``t`` as a naive UTC datetime (a naive ``t`` is taken as UTC)."""
    return t if t.tzinfo is None else t.astimezone(UTC).replace(tzinfo=None)


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
    not_after: datetime | None = None,
    not_before: datetime | None = None,
    numeric: Sequence[Feature] = (),
    positive_values: Sequence[str] = (),
    finite_labels: Sequence[str] = (),
    value_sets: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Raise ``DataError`` unless the events frame can be used.

    ``required`` maps each required column to why it is needed. Checks: required columns exist;
    ``int_ids`` are integer and never null; ``time_column`` is Datetime and never null (``""``:
    events without a time, then neither ``not_after`` nor ``not_before`` apply); binary
    labels are 0 or 1; ``nonneg_labels`` are finite and >= 0; ``finite_labels`` finite (any
    sign); ``positive_values`` (e.g. a
    duration the loss divides by) are finite and > 0 (nulls count as bad in all three);
    ``value_sets`` columns hold one of their allowed values as text (e.g. a split column); the
    frame has rows; no two rows share the same ``unique_keys`` (an event's identity); no event
    time is after ``not_after`` (the builder passes its clock plus a day: a future time would
    become the test split) or before ``not_before`` (a configured start); the columns of the
    ``numeric`` features read from the events are numbers, finite unless the feature's
    ``non_finite`` policy says ``"missing"``. Naive times (columns and limits) are UTC.
    All value checks run as one aggregated ``collect``.
    """
    schema = lf.collect_schema()
    _check_columns(schema, required, path=path, what="events")
    values = [*binary_labels, *nonneg_labels, *finite_labels, *positive_values]
    times = [time_column] if time_column else []
    for column in [*int_ids, *values, *times]:
        if column not in schema:
            raise DataError(
                f"events file {path}: missing column {column!r}; "
                f"columns present: {list(schema.names())}"
            )
    _check_columns(
        schema, {f.column: f"numeric feature {f.name}" for f in numeric}, path=path, what="events"
    )
    for column in int_ids:
        _check_int(schema, column, path=path, what="events")
    for column in times:
        _check_time(schema, column, path=path, what="events")
    for column in values:
        _check_label_dtype(schema, column, path=path)

    head = f"events file {path}"
    # One pass: per check, the number of bad rows and one example of a bad (non-null) value.
    aggs: list[pl.Expr] = []
    checks: list[_Check] = []
    for column in dict.fromkeys([*int_ids, *times]):
        checks.append(_Check(f"null:{column}", f"column {column!r}", "not null"))
        aggs.append(pl.col(column).is_null().sum().alias(f"null:{column}"))
    for column in binary_labels:
        x = pl.col(column).cast(pl.Float64)
        bad = x.is_null() | ~((x == 0.0) | (x == 1.0))
        checks.append(_Check(f"binary:{column}", f"column {column!r}", "0 or 1"))
        aggs += [bad.sum().alias(f"binary:{column}"), _example(column, bad, f"binary:{column}")]
    for column in nonneg_labels:
        x = pl.col(column).cast(pl.Float64)
        bad = x.is_null() | ~x.is_finite() | (x < 0.0)
        checks.append(_Check(f"nonneg:{column}", f"column {column!r}", "finite and >= 0"))
        aggs += [bad.sum().alias(f"nonneg:{column}"), _example(column, bad, f"nonneg:{column}")]
    for column in finite_labels:
        x = pl.col(column).cast(pl.Float64)
        bad = x.is_null() | ~x.is_finite()
        checks.append(_Check(f"finite:{column}", f"column {column!r}", "finite"))
        aggs += [bad.sum().alias(f"finite:{column}"), _example(column, bad, f"finite:{column}")]
    for column, allowed in (value_sets or {}).items():
        text = pl.col(column).cast(pl.String)
        bad = text.is_null() | ~text.is_in(list(allowed))
        checks.append(_Check(f"in:{column}", f"column {column!r}", f"one of {list(allowed)}"))
        aggs += [bad.sum().alias(f"in:{column}"), _example(column, bad, f"in:{column}")]
    for column in positive_values:
        x = pl.col(column).cast(pl.Float64)
        bad = x.is_null() | ~x.is_finite() | (x <= 0.0)
        checks.append(_Check(f"pos:{column}", f"column {column!r}", "finite and > 0"))
        aggs += [bad.sum().alias(f"pos:{column}"), _example(column, bad, f"pos:{column}")]
    keys = list(unique_keys)
    if keys:
        dup = pl.struct(keys).is_duplicated()
        checks.append(_Check("dup", f"the key ({', '.join(keys)})", "unique per event"))
        aggs += [dup.sum().alias("dup"), pl.struct(keys).filter(dup).first().alias("dup:example")]
    t = _utc_naive(schema, time_column) if time_column else pl.lit(None, dtype=pl.Datetime("us"))
    if not_after is not None and time_column:
        limit = as_utc_naive(not_after)
        late = t > pl.lit(limit, dtype=pl.Datetime("us"))
        checks.append(
            _Check(
                "late",
                f"column {time_column!r}",
                f"no later than {limit:%Y-%m-%d %H:%M:%S} UTC (the build's clock plus a day's "
                "tolerance)",
                example="latest",
                raw=True,
                fix="a future event time would make its day the test split; check the source's "
                "time unit and time zone, or drop those rows",
            )
        )
        aggs += [late.sum().alias("late"), t.max().dt.to_string("%F %T").alias("late:example")]
    if not_before is not None and time_column:
        start = as_utc_naive(not_before)
        early = t < pl.lit(start, dtype=pl.Datetime("us"))
        checks.append(
            _Check(
                "early",
                f"column {time_column!r}",
                f"at or after the configured start (min_event_time) {start} UTC",
                example="earliest",
                raw=True,
                fix="drop the earlier rows at the source or move min_event_time",
            )
        )
        aggs += [early.sum().alias("early"), t.min().dt.to_string("%F %T").alias("early:example")]
    num_aggs, num_checks = _numeric_checks(schema, numeric, head=head)
    _run_checks(
        lf,
        aggs + num_aggs,
        checks + num_checks,
        head=head,
        empty="write the events before building a training set",
    )


def validate_table(
    lf: pl.LazyFrame,
    *,
    path: str,
    key: str,
    time: str,
    columns: dict[str, str],
    numeric: Sequence[Feature] = (),
    entity: str = "",
) -> None:
    """Check an entity table (users, items) before it is joined, ``DataError`` if it fails.

    Schema: the key, time and feature columns exist (``columns`` maps column → why it is needed),
    the key is an integer, the time a Datetime, the ``numeric`` features' columns numbers. Values,
    in one aggregated ``collect``: the table has rows; no null key or time (such a row can never
    be joined: its entity's events would silently lose their features); no two rows with the same
    (key, time), whose values would be ambiguous (identical copies are rejected as well); numeric
    features finite after their transform unless their ``non_finite`` policy is ``"missing"``.
    """
    schema = lf.collect_schema()
    required = {key: "entity key", time: "validity time (valid_from)", **columns}
    _check_columns(schema, required, path=path, what="entity table")
    _check_int(schema, key, path=path, what="entity table")
    _check_time(schema, time, path=path, what="entity table")

    head = f"entity table file {path}"
    of = f" of entity {entity}" if entity else ""
    aggs: list[pl.Expr] = []
    checks: list[_Check] = []
    for column, other, why in [(key, time, "a row without a key is never joined"),
                               (time, key, "a row without a time is never in effect")]:  # fmt: skip
        alias = f"null:{column}"
        checks.append(
            _Check(
                alias,
                f"column {column!r}",
                "not null",
                example="e.g. the row with",
                fix=f"{why}; fix or drop those rows",
                raw=True,
            )
        )
        null = pl.col(column).is_null()
        shown = pl.format("{}={}", pl.lit(other), pl.col(other).filter(null).first())
        aggs += [null.sum().alias(alias), shown.alias(f"{alias}:example")]
    both = pl.struct(key, time)
    dup = both.is_duplicated() & pl.col(key).is_not_null() & pl.col(time).is_not_null()
    first = both.filter(dup).first().struct
    checks.append(
        _Check(
            "dup",
            f"the pair ({key}, {time})",
            "unique (one row per key and time)",
            raw=True,
            fix="which row holds at that time would be ambiguous (identical copies are rejected "
            f"too); keep one row per {key} and {time} at the source",
        )
    )
    aggs += [
        dup.sum().alias("dup"),
        pl.format(
            "{}={}, {}={}", pl.lit(key), first.field(key), pl.lit(time), first.field(time)
        ).alias("dup:example"),
    ]
    num_aggs, num_checks = _numeric_checks(schema, numeric, head=head)
    _run_checks(
        lf,
        aggs + num_aggs,
        checks + num_checks,
        head=head,
        empty=f"no event would get the features{of}; write the table (or point the store at "
        "the one that holds its rows) before building",
    )
