"""Objectives, masks and loss weighting (recsys_moe/training/losses.py, module.py)."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import MODEL_FEATURES_TOML

from feature_store.definitions import FeatureSet
from recsys_moe.config import ModelConfig, TaskConfig, label_columns
from recsys_moe.model import build_model
from recsys_moe.model.objectives import to_natural
from recsys_moe.training.losses import (
    UncertaintyWeighting,
    combine_losses,
    task_loss,
    total_loss,
)
from recsys_moe.training.module import TrainLoss, TrainModule

pytestmark = pytest.mark.usefixtures("one_thread")


CLICK = TaskConfig(name="click", kind="binary", label="click")
WATCH_ON_CLICK = TaskConfig(
    name="watch_time", kind="regression", label="watch_time_s", transform="log1p", mask="click"
)


def test_masked_rows_do_not_count() -> None:
    raw = torch.tensor([0.5, 1.0, 2.0, 3.0])
    labels = {"click": torch.tensor([1.0, 0, 1, 0]), "watch_time_s": torch.tensor([3.0, 9, 40, 1])}
    loss = task_loss(WATCH_ON_CLICK, raw, labels)
    expected = ((raw[[0, 2]] - torch.log1p(torch.tensor([3.0, 40]))) ** 2).mean()
    torch.testing.assert_close(loss, expected)  # a masked mean over the clicked rows
    changed = {**labels, "watch_time_s": torch.tensor([3.0, 1e6, 40, float("nan")])}
    torch.testing.assert_close(task_loss(WATCH_ON_CLICK, raw, changed), loss)
    clicked_changed = {**labels, "watch_time_s": torch.tensor([4.0, 9, 40, 1])}
    assert task_loss(WATCH_ON_CLICK, raw, clicked_changed) != loss
    # null labels are masked too, and a batch without counted rows gives 0 with a gradient
    nan_click = {"click": torch.tensor([1.0, float("nan"), 1, float("nan")])}
    torch.testing.assert_close(
        task_loss(CLICK, raw, nan_click), task_loss(CLICK, raw[[0, 2]], {"click": torch.ones(2)})
    )
    raw_g = raw.clone().requires_grad_()
    none = task_loss(WATCH_ON_CLICK, raw_g, {**labels, "click": torch.zeros(4)})
    none.backward()
    assert none.item() == 0.0 and not raw_g.grad.any()


def test_weighted_logistic_odds_estimate_expected_watch_time() -> None:
    task = TaskConfig(
        name="watch_time",
        kind="regression",
        label="watch_time_s",
        objective="weighted_logistic",
        positive="click",
    )
    g = torch.Generator().manual_seed(0)
    n = 4000
    click = (torch.rand(n, generator=g) < 0.1).float()
    watch = torch.where(click == 1, torch.rand(n, generator=g) * 60, torch.rand(n, generator=g))
    labels = {"click": click, "watch_time_s": watch}
    z = torch.zeros(1, requires_grad=True)  # a constant-feature model: one logit for all rows
    opt = torch.optim.LBFGS([z], lr=0.5, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task_loss(task, z.expand(n), labels)
        loss.backward()
        return loss

    opt.step(closure)
    weighted_odds = (watch * click).sum() / (1 - click).sum()  # the optimum's exp(logit)
    estimate = to_natural(task, z.detach())
    torch.testing.assert_close(estimate, weighted_odds.view(1), rtol=1e-3, atol=0)
    # ≈ E[T] (skips counted as 0) times 1 / (1 - click rate): close for rare positives
    mean_watch = ((watch * click).sum() / n).item()
    assert estimate.item() == pytest.approx(mean_watch / (1 - click.mean().item()), rel=1e-3)
    assert estimate.item() == pytest.approx(mean_watch, rel=0.15)


def test_duration_quantile_target_and_natural_units() -> None:
    task = TaskConfig(
        name="watch_time",
        kind="regression",
        label="watch_time_s",
        objective="duration_quantile",
        quantile_of="duration_s",
    )
    labels = {
        "watch_time_s": torch.tensor([30.0, 200, 10, 5]),
        "duration_s": torch.tensor([60.0, 100, 0, 20]),  # row 2: no duration, masked
    }
    share = torch.tensor([0.5, 1.0, 0.25])  # 200/100 clipped to 1
    raw = torch.logit(share.clamp(1e-4, 1 - 1e-4))
    raw = torch.cat([raw[:2], torch.tensor([7.0]), raw[2:]])
    at_target = task_loss(task, raw, labels)
    torch.testing.assert_close(at_target, task_loss(task, raw.clone(), labels))
    assert task_loss(task, raw + 0.5, labels) > at_target  # the BCE minimum is at the share
    torch.testing.assert_close(
        to_natural(task, raw[[0, 1, 3]], duration=labels["duration_s"][[0, 1, 3]]),
        torch.tensor([30.0, 100, 5]),
        atol=0.02,
        rtol=1e-3,
    )
    torch.testing.assert_close(to_natural(task, torch.zeros(1)), torch.tensor([0.5]))


def test_objectives_derive_and_validate() -> None:
    assert CLICK.objective == "bce"
    assert WATCH_ON_CLICK.objective == "mse_log1p"
    plain = TaskConfig(name="w", kind="regression", label="w")
    assert plain.objective == "mse"
    torch.testing.assert_close(to_natural(plain, torch.tensor([-2.0])), torch.tensor([-2.0]))
    for bad, match in (  # checked when the config is built, not at the first loss
        ({"kind": "binary", "objective": "mse"}, "bce"),
        ({"objective": "duration_quantile"}, "quantile_of"),
        ({"transform": "log1p", "objective": "weighted_logistic"}, "log1p"),
        ({"objective": "huber"}, "objective: expected one of .*'weighted_logistic'"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            TaskConfig(**{"name": "w", "kind": "regression", "label": "w"} | bad)
    tasks = [CLICK, WATCH_ON_CLICK, TaskConfig(name="q", kind="regression", label="watch_time_s",
             objective="duration_quantile", quantile_of="duration_s")]  # fmt: skip
    assert label_columns(tasks) == ["click", "watch_time_s", "duration_s"]
    with pytest.raises(ValueError, match="label_columns"):
        task_loss(WATCH_ON_CLICK, torch.zeros(2), {"watch_time_s": torch.zeros(2)})


def test_combine_losses_fixed_uncertainty_and_aux() -> None:
    tasks = [CLICK, WATCH_ON_CLICK]
    losses = {"click": torch.tensor(0.7), "watch_time": torch.tensor(2.0)}
    torch.testing.assert_close(combine_losses(losses, tasks), total_loss(losses, tasks))
    torch.testing.assert_close(
        combine_losses(losses, tasks, aux_loss=torch.tensor(0.1)), torch.tensor(2.8)
    )
    weighting = UncertaintyWeighting(["click", "watch_time"])
    # s = 0: click counts fully, regression by 1/2 (Kendall et al.'s 1/σ² and 1/(2σ²))
    torch.testing.assert_close(combine_losses(losses, tasks, weighting), torch.tensor(1.7))
    combine_losses(losses, tasks, weighting).backward()
    grad = weighting.log_vars.grad
    # d/ds (c·e^{-s}·L + s/2) at s = 0 is 1/2 - c·L
    torch.testing.assert_close(grad, torch.tensor([0.5 - 0.7, 0.5 - 1.0]))


def test_uncertainty_weighting_lives_in_the_train_module_not_the_model() -> None:
    features = FeatureSet.from_toml(MODEL_FEATURES_TOML)
    cfg = ModelConfig(expert_dims=[8], tower_dims=[4], loss_weighting="uncertainty")
    model = build_model(features, cfg, ["click", "watch_time"])
    assert not [n for n in dict(model.named_parameters()) if "log_vars" in n]
    module = TrainModule(model, TrainLoss.for_config(cfg, [CLICK, WATCH_ON_CLICK]))
    params = dict(module.named_parameters())
    assert "loss.weighting.log_vars" in params  # trained and checkpointed with the module
    assert math.isclose(float(params["loss.weighting.log_vars"].detach().sum()), 0.0)
    assert TrainLoss.for_config(ModelConfig(), [CLICK]).weighting is None
    with pytest.raises(ValueError, match="loss_weighting: expected one of 'fixed', 'uncertainty'"):
        ModelConfig(loss_weighting="gradnorm")
