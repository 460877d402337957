"""Offline evaluation of a training run's model on a split of the training set.

    recsys-moe evaluate --config configs/demo.toml [--run-id ID] [--split test] [--output FILE]
                        [--predictions FILE.parquet]

Loads the model bundle from the run's artifacts (so it works against a remote tracking server as
well), predicts the split (and the gates of the same forward passes), builds the predictions frame
(keys, labels, every task's prediction, the combined ``score``, segment columns), and from that
frame alone the report (``report.build_report``: metrics per task, GAUC, ranking metrics per
request, metrics by segment, bootstrap intervals). Logged to the run: every number as a metric
(``<split>/<metric>``, ``…_ci_low`` / ``…_ci_high``, ``<split>/by_<column>/<value>/<metric>``;
for a sweep's run, ``seesaw/<task>_<gate>_gain`` over its single-task baselines), and
``eval/<split>/report.md`` with its plots (reliability, ROC, precision-recall, metrics by segment,
expert usage). Written locally: the JSON report (``--output``), the report folder beside it, and
with ``--predictions`` the frame as Parquet, from which every number can be recomputed. Where the
data set carries an oracle (the synthetic data's true click probabilities and expected watch
times, ``oracle.parquet`` in the store), the same metrics of the oracle on the same rows are
reported beside them as ``bayes_optimal_...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
from mlflow.entities import Metric

from pipelines.atomic import check_output, replacing_dir, write_text_atomic
from pipelines.training_set import load_manifest, load_split
from recsys_moe.bundle import Bundle, load_bundle
from recsys_moe.config import Config, TaskConfig, label_columns
from recsys_moe.data import map_to_tensors
from recsys_moe.evaluation.gates import expert_heatmaps
from recsys_moe.evaluation.metrics import task_metrics
from recsys_moe.evaluation.predict import predict_with_gates
from recsys_moe.evaluation.ranking import combined_score
from recsys_moe.evaluation.report import (
    SCORE,
    EvalReport,
    build_report,
    markdown,
    pred_column,
    write_plots,
)
from recsys_moe.evaluation.seesaw import seesaw
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


def prediction_frame(cfg: Config, rows: pl.DataFrame, preds: dict[str, np.ndarray]) -> pl.DataFrame:
    """The evaluated rows as the report reads them: the events' keys and time, labels and masks,
    the eval columns (request, relevance, GAUC groups, segments) the rows have, every task's
    prediction (``pred_<task>``) and the combined ``score`` of ``[score] weights``."""
    events = cfg.feature_set().events
    ev = cfg.eval
    wanted = [*events.keys, events.time, *label_columns(cfg.tasks), ev.request, ev.relevance,
              ev.graded_relevance, *ev.gauc_by, *ev.segments]  # fmt: skip
    keep = [c for c in dict.fromkeys(wanted) if c and c in rows.columns]
    score = combined_score(cfg.tasks, cfg.score.weights, preds)
    return rows.select(keep).with_columns(
        *(pl.Series(pred_column(t), preds[output_name(t)], dtype=pl.Float64) for t in cfg.tasks),
        pl.Series(SCORE, score, dtype=pl.Float64),
    )


def evaluate(
    cfg: Config,
    *,
    run_id: str | None = None,
    split: str = "test",
    output: Path | None = None,
    predictions: Path | None = None,
) -> dict:
    run_id = run_id or latest_train_run(cfg)
    output = Path(output or cfg.path("eval") / f"{run_id}-{split}.json")
    report_dir = output.parent / f"{output.stem}-report"
    roots = {"workdir": Path(cfg.workdir), "current folder": Path.cwd()}
    for path, what in ((output, "--output"), (report_dir, "the report folder"),
                       (predictions, "--predictions")):  # fmt: skip
        if path is not None:
            check_output(path, what=what, inputs=cfg.protected_paths(), roots=roots)
    mine = (output.resolve(), report_dir.resolve())
    if predictions is not None and Path(predictions).resolve() in mine:
        raise ValueError(f"--predictions {predictions}: the same path as the JSON report")
    bundle = load_run_bundle(cfg, run_id)
    rows = load_split(cfg.dataset_dir, split).collect()
    if rows.height == 0:
        raise ValueError(f"split {split!r} of {cfg.dataset_dir} is empty; nothing to evaluate")
    tensors = map_to_tensors(rows, bundle.features, bundle.mappings)
    preds, gates = predict_with_gates(
        bundle.model, tensors, cfg.tasks, batch_size=cfg.train.eval_batch_size
    )
    frame = prediction_frame(cfg, rows, preds)
    report = build_report(frame, cfg.tasks, cfg.eval, bundle.manifest)
    oracle = _oracle_metrics(cfg, rows)
    metrics = report.metrics | oracle

    client = client_for(cfg)
    prefix = "test" if split == "test" else f"eval_{split}"  # valid/... is training's own
    log_dataset(client, run_id, cfg, split)
    _log_metrics(client, run_id, prefix, report, oracle)
    gains = seesaw(client, client.get_run(run_id), cfg.tasks)  # validation, vs single-task runs
    if gains:
        client.log_batch(run_id, metrics=[
            Metric(f"seesaw/{k}", v, int(time.time() * 1000), 0) for k, v in gains.items()
        ])  # fmt: skip
    data = eval_data_id(cfg, split, rows.height)
    client.set_tag(run_id, f"{EVAL_DATA_TAG}.{prefix}", data)
    with replacing_dir(report_dir) as tmp:
        images = write_plots(frame, cfg.tasks, report, tmp)
        names = [t.name for t in cfg.tasks]
        images += expert_heatmaps(gates, rows, cfg.train.heatmap_by, names, tmp, split=split)
        title = f"Evaluation of run {run_id} on the {split} split"
        (tmp / "report.md").write_text(markdown(report, cfg.tasks, title=title, images=images,
                                                extra=oracle, seesaw=gains))  # fmt: skip
    client.log_artifacts(run_id, str(report_dir), artifact_path=f"eval/{split}")
    if predictions is not None:
        _write_parquet_atomic(frame, Path(predictions))
    result = {
        "run_id": run_id, "split": split, "rows": rows.height, "data": data, "metrics": metrics,
        "ci": {k: list(v) for k, v in report.ci.items()}, "segments": report.segments,
        "notes": report.notes, "seesaw": gains, "report": str(report_dir / "report.md"),
        "predictions": str(predictions) if predictions is not None else None,
    }  # fmt: skip
    write_text_atomic(output, json.dumps(result, indent=2))
    client.log_artifact(run_id, str(output), artifact_path="eval")
    result["output"] = str(output)
    return result


def _metric_key(text: str) -> str:
    """A segment value as part of an MLflow metric key: letters, digits, `_`, `-`, `.`, spaces."""
    return re.sub(r"[^\w.\- ]", "_", text) or "_"


def log_dataset(client: mlflow.MlflowClient, run_id: str, cfg: Config, split: str) -> None:
    """The evaluated split as a dataset input of the run (context ``evaluation``; training logs
    its train and valid splits, ``tracking.log_datasets``, with the same name and digest scheme:
    source the split's Parquet, digest that of the training set's manifest, new with every
    build); ``register`` attaches it to the metrics of the logged model."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    manifest = load_manifest(cfg.dataset_dir)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    path = (cfg.dataset_dir / f"{split}.parquet").resolve()
    with warnings.catch_warnings():  # a local path resolves to two equal source kinds
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(path))
    name = f"{cfg.dataset_dir.name}/{split}"
    dataset = MetaDataset(source, name=name, digest=digest)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation"), InputTag("split", split),
            InputTag("rows", str(manifest.get("rows", {}).get(split, "")))]  # fmt: skip
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])


def _log_metrics(
    client: mlflow.MlflowClient,
    run_id: str,
    prefix: str,
    report: EvalReport,
    oracle: dict,
) -> None:
    now = int(time.time() * 1000)
    values = {f"{prefix}/{k}": v for k, v in (report.metrics | oracle).items()}
    for k, (lo, hi) in report.ci.items():
        values |= {f"{prefix}/{k}_ci_low": lo, f"{prefix}/{k}_ci_high": hi}
    for col, seg in report.segments.items():
        for value, m in seg.items():
            values |= {f"{prefix}/by_{col}/{_metric_key(value)}/{k}": v for k, v in m.items()}
    batch = [Metric(k, float(v), now, 0) for k, v in values.items() if np.isfinite(v)]
    for lo in range(0, len(batch), 1000):  # MLflow's limit per call
        client.log_batch(run_id, metrics=batch[lo : lo + 1000])


def _write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
