"""Point-in-time joins: each event gets the feature values that were in effect at its time.

Entity tables are slowly changing: a row ``(key, valid_from, features...)`` holds from
``valid_from`` on until the next row of the same key. An event at ``t`` takes the row with the
greatest ``valid_from <= t`` (inclusive), so no value from the future leaks into training.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from feature_store.definitions import FeatureSet
from feature_store.store import OfflineStore
from feature_store.validate import validate_table

_ROW = "__pit_row"  # original position of an event (restores the order)
_FROW = "__pit_feature_row"  # original position of a feature row (ties: the last one wins)
_T = "__pit_time"  # both sides' times as Datetime("us")


def _time_dtype(schema: pl.Schema, column: str, where: str) -> pl.Datetime:
    if column not in schema:
        raise ValueError(f"point-in-time join: {where} has no column {column!r}")
    dtype = schema[column]
    if isinstance(dtype, pl.Datetime):
        return pl.Datetime("us", dtype.time_zone)
    if dtype == pl.Date:
        return pl.Datetime("us")
    raise ValueError(
        f"point-in-time join: {where} time column {column!r} has dtype {dtype}, "
        "expected Datetime or Date"
    )


def point_in_time_join(
    events: pl.LazyFrame,
    features: pl.LazyFrame,
    *,
    entity: str,
    event_time: str,
    feature_time: str,
    ttl: timedelta | None = None,
) -> pl.LazyFrame:
    """As-of join of ``features`` onto ``events`` by ``entity``, backward in time.

    Every event row is kept, in its original order. It gets the feature row of the same
    ``entity`` with the greatest ``feature_time <= event_time``; the feature columns are null when
    there is none, when that row is older than ``ttl`` (age > ttl; age == ttl still matches), or
    when the event's key or time is null. Several feature rows with the same (entity, time): the
    last one in the order of ``features`` wins. Feature rows with a null key or time are ignored.

    The result has the columns of ``events`` followed by those of ``features`` except ``entity``
    (kept once, from events) and ``feature_time``. Both time columns are compared as
    Datetime("us"); time zones must agree.
    """
    ev_schema = events.collect_schema()
    ft_schema = features.collect_schema()
    if entity not in ev_schema or entity not in ft_schema:
        side = "events" if entity not in ev_schema else "features"
        raise ValueError(f"point-in-time join: {side} have no key column {entity!r}")
    ev_dtype = _time_dtype(ev_schema, event_time, "events")
    ft_dtype = _time_dtype(ft_schema, feature_time, "features")
    if ev_dtype.time_zone != ft_dtype.time_zone:
        raise ValueError(
            f"point-in-time join on {entity!r}: event time {event_time!r} has time zone "
            f"{ev_dtype.time_zone}, feature time {feature_time!r} has {ft_dtype.time_zone}; "
            "convert one of them (dt.convert_time_zone / dt.replace_time_zone)"
        )
    values = [c for c in ft_schema.names() if c not in (entity, feature_time)]
    clash = [c for c in values if c in ev_schema or c in (_ROW, _FROW, _T)]
    if clash:
        raise ValueError(
            f"point-in-time join on {entity!r}: feature columns {clash} also exist in the events; "
            "rename or drop them on one side"
        )

    left = events.with_row_index(_ROW).with_columns(pl.col(event_time).cast(ev_dtype).alias(_T))
    right = (
        features.select(
            pl.col(entity).cast(ev_schema[entity]),
            pl.col(feature_time).cast(ft_dtype).alias(_T),
            *values,
        )
        .filter(pl.col(entity).is_not_null() & pl.col(_T).is_not_null())
        .with_row_index(_FROW)
        .sort(_T, _FROW)
        .unique(subset=[entity, _T], keep="last", maintain_order=True)
        .drop(_FROW)
    )
    return (
        left.sort(_T, _ROW)
        .join_asof(
            right,
            on=_T,
            by=entity,
            strategy="backward",
            tolerance=ttl,
            check_sortedness=False,  # both sides sorted on _T just above
        )
        .sort(_ROW)
        .drop(_ROW, _T)
    )


def join_features(
    events: pl.LazyFrame, store: OfflineStore, features: FeatureSet, *, event_time: str
) -> pl.LazyFrame:
    """Events with every feature column of ``features`` as of each event's time.

    For each entity with features: scan its table from ``store``, check it
    (``validate_table``: rows, no null key or time, one row per key and time, numeric features
    finite unless their ``non_finite`` policy says otherwise; ``DataError`` if not), keep key +
    time + the features' columns, and point-in-time join on the entity key with the entity's TTL.
    A feature whose column is the key itself (e.g. ``user_id``) comes straight from the events.

    The as-of join sorts the events (twice per entity); done on the feature values it would carry
    every string and list through those sorts. Instead each entity row gets a row id, the as-of
    join runs on (key, time, row id) only, and the feature columns are then gathered by row id
    with a left join against the (small) entity table, which streams.
    """
    out = events
    for name, ent in features.entities.items():
        columns = features.joined_columns(name)
        if not columns:
            continue
        table = store.scan(ent.table)
        validate_table(
            table,
            path=str(store.path(ent.table)),
            key=ent.key,
            time=ent.time,
            columns={c: f"feature column of entity {name}" for c in columns},
            numeric=[f for f in features.dense if f.entity == name and f.column != ent.key],
            entity=name,
        )
        row = f"__row_{name}"
        table = table.select(ent.key, ent.time, *columns).with_row_index(row)
        out = point_in_time_join(
            out,
            table.select(ent.key, ent.time, row),
            entity=ent.key,
            event_time=event_time,
            feature_time=ent.time,
            ttl=ent.ttl,
        )
        values = table.select(row, *columns)
        out = out.join(values, on=row, how="left", maintain_order="left").drop(row)
    return out


def features_found(features: FeatureSet) -> dict[str, pl.Expr]:
    """Per entity with joined columns: an expression, true on the rows of a joined frame that
    found that entity's features (at least one of its columns not null: a row was in effect at
    the event time, within the TTL). For coverage counts."""
    return {
        name: pl.any_horizontal([pl.col(c).is_not_null() for c in columns])
        for name in features.entities
        if (columns := features.joined_columns(name))
    }
