"""One config tree, loaded from TOML, overridable with ``key=value`` (``--set train.epochs=3``).

Over 400 lines on purpose: one config tree, every section with its defaults, comments and checks
side by side (the type machinery is in ``recsys_moe.fields``).

Relative paths in ``[data]`` resolve against ``workdir``; ``features`` resolves against the
config file's own folder (feature definitions travel with the configs).

Validated once, when loaded (or built): every value's type against the dataclass annotations
(``Literal`` choices list the accepted values), ranges and cross-field rules in each section's
``__post_init__``. The parts of the system receive their section (``cfg.train``, ``cfg.model``,
``cfg.tasks``) and trust it; they do not check it again.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from feature_store import FeatureSet, OfflineStore
from pipelines.synth import SynthParams
from pipelines.training_set import SplitRule
from recsys_moe.fields import at_least, check_fields, choices, hints

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"

Mixture = Literal["single_task", "shared_bottom", "omoe", "mmoe", "topk_mmoe", "cgc", "ple"]
MIXTURES: tuple[str, ...] = get_args(Mixture)
LossWeighting = Literal["fixed", "uncertainty"]
TaskKind = Literal["binary", "regression"]
Transform = Literal["none", "log1p"]
# "" = from kind and transform: bce (binary); mse_log1p (transform log1p) or mse (regression)
Objective = Literal["", "bce", "mse_log1p", "mse", "weighted_logistic", "duration_quantile"]
# a task's promotion gate (recsys-moe promote): "" = auc (binary) or rmse (regression)
GateMetric = Literal["", "auc", "logloss", "ne", "rmse", "mae", "rmse_log"]
# Which way a metric improves, by the end of its name (``auc``, ``click_auc``, ``rank_ndcg_at_5``,
# ``watch_time_rmse_log``): the one table of the promotion gate, the seesaw and checkpoint
# selection (``higher_is_better``). Lower: losses and errors; no direction: calibration (best
# at 1); higher: the rest (AUC, GAUC, XAUC, NDCG, recall, MRR).
LOWER_IS_BETTER = ("logloss", "ne", "rmse", "mae", "rmse_log", "mae_log", "loss")
NO_DIRECTION = ("calibration",)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (a name or a ``<task>_<name>`` key) is better; a
    ``ValueError`` for a metric without a better direction (calibration)."""

    def ends(names: tuple[str, ...]) -> bool:
        return any(metric == n or metric.endswith(f"_{n}") for n in names)

    if ends(NO_DIRECTION):
        raise ValueError(f"{metric!r} has no better direction (best at 1, not at an end)")
    return not ends(LOWER_IS_BETTER)


LrSchedule = Literal["constant", "linear", "wsd", "auto"]
LrScaling = Literal["none", "sqrt", "linear", "auto"]
DenseOptimizer = Literal["adam", "muon", "auto"]
Pipeline = Literal["auto", "sparse_dist", "plain"]
LoaderKind = Literal["auto", "memory", "device", "stream"]
CompileMode = Literal["kernels", "cudagraphs", "step", "auto"]
EmbeddingOutput = Literal["auto", "float32", "bfloat16"]
BoundsCheck = Literal["warning", "fatal", "v2_warning", "v2_fatal", "none"]
EmbeddingOptimizer = Literal[
    "rowwise_adagrad", "adagrad", "sgd", "adam", "rowwise_adam", "lamb", "rowwise_lamb"
]
# TorchRec ``ShardingType`` values (tests/test_config.py checks them against TorchRec's enum)
ShardingName = Literal[
    "data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise",
    "table_column_wise", "grid_shard",
]  # fmt: skip


@dataclass
class DataConfig:
    store: str = "data"  # offline store root: raw Parquet tables (events, users, items)
    dataset: str = "dataset"  # training-set output: train/valid/test Parquet + mappings
    # how rows are split (pipelines.training_set.SplitRule): time = the last test_days calendar
    # days are the test split, the valid_days before them validation; random = a seeded hash of
    # the event keys, valid_fraction / test_fraction of the events; column = an events column
    # (split_column) holding "train" / "valid" / "test"
    split: Literal["time", "random", "column"] = "time"
    valid_days: int = 1  # the day(s) before the test days
    test_days: int = 1  # the last day(s) of events
    valid_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    split_column: str = ""
    # data contracts (pipelines/training_set.py): events before this ISO time are rejected
    # ("" = no lower bound; naive = UTC), e.g. "2026-01-01" or "2026-01-01T06:00:00+02:00"
    min_event_time: str = ""
    # least share of events that must find each entity's features (= training_set.MIN_COVERAGE)
    min_coverage: float = 0.5

    def __post_init__(self) -> None:
        from datetime import date, datetime

        if isinstance(self.min_event_time, date):  # a TOML date / datetime: its ISO text
            self.min_event_time = self.min_event_time.isoformat()
        check_fields(self, "data")
        at_least("data", valid_days=(self.valid_days, 0), test_days=(self.test_days, 0),
                  min_coverage=(self.min_coverage, 0.0))  # fmt: skip
        if self.min_coverage > 1.0:
            raise ValueError(f"data.min_coverage must lie in [0, 1], got {self.min_coverage}")
        try:
            self.split_rule()
        except ValueError as e:
            raise ValueError(f"data: {e}") from None
        try:
            datetime.fromisoformat(self.min_event_time) if self.min_event_time else None
        except ValueError:
            raise ValueError(
                "data.min_event_time: expected an ISO time like '2026-01-01' or "
                f"'2026-01-01T06:00:00', got {self.min_event_time!r}"
            ) from None

    def split_rule(self) -> SplitRule:
        return SplitRule(self.split, self.valid_fraction, self.test_fraction, self.split_seed,
                         self.split_column)  # fmt: skip


@dataclass
class SynthConfig(SynthParams):
    """``[synth]``: the synthetic data set's settings; their defaults live in one place
    (``pipelines.synth.SynthParams``), shared with ``synthesize`` and ``recsys-moe data synth``."""

    def __post_init__(self) -> None:
        check_fields(self, "synth")
        at_least("synth", users=(self.users, 1), items=(self.items, 1), days=(self.days, 1),
                  items_per_request=(self.items_per_request, 1),
                  requests_per_user_day=(self.requests_per_user_day, 0.0))  # fmt: skip
        if not 0.0 <= self.task_conflict <= 1.0:
            raise ValueError(f"synth.task_conflict must lie in [0, 1], got {self.task_conflict}")


@dataclass
class ModelConfig:
    mixture: Mixture = "mmoe"  # recsys_moe/model/model.py
    num_experts: int = 4  # omoe, mmoe, topk_mmoe
    expert_dims: list[int] = field(default_factory=lambda: [64, 32])
    tower_dims: list[int] = field(default_factory=lambda: [32])
    gate_dropout: float = 0.0
    bottom_dims: list[int] = field(default_factory=list)  # *_bottom, single_task; [] = expert_dims
    top_k: int = 2  # topk_mmoe: experts used per example and task
    capacity_factor: float = 0.0  # topk_mmoe, training: rows per expert ≤ cf·B·k/E; 0 = no cap
    aux_loss_weight: float = 0.01  # topk_mmoe: weight of the load-balancing loss (aux_loss)
    num_task_experts: int = 1  # cgc/ple: experts owned by each task, per level
    num_shared_experts: int = 2  # cgc/ple: experts shared by all tasks, per level
    num_levels: int = 2  # ple: stacked CGC levels (cgc is one level)
    loss_weighting: LossWeighting = "fixed"  # fixed (TaskConfig.weight) | uncertainty (Kendall)

    def __post_init__(self) -> None:
        w = "model"
        check_fields(self, w)
        at_least(w, num_experts=(self.num_experts, 1), top_k=(self.top_k, 1),
                  capacity_factor=(self.capacity_factor, 0.0),
                  aux_loss_weight=(self.aux_loss_weight, 0.0), num_levels=(self.num_levels, 1),
                  num_task_experts=(self.num_task_experts, 0),
                  num_shared_experts=(self.num_shared_experts, 0))  # fmt: skip
        for name in ("expert_dims", "tower_dims", "bottom_dims"):
            dims = getattr(self, name)
            if any(d < 1 for d in dims) or (name == "expert_dims" and not dims):
                raise ValueError(f"{w}.{name} must be widths >= 1 (expert_dims non-empty): {dims}")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError(f"{w}.gate_dropout must lie in [0, 1), got {self.gate_dropout}")
        if self.mixture == "topk_mmoe" and self.top_k > self.num_experts:
            raise ValueError(
                f"{w}.top_k ({self.top_k}) exceeds model.num_experts ({self.num_experts})"
            )
        if self.mixture in ("cgc", "ple") and self.num_task_experts + self.num_shared_experts < 1:
            raise ValueError(f"{w}: {self.mixture} needs >= 1 expert per task gate")
        if self.mixture == "ple" and self.num_levels > 1 and self.num_shared_experts < 1:
            raise ValueError(f"{w}: ple with num_levels > 1 needs num_shared_experts >= 1")


@dataclass
class TaskConfig:
    name: str
    kind: TaskKind
    label: str
    weight: float = 1.0
    transform: Transform = "none"  # regression target transform
    # "" = resolved here from kind/transform (bce; mse_log1p or mse) | mse_log1p | mse |
    # weighted_logistic | duration_quantile (recsys_moe/training/losses.py)
    objective: Objective = ""
    mask: str = ""  # label column: the loss counts only rows where it is 1 ("" = all non-null rows)
    positive: str = ""  # weighted_logistic: column that is 1 for positives ("" = label > 0)
    quantile_of: str = ""  # duration_quantile: the duration column (target = label / duration)
    # promotion gate: a candidate may take the champion alias only if this test metric is no
    # worse than the champion's by more than gate_tolerance ("" = auc / rmse by kind)
    gate: GateMetric = ""
    gate_tolerance: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, f"tasks.{self.name}")
        where = f"tasks.{self.name}"
        if not self.name or not self.label:
            raise ValueError(f"{where}: a task needs a name and a label column")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"{where}.weight must be finite and >= 0, got {self.weight}")
        if not self.gate:
            self.gate = "auc" if self.kind == "binary" else "rmse"
        binary_gate = self.gate in ("auc", "logloss", "ne")
        if binary_gate != (self.kind == "binary"):
            raise ValueError(f"{where}.gate {self.gate!r} is not a metric of a {self.kind} task")
        if not (math.isfinite(self.gate_tolerance) and self.gate_tolerance >= 0):
            raise ValueError(f"{where}.gate_tolerance must be finite and >= 0")
        if self.kind == "binary":
            if self.objective not in ("", "bce"):
                raise ValueError(
                    f"{where}: a binary task's objective is bce, not {self.objective!r}"
                )
            self.objective = "bce"
            return
        if not self.objective:
            self.objective = "mse_log1p" if self.transform == "log1p" else "mse"
        elif self.objective == "bce":
            raise ValueError(f"{where}: bce is for binary tasks; {choices(Objective)[2:]}")
        if self.transform == "log1p" and self.objective != "mse_log1p":
            raise ValueError(
                f"{where}: transform log1p goes with objective mse_log1p; drop the transform for "
                f"{self.objective}"
            )
        if self.objective == "duration_quantile" and not self.quantile_of:
            raise ValueError(f"{where}: duration_quantile needs quantile_of = the duration column")


def label_columns(tasks: list[TaskConfig]) -> list[str]:
    """Every column the losses read (labels, masks, positives, durations), first-seen order."""
    cols = [c for t in tasks for c in (t.label, t.mask, t.positive, t.quantile_of) if c]
    return list(dict.fromkeys(cols))


@dataclass
class ShardingConfig:
    """Embedding sharding by TorchRec's planner (``[train.sharding]``).

    Names are TorchRec ``ShardingType`` values: table_wise, column_wise, row_wise,
    table_row_wise, table_column_wise, data_parallel. Row-wise has no CPU kernel.
    """

    # for every table; [] = the default: table_wise in one process, else the planner's pick of
    # all types but data_parallel (CUDA) or of table_wise and column_wise (CPU)
    types: list[ShardingName] = field(default_factory=list)
    constraints: dict[str, list[ShardingName]] = field(default_factory=dict)  # table -> types
    # dtype of the fused lookups' output (fbgemm's TBE ``output_dtype``); auto: float32 for
    # training, bfloat16 for a forward alone under bf16 autocast on CUDA (train.bf16), whose
    # first layers cast it anyway
    embedding_output: EmbeddingOutput = "auto"
    # fbgemm's check of every id against its table's rows at each lookup (``BoundsCheckMode``):
    # none (the default): no second check on the device, as every batch of the jobs is made by
    # ``recsys_moe.data``, which refuses ids outside [0, rows) on the host, naming the feature;
    # warning replaces an out-of-range id by 0 and logs it, fatal stops; v2_* the same, checked
    # by fbgemm's second kernel. The check cost 1.7 of 11 ms of a 262k-row scoring forward of
    # the bench model on an H200 (benchmarks/README.md).
    bounds_check: BoundsCheck = "none"
    # in one process, a lookup whose tables are whole (table_wise, the default there) and one
    # fused group is fbgemm's kernel called on the batch directly, without TorchRec's input and
    # output dists (identities there, costing host work every step); false keeps TorchRec's
    # forward (training/sharding.py)
    direct_lookup: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "train.sharding")


@dataclass
class CheckpointConfig:
    """``[train.checkpoint]``: ``<dir>/<run id>/ckpt-<step>``; ``LATEST`` names the current."""

    dir: str = "checkpoints"  # relative to workdir
    every: int = 0  # steps between checkpoints; 0 = none
    keep: int = 2  # complete checkpoints kept per run (older ones deleted); 0 = all

    def __post_init__(self) -> None:
        check_fields(self, "train.checkpoint")
        at_least("train.checkpoint", every=(self.every, 0), keep=(self.keep, 0))


@dataclass
class TrainConfig:
    batch_size: int = 512
    # at most this many epochs: early stopping (patience) and the best epoch's weights (select)
    # decide; measured: census-income 0.9457 test AUC vs 0.9427 with 3 epochs, a numeric-only
    # set 7.2 vs 16.0 test RMSE (README "Real data", "Your own data"); shipped configs set theirs
    epochs: int = 20
    lr: float = 2e-3  # dense parameters: Adam (and Muon's rate times muon_lr_scale)
    weight_decay: float = 0.0
    # the dense part's optimizer: adam (every parameter), muon (training/muon.py: the matrices'
    # updates orthogonalised, Adam on the vectors and single-output layers), auto = muon where
    # the global batch is beyond 16x lr_reference_batch (demo at 32768: it closed most of Adam's
    # gap to batch 512 in the same epochs; at 8192 level with Adam: benchmarks/README.md), else
    # adam. Muon's rate is lr (as scaled) x muon_lr_scale, its update scaled to Adam's RMS;
    # its momentum muon_momentum (demo at 32768, 3 seeds: 0.9 over 0.95 and 0.8)
    dense_optimizer: DenseOptimizer = "auto"
    muon_lr_scale: float = 4.0
    muon_momentum: float = 0.9
    embedding_lr: float = 0.05  # embedding tables: embedding_optimizer's rate
    embedding_weight_decay: float = 0.0
    # the tables' optimizer, fused into their backward by fbgemm: rowwise_adagrad (one
    # accumulator per row), adagrad, sgd; on CUDA only (fbgemm-gpu-cpu has no kernel): adam,
    # rowwise_adam (Adam, its second moment per row), lamb, rowwise_lamb
    embedding_optimizer: EmbeddingOptimizer = "rowwise_adagrad"
    # constant | linear (decays every learning rate to 0 at the end) | wsd (constant, then a
    # linear cool-down to 0 over the last lr_cooldown_share of the steps) | auto (linear at
    # global batches up to lr_reference_batch; above it wsd under Muon, constant under Adam:
    # few steps need the whole rate)
    lr_schedule: LrSchedule = "constant"
    lr_cooldown_share: float = 0.2
    # large batches (training/recipe.py): lr and embedding_lr are for global batches of
    # lr_reference_batch rows; another batch size (batch_size x ranks) multiplies them by
    # r ** 0.5 (sqrt) or r ** 1 (linear), r = batch / reference, or leaves them (none); auto =
    # linear up to r = 16, sqrt beyond; a run whose rates were raised warms every rate up
    # linearly over warmup_steps (auto: 5 % of the steps; none under Muon). The defaults were
    # measured (benchmarks/README.md): the tables' Adagrad auto (x16 at 8192, x32 at 32768),
    # Adam's as it is
    lr_reference_batch: int = 512
    lr_scaling: LrScaling = "none"
    embedding_lr_scaling: LrScaling = "auto"
    warmup_steps: int | Literal["auto"] = "auto"
    # model selection (training/selection.py), validation at each epoch's end: the run's model is
    # the epoch with the best selection score (select = "best") or the last one ("last");
    # selection_metric "" = the mean over tasks of each task's gate metric, normalised (2 AUC - 1,
    # 1 - RMSE / the training mean's RMSE, ...), or a validation metric's key (click_auc); with
    # patience > 0 training stops after that many epochs without an improvement > min_delta
    select: Literal["best", "last"] = "best"
    selection_metric: str = ""
    patience: int = 3
    min_delta: float = 0.0
    seed: int = 0
    # every step's losses are logged, sent to MLflow in one batch per log_every steps: each batch
    # is a store commit, made on a background thread (2-core demo, when the loop still waited for
    # it: every 50 steps cost 13 % of throughput, every 500 nothing measurable, a call per step
    # 63 %; on one H200 the wait cost the bench ~5 %)
    log_every: int = 500
    # Python's garbage collector in the training loop: 0 = its own automatic collections (a
    # full one stops the loop, and every thread, for as long as the process's objects take to
    # walk); N > 0 = automatic collection off during the loop, one full collection before it
    # and a young-generation collection every N steps (torchtitan's train.gc_freq)
    gc_every: int = 0
    eval_batch_size: int = 8192
    # auto = TorchRec's TrainPipelineSparseDist on CUDA with several processes, else a plain step
    # (on one H200 the plain step was faster: benchmarks/README.md); or sparse_dist | plain
    pipeline: Pipeline = "auto"
    # memory: the mapped train split read once and held (training.loader.MemoryLoader), by
    # every rank; device: the same, held on the training device (a GPU: batches are cut there);
    # stream: its Parquet row groups read on the fly (ParquetLoader); auto: memory (device on
    # CUDA) when the split's Parquet files total at most memory_loader_max_mb, else stream.
    # Held tensors take ~8x the Parquet size (demo: 19 MB -> 154 MB): 128 MB -> ~1 GB per rank
    loader: LoaderKind = "auto"
    memory_loader_max_mb: int = 128
    # torch's CPU threads per process (torch.set_num_threads); 0 = auto: on CUDA at most 4 (the
    # host side of a GPU step is small ops; on the 32-core H200 host all cores' spinning OpenMP
    # threads halved throughput: batch 512, 26k -> 51k samples/s with 4), on CPU torch's
    # default (all cores; torchrun sets OMP_NUM_THREADS=1 per process)
    cpu_threads: int = 0
    # torch.compile the dense part of the training step (the mixture, the heads and the losses,
    # one graph; the tables stay fbgemm's): true / "kernels" = fused kernels, "cudagraphs" =
    # those replayed as CUDA graphs forward and backward (mode reduce-overhead: a few launches
    # a step instead of hundreds, where the host's launching holds a GPU back; no effect on a
    # CPU); "step" = the fused kernels, their backward and the dense optimizers' update (Adam,
    # and Muon's under dense_optimizer muon) captured as one CUDA
    # graph, replayed each step (plain steps; with several processes the graph also averages the
    # dense gradients over the ranks; no effect on a CPU beyond the kernels:
    # training/step_graph.py). Costs a compile at the start (tens of seconds) and
    # once more for a last, smaller batch; measured in benchmarks/README.md. auto = "step" in
    # one process on CUDA (plain steps, a mixture without data-dependent routing: not
    # topk_mmoe), else false (a CPU, several processes): the run's param
    # train.compile_effective says which
    compile: bool | CompileMode = "auto"
    # where a compiled run keeps torch.compile's caches (relative to the workdir), so that the
    # next run of the same model and batch loads its compiled code instead of compiling again
    # (in a fresh process or container too); auto = TORCHINDUCTOR_CACHE_DIR where set, else
    # <workdir>/compile-cache
    compile_cache: str = "auto"
    # leave each epoch's short last batch out (fewer than batch_size rows; the shuffle differs
    # every epoch, so other rows each time); auto = true with a compiled step (train.compile
    # as resolved), else false
    drop_last: bool | Literal["auto"] = "auto"
    bf16: bool = True  # autocast the model's forward to bfloat16 on CUDA (losses stay float32)
    # > 0: torch.profiler over that many steps after 22 warm-up steps; the top ops go to the
    # run's artifacts (profile/top_ops.txt), the device's busy share to train/gpu_busy_share
    profile_steps: int = 0
    # seconds a collective may wait for the other ranks before the job fails (a stopped or lost
    # rank): torch's own default is 10-30 minutes per collective, with no word meanwhile
    dist_timeout_s: int = 300
    # training-set columns to break expert usage down by (validation split; absent ones skipped)
    heatmap_by: list[str] = field(default_factory=lambda: ["segment", "category"])
    # false; true / "latest" = the newest complete checkpoint under checkpoint.dir; or a path to
    # a run's checkpoint folder (its LATEST) or to one ckpt-<step> folder
    resume: bool | str = False
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        check_fields(self, "train")
        at_least("train", batch_size=(self.batch_size, 1), epochs=(self.epochs, 1),
                  weight_decay=(self.weight_decay, 0.0),
                  embedding_weight_decay=(self.embedding_weight_decay, 0.0),
                  log_every=(self.log_every, 1), gc_every=(self.gc_every, 0),
                  eval_batch_size=(self.eval_batch_size, 1),
                  memory_loader_max_mb=(self.memory_loader_max_mb, 0),
                  cpu_threads=(self.cpu_threads, 0),
                  profile_steps=(self.profile_steps, 0),
                  dist_timeout_s=(self.dist_timeout_s, 1),
                  lr_reference_batch=(self.lr_reference_batch, 1),
                  patience=(self.patience, 0), min_delta=(self.min_delta, 0.0))  # fmt: skip
        if self.warmup_steps != "auto":
            at_least("train", warmup_steps=(self.warmup_steps, 0))
        for name in ("lr", "embedding_lr", "muon_lr_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"train.{name} must be a finite number > 0, got {value}")
        if not 0.0 < self.lr_cooldown_share <= 1.0:
            raise ValueError(
                f"train.lr_cooldown_share must be in (0, 1] (the share of the steps the wsd "
                f"schedule decays over), got {self.lr_cooldown_share}"
            )
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.compile == "step" and self.pipeline == "sparse_dist":
            raise ValueError(
                "train.compile = 'step' (the dense step as one CUDA graph) takes plain steps: "
                "set train.pipeline = 'auto' or 'plain', or train.compile = 'cudagraphs'"
            )


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    experiment: str = "recsys-moe"
    registered_model: str = "recsys-moe"
    # a training run's system/... charts (CPU, memory, disk, network; GPU with nvidia-ml-py):
    # MLflow's monitor thread (psutil) samples every system_metrics_interval_s seconds
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        check_fields(self, "mlflow")
        every = self.system_metrics_interval_s
        if not (math.isfinite(every) and every >= 0.5):
            raise ValueError(
                f"mlflow.system_metrics_interval_s must be a number of seconds >= 0.5, got {every}"
            )


@dataclass
class ScoreConfig:
    top_k: int = 10
    # combined score = prod over tasks of p_task ** w (binary), (1 + prediction) ** w (regression)
    # {} (the default) = 1 for every binary task and every regression of a time (>= 0), 0 for a
    # plain mse task (a label of any sign has no (1 + prediction) ** w)
    weights: dict[str, float] = field(default_factory=dict)
    # candidates per output shard (hash bucket of request/user): bounds a scoring rank's memory
    shard_rows: int = 2_000_000
    # share of candidates (per shard) whose user or item features are missing or expired above
    # which the job fails instead of scoring them as unknown
    max_missing_share: float = 0.01

    def __post_init__(self) -> None:
        check_fields(self, "score")
        at_least("score", top_k=(self.top_k, 1), shard_rows=(self.shard_rows, 1),
                 max_missing_share=(self.max_missing_share, 0.0))  # fmt: skip
        if self.max_missing_share > 1.0:
            raise ValueError(
                f"score.max_missing_share must lie in [0, 1], got {self.max_missing_share}"
            )
        bad = {k: v for k, v in self.weights.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"score.weights must be finite numbers, got {bad}")


@dataclass
class EvalConfig:
    """``[eval]``: offline evaluation (``recsys-moe evaluate``; recsys_moe/evaluation/report.py).
    Columns that the evaluated rows lack are skipped, and the report says so."""

    ks: list[int] = field(default_factory=lambda: [3, 5])  # NDCG@k and recall@k cut-offs
    request: str = "request_id"  # column grouping rows into requests ("" = no ranking metrics)
    relevance: str = "click"  # binary relevance of the ranking metrics (a label column)
    graded_relevance: str = "watch_time_s"  # graded relevance for NDCG ("" = none)
    gauc_by: list[str] = field(default_factory=lambda: ["user_id", "request_id"])  # GAUC groups
    segments: list[str] = field(default_factory=lambda: ["segment", "category"])  # breakdowns
    max_segment_values: int = 64  # a segment column with more distinct values is skipped
    bootstrap: int = 100  # resamples of requests (rows without eval.request) for CIs; 0 = none
    ci: float = 0.95  # confidence level of the bootstrap intervals
    seed: int = 0  # the bootstrap's random seed
    reliability_bins: int = 20  # equal-width bins of predicted probability

    def __post_init__(self) -> None:
        check_fields(self, "eval")
        at_least("eval", max_segment_values=(self.max_segment_values, 1),
                  bootstrap=(self.bootstrap, 0),
                  reliability_bins=(self.reliability_bins, 1))  # fmt: skip
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks must be cut-offs >= 1 (at least one), got {self.ks}")
        if not 0.0 < self.ci < 1.0:
            raise ValueError(f"eval.ci must lie in (0, 1), got {self.ci}")


def _default_tasks() -> list[TaskConfig]:
    return [
        TaskConfig(name="click", kind="binary", label="click"),
        TaskConfig(name="watch_time", kind="regression", label="watch_time_s", transform="log1p"),
    ]


@dataclass
class Config:
    features: str = "features/synth.toml"
    workdir: str = "."
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=_default_tasks)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    config_dir: str = field(default=".", metadata={"internal": True})

    def __post_init__(self) -> None:
        check_fields(self, "")
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("config: [[tasks]] is empty; configure at least one task")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"config: task name(s) {dup} appear more than once in [[tasks]]")
        if not self.score.weights:
            self.score.weights = {t.name: 0.0 if t.objective == "mse" else 1.0 for t in self.tasks}
        unknown = sorted(set(self.score.weights) - set(names))
        if unknown:
            raise ValueError(f"score.weights: no task(s) {unknown}; tasks are {names}")

    # ---- paths ---------------------------------------------------------------------------------
    def path(self, rel: str | Path) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else Path(self.workdir) / p

    @property
    def store_dir(self) -> Path:
        return self.path(self.data.store)

    @property
    def dataset_dir(self) -> Path:
        return self.path(self.data.dataset)

    @property
    def features_path(self) -> Path:
        p = Path(self.features)
        return p if p.is_absolute() else Path(self.config_dir) / p

    def feature_set(self) -> FeatureSet:
        """The feature definitions, parsed once per config (and again if ``features`` changes);
        pattern groups resolved against the tables of the offline store (``data.store``)."""
        path = self.features_path
        cached = self.__dict__.get("_feature_set")
        if cached is None or cached[0] != path:
            store = OfflineStore(self.store_dir)
            columns = lambda table: store.scan(table).collect_schema().names()  # noqa: E731
            cached = (path, FeatureSet.load(path, columns=columns))
            self.__dict__["_feature_set"] = cached  # not a field: asdict and replace skip it
        return cached[1]

    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.path('mlflow.db').resolve()}"

    def protected_paths(self) -> dict[str, Path]:
        """What no job's output may replace or delete (``pipelines.atomic.check_output``): the
        store, the training set, the MLflow store (a local SQLite file and its artifacts), the
        model bundles, the checkpoints and the feature definitions."""
        out = {
            "store": self.store_dir,
            "training set": self.dataset_dir,
            "model bundles": self.path("models"),
            "checkpoints": self.path(self.train.checkpoint.dir),
            "feature definitions": self.features_path,
        }
        uri = self.tracking_uri()
        if uri.startswith("sqlite:///"):
            out["MLflow store"] = Path(uri.removeprefix("sqlite:///"))
            out["MLflow artifacts"] = self.path("mlartifacts")
        return out

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"no task {name!r} in config; tasks: {[t.name for t in self.tasks]}")

    # ---- (de)serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config_dir")
        d["features"] = str(self.features_path.resolve())
        return d

    def flat(self) -> dict[str, str]:
        """Flattened ``section.key -> value`` strings (MLflow params)."""
        out: dict[str, str] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else k, x)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for x in v:
                    walk(f"{prefix}.{x.get('name', len(out))}", x)
            else:
                out[prefix] = str(v)

        walk("", self.to_dict())
        return out


def _build(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    """``cls`` from a raw TOML table at section ``where`` ("" = the root)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table of settings, got {raw!r}")
    at = f"{where}: " if where else ""
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1)]
        also = f" (did you mean {close}?)" if close else ""
        raise ValueError(f"{at}unknown key(s) {unknown}{also}; known: {sorted(known)}")
    hints_of = hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints_of[name]
        key = f"{where}.{name}" if where else name
        if is_dataclass(hint):
            value = _build(hint, value, key)
        elif get_origin(hint) is list and is_dataclass(get_args(hint)[0]):
            if not isinstance(value, list):
                raise ValueError(f"{key}: expected a list of tables, got {value!r}")
            value = [_build(get_args(hint)[0], t, f"{key}[{i}]") for i, t in enumerate(value)]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key missing
        raise ValueError(f"{at}{e}") from e


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings need no quotes: --set mlflow.experiment=foo


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw TOML dict (value parsed as TOML, else string).

    A list of named tables (``[[tasks]]``) is entered by name: ``tasks.watch_time.mask=click``.
    """
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):  # [[tasks]]: the entry whose name is p
            named = [t for t in node if isinstance(t, dict) and t.get("name") == p]
            if not named:
                names = ", ".join(str(t.get("name")) for t in node if isinstance(t, dict))
                raise ValueError(f"--set {item!r}: no {parts[i - 1]} entry named {p!r} ({names})")
            node = named[0]
        else:
            node = node.setdefault(p, {})
        if not isinstance(node, dict | list) or (isinstance(node, list) and i == len(parts) - 2):
            raise ValueError(f"--set {item!r}: {p!r} is not a section")
    node[parts[-1]] = _parse_value(value.strip())


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    workdir: str | Path | None = None,
) -> Config:
    """Load a config TOML (default: the embedded ``configs/demo.toml``) and apply overrides."""
    path = Path(path) if path else DEMO_CONFIG
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"config {path}: cannot read ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config {path}: invalid TOML: {e}") from e
    for item in overrides:
        apply_override(raw, item)
    if workdir is not None:
        raw["workdir"] = str(workdir)
    try:
        cfg: Config = _build(Config, raw)
    except ValueError as e:
        raise ValueError(f"config {path}: {e}") from None
    cfg.config_dir = str(path.resolve().parent)
    return cfg


def config_from_dict(raw: dict[str, Any], *, config_dir: str | Path, where: str) -> Config:
    """Rebuild a ``Config`` from ``Config.to_dict()`` output (e.g. a model bundle's config.json)."""
    try:
        cfg: Config = _build(Config, raw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    cfg.config_dir = str(config_dir)
    return cfg
