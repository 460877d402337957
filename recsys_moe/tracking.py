"""MLflow set-up shared by the jobs: tracking URI, experiment with artifacts under the workdir.

With the embedded default (a SQLite file), artifacts go to ``<workdir>/mlartifacts`` rather than
MLflow's ``./mlruns`` in whatever directory the job was started from.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from recsys_moe.config import Config

TRAIN_JOB_TAG = "recsys_moe.job"


def client_for(cfg: Config) -> MlflowClient:
    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(cfg: Config) -> str:
    """Id of the config's experiment, created on first use (local artifacts under the workdir)."""
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if cfg.tracking_uri().startswith("sqlite:"):
        location = cfg.path("mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=location)


def latest_train_run(cfg: Config) -> str:
    """Run id of the newest finished training run of the config's experiment."""
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
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
