"""Registering a training run's model in the MLflow model registry.

    recsys-moe register --config configs/demo.toml [--run-id ID]

Logs an MLflow pyfunc (models from code: the pyfunc's source file, the model bundle as artifact,
this project's packages as code paths) into the training run, with a signature generated from the
feature definitions, as a new version of ``mlflow.registered_model``. The version gets the alias
``champion`` when the model has none yet, else ``challenger``; its test metrics (from
``recsys-moe evaluate``) are copied onto the version as tags.
"""

from __future__ import annotations

import importlib.metadata as md
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow

from feature_store.signature import model_signature
from pipelines.training_set import load_split
from recsys_moe.config import Config
from recsys_moe.model.objectives import output_name
from recsys_moe.tracking import client_for, latest_train_run

PACKAGES = ("recsys_moe", "pipelines", "feature_store", "serving")
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Registered:
    name: str
    version: str
    alias: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def _requirements() -> list[str]:
    out = []
    for dist in ("torch", "fbgemm-gpu-cpu", "fbgemm-gpu", "torchrec", "tensordict", "numpy",
                 "polars", "pyarrow", "pandas", "mlflow"):  # fmt: skip
        try:
            out.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            continue
    return out


def register(cfg: Config, *, python_model: str, run_id: str | None = None) -> Registered:
    """Register the run's model (``python_model``: path of the pyfunc's code file)."""
    client = client_for(cfg)
    run_id = run_id or latest_train_run(cfg)
    bundle_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
    features = cfg.feature_set()
    example = load_split(cfg.dataset_dir, "train").select(features.input_columns).head(3).collect()
    schema = dict(example.schema)
    signature = model_signature(features, schema, [output_name(t) for t in cfg.tasks])
    root = Path(__file__).resolve().parents[1]
    name = cfg.mlflow.registered_model
    # The pyfunc is saved locally and uploaded into the run's artifacts, then registered from
    # there: the training run is never reopened (reopening set it RUNNING for a moment, and
    # concurrent jobs looking for "the latest finished run" picked an older one meanwhile).
    artifact_path = f"pyfunc/{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="recsys-moe-pyfunc-") as tmp:
        local = Path(tmp) / "pyfunc"
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=python_model,
            artifacts={"bundle": bundle_dir},
            code_paths=[str(root / p) for p in PACKAGES],
            signature=signature,
            input_example=example.to_pandas(),
            pip_requirements=_requirements(),
        )
        client.log_artifacts(run_id, str(local), artifact_path=artifact_path)
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = str(client.create_model_version(name, source=source, run_id=run_id).version)
    aliases = client.get_registered_model(name).aliases
    alias = CHALLENGER if CHAMPION in aliases else CHAMPION
    client.set_registered_model_alias(name, alias, version)
    metrics = client.get_run(run_id).data.metrics
    for k, v in metrics.items():
        if k.startswith("test/"):
            client.set_model_version_tag(name, version, k, f"{v:.6g}")
    return Registered(name=name, version=version, alias=alias, run_id=run_id)
