"""Per-task losses (masked means) and their combination: training only (inference needs
``recsys_moe.model.objectives``).

Notation: B batch. ``out.logits[name]`` is ``[B]``; labels are ``[B]`` float in natural units
(click 0/1, watch time in seconds; null → NaN), looked up by column name (``label_columns``).

Objectives (``TaskConfig.objective``, resolved from ``kind`` and ``transform`` at config load):

    bce                binary: BCE with logits against the 0/1 label.
    mse_log1p          regression: MSE of the raw output against log1p(label); natural = expm1.
    mse                regression: MSE against the label itself, divided by the label's training
                       variance (the head outputs std·h + mean: ``TaskHead.out_scale``), so
                       that a label of any sign and scale weighs like the others; natural = raw.
    weighted_logistic  Covington et al. 2016 (YouTube): a logistic head, positives (``positive``
                       column = 1, default label > 0) weighted by the label (watch time),
                       negatives by 1. At the optimum the odds exp(logit) = Σ_pos T / N_neg ≈ E[T]
                       when positives are rare; natural = exp(raw).
    duration_quantile  target = clip(label / duration, 0, 1) with duration from ``quantile_of``
                       (the watched share of the item), fitted by BCE with logits on that soft
                       target, whose minimiser is E[share | x]; natural = sigmoid(raw) (the
                       share), or seconds when ``to_natural`` is given the durations.

Masks, not row filters: a row counts in its task's loss only where the label is not NaN, the
``mask`` column (if any) is 1 and (duration_quantile) the duration is positive; each loss is the
mean over counted rows (0 with no such row). ``combine_losses`` adds the tasks' losses with fixed
weights or ``UncertaintyWeighting`` (Kendall et al. 2018), and the mixture's auxiliary loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_moe.model.objectives import target

if TYPE_CHECKING:  # config imports the feature store (and through it Polars); types only here
    from recsys_moe.config import TaskConfig
    from recsys_moe.model import ModelOutput


def _column(labels: dict[str, Tensor], name: str, task: TaskConfig) -> Tensor:
    if name not in labels:
        raise ValueError(
            f"task {task.name!r}: column {name!r} not in batch labels {sorted(labels)}; "
            "load config.label_columns(tasks)"
        )
    return labels[name].float()


def task_loss(
    task: TaskConfig, raw: Tensor, labels: dict[str, Tensor], scale: float = 1.0
) -> Tensor:
    """Scalar loss of one task: the mean of its per-row loss over counted rows (module doc).
    ``scale``: mse only, the label's training standard deviation (the error is divided by it)."""
    obj = task.objective
    y = _column(labels, task.label, task).to(raw.dtype)
    valid = ~torch.isnan(y)
    if task.mask:
        valid &= _column(labels, task.mask, task) == 1
    if obj == "duration_quantile":
        duration = _column(labels, task.quantile_of, task).to(raw.dtype)
        valid &= duration > 0
        y = (y / torch.where(valid, duration, 1.0)).clamp(0.0, 1.0)
    y = torch.where(valid, y, 0.0)  # NaN * 0 is NaN: clear masked labels before the loss
    if obj == "bce" or obj == "duration_quantile":
        per_row = F.binary_cross_entropy_with_logits(raw, y, reduction="none")
    elif obj == "weighted_logistic":
        pos = _column(labels, task.positive, task) == 1 if task.positive else y > 0
        weight = torch.where(pos, y, 1.0)
        bce = F.binary_cross_entropy_with_logits(raw, pos.to(raw.dtype), reduction="none")
        per_row = weight * bce
    elif obj == "mse":
        per_row = ((raw - y) / scale) ** 2
    else:
        per_row = (raw - target(task, y)) ** 2
    valid_f = valid.to(raw.dtype)
    return (per_row * valid_f).sum() / valid_f.sum().clamp_min(1.0)


def task_losses(
    out: ModelOutput,
    labels: dict[str, Tensor],
    tasks: list[TaskConfig],
    scales: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """Scalar loss per task name; ``scales``: mse tasks' label standard deviations."""
    scales = scales or {}
    return {t.name: task_loss(t, out.logits[t.name], labels, scales.get(t.name, 1.0))
            for t in tasks}  # fmt: skip


def total_loss(losses: dict[str, Tensor], tasks: list[TaskConfig]) -> Tensor:
    """Σ_task weight · loss."""
    return torch.stack([t.weight * losses[t.name] for t in tasks]).sum()


class UncertaintyWeighting(nn.Module):
    """Kendall et al. 2018: a learned log-variance s_t per task.

    ``forward(losses, tasks) -> Σ_t weight_t · (c_t · exp(-s_t) · L_t + s_t / 2)`` with c = 1 for
    binary tasks and 1/2 for regression (the paper's σ⁻² and (2σ²)⁻¹, s = log σ²). s starts at 0.
    Its parameters belong to the model, so the dense optimizer trains them; keep weight decay off
    them, it would pull every s to 0.
    """

    def __init__(self, task_names: list[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(task_names)))

    def scales(self, tasks: list[TaskConfig]) -> dict[str, Tensor]:
        """The effective multiplier of each task's loss, c_t · exp(-s_t) (for logging)."""
        out = {}
        for t in tasks:
            c = 1.0 if t.kind == "binary" else 0.5
            out[t.name] = c * torch.exp(-self.log_vars[self.task_names.index(t.name)])
        return out

    def forward(self, losses: dict[str, Tensor], tasks: list[TaskConfig]) -> Tensor:
        scales = self.scales(tasks)
        terms = [
            t.weight
            * (scales[t.name] * losses[t.name] + 0.5 * self.log_vars[self.task_names.index(t.name)])
            for t in tasks
        ]
        return torch.stack(terms).sum()


def combine_losses(
    losses: dict[str, Tensor],
    tasks: list[TaskConfig],
    weighting_module: nn.Module | None = None,
    *,
    aux_loss: Tensor | None = None,
) -> Tensor:
    """The training loss: fixed weights (``total_loss``) or ``weighting_module(losses, tasks)``,
    plus ``aux_loss`` (``ModelOutput.aux_loss``, already weighted) when given."""
    if weighting_module is None:
        loss = total_loss(losses, tasks)
    else:
        loss = weighting_module(losses, tasks)
    return loss if aux_loss is None else loss + aux_loss
