"""MLflow set-up shared by the jobs: tracking URI, experiment with artifacts under the workdir.

With the embedded default (a SQLite file), artifacts go to ``<workdir>/mlartifacts`` rather than
MLflow's ``./mlruns`` in whatever directory the job was started from.

What a person sees in the MLflow UI: the experiment is tagged as a model-training experiment
(``mlflow.experimentKind``, read by earlier MLflow 3 UIs; 3.17's opens every experiment on its
GenAI overview unless its sidebar switch or the link says otherwise: ``ui_link``) and
described (``mlflow.note.content``); a training run is named after what ran
(``run_name``: mixture, widths, epochs, seed), described (``run_description``) and has its
training set's splits as MLflow datasets (``log_datasets``). ``user_error`` turns MLflow's
"not found" errors (run ids, experiments, registered models, versions, aliases) into the CLI's
``error: ...`` lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.atomic import process_alive
from recsys_moe.config import Config

if TYPE_CHECKING:
    from mlflow.data.meta_dataset import MetaDataset

log = logging.getLogger(__name__)

TRAIN_JOB_TAG = "recsys_moe.job"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description MLflow's UI shows and edits


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
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before the tag was set
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if cfg.tracking_uri().startswith("sqlite:"):
        location = cfg.path("mlartifacts").resolve().as_uri()
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: EXPERIMENT_NOTE}
    return client.create_experiment(cfg.mlflow.experiment, artifact_location=location, tags=tags)


EXPERIMENT_NOTE = """Multi-task ranking (recsys-moe): an MMoE or baseline mixture over a TorchRec \
embedding tower, one head per task.

- **training runs** (`recsys-moe train`, tag `recsys_moe.job = train`), named \
`mixture-widths-epochs-seed`: per-step losses `train/loss_<task>`, per-epoch validation metrics \
`valid/<task>_<metric>`, the model bundle (`model/`), gate statistics (`gates/`), expert-usage \
heatmaps (`plots/`).
- **evaluation runs** (`recsys-moe evaluate`, tag `recsys_moe.job = evaluate`), nested under \
their training run, named `eval-<split>-<training run>`: `test/...` metrics of all rows, the \
table `metrics_table.json` (every number by segment, with bootstrap intervals), `report.md`.
- **sweeps** (`recsys-moe sweep`, tag `recsys_moe.job = sweep`): a parent run with the results \
table (`sweep.md`) and one child training run per setting.
"""


def _widths(dims: list[int]) -> str:
    return "x".join(str(d) for d in dims)


def run_name(cfg: Config) -> str:
    """What ran, e.g. ``mmoe-4e-64x32-3ep-seed0``, ``shared_bottom-151x75-3ep-seed0``,
    ``cgc-2t1s-64x32-3ep-seed0``."""
    m, t = cfg.model, cfg.train
    if m.mixture in ("single_task", "shared_bottom"):
        arch = _widths(m.bottom_dims or m.expert_dims)
    elif m.mixture in ("cgc", "ple"):
        arch = f"{m.num_task_experts}t{m.num_shared_experts}s-{_widths(m.expert_dims)}"
    else:
        arch = f"{m.num_experts}e-{_widths(m.expert_dims)}"
    return f"{m.mixture}-{arch}-{t.epochs}ep-seed{t.seed}"


def run_description(cfg: Config) -> str:
    """The run's description (Markdown): model, tasks, training settings, training set."""
    m, t = cfg.model, cfg.train
    tasks = ", ".join(
        f"`{x.name}` ({x.kind}{', where ' + x.mask + ' = 1' if x.mask else ''})" for x in cfg.tasks
    )
    rows = _manifest(cfg).get("rows", {})
    counts = ", ".join(f"{n:,} {s}" for s, n in rows.items()) or "rows unknown"
    return (
        f"`recsys-moe train`: **{m.mixture}** ({run_name(cfg)}) with tasks {tasks}.\n\n"
        f"{t.epochs} epochs, batch {t.batch_size} per process, lr {t.lr:g} (dense), "
        f"{t.embedding_lr:g} (embeddings), seed {t.seed}.\n\n"
        f"Training set `{cfg.dataset_dir.resolve()}` ({counts}); features `{cfg.features_path}`."
        "\n\nCharts: `train/` per-step losses, `valid/` per-epoch validation metrics; gate "
        "statistics are the table and plot under `gates/` (artifacts)."
    )


def _manifest(cfg: Config) -> dict:
    try:
        return json.loads((cfg.dataset_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def split_dataset(cfg: Config, split: str) -> tuple[MetaDataset, dict[str, str]]:
    """A split of the training set as an MLflow dataset, the one scheme of training's and
    evaluation's dataset inputs: named ``<training set>/<split>``, its source the split's
    Parquet, its digest that of the manifest (new with every build); and its tags (``split``,
    ``rows``)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    manifest = _manifest(cfg)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    path = (cfg.dataset_dir / f"{split}.parquet").resolve()
    with warnings.catch_warnings():  # a local path resolves to two equal source kinds
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(path))
    dataset = MetaDataset(source, name=f"{cfg.dataset_dir.name}/{split}", digest=digest)
    return dataset, {"split": split, "rows": str(manifest.get("rows", {}).get(split, ""))}


def log_datasets(cfg: Config) -> None:
    """The training set's train and valid splits as MLflow datasets of the active run
    (``training`` / ``validation`` context; ``split_dataset``)."""
    for split, context in (("train", "training"), ("valid", "validation")):
        dataset, tags = split_dataset(cfg, split)
        mlflow.log_input(dataset, context=context, tags=tags)


# MLflow error codes that mean "the thing you named is not there" (an unknown alias comes as an
# INVALID_PARAMETER_VALUE "... not found"; other invalid values are bugs, not user errors)
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def user_error(e: BaseException, uri: str | None = None) -> str | None:
    """The ``error: ...`` text for an MLflow error caused by what the user named (a run id, an
    experiment, a registered model, version or alias that does not exist), else None."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return None
    alias = e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e.message)
    if e.error_code not in _NOT_FOUND and not alias:
        return None
    where = f" in the MLflow store {uri}" if uri else ""
    message = str(e.message).strip().rstrip(".")
    return (
        f"{message}{where}; check the id or name (the MLflow UI lists runs and registered "
        "models: `mlflow ui --backend-store-uri URI`), or pass --workdir/--config of the store "
        "that holds it"
    )


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


def chart_sections(metric_keys: list[str]) -> list[tuple[str, list[str]]]:
    """The sections of charts MLflow's run page ("Model metrics" tab) shows for these metric
    keys, in the order it shows them, each with its charts in order: a key's section is the
    part before its last ``/``; sections with a name come first, alphabetically, then the
    unprefixed keys ("Model metrics"); ``system/`` keys are on another tab; charts sort by key.
    (MLflow 3's ``RunsChartsCardConfig.getBaseChartAndSectionConfigs``,
    mlflow/server/js/src/experiment-tracking/components/runs-charts/runs-charts.types.ts.)"""
    sections: dict[str, list[str]] = {}
    for key in sorted(k for k in metric_keys if not k.startswith("system/")):
        sections.setdefault(key.rpartition("/")[0] or "Model metrics", []).append(key)
    named = sorted(s for s in sections if s != "Model metrics")
    order = [*named, *(["Model metrics"] if "Model metrics" in sections else [])]
    return [(s, sections[s]) for s in order]


def ui_link(
    experiment_id: str, run_id: str | None = None, base: str = "http://127.0.0.1:5000"
) -> str:
    """The MLflow UI's page of an experiment's runs, or of a run's charts ("Model metrics"), in
    the UI's "Model training" view. MLflow 3.17's UI opens every experiment on its GenAI
    overview (traces, "No data") unless the link says ``workflowType=machine_learning`` or the
    sidebar's switch is on "Model training" (the browser remembers the switch); it no longer
    reads the experiment's ``mlflow.experimentKind`` tag."""
    page = f"runs/{run_id}/model-metrics" if run_id else "runs"
    return f"{base}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"
