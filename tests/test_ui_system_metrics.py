"""System metrics of a training run (the run page's "System metrics" tab): MLflow's monitor
thread, sampling every ``mlflow.system_metrics_interval_s``, logs ``system/...`` series into
the real SQLite store; it stops with the run (no thread left behind), a run shorter than one
interval still gets its one point, and ``mlflow.system_metrics = false`` logs none."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import small_demo_work

from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.tracking import chart_sections, client_for
from recsys_moe.training.train import train

SMALL = [
    "synth.users=150", "synth.items=60", "synth.days=4", "train.epochs=1", "train.log_every=2",
    "model.expert_dims=[16]", "model.tower_dims=[8]", "mlflow.experiment=system-metrics",
]  # fmt: skip
CPU, MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    root = small_demo_work("system-metrics-", SMALL)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _train(work: Path, *sets: str) -> tuple[dict[str, float], str]:
    cfg = load_config(DEMO_CONFIG, [*SMALL, *sets], workdir=work)
    result = train(cfg)
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    return client_for(cfg).get_run(result.run_id).data.metrics, result.run_id


@pytest.mark.slow
def test_a_training_run_logs_system_metrics(work: Path) -> None:
    metrics, run_id = _train(work, "train.epochs=2", "mlflow.system_metrics_interval_s=1")
    assert {CPU, MEMORY, "system/disk_usage_percentage"} <= set(metrics), sorted(metrics)
    cfg = load_config(DEMO_CONFIG, SMALL, workdir=work)
    client = client_for(cfg)
    history = client.get_metric_history(run_id, CPU)
    # about a point per second of the run (its length depends on the machine's load), steps
    # 0, 1, ... in order
    info = client.get_run(run_id).info
    seconds = (info.end_time - info.start_time) / 1000
    assert len(history) >= max(1, int(seconds) - 3), (seconds, history)
    assert sorted(m.step for m in history) == list(range(len(history)))
    assert all(0.0 <= m.value <= 100.0 for m in history)
    assert metrics[MEMORY] > 0
    # on their own tab: the chart sections of the "Model metrics" tab are unchanged
    assert [s for s, _ in chart_sections(list(metrics))][:2] == ["train", "valid"]


@pytest.mark.slow
def test_a_run_shorter_than_the_interval_gets_one_point_and_off_means_none(work: Path) -> None:
    metrics, run_id = _train(work, "mlflow.system_metrics_interval_s=3600")
    cfg = load_config(DEMO_CONFIG, SMALL, workdir=work)
    assert [m.step for m in client_for(cfg).get_metric_history(run_id, CPU)] == [0]
    metrics, _ = _train(work, "mlflow.system_metrics=false")
    assert "train/loss" in metrics
    assert not [k for k in metrics if k.startswith("system/")]
