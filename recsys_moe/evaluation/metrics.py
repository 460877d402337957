"""Offline metrics per task, on predictions in natural units (probability, seconds).

Binary tasks: AUC (torchmetrics), logloss, normalized entropy, calibration (predicted / observed).
Regression tasks: RMSE and MAE in label units, RMSE on the log1p scale, and the RMSE of predicting
a constant (the training mean), the baseline any model must beat.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys_moe.config import TaskConfig
from recsys_moe.model.objectives import output_name

EPS = 1e-7


def auc(pred: np.ndarray, label: np.ndarray) -> float:
    if label.min() == label.max():
        return float("nan")  # AUC is undefined with one class
    return float(binary_auroc(torch.as_tensor(pred), torch.as_tensor(label).long()))


def binary_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """AUC on the predictions as given (clipping would tie the extremes); logloss on predictions
    clipped to [EPS, 1 - EPS]; NE = logloss over the entropy of the scored rows' positive rate;
    calibration = mean prediction over that rate. With one class only, AUC, NE (entropy 0) and,
    without positives, calibration are undefined: NaN, not a huge finite number."""
    y = label.astype(np.float64)
    p = np.clip(pred.astype(np.float64), EPS, 1 - EPS)
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    rate = float(y.mean())
    one_class = rate in (0.0, 1.0)
    base = math.nan if one_class else -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return {
        "auc": auc(pred.astype(np.float64), y),
        "logloss": logloss,
        "ne": logloss / base,
        "calibration": float(p.mean() / rate) if rate > 0 else math.nan,
    }


def regression_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    train_mean: float | None = None,
    train_mean_log1p: float | None = None,
) -> dict[str, float]:
    y = label.astype(np.float64)
    p = pred.astype(np.float64)
    out = {
        "rmse": float(np.sqrt(np.mean((p - y) ** 2))),
        "mae": float(np.mean(np.abs(p - y))),
        "rmse_log": float(np.sqrt(np.mean((np.log1p(np.maximum(p, 0)) - np.log1p(y)) ** 2))),
    }
    if train_mean is not None:
        out["rmse_mean_predictor"] = float(np.sqrt(np.mean((train_mean - y) ** 2)))
    if train_mean_log1p is not None:
        out["rmse_log_mean_predictor"] = float(
            np.sqrt(np.mean((train_mean_log1p - np.log1p(y)) ** 2))
        )
    return out


def task_label_stats(task: TaskConfig, manifest: dict) -> dict | None:
    """The training split's constant predictors for ``task`` from a training set's manifest: the
    label's means, or for a masked task its means where the mask column is 1 (``None`` if the
    manifest does not have them)."""
    stats = manifest.get("labels", {}).get(task.label)
    if not stats or not task.mask:
        return stats
    return stats.get("when", {}).get(task.mask)


def task_metrics(
    task: TaskConfig,
    pred: np.ndarray,
    label: np.ndarray,
    *,
    label_stats: dict | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of one task, keyed ``<task>_<metric>`` (e.g. ``click_auc``).

    ``label_stats``: the training split's ``train_mean`` (and ``train_mean_log1p``) of the label,
    from the training set's manifest, for the constant-predictor baselines (``task_label_stats``).
    ``mask``: the task's mask column; a masked task is judged on the rows where it is 1, the rows
    its loss counts (watch time of clicks predicts the watch time *given* a click).
    """
    if task.mask:
        if mask is None:
            raise ValueError(f"task {task.name!r} is masked by {task.mask!r}: pass its values")
        keep = np.asarray(mask) == 1
        pred, label = np.asarray(pred)[keep], np.asarray(label)[keep]
        if not keep.any():
            return {}
    stats = label_stats or {}
    if task.kind == "binary":
        m = binary_metrics(pred, label)
    else:
        m = regression_metrics(
            pred, label,
            train_mean=stats.get("train_mean"), train_mean_log1p=stats.get("train_mean_log1p"),
        )  # fmt: skip
    return {f"{task.name}_{k}": v for k, v in m.items()}


def split_metrics(
    tasks: list[TaskConfig],
    preds: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    manifest: dict,
) -> dict[str, float]:
    """Every task's metrics of ``preds`` (by ``output_name``) against ``labels`` (label and mask
    columns by name), with the constant-predictor baselines of the training set's ``manifest``."""
    out: dict[str, float] = {}
    for t in tasks:
        out |= task_metrics(
            t, preds[output_name(t)], np.asarray(labels[t.label], dtype=np.float64),
            label_stats=task_label_stats(t, manifest),
            mask=np.asarray(labels[t.mask]) if t.mask else None,
        )  # fmt: skip
    return out
