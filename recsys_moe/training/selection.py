"""Model selection during training: which epoch's weights become the run's model, and when to
stop early (``train.select``, ``train.selection_metric``, ``train.patience``, ``train.min_delta``).

The selection score of a validation (higher is better):

- ``train.selection_metric = ""``: the mean over tasks of each task's gate metric (the metric
  promotion compares, ``tasks.<name>.gate``), normalised so that 0 is the constant predictor and
  1 perfect: ``2·AUC − 1`` (Gini), ``1 − NE`` for logloss / NE, ``1 − RMSE / RMSE of the
  training mean`` (and likewise for ``rmse_log``); MAE has no baseline and counts as ``−MAE``.
  A task whose metric is undefined on the split (one class) is left out of the mean.
- a validation metric's key, e.g. ``click_auc`` or ``watch_time_rmse``: that metric, negated
  where lower is better (``config.higher_is_better``: loss, NE, RMSE, MAE); calibration has no
  better direction and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from recsys_moe.config import TaskConfig, higher_is_better


def task_score(task: TaskConfig, valid: Mapping[str, float]) -> float:
    """``task``'s normalised gate metric (see the module docstring); NaN when undefined."""
    name, gate = task.name, task.gate
    if gate == "auc":
        return 2.0 * valid.get(f"{name}_auc", math.nan) - 1.0
    if gate in ("logloss", "ne"):
        return 1.0 - valid.get(f"{name}_ne", math.nan)
    if gate in ("rmse", "rmse_log"):
        value = valid.get(f"{name}_{gate}", math.nan)
        base = valid.get(f"{name}_{gate}_mean_predictor")
        return 1.0 - value / base if base else -value
    return -valid.get(f"{name}_{gate}", math.nan)


def selection_score(valid: Mapping[str, float], tasks: list[TaskConfig], metric: str = "") -> float:
    """The selection score of one validation's metrics (higher is better; NaN if undefined)."""
    if metric:
        if metric not in valid:
            raise ValueError(
                f"train.selection_metric: {metric!r} is not a validation metric; the validation "
                f"gives {sorted(valid)}"
            )
        try:
            up = higher_is_better(metric)
        except ValueError as e:
            raise ValueError(f"train.selection_metric: {e}; choose another metric") from None
        return valid[metric] if up else -valid[metric]
    scores = [s for s in (task_score(t, valid) for t in tasks) if not math.isnan(s)]
    return sum(scores) / len(scores) if scores else math.nan


@dataclass
class Selection:
    """The best validation so far: ``update`` after each validation says whether it improved by
    more than ``min_delta``; ``stop`` whether ``patience`` validations in a row have not."""

    patience: int = 0  # 0: never stop early
    min_delta: float = 0.0
    best_score: float = -math.inf
    best_step: int = 0
    stale: int = 0  # validations since the best

    def update(self, step: int, score: float) -> bool:
        if not math.isnan(score) and score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self.stale = score, step, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def state_dict(self) -> dict[str, float | int]:
        return {"best_score": self.best_score, "best_step": self.best_step, "stale": self.stale}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.best_score = float(state.get("best_score", -math.inf))
        self.best_step = int(state.get("best_step", 0))
        self.stale = int(state.get("stale", 0))
