"""Metric loggers: one small interface, MLflow on rank 0 and a do-nothing logger elsewhere, so
the training loop has no ``if rank == 0`` branches (as torchtitan's ``metrics.py``).

Keys are namespaced: ``train/loss_<task>`` (every step), ``valid/<task>_<metric>`` (every
epoch); MLflow's run page shows these two sections first. Gate statistics are not metric series
(dozens of three-point charts ahead of the loss curves): each validation's statistics become rows
of the table artifact ``gates/gate_stats.json`` and the plot ``gates/gate_stats.png``.
Every step's losses are kept and sent in one batch per window (``train.log_every`` steps): a call
per step cost 63 % of the demo's CPU throughput (180k -> 67k samples/s). The windows go to the
store on a background thread (``StepSender``): on one H200 the loop's wait for each commit cost
the bench model ~5 % of its samples/s.

The progress bar (``TrainProgress``, rank 0, stderr, ``pipelines.progress``) advances every step
and shows the window's mean losses at each flush: no device sync beyond the flush's own.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import mlflow
import torch
from mlflow.entities import Metric
from torch import Tensor

from pipelines import progress
from recsys_moe.config import Config
from recsys_moe.tracking import (
    ensure_experiment,
    log_datasets,
    run_description,
    run_name,
    use_tracking_uri,
)
from recsys_moe.training.dist import mean_across_ranks

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_gates(self, stats: dict[str, float], step: int) -> None: ...
    def log_steps(
        self, names: list[str], steps: list[tuple[int, int]], values: list[list[float]]
    ) -> None: ...
    def wait_steps(self) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dict(self, value: dict[str, Any], artifact_file: str) -> None: ...
    def log_artifacts(self, path: Path, artifact_path: str) -> None: ...
    def close(self, ok: bool) -> None: ...


class MlflowLogger:
    """Rank 0: an MLflow run, new or (on resume) the checkpoint's own."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        *,
        run_id: str | None,
        tags: dict[str, str],
        name: str | None = None,
        description: str | None = None,
        system_metrics_s: float | None = None,
    ) -> None:
        use_tracking_uri(tracking_uri)
        self.resumed = run_id is not None
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=experiment_id,
            tags=tags,
            run_name=None if self.resumed else name,
            description=None if self.resumed else description,
            log_system_metrics=False,  # our own monitor (its interval), not the environment's
        )
        self.run_id = run.info.run_id
        self.system = (
            start_system_metrics(self.run_id, tracking_uri, system_metrics_s, resume=self.resumed)
            if system_metrics_s
            else None
        )
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.sender = StepSender(self.client, self.run_id)
        self.gate_rows: list[dict[str, Any]] = []
        # On resume, the steps the earlier attempt already logged (a prefix: windows are sent
        # in order, by one thread) are not logged again: every step's losses appear once.
        self.logged_through = 0
        if self.resumed:
            history = self.client.get_metric_history(self.run_id, "train/loss")
            self.logged_through = max((m.step for m in history), default=0)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics(metrics, step=step, synchronous=False)

    def log_gates(self, stats: dict[str, float], step: int) -> None:
        """One validation's gate statistics (``gates/<task>/<stat>``), rows of the table
        written at ``close``."""
        for key, value in stats.items():
            _, task, stat = key.split("/", 2)
            self.gate_rows.append({"step": step, "task": task, "statistic": stat, "value": value})

    def log_steps(
        self, names: list[str], steps: list[tuple[int, int]], values: list[list[float]]
    ) -> None:
        """``values[i][j]``: metric ``names[j]`` at ``steps[i]`` = (step, timestamp ms), queued
        for ``StepSender``, which sends the windows in order on its own thread while training
        goes on (a kill leaves a prefix of the steps logged, never a gap); ``close`` waits for
        it."""
        rows = [(step, timestamp, row) for (step, timestamp), row in zip(steps, values, strict=True)
                if step > self.logged_through]  # fmt: skip
        self.sender.submit(names, rows)

    def wait_steps(self) -> None:
        """Until every window given so far is in the store (before a checkpoint: a resume
        from it finds all its steps logged, never a gap)."""
        self.sender.wait()

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.resumed:  # MLflow refuses to change a param (train.resume did change)
            mlflow.log_params(params)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_dict(self, value: dict[str, Any], artifact_file: str) -> None:
        mlflow.log_dict(value, artifact_file)

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)

    def close(self, ok: bool) -> None:
        status = "FINISHED" if ok else "FAILED"
        try:
            try:
                self.sender.close()  # every window in the store
            except RuntimeError as e:  # a run that failed already keeps its own error
                status = "FAILED"
                if ok:
                    raise
                log.warning("%s", e)
            if self.system is not None:
                stop_system_metrics(self.system)
            if self.gate_rows:
                write_gate_artifacts(self.gate_rows)
        finally:
            mlflow.end_run(status)


class StepSender:
    """Sends windows of per-step losses to an MLflow run on one background thread, in the order
    they were given (a kill leaves a prefix of the steps in the store, as resume expects). A
    window of 500 steps is 1,500 metrics, 0.05-0.35 s of SQLite writes, as long as hundreds of
    GPU steps: the training loop no longer waits for them. The thread's error (a store gone
    away) is raised by the next ``submit`` or by ``close``."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.queue: queue.Queue[tuple[list[str], list[tuple[int, int, list[float]]]] | None] = (
            queue.Queue()
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mlflow-steps", daemon=True)
        self.thread.start()

    def submit(self, names: list[str], rows: list[tuple[int, int, list[float]]]) -> None:
        """Queue one window: ``rows`` of (step, timestamp ms, one value per name)."""
        self._raise()
        if not self.thread.is_alive():
            raise RuntimeError("the MLflow step sender is closed")
        self.queue.put((names, rows))

    def wait(self) -> None:
        """Until every queued window is sent; the thread's error if any."""
        self.queue.join()
        self._raise()

    def close(self) -> None:
        """Wait until every queued window is in the store; raise the thread's error if any."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"sending the per-step losses to MLflow failed: {error}") from error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                self._send(*item)
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def _send(self, names: list[str], rows: list[tuple[int, int, list[float]]]) -> None:
        if self.error is not None:
            return  # after a failure nothing more is sent: the store keeps a prefix
        metrics = [Metric(name, value, timestamp, step) for step, timestamp, row in rows
                   for name, value in zip(names, row, strict=True)]  # fmt: skip
        per_batch = max(1, 1000 // len(names)) * len(names)  # MLflow's limit, whole steps
        try:
            for i in range(0, len(metrics), per_batch):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + per_batch])
        except Exception as e:  # noqa: BLE001 - handed to the training thread
            self.error = e


def start_system_metrics(
    run_id: str, tracking_uri: str, interval_s: float, *, resume: bool
) -> SystemMetricsMonitor | None:
    """MLflow's system-metrics monitor for ``run_id``: a daemon thread that samples CPU, memory,
    disk and network (GPU with ``nvidia-ml-py``) every ``interval_s`` seconds and logs their
    means as ``system/...`` metrics at steps 0, 1, ... (continued on resume). Started here, not
    by ``start_run(log_system_metrics=True)``, which reads its interval from a process-wide
    environment variable. None, with a warning, without psutil."""
    if importlib.util.find_spec("psutil") is None:
        log.warning("psutil is not installed (make setup installs it): no system metrics")
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=tracking_uri
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor: SystemMetricsMonitor) -> None:
    """Stop the thread (waits for it) and log what it sampled since its last point: MLflow's
    ``finish`` drops those samples, so a run shorter than one interval had no system metrics."""
    monitor.finish()
    pending = monitor.aggregate_metrics()
    if pending:
        try:
            monitor.publish_metrics(pending)
            monitor.mlflow_logger.flush()
        except Exception as e:  # the charts lose a point; the run's own results are unharmed
            log.warning("could not log the last system metrics: %s", e)


def write_gate_artifacts(rows: list[dict[str, Any]]) -> None:
    """``gates/gate_stats.json`` (MLflow table: step, task, statistic, value) and
    ``gates/gate_stats.png`` (each task's expert usage and entropy over the validations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(rows)
    mlflow.log_table(frame, artifact_file="gates/gate_stats.json")
    tasks = list(dict.fromkeys(frame["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sub = frame[frame["task"] == task]
        for stat, series in sub.groupby("statistic", sort=True):
            if stat.startswith("usage_") or stat == "entropy":
                ax.plot(series["step"], series["value"], marker="o", label=stat)
        ax.set(title=f"gate of {task}", xlabel="step", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gate_stats.png"
        fig.savefig(path, dpi=90)
        mlflow.log_artifact(str(path), artifact_path="gates")
    plt.close(fig)


class NullLogger:
    """Every other rank: logs nothing."""

    run_id = ""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_gates(self, stats: dict[str, float], step: int) -> None:
        pass

    def log_steps(
        self, names: list[str], steps: list[tuple[int, int]], values: list[list[float]]
    ) -> None:
        pass

    def wait_steps(self) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, value: dict[str, Any], artifact_file: str) -> None:
        pass

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


def metric_logger(
    is_main: bool, cfg: Config, *, run_id: str | None, tags: dict[str, str]
) -> MetricLogger:
    """MLflow on the main rank (a new run, or ``run_id``'s on resume), nothing elsewhere."""
    if not is_main:
        return NullLogger()
    m = cfg.mlflow
    logger = MlflowLogger(
        cfg.tracking_uri(),
        ensure_experiment(cfg),
        run_id=run_id,
        tags=tags,
        name=run_name(cfg),
        description=run_description(cfg),
        system_metrics_s=m.system_metrics_interval_s if m.system_metrics else None,
    )
    if not logger.resumed:
        log_datasets(cfg)
    return logger


class TrainingDiverged(ValueError):
    """A run whose losses or predictions stopped being finite numbers (the learning rates too
    high for it, as a rule): the loop stops there rather than train and save NaN weights."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"training diverged: {what}. Lower the learning rates (train.lr, train.embedding_lr, "
            "or their scaling: train.lr_scaling, train.embedding_lr_scaling, and under Muon "
            "train.muon_lr_scale); the run's effective rates are its params "
            "train.lr_effective, train.embedding_lr_effective and train.muon_lr_effective"
        )


class Step(NamedTuple):
    step: int
    timestamp_ms: int
    loss: Tensor  # detached, on the device: read only at the flush (no sync per step)
    per_task: dict[str, Tensor]


class TrainProgress:
    """The training bar: epoch, step of all steps, samples/s, the last window's mean losses per
    task, ETA (tqdm's, from the recent step rate)."""

    def __init__(self, *, first_step: int, total: int, per_epoch: int, batch_size: int) -> None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.per_epoch, self.epochs = per_epoch, -(-total // per_epoch)
        self.samples_per_step = batch_size * world
        self.total = total
        self.bar = progress.bar(total=total, initial=first_step, desc="train", unit="step")
        self.started, self.first = time.perf_counter(), first_step
        self.losses = ""

    def step(self, step: int) -> None:
        self.bar.set_description_str(
            f"train epoch {(step - 1) // self.per_epoch + 1}/{self.epochs}", refresh=False
        )
        self.bar.update(1)

    def window(self, step: int, names: list[str], means: list[float]) -> None:
        """The mean losses of the window that ended at ``step``."""
        elapsed = time.perf_counter() - self.started
        rate = self.bar.format_dict.get("rate") or (step - self.first) / max(elapsed, 1e-9)
        parts = [f"{n.removeprefix('train/').removeprefix('loss_')} {v:.4f}"
                 for n, v in zip(names, means, strict=True)]  # fmt: skip
        self.bar.set_postfix_str(
            f"{rate * self.samples_per_step:,.0f} samples/s, {', '.join(parts)}", refresh=True
        )
        if step >= self.total:
            self.bar.close()

    def close(self) -> None:
        self.bar.close()


class StepWindow:
    """Each step's detached losses since the last flush; ``flush`` sends them (mean across
    ranks: one all-reduce per window) to the logger in one batch and returns this rank's own
    total losses, one per step. With ``total`` (and the loop's shape), the main rank also shows
    a progress bar (``TrainProgress``)."""

    def __init__(
        self,
        logger: MetricLogger,
        *,
        first_step: int = 0,
        total: int = 0,
        per_epoch: int = 1,
        batch_size: int = 0,
    ) -> None:
        self.logger = logger
        self.steps: list[Step] = []
        self.progress = (
            TrainProgress(
                first_step=first_step, total=total, per_epoch=per_epoch, batch_size=batch_size
            )
            if total and not isinstance(logger, NullLogger)
            else None
        )

    def add(self, step: Step) -> None:
        self.steps.append(step)
        if self.progress is not None:
            self.progress.step(step.step)

    def flush(self) -> list[float]:
        window, self.steps = self.steps, []
        if not window:
            return []
        keys = list(window[0].per_task)
        rows = [torch.stack([w.loss, *(w.per_task[k] for k in keys)]) for w in window]
        table = torch.stack(rows).float().cpu()  # [W, 1 + tasks]: one device sync per window
        own = table[:, 0].tolist()
        table = mean_across_ranks(table)
        names = ["train/loss", *(f"train/loss_{k}" for k in keys)]
        self.logger.log_steps(names, [(w.step, w.timestamp_ms) for w in window], table.tolist())
        finite = torch.isfinite(table).all(dim=1)  # (the mean: every rank sees the same)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            values = ", ".join(f"{n} {v:g}" for n, v in zip(names, table[i].tolist(), strict=True))
            raise TrainingDiverged(f"the loss is not finite at step {window[i].step} ({values})")
        if self.progress is not None:
            self.progress.window(window[-1].step, names, table.mean(0).tolist())
        return own
