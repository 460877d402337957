"""Offline evaluation of a training run's model on a split of the training set.

    recsys-moe evaluate --config configs/demo.toml [--run-id ID] [--split test] [--output FILE]

Loads the model bundle from the run's artifacts (so it works against a remote tracking server as
well), predicts the split, computes per-task metrics, logs them to the run as ``<split>/...`` and
writes them to a JSON file. Where the data set carries an oracle (the synthetic data's true click
probabilities and expected watch times, ``oracle.parquet`` in the store), the same metrics of the
oracle on the same rows are reported beside them as ``bayes_optimal_...``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import polars as pl

from pipelines.atomic import check_output, write_text_atomic
from pipelines.training_set import load_manifest, load_split
from recsys_moe.bundle import Bundle, load_bundle
from recsys_moe.config import Config, TaskConfig
from recsys_moe.evaluation.metrics import task_label_stats, task_metrics
from recsys_moe.evaluation.predict import predict_frame
from recsys_moe.model.objectives import output_name
from recsys_moe.tracking import client_for, latest_train_run

ORACLE = "oracle.parquet"
EVAL_DATA_TAG = "recsys_moe.eval_data"  # + ".test": which rows the test metrics were taken on


def eval_data_id(cfg: Config, split: str, rows: int) -> str:
    """The identity of an evaluation's rows: the training set (its path and build time) and the
    split; two runs' metrics compare only on the same identity (``recsys-moe promote``)."""
    manifest = load_manifest(cfg.dataset_dir)
    return f"{cfg.dataset_dir.resolve()}|{manifest.get('created_at', '')}|{split}|{rows}"


def load_run_bundle(cfg: Config, run_id: str) -> Bundle:
    client_for(cfg)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
    return load_bundle(path)


def oracle_columns(cfg: Config) -> dict[str, str]:
    """Task name → oracle column holding the Bayes-optimal prediction of that task (a masked
    task's: the expectation given its mask, e.g. ``expected_watch_time_s_given_click``)."""
    out = {}
    for t in cfg.tasks:
        if t.kind == "binary":
            out[t.name] = f"p_{t.name}"
        else:
            out[t.name] = f"expected_{t.label}" + (f"_given_{t.mask}" if t.mask else "")
    return out


def evaluate(
    cfg: Config, *, run_id: str | None = None, split: str = "test", output: Path | None = None
) -> dict:
    run_id = run_id or latest_train_run(cfg)
    output = output or cfg.path("eval") / f"{run_id}-{split}.json"
    check_output(output, what="--output", inputs=cfg.protected_paths(),
                 roots={"workdir": Path(cfg.workdir), "current folder": Path.cwd()})  # fmt: skip
    bundle = load_run_bundle(cfg, run_id)
    rows = load_split(cfg.dataset_dir, split).collect()
    if rows.height == 0:
        raise ValueError(f"split {split!r} of {cfg.dataset_dir} is empty; nothing to evaluate")
    preds = predict_frame(
        bundle.model, bundle.features, bundle.mappings, cfg.tasks, rows,
        batch_size=cfg.train.eval_batch_size,
    )  # fmt: skip
    metrics: dict[str, float] = {}
    for t in cfg.tasks:
        label = rows[t.label].to_numpy().astype(np.float64)
        metrics |= task_metrics(
            t, preds[output_name(t)], label,
            label_stats=task_label_stats(t, bundle.manifest), mask=_mask(t, rows),
        )  # fmt: skip
    metrics |= _oracle_metrics(cfg, rows)

    client = client_for(cfg)
    prefix = "test" if split == "test" else f"eval_{split}"  # valid/... is training's own
    for k, v in metrics.items():
        if np.isfinite(v):
            client.log_metric(run_id, f"{prefix}/{k}", v)
    data = eval_data_id(cfg, split, rows.height)
    client.set_tag(run_id, f"{EVAL_DATA_TAG}.{prefix}", data)
    report = {"run_id": run_id, "split": split, "rows": rows.height, "data": data,
              "metrics": metrics}  # fmt: skip
    write_text_atomic(output, json.dumps(report, indent=2))
    client.log_artifact(run_id, str(output), artifact_path="eval")
    report["output"] = str(output)
    return report


def _oracle_metrics(cfg: Config, rows: pl.DataFrame) -> dict[str, float]:
    path = cfg.store_dir / ORACLE
    keys = list(cfg.feature_set().events.keys)
    if not path.is_file() or not keys:
        return {}
    cols = oracle_columns(cfg)
    if not set(keys + list(cols.values())) <= set(pl.read_parquet_schema(path)):
        return {}  # an oracle of another data set, or without this task's expectation
    oracle = pl.read_parquet(path, columns=keys + list(cols.values()))
    columns = list(dict.fromkeys(c for t in cfg.tasks for c in (t.label, t.mask) if c))
    joined = rows.select(keys + columns).join(oracle, on=keys, how="left", maintain_order="left")
    out: dict[str, float] = {}
    for t in cfg.tasks:
        pred = joined[cols[t.name]]
        if pred.null_count():
            return {}  # the oracle does not cover these rows (another data set)
        label = joined[t.label].to_numpy().astype(np.float64)
        m = task_metrics(t, pred.to_numpy(), label, mask=_mask(t, joined))
        out |= {f"bayes_optimal_{k}": v for k, v in m.items()}
    return out


def _mask(task: TaskConfig, rows: pl.DataFrame) -> np.ndarray | None:
    return rows[task.mask].to_numpy() if task.mask else None
