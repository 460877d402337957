"""A corpus of bad inputs through the real CLI: each is rejected with a message a user can act on
(file, column, value), exit status 2, no traceback, and nothing written. The data contracts
(feature_store/validate.py, pipelines/training_set.py) each have a case here; their finer points
are in tests/test_contracts.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pytest

from feature_store import DataError, FeatureSet, OfflineStore
from pipelines.synth import synthesize
from pipelines.training_set import build_training_set
from recsys_moe.config import DEMO_CONFIG

Mutation = Callable[[Path], None]
SYNTH_FEATURES = DEMO_CONFIG.parent / "features" / "synth.toml"


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad") / "data"
    synthesize(out, users=200, items=60, days=5, seed=3)
    return out


def _edit(table: str, fn: Callable[[pl.DataFrame], pl.DataFrame]) -> Mutation:
    def mutate(store: Path) -> None:
        path = store / f"{table}.parquet"
        fn(pl.read_parquet(path)).write_parquet(path)

    return mutate


def _set_row(
    column: str, value: object, rows: Sequence[int] = (7,)
) -> Callable[[pl.DataFrame], pl.DataFrame]:
    def fn(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(
            pl.when(pl.int_range(pl.len()).is_in(list(rows)))
            .then(pl.lit(value))
            .otherwise(pl.col(column))
            .cast(df.schema[column])
            .alias(column)
        )

    return fn


def _duplicate_versions(df: pl.DataFrame) -> pl.DataFrame:
    """Three users get a second row at the same valid_from with another segment."""
    return pl.concat([df, df.head(3).with_columns(segment=pl.lit("other"))])


def _truncate(store: Path) -> None:
    path = store / "impressions.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class Case(NamedTuple):
    table: str  # the file the message must name
    mutate: Mutation
    needles: list[str]  # also in the message
    args: tuple[str, ...] = ()  # more CLI arguments


CASES: dict[str, Case] = {
    "missing column": Case(
        "impressions", _edit("impressions", lambda d: d.drop("click")), ["'click'"]
    ),
    "time as string": Case(
        "impressions",
        _edit("impressions", lambda d: d.with_columns(pl.col("ts").cast(pl.String))),
        ["'ts'", "String", "Datetime"],
    ),
    "float ids": Case(
        "impressions",
        _edit("impressions", lambda d: d.with_columns(pl.col("user_id").cast(pl.Float64))),
        ["'user_id'", "Float64", "Int64"],
    ),
    "click = 2": Case(
        "impressions", _edit("impressions", _set_row("click", 2)), ["'click'", "0 or 1", "2"]
    ),
    "NaN watch time": Case(
        "impressions",
        _edit("impressions", _set_row("watch_time_s", math.nan)),
        ["'watch_time_s'"],
    ),
    "inf watch time": Case(
        "impressions",
        _edit("impressions", _set_row("watch_time_s", math.inf)),
        ["'watch_time_s'"],
    ),
    "negative watch time": Case(
        "impressions",
        _edit("impressions", _set_row("watch_time_s", -3.0)),
        ["'watch_time_s'", "-3.0"],
    ),
    "empty events": Case("impressions", _edit("impressions", lambda d: d.head(0)), ["no rows"]),
    "truncated Parquet": Case("impressions", _truncate, ["not a readable Parquet file"]),
    "duplicated keys": Case(
        "impressions",
        _edit("impressions", lambda d: pl.concat([d, d.head(3)])),
        ["request_id, user_id, item_id", "6 of"],  # 3 copied rows: 6 share a key,
    ),
    "entity table lacks a feature column": Case(
        "users",
        _edit("users", lambda d: d.drop("segment")),
        ["users.parquet", "'segment'"],
    ),
    # ---- data contracts: entity tables (validate_table) --------------------------------------
    "inf in a numeric feature": Case(
        "items",
        _edit("items", _set_row("duration_s", math.inf)),
        ["'duration_s'", "numeric feature duration_s", "finite", "1 of", "e.g. inf", "non_finite"],
    ),
    "NaN in a numeric feature": Case(
        "items",
        _edit("items", _set_row("duration_s", math.nan, rows=(3, 7))),
        ["'duration_s'", "2 of", "e.g. nan", 'non_finite = "missing"'],
    ),
    "empty users table": Case(
        "users", _edit("users", lambda d: d.head(0)), ["has no rows", "entity user"]
    ),
    "null entity key": Case(
        "users", _edit("users", _set_row("user_id", None)), ["'user_id'", "not null", "1 of"]
    ),
    "duplicate key and time": Case(
        "users",
        _edit("users", _duplicate_versions),
        ["(user_id, valid_from)", "unique", "6 of", "e.g. user_id=1, valid_from=2025-", "one row"],
    ),
    # ---- the join's coverage (training-set builder) ------------------------------------------
    "valid_from all in the future": Case(
        "users",
        _edit("users", lambda d: d.with_columns(pl.col("valid_from") + timedelta(days=3650))),
        [
            "entity user",
            "0.0%",
            "min_coverage = 0.5",
            "valid_from in the future",
            "events from 2026-01-01",
        ],  # fmt: skip
    ),
    # ---- events (validate_events) --------------------------------------------------------------
    "impression dated 2200": Case(
        "impressions",
        _edit("impressions", _set_row("ts", datetime(2200, 1, 1))),
        ["'ts'", "1 of", "latest 2200-01-01 00:00:00", "the build's clock", "test split"],
    ),
    "impression before the configured start": Case(
        "impressions",
        lambda store: None,  # the events start on 2026-01-01; the config says 2026-01-02
        ["'ts'", "min_event_time", "2026-01-02 00:00:00", "earliest 2026-01-01 00:"],
        ("--set", "data.min_event_time=2026-01-02"),
    ),
}


def _cli_build(tmp_path: Path, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", "features", "build", "--workdir", str(tmp_path),
         "--set", f"data.store={store}", "--set", "data.dataset=ds", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_clearly(case: str, clean_store: Path, tmp_path: Path) -> None:
    c = CASES[case]
    store = tmp_path / "store"
    shutil.copytree(clean_store, store)
    c.mutate(store)
    proc = _cli_build(tmp_path, store, *c.args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in [f"{c.table}.parquet", *c.needles]:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no dataset, no temp dir


def test_event_before_min_event_time_rejected(clean_store: Path, tmp_path: Path) -> None:
    """The configured start, through the builder (the CLI case above once dataset.py passes
    ``data.min_event_time``)."""
    with pytest.raises(DataError) as err:
        build_training_set(
            store=OfflineStore(clean_store), out=tmp_path / "ds",
            features=FeatureSet.load(SYNTH_FEATURES),
            labels={"click": "binary", "watch_time_s": "regression"},
            valid_days=1, test_days=1, min_event_time="2026-01-02",
        )  # fmt: skip
    message = str(err.value)
    for needle in ["impressions.parquet", "'ts'", "(min_event_time) 2026-01-02 00:00:00",
                   "earliest 2026-01-01 00:"]:  # fmt: skip
        assert needle in message, (needle, message)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_as_missing_is_accepted(clean_store: Path, tmp_path: Path) -> None:
    """``non_finite = "missing"`` on duration_s: inf and NaN build; they map to 0.0 (the missing
    value) and the statistics are those of the finite values."""
    store = tmp_path / "store"
    shutil.copytree(clean_store, store)
    _edit("items", _set_row("duration_s", math.inf, rows=(0, 1)))(store)
    _edit("items", _set_row("duration_s", math.nan, rows=(2,)))(store)
    _edit("items", _set_row("duration_s", -math.inf, rows=(3,)))(store)
    text = SYNTH_FEATURES.read_text()
    head, sep, tail = text.rpartition('transform = "log1p"')
    features = tmp_path / "features.toml"
    features.write_text(head + sep + '\nnon_finite = "missing"' + tail)
    assert FeatureSet.load(features).dense[0].non_finite == "missing"

    proc = _cli_build(tmp_path, store, "--set", f"features={features}")
    assert proc.returncode == 0, proc.stderr
    ds = tmp_path / "ds"
    raw = pl.read_parquet(ds / "train.parquet")["duration_s"]
    assert (~raw.is_finite()).sum() > 0  # the raw split keeps the source's values
    stats = json.loads((ds / "mappings" / "numeric.json").read_text())["duration_s"]
    finite = raw.filter(raw.is_finite()).log1p()
    assert stats["mean"] == pytest.approx(finite.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(finite.std(ddof=0), rel=1e-12)
    assert all(math.isfinite(v) for v in stats.values())
    for split in ("train", "valid", "test"):
        mapped = pl.read_parquet(ds / "mapped" / f"{split}.parquet")["duration_s"].to_numpy()
        assert np.isfinite(mapped).all(), split
    mapped = pl.read_parquet(ds / "mapped" / "train.parquet")["duration_s"]
    assert (mapped.filter(~raw.is_finite()) == 0.0).all()
