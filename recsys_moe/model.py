"""The multi-task model: embedding tower → mixture → one head per task.

Notation: B batch, T tasks, E experts, Dn dense features, D_in tower output, H mixture output.

    (dense [B, Dn], sparse KJT) ─► tower ─► [B, D_in] ─► mixture ─► [T, B, H], gates [T, B, E]
                                                              └─► head_t([B, H]) ─► logits[t] [B]

Composition as in torchrec's ``DLRM`` and torchtune's ``MoE``: parts are built by
``build_model`` and passed in by keyword. The model is a plain ``nn.Module``; sharding is applied
to it elsewhere (``DistributedModelParallel`` over the tower's ``EmbeddingBagCollection``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from recsys_moe.heads import TaskHead
from recsys_moe.mixture import Experts, MMoE
from recsys_moe.tower import EmbeddingTower

if TYPE_CHECKING:  # the feature store and config pull in Polars; types only here
    from feature_store.definitions import FeatureSet
    from recsys_moe.config import ModelConfig

MIXTURES: tuple[str, ...] = ("mmoe",)


class ModelOutput(NamedTuple):
    logits: dict[str, Tensor]  # task name -> [B]: a logit (binary) or a transformed-scale value
    gates: Tensor  # [T, B, E]


class MultiTaskModel(nn.Module):
    """``forward(dense [B, Dn], sparse KJT) -> ModelOutput``; task order = ``heads`` order."""

    def __init__(
        self, *, tower: nn.Module, mixture: nn.Module, heads: dict[str, nn.Module]
    ) -> None:
        super().__init__()
        num_tasks = getattr(mixture, "num_tasks", len(heads))
        if num_tasks != len(heads):
            raise ValueError(f"mixture has {num_tasks} task outputs but {len(heads)} heads given")
        self.tower = tower
        self.mixture = mixture
        self.heads = nn.ModuleDict(heads)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> ModelOutput:
        mixed, gates = self.mixture(self.tower(dense, sparse))
        logits = {name: head(mixed[t]) for t, (name, head) in enumerate(self.heads.items())}
        return ModelOutput(logits=logits, gates=gates)


def build_model(
    features: FeatureSet,
    cfg: ModelConfig,
    tasks: list[str],
    *,
    device: torch.device | str | None = None,
) -> MultiTaskModel:
    """Build the model for ``features`` and ``tasks`` (names, in head order).

    ``device`` places only the embedding tables (``"meta"`` to build them unallocated for
    sharding); the dense parts are created on the default device.
    """
    if cfg.mixture not in MIXTURES:
        raise ValueError(
            f"model.mixture {cfg.mixture!r} is not supported; choose one of {MIXTURES}"
        )
    if not tasks:
        raise ValueError("build_model needs at least one task")
    if not features.sparse:
        raise ValueError(
            "the feature set has no categorical features; the tower needs at least one"
        )
    ebc = EmbeddingBagCollection(
        tables=features.embedding_bag_configs(),
        device=torch.device(device) if device is not None else None,
    )
    tower = EmbeddingTower(ebc=ebc, num_dense=len(features.dense))
    experts = Experts(cfg.num_experts, tower.out_dim, cfg.expert_dims)
    mixture = MMoE(
        experts=experts, in_dim=tower.out_dim, num_tasks=len(tasks), gate_dropout=cfg.gate_dropout
    )
    heads = {name: TaskHead(mixture.out_dim, cfg.tower_dims) for name in tasks}
    return MultiTaskModel(tower=tower, mixture=mixture, heads=heads)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (meta parameters included)."""
    return sum(p.numel() for p in model.parameters())
