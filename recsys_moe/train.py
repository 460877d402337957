"""Training: one ``train(cfg)`` entry, alone or under torchrun.

    recsys-moe train --config configs/demo.toml [--set train.epochs=3 model.num_experts=8]
    torchrun --nproc-per-node 2 -m recsys_moe.train --config FILE [--set k=v ...] [--resume]

Reads top to bottom: process group (a group of one when alone) → data (this rank's slice) →
model (tables on "meta") → sharding (planner, ``DistributedModelParallel``, row-wise Adagrad fused
into the tables' backward) → optimizers → metric logger (MLflow on rank 0, a do-nothing one
elsewhere) → resume from a checkpoint → loop (every step's per-task losses, sent to MLflow
in one batch every ``log_every`` steps;
validation every epoch, checkpoints every ``train.checkpoint.every`` steps) → full state dict
gathered on rank 0 → model bundle (plain, unsharded) logged to the run as artifact ``model``.

``train.batch_size`` is per rank; each epoch every rank takes an equal, disjoint slice of the
epoch's order (``train.loader``: the whole split shuffled in memory, or shuffled row groups and
buffers streamed; the remainder of rows over ranks is dropped), so all ranks take the same steps.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import mlflow
import numpy as np
import polars as pl
import torch
from mlflow.entities import Metric
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from feature_store import FeatureSet
from pipelines.mappings import Mappings
from pipelines.training_set import load_manifest, load_split, split_files
from recsys_moe import checkpoint, sharding
from recsys_moe.bundle import save_bundle
from recsys_moe.config import Config, TaskConfig
from recsys_moe.data import TensorData, map_to_tensors
from recsys_moe.dist import DistInfo, broadcast_object, mean_across_ranks, setup, shutdown
from recsys_moe.gates import (
    gate_stats,
    plot_expert_heatmap,
    polarization_warning,
    usage_by_group,
)
from recsys_moe.loader import Loader, MemoryLoader, ParquetLoader
from recsys_moe.losses import combine_losses, label_columns, objective, task_losses
from recsys_moe.metrics import task_label_stats, task_metrics
from recsys_moe.model import build_model, count_parameters, model_cost
from recsys_moe.predict import output_name, predict_with_gates
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
    gates: dict[str, float] = field(default_factory=dict)  # last validation's gate statistics
    plots: list[Path] = field(default_factory=list)
    cost: dict[str, int] = field(default_factory=dict)  # model_cost: parameters, flops_per_example


def load_split_data(cfg: Config, mappings: Mappings, split: str) -> tuple[pl.DataFrame, TensorData]:
    """A split of the training set: raw rows and the model's tensors (labels included)."""
    features = cfg.feature_set()
    raw = load_split(cfg.dataset_dir, split).collect()
    return raw, map_to_tensors(raw, features, mappings, label_columns(cfg.tasks))


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
    cfg: Config, preds: dict[str, np.ndarray], data: TensorData, manifest: dict
) -> dict[str, float]:
    """Each task's metrics of ``preds`` (``predict_tensors`` of ``data``) against its labels."""
    out: dict[str, float] = {}
    for t in cfg.tasks:
        label = data.labels[t.label].numpy()
        mask = data.labels[t.mask].numpy() if t.mask else None
        out |= task_metrics(
            t, preds[output_name(t)], label, label_stats=task_label_stats(t, manifest), mask=mask
        )
    return out


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


def init_head_biases(model: nn.Module, tasks: list[TaskConfig], manifest: dict) -> None:
    """Start each head's output at the constant predictor of its label (training-split mean):
    logit(rate) for BCE, the mean of the fitted target for MSE. Without it a head on a far-off
    scale (ratings near 3.5) spends its first epochs, and the shared experts, on the offset."""
    for t in tasks:
        s = task_label_stats(t, manifest)  # a masked task: the means where its mask is 1
        if not s:
            continue
        obj = objective(t)
        if obj == "bce":
            rate = min(max(s["train_mean"], 1e-4), 1 - 1e-4)
            value = math.log(rate / (1 - rate))
        elif obj == "mse_log1p" and "train_mean_log1p" in s:
            value = s["train_mean_log1p"]
        elif obj == "mse":
            value = s["train_mean"]
        else:
            continue
        last = [m for m in model.heads[t.name].modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.bias.fill_(value)


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class TrainBatch(Pipelineable):
    """One batch as TorchRec's train pipelines move it: ``to(device)`` and ``record_stream``."""

    dense: Tensor  # [B, Dn]
    sparse: KeyedJaggedTensor  # F keys x B bags
    labels: dict[str, Tensor]  # label column -> [B]

    def to(self, device: torch.device, non_blocking: bool = False) -> TrainBatch:
        return TrainBatch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        for v in self.labels.values():
            v.record_stream(stream)


@dataclass(frozen=True)
class Schedule:
    """Steps of this run: every rank takes ``rows_per_rank`` rows per epoch, in batches."""

    rows_per_rank: int
    batch_size: int
    epochs: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows_per_rank // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def rows_in_step(self, step: int) -> int:
        """Rows of (1-based) ``step`` on each rank: the last batch of an epoch may be short."""
        begin = ((step - 1) % self.steps_per_epoch) * self.batch_size
        return min(self.batch_size, self.rows_per_rank - begin)


def train_loader(cfg: Config, features: FeatureSet, mappings: Mappings, info: DistInfo) -> Loader:
    """This rank's loader of the train split, of the kind ``train.loader`` asks for."""
    kind = cfg.train.loader
    if kind not in ("auto", "memory", "stream"):
        raise ValueError(f"train.loader {kind!r}: one of auto, memory, stream")
    if kind == "auto":
        size = sum(f.stat().st_size for f in split_files(cfg.dataset_dir, "train"))
        kind = "memory" if size <= cfg.train.memory_loader_max_mb * 2**20 else "stream"
    cls = MemoryLoader if kind == "memory" else ParquetLoader
    log.info("train split: %s loader", kind)
    return cls.from_split(
        cfg.dataset_dir, "train",
        features=features, mappings=mappings, labels=label_columns(cfg.tasks),
        batch_size=cfg.train.batch_size, rank=info.rank, world_size=info.world_size,
        shuffle=True, seed=cfg.train.seed,
    )  # fmt: skip


def train_batches(loader: Loader, epochs: int) -> Iterator[TrainBatch]:
    """The loader's batches from its position to the end of epoch ``epochs - 1``."""
    while loader.epoch < epochs:
        for b in loader:
            yield TrainBatch(dense=b.dense, sparse=b.sparse, labels=b.labels)


# ---- model wrappers ----------------------------------------------------------------------------
class TrainLoss(nn.Module):
    """Per-task losses, combined: ``(outputs, labels) -> (loss, (loss, per-task losses))``.

    A module of its own, holding no sharded part, so that the fx trace of TorchRec's train
    pipeline keeps it as one leaf call instead of tracing through the dict and mask logic."""

    def __init__(self, tasks: list[TaskConfig], weighting: nn.Module | None) -> None:
        super().__init__()
        self.tasks = tasks
        # not registered here: its parameters belong to the model (trained, saved with it)
        self._weighting = (weighting,)

    def forward(
        self, out: Any, labels: dict[str, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        out = out._replace(logits={k: v.float() for k, v in out.logits.items()})
        losses = task_losses(out, labels, self.tasks)
        loss = combine_losses(losses, self.tasks, self._weighting[0], aux_loss=out.aux_loss)
        if out.aux_loss is not None:
            losses["aux"] = out.aux_loss
        return loss, (loss.detach(), {k: v.detach() for k, v in losses.items()})


class TrainModule(nn.Module):
    """Model and losses: ``forward(batch) -> (loss, (loss, per-task losses))``, outputs detached,
    the shape TorchRec's train pipelines expect. bf16 autocast over the model where enabled;
    losses in float32."""

    def __init__(self, model: nn.Module, tasks: list[TaskConfig], *, autocast: bool) -> None:
        super().__init__()
        self.model = model
        self.loss = TrainLoss(tasks, model.loss_weighting)
        self.autocast = autocast

    def forward(self, batch: TrainBatch) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(batch.dense, batch.sparse)
        return self.loss(out, batch.labels)


class OnDevice(nn.Module):
    """``model(dense, sparse)`` with inputs moved to ``device`` and logits back to the CPU."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device = device

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Any:
        out = self.model(dense.to(self.device), sparse.to(self.device))
        return out._replace(logits={k: v.float().cpu() for k, v in out.logits.items()})


# ---- metric loggers ----------------------------------------------------------------------------
class MetricLogger(Protocol):
    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_steps(
        self, names: list[str], steps: list[tuple[int, int]], values: list[list[float]]
    ) -> None: ...
    def log_setup(self, cfg: Config, params: dict[str, Any], plan: dict[str, Any]) -> None: ...
    def log_artifacts(self, path: Path, artifact_path: str) -> None: ...
    def close(self, ok: bool) -> None: ...


class MlflowLogger:
    """Rank 0: an MLflow run, new or (on resume) the checkpoint's own."""

    def __init__(self, cfg: Config, *, run_id: str | None, tags: dict[str, str]) -> None:
        experiment_id = ensure_experiment(cfg)
        self.resumed = run_id is not None
        run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, tags=tags)
        self.run_id = run.info.run_id
        self.client = mlflow.MlflowClient()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics(metrics, step=step, synchronous=False)

    def log_steps(
        self, names: list[str], steps: list[tuple[int, int]], values: list[list[float]]
    ) -> None:
        """``values[i][j]``: metric ``names[j]`` at ``steps[i]`` = (step, timestamp ms), sent in
        batches of at most 1000 (MLflow's limit) without waiting: one call per window, not per
        step (a call per step cost 63 % of the demo's CPU throughput, 180k -> 67k samples/s)."""
        metrics = [
            Metric(name, value, timestamp, step)
            for (step, timestamp), row in zip(steps, values, strict=True)
            for name, value in zip(names, row, strict=True)
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=False)

    def log_setup(self, cfg: Config, params: dict[str, Any], plan: dict[str, Any]) -> None:
        if not self.resumed:  # MLflow refuses to change a param (train.resume did change)
            mlflow.log_params(cfg.flat() | params)
        mlflow.log_text(cfg.feature_set().source, "features.toml")
        mlflow.log_dict(plan, "sharding_plan.json")

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)

    def close(self, ok: bool) -> None:
        mlflow.end_run("FINISHED" if ok else "FAILED")


class NullLogger:
    """Every other rank: logs nothing."""

    run_id = ""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_steps(
        self, names: list[str], steps: list[tuple[int, int]], values: list[list[float]]
    ) -> None:
        pass

    def log_setup(self, cfg: Config, params: dict[str, Any], plan: dict[str, Any]) -> None:
        pass

    def log_artifacts(self, path: Path, artifact_path: str) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


# ---- training ----------------------------------------------------------------------------------
GPU_HOST_THREADS = 4  # train.cpu_threads = 0 on CUDA: at most this many


def cpu_threads(setting: int, device: torch.device) -> int:
    """torch's CPU threads for a run on ``device`` (``train.cpu_threads``); 0 = leave torch's."""
    if setting:
        return setting
    if device.type == "cuda":
        return min(torch.get_num_threads(), GPU_HOST_THREADS)
    return 0


def train(cfg: Config, *, parent_run_id: str | None = None) -> TrainResult:
    """Train ``cfg``'s model; under torchrun, each process is one rank of the run.

    The result's ``model`` (a plain, unsharded model on the CPU), ``model_dir`` and ``valid``
    are filled on rank 0; ``losses`` are this rank's own. ``parent_run_id`` makes the MLflow run
    a child of that run (sweeps).
    """
    info = setup()
    before = torch.get_num_threads()
    threads = cpu_threads(cfg.train.cpu_threads, info.device)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, info, parent_run_id)
    finally:
        torch.set_num_threads(before)
        shutdown(info)
        # The run's DMP, optimizers and process group sit in reference cycles; until the cyclic
        # collector frees them, a next run in this process (a sweep) trained at less than half
        # the speed on CPU (178k -> 77k samples/s on the demo, 2 cores).
        gc.collect()


def _train(cfg: Config, info: DistInfo, parent_run_id: str | None = None) -> TrainResult:
    # ---- data --------------------------------------------------------------------------------
    features = cfg.feature_set()
    manifest = check_dataset(cfg)
    mappings = Mappings.load(cfg.dataset_dir / "mappings", features)
    loader = train_loader(cfg, features, mappings, info)
    valid_raw, valid_data = load_split_data(cfg, mappings, "valid")
    if loader.rows_per_rank == 0:
        raise ValueError(
            f"training split of {cfg.dataset_dir} has {loader.num_rows} rows, fewer than "
            f"the {info.world_size} ranks"
        )
    sched = Schedule(loader.rows_per_rank, cfg.train.batch_size, cfg.train.epochs)

    # ---- model (tables on "meta"), sharding, optimizers --------------------------------------
    torch.manual_seed(cfg.train.seed)
    tasks = [t.name for t in cfg.tasks]
    model = build_model(features, cfg.model, tasks, device="meta")
    init_head_biases(model, cfg.tasks, manifest)
    num_parameters = count_parameters(model)
    cost = model_cost(cfg.model, features, tasks)  # mixture + heads: for matched-compute studies
    module = TrainModule(model, cfg.tasks, autocast=cfg.train.bf16 and info.device.type == "cuda")
    dmp, plan = sharding.shard(
        module,
        cfg.train.sharding,
        device=info.device,
        embedding_lr=cfg.train.embedding_lr,
        embedding_weight_decay=cfg.train.embedding_weight_decay,
    )
    plan_summary = sharding.plan_summary(plan)
    log.info("sharding plan: %s", plan_summary)
    optimizer = sharding.build_optimizer(dmp, cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg, sched.total_steps)

    # ---- resume, run, checkpoints ------------------------------------------------------------
    ckpt_root = cfg.path(cfg.train.checkpoint.dir)
    resume_from = checkpoint.resolve(cfg.train.resume, ckpt_root)
    loop = checkpoint.LoopState(step=0, epoch=0, batch_in_epoch=0, run_id="")
    if resume_from is not None:
        loop = checkpoint.load(resume_from, model=dmp, optimizer=optimizer, scheduler=scheduler)
        # checks seed, batch size, ranks and rows match; checkpoints from before the loader
        # state was saved ordered rows as MemoryLoader does
        old = loader.state_dict() | {"order": MemoryLoader.order, "epoch": loop.epoch,
                                     "batches": loop.batch_in_epoch}  # fmt: skip
        loader.load_state_dict(loop.data or old)
        log.info("resumed from %s at step %d", resume_from, loop.step)
    tags = {
        TRAIN_JOB_TAG: "train",
        "recsys_moe.features_fingerprint": features.fingerprint(),
        "recsys_moe.dataset_created_at": manifest.get("created_at", ""),
        "recsys_moe.dataset": str(cfg.dataset_dir.resolve()),
        "recsys_moe.world_size": str(info.world_size),
    }
    if resume_from is not None:
        tags["recsys_moe.resumed_from"] = str(resume_from)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    logger: MetricLogger = (
        MlflowLogger(cfg, run_id=loop.run_id or None, tags=tags) if info.is_main else NullLogger()
    )
    ok = False
    try:
        run_id = broadcast_object(logger.run_id)
        run_dir = resume_from.parent if resume_from is not None else ckpt_root / run_id
        logger.log_setup(
            cfg,
            {
                "model.num_parameters": num_parameters,
                "model.dense_parameters": cost["parameters"],
                "model.flops_per_example": cost["flops_per_example"],
                "train.world_size": info.world_size,
            },
            plan_summary,
        )  # fmt: skip
        result = TrainResult(run_id=run_id, model_dir=Path(), mappings=mappings, cost=cost)
        _loop(cfg, info, dmp, optimizer, scheduler, sched, loader, valid_data, manifest,
              loop.step, run_id, run_dir, logger, result)  # fmt: skip

        # ---- the full model on rank 0: bundle ------------------------------------------------
        state = sharding.full_state_dict(dmp)
        if state is not None:
            plain = build_model(features, cfg.model, tasks)
            plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
            plain.eval()
            result.model = plain
            result.model_dir = save_bundle(
                cfg.path("models") / run_id,
                model=plain,
                cfg=cfg,
                features=features,
                dataset_dir=cfg.dataset_dir,
            )
            logger.log_artifacts(result.model_dir, artifact_path="model")
            result.plots = expert_heatmaps(cfg, plain, valid_raw, valid_data, result.model_dir)
            if result.plots:
                logger.log_artifacts(result.plots[0].parent, artifact_path="plots")
        ok = True
        return result
    finally:
        logger.close(ok)


def _loop(
    cfg: Config,
    info: DistInfo,
    dmp: nn.Module,
    optimizer: Any,
    scheduler: Any,
    sched: Schedule,
    loader: Loader,
    valid_data: TensorData,
    manifest: dict,
    start_step: int,
    run_id: str,
    run_dir: Path,
    logger: MetricLogger,
    result: TrainResult,
) -> None:
    progress, pause = sharding.train_step(dmp, optimizer, info.device, pipeline=cfg.train.pipeline)
    batches = train_batches(loader, sched.epochs)
    evaluated = OnDevice(dmp.module.model, info.device)
    every = cfg.train.checkpoint.every
    window: list[Step] = []  # each step's detached losses since the last flush to the logger
    seen, t0, eval_s = 0, time.perf_counter(), 0.0  # throughput excludes validation
    dmp.train()
    for step in range(start_step + 1, sched.total_steps + 1):
        loss, per_task = progress(batches)
        window.append(Step(step, int(time.time() * 1000), loss, per_task))
        scheduler.step()
        seen += sched.rows_in_step(step)
        if step % cfg.train.log_every == 0 or step == sched.total_steps:
            _log_window(window, logger, result)
            window = []
        if step % sched.steps_per_epoch == 0:
            t_eval = time.perf_counter()
            pause()
            preds, gates = predict_with_gates(
                evaluated, valid_data, cfg.tasks, batch_size=cfg.train.eval_batch_size
            )  # one pass for the metrics and the gate statistics
            result.valid = validation_metrics(cfg, preds, valid_data, manifest)
            support = dmp.module.model.gate_support()
            result.gates = gate_stats(gates, [t.name for t in cfg.tasks], support)
            warning = polarization_warning(gates, [t.name for t in cfg.tasks], support)
            if warning:
                log.warning("step %d: %s", step, warning)
            dmp.train()
            logger.log_metrics({f"valid/{k}": v for k, v in result.valid.items()}, step=step)
            logger.log_metrics(result.gates, step=step)
            eval_s += time.perf_counter() - t_eval
            log.info("epoch %d step %d valid %s", step // sched.steps_per_epoch - 1, step,
                     _fmt(result.valid))  # fmt: skip
        if every and step % every == 0:
            _log_window(window, logger, result)
            window = []
            epoch, batch = divmod(step, sched.steps_per_epoch)
            # the position after this step, not the loader's: pipelines read batches ahead
            data = loader.state_dict() | {"epoch": epoch, "batches": batch}
            checkpoint.save(
                run_dir,
                checkpoint.LoopState(
                    step=step, epoch=epoch, batch_in_epoch=batch, run_id=run_id, data=data
                ),
                model=dmp, optimizer=optimizer, scheduler=scheduler,
                keep=cfg.train.checkpoint.keep,
            )  # fmt: skip
    elapsed = time.perf_counter() - t0 - eval_s
    result.samples_per_s = seen * info.world_size / elapsed if elapsed > 0 else 0.0
    logger.log_metrics({"train/samples_per_s": result.samples_per_s})


def expert_heatmaps(
    cfg: Config, model: nn.Module, raw: pl.DataFrame, data: TensorData, model_dir: Path
) -> list[Path]:
    """Expert usage by each ``train.heatmap_by`` column of the validation rows, one PNG each
    (next to the model bundle, in ``<model_dir>-plots/``)."""
    columns = [c for c in cfg.train.heatmap_by if c in raw.columns]
    if not columns or data.num_rows == 0:
        return []
    _, gates = predict_with_gates(model, data, cfg.tasks, batch_size=cfg.train.eval_batch_size)
    tasks = [t.name for t in cfg.tasks]
    plots = model_dir.with_name(f"{model_dir.name}-plots")
    out = []
    for col in columns:
        values = raw[col].cast(pl.String).fill_null("(missing)")
        names = sorted(values.unique().to_list())
        codes = values.replace_strict(names, list(range(len(names))), return_dtype=pl.Int64)
        usage = usage_by_group(gates, torch.tensor(codes.to_numpy()), len(names))
        out.append(
            plot_expert_heatmap(
                usage, names, plots / f"experts_by_{col}.png",
                task_names=tasks, title=f"expert usage by {col} (validation split)",
            )
        )  # fmt: skip
    return out


class Step(NamedTuple):
    step: int
    timestamp_ms: int
    loss: Tensor  # detached, on the device: read only at the flush (no sync per step)
    per_task: dict[str, Tensor]


def _log_window(window: list[Step], logger: MetricLogger, result: TrainResult) -> None:
    """Every step's losses in ``window`` (mean across ranks: one all-reduce per window) to the
    logger in one batch; this rank's own step losses to ``result``."""
    if not window:
        return
    keys = list(window[0].per_task)
    rows = [torch.stack([w.loss, *(w.per_task[k] for k in keys)]) for w in window]
    table = torch.stack(rows).float().cpu()  # [W, 1 + tasks]: one device sync per window
    result.losses.extend(table[:, 0].tolist())
    table = mean_across_ranks(table)
    names = ["train/loss", *(f"train/loss_{k}" for k in keys)]
    logger.log_steps(names, [(w.step, w.timestamp_ms) for w in window], table.tolist())


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


# ---- torchrun entry ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m recsys_moe.train ARGS`` (a rank under torchrun) = ``recsys-moe -v train``."""
    from recsys_moe.cli import main as cli_main

    return cli_main(["-v", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
