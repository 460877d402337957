"""The report of a predictions frame (recsys_moe/evaluation/report.py, ranking.py): ranking
metrics per request, metrics by segment and bootstrap intervals, each against a brute-force
computation on small data."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from test_metrics import ref_auc, ref_gauc

from recsys_moe.config import EvalConfig, TaskConfig
from recsys_moe.evaluation.ranking import RequestRanking, combined_score
from recsys_moe.evaluation.report import (
    build_report,
    frame_metrics,
    markdown,
    metrics_table,
    write_plots,
)
from serving.score import combined_score as serving_score

CLICK = TaskConfig(name="click", kind="binary", label="click")
WATCH = TaskConfig(
    name="watch_time", kind="regression", label="watch_time_s", transform="log1p", mask="click"
)
TASKS = [CLICK, WATCH]


def ref_ranking(score: list[float], rel: list[float], k: int) -> dict[str, float]:
    """One request: NDCG@k (linear gain, log2(rank + 1) discount), recall@k, reciprocal rank."""
    order = sorted(range(len(score)), key=lambda i: -score[i])
    ranked = [rel[i] for i in order]
    dcg = sum(r / math.log2(i + 2) for i, r in enumerate(ranked[:k]))
    ideal = sum(r / math.log2(i + 2) for i, r in enumerate(sorted(rel, reverse=True)[:k]))
    first = next(i for i, r in enumerate(ranked) if r > 0)
    return {"ndcg": dcg / ideal, "recall": sum(1 for r in ranked[:k] if r > 0) / sum(
        1 for r in rel if r > 0), "mrr": 1.0 / (first + 1)}  # fmt: skip


def make_frame(seed: int, requests: int = 30, per: int = 6) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = requests * per
    request = np.repeat(rng.permutation(np.arange(100, 100 + requests)), per)
    user = request % 9
    click = (rng.random(n) < 0.25).astype(np.int64)
    seconds = np.where(click == 1, np.round(rng.exponential(30.0, n), 1), 0.0)
    p = np.clip(0.15 + 0.3 * click + rng.normal(0, 0.15, n), 0.001, 0.999)
    guess = np.where(click == 1, seconds, 10.0) * rng.uniform(0.5, 1.5, n)
    frame = pl.DataFrame({
        "request_id": request, "user_id": user, "item_id": rng.integers(0, 50, n),
        "click": click, "watch_time_s": seconds, "segment": [f"s{u % 3}" for u in user],
        "category": [f"c{c}" for c in rng.integers(0, 4, n)],
        "pred_click": p, "pred_watch_time": guess,
    })  # fmt: skip
    score = combined_score(TASKS, {"click": 1.0, "watch_time": 1.0},
                           {"p_click": p, "watch_time_s": guess})  # fmt: skip
    return frame.with_columns(score=pl.Series(score))


def test_combined_score_is_the_scoring_jobs() -> None:
    """One definition: the evaluation ranks by the scoring job's numbers exactly, and both are
    the formula (a brute-force NumPy product here)."""
    frame = make_frame(0)
    click = frame["pred_click"].to_numpy().copy()
    click[0] = -0.1  # clipped to 0
    seconds = frame["pred_watch_time"].to_numpy()
    for weights in ({"click": 1.0, "watch_time": 1.0}, {"click": 2.0, "watch_time": 0.5},
                    {"click": 1.0}, {}):  # fmt: skip
        preds = {"p_click": click.astype(np.float32), "watch_time_s": seconds}
        mine = combined_score(TASKS, weights, preds)
        job = pl.DataFrame(preds).select(serving_score(TASKS, weights)).to_series().to_numpy()
        assert mine.dtype == np.float64 and np.array_equal(mine, np.broadcast_to(job, mine.shape))
        p = np.clip(click.astype(np.float32).astype(np.float64), 0.0, None)
        want = p ** weights.get("click", 0.0) * (1.0 + seconds) ** weights.get("watch_time", 0.0)
        assert mine == pytest.approx(want, rel=1e-12) and mine[0] == (0.0 if weights else 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_ranking_metrics_equal_brute_force_per_request(seed: int) -> None:
    frame = make_frame(seed)
    m = RequestRanking([2, 4], graded=True)
    for lo in range(0, frame.height, 50):  # a request's rows in two batches
        part = frame.slice(lo, 50)
        m.update(*(torch.tensor(part[c].to_numpy())
                   for c in ("score", "click", "request_id", "watch_time_s")))  # fmt: skip
    got = m.compute()
    want: dict[str, list[float]] = {}
    skipped = 0
    for _, part in frame.group_by("request_id"):
        score, click = part["score"].to_list(), part["click"].to_list()
        if sum(click) == 0:
            skipped += 1
            continue
        for k in (2, 4):
            r = ref_ranking(score, click, k)
            want.setdefault(f"ndcg_at_{k}", []).append(r["ndcg"])
            want.setdefault(f"recall_at_{k}", []).append(r["recall"])
            g = ref_ranking(score, part["watch_time_s"].to_list(), k)
            want.setdefault(f"ndcg_graded_at_{k}", []).append(g["ndcg"])
        want.setdefault("mrr", []).append(r["mrr"])
    assert skipped > 0 and got["requests_skipped"] == skipped
    assert got["requests"] == 30 - skipped
    for k, v in want.items():
        assert got[k] == pytest.approx(float(np.mean(v)), rel=1e-6), k


def test_metrics_by_segment_are_the_metrics_of_its_rows() -> None:
    frame = make_frame(1, requests=60)
    ev = EvalConfig(ks=[3], bootstrap=0)
    report = build_report(frame, TASKS, ev, {})
    assert set(report.segments) == {"segment", "category"}
    for col in ("segment", "category"):
        for value, m in report.segments[col].items():
            rows = frame.filter(pl.col(col) == value)
            assert m["rows"] == rows.height
            assert m["click_auc"] == pytest.approx(
                ref_auc(rows["pred_click"].to_list(), rows["click"].to_list()), abs=1e-6
            )
            g = ref_gauc(rows["pred_click"].to_numpy(), rows["click"].to_numpy(),
                         rows["user_id"].to_numpy())  # fmt: skip
            assert m["click_gauc_user_id"] == pytest.approx(g["gauc"], rel=1e-9)
            clicked = rows.filter(pl.col("click") == 1)
            err = clicked["pred_watch_time"] - clicked["watch_time_s"]
            assert m["watch_time_rmse"] == pytest.approx(float((err**2).mean() ** 0.5))
            # ranking by a column constant within requests only (the user's segment)
            assert ("rank_mrr" in m) == (col == "segment")
    assert any("varies within requests" in n for n in report.notes)


def test_bootstrap_intervals_resample_requests_as_brute_force() -> None:
    frame = make_frame(2, requests=25)
    ev = EvalConfig(ks=[3], bootstrap=9, seed=7, ci=0.8, segments=[])
    report = build_report(frame, TASKS, ev, {})
    rng = np.random.default_rng(7)
    ids = sorted(set(frame["request_id"].to_list()))
    by_request = {r: frame.filter(pl.col("request_id") == r) for r in ids}
    aucs, mrrs = [], []
    for _ in range(9):
        times = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
        sample = pl.concat([by_request[r] for r, t in zip(ids, times, strict=True)
                            for _ in range(t)])  # fmt: skip
        aucs.append(ref_auc(sample["pred_click"].to_list(), sample["click"].to_list()))
        rr = [ref_ranking(by_request[r]["score"].to_list(), by_request[r]["click"].to_list(), 3)
              ["mrr"] for r, t in zip(ids, times, strict=True) for _ in range(t)
              if by_request[r]["click"].sum() > 0]  # fmt: skip
        mrrs.append(float(np.mean(rr)))
    for key, draws in (("click_auc", aucs), ("rank_mrr", mrrs)):
        want = (np.quantile(draws, 0.1), np.quantile(draws, 0.9))
        assert report.ci[key] == pytest.approx(want, abs=1e-6), key
    assert report.ci == build_report(frame, TASKS, ev, {}).ci  # seeded
    assert not any(k.endswith("requests_skipped") for k in report.ci)  # counts get no interval


def test_segment_intervals_resample_requests_within_each_value_as_brute_force() -> None:
    frame = make_frame(4, requests=40)
    ev = EvalConfig(ks=[3], bootstrap=7, seed=3, ci=0.8)
    report = build_report(frame, TASKS, ev, {})
    assert set(report.segment_ci) == {"segment", "category"}
    for col in ("segment", "category"):
        assert set(report.segment_ci[col]) == set(report.segments[col])
        for value, ci in report.segment_ci[col].items():
            rows = frame.filter(pl.col(col) == value)
            ids = sorted(set(rows["request_id"].to_list()))
            by_request = {r: rows.filter(pl.col("request_id") == r) for r in ids}
            rng = np.random.default_rng(3)  # each value's resampling from the seed alone
            draws: dict[str, list[float]] = {"click_auc": [], "watch_time_rmse": [],
                                             "rank_mrr": []}  # fmt: skip
            for _ in range(7):
                times = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
                sample = pl.concat([by_request[r] for r, t in zip(ids, times, strict=True)
                                    for _ in range(t)])  # fmt: skip
                draws["click_auc"].append(
                    ref_auc(sample["pred_click"].to_list(), sample["click"].to_list())
                )
                clicked = sample.filter(pl.col("click") == 1)
                err = (clicked["pred_watch_time"] - clicked["watch_time_s"]).to_numpy()
                draws["watch_time_rmse"].append(float(np.sqrt(np.mean(err**2))))
                rr = [ref_ranking(by_request[r]["score"].to_list(),
                                  by_request[r]["click"].to_list(), 3)["mrr"]
                      for r, t in zip(ids, times, strict=True) for _ in range(t)
                      if by_request[r]["click"].sum() > 0]  # fmt: skip
                draws["rank_mrr"].append(float(np.mean(rr)))
            for key, d in draws.items():
                if key == "rank_mrr" and col == "category":  # varies within requests: no ranking
                    assert key not in ci
                    continue
                want = (np.quantile(d, 0.1), np.quantile(d, 0.9))
                assert ci[key] == pytest.approx(want, abs=1e-6), (col, value, key)
                assert ci[key][0] <= report.segments[col][value][key] + 0.2
    table = metrics_table(report)
    one = table.filter((pl.col("column") == "segment") & (pl.col("metric") == "click_auc"))
    assert one.height == len(report.segments["segment"])
    row = one.row(0, named=True)
    assert row["estimate"] == report.segments["segment"][row["value"]]["click_auc"]
    assert (row["ci_low"], row["ci_high"]) == report.segment_ci["segment"][row["value"]][
        "click_auc"
    ]
    overall = table.filter(pl.col("column").is_null())
    assert dict(zip(overall["metric"], overall["estimate"], strict=True)) == report.metrics
    page = markdown(report, TASKS, title="t", images=[])
    lo, hi = report.segment_ci["segment"]["s0"]["click_auc"]
    assert f"[{lo:.4f}, {hi:.4f}]" in page


def test_frame_without_requests_or_segments_reports_what_it_skipped(tmp_path) -> None:
    frame = make_frame(3).drop("request_id", "segment")
    ev = EvalConfig(bootstrap=3)
    report = build_report(frame, TASKS, ev, {})
    assert not any(k.startswith("rank_") for k in report.metrics)
    assert "click_gauc_request_id" not in report.metrics and "click_gauc_user_id" in report.metrics
    text = " ".join(report.notes)
    assert "request_id" in text and "segment" in text and "resamples of rows" in text
    plain, _, _ = frame_metrics(frame, TASKS, ev, {})
    assert plain == report.metrics
    images = write_plots(frame, TASKS, report, tmp_path)
    assert {p.name for p in images} == {"click_curves.png", "by_category.png"}
    page = markdown(report, TASKS, title="t", images=images)
    assert "![click_curves](click_curves.png)" in page and "## By category" in page


def test_vectorised_ranking_agrees_with_torchmetrics_per_request() -> None:
    """The per-request loop of torchmetrics' retrieval functions is the reference."""
    from torchmetrics.functional.retrieval import (
        retrieval_normalized_dcg,
        retrieval_recall,
        retrieval_reciprocal_rank,
    )

    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 12, 40)  # ragged requests, some shorter than k
    ks = [1, 3, 8]
    m = RequestRanking(ks, graded=True)
    req = np.repeat(np.arange(40), sizes)
    score = rng.random(len(req))
    click = (rng.random(len(req)) < 0.3).astype(np.int64)
    grade = click * rng.exponential(20.0, len(req))
    order = rng.permutation(len(req))  # rows in any order
    m.update(*(torch.tensor(x[order]) for x in (score, click, req, grade)))
    ids, got = m.per_request()
    assert ids.tolist() == list(range(40))
    for r in range(40):
        s, c, g = (torch.tensor(x[req == r]) for x in (score, click, grade))
        if c.sum() == 0:
            assert all(math.isnan(v[r]) for v in got.values())
            continue
        assert got["mrr"][r] == pytest.approx(float(retrieval_reciprocal_rank(s, c)))
        for k in ks:
            assert got[f"ndcg_at_{k}"][r] == pytest.approx(
                float(retrieval_normalized_dcg(s, c, top_k=k)), rel=1e-6
            )
            assert got[f"recall_at_{k}"][r] == pytest.approx(
                float(retrieval_recall(s, c, top_k=k)), rel=1e-6
            )
            assert got[f"ndcg_graded_at_{k}"][r] == pytest.approx(
                float(retrieval_normalized_dcg(s, g, top_k=k)), rel=1e-6
            )


@pytest.mark.slow  # creating the MLflow store: seconds
def test_seesaw_compares_each_task_with_the_sweeps_single_task_runs(tmp_path) -> None:
    """A real SQLite store: a sweep parent, an MMoE child and single-task children (two seeds)."""
    from mlflow import MlflowClient

    from recsys_moe.evaluation.seesaw import seesaw

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id

    def child(mixture: str, seed: int, auc: float, rmse: float) -> str:
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_param(run, "model.mixture", mixture)
        client.log_param(run, "train.seed", str(seed))
        client.log_metric(run, "valid/click_auc", auc)
        client.log_metric(run, "valid/watch_time_rmse", rmse)
        client.set_terminated(run)
        return run

    mmoe = child("mmoe", 0, 0.760, 18.0)
    child("single_task", 0, 0.750, 17.5)  # same seed: the baseline
    child("single_task", 1, 0.100, 99.0)  # another seed: not compared
    gains = seesaw(client, client.get_run(mmoe), TASKS)
    assert gains["click_auc_gain"] == pytest.approx(0.010)  # higher AUC: positive
    assert gains["watch_time_rmse_gain"] == pytest.approx(-0.5)  # higher RMSE: negative
    assert gains["baselines"] == 1
    page = markdown(build_report(make_frame(0), TASKS, EvalConfig(bootstrap=0), {}), TASKS,
                    title="t", images=[], seesaw=gains)  # fmt: skip
    assert "Seesaw: worse than single-task on watch_time_rmse" in page
    lone = client.create_run(exp).info.run_id  # not in a sweep: no check
    assert seesaw(client, client.get_run(lone), TASKS) == {}
