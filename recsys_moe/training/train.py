"""Training: one ``train(cfg)`` entry, alone or under torchrun.

    recsys-moe train --config configs/demo.toml [--set train.epochs=3 --set model.num_experts=8]
    torchrun --nproc-per-node 2 -m recsys_moe.cli train --config FILE [--set k=v ...] [--resume]

``_train`` reads top to bottom as the phases of a run: data (this rank's loader of the mapped
train split, the validation split) → model (tables on "meta", head biases at the label means)
wrapped with its losses → sharding (planner, ``DistributedModelParallel``, row-wise Adagrad
fused into the tables' backward) and optimizers → resume from a checkpoint → metric logger
(MLflow on rank 0, a do-nothing one elsewhere) → loop (every step's per-task losses, sent to
MLflow in one batch every ``log_every`` steps; validation every epoch; checkpoints every
``train.checkpoint.every`` steps) → the full state dict on rank 0 → model bundle (the plain,
unsharded model alone) logged to the run as artifact ``model``, expert-usage heatmaps as
``plots``.

``train.batch_size`` is per rank; the loader owns the schedule: each epoch every rank takes an
equal, disjoint slice of the epoch's order, ``len(loader)`` batches (``recsys_moe.training.
loader``), so all ranks take the same steps.
"""

from __future__ import annotations

import gc
import getpass
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from feature_store import FeatureSet
from pipelines.atomic import check_output
from pipelines.training_set import load_manifest, load_split, mapped_files
from recsys_moe.bundle import save_bundle
from recsys_moe.config import Config, TrainConfig, label_columns
from recsys_moe.evaluation.gates import expert_heatmaps, gate_stats, polarization_warning
from recsys_moe.evaluation.metrics import split_metrics, task_label_stats
from recsys_moe.model import build_model, count_parameters, model_cost
from recsys_moe.tracking import TRAIN_JOB_TAG, run_owner_tags
from recsys_moe.training import checkpoint, sharding
from recsys_moe.training.dist import DistInfo, broadcast_object, setup, shutdown
from recsys_moe.training.loader import Loader, MemoryLoader, ParquetLoader, read_mapped
from recsys_moe.training.loggers import (
    MetricLogger,
    Step,
    StepWindow,
    TrainingDiverged,
    metric_logger,
)
from recsys_moe.training.module import (
    OnDevice,
    TrainLoss,
    TrainModule,
    compile_dense,
    init_head_biases,
)
from recsys_moe.training.profile import StepProfiler
from recsys_moe.training.recipe import build_scheduler, scaled_rates
from recsys_moe.training.selection import Selection, selection_score
from recsys_moe.training.validation import predict_sharded

log = logging.getLogger(__name__)

GPU_HOST_THREADS = 4  # train.cpu_threads = 0 on CUDA: at most this many


@dataclass
class TrainResult:
    run_id: str
    model_dir: Path = Path()
    losses: list[float] = field(default_factory=list)  # this rank's total loss per step
    valid: dict[str, float] = field(default_factory=dict)  # last epoch's validation metrics
    # training samples per second over all ranks: every step but validation and the profiled
    # window (train.profile_steps: traced steps and the report's making are no training time)
    samples_per_s: float = 0.0
    # the same after the first epoch's first tenth of steps (allocator, kernels' autotuning,
    # compilation, the pipeline filling): the rate a long run settles at
    samples_per_s_steady: float = 0.0
    model: nn.Module | None = None  # the trained model, plain, on the CPU (rank 0)
    gates: dict[str, float] = field(default_factory=dict)  # last validation's gate statistics
    plots: list[Path] = field(default_factory=list)
    cost: dict[str, int] = field(default_factory=dict)  # model_cost: parameters, flops_per_example
    # wall time of each step's iteration by step number, in order (validation and profiled
    # steps apart; at steady state the device holds the host back, so this is the step's time)
    step_s: dict[int, float] = field(default_factory=dict)
    profile: str = ""  # train.profile_steps: the top ops
    gpu_busy_share: float = float("nan")  # train.profile_steps on CUDA: kernels' time / wall
    selected_step: int = 0  # the step whose weights are the model (train.select)
    stopped_step: int = 0  # the last step trained (< epochs x steps when stopped early)


@dataclass
class TrainState:
    """What the loop advances and a checkpoint holds."""

    model: nn.Module  # DistributedModelParallel over TrainModule
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Loader


# ---- the run -----------------------------------------------------------------------------------
def train(cfg: Config, *, parent_run_id: str | None = None) -> TrainResult:
    """Train ``cfg``'s model; under torchrun, each process is one rank of the run.

    The result's ``model``, ``model_dir`` and ``plots`` are filled on rank 0; ``losses`` are
    this rank's own. ``parent_run_id`` makes the MLflow run a child of that run (sweeps).
    """
    info = setup(cfg.train.dist_timeout_s)
    mode = compile_mode(cfg, info)  # train.compile's auto resolved, once
    before = torch.get_num_threads()
    threads = cpu_threads(cfg.train.cpu_threads, info.device)
    if threads:
        torch.set_num_threads(threads)
    try:
        with compile_cache(cfg, mode, info.device):
            return _train(cfg, info, parent_run_id, mode)
    finally:
        torch.set_num_threads(before)
        shutdown(info)
        if mode:
            # Each run compiles its own modules. The ended run's graphs in dynamo's cache only
            # count against its recompile limit (8 per function): the 9th compiled run in one
            # process (a sweep's trials) ran eager, with a warning only.
            torch._dynamo.reset()
        # The run's DMP, optimizers and process group sit in reference cycles; until the cyclic
        # collector frees them, a next run in this process (a sweep) trained at less than half
        # the speed on CPU (178k -> 77k samples/s on the demo, 2 cores).
        gc.collect()


def _train(cfg: Config, info: DistInfo, parent_run_id: str | None, mode: bool | str) -> TrainResult:
    t = replace(cfg.train, compile=mode)  # train.compile as resolved (compile_mode)
    # ---- data: the mapped splits of the training set -----------------------------------------
    features = cfg.feature_set()
    manifest = check_dataset(cfg.dataset_dir, features, cfg.features_path)
    labels = label_columns(cfg.tasks)
    loader = train_loader(cfg.dataset_dir, t, features, labels, info)
    valid = read_mapped(cfg.dataset_dir, "valid", features, labels)
    total_steps = t.epochs * len(loader)

    # ---- model (tables on "meta") and its losses ---------------------------------------------
    torch.manual_seed(t.seed)
    names = [task.name for task in cfg.tasks]
    model = build_model(features, cfg.model, names, device="meta")
    stats = {x.name: task_label_stats(x, manifest) for x in cfg.tasks}
    init_head_biases(model, cfg.tasks, stats)
    module = TrainModule(
        model,
        TrainLoss.for_config(cfg.model, cfg.tasks, stats),
        autocast=t.bf16 and info.device.type == "cuda",
    )
    params = {
        "model.num_parameters": count_parameters(model),
        "train.world_size": info.world_size,
        "train.compile_effective": str(t.compile).lower(),
    }
    # mixture + heads, from the config as sweeps compute it. Building that model draws from the
    # RNG before the tables are initialised: moving this line changes every seeded result.
    cost = model_cost(cfg.model, features, names)
    params |= {"model.dense_parameters": cost["parameters"],
               "model.flops_per_example": cost["flops_per_example"]}  # fmt: skip

    # ---- sharding and optimizers -------------------------------------------------------------
    rates = scaled_rates(t, info.world_size, total_steps)
    params |= {"train.global_batch": rates.global_batch, "train.lr_effective": rates.lr,
               "train.embedding_lr_effective": rates.embedding_lr,
               "train.warmup_steps_effective": rates.warmup_steps,
               "train.lr_schedule_effective": rates.schedule,
               "train.dense_optimizer_effective": rates.dense_optimizer,
               "train.muon_lr_effective": rates.muon_lr}  # fmt: skip
    if t.compile == "cudagraphs" and t.pipeline == "plain" and info.world_size > 1:
        # seen on 2 H200s: the graphed backward under DDP's gradient hooks trained nothing
        # (valid click AUC 0.50; 0.70 eager plain or graphed under the pipeline)
        raise ValueError(
            "train.compile = 'cudagraphs' with train.pipeline = 'plain' does not learn with "
            f"several processes ({info.world_size}): use train.pipeline = 'auto' (TorchRec's "
            "pipeline) or train.compile = true"
        )
    if t.compile == "step" and info.device.type == "cuda" and cfg.model.mixture == "topk_mmoe":
        raise ValueError(
            "train.compile = 'step' cannot capture model.mixture = 'topk_mmoe' as a CUDA graph: "
            "its experts take the rows routed to them, a count read back to the host every "
            "step; use train.compile = 'cudagraphs' or true"
        )
    if t.compile:
        compile_dense(module, t.compile)
    dmp, plan = sharding.shard(
        module,
        t.sharding,
        device=info.device,
        embedding_lr=rates.embedding_lr,
        embedding_weight_decay=t.embedding_weight_decay,
        embedding_optimizer_name=t.embedding_optimizer,
        bf16=module.autocast,
    )
    plan_summary = sharding.plan_summary(plan)
    log.info("sharding plan: %s", plan_summary)
    optimizer = sharding.build_optimizer(
        dmp, rates.lr, t.weight_decay, muon_lr=rates.muon_lr, muon_momentum=t.muon_momentum
    )
    scheduler = build_scheduler(
        optimizer, rates.schedule, total_steps, rates.warmup_steps, rates.cooldown_share
    )
    state = TrainState(dmp, optimizer, scheduler, loader)

    # ---- resume ------------------------------------------------------------------------------
    ckpt_root = cfg.path(t.checkpoint.dir)
    resume_from = checkpoint.resolve(t.resume, ckpt_root)
    start = checkpoint.LoopState(step=0, run_id="")
    if resume_from is not None:
        start = checkpoint.load(
            resume_from, model=dmp, optimizer=optimizer, scheduler=state.scheduler
        )
        loader.load_state_dict(start.data)  # checks seed, batch size, ranks and rows match
        loader.check_step(start.step)  # and the batches per epoch, where the state cannot say
        log.info("resumed from %s at step %d", resume_from, start.step)

    # ---- tracking ----------------------------------------------------------------------------
    tags = {
        TRAIN_JOB_TAG: "train",
        "recsys_moe.features_fingerprint": features.fingerprint(),
        "recsys_moe.dataset_created_at": manifest.get("created_at", ""),
        "recsys_moe.dataset": str(cfg.dataset_dir.resolve()),
        "recsys_moe.world_size": str(info.world_size),
        **run_owner_tags(),
    }
    if resume_from is not None:
        tags["recsys_moe.resumed_from"] = str(resume_from)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    logger = metric_logger(info.is_main, cfg, run_id=start.run_id or None, tags=tags)
    ok = False
    try:
        run_id = broadcast_object(logger.run_id)
        logger.log_params(cfg.flat() | params)
        logger.log_text(features.source, "features.toml")
        logger.log_dict(plan_summary, "sharding_plan.json")

        # ---- loop ----------------------------------------------------------------------------
        run_dir = resume_from.parent if resume_from is not None else ckpt_root / run_id
        result = TrainResult(run_id=run_id, cost=cost)

        selection = Selection(t.patience, t.min_delta)
        selection.load_state_dict(start.selection)
        best: dict[str, Any] = {}  # select = "best": the best validation's weights (this rank's)
        best_file = run_dir / checkpoint.BEST_WEIGHTS.format(rank=info.rank)
        if t.select == "best" and selection.best_step and best_file.is_file():  # resumed
            # the best validation was in an earlier attempt: its weights and metrics, no gates
            best.update(state=torch.load(best_file, weights_only=True),
                        saved_step=selection.best_step, valid=start.selection.get("valid", {}),
                        gate_stats={}, gates=torch.zeros(0))  # fmt: skip

        def select(step: int, gates: Tensor) -> bool:
            """Score this validation, keep the weights if best; whether to stop early."""
            score = broadcast_object(selection_score(result.valid, cfg.tasks, t.selection_metric))
            logger.log_metrics({"valid/selection_score": score}, step=step)
            if selection.update(step, score) and t.select == "best":
                best.update(state=sharding.local_snapshot(dmp), gates=gates,
                            valid=dict(result.valid), gate_stats=dict(result.gates))  # fmt: skip
            return selection.stop

        def validate(model: nn.Module) -> Tensor:
            """Metrics and gate statistics of the validation split, logged; its gates."""
            preds, gates = predict_sharded(
                OnDevice(model, info.device),
                valid,
                cfg.tasks,
                batch_size=t.eval_batch_size,
                rank=info.rank,
                world_size=info.world_size,
            )  # fmt: skip  (one pass for the metrics and the gate statistics, each rank a block)
            bad = [k for k, v in preds.items() if not np.isfinite(v).all()]
            if bad:
                raise TrainingDiverged(f"the validation predictions of {bad} are not finite")
            result.valid = split_metrics(cfg.tasks, preds, _numpy(valid.labels), manifest)
            support = model.gate_support()
            result.gates = gate_stats(gates, names, support)
            warning = polarization_warning(gates, names, support)
            if warning:
                log.warning("%s", warning)
            return gates

        def save(step: int) -> None:
            if best.get("state") is not None and best.get("saved_step") != selection.best_step:
                checkpoint.write_weights_atomic(best["state"], best_file)  # this rank's best
                best["saved_step"] = selection.best_step
            checkpoint.save(
                run_dir,
                checkpoint.LoopState(step=step, run_id=run_id, data=loader.state_after(step),
                                     selection=selection.state_dict()
                                     | {"valid": best.get("valid", {})}),
                model=dmp, optimizer=optimizer, scheduler=state.scheduler,
                keep=t.checkpoint.keep,
            )  # fmt: skip

        with LoopGc(t.gc_every) as loop_gc:
            gates = _loop(state, t, info.device, start.step, logger, result, validate, select,
                          save if t.checkpoint.every else None, loop_gc.step)  # fmt: skip

        # ---- the selected model on rank 0: bundle and heatmaps -------------------------------
        result.selected_step = result.stopped_step
        if "valid" in best and selection.best_step != result.stopped_step:
            sharding.restore_snapshot(dmp, best["state"])  # every rank its own part
            gates = best["gates"]
            result.valid, result.gates = best["valid"], best["gate_stats"]
            result.selected_step = selection.best_step
        full = sharding.full_state_dict(dmp)
        per_epoch = len(loader)
        logger.log_metrics({"train/selected_epoch": result.selected_step / per_epoch,
                            "train/stopped_epoch": result.stopped_step / per_epoch})  # fmt: skip
        if result.selected_step != result.stopped_step or result.stopped_step < total_steps:
            log.info("model: the weights of step %d (epoch %d), validation %s; trained %d of "
                     "%d steps", result.selected_step, result.selected_step // per_epoch,
                     " ".join(f"{k}={v:.4f}" for k, v in result.valid.items()),
                     result.stopped_step, total_steps)  # fmt: skip
        if full is not None:
            plain = build_model(features, cfg.model, names)
            plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items()
                                   if k.startswith("model.")})  # fmt: skip
            result.model = plain.eval()
            result.model_dir = save_bundle(
                cfg.path("models") / run_id, model=plain, cfg=cfg, features=features,
                dataset_dir=cfg.dataset_dir,
            )  # fmt: skip
            logger.log_artifacts(result.model_dir, artifact_path="model")
            result.plots = heatmaps(cfg.dataset_dir, t.heatmap_by, gates, names, result.model_dir)
            if result.plots:
                logger.log_artifacts(result.plots[0].parent, artifact_path="plots")
        ok = True
        return result
    finally:
        logger.close(ok)


def _loop(
    state: TrainState,
    t: TrainConfig,
    device: torch.device,
    start_step: int,
    logger: MetricLogger,
    result: TrainResult,
    validate: Callable[[nn.Module], Tensor],
    select: Callable[[int, Tensor], bool],
    save: Callable[[int], None] | None,
    collect: Callable[[int], None],
) -> Tensor:
    """Steps ``start_step + 1 ..`` to the end of epoch ``t.epochs - 1``; validation at each
    epoch's end (then ``select``, which may stop the loop: early stopping), a checkpoint every
    ``t.checkpoint.every`` steps, ``collect(step)`` in each step (``LoopGc.step``). The last
    validation's gates."""
    dmp, loader = state.model, state.loader
    progress, pause = sharding.train_step(
        dmp, state.optimizer, device, pipeline=t.pipeline, step_graph=t.compile == "step"
    )
    batches = loader.until_epoch(t.epochs)
    per_epoch, total = len(loader), t.epochs * len(loader)
    window = StepWindow(
        logger, first_step=start_step, total=total, per_epoch=per_epoch, batch_size=t.batch_size
    )  # fmt: skip  (and the progress bar on rank 0)
    profiler = StepProfiler(t.profile_steps, device) if t.profile_steps else None
    gates = torch.zeros(0)
    warm = start_step + max(1, per_epoch // 10)  # steps before the steady-state rate counts
    seen = seen_warm = 0
    timed_s = timed_warm_s = 0.0  # training time: validation and profiled steps excluded
    dmp.train()
    for step in range(start_step + 1, total + 1):
        t_step = time.perf_counter()
        loss, per_task = progress(batches)
        window.add(Step(step, int(time.time() * 1000), loss, per_task))
        state.scheduler.step()
        collect(step)
        rows = loader.rows_in_batch((step - 1) % per_epoch)
        if step % t.log_every == 0 or step == total:
            result.losses += window.flush()
        profiled = profiler is not None and profiler.step()  # this step was traced
        if not profiled:
            took = time.perf_counter() - t_step
            result.step_s[step] = took
            seen, timed_s = seen + rows, timed_s + took
            if step <= warm:
                seen_warm, timed_warm_s = seen_warm + rows, timed_warm_s + took
        if step % per_epoch == 0:
            pause()
            gates = validate(dmp.module.model)
            dmp.train()
            logger.log_metrics({f"valid/{k}": v for k, v in result.valid.items()}, step=step)
            logger.log_gates(result.gates, step=step)
            log.info("epoch %d step %d valid %s", step // per_epoch - 1, step,
                     " ".join(f"{k}={v:.4f}" for k, v in result.valid.items()))  # fmt: skip
            stop = select(step, gates)
        else:
            stop = False
        if save is not None and step % t.checkpoint.every == 0:
            t_save = time.perf_counter()  # checkpoints are training time
            result.losses += window.flush()
            logger.wait_steps()  # the checkpoint's steps are in the store before it is
            save(step)
            timed_s += time.perf_counter() - t_save
        result.stopped_step = step
        if stop:
            result.losses += window.flush()
            log.info("early stop after epoch %d: no improvement of the selection score for %d "
                     "epoch(s)", step // per_epoch - 1, t.patience)  # fmt: skip
            break
    world = torch.distributed.get_world_size()
    result.samples_per_s = seen * world / timed_s if timed_s > 0 else 0.0
    steady_s = timed_s - timed_warm_s
    result.samples_per_s_steady = (seen - seen_warm) * world / steady_s if steady_s > 0 else 0.0
    logger.log_metrics({"train/samples_per_s": result.samples_per_s,
                        "train/samples_per_s_steady": result.samples_per_s_steady})  # fmt: skip
    if profiler is not None:
        profiler.stop()
        result.profile, result.gpu_busy_share = profiler.report, profiler.busy_share
        if profiler.report:
            logger.log_text(profiler.report, "profile/top_ops.txt")
        if result.gpu_busy_share == result.gpu_busy_share:  # not NaN: measured on a GPU
            logger.log_metrics({"train/gpu_busy_share": result.gpu_busy_share})
    return gates


# ---- the phases' helpers -----------------------------------------------------------------------
def compile_mode(cfg: Config, info: DistInfo) -> bool | str:
    """``train.compile`` with ``auto`` resolved: "step" in one process on CUDA, under plain
    steps (``train.pipeline`` auto or plain), for a mixture without data-dependent routing
    (every one but ``topk_mmoe``; the graph holds Adam's update and Muon's); else false. Any
    other setting is kept as given."""
    t = cfg.train
    if t.compile != "auto":
        return t.compile
    graphable = cfg.model.mixture != "topk_mmoe" and t.pipeline != "sparse_dist"
    return "step" if info.device.type == "cuda" and info.world_size == 1 and graphable else False


CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextmanager
def compile_cache(cfg: Config, mode: bool | str, device: torch.device) -> Iterator[Path | None]:
    """Where a compiled run (``mode``: ``train.compile`` resolved) keeps torch.compile's caches
    (inductor's graphs and kernels, AOTAutograd's, Triton's): ``train.compile_cache``, a
    directory relative to the workdir; ``auto`` = the environment's ``TORCHINDUCTOR_CACHE_DIR``
    where set (left as it is), else ``<workdir>/compile-cache``. A later run of the same model and
    shapes, in a fresh process or on another machine with the workdir, then loads the compiled
    code instead of compiling it again (torch's own default, a folder in /tmp, is lost with the
    machine). The environment is restored on the way out. The directory yielded, or None where
    nothing is compiled or the environment's is used."""
    setting = cfg.train.compile_cache
    index = 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    default = _torch_cache_dir()
    # torch writes its default into the environment itself (importing torchrec does): a value
    # that is torch's default, or the Triton folder it derives from it, was not the user's
    users = {
        k: v
        for k, v in ((k, os.environ.get(k)) for k in CACHE_ENV)
        if v and v not in (default, os.path.join(default, "triton", str(index)))
    }
    if not mode or (setting == "auto" and CACHE_ENV[0] in users):
        yield None
        return
    path = cfg.path("compile-cache" if setting == "auto" else setting).resolve()
    check_output(path, what="train.compile_cache", inputs=cfg.protected_paths(),
                 roots={"workdir": Path(cfg.workdir)})  # fmt: skip
    saved = {k: os.environ.get(k) for k in CACHE_ENV}
    os.environ[CACHE_ENV[0]] = str(path)
    if CACHE_ENV[1] not in users:
        # inductor's own rule (its cache dir's triton/<device>), which it would otherwise fix
        # in the environment at the first kernel, for the rest of the process
        os.environ[CACHE_ENV[1]] = str(path / "triton" / str(index))
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _torch_cache_dir() -> str:
    """torch.compile's default cache folder (a folder in the temporary directory, by user)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except ImportError:  # (its place in torch 2.11 and 2.13; the same rule, should it move)
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
        return os.path.abspath(os.path.join(tempfile.gettempdir(), f"torchinductor_{user}"))


class LoopGc:
    """``train.gc_every``: with N > 0, Python's automatic garbage collection is off in the
    block, after one full collection, and ``step(s)`` collects the young generations every N
    steps (torchtitan's ``GarbageCollection``); the collector's state is restored on the way
    out. With 0 the collector is left alone."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.was_enabled = gc.isenabled()

    def __enter__(self) -> LoopGc:
        if self.every:
            gc.collect()
            gc.disable()
        return self

    def step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect(1)

    def __exit__(self, *exc: object) -> None:
        if self.every and self.was_enabled:
            gc.enable()


def cpu_threads(setting: int, device: torch.device) -> int:
    """torch's CPU threads for a run on ``device`` (``train.cpu_threads``); 0 = leave torch's."""
    if setting:
        return setting
    if device.type == "cuda":
        return min(torch.get_num_threads(), GPU_HOST_THREADS)
    return 0


def check_dataset(dataset_dir: Path, features: FeatureSet, features_path: Path) -> dict:
    """The training set's manifest, after checking it was built from the same feature set."""
    manifest = load_manifest(dataset_dir)
    expected = features.fingerprint()
    if manifest.get("feature_set_fingerprint") != expected:
        raise ValueError(
            f"training set {dataset_dir} was built from other feature definitions "
            f"({manifest.get('feature_set_fingerprint')} != {expected} of {features_path}); "
            "rebuild it with `recsys-moe features build --config ...`"
        )
    return manifest


def train_loader(
    dataset_dir: Path, t: TrainConfig, features: FeatureSet, labels: list[str], info: DistInfo
) -> Loader:
    """This rank's loader of the train split, of the kind ``train.loader`` asks for."""
    kind = t.loader
    if kind == "auto":
        size = sum(f.stat().st_size for f in mapped_files(dataset_dir, "train"))
        held = "device" if info.device.type == "cuda" else "memory"
        kind = held if size <= t.memory_loader_max_mb * 2**20 else "stream"
    log.info("train split: %s loader", kind)
    common = {
        "features": features,
        "labels": labels,
        "batch_size": t.batch_size,
        "rank": info.rank,
        "world_size": info.world_size,
        "shuffle": True,
        "seed": t.seed,
        "drop_last": drop_last(t),
    }
    if kind == "stream":
        loader: Loader = ParquetLoader.from_split(dataset_dir, "train", **common)
    else:
        device = info.device if kind == "device" else None
        loader = MemoryLoader.from_split(dataset_dir, "train", device=device, **common)  # fmt: skip
    if loader.rows_per_rank == 0:
        raise ValueError(
            f"training split of {dataset_dir} has {loader.num_rows} rows, fewer than "
            f"the {info.world_size} ranks"
        )
    if len(loader) == 0:
        raise ValueError(
            f"train.drop_last: the training split of {dataset_dir} has {loader.rows_per_rank} "
            f"rows per rank, less than one batch of {t.batch_size}; lower train.batch_size or "
            "set train.drop_last=false"
        )
    dropped = loader.rows_per_rank - sum(loader.rows_in_batch(i) for i in range(len(loader)))
    if dropped:
        log.info("train.drop_last: %d rows per rank and epoch are left out (a new shuffle each "
                 "epoch), of %d", dropped, loader.rows_per_rank)  # fmt: skip
    return loader


def drop_last(t: TrainConfig) -> bool:
    """``train.drop_last``; auto: with a compiled step (``train.compile`` as ``compile_mode``
    resolves it; an unresolved "auto" counts as none), whose short last batch would be
    compiled again (tens of seconds, and new CUDA graphs)."""
    if t.drop_last != "auto":
        return t.drop_last
    return t.compile not in (False, "auto")


def heatmaps(
    dataset_dir: Path, by: list[str], gates: Tensor, tasks: list[str], model_dir: Path
) -> list[Path]:
    """Expert usage of the last validation by each ``by`` column (``train.heatmap_by``) of the
    raw validation rows, in ``<model_dir>-plots/``."""
    valid = load_split(dataset_dir, "valid")
    columns = [c for c in by if c in valid.collect_schema()]
    if gates.numel() == 0 or not columns:
        return []
    frame = valid.select(columns).collect()
    out_dir = model_dir.with_name(f"{model_dir.name}-plots")
    return expert_heatmaps(gates, frame, columns, tasks, out_dir)


def _numpy(labels: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in labels.items()}
