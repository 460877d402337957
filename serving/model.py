"""The registered model for scoring: resolved from a registry URI, and the predictions, combined
score and checks on them.

``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` name a version; an alias is resolved once
per job, so every shard and rank scores with the same version. ``predict_from_tower`` runs the
part of ``MultiTaskModel.forward`` after the embedding tower on rows the scoring job gathered
(``serving.asof``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from mlflow.exceptions import MlflowException
from torch import Tensor

from feature_store import DataError
from recsys_moe.config import Config, TaskConfig
from recsys_moe.model import MultiTaskModel
from recsys_moe.tracking import client_for


@dataclass(frozen=True)
class ModelRef:
    uri: str
    name: str
    version: str
    run_id: str
    alias: str | None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` → (NAME, ALIAS, None); ``models:/NAME/VERSION`` → (NAME, None,
    VERSION)."""
    rest = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if rest and "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif rest and "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ValueError(
        f"--model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION, e.g. "
        "models:/recsys-moe-demo@champion or models:/recsys-moe-demo/3"
    )


def resolve_model(cfg: Config, uri: str) -> ModelRef:
    """The registered version ``uri`` names (an alias resolved once, so every shard and rank
    scores with the same version); an unknown name, alias or version is a ``ValueError``."""
    name, alias, version = parse_model_uri(uri)
    client = client_for(cfg)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, str(version))
        )
    except MlflowException as e:
        known = sorted(m.name for m in client.search_registered_models())
        what = f"alias @{alias}" if alias is not None else f"version {version}"
        raise ValueError(
            f"--model {uri}: the registry ({cfg.tracking_uri()}) has no {what} of model "
            f"{name!r} ({str(e).splitlines()[0]}); registered models: {known or 'none'}; "
            "`recsys-moe register` creates versions"
        ) from e
    return ModelRef(uri=uri, name=name, version=str(mv.version), run_id=mv.run_id, alias=alias)


DEVICES = ("auto", "cpu", "cuda")


def scoring_device(device: str) -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) where CUDA is available, else the CPU."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: expected one of {DEVICES}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: this machine's torch finds no CUDA device "
            f"(torch {torch.__version__}); use --device cpu, or auto (the GPU where there is one)"
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def combined_score(tasks: list[TaskConfig], weights: dict[str, float]) -> pl.Expr:
    """The ranking score of the predictions (``recsys_moe.evaluation.ranking.score_expr``: the
    evaluation's ranking metrics rank by the same expression)."""
    from recsys_moe.evaluation.ranking import score_expr

    return score_expr(tasks, weights)


def check_finite(frame: pl.DataFrame, columns: list[str], keys: list[str], path: Path) -> None:
    """Every prediction and score finite, else a ``DataError`` naming how many rows and one."""
    bad = pl.any_horizontal([~pl.col(c).is_finite() | pl.col(c).is_null() for c in columns])
    rows = frame.filter(bad)
    if rows.height:
        example = rows.select(keys + columns).row(0, named=True)
        raise DataError(
            f"candidates {path}: {rows.height} of {frame.height} rows got a score that is not a "
            f"finite number (e.g. {example}); nothing written. Check those rows' features in the "
            "store for NaN or infinite values"
        )


@torch.no_grad()
def predict_from_tower(
    model: MultiTaskModel, x: Tensor, tasks: list[TaskConfig], batch_size: int
) -> pl.DataFrame:
    """Predictions in natural units from the tower's output ``x [N, D_in]``: the rest of
    ``MultiTaskModel.forward`` (mixture, then one head per task) and ``to_natural``, as
    ``predict_tensors`` gives them (``test_score_job`` checks the two agree)."""
    from recsys_moe.model.objectives import output_name, to_natural

    was_training = model.training
    model.eval()
    cols: dict[str, list[Tensor]] = {output_name(t): [] for t in tasks}
    try:
        for a in range(0, x.shape[0], batch_size):
            mixed = model.mixture(x[a : a + batch_size])[0]
            logits = {name: head(mixed[t]) for t, (name, head) in enumerate(model.heads.items())}
            for t in tasks:
                cols[output_name(t)].append(to_natural(t, logits[t.name]).double())
    finally:
        model.train(was_training)
    return pl.DataFrame(
        {k: torch.cat(v).cpu().numpy() if v else np.zeros(0) for k, v in cols.items()},
        schema={k: pl.Float64 for k in cols},
    )
