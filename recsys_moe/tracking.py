"""MLflow set-up shared by the jobs: tracking URI, experiment with artifacts under the workdir.

With the embedded default (a SQLite file), artifacts go to ``<workdir>/mlartifacts`` rather than
MLflow's ``./mlruns`` in whatever directory the job was started from.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.atomic import process_alive
from recsys_moe.config import Config

log = logging.getLogger(__name__)

TRAIN_JOB_TAG = "recsys_moe.job"


HOST_TAG, PID_TAG = "recsys_moe.host", "recsys_moe.pid"  # which process a RUNNING run belongs to


def client_for(cfg: Config) -> MlflowClient:
    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        create_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    use_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def use_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect on the environment: it also sets
    ``MLFLOW_TRACKING_URI``, which the next config of this process (a test, a sweep's setting)
    and every subprocess would then take for the user's own choice of store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def create_sqlite_store(path: Path) -> None:
    """A new SQLite tracking store at ``path``, created whole or not at all: MLflow creates and
    migrates it under a temporary name, which is then renamed into place. (Created in place, a
    kill during the migration left a half-migrated file on which every later job failed with
    ``duplicate column name``.)"""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{path.name}.tmp-*"):  # a killed creator's
        pid = left.name.removeprefix(f".{path.name}.tmp-").split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            left.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        if not path.exists():  # another job may have created it meanwhile: keep theirs
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_owner_tags() -> dict[str, str]:
    """Tags that say which process runs a run (``end_stale_runs``)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def end_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose process is gone (tagged with this
    host and a process id that no longer exists): a job killed before it could end its run.
    Their ids."""
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
            continue
        if process_alive(int(tags[PID_TAG])):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    if ended:
        log.warning("marked KILLED %d run(s) whose process is gone: %s", len(ended), ended)
    return ended


def ensure_experiment(cfg: Config) -> str:
    """Id of the config's experiment, created on first use (local artifacts under the workdir)."""
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        end_stale_runs(client, exp.experiment_id)
        return exp.experiment_id
    location = None
    if cfg.tracking_uri().startswith("sqlite:"):
        location = cfg.path("mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=location)


def latest_train_run(cfg: Config) -> str:
    """Run id of the newest finished training run of the config's experiment."""
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        end_stale_runs(client, exp.experiment_id)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TRAIN_JOB_TAG}` = 'train' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if exp
        else []
    )
    if not runs:
        raise ValueError(
            f"no finished training run in experiment {cfg.mlflow.experiment!r} at "
            f"{cfg.tracking_uri()}; run `recsys-moe train --config ...` first or pass --run-id"
        )
    return runs[0].info.run_id
