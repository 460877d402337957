"""Offline evaluation of a training run's model on a split of the training set.

    recsys-moe evaluate --config configs/demo.toml [--run-id ID] [--split test] [--output FILE]
                        [--predictions FILE.parquet]

Loads the model bundle from the run's artifacts (so it works against a remote tracking server as
well), predicts the split (and the gates of the same forward passes), builds the predictions frame
(keys, labels, every task's prediction, the combined ``score``, segment columns), and from that
frame alone the report (``report.build_report``: metrics per task, GAUC, ranking metrics per
request, metrics by segment, bootstrap intervals, also per segment).

Logged as an **evaluation run**: a child run of the training run (``mlflow.parentRunId``; tag
``recsys_moe.job = evaluate``, named ``eval-<split>-<training run name>``), so the training
run's page keeps its own charts first (``train/``, ``valid/``; MLflow sorts chart sections by
name, and ``test/`` would come first). The evaluation run holds the headline metrics of all
rows (``<split>/<metric>``, ``test/...`` for the test split: what ``register`` and ``promote``
read; for a sweep's run also ``seesaw/<task>_<gate>_gain`` over its single-task baselines), the
evaluated split as its dataset input, the tag naming the evaluated data, and as artifacts every
number per segment and every interval (``metrics_table.json``, an MLflow table: column, value,
metric, estimate, ci_low, ci_high, rows), ``report.md`` with its plots (reliability, ROC,
precision-recall, metrics by segment, expert usage) and the JSON report. The training run gets
the tag ``recsys_moe.evaluation.<split key>`` = the evaluation run's id. Written locally: the
JSON report (``--output``), the report folder beside it, and with ``--predictions`` the frame as
Parquet, from which every number can be recomputed. Where the
data set carries an oracle (the synthetic data's true click probabilities and expected watch
times, ``oracle.parquet`` in the store), the same metrics of the oracle on the same rows are
reported beside them as ``bayes_optimal_...``.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
from mlflow.entities import Metric, Run

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
    build_report,
    markdown,
    metrics_table,
    pred_column,
    write_plots,
)
from recsys_moe.evaluation.seesaw import seesaw
from recsys_moe.model.objectives import output_name
from recsys_moe.tracking import (
    NOTE_TAG,
    TRAIN_JOB_TAG,
    client_for,
    latest_train_run,
    run_owner_tags,
    split_dataset,
)

ORACLE = "oracle.parquet"
EVAL_DATA_TAG = "recsys_moe.eval_data"  # on an evaluation run: which rows its metrics are of
EVAL_JOB = "evaluate"  # TRAIN_JOB_TAG's value on an evaluation run
SPLIT_TAG = "recsys_moe.split"  # the evaluated split's metric prefix (``test``, ``eval_valid``)
EVAL_RUN_TAG = "recsys_moe.evaluation"  # + ".<prefix>" on the training run: its evaluation run
TABLE = "metrics_table.json"  # the evaluation run's table of every number


def metric_prefix(split: str) -> str:
    """The key prefix of a split's metrics: ``test/...``, else ``eval_<split>/...`` (``valid/``
    is the training's own validation)."""
    return "test" if split == "test" else f"eval_{split}"


def evaluation_run(client: mlflow.MlflowClient, run_id: str, split: str = "test") -> Run | None:
    """The newest finished evaluation run of training run ``run_id`` on ``split``, else None."""
    exp = client.get_run(run_id).info.experiment_id
    runs = client.search_runs(
        [exp],
        filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`{TRAIN_JOB_TAG}` = "
        f"'{EVAL_JOB}' and tags.`{SPLIT_TAG}` = '{metric_prefix(split)}' and "
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )  # fmt: skip
    return runs[0] if runs else None


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
    train_run = client.get_run(run_id)
    gains = seesaw(client, train_run, cfg.tasks)  # validation, vs single-task runs
    data = eval_data_id(cfg, split, rows.height)
    prefix = metric_prefix(split)
    with replacing_dir(report_dir) as tmp:
        images = write_plots(frame, cfg.tasks, report, tmp)
        names = [t.name for t in cfg.tasks]
        images += expert_heatmaps(gates, rows, cfg.train.heatmap_by, names, tmp, split=split)
        title = f"Evaluation of run {run_id} on the {split} split"
        (tmp / "report.md").write_text(markdown(report, cfg.tasks, title=title, images=images,
                                                extra=oracle, seesaw=gains))  # fmt: skip
    if predictions is not None:
        _write_parquet_atomic(frame, Path(predictions))
    result = {
        "run_id": run_id, "split": split, "rows": rows.height, "data": data, "metrics": metrics,
        "ci": {k: list(v) for k, v in report.ci.items()}, "segments": report.segments,
        "segment_ci": {c: {v: {k: list(iv) for k, iv in ci.items()} for v, ci in seg.items()}
                       for c, seg in report.segment_ci.items()},
        "notes": report.notes, "seesaw": gains, "report": str(report_dir / "report.md"),
        "predictions": str(predictions) if predictions is not None else None,
    }  # fmt: skip
    name = f"eval-{split}-{train_run.info.run_name or run_id}"
    note = (
        f"`recsys-moe evaluate` of training run `{train_run.info.run_name}` ({run_id}) on the "
        f"{split} split, {rows.height:,} rows ({data}).\n\nMetrics: `{prefix}/<metric>` of all "
        f"rows; by segment and with {cfg.eval.ci:.0%} bootstrap intervals in the table `{TABLE}`; "
        "the report with its plots is `report.md`."
    )
    tags = {"mlflow.parentRunId": run_id, TRAIN_JOB_TAG: EVAL_JOB, SPLIT_TAG: prefix,
            EVAL_DATA_TAG: data, NOTE_TAG: note, **run_owner_tags()}  # fmt: skip
    child = client.create_run(train_run.info.experiment_id, run_name=name, tags=tags)
    eval_id = child.info.run_id
    try:
        log_dataset(client, eval_id, cfg, split)
        now = int(time.time() * 1000)
        values = {f"{prefix}/{k}": v for k, v in metrics.items()}
        values |= {f"seesaw/{k}": v for k, v in gains.items()}
        batch = [Metric(k, float(v), now, 0) for k, v in values.items() if np.isfinite(v)]
        for lo in range(0, len(batch), 1000):  # MLflow's limit per call
            client.log_batch(eval_id, metrics=batch[lo : lo + 1000])
        client.log_table(eval_id, metrics_table(report).to_pandas(), TABLE)
        client.log_artifacts(eval_id, str(report_dir))
        result["evaluation_run_id"] = eval_id
        write_text_atomic(output, json.dumps(result, indent=2))
        client.log_artifact(eval_id, str(output))
        client.set_tag(run_id, f"{EVAL_RUN_TAG}.{prefix}", eval_id)
    except BaseException:
        client.set_terminated(eval_id, "FAILED")
        raise
    client.set_terminated(eval_id, "FINISHED")
    result["output"] = str(output)
    return result


def log_dataset(client: mlflow.MlflowClient, run_id: str, cfg: Config, split: str) -> None:
    """The evaluated split as a dataset input of the run (context ``evaluation``; the name and
    digest of training's, ``tracking.split_dataset``); ``register`` attaches it to the metrics
    of the logged model."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset, tags = split_dataset(cfg, split)
    inputs = [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")]
    inputs += [InputTag(k, v) for k, v in tags.items()]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), inputs)])


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
