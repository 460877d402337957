"""Training-set builder: events + point-in-time features + labels, split by day, mapped ids.

One lazy plan (scan → validate → point-in-time join → split by day → one Parquet sink that
writes each row to its split's file) run by Polars' streaming engine, then the id / numeric
mappings are fitted on the written training split with streaming group-bys. Memory stays bounded
by the narrow event columns: the as-of joins sort only keys, times and labels, and the wide
feature values (strings, lists) are gathered by row id from the small entity tables as the rows
stream to the sink (``feature_store.join_features``). Output (``out/``)::

    train.parquet valid.parquet test.parquet   raw feature values + keys, event time, labels;
                                              event order; row groups of ROW_GROUP_ROWS rows
    mapped/{train,valid,test}.parquet         the same rows, model-ready: each feature mapped
                                              (ids → rows, numerics standardized), named by
                                              feature, then the labels and ``carry`` columns
    mappings/                                 vocab_<feature>.parquet ..., numeric.json
    manifest.json                             fingerprint, rows, split days, label stats, sources,
                                              coverage per entity, warnings

Ids are mapped here, once: training reads the ``mapped/`` splits (``mapped_files``) as ready
integer columns; scoring maps raw rows with the saved ``mappings/``, the same functions.

Read a split with ``load_split`` (or ``split_files`` for its files in order); both also take a
split stored as a directory ``<split>/`` of Parquet files, e.g. one written by a partitioned job.

Data contracts, checked before the dataset is in place (``DataError`` otherwise): the events
(``feature_store.validate_events``: keys, labels, no event time after the build's clock plus
``FUTURE_TOLERANCE`` nor before ``min_event_time``), each entity table (``validate_table``, from
``join_features``: rows, no null key or time, one row per key and time, finite numerics), and,
after the join, the coverage: the share of event rows that found each entity's features (at
least one feature value not null) must reach ``min_coverage``. The coverage is measured with one
aggregated query over the written splits, goes into the manifest, and a share under
``COVERAGE_WARN`` (overall or in a split) is a warning (logged and in ``manifest["warnings"]``).

Everything is written into a hidden sibling directory and renamed into place at the end, so
``out`` is either the complete new dataset or (after any error) whatever was there before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from feature_store import (
    DataError,
    FeatureSet,
    OfflineStore,
    join_features,
    point_in_time_join,
    validate_events,
)
from feature_store.pit import features_found
from pipelines import progress
from pipelines.atomic import replacing_dir
from pipelines.mappings import apply_mappings, fit_mappings, hash_index

SPLITS = ("train", "valid", "test")
LABEL_KINDS = ("binary", "regression", "real")  # 0/1; finite and >= 0; finite
MANIFEST = "manifest.json"
MAPPINGS_DIR = "mappings"
MAPPED_DIR = "mapped"
ROW_GROUP_ROWS = 16_384
_SPLIT = "__split"
_ENGINE = "streaming"
# Event times may run this far past the build's clock (clock skew, a late time zone); later ones
# are rejected: a single event dated years ahead would otherwise be the whole test split.
FUTURE_TOLERANCE = timedelta(days=1)
# Coverage floor. Missing features are legitimate for some rows (a user's first visit before the
# attribute snapshot, an expired row), but when fewer than half of the events find an entity's
# features the join itself is broken (empty or future-dated table, key mismatch, TTL too short)
# and a model trained on it learns from defaults. The demo and the real samples cover 100 %.
MIN_COVERAGE = 0.5
COVERAGE_WARN = 0.9  # below this (overall or in one split): a warning in the manifest and the log

log = logging.getLogger(__name__)


def build_training_set(
    *,
    store: OfflineStore,
    out: str | Path,
    features: FeatureSet,
    labels: dict[str, str],
    valid_days: int,
    test_days: int,
    carry: Sequence[str] = (),
    carry_checks: dict[str, str] | None = None,
    min_event_time: datetime | str | None = None,
    min_coverage: float = MIN_COVERAGE,
    split: SplitRule | None = None,
) -> dict[str, Any]:
    """Build ``out/`` (see the module docstring) atomically and return its manifest.

    ``carry``: columns besides the labels that the mapped splits keep (e.g. a mask or duration
    column the losses read). ``carry_checks``: carried columns the losses read, by the check
    their values must pass: "binary" (0 or 1: a mask, a positive indicator) or "positive"
    (finite and > 0: a duration the target is divided by); labels are checked by kind anyway.
    ``min_event_time``: events before it are rejected (None or "": no lower bound; a string is an
    ISO time, e.g. "2026-01-01"; naive = UTC).
    ``min_coverage``: the least share of event rows that must find each entity's features.
    ``split``: how rows go to train/valid/test (``SplitRule``; default: by time, the days below).
    Events without a time column (``features.events.time`` empty: no entity, nothing joined as
    of a time) take a random or column split; the manifest's ``splits`` (days) is then empty.
    ``labels`` maps label column → "binary" (must be 0/1), "regression" (finite, >= 0: a watch
    time, fitted on a log scale) or "real" (finite, any sign: fitted standardised). The
    last ``test_days`` calendar days present in the events are the test split, the ``valid_days``
    days before them the validation split, all earlier days the training split.
    """
    for column, kind in labels.items():
        if kind not in LABEL_KINDS:
            raise ValueError(f"label {column!r}: kind {kind!r} is not one of {LABEL_KINDS}")
    checks = {c: k for c, k in (carry_checks or {}).items() if c not in labels}
    for column, kind in checks.items():
        if kind not in ("binary", "positive"):
            raise ValueError(f"carried column {column!r}: check {kind!r} is not binary or positive")
    if valid_days < 0 or test_days < 0:
        raise ValueError(f"valid_days ({valid_days}) and test_days ({test_days}) must be >= 0")
    if not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"min_coverage must lie in [0, 1], got {min_coverage}")
    if isinstance(min_event_time, str):
        try:
            min_event_time = datetime.fromisoformat(min_event_time) if min_event_time else None
        except ValueError:
            raise ValueError(
                f"min_event_time: expected an ISO time like '2026-01-01', got {min_event_time!r}"
            ) from None
    limits = _Limits(min_event_time, min_coverage, checks, split or SplitRule())
    with replacing_dir(out) as tmp, pl.Config(engine_affinity=_ENGINE):  # also validation's
        return _build(store, tmp, features, labels, valid_days, test_days, list(carry), limits)


def split_files(dataset_dir: str | Path, split: str) -> list[Path]:
    """The Parquet file(s) of a split, in row order: ``<split>.parquet``, or else the files under
    a directory ``<split>/`` sorted by path."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    file = Path(dataset_dir) / f"{split}.parquet"
    if file.is_file():
        return [file]
    files = sorted((Path(dataset_dir) / split).rglob("*.parquet"))
    if not files:
        raise ValueError(
            f"dataset {dataset_dir}: no {file.name} (nor a directory {split}/ of Parquet files); "
            "build it with build_training_set"
        )
    return files


def mapped_files(dataset_dir: str | Path, split: str) -> list[Path]:
    """The model-ready Parquet file of a split (``mapped/<split>.parquet``)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    file = Path(dataset_dir) / MAPPED_DIR / f"{split}.parquet"
    if not file.is_file():
        raise ValueError(
            f"dataset {dataset_dir}: no {MAPPED_DIR}/{file.name} (built by an older version?); "
            "rebuild it with `recsys-moe features build`"
        )
    return [file]


def load_split(dataset_dir: str | Path, split: str) -> pl.LazyFrame:
    return pl.scan_parquet(split_files(dataset_dir, split))


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"training set {dataset_dir}: no {MANIFEST} (not built yet?); build it with "
            "`recsys-moe features build --config CONFIG` (the same --config/--workdir/--set)"
        )
    return json.loads(path.read_text())


# ---- steps ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitRule:
    """How the training set's rows are split (``[data]``'s ``split`` settings).

    - ``time``: the last ``test_days`` calendar days present are the test split, the
      ``valid_days`` days before them validation, the rest training (``build_training_set``'s
      days arguments);
    - ``random``: a seeded hash of the event's key columns (``events.keys``, splitmix64 over the
      ids, the same on every machine and Polars version) sends ``test_fraction`` of the events
      to test and ``valid_fraction`` to validation: an event's split depends on its key alone,
      so rebuilding after new events arrive keeps the old ones where they were;
    - ``column``: an events column whose values are "train", "valid" or "test".
    """

    kind: str = "time"  # time | random | column
    valid_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    column: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("time", "random", "column"):
            raise ValueError(f"split {self.kind!r} is not one of time, random, column")
        fractions = (self.valid_fraction, self.test_fraction)
        if self.kind == "random" and not (
            all(0.0 <= f < 1.0 for f in fractions) and sum(fractions) < 1.0
        ):
            raise ValueError(
                f"split fractions valid {self.valid_fraction} + test {self.test_fraction} must "
                "each lie in [0, 1) and leave rows for training (sum < 1)"
            )
        if self.kind == "column" and not self.column:
            raise ValueError("split 'column' needs the name of the events column (split_column)")


@dataclass(frozen=True)
class _Limits:
    min_event_time: datetime | None
    min_coverage: float
    carry_checks: dict[str, str]  # carried column -> "binary" | "positive"
    split: SplitRule


def _build(
    store: OfflineStore,
    tmp: Path,
    features: FeatureSet,
    labels: dict[str, str],
    valid_days: int,
    test_days: int,
    carry: list[str],
    limits: _Limits,
) -> dict[str, Any]:
    ev = features.events
    events_path = store.path(ev.table)
    events = store.scan(ev.table)
    entity_keys = [e.key for e in features.entities.values()]
    required = {k: "event key" for k in ev.keys}
    required |= {e.key: f"join key of entity {e.name}" for e in features.entities.values()}
    if ev.time:  # optional without entities (definitions.py): no as-of join, no time split
        required[ev.time] = "event time"
    elif limits.split.kind == "time" or limits.min_event_time is not None:
        setting = "data.split = 'time'" if limits.split.kind == "time" else "min_event_time"
        raise DataError(
            f"events file {events_path}: {setting} needs an event time, and the feature "
            'definitions\' [events] have no time column; name one there (time = "<column>"), or '
            "split the rows by a seeded hash of their keys (data.split = 'random') or by a "
            "column of yours (data.split = 'column')"
        )
    required |= {f.column: f"feature {f.name}" for f in features.event_features if not f.entity}
    required |= {c: f"{kind} label {c!r}" for c, kind in labels.items()}
    required |= {c: f"column {c!r} a loss reads" for c in carry if c not in required}
    rule = limits.split
    split_columns = [rule.column] if rule.kind == "column" else []
    required |= {c: "the split column (data.split_column)" for c in split_columns}
    validate_events(
        events,
        path=str(events_path),
        required=required,
        int_ids=list(dict.fromkeys([*ev.keys, *entity_keys])),
        binary_labels=[
            c for c, k in [*labels.items(), *limits.carry_checks.items()] if k == "binary"
        ],
        nonneg_labels=[c for c, k in labels.items() if k == "regression"],
        finite_labels=[c for c, k in labels.items() if k == "real"],
        positive_values=[c for c, k in limits.carry_checks.items() if k == "positive"],
        value_sets={c: SPLITS for c in split_columns},
        time_column=ev.time,
        unique_keys=ev.keys,
        not_after=datetime.now(UTC) + FUTURE_TOLERANCE,
        not_before=limits.min_event_time,
        # numeric features read from the events themselves (a key column, or a feature without
        # an entity): the same policy
        numeric=[f for f in features.event_features if not f.is_sparse],
    )

    if rule.kind == "time":
        days = _split_days(events, ev.time, str(events_path), valid_days, test_days)
    else:
        days = _split_range(events, ev.time) if ev.time else {}
    keep = list(dict.fromkeys([*labels, *carry]))  # what the mapped splits hold besides features
    columns = [c for c in dict.fromkeys([*ev.keys, ev.time, *features.input_columns, *keep,
                                         *split_columns]) if c]  # fmt: skip
    # entity keys join the features even when they are not part of the output (census: person_id)
    wanted = {*columns, *split_columns, *(e.key for e in features.entities.values())}
    event_columns = [c for c in events.collect_schema().names() if c in wanted]
    joined = join_features(events.select(event_columns), store, features, event_time=ev.time)
    missing = [c for c in carry if c not in joined.collect_schema()]
    if missing:
        raise DataError(
            f"events file {events_path}: no column(s) {missing}, which the tasks read (masks, "
            f"positives, durations); columns of the events and features: "
            f"{joined.collect_schema().names()}"
        )
    split = _split_expr(rule, ev.time, ev.keys, days)
    bar = progress.bar(total=4, desc="features build", unit="stage")
    bar.set_postfix_str("point-in-time join and time split")
    # One pass, one sink: each row goes to <split>.parquet (three filtered sinks of one plan
    # would each recompute the join in the streaming engine).
    joined.select(columns).sink_parquet(
        pl.PartitionBy(
            tmp,
            key=split.alias(_SPLIT),
            include_key=False,
            file_path_provider=_split_path,
            approximate_bytes_per_file=None,  # one file per split
        ),
        row_group_size=ROW_GROUP_ROWS,
        engine=_ENGINE,
    )
    for name in SPLITS:  # a split without rows is still there, as an empty file
        if not (tmp / f"{name}.parquet").is_file():
            empty = pl.DataFrame(schema=joined.select(columns).collect_schema())
            empty.write_parquet(tmp / f"{name}.parquet")
    bar.update(1)
    bar.set_postfix_str("feature coverage")
    coverage = _coverage(tmp, features)
    warnings = _check_coverage(coverage, tmp, features, store, limits.min_coverage)
    bar.update(1)
    bar.set_postfix_str("id mappings (fit on train, applied to each split)")
    map_splits(tmp, features, keep)
    bar.update(1)
    bar.set_postfix_str("manifest")
    manifest = _manifest(store, tmp, features, labels, days, rule) | {
        "mapped_columns": keep,
        "coverage": coverage,
        "min_coverage": limits.min_coverage,
        "warnings": warnings,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    bar.update(1)
    bar.close()
    return manifest


def map_splits(out: Path, features: FeatureSet, keep: list[str]) -> None:
    """Fit the mappings on ``out/train.parquet`` (saved to ``out/mappings/``) and write each
    split mapped, with its ``keep`` columns, to ``out/mapped/<split>.parquet``."""
    mappings = fit_mappings(load_split(out, "train"), features)
    mappings.save(out / MAPPINGS_DIR)
    (out / MAPPED_DIR).mkdir()
    for name in SPLITS:
        apply_mappings(load_split(out, name), features, mappings, keep=keep).sink_parquet(
            out / MAPPED_DIR / f"{name}.parquet", row_group_size=ROW_GROUP_ROWS, engine=_ENGINE
        )


def _coverage(tmp: Path, features: FeatureSet) -> dict[str, dict[str, Any]]:
    """Per joined entity: the event rows, how many found its features (at least one feature
    column not null: the as-of join found a row in effect, within the TTL), their share, and the
    share per split (None for an empty split). One aggregated query over the written splits."""
    found = {name: e.alias(f"found:{name}") for name, e in features_found(features).items()}
    if not found:
        return {}
    parts = [load_split(tmp, s).select(pl.lit(s).alias(_SPLIT), *found.values()) for s in SPLITS]
    counts = (
        pl.concat(parts)
        .group_by(_SPLIT)
        .agg(pl.len().alias("__rows"), *[pl.col(f"found:{n}").sum() for n in found])
        .collect(engine=_ENGINE)
    )
    per_split = {row[_SPLIT]: row for row in counts.iter_rows(named=True)}
    out: dict[str, dict[str, Any]] = {}
    for name in found:
        rows = sum(r["__rows"] for r in per_split.values())
        hits = sum(r[f"found:{name}"] for r in per_split.values())
        splits = {}
        for s in SPLITS:
            r = per_split.get(s)
            splits[s] = round(r[f"found:{name}"] / r["__rows"], 6) if r and r["__rows"] else None
        ent = features.entities[name]
        out[name] = {
            "table": ent.table,
            "rows": rows,
            "found": hits,
            "share": round(hits / rows, 6) if rows else None,
            "splits": splits,
        }
    return out


def _check_coverage(
    coverage: dict[str, dict[str, Any]],
    tmp: Path,
    features: FeatureSet,
    store: OfflineStore,
    floor: float,
) -> list[str]:
    """``DataError`` for an entity whose share is under ``floor`` (naming the likely cause);
    the warnings (also logged) for shares under ``COVERAGE_WARN``."""
    warnings = []
    for name, c in coverage.items():
        path = store.path(c["table"])
        if c["rows"] and c["found"] < floor * c["rows"]:
            raise DataError(
                f"entity table file {path}: only {c['share']:.1%} of the event rows "
                f"({c['found']} of {c['rows']}) found features of entity {name} in the "
                f"point-in-time join, under the floor min_coverage = {floor}; "
                f"{_diagnose(tmp, features, name, store, floor)} (or, if that share is "
                "expected, lower min_coverage: [data] min_coverage in the config)"
            )
        shares = {s: v for s, v in c["splits"].items() if v is not None}
        if c["share"] is not None and min([c["share"], *shares.values()]) < COVERAGE_WARN:
            per = ", ".join(f"{s} {v:.1%}" for s, v in shares.items())
            msg = (
                f"entity {name}: {c['share']:.1%} of the event rows ({per}) found its features "
                f"in {path}, under {COVERAGE_WARN:.0%}; the others train on missing values "
                "(check the table's keys, valid_from and the entity's TTL)"
            )
            log.warning(msg)
            warnings.append(msg)
    return warnings


def _diagnose(tmp: Path, features: FeatureSet, name: str, store: OfflineStore, floor: float) -> str:
    """The likely cause of a coverage under ``floor`` (runs only then): the first of these that
    alone leaves fewer rows than the floor: keys absent from the table, rows in effect only after
    the events (valid_from in the future), rows expired (TTL)."""
    ent = features.entities[name]
    ev_time = features.events.time
    events = pl.concat([load_split(tmp, s).select(ent.key, ev_time) for s in SPLITS])
    table = store.scan(ent.table).select(ent.key, ent.time)
    rows = events.select(pl.len()).collect().item()
    keyed = events.join(table.select(ent.key).unique(), on=ent.key, how="semi")
    n_keyed = keyed.select(pl.len()).collect().item()
    if n_keyed < floor * rows:
        examples = events.join(table, on=ent.key, how="anti").select(ent.key).head(3).collect()
        return (
            f"likely cause: key mismatch: {n_keyed} of {rows} event rows have a {ent.key} that "
            f"the table holds at all (missing e.g. {examples[ent.key].to_list()}); check that "
            "the events and the table use the same ids"
        )
    marker = table.with_columns(pl.lit(True).alias("__in_effect"))
    joined = point_in_time_join(
        events, marker, entity=ent.key, event_time=ev_time, feature_time=ent.time
    )
    n_effect = joined.select(pl.col("__in_effect").is_not_null().sum()).collect().item()

    def span(lf: pl.LazyFrame, column: str) -> tuple[str, str]:
        t = pl.col(column).dt.to_string("%F %T")
        return lf.select(t.min(), t.max().alias("max")).collect().row(0)

    (lo, hi), (ev_lo, ev_hi) = span(table, ent.time), span(events, ev_time)
    if n_effect < floor * rows:
        return (
            f"likely cause: {ent.time} in the future of the events: only {n_effect} of {rows} "
            f"event rows have a row in effect at their time ({ent.time} from {lo} to {hi}, "
            f"events from {ev_lo} to {ev_hi}); date the rows from when their values held"
        )
    if ent.ttl is None:
        return (
            f"likely cause: the rows in effect hold no feature values ({n_effect} of {rows} event "
            "rows have a row in effect, its feature columns all null); fill them at the source"
        )
    return (
        f"likely cause: TTL too short: {n_effect} of {rows} event rows have a row in effect, "
        f"but older than the entity's ttl ({ent.ttl}); raise the ttl in the feature "
        "definitions or refresh the table more often"
    )


def _split_path(args: Any) -> str:
    """``<split>.parquet`` for Polars' partitioned sink (``args``: ``FileProviderArgs``)."""
    if args.index_in_partition:  # approximate_bytes_per_file=None: never more than one file
        raise AssertionError("the partitioned sink split a training split into several files")
    return f"{args.partition_keys.item(0, _SPLIT)}.parquet"


def _manifest(
    store: OfflineStore,
    tmp: Path,
    features: FeatureSet,
    labels: dict[str, str],
    days: dict[str, tuple[date, date]],
    rule: SplitRule,
) -> dict[str, Any]:
    ev = features.events
    rules = {
        "time": "calendar days of the event time; start inclusive, end exclusive",
        "random": f"splitmix64 hash of the event keys {list(ev.keys)} with seed {rule.seed}: "
        f"valid {rule.valid_fraction}, test {rule.test_fraction} of the events (the days are "
        "each split's time range)",
        "column": f"the events column {rule.column!r} (the days are each split's time range)",
    }
    train = load_split(tmp, "train")
    return {
        "feature_set_fingerprint": features.fingerprint(),
        "created_at": datetime.now(UTC).isoformat(),
        "event_time": ev.time,
        "keys": list(ev.keys),
        "feature_columns": list(dict.fromkeys(features.input_columns)),
        "labels": label_stats(train, labels),
        "rows": {s: load_split(tmp, s).select(pl.len()).collect().item() for s in SPLITS},
        "splits": {s: {"start": a.isoformat(), "end": b.isoformat()} for s, (a, b) in days.items()},
        "split_rule": rules[rule.kind],
        "sources": {
            t: str(store.path(t).resolve())
            for t in [ev.table, *(e.table for e in features.entities.values())]
        },
    }


def _split_expr(
    rule: SplitRule, time: str, keys: Sequence[str], days: dict[str, tuple[date, date]]
) -> pl.Expr:
    """Each row's split name ("train" / "valid" / "test") under ``rule``."""
    if rule.kind == "column":
        return pl.col(rule.column).cast(pl.String)
    if rule.kind == "random":
        u = unit_hash([pl.col(k) for k in keys], rule.seed)
        test, valid = rule.test_fraction, rule.test_fraction + rule.valid_fraction
        return (
            pl.when(u < test).then(pl.lit("test")).when(u < valid).then(pl.lit("valid"))
            .otherwise(pl.lit("train"))
        )  # fmt: skip
    day = pl.col(time).dt.date()
    return (
        pl.when(day < days["valid"][0])
        .then(pl.lit("train"))
        .when(day < days["test"][0])
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )


UNIT = 2**31  # unit_hash's resolution


def unit_hash(keys: Sequence[pl.Expr], seed: int) -> pl.Expr:
    """A number in [0, 1) from integer key columns and a seed (splitmix64 per key, chained):
    uniform, and the same for the same keys and seed on any machine."""
    h = pl.lit(seed, dtype=pl.Int64)
    for k in keys:
        h = hash_index(h * 1_000_003 + k.cast(pl.Int64), UNIT + 1)  # 1..UNIT
    return (h - 1).cast(pl.Float64) / UNIT


def _split_range(events: pl.LazyFrame, time: str) -> dict[str, tuple[date, date]]:
    """Splits not cut by time: each spans every day present."""
    day = pl.col(time).dt.date()
    lo, hi = events.select(day.min().alias("lo"), day.max().alias("hi")).collect().row(0)
    return {s: (lo, hi + timedelta(days=1)) for s in SPLITS}


def _split_days(
    events: pl.LazyFrame, time: str, path: str, valid_days: int, test_days: int
) -> dict[str, tuple[date, date]]:
    """[start, end) calendar days of each split: test = the last ``test_days`` days present,
    valid = the ``valid_days`` days present before them, train = everything earlier."""
    days = events.select(pl.col(time).dt.date().unique().sort()).collect(engine=_ENGINE)
    present = days.to_series().to_list()
    if len(present) <= valid_days + test_days:
        raise DataError(
            f"events file {path}: {len(present)} distinct days of data, but valid_days="
            f"{valid_days} + test_days={test_days} leave none for training; "
            "use fewer validation / test days or more data"
        )
    end = present[-1] + timedelta(days=1)
    test_start = present[-test_days] if test_days else end
    valid_start = present[-(test_days + valid_days)] if valid_days else test_start
    return {
        "train": (present[0], valid_start),
        "valid": (valid_start, test_start),
        "test": (test_start, end),
    }


def label_stats(train: pl.LazyFrame, labels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Training-split means of each label (the constant predictors); for a regression label also
    its means on the rows where each binary label is 1 (``when``: a task masked by that label,
    e.g. watch time of clicks only, is judged against those)."""
    binary = [c for c, kind in labels.items() if kind == "binary"]
    numeric = [c for c, kind in labels.items() if kind != "binary"]
    aggs = [pl.col(c).cast(pl.Float64).mean().alias(f"{c}:mean") for c in labels]
    for c in numeric:
        value = pl.col(c).cast(pl.Float64)
        aggs.append(value.std().alias(f"{c}:std"))
        if labels[c] == "regression":
            aggs.append(value.log1p().mean().alias(f"{c}:log1p"))
        for b in binary:
            given = pl.col(b) == 1
            aggs.append(value.filter(given).mean().alias(f"{c}|{b}:mean"))
            aggs.append(value.filter(given).std().alias(f"{c}|{b}:std"))
            if labels[c] == "regression":
                aggs.append(value.log1p().filter(given).mean().alias(f"{c}|{b}:log1p"))
    row = train.select(aggs).collect(engine=_ENGINE).row(0, named=True) if aggs else {}

    def numbers(prefix: str, kind: str) -> dict[str, Any]:
        out = {"train_mean": row[f"{prefix}:mean"], "train_std": row[f"{prefix}:std"]}
        if kind == "regression":
            out["train_mean_log1p"] = row[f"{prefix}:log1p"]
        return out

    stats: dict[str, dict[str, Any]] = {}
    for c, kind in labels.items():
        stats[c] = {"kind": kind, "train_mean": row[f"{c}:mean"]}
        if kind != "binary":
            stats[c] |= numbers(c, kind)
            stats[c]["when"] = {b: numbers(f"{c}|{b}", kind) for b in binary}
    return stats
