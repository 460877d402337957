"""One config tree, loaded from TOML, overridable with ``key=value`` (``--set train.epochs=3``).

Relative paths in ``[data]`` resolve against ``workdir``; ``features`` resolves against the
config file's own folder (feature definitions travel with the configs).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from feature_store import FeatureSet

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


@dataclass
class DataConfig:
    store: str = "data"  # offline store root: raw Parquet tables (events, users, items)
    dataset: str = "dataset"  # training-set output: train/valid/test Parquet + mappings
    valid_days: int = 1  # the day(s) before the test days
    test_days: int = 1  # the last day(s) of events


@dataclass
class SynthConfig:
    users: int = 4000
    items: int = 800
    days: int = 14
    seed: int = 0
    requests_per_user_day: float = 0.7
    items_per_request: int = 10
    task_conflict: float = 0.0  # share of watch time's affinity that click does not share


@dataclass
class ModelConfig:
    # single_task | shared_bottom | omoe | mmoe | topk_mmoe | cgc | ple (recsys_moe/model.py)
    mixture: str = "mmoe"
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
    loss_weighting: str = "fixed"  # fixed (TaskConfig.weight) | uncertainty (Kendall et al. 2018)


@dataclass
class TaskConfig:
    name: str
    kind: str  # binary | regression
    label: str
    weight: float = 1.0
    transform: str = "none"  # regression target transform: none | log1p
    # "" = from kind/transform (bce; mse_log1p or mse) | mse_log1p | mse | weighted_logistic |
    # duration_quantile (recsys_moe/losses.py)
    objective: str = ""
    mask: str = ""  # label column: the loss counts only rows where it is 1 ("" = all non-null rows)
    positive: str = ""  # weighted_logistic: column that is 1 for positives ("" = label > 0)
    quantile_of: str = ""  # duration_quantile: the duration column (target = label / duration)


@dataclass
class ShardingConfig:
    """Embedding sharding by TorchRec's planner (``[train.sharding]``).

    Names are TorchRec ``ShardingType`` values: table_wise, column_wise, row_wise,
    table_row_wise, table_column_wise, data_parallel. Row-wise has no CPU kernel.
    """

    types: list[str] = field(default_factory=list)  # allowed for every table; [] = device default
    constraints: dict[str, list[str]] = field(default_factory=dict)  # table -> allowed types


@dataclass
class CheckpointConfig:
    """``[train.checkpoint]``: ``<dir>/<run id>/ckpt-<step>``; ``LATEST`` names the current."""

    dir: str = "checkpoints"  # relative to workdir
    every: int = 0  # steps between checkpoints; 0 = none
    keep: int = 2  # complete checkpoints kept per run (older ones deleted); 0 = all


@dataclass
class TrainConfig:
    batch_size: int = 512
    epochs: int = 3
    lr: float = 2e-3  # dense parameters: Adam
    weight_decay: float = 0.0
    embedding_lr: float = 0.05  # embedding tables: Adagrad (row-wise / fused under DMP)
    embedding_weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | linear (decays every learning rate to 0 at the end)
    seed: int = 0
    # every step's losses are logged, sent to MLflow in one batch per log_every steps: each batch
    # is a store commit (2-core demo: every 50 steps cost 13 % of throughput, every 500 nothing
    # measurable, a call per step 63 %)
    log_every: int = 500
    eval_batch_size: int = 8192
    # auto = TorchRec's TrainPipelineSparseDist on CUDA, else a plain step; or sparse_dist | plain
    pipeline: str = "auto"
    # memory: the train split mapped once and held (recsys_moe.loader.MemoryLoader), by every
    # rank; stream: Parquet row groups read and mapped on the fly (ParquetLoader); auto: memory
    # when the split's Parquet files total at most memory_loader_max_mb, else stream. Held
    # tensors take ~8x the Parquet size (demo: 19 MB -> 154 MB), so 128 MB -> ~1 GB per rank
    loader: str = "auto"
    memory_loader_max_mb: int = 128
    # torch's CPU threads per process (torch.set_num_threads); 0 = auto: on CUDA at most 4 (the
    # host side of a GPU step is small ops; on the 32-core H200 host all cores' spinning OpenMP
    # threads halved throughput: batch 512, 26k -> 51k samples/s with 4), on CPU torch's
    # default (all cores; torchrun sets OMP_NUM_THREADS=1 per process)
    cpu_threads: int = 0
    bf16: bool = True  # autocast the model's forward to bfloat16 on CUDA (losses stay float32)
    # training-set columns to break expert usage down by (validation split; absent ones skipped)
    heatmap_by: list[str] = field(default_factory=lambda: ["segment", "category"])
    # false; true / "latest" = the newest complete checkpoint under checkpoint.dir; or a path to
    # a run's checkpoint folder (its LATEST) or to one ckpt-<step> folder
    resume: bool | str = False
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    experiment: str = "recsys-moe"
    registered_model: str = "recsys-moe"


@dataclass
class ScoreConfig:
    top_k: int = 10
    # combined score = prod over tasks of p_task ** w (binary) or (1 + prediction) ** w (regression)
    weights: dict[str, float] = field(default_factory=lambda: {"click": 1.0, "watch_time": 1.0})


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
    config_dir: str = field(default=".", metadata={"internal": True})

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
        return FeatureSet.load(self.features_path)

    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.path('mlflow.db').resolve()}"

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


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        default = getattr(cls(), name) if cls is not TaskConfig else None
        if is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value, f"{where}.{name}")
        elif name == "tasks":
            value = [_build(TaskConfig, t, f"{where}.tasks[{i}]") for i, t in enumerate(value)]
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


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
    cfg: Config = _build(Config, raw, f"config {path}")
    cfg.config_dir = str(path.resolve().parent)
    for t in cfg.tasks:
        if t.kind not in ("binary", "regression"):
            raise ValueError(f"config {path}: task {t.name!r} kind {t.kind!r}: binary|regression")
    return cfg


def config_from_dict(raw: dict[str, Any], *, config_dir: str | Path, where: str) -> Config:
    """Rebuild a ``Config`` from ``Config.to_dict()`` output (e.g. a model bundle's config.json)."""
    cfg: Config = _build(Config, raw, where)
    cfg.config_dir = str(config_dir)
    return cfg
