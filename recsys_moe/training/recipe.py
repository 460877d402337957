"""The learning-rate recipe: rates scaled from the batch size, warm-up, decay.

    rates = scaled_rates(t, world_size, total_steps)  # Rates(lr, embedding_lr, warmup_steps, ..)
    scheduler = build_scheduler(optimizer, t.lr_schedule, total_steps, rates.warmup_steps)

``train.lr`` and ``train.embedding_lr`` are given for batches of ``train.lr_reference_batch`` rows
(all ranks together). A run whose global batch ``B = batch_size * world_size`` differs uses them
times ``(B / reference) ** p``: p = 1/2 for ``sqrt`` (the rule for Adam-like optimizers: the
gradient noise falls as 1/sqrt(B)), 1 for ``linear`` (Goyal et al. 2017, for SGD), 0 for
``none``; ``embedding_lr_scaling`` does the same for the embedding tables' Adagrad. A scaled run
starts with a linear warm-up of every learning rate (``train.warmup_steps``; auto = 5 % of the
run's steps when the rates were scaled up, else none): large early steps at a raised rate are
what stops large batches from learning. The warm-up multiplies the schedule (constant or linear
decay to 0 at the end).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from recsys_moe.config import TrainConfig

EXPONENT = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
AUTO_WARMUP_SHARE = 0.05


class Rates(NamedTuple):
    lr: float
    embedding_lr: float
    warmup_steps: int
    global_batch: int
    scale: float  # the dense rate's factor (lr / train.lr)


def scaled_rates(t: TrainConfig, world_size: int, total_steps: int) -> Rates:
    """The learning rates and warm-up a run of ``world_size`` ranks and ``total_steps`` uses."""
    batch = t.batch_size * world_size
    ratio = batch / t.lr_reference_batch
    scale = ratio ** EXPONENT[t.lr_scaling]
    embedding_scale = ratio ** EXPONENT[t.embedding_lr_scaling]
    if t.warmup_steps == "auto":
        scaled_up = scale > 1.0 or embedding_scale > 1.0
        warmup = math.ceil(AUTO_WARMUP_SHARE * total_steps) if scaled_up else 0
    else:
        warmup = int(t.warmup_steps)
    return Rates(t.lr * scale, t.embedding_lr * embedding_scale, warmup, batch, scale)


def schedule_factor(step: int, schedule: str, total_steps: int, warmup_steps: int) -> float:
    """The multiplier of every learning rate before optimizer step ``step + 1`` (0-based)."""
    decay = max(0.0, 1.0 - step / max(1, total_steps)) if schedule == "linear" else 1.0
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """``train.lr_schedule`` (constant, or linear decay of every learning rate to 0 at the end)
    times a linear warm-up over the first ``warmup_steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(step, schedule, total_steps, warmup_steps)
    )
