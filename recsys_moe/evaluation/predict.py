"""Batch inference on raw feature rows: mappings → tensors → model → natural units.

The one path from a frame of raw feature values to predictions, used by evaluation, the registry's
pyfunc and scoring, so that all three score a row identically.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from feature_store import FeatureSet
from pipelines.mappings import Mappings
from recsys_moe.config import TaskConfig
from recsys_moe.data import TensorData, iterate_batches, map_to_tensors
from recsys_moe.model import MultiTaskModel
from recsys_moe.model.objectives import output_name, to_natural


@torch.no_grad()
def predict_frame(
    model: MultiTaskModel,
    features: FeatureSet,
    mappings: Mappings,
    tasks: list[TaskConfig],
    frame: pl.DataFrame,
    *,
    batch_size: int = 8192,
) -> dict[str, np.ndarray]:
    """Predictions in natural units (probability, seconds) for each row of ``frame``.

    ``frame`` holds the raw feature columns (as the training set and point-in-time joins give
    them); the result maps ``output_name(task)`` to a float64 array of ``len(frame)``.
    """
    missing = [c for c in features.input_columns if c not in frame.columns]
    if missing:
        raise ValueError(f"input lacks feature column(s) {missing}; columns: {frame.columns}")
    data = map_to_tensors(frame, features, mappings)
    return predict_tensors(model, data, tasks, batch_size=batch_size)


def predict_tensors(
    model: MultiTaskModel, data: TensorData, tasks: list[TaskConfig], *, batch_size: int = 8192
) -> dict[str, np.ndarray]:
    """``predict_frame`` on already mapped tensors (rows in order)."""
    return _predict(model, data, tasks, batch_size, keep_gates=False)[0]


def predict_with_gates(
    model: MultiTaskModel, data: TensorData, tasks: list[TaskConfig], *, batch_size: int = 8192
) -> tuple[dict[str, np.ndarray], Tensor]:
    """``predict_tensors`` and, from the same forward passes, the gates ``[T, N, E]`` (CPU)."""
    preds, gates = _predict(model, data, tasks, batch_size, keep_gates=True)
    assert gates is not None
    return preds, gates


@torch.no_grad()
def _predict(
    model: MultiTaskModel,
    data: TensorData,
    tasks: list[TaskConfig],
    batch_size: int,
    *,
    keep_gates: bool,
) -> tuple[dict[str, np.ndarray], Tensor | None]:
    """One pass in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {output_name(t): [] for t in tasks}
    gates: list[Tensor] = []
    try:
        for batch in iterate_batches(data, batch_size):
            out = model(batch.dense, batch.sparse)
            for t in tasks:
                chunks[output_name(t)].append(to_natural(t, out.logits[t.name]).double().numpy())
            if keep_gates:
                gates.append(out.gates.float().cpu())
    finally:
        model.train(was_training)
    preds = {
        k: np.concatenate(v) if v else np.zeros(0, dtype=np.float64) for k, v in chunks.items()
    }
    return preds, (torch.cat(gates, dim=1) if keep_gates else None)
