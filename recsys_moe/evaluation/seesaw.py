"""The multi-task check (the seesaw): does the multi-task model gain on every task over its
single-task baselines, or does it buy one task with another?

When the evaluated run is a child of a sweep (``recsys-moe sweep``, tag ``mlflow.parentRunId``)
whose runs include ``model.mixture = single_task`` (one bottom per task: each task trained as its
own model), each task's gate metric (``tasks.<name>.gate``) of the run is compared with the mean
over those baselines of the same seed (``train.seed``; all of them if none has it). Both sides
are the training's own validation metrics (``valid/...``): the one split every run of a sweep
has. A gain is "better is positive": higher AUC, lower RMSE.
"""

from __future__ import annotations

import statistics

from mlflow import MlflowClient
from mlflow.entities import Run

from recsys_moe.config import TaskConfig, higher_is_better

PARENT_TAG = "mlflow.parentRunId"
SINGLE_TASK = "single_task"


def seesaw(client: MlflowClient, run: Run, tasks: list[TaskConfig]) -> dict[str, float]:
    """``<task>_<gate>_gain`` per task and ``baselines`` (how many runs were averaged), or
    ``{}`` when the run is no sweep child, is a single-task run itself, or has no baseline."""
    parent = run.data.tags.get(PARENT_TAG)
    if not parent or run.data.params.get("model.mixture") == SINGLE_TASK:
        return {}
    siblings = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and params.`model.mixture` = "
        f"'{SINGLE_TASK}' and attributes.status = 'FINISHED'",
    )  # fmt: skip
    seed = run.data.params.get("train.seed")
    base = [r for r in siblings if r.data.params.get("train.seed") == seed] or siblings
    out: dict[str, float] = {}
    for t in tasks:
        key = f"valid/{t.name}_{t.gate}"
        theirs = [r.data.metrics[key] for r in base if key in r.data.metrics]
        if key not in run.data.metrics or not theirs:
            continue
        diff = run.data.metrics[key] - statistics.fmean(theirs)
        out[f"{t.name}_{t.gate}_gain"] = diff if higher_is_better(t.gate) else -diff
    if out:
        out["baselines"] = float(len(base))
    return out
