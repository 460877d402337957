"""Offline metrics (recsys_moe/evaluation/metrics.py, pairwise.py): a masked task is judged on the
rows its loss counts; every metric equals a brute-force reference computation, accumulated over
batches and all-reduced over ranks as over all rows at once."""

from __future__ import annotations

import itertools
import math
from typing import get_args

import numpy as np
import pytest
import torch

from recsys_moe.config import GateMetric, TaskConfig, higher_is_better
from recsys_moe.evaluation.metrics import (
    EPS,
    ReliabilityCurve,
    TaskMetrics,
    auc,
    binary_metrics,
    regression_metrics,
    split_metrics,
    task_label_stats,
    task_metrics,
)
from recsys_moe.evaluation.pairwise import GroupedAUC, xauc
from recsys_moe.training.selection import selection_score

WATCH = TaskConfig(name="watch_time", kind="regression", label="watch_time_s", transform="log1p")
WATCH_GIVEN_CLICK = TaskConfig(
    name="watch_time", kind="regression", label="watch_time_s", transform="log1p", mask="click"
)
MANIFEST = {
    "labels": {
        "click": {"kind": "binary", "train_mean": 0.2},
        "watch_time_s": {
            "kind": "regression", "train_mean": 10.0, "train_mean_log1p": 1.0,
            "when": {"click": {"train_mean": 40.0, "train_mean_log1p": 3.0}},
        },
    }
}  # fmt: skip


def test_masked_task_is_scored_on_masked_rows_against_its_conditional_mean() -> None:
    rng = np.random.default_rng(0)
    click = rng.integers(0, 2, 200)
    label = np.where(click == 1, rng.uniform(20, 60, 200), rng.uniform(0, 3, 200))
    pred = np.where(click == 1, 40.0, 1.0)
    masked = task_metrics(
        WATCH_GIVEN_CLICK, pred, label,
        label_stats=task_label_stats(WATCH_GIVEN_CLICK, MANIFEST), mask=click,
    )  # fmt: skip
    on_clicks = label[click == 1]
    assert masked["watch_time_rmse"] == pytest.approx(np.sqrt(np.mean((40.0 - on_clicks) ** 2)))
    assert masked["watch_time_rmse_mean_predictor"] == pytest.approx(masked["watch_time_rmse"])
    everything = task_metrics(WATCH, pred, label, label_stats=task_label_stats(WATCH, MANIFEST))
    assert everything["watch_time_rmse"] < masked["watch_time_rmse"]  # non-clicks are easy
    assert everything["watch_time_rmse_mean_predictor"] != masked["watch_time_rmse_mean_predictor"]


def test_masked_task_needs_its_mask_and_stats_fall_back_to_none() -> None:
    with pytest.raises(ValueError, match="masked by 'click'"):
        task_metrics(WATCH_GIVEN_CLICK, np.ones(3), np.ones(3))
    other = TaskConfig(name="w", kind="regression", label="watch_time_s", mask="liked")
    assert task_label_stats(other, MANIFEST) is None  # no baseline rather than the wrong one
    assert task_metrics(WATCH_GIVEN_CLICK, np.ones(3), np.ones(3), mask=np.zeros(3)) == {}


# ---- reference implementations: every metric against a brute-force computation ------------------
# Written plainly (Python loops, math) so that they share nothing with metrics.py but its
# definitions: AUC on the predictions as given, the others on predictions clipped to
# [EPS, 1 - EPS]; the base rate of the scored rows themselves for NE and calibration (NaN with one
# class only); log1p of max(prediction, 0) for rmse_log.


def clip(p: float) -> float:
    return min(max(float(p), EPS), 1 - EPS)


def ref_auc(pred: list[float], label: list[float]) -> float:
    """The fraction of (positive, negative) pairs ranked correctly, a tie counting 1/2."""
    pos = [p for p, y in zip(pred, label, strict=True) if y == 1]
    neg = [p for p, y in zip(pred, label, strict=True) if y == 0]
    if not pos or not neg:
        return math.nan
    won = 0.0
    for a, b in itertools.product(pos, neg):
        won += 1.0 if a > b else 0.5 if a == b else 0.0
    return won / (len(pos) * len(neg))


def ref_binary(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    p = [clip(x) for x in pred]
    y = [float(v) for v in label]
    n = len(y)
    total = 0.0
    for pi, yi in zip(p, y, strict=True):
        total += -math.log(pi) if yi == 1 else -math.log(1 - pi)
    logloss = total / n
    rate = sum(y) / n
    if rate in (0.0, 1.0):
        entropy = math.nan
    else:
        entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return {
        "auc": ref_auc([float(x) for x in pred], y),
        "logloss": logloss,
        "ne": logloss / entropy,
        "calibration": (sum(p) / n) / rate if rate > 0 else math.nan,
    }


def ref_xauc(pred: list[float], label: list[float]) -> float:
    """Over every pair with different labels: 1 if the predictions order it as the labels, 1/2
    if they tie, else 0."""
    won = pairs = 0.0
    for i, j in itertools.combinations(range(len(label)), 2):
        if label[i] == label[j]:
            continue
        pairs += 1
        a, b = (i, j) if label[i] > label[j] else (j, i)
        won += 1.0 if pred[a] > pred[b] else 0.5 if pred[a] == pred[b] else 0.0
    return won / pairs if pairs else math.nan


def ref_regression(
    pred: np.ndarray, label: np.ndarray, train_mean: float, train_mean_log1p: float
) -> dict[str, float]:
    n = len(label)
    sq = ab = sq_log = ab_log = sq_mean = sq_log_mean = 0.0
    for p, y in zip(pred.tolist(), label.tolist(), strict=True):
        sq += (p - y) ** 2
        ab += abs(p - y)
        sq_log += (math.log1p(max(p, 0.0)) - math.log1p(y)) ** 2
        ab_log += abs(math.log1p(max(p, 0.0)) - math.log1p(y))
        sq_mean += (train_mean - y) ** 2
        sq_log_mean += (train_mean_log1p - math.log1p(y)) ** 2
    return {
        "rmse": math.sqrt(sq / n),
        "mae": ab / n,
        "rmse_log": math.sqrt(sq_log / n),
        "mae_log": ab_log / n,
        "rmse_mean_predictor": math.sqrt(sq_mean / n),
        "rmse_log_mean_predictor": math.sqrt(sq_log_mean / n),
        "xauc": ref_xauc(pred.tolist(), label.tolist()),
    }


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        # torchmetrics ranks in float64 but returns the area as a float32: ~1e-7 off
        tol = {"abs": 1e-6} if k.endswith("auc") else {"rel": 1e-9, "abs": 1e-12}
        tol = {"rel": 1e-9, "abs": 1e-12} if k.endswith("xauc") else tol  # exact, float64
        assert got[k] == pytest.approx(v, nan_ok=True, **tol), k


def random_binary(seed: int, n: int = 61) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.3).astype(np.int64)
    pred = np.clip(rng.random(n) * 0.6 + 0.4 * label * rng.random(n), 0, 1)
    return pred, label


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_equal_brute_force(seed: int) -> None:
    pred, label = random_binary(seed)
    assert_same(binary_metrics(pred, label), ref_binary(pred, label))
    assert auc(pred, label) == pytest.approx(ref_auc(pred.tolist(), label.tolist()), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_auc_from_ranks_equals_brute_force_and_torchmetrics(seed: int) -> None:
    pred, label = random_binary(seed)
    for p in (pred, np.round(pred, 1)):  # with and without ties
        m = TaskMetrics(CLICK, auc_from_ranks=True)
        m.update(p, label)
        got = m.compute()["click_auc"]
        assert got == pytest.approx(ref_auc(p.tolist(), label.tolist()), rel=1e-12)
        assert got == pytest.approx(auc(p, label), abs=1e-6)
    m = TaskMetrics(CLICK, auc_from_ranks=True)
    m.update(pred, np.zeros_like(label))
    assert math.isnan(m.compute()["click_auc"])


@pytest.mark.parametrize("seed", range(3))
def test_auc_counts_tied_pairs_as_half(seed: int) -> None:
    pred, label = random_binary(seed)
    coarse = np.round(pred, 1)  # ~11 distinct values: many tied (positive, negative) pairs
    assert len(set(coarse.tolist())) < 12
    assert_same(binary_metrics(coarse, label), ref_binary(coarse, label))
    assert binary_metrics(np.full(10, 0.3), np.arange(10) % 2)["auc"] == 0.5  # all tied


def test_auc_of_hand_computed_cases() -> None:
    # positives 0.8, 0.4 vs negatives 0.4, 0.1: pairs worth 1, 1, 1/2 (the tie at 0.4) and 1
    assert auc(np.array([0.8, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(3.5 / 4)
    assert auc(np.array([0.1, 0.9]), np.array([1, 0])) == 0.0
    assert auc(np.array([0.9, 0.1]), np.array([1.0, 0.0])) == 1.0  # float labels as well


def test_predictions_of_exactly_0_and_1_are_clipped_to_eps() -> None:
    pred = np.array([0.0, 1.0, 1.0, 0.0, 0.5, 1e-12])
    label = np.array([1, 0, 1, 0, 1, 0])
    got = binary_metrics(pred, label)
    assert_same(got, ref_binary(pred, label))
    assert all(math.isfinite(v) for v in got.values())
    # each confidently wrong row costs -log(EPS), each confidently right one -log(1 - EPS)
    wrong, right, half = -math.log(EPS), -math.log(1 - EPS), -math.log(0.5)
    assert got["logloss"] == pytest.approx((2 * wrong + 3 * right + half) / 6)
    # AUC is taken on the predictions as given: 0.0 (a positive) below 1e-12 (a negative) is a
    # pair ranked wrong, worth 0 (clipped, both would be EPS: a tie worth 1/2)
    assert got["auc"] == pytest.approx(ref_auc(pred.tolist(), label.tolist()))
    assert got["auc"] != pytest.approx(ref_auc([clip(p) for p in pred], label.tolist()))


@pytest.mark.parametrize("value", [0, 1])
def test_single_class_labels_have_nan_auc_and_ne(value: int) -> None:
    pred, _ = random_binary(7, n=20)
    label = np.full(20, value)
    got = binary_metrics(pred, label)
    assert math.isnan(got["auc"]) and math.isnan(auc(pred, label))
    assert_same(got, ref_binary(pred, label))
    assert math.isfinite(got["logloss"]) and math.isnan(got["ne"])  # entropy 0: undefined
    assert math.isnan(got["calibration"]) == (value == 0)  # no positives: no observed rate


def test_ne_and_calibration_of_the_base_rate_predictor() -> None:
    label = np.array([1, 0, 0, 0, 1, 0, 0, 0])  # rate 1/4
    got = binary_metrics(np.full(8, 0.25), label)
    assert got["ne"] == pytest.approx(1.0)  # predicting the base rate is NE 1
    assert got["calibration"] == pytest.approx(1.0)
    assert binary_metrics(np.full(8, 0.5), label)["calibration"] == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(5))
def test_regression_metrics_equal_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    label = rng.exponential(30.0, 57)
    label[:3] = 0.0  # zero labels: log1p(0) = 0
    pred = label + rng.normal(0.0, 10.0, 57)
    pred[3] = -5.0  # a negative prediction counts as 0 on the log scale only
    train_mean, train_mean_log1p = float(rng.uniform(10, 50)), float(rng.uniform(1, 4))
    got = regression_metrics(pred, label, train_mean=train_mean, train_mean_log1p=train_mean_log1p)
    assert_same(got, ref_regression(pred, label, train_mean, train_mean_log1p))
    plain = regression_metrics(pred, label)  # without baselines: no baseline keys
    assert sorted(plain) == ["mae", "mae_log", "rmse", "rmse_log", "xauc"]
    assert plain == {k: got[k] for k in plain}


def test_a_plain_mse_task_has_no_log_scale_metrics() -> None:
    """A label of any sign (objective mse): RMSE, MAE, XAUC and the mean predictor, no log1p."""
    task = TaskConfig(name="d", kind="regression", label="d")
    label = np.array([-300.0, 20.0, 150.0, -5.0])
    got = task_metrics(task, label + 10.0, label, label_stats={"train_mean": 0.0})
    assert sorted(got) == ["d_mae", "d_rmse", "d_rmse_mean_predictor", "d_xauc"]
    assert got["d_rmse"] == pytest.approx(10.0) and got["d_xauc"] == 1.0
    assert got["d_rmse_mean_predictor"] == pytest.approx(math.sqrt((label**2).mean()))


def test_regression_metrics_of_hand_computed_case() -> None:
    got = regression_metrics(np.array([1.0, 3.0, -1.0]), np.array([0.0, 1.0, math.e - 1]))
    assert got["rmse"] == pytest.approx(math.sqrt((1 + 4 + math.e**2) / 3))
    assert got["mae"] == pytest.approx((1 + 2 + math.e) / 3)
    log_err = [math.log(2), math.log(4) - math.log(2), 0.0 - 1.0]
    assert got["rmse_log"] == pytest.approx(math.sqrt(sum(e * e for e in log_err) / 3))


CLICK = TaskConfig(name="click", kind="binary", label="click")


def test_task_metrics_prefix_the_task_name_and_pass_the_baselines() -> None:
    pred, label = random_binary(3)
    got = task_metrics(CLICK, pred, label)
    assert got == {f"click_{k}": v for k, v in binary_metrics(pred, label).items()}
    rng = np.random.default_rng(3)
    seconds = rng.exponential(20.0, 40)
    guess = seconds * rng.uniform(0.5, 1.5, 40)
    stats = MANIFEST["labels"]["watch_time_s"]
    want = ref_regression(guess, seconds, stats["train_mean"], stats["train_mean_log1p"])
    got = task_metrics(WATCH, guess, seconds, label_stats=task_label_stats(WATCH, MANIFEST))
    assert_same(got, {f"watch_time_{k}": v for k, v in want.items()})
    bare = task_metrics(WATCH, guess, seconds)  # no stats: no baselines
    assert sorted(bare) == [f"watch_time_{k}" for k in ("mae", "mae_log", "rmse", "rmse_log",
                                                          "xauc")]  # fmt: skip
    # a mask passed to an unmasked task is ignored: all rows count
    assert task_metrics(WATCH, guess, seconds, mask=np.zeros(40)) == bare


def test_split_metrics_scores_every_task_on_its_rows() -> None:
    rng = np.random.default_rng(11)
    n = 80
    click = (rng.random(n) < 0.4).astype(np.int64)
    seconds = np.where(click == 1, rng.exponential(40.0, n), 0.0)
    p_click = np.clip(0.2 + 0.5 * click + rng.normal(0, 0.2, n), 0, 1)
    p_seconds = np.abs(seconds + rng.normal(0, 5.0, n))
    preds = {"p_click": p_click, "watch_time_s": p_seconds}
    labels = {"click": click, "watch_time_s": seconds}
    got = split_metrics([CLICK, WATCH_GIVEN_CLICK], preds, labels, MANIFEST)
    keep = click == 1
    when = MANIFEST["labels"]["watch_time_s"]["when"]["click"]
    want = {f"click_{k}": v for k, v in ref_binary(p_click, click).items()}
    masked = ref_regression(
        p_seconds[keep], seconds[keep], when["train_mean"], when["train_mean_log1p"]
    )
    want |= {f"watch_time_{k}": v for k, v in masked.items()}
    assert_same(got, want)
    # the same task unmasked: all rows, against the unconditional baselines
    stats = MANIFEST["labels"]["watch_time_s"]
    unmasked = split_metrics([WATCH], preds, labels, MANIFEST)
    everything = ref_regression(p_seconds, seconds, stats["train_mean"], stats["train_mean_log1p"])
    assert_same(unmasked, {f"watch_time_{k}": v for k, v in everything.items()})


# ---- XAUC, GAUC, the reliability curve; batches and ranks ------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_xauc_equals_brute_force_with_tied_labels_and_predictions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    label = np.round(rng.exponential(20.0, 45), 0)  # integer seconds: tied labels
    label[:5] = 0.0
    pred = np.round(label * rng.uniform(0.3, 1.7, 45) + rng.normal(0, 5, 45), 0)  # tied preds
    assert xauc(pred, label) == pytest.approx(ref_xauc(pred.tolist(), label.tolist()), rel=1e-12)
    assert xauc(np.full(45, 3.0), label) == 0.5  # constant prediction: every pair tied
    assert math.isnan(xauc(pred, np.full(45, 7.0)))  # no pair with different labels
    # hand case: labels 1 < 2 < 3; predictions order (1, 2) right, (1, 3) tied, (2, 3) wrong
    assert xauc(np.array([0.1, 0.5, 0.1]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.5)


def ref_gauc(pred: np.ndarray, label: np.ndarray, group: np.ndarray) -> dict[str, float]:
    num = den = 0.0
    used = skipped = skipped_rows = 0
    for g in sorted(set(group.tolist())):
        rows = [i for i in range(len(group)) if group[i] == g]
        a = ref_auc([float(pred[i]) for i in rows], [float(label[i]) for i in rows])
        if math.isnan(a):
            skipped, skipped_rows = skipped + 1, skipped_rows + len(rows)
            continue
        used += 1
        num, den = num + a * len(rows), den + len(rows)
    return {"gauc": num / den if den else math.nan, "groups": used,
            "groups_skipped": skipped, "rows_skipped": skipped_rows}  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_gauc_is_the_impression_weighted_auc_of_groups_with_both_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 150
    group = rng.integers(0, 17, n)  # unsorted, some groups with one class, a few of one row
    label = (rng.random(n) < 0.35).astype(np.int64)
    pred = np.round(rng.random(n) * 0.5 + 0.3 * label, 1)  # coarse: ties within groups
    want = ref_gauc(pred, label, group)
    assert want["groups_skipped"] > 0 and want["groups"] > 0
    m = GroupedAUC()
    m.update(torch.tensor(pred), torch.tensor(label), torch.tensor(group))
    got = m.compute()
    assert got == pytest.approx(want, rel=1e-12)
    via_task = task_metrics(CLICK, pred, label, groups={"user_id": group})
    assert via_task["click_gauc_user_id"] == pytest.approx(want["gauc"], rel=1e-12)
    assert via_task["click_gauc_user_id_rows_skipped"] == want["rows_skipped"]


def test_reliability_curve_equals_brute_force_binning() -> None:
    rng = np.random.default_rng(5)
    pred = np.append(rng.random(300), [0.0, 1.0, 0.5])  # the edges: 1.0 falls in the last bin
    label = (rng.random(303) < pred).astype(np.int64)
    m = ReliabilityCurve(bins=10)
    m.update(torch.tensor(pred), torch.tensor(label))
    got = m.compute()
    for b in range(10):
        rows = [i for i, p in enumerate(pred) if min(int(p * 10), 9) == b]
        assert got["rows"][b] == len(rows)
        assert got["mean_pred"][b] == pytest.approx(sum(pred[i] for i in rows) / len(rows))
        assert got["observed"][b] == pytest.approx(sum(label[i] for i in rows) / len(rows))


def _task_data(seed: int, n: int = 400) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.3).astype(np.int64)
    seconds = np.where(click == 1, rng.exponential(30.0, n), 0.0)
    return {
        "click": click, "seconds": seconds, "user": rng.integers(0, 40, n),
        "p": np.clip(0.2 + 0.4 * click + rng.normal(0, 0.2, n), 0, 1),
        "guess": seconds * rng.uniform(0.5, 1.5, n) + rng.exponential(3.0, n),
    }  # fmt: skip


def test_metrics_accumulated_over_batches_equal_one_update() -> None:
    d = _task_data(0)
    stats = MANIFEST["labels"]["watch_time_s"]["when"]["click"]
    whole = {}
    for task, pred, label in ((CLICK, d["p"], d["click"]),
                              (WATCH_GIVEN_CLICK, d["guess"], d["seconds"])):  # fmt: skip
        whole |= task_metrics(task, pred, label, mask=d["click"], groups={"user": d["user"]},
                              label_stats=stats if task.kind == "regression" else None)  # fmt: skip
        m = TaskMetrics(task, label_stats=stats if task.kind == "regression" else None,
                        group_by=("user",) if task.kind == "binary" else ())  # fmt: skip
        for lo in range(0, 400, 37):  # a group's rows arrive in several batches
            sl = slice(lo, lo + 37)
            m.update(pred[sl], label[sl], mask=d["click"][sl], groups={"user": d["user"][sl]})
        got = m.compute()
        assert_same(got, {k: v for k, v in whole.items() if k.startswith(task.name)})


def _rank_metrics(rank: int, world: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}.init", rank=rank, world_size=world)
    d = _task_data(1)
    out = {}
    for task, pred, label in ((CLICK, d["p"], d["click"]),
                              (WATCH_GIVEN_CLICK, d["guess"], d["seconds"])):  # fmt: skip
        m = TaskMetrics(task, group_by=("user",) if task.kind == "binary" else (), sync=True)
        sl = slice(rank, None, world)  # every other row: users split over both ranks
        m.update(pred[sl], label[sl], mask=d["click"][sl], groups={"user": d["user"][sl]})
        out |= m.compute()
    torch.save(out, f"{path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_all_reduced_over_two_ranks_equal_the_metrics_of_all_rows(tmp_path) -> None:
    import torch.multiprocessing as mp

    path = str(tmp_path / "dist")
    mp.spawn(_rank_metrics, args=(2, path), nprocs=2, join=True)
    d = _task_data(1)
    want = task_metrics(CLICK, d["p"], d["click"], groups={"user": d["user"]})
    want |= task_metrics(WATCH_GIVEN_CLICK, d["guess"], d["seconds"], mask=d["click"])
    for rank in range(2):
        assert_same(torch.load(f"{path}.{rank}"), want)


def test_one_direction_table_for_the_gate_the_seesaw_and_selection() -> None:
    """``config.higher_is_better``: every key the report writes has its direction, the gate
    metrics too, and checkpoint selection by a metric follows it."""
    up = ["auc", "click_auc", "click_gauc_user_id", "watch_time_xauc", "rank_ndcg_at_5",
          "rank_ndcg_graded_at_3", "rank_recall_at_5", "rank_mrr"]  # fmt: skip
    down = ["logloss", "rmse", "click_logloss", "click_ne", "watch_time_rmse",
            "watch_time_rmse_log", "watch_time_mae", "watch_time_mae_log"]  # fmt: skip
    assert all(higher_is_better(k) for k in up) and not any(higher_is_better(k) for k in down)
    with pytest.raises(ValueError, match="no better direction"):
        higher_is_better("click_calibration")
    for gate in filter(None, get_args(GateMetric)):
        higher_is_better(gate)  # every gate metric has a direction
    click = TaskConfig(name="click", kind="binary", label="click")
    for key in up[1:] + down[2:]:
        assert (selection_score({key: 0.3}, [click], key) > 0) == higher_is_better(key), key
    with pytest.raises(ValueError, match="train.selection_metric: 'click_calibration'"):
        selection_score({"click_calibration": 1.0}, [click], "click_calibration")
