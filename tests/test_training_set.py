"""build_training_set on a tiny hand-made store (pipelines/training_set.py)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from feature_store import DataError, FeatureSet, OfflineStore
from pipelines.mappings import Mappings
from pipelines.training_set import build_training_set, load_manifest, load_split

FEATURES = Path(__file__).resolve().parents[1] / "configs" / "features" / "synth.toml"
LABELS = {"click": "binary", "watch_time_s": "regression"}
T0 = datetime(2024, 3, 1)
N_DAYS = 10


def write_store(root: Path, **overrides: pl.DataFrame) -> OfflineStore:
    """Users 1..3 (user 1 changes segment on day 5), items 10..11, 4 impressions a day."""
    day = timedelta(days=1)
    tables = {
        "users": pl.DataFrame(
            {
                "user_id": [1, 2, 3, 1],
                "valid_from": [T0 - day, T0 - day, T0 + 3 * day, T0 + 5 * day],
                "segment": ["old", "s2", "s3", "new"],
                "age_bucket": ["18-24", "25-34", "35-44", "18-24"],
                "country": ["us", "fr", "de", "us"],
                "interests": [["a", "b"], ["b"], [], ["c"]],
            },
            schema_overrides={"valid_from": pl.Datetime("us")},
        ),
        "items": pl.DataFrame(
            {
                "item_id": [10, 11],
                "valid_from": [T0 - day, T0 - day],
                "category": ["news", "music"],
                "author": [7, 8],
                "tags": [["t1"], ["t2", "t3"]],
                "duration_s": [30.0, 240.0],
            },
            schema_overrides={"valid_from": pl.Datetime("us")},
        ),
    }
    rows = []
    for d in range(N_DAYS):
        for j, (user, item) in enumerate([(1, 10), (2, 11), (3, 10), (1, 11)]):
            ts = T0 + d * day + timedelta(hours=6 * j)
            rows.append((len(rows), user, item, ts, j, (d + j) % 2, float(d * j)))
    tables["impressions"] = pl.DataFrame(
        rows,
        schema={
            "request_id": pl.Int64,
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "ts": pl.Datetime("us"),
            "position": pl.Int32,
            "click": pl.Int8,
            "watch_time_s": pl.Float64,
        },
        orient="row",
    )
    tables.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.write_parquet(root / f"{name}.parquet")
    return OfflineStore(root)


def build(store: OfflineStore, out: Path, *, valid_days: int = 2, test_days: int = 3) -> dict:
    return build_training_set(
        store=store,
        out=out,
        features=FeatureSet.load(FEATURES),
        labels=LABELS,
        valid_days=valid_days,
        test_days=test_days,
    )


def test_splits_features_and_manifest(tmp_path):
    store = write_store(tmp_path / "store")
    features = FeatureSet.load(FEATURES)
    manifest = build(store, tmp_path / "ds")
    assert manifest == load_manifest(tmp_path / "ds")
    splits = {s: load_split(tmp_path / "ds", s).collect() for s in ("train", "valid", "test")}

    # disjoint, complete, ordered in time; 5 / 2 / 3 days of 4 impressions
    assert {s: len(f) for s, f in splits.items()} == {"train": 20, "valid": 8, "test": 12}
    assert manifest["rows"] == {"train": 20, "valid": 8, "test": 12}
    ids = [set(f["request_id"]) for f in splits.values()]
    assert set.union(*ids) == set(range(4 * N_DAYS)) and sum(map(len, ids)) == 4 * N_DAYS
    assert splits["train"]["ts"].max() < splits["valid"]["ts"].min()
    assert splits["valid"]["ts"].max() < splits["test"]["ts"].min()
    assert manifest["splits"] == {
        "train": {"start": "2024-03-01", "end": "2024-03-06"},
        "valid": {"start": "2024-03-06", "end": "2024-03-08"},
        "test": {"start": "2024-03-08", "end": "2024-03-11"},
    }

    # columns: keys, event time, feature columns, labels
    expected = ["request_id", "user_id", "item_id", "ts", "segment", "age_bucket", "country"]
    expected += ["interests", "category", "author", "tags", "duration_s", "click", "watch_time_s"]
    assert splits["train"].columns == expected

    # as-of values: user 1 is "old" before day 5 and "new" from then on; user 3 exists from day 3
    everything = pl.concat(splits.values())
    for row in everything.iter_rows(named=True):
        day = (row["ts"] - T0).days
        if row["user_id"] == 1:
            assert row["segment"] == ("old" if day < 5 else "new")
            assert row["interests"] == (["a", "b"] if day < 5 else ["c"])
        if row["user_id"] == 3:
            assert row["segment"] == (None if day < 3 else "s3")
        assert row["category"] == {10: "news", 11: "music"}[row["item_id"]]

    train = splits["train"]
    assert manifest["feature_set_fingerprint"] == features.fingerprint()
    assert manifest["labels"]["click"] == {"kind": "binary", "train_mean": train["click"].mean()}
    wt = manifest["labels"]["watch_time_s"]
    assert wt["train_mean"] == pytest.approx(train["watch_time_s"].mean())
    assert wt["train_mean_log1p"] == pytest.approx(train["watch_time_s"].log1p().mean())
    clicked = train.filter(pl.col("click") == 1)["watch_time_s"]  # a task masked by click
    assert 0 < clicked.len() < train.height
    assert wt["when"]["click"]["train_mean"] == pytest.approx(clicked.mean())
    assert wt["when"]["click"]["train_mean_log1p"] == pytest.approx(clicked.log1p().mean())
    assert set(manifest["sources"]) == {"impressions", "users", "items"}
    assert manifest["created_at"]

    # mappings fitted on train only: "s3" (user 3 from day 3) and "new" (day 5+) ...
    m = Mappings.load(tmp_path / "ds" / "mappings", features)
    seg = dict(m.vocabs["segment"].select("value", "count").iter_rows())
    assert seg == {"old": 10, "s2": 5, "s3": 2}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_label_column(tmp_path):
    store = write_store(tmp_path / "store")
    events = pl.read_parquet(store.path("impressions")).drop("click")
    events.write_parquet(store.path("impressions"))
    with pytest.raises(DataError) as err:
        build(store, tmp_path / "ds")
    assert "'click'" in str(err.value) and str(store.path("impressions")) in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]  # no output, no temp dir


def test_failed_rebuild_keeps_old_dataset(tmp_path):
    store = write_store(tmp_path / "store")
    build(store, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    events = pl.read_parquet(store.path("impressions"))
    events.with_columns(click=pl.lit(2, pl.Int8)).write_parquet(store.path("impressions"))
    with pytest.raises(DataError):
        build(store, tmp_path / "ds")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "store"]


def test_rebuild_replaces_dataset(tmp_path):
    store = write_store(tmp_path / "store")
    first = build(store, tmp_path / "ds")
    second = build(store, tmp_path / "ds")
    assert second["created_at"] >= first["created_at"]
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "store"]


def test_float_user_id_rejected(tmp_path):
    store = write_store(tmp_path / "store")
    events = pl.read_parquet(store.path("impressions"))
    events.with_columns(pl.col("user_id").cast(pl.Float64)).write_parquet(store.path("impressions"))
    with pytest.raises(DataError, match=r"'user_id'.*Float64.*Int64"):
        build(store, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_bad_binary_label_rejected(tmp_path):
    store = write_store(tmp_path / "store")
    events = pl.read_parquet(store.path("impressions"))
    click = pl.when(pl.col("request_id") < 3).then(2).otherwise(pl.col("click")).cast(pl.Int8)
    events.with_columns(click=click).write_parquet(store.path("impressions"))
    with pytest.raises(DataError, match=r"'click' must be 0 or 1, but 3 of 40 rows.*e\.g\. 2"):
        build(store, tmp_path / "ds")


def test_negative_watch_time_rejected(tmp_path):
    store = write_store(tmp_path / "store")
    events = pl.read_parquet(store.path("impressions"))
    events.with_columns(watch_time_s=pl.lit(-1.0)).write_parquet(store.path("impressions"))
    with pytest.raises(DataError, match="watch_time_s.*finite and >= 0.*40 of 40"):
        build(store, tmp_path / "ds")


def test_too_few_days(tmp_path):
    store = write_store(tmp_path / "store")
    with pytest.raises(DataError, match="10 distinct days"):
        build(store, tmp_path / "ds", valid_days=5, test_days=5)


def test_missing_table(tmp_path):
    with pytest.raises(ValueError, match="recsys-moe data synth"):
        build(OfflineStore(tmp_path / "nowhere"), tmp_path / "ds")


def test_partitioned_events_table(tmp_path):
    store = write_store(tmp_path / "store")
    events = pl.read_parquet(store.path("impressions"))
    store.path("impressions").unlink()
    for (day,), part in events.group_by(pl.col("ts").dt.date().alias("day")):
        folder = tmp_path / "store" / "impressions" / f"day={day}"
        folder.mkdir(parents=True)
        part.write_parquet(folder / "part-0.parquet")
    assert store.path("impressions").is_dir()
    manifest = build(store, tmp_path / "ds")
    assert manifest["rows"] == {"train": 20, "valid": 8, "test": 12}


def test_empty_split_and_single_file_layout(tmp_path):
    store = write_store(tmp_path / "store")
    manifest = build(store, tmp_path / "ds", valid_days=0, test_days=3)
    assert manifest["rows"] == {"train": 28, "valid": 0, "test": 12}
    valid = load_split(tmp_path / "ds", "valid").collect()
    assert (
        valid.height == 0 and valid.columns == load_split(tmp_path / "ds", "test").collect().columns
    )

    # a split stored as a directory of Parquet files reads too, files in path order
    test = load_split(tmp_path / "ds", "test").collect()
    (tmp_path / "ds" / "test.parquet").unlink()
    (tmp_path / "ds" / "test").mkdir()
    test.head(5).write_parquet(tmp_path / "ds" / "test" / "part-0.parquet")
    test.slice(5).write_parquet(tmp_path / "ds" / "test" / "part-1.parquet")
    assert load_split(tmp_path / "ds", "test").collect().equals(test)
