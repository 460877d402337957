"""A trained model on disk: weights, config, feature definitions, id mappings, data manifest.

The same folder is logged to the MLflow run (artifact ``model``) and wrapped by the registry's
pyfunc. Loading executes no pickled objects: weights go through ``torch.load(weights_only=True)``,
everything else is TOML, JSON or Parquet.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from feature_store import FeatureSet
from pipelines.atomic import replacing_dir
from pipelines.mappings import Mappings
from recsys_moe.config import Config, config_from_dict
from recsys_moe.model import MultiTaskModel, build_model

WEIGHTS = "weights.pt"


@dataclass
class Bundle:
    model: MultiTaskModel
    config: Config
    features: FeatureSet
    mappings: Mappings
    manifest: dict


def save_bundle(
    out: str | Path,
    *,
    model: MultiTaskModel,
    cfg: Config,
    features: FeatureSet,
    dataset_dir: str | Path,
) -> Path:
    """Write the bundle to ``out`` (a temporary sibling first, renamed when complete)."""
    out = Path(out)
    with replacing_dir(out) as tmp:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        raw = cfg.to_dict()
        raw["features"] = "features.toml"
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        (tmp / "features.toml").write_text(features.source)
        dataset_dir = Path(dataset_dir)
        shutil.copytree(dataset_dir / "mappings", tmp / "mappings")
        shutil.copy2(dataset_dir / "manifest.json", tmp / "dataset_manifest.json")
    return out


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise ValueError(f"model bundle {path}: no {WEIGHTS}; is this a recsys-moe model folder?")
    cfg = config_from_dict(
        json.loads((path / "config.json").read_text()),
        config_dir=path,
        where=f"model bundle {path}/config.json",
    )
    features = FeatureSet.load(path / "features.toml")
    model = build_model(features, cfg.model, [t.name for t in cfg.tasks])
    state = torch.load(path / WEIGHTS, weights_only=True, map_location="cpu")
    # bundles written before the loss weighting moved to the train module carry its log-variances
    # (training state, no effect on predictions)
    state = {k: v for k, v in state.items() if not k.startswith("loss_weighting.")}
    model.load_state_dict(state)
    model.eval()
    return Bundle(
        model=model,
        config=cfg,
        features=features,
        mappings=Mappings.load(path / "mappings", features),
        manifest=json.loads((path / "dataset_manifest.json").read_text()),
    )
