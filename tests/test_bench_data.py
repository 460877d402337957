"""The GPU benchmark's training set (pipelines/bench.py): the project's own layout, labels that
follow the stated model, and a split the training loaders read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from feature_store import FeatureSet
from pipelines.bench import write_bench_dataset
from pipelines.training_set import load_manifest, load_split, mapped_files
from recsys_moe.config import label_columns, load_config
from recsys_moe.training.loader import MemoryLoader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureSet]:
    """The bench feature set with small tables (the shapes of the real one otherwise)."""
    text = (ROOT / "configs" / "features" / "bench.toml").read_text()
    text = text.replace("num_embeddings = 1000000", "num_embeddings = 1000")
    features = FeatureSet.from_toml(text.replace("embedding_dim = 64", "embedding_dim = 8"))
    out = tmp_path_factory.mktemp("bench") / "dataset"
    write_bench_dataset(out, features, rows=6000, valid_rows=1000, test_rows=500, chunk=2500)
    return out, features


def test_layout_manifest_and_mapped_splits(small) -> None:
    out, features = small
    manifest = load_manifest(out)
    assert manifest["feature_set_fingerprint"] == features.fingerprint()
    assert manifest["rows"] == {"train": 6000, "valid": 1000, "test": 500}
    assert manifest["mapped_columns"] == ["click", "watch_time_s"]
    mapped = pl.read_parquet(mapped_files(out, "train"))
    assert mapped.height == 6000
    ids = mapped["c01"].explode()
    assert ids.min() >= 1 and ids.max() < 1000  # hashed into the table, 0 kept for unknown
    assert mapped["c01"].list.len().is_between(1, 4).all()
    assert abs(mapped["d01"].mean()) < 0.1 and abs(mapped["d01"].std() - 1) < 0.1  # z-scores


def test_labels_follow_the_stated_model(small) -> None:
    out, _ = small
    rows = load_split(out, "train").collect()
    click = rows["click"].to_numpy()
    assert 0.2 < click.mean() < 0.6
    d01 = rows["d01"].to_numpy()
    assert click[d01 > 1].mean() > click[d01 < -1].mean() + 0.2  # +0.6 d01 in the logit
    watch = rows["watch_time_s"].to_numpy()
    assert (watch[click == 0] == 0).all() and (watch[click == 1] > 0).all()
    assert np.isfinite(watch).all()


def test_the_bench_config_trains_on_it(small) -> None:
    out, features = small
    cfg = load_config(ROOT / "configs" / "bench.toml", [f"data.dataset={out}"])
    assert cfg.train.loader == "device" and cfg.model.num_experts == 8
    loader = MemoryLoader.from_split(
        out, "train", features=features, labels=label_columns(cfg.tasks), batch_size=512
    )
    batch = next(iter(loader))
    assert batch.dense.shape == (512, 13) and len(batch.sparse.keys()) == 26
