"""What a person sees of a training run, checked without a browser (no headless Chromium or
Playwright is installed here, and nothing may be downloaded): the job's progress bar on stderr,
and in the MLflow store what the UI renders from it: the experiment's kind (the UI opens on its
runs), the run's name, description and datasets, and the order of the run page's chart sections
as MLflow's own rule computes it from the run's metric keys (``tracking.chart_sections``): the
loss curves first, then the per-task validation curves, no gate-statistics series, and still
so after ``evaluate`` and ``register`` (their metrics are on the evaluation run, a child run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_moe.config import load_config
from recsys_moe.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    chart_sections,
    client_for,
    run_name,
)


def test_chart_sections_follow_mlflows_rule() -> None:
    keys = ["valid/click_auc", "train/loss_click", "train/loss", "gates/click/usage_e0", "epoch",
            "test/by_segment/1/click_auc", "system/cpu_utilization_percentage"]  # fmt: skip
    assert chart_sections(keys) == [
        ("gates/click", ["gates/click/usage_e0"]),
        ("test/by_segment/1", ["test/by_segment/1/click_auc"]),
        ("train", ["train/loss", "train/loss_click"]),
        ("valid", ["valid/click_auc"]),
        ("Model metrics", ["epoch"]),
    ]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", *args],
        capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_training_run_as_a_user_sees_it(tmp_path: Path) -> None:
    work = ["--workdir", str(tmp_path)]
    _cli("data", "synth", *work, "--users", "300", "--items", "80", "--days", "4")
    _cli("features", "build", *work)
    sets = ["--set", "train.epochs=2", "--set", "train.log_every=5"]
    proc = _cli("train", *work, *sets, env={"RECSYS_MOE_PROGRESS": "always"})

    # progress: epoch, step of all steps, samples/s, each task's running loss, ETA (tqdm's <)
    bar = proc.stderr.replace("\r", "\n")
    assert "train epoch 1/2" in bar and "train epoch 2/2" in bar, bar[-2000:]
    last = [line for line in bar.splitlines() if "samples/s" in line][-1]
    assert "click" in last and "watch_time" in last and "<" in last, last
    # no library notices: the bar and nothing else on stderr
    assert "is_fx_tracing" not in proc.stderr and "INFO" not in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    _cli("evaluate", *work, *sets, "--set", "eval.bootstrap=5")
    _cli("register", *work, *sets)

    cfg = load_config(None, [s for s in sets if s != "--set"], workdir=tmp_path)
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # the UI opens on the runs
    assert "training runs" in exp.tags[NOTE_TAG]
    (run,) = client.search_runs([exp.experiment_id], "tags.`recsys_moe.job` = 'train'")
    assert run.info.run_name == run_name(cfg) == "mmoe-4e-64x32-2ep-seed0"
    assert "mmoe" in run.data.tags[NOTE_TAG] and str(cfg.dataset_dir) in run.data.tags[NOTE_TAG]
    contexts = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert contexts["dataset/train"]["mlflow.data.context"] == "training"
    assert contexts["dataset/valid"]["mlflow.data.context"] == "validation"

    sections = chart_sections(list(run.data.metrics))
    names = [s for s, _ in sections]
    assert names[:2] == ["train", "valid"], names  # the first screen: losses, then validation
    assert sections[0][1][:3] == ["train/loss", "train/loss_click", "train/loss_watch_time"]
    assert {"valid/click_auc", "valid/watch_time_rmse"} <= set(sections[1][1])
    assert not [s for s in names if s.startswith(("gates", "test"))]
    # the evaluation: a run nested under the training run, its headline numbers one section
    (ev,) = client.search_runs([exp.experiment_id], "tags.`recsys_moe.job` = 'evaluate'")
    assert ev.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert ev.info.run_name == f"eval-test-{run.info.run_name}"
    assert [s for s, _ in chart_sections(list(ev.data.metrics))] == ["test"]
    assert {"test/click_auc", "test/watch_time_rmse"} <= set(ev.data.metrics)
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "gates")]
    assert arts == ["gates/gate_stats.json", "gates/gate_stats.png"]
    table = client.load_table(exp.experiment_id, "gates/gate_stats.json", [run.info.run_id])
    assert set(table["task"]) == {"click", "watch_time"} and table["step"].nunique() == 2
