"""Model selection: the run's model is the best validation's weights; early stopping; resume.

``train.min_delta = 1`` makes every validation after the first "no improvement", so the first
epoch is the best one deterministically (a score cannot rise by 1: AUC-based scores lie in
[-1, 1]); with a constant learning rate, its weights are those of a one-epoch run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fixtures import assert_same_weights, small_demo_work

from recsys_moe.config import DEMO_CONFIG, Config, TaskConfig, load_config
from recsys_moe.training.selection import Selection, selection_score, task_score
from recsys_moe.training.train import train

SMALL = [
    "synth.users=150", "synth.items=60", "synth.days=4",
    "train.batch_size=512", "train.log_every=2", "train.lr_schedule=constant",
    "model.expert_dims=[16]", "model.tower_dims=[8]", "mlflow.experiment=select",
]  # fmt: skip
CLICK = TaskConfig(name="click", kind="binary", label="click")
WATCH = TaskConfig(name="wt", kind="regression", label="w")


def test_selection_score_normalises_each_tasks_gate_metric() -> None:
    valid = {"click_auc": 0.75, "click_ne": 0.9, "wt_rmse": 8.0, "wt_rmse_mean_predictor": 10.0}
    assert task_score(CLICK, valid) == pytest.approx(0.5)
    assert task_score(WATCH, valid) == pytest.approx(0.2)
    assert selection_score(valid, [CLICK, WATCH]) == pytest.approx(0.35)
    ne = TaskConfig(name="click", kind="binary", label="click", gate="ne")
    assert task_score(ne, valid) == pytest.approx(0.1)
    # one class in the split: that task's AUC is NaN and is left out of the mean
    assert selection_score({**valid, "click_auc": math.nan}, [CLICK, WATCH]) == pytest.approx(0.2)
    # a named metric, negated where lower is better
    assert selection_score(valid, [CLICK], "click_auc") == 0.75
    assert selection_score(valid, [CLICK], "wt_rmse") == -8.0
    with pytest.raises(ValueError, match=r"'click_aucc' is not a validation metric.*click_auc"):
        selection_score(valid, [CLICK], "click_aucc")


def test_selection_tracks_the_best_and_the_patience() -> None:
    s = Selection(patience=2, min_delta=0.01)
    assert s.update(10, 0.5) and s.best_step == 10
    assert not s.update(20, 0.505) and not s.stop  # within min_delta: not an improvement
    assert not s.update(30, math.nan) and s.stop  # two validations without one
    assert s.best_step == 10 and s.best_score == 0.5
    t = Selection()
    t.load_state_dict(s.state_dict())
    assert (t.best_step, t.best_score, t.stale) == (10, 0.5, 2) and not t.stop  # patience 0


@pytest.fixture(scope="module")
def work() -> Path:
    return small_demo_work("select-", SMALL)


def config(work: Path, *extra: str) -> Config:
    return load_config(DEMO_CONFIG, [*SMALL, *extra], workdir=work)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epochs_weights(work: Path) -> None:
    one = train(config(work, "train.epochs=1"))
    stopped = train(config(work, "train.epochs=5", "train.patience=1", "train.min_delta=1.0"))
    per_epoch = one.stopped_step
    assert stopped.stopped_step == 2 * per_epoch  # epoch 2 did not improve: stopped there
    assert stopped.selected_step == per_epoch
    assert_same_weights(stopped.model, one.model)
    assert stopped.valid == one.valid  # the report is the selected epoch's
    last = train(config(work, "train.epochs=2", "train.select=last", "train.min_delta=1.0"))
    assert last.selected_step == last.stopped_step == 2 * per_epoch
    assert last.valid != one.valid


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_weights_of_before_the_resume(work: Path) -> None:
    """Checkpoints every epoch; resuming from epoch 2's checkpoint of a 3-epoch run, whose best
    is epoch 1: the resumed run's model is epoch 1's weights, read back from
    best-weights-rank0.pt."""
    one = train(config(work, "train.epochs=1"))
    per_epoch = one.stopped_step
    sets = ["train.epochs=3", "train.min_delta=1.0", f"train.checkpoint.every={per_epoch}",
            "train.checkpoint.keep=0"]  # fmt: skip
    straight = train(config(work, *sets))
    assert straight.selected_step == per_epoch
    assert_same_weights(straight.model, one.model)
    run_dir = config(work).path("checkpoints") / straight.run_id
    assert (run_dir / "best-weights-rank0.pt").is_file()
    resumed = train(config(work, *sets, f"train.resume={run_dir}/ckpt-{2 * per_epoch}"))
    assert resumed.selected_step == per_epoch and resumed.stopped_step == 3 * per_epoch
    assert_same_weights(resumed.model, one.model)
    assert resumed.valid == pytest.approx(one.valid)
