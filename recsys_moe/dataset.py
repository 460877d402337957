"""The config's training set: ``features build`` for a ``Config`` (store, features, labels, split).

Kept apart from ``train`` so that building a training set imports neither torch nor TorchRec.
"""

from __future__ import annotations

from feature_store import OfflineStore
from pipelines.training_set import build_training_set
from recsys_moe.config import Config, label_columns


def build_dataset(cfg: Config) -> dict:
    """Build ``cfg.dataset_dir`` from ``cfg.store_dir``; the training set's manifest."""
    return build_training_set(
        store=OfflineStore(cfg.store_dir),
        out=cfg.dataset_dir,
        features=cfg.feature_set(),
        labels={t.label: t.kind for t in cfg.tasks},
        valid_days=cfg.data.valid_days,
        test_days=cfg.data.test_days,
        carry=label_columns(cfg.tasks),
    )
