"""Experts evaluated as one batched op, and the multi-gate mixture (MMoE) over them.

Notation: B batch, T tasks, E experts, D_in input dim, H expert output dim (last of ``dims``).

    x [B, D_in] ─► Experts ─► [E, B, H] ──┐
    x [B, D_in] ─► gates (softmax per task) ─► [T, B, E] ─► Σ_e ─► [T, B, H]

Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts"; gate dropout from Zhao et al. 2019, "Recommending What Video to Watch Next".
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Experts(nn.Module):
    """E MLPs with identical shapes, run together: weights ``[E, in, out]``, ReLU after each layer.

    ``forward(x [B, D_in]) -> [E, B, H]``. The first layer is one matmul of x against all experts
    (einsum), the others are ``torch.baddbmm`` over the expert dimension: no loop over experts.
    """

    def __init__(self, num_experts: int, in_dim: int, dims: list[int]) -> None:
        super().__init__()
        if num_experts < 1 or not dims:
            raise ValueError(
                f"Experts needs num_experts >= 1 and non-empty dims, got "
                f"num_experts={num_experts}, dims={dims}"
            )
        self.num_experts = num_experts
        self.in_dim = in_dim
        self.dims = list(dims)
        sizes = [in_dim, *dims]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, i, o)) for i, o in pairwise(sizes)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, 1, o)) for o in sizes[1:]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default, per expert.
        for w, b in zip(self.weights, self.biases, strict=True):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @property
    def out_dim(self) -> int:
        return self.dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(torch.einsum("bi,eio->ebo", x, self.weights[0]) + self.biases[0])
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = torch.relu(torch.baddbmm(b, h, w))  # [E, B, in] @ [E, in, out] + [E, 1, out]
        return h


class MMoE(nn.Module):
    """Multi-gate mixture of experts: one softmax gate per task over shared experts.

    ``forward(x [B, D_in]) -> (mixed [T, B, H], gates [T, B, E])``. The T gates are one
    ``Linear(D_in, T * E)``. With ``gate_dropout = p`` in training, each expert's gate logit is
    masked with probability p per example and task; where that would mask every expert, one
    expert chosen uniformly at random is kept, so gates always sum to 1.
    """

    def __init__(
        self, *, experts: Experts, in_dim: int, num_tasks: int, gate_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= gate_dropout < 1.0:
            raise ValueError(f"gate_dropout must be in [0, 1), got {gate_dropout}")
        self.experts = experts
        self.num_tasks = num_tasks
        self.gate_dropout = gate_dropout
        self.gate = nn.Linear(in_dim, num_tasks * experts.num_experts)

    @property
    def out_dim(self) -> int:
        return self.experts.out_dim

    def gates(self, x: Tensor) -> Tensor:
        """Gate weights ``[T, B, E]`` for input ``x [B, D_in]``."""
        num_experts = self.experts.num_experts
        logits = self.gate(x).view(x.shape[0], self.num_tasks, num_experts)  # [B, T, E]
        if self.training and self.gate_dropout > 0.0:
            drop = torch.rand_like(logits) < self.gate_dropout
            keep = torch.randint_like(logits[..., :1], num_experts, dtype=torch.long)
            rescue = (
                drop.all(dim=-1, keepdim=True) & F.one_hot(keep.squeeze(-1), num_experts).bool()
            )
            logits = logits.masked_fill(drop & ~rescue, float("-inf"))
        return logits.softmax(dim=-1).permute(1, 0, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        expert_out = self.experts(x)  # [E, B, H]
        gates = self.gates(x)  # [T, B, E]
        return torch.einsum("tbe,ebh->tbh", gates, expert_out), gates
