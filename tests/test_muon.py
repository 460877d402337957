"""Muon (training/muon.py): torch's steps on a matrix, expert by expert on a stack of them, and
where the training recipe turns it on (train.dense_optimizer)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from recsys_moe.config import DEMO_CONFIG, TrainConfig, load_config
from recsys_moe.training.dist import DistInfo
from recsys_moe.training.muon import Muon, is_matrix, orthogonalize
from recsys_moe.training.recipe import scaled_rates
from recsys_moe.training.train import compile_mode


def test_orthogonalize_brings_singular_values_near_one() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 32), (32, 64), (4, 48, 16), (8, 8)]:
        # a badly conditioned gradient: singular values from 1 down to 1e-2 (U diag(s) V^T)
        *lead, m, n = shape
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(*lead, m, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(*lead, n, k, generator=g))
        x = u @ torch.diag_embed(torch.logspace(0, -2, k).expand(*lead, k)) @ v.mT
        s = torch.linalg.svdvals(orthogonalize(x))
        assert s.shape[-1] == k
        # five quintic Newton-Schulz steps leave them in about [0.7, 1.2] (Keller Jordan's
        # coefficients trade exactness for speed); the smallest came up from 1/100 of the largest
        assert float(s.max()) < 1.25, (shape, s)
        assert float(s.min()) > 0.5, (shape, s)


def test_a_matrix_takes_torchs_muon_steps() -> None:
    """Against torch.optim.Muon (2-D only; its Newton-Schulz runs in bfloat16, ours in float32:
    the tolerance is bfloat16's), Nesterov, Adam-RMS matching, decoupled weight decay."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(24, 40, generator=g)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    a = Muon([ours], lr=0.02, momentum=0.9, weight_decay=0.1)
    b = torch.optim.Muon([theirs], lr=0.02, momentum=0.9, weight_decay=0.1,
                         adjust_lr_fn="match_rms_adamw")  # fmt: skip
    for _ in range(4):
        grad = torch.randn(24, 40, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    moved = (theirs - w0).detach()
    assert float(moved.abs().mean()) > 1e-3  # it did move
    assert torch.allclose(ours - w0, moved, rtol=0, atol=0.03 * float(moved.abs().max()))
    # and the momentum buffers agree exactly (no Newton-Schulz in them)
    assert torch.allclose(a.state[ours]["momentum_buffer"], b.state[theirs]["momentum_buffer"])


def test_a_stack_of_experts_is_orthogonalised_expert_by_expert() -> None:
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(3, 16, 8, generator=g)
    stack = torch.nn.Parameter(w0.clone())
    singles = [torch.nn.Parameter(w0[e].clone()) for e in range(3)]
    opt_stack = Muon([stack], lr=0.05)
    opt_singles = Muon(singles, lr=0.05)
    for _ in range(3):
        grad = torch.randn(3, 16, 8, generator=g)
        stack.grad = grad.clone()
        for e, p in enumerate(singles):
            p.grad = grad[e].clone()
        opt_stack.step()
        opt_singles.step()
    for e, p in enumerate(singles):
        assert torch.allclose(stack[e], p, atol=1e-6)
    assert not torch.allclose(stack, w0)


def test_muon_refuses_what_is_not_a_matrix() -> None:
    assert is_matrix(torch.zeros(4, 8, 2)) and is_matrix(torch.zeros(2, 2))
    assert not is_matrix(torch.zeros(8)) and not is_matrix(torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"not a tensor of shape \(1, 32\)"):
        Muon([torch.nn.Parameter(torch.zeros(1, 32))], lr=0.01)


def test_the_recipe_turns_muon_on_beyond_16x_the_reference_batch() -> None:
    """auto: Adam up to 16x lr_reference_batch (the demo's 8192), Muon beyond it at lr x
    muon_lr_scale, with no warm-up; an explicit choice holds at any batch."""
    demo = load_config(DEMO_CONFIG).train
    assert (demo.dense_optimizer, demo.muon_lr_scale, demo.muon_momentum) == ("auto", 4.0, 0.9)

    def at(batch: int, world_size: int = 1, **kw: object) -> tuple[str, float, int]:
        r = scaled_rates(replace(demo, batch_size=batch, **kw), world_size, 93)  # type: ignore[arg-type]
        return r.dense_optimizer, r.muon_lr, r.warmup_steps

    assert at(512) == ("adam", 0.0, 0)
    assert at(8192) == ("adam", 0.0, 5)  # the tables' rate raised: Adam's 5 % warm-up
    assert at(32768) == ("muon", pytest.approx(0.02), 0)
    assert at(16384, world_size=2) == at(32768)  # the global batch counts
    assert at(32768, dense_optimizer="adam") == ("adam", 0.0, 5)
    assert at(512, dense_optimizer="muon", muon_lr_scale=2.0) == ("muon", pytest.approx(0.01), 0)
    assert at(32768, warmup_steps=7)[2] == 7  # an explicit warm-up is kept
    with pytest.raises(ValueError, match="train.muon_momentum must be in"):
        TrainConfig(muon_momentum=1.0)
    with pytest.raises(ValueError, match="train.muon_lr_scale must be a finite number > 0"):
        TrainConfig(muon_lr_scale=0.0)


def test_compile_auto_captures_muon_in_the_step_graph() -> None:
    """compile auto on one GPU is the step graph for Adam and for Muon alike (the graph holds
    both updates; resolved without a GPU: only the device's type is read)."""
    cuda = DistInfo(0, 1, 0, torch.device("cuda", 0), owns_group=False)
    demo = load_config(DEMO_CONFIG)
    assert compile_mode(demo, cuda) == "step"
    big = replace(demo, train=replace(demo.train, batch_size=32768))
    assert compile_mode(big, cuda) == "step"
    assert compile_mode(replace(big, train=replace(big.train, dense_optimizer="adam")), cuda) == (
        "step"
    )


def test_a_tensor_rate_takes_the_floats_steps() -> None:
    """A CUDA graph's rate is a device tensor (step_graph.py): the same updates as the float,
    weight decay included."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 8, 5, generator=g)
    grads = [torch.randn(3, 8, 5, generator=g) for _ in range(4)]
    weights = []
    for lr in (0.02, torch.tensor(0.02)):
        p = torch.nn.Parameter(start.clone())
        opt = Muon([p], lr=lr, momentum=0.9, weight_decay=0.1)  # type: ignore[arg-type]
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        weights.append(p.detach())
    assert not torch.equal(weights[0], start)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)
