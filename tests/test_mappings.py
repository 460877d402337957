"""Vocabularies, hashing and numeric standardization (pipelines/mappings.py)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from fixtures import MAPPINGS_TOML

from feature_store import FeatureSet
from pipelines.mappings import Mappings, apply_mappings, fit_mappings, hash_index_py


@pytest.fixture
def features() -> FeatureSet:
    return FeatureSet.from_toml(MAPPINGS_TOML)


@pytest.fixture
def train() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [5, -3, 2**62, 5, None, 7],
            "seg": ["b", "a", "c", "b", "d", None],  # counts b2, a1, c1, d1 → cap keeps b, a, c
            "country": ["us", "us", "fr", "de", "de", "it"],  # it, fr below min_count
            "tags": [["x", "y"], ["y"], None, ["z", "y", None], [], ["x"]],
            "dur": [0.0, 9.0, 99.0, None, 3.0, 1.0],
            "raw_score": [1, 1, 1, 1, 1, 1],  # constant → std floored
        }
    )


def vocab(m: Mappings, name: str) -> dict:
    return dict(zip(m.vocabs[name]["value"], m.vocabs[name]["index"], strict=True))


def test_vocab_order_min_count_and_cap(features, train):
    m = fit_mappings(train.lazy(), features)
    assert m.vocabs["seg"].rows() == [("b", 1, 2), ("a", 2, 1), ("c", 3, 1)]
    assert m.vocabs["seg"].schema == pl.Schema(
        {"value": pl.String, "index": pl.Int64, "count": pl.Int64}
    )
    assert vocab(m, "country") == {"de": 1, "us": 2}
    assert vocab(m, "tags") == {"y": 1, "x": 2, "z": 3}  # list elements counted, nulls not
    assert "user_id" not in m.vocabs  # hashed: nothing to fit


def test_numeric_standardization(features, train):
    m = fit_mappings(train.lazy(), features)
    logs = np.log1p([0.0, 9.0, 99.0, 3.0, 1.0])
    assert m.numeric["dur"]["mean"] == pytest.approx(logs.mean())
    assert m.numeric["dur"]["std"] == pytest.approx(logs.std())
    assert m.numeric["score"] == {"mean": 1.0, "std": 1e-6}
    out = apply_mappings(train.lazy(), features, m).collect()
    dur = out["dur"].to_list()
    assert dur[3] == 0.0  # null → 0
    assert np.mean([d for i, d in enumerate(dur) if i != 3]) == pytest.approx(0.0, abs=1e-6)
    assert out["score"].to_list() == [0.0] * 6


def test_apply_schema_and_unseen_values(features, train):
    m = fit_mappings(train.lazy(), features)
    new = pl.DataFrame(
        {
            "raw_score": [2.0, None, 0.0],
            "user_id": [5, None, 123],
            "seg": ["c", "zzz", None],
            "country": ["it", "us", "de"],
            "tags": [["q", "x"], None, [None]],
            "dur": [math.nan, 1.0, 2.0],
        }
    )
    out = apply_mappings(new.lazy(), features, m).collect()
    assert out.columns == ["user_id", "seg", "country", "tags", "dur", "score"]
    assert out.schema == pl.Schema(
        {
            "user_id": pl.Int64,
            "seg": pl.Int64,
            "country": pl.Int64,
            "tags": pl.List(pl.Int64),
            "dur": pl.Float32,
            "score": pl.Float32,
        }
    )
    assert out["seg"].to_list() == [3, 0, 0]
    assert out["country"].to_list() == [0, 2, 1]
    assert out["tags"].to_list() == [[0, 2], [], [0]]
    assert out["user_id"].to_list() == [hash_index_py(5, 11), 0, hash_index_py(123, 11)]
    assert out["dur"][0] == 0.0


def test_hash_stable_and_in_range(features):
    ids = [0, 1, -1, 2**63 - 1, -(2**63), *np.random.default_rng(0).integers(-1e12, 1e12, 500)]
    frame = pl.DataFrame({"user_id": pl.Series(ids, dtype=pl.Int64)})
    only_id = FeatureSet.from_toml(MAPPINGS_TOML.split('[[features]]\nname = "seg"')[0])
    big = FeatureSet.from_toml(only_id.source.replace("= 11", "= 1000001"))
    out = apply_mappings(frame.lazy(), only_id, Mappings()).collect()["user_id"].to_list()
    assert out == [hash_index_py(int(i), 11) for i in ids]
    assert set(out) == set(range(1, 11))  # spread over every non-zero row
    # pinned: the hash must never change between versions (trained tables depend on it)
    pinned = pl.DataFrame({"user_id": [0, 1, 42, -7]})
    assert apply_mappings(pinned.lazy(), big, Mappings()).collect()["user_id"].to_list() == [
        607536,
        822466,
        275414,
        936753,
    ]
    assert hash_index_py(0, 2**63) == 0xE220A8397B1DCDAF % (2**63 - 1) + 1  # splitmix64(0)


def test_hash_rejects_non_integer(features, train):
    bad = train.with_columns(pl.col("user_id").cast(pl.String))
    with pytest.raises(ValueError, match="user_id.*hash.*integer"):
        fit_mappings(bad.lazy(), features)


def test_vocab_dtype_mismatch(features, train):
    m = fit_mappings(train.lazy(), features)
    bad = train.with_columns(seg=pl.Series([1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="'seg'"):
        apply_mappings(bad.lazy(), features, m)


def test_save_load_round_trip(features, train, tmp_path):
    m = fit_mappings(train.lazy(), features)
    m.save(tmp_path / "m")
    loaded = Mappings.load(tmp_path / "m", features)
    assert loaded.numeric == m.numeric
    assert loaded.vocabs.keys() == m.vocabs.keys()
    for name, v in m.vocabs.items():
        assert loaded.vocabs[name].equals(v)
    assert not list((tmp_path / "m").glob("*.pkl"))
    a = apply_mappings(train.lazy(), features, m).collect()
    assert a.equals(apply_mappings(train.lazy(), features, loaded).collect())
