"""Metrics over pairs of rows, as stateful torchmetrics ``Metric``s that keep their rows (``cat``
states, gathered over ranks in ``compute``): GAUC (pairs within a group: a user, a request) and
XAUC (pairs with different labels of a regression task). ``recsys_moe.evaluation.metrics``
collects them with the other metrics of a task.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

F64 = torch.float64


def cat_state(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state's rows as one tensor (a list before a sync, a tensor after), or None."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else None


def group_auc(
    pred: np.ndarray, label: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each group's AUC (Mann-Whitney with average ranks for ties, NaN with one class): group ids
    (sorted), AUCs and rows, vectorised (one lexsort)."""
    n = len(pred)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    order = np.lexsort((pred, group))
    g, p, y = group[order], pred[order], label[order].astype(np.float64)
    ids, start, counts = np.unique(g, return_index=True, return_counts=True)
    new = np.ones(n, dtype=bool)
    new[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])  # a new block of tied (group, prediction)
    block = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    size = np.diff(np.append(first, n))
    gi = np.repeat(np.arange(len(ids)), counts)
    rank = (first + (size - 1) / 2.0)[block] - start[gi] + 1  # 1-based, ties averaged
    pos = np.bincount(gi, weights=y, minlength=len(ids))
    neg = counts - pos
    rank_sum = np.bincount(gi, weights=y * rank, minlength=len(ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        aucs = (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
    return ids, aucs, counts.astype(np.float64)


def gauc_of(aucs: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Impression-weighted mean of the groups' AUCs; one-class groups skipped and counted."""
    ok = np.isfinite(aucs)
    w = rows[ok].sum()
    return {
        "gauc": float((aucs[ok] * rows[ok]).sum() / w) if w > 0 else math.nan,
        "groups": float(ok.sum()),
        "groups_skipped": float((~ok).sum()),
        "rows_skipped": float(rows[~ok].sum()),
    }


class GroupedAUC(Metric):
    """GAUC: the AUC within each group (a user, a request), weighted by the group's rows; groups
    whose rows have one class only have no AUC and are skipped, and counted (``groups_skipped``,
    ``rows_skipped``). Rows are kept (``cat`` states: gathered over ranks) because a group's rows
    may arrive in several batches."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("preds", "labels", "groups"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, pred: Tensor, label: Tensor, group: Tensor) -> None:
        self.preds.append(pred.to(F64))
        self.labels.append(label.to(F64))
        self.groups.append(group.long())

    def per_group(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if cat_state(self.preds) is None:
            return group_auc(np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
        cat = [cat_state(s).numpy() for s in (self.preds, self.labels, self.groups)]
        return group_auc(*cat)

    def compute(self) -> dict[str, float]:
        _, aucs, rows = self.per_group()
        return gauc_of(aucs, rows)


def xauc(pred: np.ndarray, label: np.ndarray) -> float:
    """The share of pairs with different labels that ``pred`` orders as ``label`` (tied
    predictions 1/2): ``(1 + D) / 2`` with Somers' D of the prediction given the label, from
    Kendall's tau-b (scipy, O(n log n)):
    ``P - Q = tau_b * sqrt((n0 - ties_pred) * (n0 - ties_label))``. NaN when all labels are
    equal."""
    n = len(label)
    n0 = n * (n - 1) / 2

    def ties(x: np.ndarray) -> float:
        c = np.unique(x, return_counts=True)[1].astype(np.float64)
        return float((c * (c - 1) / 2).sum())

    pairs = n0 - ties(label)  # pairs with different labels
    if pairs <= 0:
        return math.nan
    free = n0 - ties(pred)
    if free <= 0:
        return 0.5  # one prediction for every row: every pair tied
    tau = float(kendalltau(pred, label, variant="b").statistic)
    return 0.5 + 0.5 * tau * math.sqrt(free * pairs) / pairs


class XAUC(Metric):
    """XAUC of a regression task (``xauc``), over all rows (``cat`` states, gathered)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, pred: Tensor, label: Tensor) -> None:
        self.preds.append(pred.to(F64))
        self.labels.append(label.to(F64))

    def compute(self) -> float:
        preds, labels = cat_state(self.preds), cat_state(self.labels)
        return math.nan if preds is None else xauc(preds.numpy(), labels.numpy())
