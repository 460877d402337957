"""What a task's head output means: its objective, the target it fits and its natural units.

Notation: B batch. A head emits one raw value per row (``[B]``); the task's objective (chosen and
checked once, when the config is loaded: ``config.TaskConfig``) says how it is trained
(``recsys_moe.training.losses``) and how it maps back to natural units here:

    bce                probability = sigmoid(raw)
    mse_log1p          seconds     = expm1(raw), clamped at 0 (the head fits log1p(label))
    mse                label units = raw
    weighted_logistic  E[label]    ≈ exp(raw) (odds; Covington et al. 2016)
    duration_quantile  share       = sigmoid(raw), or seconds given the durations

Inference (evaluation, the registry's pyfunc, scoring) needs only this module, not the losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # config imports the feature store (and through it Polars); types only here
    from recsys_moe.config import TaskConfig


def output_name(task: TaskConfig) -> str:
    """Prediction column of a task: ``p_<task>`` for binary tasks, the label's name otherwise."""
    return f"p_{task.name}" if task.kind == "binary" else task.label


def target(task: TaskConfig, label: Tensor) -> Tensor:
    """The label on the scale the MSE objectives fit (``[B]`` float); the label otherwise."""
    label = label.float()
    return torch.log1p(label) if task.objective == "mse_log1p" else label


def to_natural(task: TaskConfig, raw: Tensor, *, duration: Tensor | None = None) -> Tensor:
    """Raw head output → prediction in natural units (probability; seconds).

    duration_quantile gives the watched share unless ``duration`` ([B], the ``quantile_of``
    column) is given, then seconds.
    """
    obj = task.objective
    if obj == "bce":
        return torch.sigmoid(raw)
    if obj == "mse_log1p":
        return torch.expm1(raw).clamp_min(0.0)
    if obj == "weighted_logistic":
        return torch.exp(raw)
    if obj == "duration_quantile":
        share = torch.sigmoid(raw)
        return share if duration is None else share * duration.to(share.dtype)
    return raw
