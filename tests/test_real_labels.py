"""Regression labels of any sign and scale: checked finite (not >= 0) for a plain mse task,
fitted standardised (the head outputs std·h + mean), reported in the label's units."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
import torch
from fixtures import small_store

from feature_store import DataError, FeatureSet
from pipelines.training_set import build_training_set, load_manifest
from recsys_moe.config import TaskConfig
from recsys_moe.dataset import label_kinds
from recsys_moe.model.heads import TaskHead
from recsys_moe.training.losses import task_loss
from recsys_moe.training.module import init_head_biases, label_scales

ROOT = Path(__file__).resolve().parents[1]
DELTA = TaskConfig(name="delta", kind="regression", label="delta", objective="mse")
WATCH = TaskConfig(name="watch", kind="regression", label="watch_time_s", transform="log1p")


def test_label_kinds_follow_the_objective() -> None:
    click = TaskConfig(name="click", kind="binary", label="click")
    assert label_kinds([click, DELTA, WATCH]) == {
        "click": "binary", "delta": "real", "watch_time_s": "regression",
    }  # fmt: skip
    # one column read by a plain mse task and a log1p task: the stricter check (>= 0) holds
    plain = TaskConfig(name="w2", kind="regression", label="watch_time_s", objective="mse")
    assert label_kinds([plain, WATCH])["watch_time_s"] == "regression"
    assert label_kinds([WATCH, plain])["watch_time_s"] == "regression"


def test_head_output_affine_and_old_bundles() -> None:
    head = TaskHead(4, [3])
    x = torch.randn(5, 4)
    base = head(x)
    head.set_output_affine(1000.0, -5.0)
    torch.testing.assert_close(head(x), base * 1000.0 - 5.0)
    # a state dict saved before the affine existed loads as the identity
    old = {k: v for k, v in TaskHead(4, [3]).state_dict().items() if not k.startswith("out_")}
    head.load_state_dict(old)
    assert head.out_scale.item() == 1.0 and head.out_shift.item() == 0.0


def test_mse_loss_is_standardised_by_the_training_std() -> None:
    stats = {"delta": {"train_mean": -40.0, "train_std": 200.0}}
    assert label_scales([DELTA, WATCH], stats) == {"delta": 200.0}
    assert label_scales([DELTA], {"delta": {"train_mean": 3.0, "train_std": 0.0}}) == {"delta": 1.0}
    y = torch.tensor([-240.0, 160.0, math.nan])
    raw = torch.tensor([-40.0, -40.0, 0.0])  # the mean predictor
    loss = task_loss(DELTA, raw, {"delta": y}, scale=200.0)
    assert loss.item() == pytest.approx(1.0)  # its standardised MSE: 1 (the NaN row not counted)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = torch.nn.ModuleDict({"delta": TaskHead(4, [3])})

    model = Model()
    init_head_biases(model, [DELTA], stats)
    head = model.heads["delta"]
    assert (head.out_scale.item(), head.out_shift.item()) == (200.0, -40.0)
    assert head.mlp[-1].bias.item() == 0.0


def test_signed_labels_build_and_are_checked_finite(tmp_path: Path) -> None:
    features = FeatureSet.load(ROOT / "configs" / "features" / "synth.toml")
    n = 40
    values = [(-1) ** i * 500.0 * i for i in range(n)]
    kinds = {"click": "binary", "delta": "real"}
    store = small_store(tmp_path / "store", values)
    build_training_set(store=store, out=tmp_path / "ds", features=features, labels=kinds,
                       valid_days=2, test_days=3)  # fmt: skip
    stats = load_manifest(tmp_path / "ds")["labels"]["delta"]
    assert stats["kind"] == "real" and "train_mean_log1p" not in stats
    train = pl.read_parquet(tmp_path / "ds" / "train.parquet")["delta"]
    assert stats["train_std"] == pytest.approx(train.std())
    assert stats["when"]["click"]["train_std"] == pytest.approx(
        pl.read_parquet(tmp_path / "ds" / "train.parquet")
        .filter(pl.col("click") == 1)["delta"]
        .std()
    )
    bad = small_store(tmp_path / "bad", [*values[:-1], math.inf])
    with pytest.raises(DataError, match=r"column 'delta' .*finite.*1 of 40 rows"):
        build_training_set(store=bad, out=tmp_path / "ds2", features=features, labels=kinds,
                           valid_days=2, test_days=3)  # fmt: skip
    assert not (tmp_path / "ds2").exists()
