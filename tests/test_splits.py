"""Training-set splits besides time: a seeded random fraction keyed on the event, and a column."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from fixtures import small_store

from feature_store import DataError, FeatureSet, OfflineStore
from pipelines.mappings import hash_index_py
from pipelines.training_set import UNIT, SplitRule, build_training_set, load_manifest, unit_hash
from recsys_moe.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
FEATURES = FeatureSet.load(ROOT / "configs" / "features" / "synth.toml")
LABELS = {"click": "binary", "delta": "real"}


def build(store_root: Path, out: Path, n: int, rule: SplitRule, **columns: list) -> dict:
    store = small_store(store_root, [float(i) for i in range(n)], **columns)
    return build_training_set(store=store, out=out, features=FEATURES, labels=LABELS,
                              valid_days=1, test_days=1, split=rule)  # fmt: skip


def splits_of(out: Path) -> dict[int, str]:
    frames = [
        pl.read_parquet(out / f"{s}.parquet").select("request_id", split=pl.lit(s))
        for s in ("train", "valid", "test")
    ]
    return dict(pl.concat(frames).iter_rows())


def test_unit_hash_matches_its_reference_and_is_uniform() -> None:
    ids = list(range(2000))
    got = pl.select(u=unit_hash([pl.Series(ids)], 7))["u"].to_list()
    want = [(hash_index_py(7 * 1_000_003 + i, UNIT + 1) - 1) / UNIT for i in ids]
    assert got == want
    assert 0.45 < sum(got) / len(got) < 0.55 and min(got) >= 0.0 and max(got) < 1.0


def test_random_split_is_seeded_and_keyed_on_the_event(tmp_path: Path) -> None:
    rule = SplitRule("random", valid_fraction=0.2, test_fraction=0.3, seed=1)
    manifest = build(tmp_path / "s1", tmp_path / "d1", 400, rule)
    rows = manifest["rows"]
    assert sum(rows.values()) == 400
    assert 50 < rows["valid"] < 110 and 85 < rows["test"] < 155  # 80 and 120 expected
    assert "splitmix64 hash of the event keys" in manifest["split_rule"]
    first = splits_of(tmp_path / "d1")
    # the same events among more: each keeps its split (it depends on its own key only)
    build(tmp_path / "s2", tmp_path / "d2", 600, rule)
    more = splits_of(tmp_path / "d2")
    assert all(more[k] == v for k, v in first.items())
    # another seed moves events
    build(tmp_path / "s3", tmp_path / "d3", 400, SplitRule("random", 0.2, 0.3, seed=2))
    other = splits_of(tmp_path / "d3")
    assert sum(other[k] != v for k, v in first.items()) > 100
    assert load_manifest(tmp_path / "d1")["splits"]["test"] == manifest["splits"]["train"]


def test_column_split_and_its_values_checked(tmp_path: Path) -> None:
    n = 40
    names = ["train"] * 30 + ["valid"] * 5 + ["test"] * 5
    manifest = build(tmp_path / "s", tmp_path / "d", n, SplitRule("column", column="fold"),
                     fold=names)  # fmt: skip
    assert manifest["rows"] == {"train": 30, "valid": 5, "test": 5}
    assert {k: v for k, v in splits_of(tmp_path / "d").items()} == dict(enumerate(names))
    bad = names[:-1] + ["holdout"]
    with pytest.raises(DataError, match=r"column 'fold' .*one of \['train', 'valid', 'test'\].*"
                       r"1 of 40 rows .*'holdout'"):  # fmt: skip
        build(tmp_path / "b", tmp_path / "bd", n, SplitRule("column", column="fold"), fold=bad)
    assert not (tmp_path / "bd").exists()
    with pytest.raises(DataError, match=r"missing required column 'nope' \(needed as: the split "
                       r"column \(data.split_column\)\)"):  # fmt: skip
        build(tmp_path / "c", tmp_path / "cd", n, SplitRule("column", column="nope"), fold=names)


def test_split_settings_checked_at_load() -> None:
    assert DataConfig(split="random").split_rule() == SplitRule("random", 0.2, 0.2, 0, "")
    with pytest.raises(ValueError, match=r"data: split fractions valid 0.5 \+ test 0.5"):
        DataConfig(split="random", valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"data: split 'column' needs the name"):
        DataConfig(split="column")
    with pytest.raises(ValueError, match=r"data.split: expected one of 'time', 'random'"):
        DataConfig(split="shuffle")  # type: ignore[arg-type]


NO_TIME = """
[events]                  # a plain table of rows: no time column, no entity
table = "rows"
keys = ["row_id"]

[[features]]
pattern = "x_*"
kind = "numeric"

[[features]]
name = "colour"
kind = "categorical"
num_embeddings = 8
embedding_dim = 4
"""


def test_events_without_a_time_column_take_a_random_or_column_split(tmp_path: Path) -> None:
    n = 300
    rows = pl.DataFrame({
        "row_id": range(n), "x_0": [i / n for i in range(n)],
        "x_1": [(-1.0) ** i for i in range(n)],
        "colour": [i % 5 for i in range(n)], "y": [float(i % 7) - 3.0 for i in range(n)],
        "fold": ["train"] * 200 + ["valid"] * 50 + ["test"] * 50,
    })  # fmt: skip
    (tmp_path / "store").mkdir()
    rows.write_parquet(tmp_path / "store" / "rows.parquet")
    store = OfflineStore(tmp_path / "store")
    (tmp_path / "f.toml").write_text(NO_TIME)
    features = FeatureSet.load(
        tmp_path / "f.toml", columns=lambda t: store.scan(t).collect_schema().names()
    )
    assert features.events.time == ""

    def build_with(rule: SplitRule, out: str) -> dict:
        return build_training_set(store=store, out=tmp_path / out, features=features,
                                  labels={"y": "real"}, valid_days=1, test_days=1,
                                  split=rule)  # fmt: skip

    manifest = build_with(SplitRule("random", 0.2, 0.2, seed=3), "random")
    assert manifest["event_time"] == "" and manifest["splits"] == {}
    assert sum(manifest["rows"].values()) == n and min(manifest["rows"].values()) > 30
    written = pl.read_parquet(tmp_path / "random" / "train.parquet")
    assert set(written.columns) == {"row_id", "x_0", "x_1", "colour", "y"}  # no time column
    assert build_with(SplitRule("column", column="fold"), "column")["rows"] == {
        "train": 200, "valid": 50, "test": 50
    }  # fmt: skip
    # the time split (and a lower bound on the time) need a time: said before anything is written
    with pytest.raises(DataError, match=r"rows.parquet: data.split = 'time' needs an event time.*"
                       r"\[events\] have no time column.*data.split = 'random'"):  # fmt: skip
        build_with(SplitRule("time"), "timed")
    with pytest.raises(DataError, match=r"min_event_time needs an event time"):
        build_training_set(store=store, out=tmp_path / "early", features=features,
                           labels={"y": "real"}, valid_days=1, test_days=1,
                           split=SplitRule("random"), min_event_time="2026-01-01")  # fmt: skip
    assert not (tmp_path / "timed").exists() and not (tmp_path / "early").exists()


def test_features_of_an_entity_still_need_the_event_time(tmp_path: Path) -> None:
    text = NO_TIME.replace("[events]", '[entities.user]\nkey = "user_id"\ntable = "users"\n\n'
                           "[events]")  # fmt: skip
    (tmp_path / "f.toml").write_text(text)
    with pytest.raises(ValueError, match=r"\[events\]: missing required key 'time': the entities "
                       r"\['user'\] are joined as of each event's time"):  # fmt: skip
        FeatureSet.load(tmp_path / "f.toml", columns=lambda t: ["x_0", "x_1", "colour"])
