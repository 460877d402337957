"""The model: embedding tower → mixture → one head per task (a plain ``nn.Module``).

Imports nothing from training, tracking or data loading: sharding is applied to it by
``recsys_moe.training.sharding``, losses by ``recsys_moe.training.module``.
"""

from recsys_moe.model.model import (
    ModelOutput,
    MultiTaskModel,
    build_mixture,
    build_model,
    count_parameters,
    match_compute,
    model_cost,
)

__all__ = [
    "ModelOutput",
    "MultiTaskModel",
    "build_mixture",
    "build_model",
    "count_parameters",
    "match_compute",
    "model_cost",
]
