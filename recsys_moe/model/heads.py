"""Per-task towers. Notation: B batch, H input dim (the mixture's output for this task).

x [B, H] ─► (Linear → ReLU) × len(dims) ─► Linear(…, 1) ─► × out_scale + out_shift ─► [B]

``out_scale`` / ``out_shift`` are fixed buffers, 1 and 0 unless training sets them to a
regression label's training standard deviation and mean (objective ``mse``): the layers then
fit the standardised label whatever its sign and scale, and the head still outputs label units.
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
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("out_shift", torch.zeros(()))

    def flops_per_example(self) -> int:
        """Multiply-adds × 2 of the tower on one example."""
        return sum(2 * m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear))

    def init_output_bias(self, value: float) -> None:
        """Set the output layer's bias (the head's output for a zero input) to ``value``."""
        with torch.no_grad():
            self.mlp[-1].bias.fill_(value)

    def set_output_affine(self, scale: float, shift: float) -> None:
        """Output ``mlp(x) * scale + shift`` (a label's standard deviation and mean)."""
        self.out_scale.fill_(scale)
        self.out_shift.fill_(shift)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # bundles saved before the output affine existed: identity
        state_dict.setdefault(f"{prefix}out_scale", torch.ones(()))
        state_dict.setdefault(f"{prefix}out_shift", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x).squeeze(-1) * self.out_scale + self.out_shift
