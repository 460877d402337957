"""The config's training set: ``features build`` for a ``Config`` (store, features, labels, split).

Kept apart from ``train`` so that building a training set imports neither torch nor TorchRec.
"""

from __future__ import annotations

from pathlib import Path

from feature_store import OfflineStore
from pipelines.atomic import check_output
from pipelines.training_set import build_training_set
from recsys_moe.config import Config, TaskConfig, label_columns


def check_in_workdir(cfg: Config, rel: str, what: str) -> None:
    """A relative output path must resolve inside the workdir (an absolute one is taken as
    given: writing outside the workdir is then explicit)."""
    if Path(rel).is_absolute():
        return
    workdir = Path(cfg.workdir).resolve()
    if not cfg.path(rel).resolve().is_relative_to(workdir):
        raise ValueError(
            f"{what} {rel!r} resolves to {cfg.path(rel).resolve()}, outside the workdir "
            f"{workdir}; give an absolute path to write outside it"
        )


def label_kinds(tasks: list[TaskConfig]) -> dict[str, str]:
    """Each label column's check: "binary" (0/1), "real" (finite, any sign: a plain mse task) or
    "regression" (finite and >= 0: log1p, weighted-logistic and duration objectives). A column
    two tasks read gets the stricter check."""
    kinds: dict[str, str] = {}
    for t in tasks:
        kind = "real" if t.kind == "regression" and t.objective == "mse" else t.kind
        if kinds.get(t.label) not in (None, "real") and kind == "real":
            continue
        kinds[t.label] = kind
    return kinds


def loss_column_checks(tasks: list[TaskConfig]) -> dict[str, str]:
    """The values each non-label column a loss reads must hold: a mask or a positive indicator
    0 or 1 ("binary"), a duration the target is divided by finite and > 0 ("positive")."""
    checks = {c: "binary" for t in tasks for c in (t.mask, t.positive) if c}
    return checks | {t.quantile_of: "positive" for t in tasks if t.quantile_of}


def build_dataset(cfg: Config) -> dict:
    """Build ``cfg.dataset_dir`` from ``cfg.store_dir``; the training set's manifest. Refused
    before anything is read when the output would replace or delete an input."""
    check_in_workdir(cfg, cfg.data.dataset, "data.dataset")
    protected = cfg.protected_paths()
    protected.pop("training set")
    check_output(cfg.dataset_dir, what="data.dataset", inputs=protected,
                 roots={"workdir": Path(cfg.workdir)})  # fmt: skip
    return build_training_set(
        store=OfflineStore(cfg.store_dir),
        out=cfg.dataset_dir,
        features=cfg.feature_set(),
        labels=label_kinds(cfg.tasks),
        valid_days=cfg.data.valid_days,
        test_days=cfg.data.test_days,
        carry=label_columns(cfg.tasks),
        carry_checks=loss_column_checks(cfg.tasks),
        min_event_time=cfg.data.min_event_time,
        min_coverage=cfg.data.min_coverage,
        split=cfg.data.split_rule(),
    )
