"""Per-task towers. Notation: B batch, H input dim (the mixture's output for this task).

x [B, H] ─► (Linear → ReLU) × len(dims) ─► Linear(…, 1) ─► [B]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TaskHead(nn.Module):
    """``forward(x [B, H]) -> [B]``: a raw output (logit, or a value on the target's scale)."""

    def __init__(self, in_dim: int, dims: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d in dims:
            layers += [nn.Linear(in_dim, d), nn.ReLU()]
            in_dim = d
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def flops_per_example(self) -> int:
        """Multiply-adds × 2 of the tower on one example."""
        return sum(2 * m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear))

    def init_output_bias(self, value: float) -> None:
        """Set the output layer's bias (the head's output for a zero input) to ``value``."""
        with torch.no_grad():
            self.mlp[-1].bias.fill_(value)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x).squeeze(-1)
