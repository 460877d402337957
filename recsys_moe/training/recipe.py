"""The learning-rate recipe: rates scaled from the batch size, warm-up, decay.

    rates = scaled_rates(t, world_size, total_steps)  # Rates(lr, embedding_lr, warmup_steps, ..)
    scheduler = build_scheduler(optimizer, rates.schedule, total_steps, rates.warmup_steps,
                                rates.cooldown_share)

``train.lr`` and ``train.embedding_lr`` are given for batches of ``train.lr_reference_batch`` rows
(all ranks together). A run whose global batch ``B = batch_size * world_size`` differs uses them
times ``r ** p``, ``r = B / reference``: p = 1 for ``linear``, 1/2 for ``sqrt``, 0 for ``none``;
``auto`` is linear up to ``r = 16`` and sqrt beyond (``16 * sqrt(r / 16)``: x32 at r = 64),
chosen separately for the dense part (``train.lr_scaling``, Adam; default none) and the tables
(``train.embedding_lr_scaling``, row-wise Adagrad; default auto). A run whose rates were raised
starts with a linear warm-up of every learning rate (``train.warmup_steps``; auto = 5 % of the
run's steps, else none). The warm-up multiplies the schedule: constant, linear decay to 0 at the
end, wsd (constant, then linear to 0 over the last ``train.lr_cooldown_share`` of the steps), or
``auto``: linear at the reference batch or below; above it wsd under Muon, constant under Adam.

Measured on the demo model (3 epochs, validation click AUC, 2-core CPU, seeds 0 / 1 / 2;
benchmarks/README.md "Large batches on the CPU", ``results/cpu_recipe_study.txt``). Batch 512:
0.7590 / 0.7571 / 0.7587. Batch 8192 (372 steps): this recipe (tables x16, constant) 0.7550 /
0.7544 / 0.7565, within 0.005 of 512 in every seed; the former one (tables x16, linear decay)
0.7547 / 0.7494 / 0.7512. Batch 32768 (93 steps): this recipe (tables x32, constant) 0.7484 /
0.7435 / 0.7428, 0.011-0.016 below 512, not the 0.01 asked; the former one (tables x64, linear
decay) 0.7170 / 0.7271 / 0.7171.
Batch 2048: constant 0.7562 / 0.7570, linear 0.7553 / 0.7564. (One H200, the former recipe,
seed 0: 0.7561 at 512, 0.7545 at 8192, 0.7304 at 32768; benchmarks/README.md.) Why:

- tables: a row is updated once per batch it appears in, so a frequent row gets r times fewer
  updates in an epoch, each averaging r times more examples: linear scaling restores its
  progress (8192: x16 beat x10, 0.7535 / 0.7507). At 32768 x64 overshoots (Adagrad's first
  steps, its largest, move a row by about the rate): means over seeds x32 0.7449 (3 seeds),
  x45 0.7436, x64 0.7420, x20 0.7364 (2 seeds);
- the schedule: with few steps a decay to 0 spends half the run at a small rate while the
  model still improves at the end (32768: epoch AUCs 0.68, 0.74, 0.75; 6 epochs reach 0.7554);
  a decay to half the rate (0.7469 / 0.7396) and cosine (0.7401, s0) were worse than none, a
  decay over the last 20 % of the steps level with none (0.7491, s0);
- Adam: its steps are already normalised; a larger rate did not help (32768: x2 0.7418 / 0.7355
  against 0.7484 / 0.7435; x8 with 30 warm-up steps 0.7324 and x16 0.5932 against 0.7410,
  s0, under linear decay; x4 with gradient clipping at norm 1 0.7463, s0), nor a LAMB-like step
  scaled to each weight's norm (x4 0.7533 / 0.7326, x8 0.7424 / 0.7451, x16 collapsed: 0.5073),
  betas (0.8, 0.99) (+0.0008 / +0.0006: noise), or 4x or 1/4 the rate for the gates alone, 4x for
  the heads (within 0.004, s0);
- warm-up: 0, 5 and 15 steps at 32768 within 0.004 of each other (s0).

What closed most of the 32768 gap was the dense optimizer, not a rate (session 16,
benchmarks/README.md): Muon (``training/muon.py``) on the dense matrices at 4x the dense rate,
momentum 0.9, no warm-up: 0.7548 / 0.7546 / 0.7527 on the CPU (512 here: 0.7579 / 0.7561 /
0.7587), 0.7542 / 0.7507 / 0.7457 on one H200 (512: 0.7575 / 0.7580 / 0.7570). ``train.
dense_optimizer = "auto"`` takes it beyond ``AUTO_LINEAR_UP_TO`` times the reference batch; at
8192 it was level with Adam (0.7552 / 0.7548, s0), so Adam stays there. Under Muon the runs'
last epoch left watch time noisy (its RMSE rose in epoch 3 for two seeds on the GPU): a
cool-down over the last 20 % of the steps (wsd, session 17) settles it, 32768 then 0.7568 /
0.7553 / 0.7520 on the CPU and 0.7544 / 0.7557 / 0.7520 on one H200 (graphed), all three within
0.01 of 512 there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from recsys_moe.config import TrainConfig

EXPONENT = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
AUTO_LINEAR_UP_TO = 16.0  # scaling auto: linear up to this batch ratio, sqrt beyond
AUTO_WARMUP_SHARE = 0.05
DEFAULT_COOLDOWN = TrainConfig.lr_cooldown_share  # the config's default (wsd's last 20 %)
SCHEDULES = ("constant", "linear", "wsd")


class Rates(NamedTuple):
    lr: float
    embedding_lr: float
    warmup_steps: int
    global_batch: int
    scale: float  # the dense rate's factor (lr / train.lr)
    schedule: str  # train.lr_schedule resolved: constant | linear | wsd
    dense_optimizer: str  # train.dense_optimizer resolved: adam | muon
    muon_lr: float  # Muon's rate (its matrices), lr x train.muon_lr_scale; 0 under adam
    cooldown_share: float  # wsd: the share of the steps it decays over


def rate_scale(scaling: str, ratio: float) -> float:
    """The factor of a learning rate at ``ratio`` times the reference batch (``scaling``: none,
    sqrt, linear, or auto: linear up to ``AUTO_LINEAR_UP_TO``, sqrt beyond, continuous)."""
    if scaling == "auto":
        if ratio <= AUTO_LINEAR_UP_TO:
            return ratio
        return AUTO_LINEAR_UP_TO * math.sqrt(ratio / AUTO_LINEAR_UP_TO)
    return ratio ** EXPONENT[scaling]


def scaled_rates(t: TrainConfig, world_size: int, total_steps: int) -> Rates:
    """The learning rates, warm-up and schedule a run of ``world_size`` ranks and
    ``total_steps`` uses."""
    batch = t.batch_size * world_size
    ratio = batch / t.lr_reference_batch
    scale = rate_scale(t.lr_scaling, ratio)
    embedding_scale = rate_scale(t.embedding_lr_scaling, ratio)
    # train.dense_optimizer resolved: auto = muon beyond AUTO_LINEAR_UP_TO times the reference
    # batch (where Adam fell short), else adam
    optimizer = t.dense_optimizer
    if optimizer == "auto":
        optimizer = "muon" if ratio > AUTO_LINEAR_UP_TO else "adam"
    if t.warmup_steps == "auto":
        scaled_up = scale > 1.0 or embedding_scale > 1.0
        wanted = scaled_up and optimizer == "adam"  # Muon: none (measured: better without)
        warmup = math.ceil(AUTO_WARMUP_SHARE * total_steps) if wanted else 0
    else:
        warmup = int(t.warmup_steps)
    schedule = t.lr_schedule
    if schedule == "auto":  # Adam above the reference: constant (a cool-down measured level)
        above = "wsd" if optimizer == "muon" else "constant"
        schedule = "linear" if ratio <= 1.0 else above
    lr = t.lr * scale
    muon_lr = lr * t.muon_lr_scale if optimizer == "muon" else 0.0
    return Rates(lr, t.embedding_lr * embedding_scale, warmup, batch, scale, schedule,
                 optimizer, muon_lr, t.lr_cooldown_share)  # fmt: skip


def schedule_factor(
    step: int,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    cooldown_share: float = DEFAULT_COOLDOWN,
) -> float:
    """The multiplier of every learning rate before optimizer step ``step + 1`` (0-based);
    ``schedule`` constant, linear (to 0 at ``total_steps``) or wsd (1 until the last
    ``cooldown_share`` of the steps, then linear to 0 at ``total_steps``); ``auto`` is resolved
    by ``scaled_rates``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    total = max(1, total_steps)
    if schedule == "linear":
        decay = max(0.0, 1.0 - step / total)
    elif schedule == "wsd":
        cooldown = max(1.0, cooldown_share * total)  # steps of the decay
        decay = min(1.0, max(0.0, (total - step) / cooldown))
    else:
        decay = 1.0
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_share: float = DEFAULT_COOLDOWN,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``schedule`` (``Rates.schedule``, train.lr_schedule resolved: constant, linear decay of
    every learning rate to 0 at the end, or wsd: constant then a linear cool-down to 0 over the
    last ``cooldown_share`` of the steps) times a linear warm-up over ``warmup_steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: schedule_factor(step, schedule, total_steps, warmup_steps, cooldown_share),
    )
