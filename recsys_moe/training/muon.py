"""Muon for the dense part's matrices: each step's momentum, orthogonalised.

    opt = Muon(matrices, lr=2e-2)  # 2-D weights, and 3-D expert stacks [experts, in, out]

Muon (Keller Jordan, 2024; Liu et al., "Muon is scalable for LLM training", 2025) replaces a
matrix's update by the nearest semi-orthogonal matrix to its Nesterov momentum (five
Newton-Schulz iterations), so that every direction of the update moves at the same rate
whatever the gradient's spectrum; the update is then scaled to Adam's typical RMS
(``0.2 * sqrt(max(rows, cols))``: torch's ``adjust_lr_fn="match_rms_adamw"``), so a rate tuned
for Adam is a sensible start. It is what ``train.dense_optimizer = "muon"`` runs on every
matrix of the dense part; vectors (biases) and single-row matrices (a head's output layer) stay
on Adam (``sharding.build_optimizer``).

torch has ``torch.optim.Muon`` (2.9+), for 2-D parameters only; the mixture keeps its experts as
one ``[experts, in, out]`` tensor (one batched matmul), which this class orthogonalises expert
by expert (the Newton-Schulz iterations batched over the leading dimension). On a 2-D parameter
it takes the same steps as torch's (``tests/test_muon.py``). A group's rate may be a tensor on
the parameters' device (``step_graph.StepGraph`` captures the step in a CUDA graph and refills
it before each replay).

Measured (demo model, batch 32768, 93 steps; benchmarks/README.md session 16): the dense part
learns faster per step than under Adam, which with few steps is what closes a large batch's gap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic)
NS_STEPS = 5
NS_EPS = 1e-7


def is_matrix(p: torch.Tensor) -> bool:
    """A parameter Muon trains: 2-D or more, with more than one row and one column (a stack of
    matrices over the leading dimensions); vectors and single-row layers are Adam's."""
    return p.dim() >= 2 and min(p.shape[-2:]) > 1


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The semi-orthogonal matrix nearest ``g`` (its singular values brought to about 1 by
    ``steps`` Newton-Schulz iterations), for each matrix of ``g``'s last two dimensions."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon over matrices (``is_matrix``): Nesterov momentum, orthogonalised per matrix, scaled
    to Adam's RMS, decoupled weight decay. Refuses a vector or a single-row parameter."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        *,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
    ) -> None:
        params = list(params)
        for p in params:
            if not is_matrix(p):
                raise ValueError(
                    f"Muon trains matrices (2-D or a stack of them), not a tensor of shape "
                    f"{tuple(p.shape)}: give vectors and single-row layers to Adam"
                )
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "nesterov": nesterov}  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
                if wd:
                    p.mul_(1 - lr * wd)
                ortho = orthogonalize(update).to(p.dtype)
                if isinstance(lr, torch.Tensor):  # a CUDA graph's rate (step_graph.py)
                    p.sub_(ortho.mul_(lr * scale))
                else:
                    p.add_(ortho, alpha=-lr * scale)
        return loss
