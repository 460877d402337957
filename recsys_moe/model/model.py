"""The multi-task model: embedding tower → mixture → one head per task.

Notation: B batch, T tasks, E experts, Dn dense features, D_in tower output, H mixture output.

    (dense [B, Dn], sparse KJT) ─► tower ─► [B, D_in] ─► mixture ─► [T, B, H], gates [T, B, E]
                                                              └─► head_t([B, H]) ─► logits[t] [B]

Composition as in torchrec's ``DLRM`` and torchtune's ``MoE``: parts are built by
``build_model`` and passed in by keyword. The model is a plain ``nn.Module``; sharding is applied
to it elsewhere (``DistributedModelParallel`` over the tower's ``EmbeddingBagCollection``).

Matched compute: ``model_cost`` counts the dense FLOPs per example (multiply-adds × 2) and the
parameters of mixture + heads (embeddings excluded); ``match_compute`` rescales a config's expert
(or bottom) widths so that its FLOPs meet a budget, e.g. the demo MMoE's:

    budget = model_cost(mmoe_cfg, features, tasks)["flops_per_example"]
    sb_cfg = match_compute(replace(mmoe_cfg, mixture="shared_bottom"), features, tasks, budget)

(``recsys-moe sweep --match-compute`` does this for every setting of a grid.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, PoolingType

from recsys_moe.model.heads import TaskHead
from recsys_moe.model.mixture import (
    PLE,
    CGCLevel,
    Experts,
    Gate,
    MMoE,
    OMoE,
    SharedBottom,
    SingleTask,
    TopKMMoE,
)
from recsys_moe.model.tower import EmbeddingTower

if TYPE_CHECKING:  # the feature store and config pull in Polars; types only here
    from feature_store.definitions import FeatureSet
    from recsys_moe.config import ModelConfig


class ModelOutput(NamedTuple):
    logits: dict[str, Tensor]  # task name -> [B]: a logit (binary) or a transformed-scale value
    gates: Tensor  # [T, B, E]: each task's weights over the mixture's experts (mixture.py)
    # the mixture's load-balancing loss (topk_mmoe), unweighted: training adds it to the loss
    # with weight model.aux_loss_weight (recsys_moe.training.module.TrainLoss)
    aux_loss: Tensor | None = None
    drop_rate: Tensor | None = None  # topk_mmoe: share of routed (row, expert) pairs dropped


class MultiTaskModel(nn.Module):
    """``forward(dense [B, Dn], sparse KJT) -> ModelOutput``; task order = ``heads`` order.

    Inference weights only: training-only state (the loss weighting, head initialisation) lives
    in ``recsys_moe.training.module``.
    """

    def __init__(
        self,
        *,
        tower: nn.Module,
        mixture: nn.Module,
        heads: dict[str, nn.Module],
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

    def gate_support(self) -> Tensor:
        """``[T, E]`` bool: the experts each task's gate ranges over."""
        return self.mixture.gate_support()

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> ModelOutput:
        return self.top(self.tower(dense, sparse))

    def top(self, x: Tensor) -> ModelOutput:
        """The dense part over the tower's output ``x [B, D_in]``: mixture and heads."""
        # indexed, not unpacked: TorchRec's train pipeline traces this forward with torch.fx,
        # where the mixture (a leaf) returns one Proxy, which cannot be iterated
        res = self.mixture(x)
        mixed, gates, balance, drop_rate = res[0], res[1], res[2], res[3]
        logits = {name: head(mixed[t]) for t, (name, head) in enumerate(self.heads.items())}
        return ModelOutput(logits=logits, gates=gates, aux_loss=balance, drop_rate=drop_rate)


def build_mixture(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    """The mixture named by ``cfg.mixture``, its parts built here and passed in."""
    t, drop = num_tasks, cfg.gate_dropout
    if cfg.mixture in ("single_task", "shared_bottom"):
        dims = cfg.bottom_dims or cfg.expert_dims
        if cfg.mixture == "single_task":
            return SingleTask(bottoms=Experts(t, in_dim, dims))
        return SharedBottom(bottom=Experts(1, in_dim, dims), num_tasks=t)
    if cfg.mixture in ("cgc", "ple"):
        levels = 1 if cfg.mixture == "cgc" else cfg.num_levels
        nt, ns = cfg.num_task_experts, cfg.num_shared_experts  # checked by ModelConfig
        cgc_levels, d = [], in_dim
        for level in range(levels):
            last = level == levels - 1
            experts = Experts(t * nt + ns, d, cfg.expert_dims)
            cgc_levels.append(
                CGCLevel(
                    experts=experts,
                    task_gates=Gate(d, t, nt + ns, drop),
                    shared_gate=None if last else Gate(d, 1, experts.num_experts, drop),
                    num_task_experts=nt,
                    num_shared_experts=ns,
                )
            )
            d = experts.out_dim
        return PLE(levels=cgc_levels)
    experts = Experts(cfg.num_experts, in_dim, cfg.expert_dims)
    if cfg.mixture == "omoe":
        return OMoE(experts=experts, gate=Gate(in_dim, 1, cfg.num_experts, drop), num_tasks=t)
    gate = Gate(in_dim, t, cfg.num_experts, drop)
    if cfg.mixture == "topk_mmoe":
        return TopKMMoE(
            experts=experts, gate=gate, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor
        )
    return MMoE(experts=experts, gate=gate)


def build_model(
    features: FeatureSet,
    cfg: ModelConfig,
    tasks: list[str],
    *,
    device: torch.device | str | None = None,
) -> MultiTaskModel:
    """Build the model for ``features`` and ``tasks`` (names, in head order).

    ``device`` places only the embedding tables (``"meta"`` to build them unallocated for
    sharding); the dense parts are created on the default device. A feature set without
    categorical features builds a tower without tables (``EmbeddingTower(ebc=None)``).
    """
    if not tasks:
        raise ValueError("build_model needs at least one task")
    ebc = None  # numeric-only feature sets: no tables (tower.py)
    tables, averaged = summed_tables(features.embedding_bag_configs())
    if tables:
        ebc = EmbeddingBagCollection(
            tables=tables, device=torch.device(device) if device is not None else None
        )
    tower = EmbeddingTower(ebc=ebc, num_dense=len(features.dense), averaged=averaged)
    mixture = build_mixture(cfg, tower.out_dim, len(tasks))
    heads = {name: TaskHead(mixture.out_dim, cfg.tower_dims) for name in tasks}
    return MultiTaskModel(
        tower=tower,
        mixture=mixture,
        heads=heads,
    )


def summed_tables(configs: list[Any]) -> tuple[list[Any], list[str]]:
    """The tables' configs, and the features whose bag the tower divides by its number of ids.

    Where the tables mix poolings (``pooling = "mean"`` and ``"sum"``, as the demo's do), every
    bag is summed and the mean-pooled features are averaged by the tower: the same outputs and
    gradients in one fused lookup for all tables, where fbgemm groups the tables by pooling and
    each group costs a lookup and a backward of host work per step (the demo model on one H200,
    batch 8192, graphed dense step: 1.34M -> 1.79M samples/s, benchmarks/README.md). Tables of
    one pooling are left as they are: one group already, and the tower's division would only
    add work (the bench model, all mean-pooled)."""
    if len({c.pooling for c in configs}) < 2:
        return list(configs), []
    averaged = [f for c in configs if c.pooling == PoolingType.MEAN for f in c.feature_names]
    return [replace(c, pooling=PoolingType.SUM) for c in configs], averaged


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (meta parameters included)."""
    return sum(p.numel() for p in model.parameters())


def model_cost(
    model_or_cfg: MultiTaskModel | ModelConfig, features: FeatureSet, tasks: list[str]
) -> dict[str, int]:
    """Dense cost of mixture + heads: ``parameters`` and ``flops_per_example`` (multiply-adds × 2).

    Embedding lookups, the tower's concat, biases and activations are excluded. For topk_mmoe the
    FLOPs are the bound min(E, T·k) experts per example (each example runs on the union of its
    tasks' top-k); the measured count of the last forward is ``mixture.last_experts_per_example``.
    """
    model = model_or_cfg
    if not isinstance(model, nn.Module):
        model = build_model(features, model_or_cfg, tasks, device="meta")
    flops = model.mixture.flops_per_example() + sum(
        h.flops_per_example() for h in model.heads.values()
    )
    params = count_parameters(model.mixture) + count_parameters(model.heads)
    return {"parameters": params, "flops_per_example": int(flops)}


def match_compute(
    cfg: ModelConfig, features: FeatureSet, tasks: list[str], flops_per_example: float
) -> ModelConfig:
    """``cfg`` with its expert widths (``bottom_dims`` for single_task/shared_bottom, else
    ``expert_dims``) scaled by one factor, the largest whose ``model_cost`` FLOPs stay within
    ``flops_per_example``. Layer count, expert counts and heads' widths are kept."""
    bottom = cfg.mixture in ("single_task", "shared_bottom")
    base = (cfg.bottom_dims or cfg.expert_dims) if bottom else cfg.expert_dims

    def scaled(s: float) -> ModelConfig:
        dims = [max(1, round(d * s)) for d in base]
        return replace(cfg, bottom_dims=dims) if bottom else replace(cfg, expert_dims=dims)

    def cost(s: float) -> int:
        return model_cost(scaled(s), features, tasks)["flops_per_example"]

    lo, hi = 0.0, 1.0
    while cost(hi) <= flops_per_example and hi < 1e4:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= flops_per_example else (lo, mid)
    if cost(lo) > flops_per_example:
        raise ValueError(f"no widths of {cfg.mixture} fit {flops_per_example} FLOPs per example")
    return scaled(lo)
