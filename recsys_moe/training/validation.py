"""Validation during training, sharded over the ranks.

    split [N rows] ─► rank r predicts rows [r·S, (r+1)·S)  (S = ⌈N / ranks⌉; the last block padded
        with repeats of its first row to S, so that every rank runs the same number of forward
        calls: the sharded tables' forward is a collective) ─► all-gather ─► every rank holds the
        whole split's predictions and gates, in row order

Each rank predicts 1/ranks of the split instead of all of it; the metrics are then computed from
the same numbers on every rank (no broadcast needed, and early stopping agrees everywhere).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from recsys_moe.config import TaskConfig
from recsys_moe.data import TensorData, take_rows
from recsys_moe.evaluation.predict import predict_with_gates


def block(num_rows: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(start, stop, size)``: rank ``rank``'s rows ``[start, stop)`` of ``num_rows``, and the
    padded size every rank predicts (``⌈num_rows / world_size⌉``)."""
    size = -(-num_rows // world_size)
    start = min(rank * size, num_rows)
    return start, min(start + size, num_rows), size


def predict_sharded(
    model: nn.Module,
    data: TensorData,
    tasks: list[TaskConfig],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
) -> tuple[dict[str, np.ndarray], Tensor]:
    """``predict_with_gates`` over the whole split, each rank computing its block (module doc).
    Collective when ``world_size > 1``: every rank calls it."""
    if world_size == 1:
        return predict_with_gates(model, data, tasks, batch_size=batch_size)
    n = data.num_rows
    start, stop, size = block(n, rank, world_size)
    own = torch.arange(start, stop)
    pad = torch.full((size - len(own),), start if stop > start else 0, dtype=torch.int64)
    idx = torch.cat([own, pad]).to(data.dense.device)
    preds, gates = predict_with_gates(model, take_rows(data, idx), tasks, batch_size=batch_size)
    mine = len(own)
    parts: list = [None] * world_size
    dist.all_gather_object(parts, ({k: v[:mine] for k, v in preds.items()}, gates[:, :mine]))
    merged = {k: np.concatenate([p[0][k] for p in parts]) for k in preds}
    return merged, torch.cat([p[1] for p in parts], dim=1)
