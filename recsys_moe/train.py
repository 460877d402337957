"""Training: one ``train(cfg)`` entry.

Reads top to bottom: data (training set → mappings → tensors) → model → optimizer → MLflow run →
loop (per-task losses logged every ``log_every`` steps, validation metrics every epoch) → model
bundle saved and logged to the run as artifact ``model``.

    recsys-moe train --config configs/demo.toml [--set train.epochs=3 model.num_experts=8]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import polars as pl
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from pipelines.mappings import Mappings, apply_mappings
from pipelines.training_set import load_manifest, load_split
from recsys_moe.bundle import save_bundle
from recsys_moe.config import Config
from recsys_moe.data import TensorData, iterate_batches, to_tensor_data
from recsys_moe.losses import task_losses, total_loss
from recsys_moe.metrics import task_metrics
from recsys_moe.model import build_model, count_parameters
from recsys_moe.predict import output_name, predict_tensors
from recsys_moe.tracking import TRAIN_JOB_TAG, ensure_experiment

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    model_dir: Path
    losses: list[float] = field(default_factory=list)  # total loss per step
    valid: dict[str, float] = field(default_factory=dict)  # last epoch's validation metrics
    samples_per_s: float = 0.0
    model: torch.nn.Module | None = None  # the trained model, in this process
    mappings: Mappings | None = None


def load_split_data(cfg: Config, mappings: Mappings, split: str) -> tuple[pl.DataFrame, TensorData]:
    """A split of the training set: raw rows and the model's tensors (labels included)."""
    features = cfg.feature_set()
    raw = load_split(cfg.dataset_dir, split).collect()
    mapped = apply_mappings(raw.lazy(), features, mappings).collect()
    return raw, to_tensor_data(mapped, features, raw.select([t.label for t in cfg.tasks]))


def check_dataset(cfg: Config) -> dict:
    """The training set's manifest, after checking it was built from the same feature set."""
    manifest = load_manifest(cfg.dataset_dir)
    expected = cfg.feature_set().fingerprint()
    if manifest.get("feature_set_fingerprint") != expected:
        raise ValueError(
            f"training set {cfg.dataset_dir} was built from other feature definitions "
            f"({manifest.get('feature_set_fingerprint')} != {expected} of {cfg.features_path}); "
            "rebuild it with `recsys-moe features build --config ...`"
        )
    return manifest


def validation_metrics(
    cfg: Config, model: torch.nn.Module, data: TensorData, manifest: dict
) -> dict[str, float]:
    preds = predict_tensors(model, data, cfg.tasks, batch_size=cfg.train.eval_batch_size)
    stats = manifest.get("labels", {})
    out: dict[str, float] = {}
    for t in cfg.tasks:
        label = data.labels[t.label].numpy()
        out |= task_metrics(t, preds[output_name(t)], label, label_stats=stats.get(t.label))
    return out


def build_optimizer(model: torch.nn.Module, cfg: Config) -> CombinedOptimizer:
    """Adagrad for the embedding tables, Adam for the dense part (DESIGN.md, Training).

    Adam's moments keep moving embedding rows long after their last gradient, which overfits
    the id tables; Adagrad leaves rows without gradient alone.
    """
    params = dict(model.named_parameters())
    sparse = {n: p for n, p in params.items() if ".ebc." in f".{n}"}
    dense = {n: p for n, p in params.items() if n not in sparse}
    return CombinedOptimizer(
        [
            ("sparse", KeyedOptimizerWrapper(
                sparse, lambda ps: torch.optim.Adagrad(
                    ps, lr=cfg.train.embedding_lr,
                    weight_decay=cfg.train.embedding_weight_decay))),
            ("dense", KeyedOptimizerWrapper(
                dense, lambda ps: torch.optim.Adam(
                    ps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))),
        ]
    )  # fmt: skip


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.train.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.train.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps))
        )
    raise ValueError(f"train.lr_schedule {cfg.train.lr_schedule!r}: use constant or linear")


def train(cfg: Config) -> TrainResult:
    # ---- data --------------------------------------------------------------------------------
    features = cfg.feature_set()
    manifest = check_dataset(cfg)
    mappings = Mappings.load(cfg.dataset_dir / "mappings", features)
    _, train_data = load_split_data(cfg, mappings, "train")
    _, valid_data = load_split_data(cfg, mappings, "valid")
    if train_data.num_rows == 0:
        raise ValueError(f"training split of {cfg.dataset_dir} is empty")

    # ---- model and optimizer -----------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    model = build_model(features, cfg.model, [t.name for t in cfg.tasks])
    optimizer = build_optimizer(model, cfg)
    total_steps = cfg.train.epochs * -(-train_data.num_rows // cfg.train.batch_size)
    scheduler = build_scheduler(optimizer, cfg, total_steps)

    # ---- run ---------------------------------------------------------------------------------
    tags = {
        TRAIN_JOB_TAG: "train",
        "recsys_moe.features_fingerprint": features.fingerprint(),
        "recsys_moe.dataset_created_at": manifest.get("created_at", ""),
        "recsys_moe.dataset": str(cfg.dataset_dir.resolve()),
    }
    result = TrainResult(run_id="", model_dir=Path(), model=model, mappings=mappings)
    with mlflow.start_run(experiment_id=ensure_experiment(cfg), tags=tags) as run:
        result.run_id = run.info.run_id
        mlflow.log_params(cfg.flat() | {"model.num_parameters": count_parameters(model)})
        mlflow.log_text(features.source, "features.toml")
        step, seen, t0 = 0, 0, time.perf_counter()
        for epoch in range(cfg.train.epochs):
            model.train()
            running: dict[str, float] = {}
            for batch in iterate_batches(
                train_data, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed + epoch
            ):
                out = model(batch.dense, batch.sparse)
                losses = task_losses(out, batch.labels, cfg.tasks)
                loss = total_loss(losses, cfg.tasks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                seen += batch.dense.shape[0]
                result.losses.append(loss.item())
                for name, v in losses.items():
                    running[name] = running.get(name, 0.0) + v.item()
                if step % cfg.train.log_every == 0:
                    n = cfg.train.log_every
                    metrics = {f"train/loss_{k}": v / n for k, v in running.items()}
                    metrics["train/loss"] = sum(result.losses[-n:]) / n
                    mlflow.log_metrics(metrics, step=step, synchronous=False)
                    running = {}
            result.samples_per_s = seen / (time.perf_counter() - t0)
            result.valid = validation_metrics(cfg, model, valid_data, manifest)
            mlflow.log_metrics({f"valid/{k}": v for k, v in result.valid.items()}, step=step)
            log.info("epoch %d step %d valid %s", epoch, step, _fmt(result.valid))
        mlflow.log_metric("train/samples_per_s", result.samples_per_s)
        result.model_dir = save_bundle(
            cfg.path("models") / result.run_id,
            model=model,
            cfg=cfg,
            features=features,
            dataset_dir=cfg.dataset_dir,
        )
        mlflow.log_artifacts(str(result.model_dir), artifact_path="model")
    return result


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
