"""Offline metrics per task, on predictions in natural units (probability, seconds).

Every metric is a stateful torchmetrics ``Metric``: ``update`` once per batch, ``compute`` at the
end; under ``torch.distributed`` ``compute`` all-reduces the sums (``dist_reduce_fx="sum"``) and
gathers the row states (``"cat"``) of every rank first, so ranks that each evaluated a shard of
the rows report the metrics of all of them.

Binary tasks: AUC (torchmetrics ``BinaryAUROC``, exact: ties count 1/2), logloss, normalized
entropy and calibration (``LogLoss``: sums of ``binary_cross_entropy``), a reliability curve
(``ReliabilityCurve``) and GAUC per group column (``pairwise.GroupedAUC``: each group's AUC
weighted by its rows; groups with one class are skipped and counted).
Regression tasks: RMSE and MAE in label units and on the log1p (training) scale (torchmetrics
``MeanSquaredError`` / ``MeanAbsoluteError``), the RMSE of predicting a constant (the training
mean), the baseline any model must beat, and XAUC (``pairwise.XAUC``: the share of row pairs with
different labels that the predictions order the same way, ties 1/2).
A masked task is judged on its masked rows only (watch time given a click).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from recsys_moe.config import TaskConfig
from recsys_moe.evaluation.pairwise import XAUC, GroupedAUC, cat_state
from recsys_moe.model.objectives import output_name

EPS = 1e-7
F64 = torch.float64


def as_tensor(x: np.ndarray | Tensor, dtype: torch.dtype = F64) -> Tensor:
    return x.to(dtype) if isinstance(x, Tensor) else torch.tensor(np.asarray(x), dtype=dtype)


def auc(pred: np.ndarray, label: np.ndarray) -> float:
    if label.min() == label.max():
        return float("nan")  # AUC is undefined with one class
    return float(binary_auroc(torch.as_tensor(pred), torch.as_tensor(label).long()))


class LogLoss(Metric):
    """Logloss (predictions clipped to [EPS, 1 - EPS]), normalized entropy (logloss over the
    entropy of the rows' positive rate) and calibration (mean prediction over that rate) from four
    sums. With one class only NE, and without positives calibration, are NaN."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("loss_sum", "pred_sum", "label_sum", "count"):
            self.add_state(name, torch.zeros((), dtype=F64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, label: Tensor) -> None:
        p, y = pred.to(F64).clamp(EPS, 1 - EPS), label.to(F64)
        self.loss_sum += F.binary_cross_entropy(p, y, reduction="sum")
        self.pred_sum += p.sum()
        self.label_sum += y.sum()
        self.count += y.numel()

    def compute(self) -> dict[str, float]:
        n = float(self.count)
        if n == 0:
            return {"logloss": math.nan, "ne": math.nan, "calibration": math.nan}
        logloss, rate = float(self.loss_sum) / n, float(self.label_sum) / n
        entropy = math.nan  # one class only: entropy 0, NE undefined
        if 0.0 < rate < 1.0:
            entropy = -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))
        return {
            "logloss": logloss,
            "ne": logloss / entropy,
            "calibration": float(self.pred_sum) / n / rate if rate > 0 else math.nan,
        }


class ReliabilityCurve(Metric):
    """Per bin of predicted probability (``bins`` equal widths over [0, 1]): rows, mean
    prediction and observed positive rate (a calibrated model lies on the diagonal)."""

    full_state_update = False

    def __init__(self, bins: int = 20, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.bins = bins
        for name in ("pred_sum", "label_sum", "count"):
            self.add_state(name, torch.zeros(bins, dtype=F64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, label: Tensor) -> None:
        p = pred.to(F64).clamp(0.0, 1.0)
        b = (p * self.bins).long().clamp_max(self.bins - 1)
        self.pred_sum.index_add_(0, b, p)
        self.label_sum.index_add_(0, b, label.to(F64))
        self.count.index_add_(0, b, torch.ones_like(p))

    def compute(self) -> dict[str, np.ndarray]:
        n = self.count.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "rows": n,
                "mean_pred": self.pred_sum.numpy() / n,
                "observed": self.label_sum.numpy() / n,
                "lower": np.arange(self.bins) / self.bins,
            }


class TaskMetrics:
    """Every metric of one task, updated batch by batch (``update``), then ``compute``: a flat
    dict ``<task>_<metric>``. ``group_by`` names the GAUC groups a binary task reports
    (``update``'s ``groups``: one id array per name); ``label_stats``: the training split's
    ``train_mean`` and ``train_mean_log1p`` of the label (``task_label_stats``) for the
    constant-predictor baselines of a regression task. ``sync``: ``compute`` all-reduces (sums) and
    gathers (rows) the states of every rank of the process group first (every rank must call it);
    off by default, for one process evaluating all rows. ``auc_from_ranks``: AUC as the
    Mann-Whitney statistic of average ranks (``GroupedAUC`` with one group: one sort) instead of
    torchmetrics' ROC curve: the same number up to BinaryAUROC's float32 result, ~10x faster
    (bootstrap replicates)."""

    def __init__(
        self,
        task: TaskConfig,
        *,
        label_stats: dict | None = None,
        group_by: tuple[str, ...] = (),
        reliability_bins: int = 20,
        sync: bool = False,
        auc_from_ranks: bool = False,
    ) -> None:
        self.task = task
        self.stats = label_stats or {}
        kw = {"sync_on_compute": sync}
        self.metrics: dict[str, Metric] = {}
        if task.kind == "binary":
            self.metrics["auc"] = GroupedAUC(**kw) if auc_from_ranks else BinaryAUROC(**kw)
            self.metrics["logloss"] = LogLoss(**kw)
            self.metrics["reliability"] = ReliabilityCurve(reliability_bins, **kw)
            for g in group_by:
                self.metrics[f"gauc_{g}"] = GroupedAUC(**kw)
        else:
            # log-scale metrics where the label is >= 0 (a time): not for a plain mse task,
            # whose label may have any sign
            self.log_scale = task.objective != "mse"
            logs = ("rmse_log", "mae_log") if self.log_scale else ()
            for name in ("rmse", *logs[:1]):
                self.metrics[name] = MeanSquaredError(squared=False, **kw)
            for name in ("mae", *logs[1:]):
                self.metrics[name] = MeanAbsoluteError(**kw)
            if "train_mean" in self.stats:
                self.metrics["rmse_mean_predictor"] = MeanSquaredError(squared=False, **kw)
            if "train_mean_log1p" in self.stats and self.log_scale:
                self.metrics["rmse_log_mean_predictor"] = MeanSquaredError(squared=False, **kw)
            self.metrics["xauc"] = XAUC(**kw)
        for m in self.metrics.values():
            m.set_dtype(F64)
        self.rows = 0

    def update(
        self,
        pred: np.ndarray | Tensor,
        label: np.ndarray | Tensor,
        *,
        mask: np.ndarray | Tensor | None = None,
        groups: Mapping[str, np.ndarray | Tensor] | None = None,
    ) -> None:
        t = self.task
        p, y = as_tensor(pred), as_tensor(label)
        groups = {k: as_tensor(v, torch.int64) for k, v in (groups or {}).items()}
        if t.mask:
            if mask is None:
                raise ValueError(f"task {t.name!r} is masked by {t.mask!r}: pass its values")
            keep = as_tensor(mask) == 1
            p, y = p[keep], y[keep]
            groups = {k: v[keep] for k, v in groups.items()}
        if p.numel() == 0:
            return
        self.rows += p.numel()
        m = self.metrics
        if t.kind == "binary":
            if isinstance(m["auc"], GroupedAUC):
                m["auc"].update(p, y, torch.zeros_like(y, dtype=torch.int64))
            else:
                m["auc"].update(p, y.long())
            m["logloss"].update(p, y)
            m["reliability"].update(p, y)
            for k, metric in m.items():
                if k.startswith("gauc_"):
                    g = k.removeprefix("gauc_")
                    if g not in groups:
                        raise ValueError(f"task {t.name!r}: GAUC by {g!r} needs its ids")
                    metric.update(p, y, groups[g])
            return
        m["rmse"].update(p, y)
        m["mae"].update(p, y)
        if "rmse_mean_predictor" in m:
            m["rmse_mean_predictor"].update(torch.full_like(y, self.stats["train_mean"]), y)
        m["xauc"].update(p, y)
        if not self.log_scale:
            return
        lp, ly = torch.log1p(p.clamp_min(0.0)), torch.log1p(y)
        m["rmse_log"].update(lp, ly)
        m["mae_log"].update(lp, ly)
        if "rmse_log_mean_predictor" in m:
            const = torch.full_like(y, self.stats["train_mean_log1p"])
            m["rmse_log_mean_predictor"].update(const, ly)

    def reset(self) -> None:
        """Back to no rows, keeping the metric objects (cheaper than new ones per replicate)."""
        for m in self.metrics.values():
            m.reset()
        self.rows = 0

    def compute(self) -> dict[str, float]:
        """The task's metrics, keyed ``<task>_<metric>`` (``{}`` when no row counted)."""
        if self.rows == 0:
            return {}
        out: dict[str, float] = {}
        for k, metric in self.metrics.items():
            if k == "reliability":
                continue
            if k == "auc" and isinstance(metric, GroupedAUC):
                out[k] = metric.compute()["gauc"]  # NaN with one class
                continue
            if k == "auc":
                labels = cat_state(metric.target)
                one_class = bool(labels.min() == labels.max())
                out[k] = math.nan if one_class else float(metric.compute())
                continue
            value = metric.compute()
            if k == "logloss":
                out |= value  # logloss, ne, calibration
            elif k.startswith("gauc_"):  # gauc_<group>, gauc_<group>_groups, ..._rows_skipped
                out |= {k if j == "gauc" else f"{k}_{j}": v for j, v in value.items()}
            else:
                out[k] = float(value)
        return {f"{self.task.name}_{k}": v for k, v in out.items()}

    def reliability(self) -> dict[str, np.ndarray] | None:
        m = self.metrics.get("reliability")
        return m.compute() if m is not None and self.rows else None


def binary_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """AUC on the predictions as given (clipping would tie the extremes); logloss on predictions
    clipped to [EPS, 1 - EPS]; NE = logloss over the entropy of the scored rows' positive rate;
    calibration = mean prediction over that rate. With one class only, AUC, NE (entropy 0) and,
    without positives, calibration are undefined: NaN, not a huge finite number."""
    m = TaskMetrics(TaskConfig(name="x", kind="binary", label="y"))
    m.update(pred, label)
    return {k.removeprefix("x_"): v for k, v in m.compute().items()}


def regression_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    *,
    train_mean: float | None = None,
    train_mean_log1p: float | None = None,
) -> dict[str, float]:
    stats = {"train_mean": train_mean, "train_mean_log1p": train_mean_log1p}
    task = TaskConfig(name="x", kind="regression", label="y", transform="log1p")  # a time: logs
    m = TaskMetrics(task, label_stats={k: v for k, v in stats.items() if v is not None})
    m.update(pred, label)
    return {k.removeprefix("x_"): v for k, v in m.compute().items()}


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
    groups: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Metrics of one task, keyed ``<task>_<metric>`` (e.g. ``click_auc``), in one update.

    ``label_stats``: the training split's ``train_mean`` (and ``train_mean_log1p``) of the label,
    from the training set's manifest, for the constant-predictor baselines (``task_label_stats``).
    ``mask``: the task's mask column; a masked task is judged on the rows where it is 1, the rows
    its loss counts (watch time of clicks predicts the watch time *given* a click).
    ``groups``: GAUC group ids by name (binary tasks), e.g. ``{"user_id": ...}``.
    """
    stats = {k: v for k, v in (label_stats or {}).items() if k.startswith("train_mean")}
    m = TaskMetrics(task, label_stats=stats, group_by=tuple(groups or ()))
    m.update(pred, label, mask=mask if task.mask else None, groups=groups)
    return m.compute()


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
