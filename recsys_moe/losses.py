"""Per-task losses and the inverse of the target transforms.

Notation: B batch. ``out.logits[name]`` is ``[B]``; labels are ``[B]`` in natural units
(click 0/1, watch time in seconds), looked up by ``TaskConfig.label``.

- binary: BCE with logits against the label.
- regression: MSE between the raw output and ``transform(label)`` (``log1p`` or ``none``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # config imports the feature store (and through it Polars); types only here
    from recsys_moe.config import TaskConfig
    from recsys_moe.model import ModelOutput

TRANSFORMS: tuple[str, ...] = ("none", "log1p")


def _check_transform(task: TaskConfig) -> None:
    if task.transform not in TRANSFORMS:
        raise ValueError(
            f"task {task.name!r}: transform {task.transform!r} is not one of {TRANSFORMS}"
        )


def target(task: TaskConfig, label: Tensor) -> Tensor:
    """The label on the scale the head predicts (``[B]`` float)."""
    label = label.float()
    if task.kind == "binary":
        return label
    _check_transform(task)
    return torch.log1p(label) if task.transform == "log1p" else label


def task_losses(
    out: ModelOutput, labels: dict[str, Tensor], tasks: list[TaskConfig]
) -> dict[str, Tensor]:
    """Scalar loss per task name."""
    losses: dict[str, Tensor] = {}
    for task in tasks:
        if task.label not in labels:
            raise ValueError(
                f"task {task.name!r}: label column {task.label!r} not in batch labels "
                f"{sorted(labels)}"
            )
        raw = out.logits[task.name]
        y = target(task, labels[task.label]).to(raw.dtype)
        if task.kind == "binary":
            losses[task.name] = F.binary_cross_entropy_with_logits(raw, y)
        elif task.kind == "regression":
            losses[task.name] = F.mse_loss(raw, y)
        else:
            raise ValueError(f"task {task.name!r}: kind {task.kind!r} is not binary|regression")
    return losses


def total_loss(losses: dict[str, Tensor], tasks: list[TaskConfig]) -> Tensor:
    """Σ_task weight · loss."""
    return torch.stack([t.weight * losses[t.name] for t in tasks]).sum()


def to_natural(task: TaskConfig, raw: Tensor) -> Tensor:
    """Raw head output → prediction in natural units (probability; seconds for ``log1p``)."""
    if task.kind == "binary":
        return torch.sigmoid(raw)
    _check_transform(task)
    return torch.expm1(raw).clamp_min(0.0) if task.transform == "log1p" else raw
