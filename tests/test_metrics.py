"""Offline metrics (recsys_moe/metrics.py): a masked task is judged on the rows its loss counts."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_moe.config import TaskConfig
from recsys_moe.evaluation.metrics import task_label_stats, task_metrics

WATCH = TaskConfig(name="watch_time", kind="regression", label="watch_time_s", transform="log1p")
WATCH_GIVEN_CLICK = TaskConfig(
    name="watch_time", kind="regression", label="watch_time_s", transform="log1p", mask="click"
)
MANIFEST = {
    "labels": {
        "click": {"kind": "binary", "train_mean": 0.2},
        "watch_time_s": {
            "kind": "regression", "train_mean": 10.0, "train_mean_log1p": 1.0,
            "when": {"click": {"train_mean": 40.0, "train_mean_log1p": 3.0}},
        },
    }
}  # fmt: skip


def test_masked_task_is_scored_on_masked_rows_against_its_conditional_mean() -> None:
    rng = np.random.default_rng(0)
    click = rng.integers(0, 2, 200)
    label = np.where(click == 1, rng.uniform(20, 60, 200), rng.uniform(0, 3, 200))
    pred = np.where(click == 1, 40.0, 1.0)
    masked = task_metrics(
        WATCH_GIVEN_CLICK, pred, label,
        label_stats=task_label_stats(WATCH_GIVEN_CLICK, MANIFEST), mask=click,
    )  # fmt: skip
    on_clicks = label[click == 1]
    assert masked["watch_time_rmse"] == pytest.approx(np.sqrt(np.mean((40.0 - on_clicks) ** 2)))
    assert masked["watch_time_rmse_mean_predictor"] == pytest.approx(masked["watch_time_rmse"])
    everything = task_metrics(WATCH, pred, label, label_stats=task_label_stats(WATCH, MANIFEST))
    assert everything["watch_time_rmse"] < masked["watch_time_rmse"]  # non-clicks are easy
    assert everything["watch_time_rmse_mean_predictor"] != masked["watch_time_rmse_mean_predictor"]


def test_masked_task_needs_its_mask_and_stats_fall_back_to_none() -> None:
    with pytest.raises(ValueError, match="masked by 'click'"):
        task_metrics(WATCH_GIVEN_CLICK, np.ones(3), np.ones(3))
    other = TaskConfig(name="w", kind="regression", label="watch_time_s", mask="liked")
    assert task_label_stats(other, MANIFEST) is None  # no baseline rather than the wrong one
    assert task_metrics(WATCH_GIVEN_CLICK, np.ones(3), np.ones(3), mask=np.zeros(3)) == {}
