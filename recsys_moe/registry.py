"""Registering a training run's model in the MLflow model registry, and promoting it.

    recsys-moe register --config configs/demo.toml [--run-id ID]
    recsys-moe promote --config configs/demo.toml --model NAME --version V [--alias champion]

``register`` refuses a run that has not been evaluated (``recsys-moe evaluate``, whose
evaluation run, a child of the training run, holds the test metrics promotion compares). It
saves an MLflow pyfunc (models from code: the pyfunc's source file, the model bundle as
artifact, this project's packages as code paths) with a signature generated from the feature
definitions, uploads it as an MLflow 3 logged model of the training run (the run is not
reopened) with the evaluation run's test metrics as its metrics (numbers, logged on the
evaluation run with the evaluated dataset: the version page shows them), and creates a version
of ``mlflow.registered_model`` from it. The version gets the alias ``champion`` when the model
has none yet, else ``challenger``; tags with the sha256 of the training set's manifest and of
the model's config, the identity of the evaluated data and the evaluation run's id, the test
metrics (also as tags, to search by), and a description of all these.

``promote`` moves an alias (``champion``) to a version only when every task's gate metric
(``tasks.<name>.gate``, ``gate_tolerance``) is no worse than the current holder's, measured on
the same evaluation data (each version's evaluation run, as recorded at registration);
otherwise it names each failing task with both numbers and leaves the alias where it is.

On a local SQLite store, registry writes hold a file lock (``<store>.registry.lock``): concurrent
``register`` processes get unique, gapless versions instead of "database is locked" errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata as md
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Run
from mlflow.entities.model_registry import ModelVersion

from feature_store.signature import model_signature
from pipelines.training_set import load_split
from recsys_moe.config import Config, higher_is_better
from recsys_moe.evaluation.evaluate import EVAL_DATA_TAG, evaluation_run
from recsys_moe.evaluation.report import is_count
from recsys_moe.model.objectives import output_name
from recsys_moe.tracking import client_for, latest_train_run

PACKAGES = ("recsys_moe", "pipelines", "feature_store", "serving")
DATA_HASH_TAG = "recsys_moe.data_sha256"  # of the training set's manifest.json
CONFIG_HASH_TAG = "recsys_moe.config_sha256"  # of the model bundle's config.json
EVAL_RUN_TAG = "recsys_moe.eval_run"  # on a version: the evaluation run of its metrics
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


# What the pyfunc's environment installs (its requirements.txt) for a CPU machine. torchrec is
# not among them: its wheel requires the CUDA ``fbgemm-gpu`` (Requires-Dist: fbgemm-gpu), which
# pip would install over ``fbgemm-gpu-cpu`` (one import name, fbgemm_gpu) and which a
# requirements file cannot leave out (no per-line --no-deps). torchrec is pure Python
# (py311-none-any), so the model carries it as code (``torchrec_code``) and the file lists its
# runtime dependencies and the CPU fbgemm instead. torch comes from PyTorch's CPU index (PyPI's
# Linux torch is the CUDA build, GBs of nvidia-* wheels); ``2.13.0+cpu`` satisfies ``==2.13.0``.
RUNTIME = ("torch", "fbgemm-gpu-cpu", "tensordict", "torchmetrics", "tqdm", "pyre-extensions",
           "numpy", "polars", "pyarrow", "pandas", "mlflow")  # fmt: skip
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _requirements() -> list[str]:
    """Pins of the installed versions, without local labels (``2.13.0+cpu`` is no public
    version), after the CPU index of torch."""
    out = [f"--extra-index-url {TORCH_CPU_INDEX}"]
    for dist in RUNTIME:
        try:
            out.append(f"{dist}=={md.version(dist).split('+')[0]}")
        except md.PackageNotFoundError:
            continue
    return out


def torchrec_code(into: Path) -> list[str]:
    """Copies of the installed torchrec package and its metadata (version, licence) under
    ``into``, as the pyfunc's code paths: the model imports this torchrec, whatever is installed
    where it loads (module comment above ``RUNTIME``)."""
    import shutil

    import torchrec

    package = Path(torchrec.__file__).parent
    dist = md.distribution("torchrec")
    info = Path(str(dist.locate_file(""))) / f"torchrec-{dist.version}.dist-info"
    out = []
    for src in (package, info):
        dst = into / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.append(str(dst))
    return out


@contextlib.contextmanager
def registry_lock(cfg: Config) -> Iterator[None]:
    """An exclusive file lock beside a local SQLite store (nothing for a tracking server, which
    serialises its own writes)."""
    uri = cfg.tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri.removeprefix("sqlite:///")).with_suffix(".registry.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def evaluated_metrics(run: Run) -> dict[str, float]:
    """An evaluation run's ``test/...`` metrics (``recsys-moe evaluate``), without the prefix."""
    metrics = run.data.metrics
    return {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluation's metrics of all rows: not by segment, not the intervals, not the oracle's."""
    return {
        k: v for k, v in metrics.items()
        if "/" not in k and not k.endswith(("_ci_low", "_ci_high"))
        and not k.startswith("bayes_optimal_")
    }  # fmt: skip


def evaluated_dataset(run: Run) -> tuple[str | None, str | None]:
    """Name and digest of an evaluation run's dataset input of context ``evaluation`` on the test
    split (``evaluation.evaluate.log_dataset``), else ``(None, None)``."""
    for i in reversed(run.inputs.dataset_inputs if run.inputs else []):
        tags = {t.key: t.value for t in i.tags}
        if tags.get("mlflow.data.context") == "evaluation" and tags.get("split") == "test":
            return i.dataset.name, i.dataset.digest
    return None, None


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes ("" if it is missing)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def register(cfg: Config, *, python_model: str, run_id: str | None = None) -> Registered:
    """Register the run's model (``python_model``: path of the pyfunc's code file)."""
    client = client_for(cfg)
    run_id = run_id or latest_train_run(cfg)
    run = client.get_run(run_id)
    evaluation = evaluation_run(client, run_id)
    evaluated = evaluated_metrics(evaluation) if evaluation is not None else {}
    if not evaluated:
        raise ValueError(
            f"run {run_id} has not been evaluated (no evaluation run with test/... metrics): "
            f"promotion compares them; run `recsys-moe evaluate --run-id {run_id}` first"
        )
    bundle_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model")
    features = cfg.feature_set()
    example = load_split(cfg.dataset_dir, "train").select(features.input_columns).head(3).collect()
    schema = dict(example.schema)
    signature = model_signature(features, schema, [output_name(t) for t in cfg.tasks])
    root = Path(__file__).resolve().parents[1]
    name = cfg.mlflow.registered_model
    headline = headline_metrics(evaluated)
    tags = {
        EVAL_DATA_TAG: evaluation.data.tags.get(EVAL_DATA_TAG, ""),
        EVAL_RUN_TAG: evaluation.info.run_id,
        DATA_HASH_TAG: file_hash(cfg.dataset_dir / "manifest.json"),
        CONFIG_HASH_TAG: file_hash(Path(bundle_dir) / "config.json"),
    }
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(headline.items()) if not is_count(k))
    description = (
        f"Trained by run {run_id} (experiment {cfg.mlflow.experiment}); training set "
        f"{run.data.tags.get('recsys_moe.dataset', '?')} (manifest sha256 "
        f"{tags[DATA_HASH_TAG][:12]}), config sha256 {tags[CONFIG_HASH_TAG][:12]}; tasks "
        f"{', '.join(t.name for t in cfg.tasks)}; test metrics (evaluation run "
        f"{evaluation.info.run_id}): {shown}"
    )
    # The pyfunc is saved locally and uploaded as a logged model of the training run, then
    # registered from it: the run is never reopened (reopening set it RUNNING for a moment, and
    # concurrent jobs looking for "the latest finished run" picked an older one meanwhile).
    with tempfile.TemporaryDirectory(prefix="recsys-moe-pyfunc-") as tmp:
        local = Path(tmp) / "pyfunc"
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=python_model,
            artifacts={"bundle": bundle_dir},
            code_paths=[str(root / p) for p in PACKAGES] + torchrec_code(Path(tmp) / "vendor"),
            signature=signature,
            input_example=example.to_pandas(),
            pip_requirements=_requirements(),
        )
        with registry_lock(cfg):  # every store write of this job
            model_id = _logged_model(client, run, evaluation, name, tags, local, headline)
            version, alias = _new_version(client, name, model_id, run_id, tags, description)
            for k, v in headline.items():  # also as tags, for searching versions by a metric
                client.set_model_version_tag(name, version, f"test/{k}", f"{v:.6g}")
    return Registered(name=name, version=version, alias=alias, run_id=run_id)


def _logged_model(
    client: mlflow.MlflowClient,
    run: Run,
    evaluation: Run,
    name: str,
    tags: dict[str, str],
    local: Path,
    metrics: dict[str, float],
) -> str:
    """An MLflow 3 logged model of ``run`` holding the pyfunc at ``local``, with ``metrics`` as
    its metrics (numbers, logged on the ``evaluation`` run that measured them, with the
    evaluated dataset's name and digest; on the training run they would come first on its
    page): its id."""
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run.info.run_id, tags=tags,
        model_type="pyfunc",
    )  # fmt: skip
    client.log_model_artifacts(logged.model_id, str(local))
    now = int(time.time() * 1000)
    data = evaluated_dataset(evaluation)  # the rows they were taken on (its dataset input)
    client.log_batch(evaluation.info.run_id, metrics=[
        Metric(f"test/{k}", v, now, 0, model_id=logged.model_id, dataset_name=data[0],
               dataset_digest=data[1])
        for k, v in metrics.items() if math.isfinite(v)
    ])  # fmt: skip
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def _new_version(
    client: mlflow.MlflowClient,
    name: str,
    model_id: str,
    run_id: str,
    tags: dict[str, str],
    description: str,
) -> tuple[str, str]:
    """A new version of registered model ``name`` (created if needed) from the logged model, and
    its alias: ``champion`` for the first, else ``challenger``."""
    try:
        client.create_registered_model(
            name, description="Multi-task ranking model (recsys-moe): MMoE over a TorchRec "
            "embedding tower; input: the feature definitions' raw columns; output: one "
            "column per task in natural units.",
        )  # fmt: skip
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=tags, description=description,
        model_id=model_id,
    ).version  # fmt: skip
    alias = CHALLENGER if CHAMPION in client.get_registered_model(name).aliases else CHAMPION
    client.set_registered_model_alias(name, alias, str(version))
    return str(version), alias


def _version_evaluation(client: mlflow.MlflowClient, version: ModelVersion) -> Run | None:
    """The evaluation run a version was registered with (its tag), else its training run's
    newest evaluation on the test split."""
    recorded = version.tags.get(EVAL_RUN_TAG)
    if recorded:
        return client.get_run(recorded)
    return evaluation_run(client, version.run_id) if version.run_id else None


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    previous: str | None  # the version that held the alias, if any
    compared: dict[str, tuple[float, float]]  # gate metric -> (candidate, holder)


def promote(cfg: Config, *, name: str, version: str, alias: str = CHAMPION) -> Promotion:
    """Give ``alias`` to ``version`` if it passes every task's gate against the alias's holder
    (module docstring); a ``ValueError`` naming each failing task otherwise."""
    client = client_for(cfg)
    try:
        candidate = client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"model {name!r} has no version {version}") from None
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        holder = None
    compared: dict[str, tuple[float, float]] = {}
    if holder is not None and holder.version != candidate.version:
        runs = [_version_evaluation(client, v) for v in (candidate, holder)]
        mine, theirs = (evaluated_metrics(r) if r else {} for r in runs)
        data = [r.data.tags.get(EVAL_DATA_TAG, "") if r else "" for r in runs]
        if not data[0] or data[0] != data[1]:
            raise ValueError(
                f"version {version} and @{alias} (version {holder.version}) were not evaluated "
                f"on the same data ({data[0] or 'none'} vs {data[1] or 'none'}); evaluate both "
                "runs on one training set (`recsys-moe evaluate --run-id ...`) and promote again"
            )
        failed = []
        for t in cfg.tasks:
            key = f"{t.name}_{t.gate}"
            if key not in mine or key not in theirs:
                raise ValueError(f"test/{key} is missing on version {version} or {holder.version}")
            a, b = mine[key], theirs[key]
            compared[key] = (a, b)
            better_up = higher_is_better(t.gate)
            worse = a < b - t.gate_tolerance if better_up else a > b + t.gate_tolerance
            if worse:
                side = "below" if better_up else "above"
                failed.append(
                    f"{t.name}: {key} {a:.6g} is {side} @{alias}'s {b:.6g} by more than the "
                    f"tolerance {t.gate_tolerance:g}"
                )
        if failed:
            raise ValueError(
                f"not promoting {name} version {version} to @{alias} (held by version "
                f"{holder.version}): " + "; ".join(failed)
            )
    with registry_lock(cfg):
        client.set_registered_model_alias(name, alias, candidate.version)
    return Promotion(name, str(candidate.version), alias,
                     None if holder is None else str(holder.version), compared)  # fmt: skip
