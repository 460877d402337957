"""A corpus of bad inputs through the real CLI: each is rejected with a message a user can act on
(file, column, value), exit status 2, no traceback, and nothing written."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from pipelines.synth import synthesize

Mutation = Callable[[Path], None]


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


def _set_row(column: str, value: float) -> Callable[[pl.DataFrame], pl.DataFrame]:
    def fn(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(
            pl.when(pl.int_range(pl.len()) == 7)
            .then(pl.lit(value))
            .otherwise(pl.col(column))
            .cast(df.schema[column])
            .alias(column)
        )

    return fn


def _truncate(store: Path) -> None:
    path = store / "impressions.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CASES: dict[str, tuple[Mutation, list[str]]] = {
    "missing column": (_edit("impressions", lambda d: d.drop("click")), ["'click'"]),
    "time as string": (
        _edit("impressions", lambda d: d.with_columns(pl.col("ts").cast(pl.String))),
        ["'ts'", "String", "Datetime"],
    ),
    "float ids": (
        _edit("impressions", lambda d: d.with_columns(pl.col("user_id").cast(pl.Float64))),
        ["'user_id'", "Float64", "Int64"],
    ),
    "click = 2": (_edit("impressions", _set_row("click", 2)), ["'click'", "0 or 1", "2"]),
    "NaN watch time": (
        _edit("impressions", _set_row("watch_time_s", math.nan)),
        ["'watch_time_s'"],
    ),
    "inf watch time": (
        _edit("impressions", _set_row("watch_time_s", math.inf)),
        ["'watch_time_s'"],
    ),
    "negative watch time": (
        _edit("impressions", _set_row("watch_time_s", -3.0)),
        ["'watch_time_s'", "-3.0"],
    ),
    "empty events": (_edit("impressions", lambda d: d.head(0)), ["no rows"]),
    "truncated Parquet": (_truncate, ["not a readable Parquet file"]),
    "duplicated keys": (
        _edit("impressions", lambda d: pl.concat([d, d.head(3)])),
        ["request_id, user_id, item_id", "6 of"],  # 3 copied rows: 6 share a key,
    ),
    "entity table lacks a feature column": (
        _edit("users", lambda d: d.drop("segment")),
        ["users.parquet", "'segment'"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_clearly(case: str, clean_store: Path, tmp_path: Path) -> None:
    mutate, needles = CASES[case]
    store = tmp_path / "store"
    shutil.copytree(clean_store, store)
    mutate(store)
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", "features", "build", "--workdir", str(tmp_path),
         "--set", f"data.store={store}", "--set", "data.dataset=ds"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    table = "users.parquet" if "entity" in case else "impressions.parquet"
    for needle in [table, *needles]:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no dataset, no temp dir
