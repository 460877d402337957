"""Properties of the synthetic data set (pipelines/synth.py) on a small instance."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipelines import synth
from pipelines.synth import synthesize

SMALL = {"users": 400, "items": 80, "days": 6, "requests_per_user_day": 1.0}
FILES = ("users", "items", "impressions", "candidates", "oracle")
SCHEMAS = {
    "users": {
        "user_id": pl.Int64, "valid_from": pl.Datetime("us"), "segment": pl.String,
        "age_bucket": pl.String, "country": pl.String, "interests": pl.List(pl.String),
    },
    "items": {
        "item_id": pl.Int64, "valid_from": pl.Datetime("us"), "category": pl.String,
        "author": pl.Int64, "tags": pl.List(pl.String), "duration_s": pl.Float64,
    },
    "impressions": {
        "request_id": pl.Int64, "user_id": pl.Int64, "item_id": pl.Int64,
        "ts": pl.Datetime("us"), "position": pl.Int32, "click": pl.Int8,
        "watch_time_s": pl.Float64,
    },
    "candidates": {"request_id": pl.Int64, "user_id": pl.Int64, "item_id": pl.Int64},
    "oracle": {
        "request_id": pl.Int64, "user_id": pl.Int64, "item_id": pl.Int64,
        "p_click": pl.Float64, "expected_watch_time_s": pl.Float64,
        "expected_watch_time_s_given_click": pl.Float64,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, seed=7, **SMALL)
    return out


def read(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / f"{name}.parquet")


def meta_of(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


def in_effect(out: Path) -> pl.DataFrame:
    """Impressions with the user and item rows in effect at ``ts`` (point-in-time join)."""
    users = read(out, "users").sort("valid_from")
    items = read(out, "items").sort("valid_from")
    imp = read(out, "impressions").join(
        read(out, "oracle"), on=["request_id", "user_id", "item_id"]
    )
    return (
        imp.sort("ts")
        .join_asof(users, left_on="ts", right_on="valid_from", by="user_id", check_sortedness=False)
        .drop("valid_from")
        .join_asof(items, left_on="ts", right_on="valid_from", by="item_id", check_sortedness=False)
    )


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    small = {"users": 120, "items": 40, "days": 4}
    synthesize(a, seed=1, **small)
    synthesize(b, seed=1, **small)
    synthesize(c, seed=2, **small)
    for name in FILES:
        assert read(a, name).equals(read(b, name)), name
        assert (a / f"{name}.parquet").read_bytes() == (b / f"{name}.parquet").read_bytes(), name
    assert meta_of(a) == meta_of(b)
    assert not read(a, "impressions").equals(read(c, "impressions"))
    assert not read(a, "users").equals(read(c, "users"))


def test_schemas_and_returned_meta(data):
    for name, schema in SCHEMAS.items():
        assert dict(read(data, name).schema) == schema, name
    meta = meta_of(data)
    assert meta["params"] == {**SMALL, "seed": 7, "items_per_request": 10, "test_days": 1,
                              "start": "2026-01-01"}  # fmt: skip
    assert all(meta["rows"][name] == read(data, name).height for name in FILES)


def test_labels_positions_and_order(data):
    imp = read(data, "impressions")
    assert imp.height == pytest.approx(400 * 6 * 1.0 * 10, rel=0.25)
    assert set(imp["click"].unique()) <= {0, 1}
    watch = imp["watch_time_s"].to_numpy()
    assert np.isfinite(watch).all() and (watch >= 0).all()
    assert imp["ts"].is_sorted()
    per_request = imp.group_by("request_id").agg(
        n=pl.len(), items=pl.col("item_id").n_unique(), users=pl.col("user_id").n_unique(),
        times=pl.col("ts").n_unique(), positions=pl.col("position").sort(),
    )  # fmt: skip
    assert (per_request["n"] == 10).all() and (per_request["items"] == 10).all()
    assert (per_request["users"] == 1).all() and (per_request["times"] == 1).all()
    assert all(p.to_list() == list(range(10)) for p in per_request["positions"])
    assert 0.05 < imp["click"].mean() < 0.3


def test_everything_exists_at_impression_time(data):
    joined = in_effect(data)
    assert joined.height == read(data, "impressions").height
    assert joined["segment"].null_count() == 0, "an impression of a user before their first row"
    assert joined["category"].null_count() == 0, "an impression of an item before it was published"


def test_attribute_rows_change_inside_the_period(data):
    meta = meta_of(data)
    start = datetime.fromisoformat(meta["period_start"])
    end = datetime.fromisoformat(meta["period_end"])
    users = read(data, "users").sort("user_id", "valid_from")
    first = users.group_by("user_id").agg(pl.col("valid_from").min())
    assert (first["valid_from"] < start).all()
    second = users.filter(pl.col("user_id").is_duplicated()).group_by("user_id").agg(
        pl.col("valid_from").max(), pl.col("segment").n_unique(), pl.col("interests").n_unique()
    )  # fmt: skip
    assert 0.05 < second.height / 400 < 0.3
    assert second["valid_from"].is_between(start, end, closed="left").all()
    assert ((second["segment"] > 1) | (second["interests"] > 1)).all()

    items = read(data, "items")
    published = items.group_by("item_id").agg(pl.col("valid_from").min())
    assert published["valid_from"].is_between(start, end, closed="left").any()
    assert items["item_id"].is_duplicated().any()


def test_p_click_is_a_function_of_the_features_in_effect(data):
    joined = in_effect(data).with_columns(pl.col("interests", "tags").list.join(","))
    features = ["user_id", "segment", "age_bucket", "country", "interests",
                "item_id", "category", "author", "tags", "duration_s"]  # fmt: skip
    per_key = joined.group_by(features).agg(
        pl.col("p_click").n_unique(), pl.col("expected_watch_time_s").n_unique()
    )
    assert (per_key["p_click"] == 1).all() and (per_key["expected_watch_time_s"] == 1).all()
    # ... and the user's change of segment is seen: the same (user, item) under two segments
    # has two different click probabilities.
    both = joined.group_by("user_id", "item_id").agg(
        pl.col("segment").n_unique().alias("segments"), pl.col("p_click").n_unique()
    ).filter(pl.col("segments") > 1)  # fmt: skip
    assert both.height > 0 and (both["p_click"] > 1).all()


def test_segments_respond_to_different_categories(data):
    rates = (
        in_effect(data)
        .group_by("segment", "category")
        .agg(pl.col("click").mean(), pl.col("p_click").mean(), pl.len())
    )
    best = rates.sort("p_click", descending=True).group_by("segment").first()
    assert best["category"].n_unique() >= 6, "segments should like different categories"
    wide = rates.pivot("segment", index="category", values="click").fill_null(0.0)
    a, b = wide["s0"].to_numpy(), wide["s1"].to_numpy()
    assert (a - b).max() > 0.15 and (b - a).max() > 0.15


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_meta_bayes_numbers_match_the_oracle(data):
    meta = meta_of(data)
    imp = read(data, "impressions")
    oracle = read(data, "oracle")
    assert oracle.select("request_id", "user_id", "item_id").equals(
        imp.select("request_id", "user_id", "item_id")
    )
    test = (imp["ts"] >= datetime.fromisoformat(meta["test_start"])).to_numpy()
    assert datetime.fromisoformat(meta["test_start"]) == datetime(2026, 1, 6)
    assert test.sum() == meta["test_rows"] > 0
    p, click = oracle["p_click"].to_numpy()[test], imp["click"].to_numpy()[test]
    auc = meta["bayes_optimal_click_auc"]
    assert 0.6 < auc < 0.95
    assert auc == pytest.approx(brute_force_auc(p, click), abs=1e-12)
    watch = imp["watch_time_s"].to_numpy()
    expected = oracle["expected_watch_time_s"].to_numpy()
    rmse = np.sqrt(np.mean((expected[test] - watch[test]) ** 2))
    assert meta["bayes_optimal_watch_time_rmse_s"] == pytest.approx(rmse)
    assert meta["bayes_optimal_watch_time_rmse_s"] < meta["mean_predictor_watch_time_rmse_s"]
    # the conditional expectation beats every constant on the clicked rows it is meant for
    clicked = test & (imp["click"].to_numpy() == 1)
    given = oracle["expected_watch_time_s_given_click"].to_numpy()[clicked]
    on_clicks = watch[clicked]
    assert np.sqrt(np.mean((given - on_clicks) ** 2)) < on_clicks.std()
    assert (expected <= oracle["expected_watch_time_s_given_click"].to_numpy() + 3.0).all()
    assert datetime.fromisoformat(meta["last_event_ts"]) < datetime.fromisoformat(
        meta["scoring_time"]
    )


def test_private_auc_handles_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 500).astype(float)  # many ties
    labels = rng.random(500) < 0.3
    assert synth._auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))
    assert synth._auc(np.ones(4), np.array([0, 1, 0, 1])) == 0.5
    assert synth._auc(np.arange(3.0), np.zeros(3)) is None


def test_candidates_for_scoring(data):
    cand = read(data, "candidates")
    imp = read(data, "impressions")
    per_request = cand.group_by("request_id").agg(
        pl.col("user_id").n_unique().alias("users"), pl.col("item_id").n_unique().alias("items"),
        pl.len(),
    )  # fmt: skip
    assert per_request.height == 300 and (per_request["users"] == 1).all()
    assert (per_request["items"] == per_request["len"]).all()
    assert (per_request["len"] < 10).any() and (per_request["len"] == 40).any()
    assert cand["user_id"].n_unique() == 300
    assert cand["request_id"].min() > imp["request_id"].max()
    assert set(cand["item_id"]) <= set(read(data, "items")["item_id"])


def test_no_temp_dirs_and_rerun_replaces(tmp_path):
    out = tmp_path / "data"
    synthesize(out, users=50, items=20, days=3, seed=1)
    synthesize(out, users=60, items=20, days=3, seed=2)
    assert meta_of(out)["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.parquet" for n in FILES] +
                                                           ["meta.json"])  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [{"users": 0}, {"days": 2}, {"days": 5, "test_days": 4}, {"items": 5},
     {"requests_per_user_day": 0.0}, {"start": "first of January"}, {"seed": -1}],
)  # fmt: skip
def test_bad_arguments_leave_nothing(tmp_path, bad):
    with pytest.raises(ValueError):
        synthesize(tmp_path / "data", **{"users": 50, "items": 20, "days": 3} | bad)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "data"
    synthesize(out, users=50, items=20, days=3, seed=1)
    before = read(out, "impressions")
    calls = []

    def fail_on_third(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, path, *args, **kwargs)

    real = pl.DataFrame.write_parquet
    monkeypatch.setattr(pl.DataFrame, "write_parquet", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        synthesize(out, users=50, items=20, days=3, seed=2)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        synthesize(tmp_path / "fresh", users=50, items=20, days=3, seed=2)
    monkeypatch.undo()
    assert read(out, "impressions").equals(before) and meta_of(out)["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="choose a new directory"):
        synthesize(out, users=50, items=20, days=3)
    assert (out / "precious.txt").read_text() == "keep me"


def test_task_conflict_changes_watch_time_only(tmp_path: Path) -> None:
    base = synthesize(tmp_path / "a", users=300, items=80, days=4, seed=5)
    conf = synthesize(tmp_path / "b", users=300, items=80, days=4, seed=5, task_conflict=1.0)
    a = pl.read_parquet(tmp_path / "a" / "oracle.parquet")
    b = pl.read_parquet(tmp_path / "b" / "oracle.parquet")
    assert a["p_click"].equals(b["p_click"])  # click's process and the draws are unchanged
    assert not a["expected_watch_time_s"].equals(b["expected_watch_time_s"])
    assert "task_conflict" not in base["params"] and conf["params"]["task_conflict"] == 1.0
    with pytest.raises(ValueError, match="task_conflict"):
        synthesize(tmp_path / "c", users=300, items=80, days=4, task_conflict=2.0)
