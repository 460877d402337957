"""serving's scoring parts that need no model: candidates read, sharded, cleaned and counted;
model URIs parsed; no score that is not a finite number ever written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from feature_store import DataError
from pipelines.mappings import hash_index_py
from serving.candidates import (
    ROW,
    CandidateSource,
    clean,
    partition_unit,
    read_shard,
    shard_of,
    unit_done,
)
from serving.model import check_finite, parse_model_uri


def test_repeated_pairs_are_dropped_the_first_in_input_order_kept() -> None:
    frame = pl.DataFrame(
        {
            "request_id": [1, 1, 1, 2, 2],
            "user_id": [5, 5, 5, 6, 6],
            "item_id": [10, 11, 10, 10, 10],
            ROW: [0, 1, 2, 3, 4],
        }
    )
    kept, dropped = clean(frame, "request_id")
    assert dropped == 2
    assert kept[ROW].to_list() == [0, 1, 3]


def test_a_group_lands_in_one_shard_by_a_stable_hash() -> None:
    ids = pl.DataFrame({"user_id": [1, 2, 3, 2**40, -7, 1]})
    got = ids.select(shard_of("user_id", 7))["user_id"].to_list()
    assert got == [hash_index_py(v, 8) - 1 for v in ids["user_id"]]  # splitmix64, not pl.hash
    assert got[0] == got[-1] and all(0 <= s < 7 for s in got)


def _write(tmp_path: Path) -> tuple[Path, pl.DataFrame]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cands"
    (folder / "day=1").mkdir(parents=True)
    a = pl.DataFrame(
        {"user_id": rng.integers(0, 200, 3000), "item_id": rng.integers(0, 40, 3000)},
        schema={"user_id": pl.Int64, "item_id": pl.Int64},
    ).with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 0).then(None).otherwise(pl.col("item_id"))
        .alias("item_id")
    )  # fmt: skip
    b = a.head(500)  # every pair of b repeats one of a (or is null)
    a.write_parquet(folder / "day=1" / "a.parquet", row_group_size=700)
    b.write_parquet(folder / "b.parquet", row_group_size=200)
    (folder / "_SUCCESS.parquet").write_bytes(b"not read")  # names starting with _ are skipped
    return folder, pl.concat([b, a])  # sorted path order: b.parquet, then day=1/a.parquet


@pytest.mark.parametrize("world", [1, 3])
def test_partitions_hold_every_candidate_once_whatever_the_ranks(
    tmp_path: Path, world: int
) -> None:
    folder, rows = _write(tmp_path)
    source = CandidateSource(folder)
    assert source.rows == rows.height and len(source.units) == 3 + 5
    out = tmp_path / "out"
    nulls = 0
    for rank in range(world):  # each "rank" its own units, as under torchrun
        for u in range(len(source.units)):
            if u % world == rank:
                nulls += partition_unit(source, u, 4, out)["null_id"]
    assert all(unit_done(out, u).is_file() for u in range(len(source.units)))
    assert nulls == rows["item_id"].null_count()
    shards = [read_shard(out, s, source.ids) for s in range(4)]
    for s, frame in enumerate(shards):  # a user's candidates in one shard, in input order
        assert frame[ROW].is_sorted()
        assert (frame.select(shard_of("user_id", 4))["user_id"] == s).all()
    got = pl.concat(shards).sort(ROW)
    expected = rows.with_row_index(ROW).drop_nulls().select(got.columns)
    assert got.select(expected.columns).equals(expected.with_columns(pl.col(ROW).cast(pl.Int64)))
    cleaned = sum(clean(f, "user_id")[0].height for f in shards)
    assert cleaned == rows.drop_nulls().unique().height


def test_bad_candidate_files_are_named(tmp_path: Path) -> None:
    pl.DataFrame({"user_id": [1.0], "item_id": [2]}).write_parquet(tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"f.parquet: column 'user_id' has dtype Float64"):
        CandidateSource(tmp_path / "f.parquet")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pl.DataFrame({"user_id": [1], "item_id": [2]}).write_parquet(mixed / "a.parquet")
    pl.DataFrame({"request_id": [1], "user_id": [1], "item_id": [2]}).write_parquet(
        mixed / "b.parquet"
    )
    with pytest.raises(DataError, match="request_id"):
        CandidateSource(mixed)
    with pytest.raises(DataError, match="no such file"):
        CandidateSource(tmp_path / "nope")


def test_model_uris_by_alias_or_version() -> None:
    assert parse_model_uri("models:/demo@champion") == ("demo", "champion", None)
    assert parse_model_uri("models:/my/model/12") == ("my/model", None, "12")
    for bad in ("demo@champion", "models:/demo", "models:/demo/latest", "models:/@x"):
        with pytest.raises(ValueError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
            parse_model_uri(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_score_that_is_not_finite_fails_naming_the_row(bad: float | None) -> None:
    frame = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [7, 8, 9],
            "p_click": [0.1, bad, 0.3],
            "score": [0.1, 0.2, 0.3],
        }  # fmt: skip
    )
    with pytest.raises(DataError, match=r"1 of 3 rows .*'item_id': 8"):
        check_finite(frame, ["p_click", "score"], ["user_id", "item_id"], Path("c.parquet"))
    check_finite(frame.head(1), ["p_click", "score"], ["user_id", "item_id"], Path("c.parquet"))


def test_a_model_with_features_outside_the_entity_tables_is_refused() -> None:
    from datetime import datetime

    import torch

    from feature_store import FeatureSet, OfflineStore
    from serving.asof import AsOfFeatures

    features = FeatureSet.from_toml(
        """
[entities.user]
key = "user_id"
table = "users"
time = "valid_from"

[events]
table = "impressions"
time = "ts"
keys = ["user_id", "item_id"]

[[features]]
name = "hour"
kind = "numeric"
"""
    )
    with pytest.raises(ValueError, match=r"\['hour'\] have no entity"):
        AsOfFeatures(OfflineStore("nowhere"), features, None, datetime(2026, 1, 1),  # type: ignore[arg-type]
                     torch.nn.Linear(1, 1))  # type: ignore[arg-type]  # fmt: skip
