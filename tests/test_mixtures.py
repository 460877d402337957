"""Every mixture: gates, task isolation, learning; top-k dispatch and balance; cost; gate stats."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
from fixtures import MODEL_FEATURES_TOML, MODEL_TASKS, model_sparse

from feature_store.definitions import FeatureSet
from recsys_moe.config import MIXTURES, ModelConfig
from recsys_moe.data import to_tensor_data
from recsys_moe.evaluation.gates import (
    expert_usage,
    gate_entropy,
    gate_stats,
    plot_expert_heatmap,
    polarization_warning,
    top1_share,
    usage_by_group,
)
from recsys_moe.evaluation.predict import predict_with_gates
from recsys_moe.model import build_mixture, build_model, match_compute, model_cost
from recsys_moe.model.heads import TaskHead
from recsys_moe.model.mixture import Experts, Gate, TopKMMoE
from recsys_moe.training.losses import task_losses

D_IN, T = 12, 2
NAMES = [t.name for t in MODEL_TASKS]


def small_cfg(mixture: str, **overrides: object) -> ModelConfig:
    base = ModelConfig(
        mixture=mixture,
        num_experts=4,
        expert_dims=[16, 8],
        tower_dims=[8],
        top_k=1,
        num_task_experts=1,
        num_shared_experts=2,
        num_levels=2,
    )
    return replace(base, **overrides)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def features() -> FeatureSet:
    return FeatureSet.from_toml(MODEL_FEATURES_TOML)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("mixture", MIXTURES)
def test_gates_sum_to_one_within_support(mixture: str, dropout: float) -> None:
    torch.manual_seed(0)
    mix = build_mixture(small_cfg(mixture, gate_dropout=dropout), D_IN, T)
    x = torch.randn(256, D_IN)
    support = mix.gate_support()
    for train in (True, False):
        mix.train(train)
        out = mix(x)
        assert out.mixed.shape == (T, 256, mix.out_dim)
        assert out.gates.shape == (T, 256, support.shape[1])
        assert (out.gates >= 0).all() and torch.isfinite(out.gates).all()
        torch.testing.assert_close(out.gates.sum(-1), torch.ones(T, 256))
        assert not out.gates[~support[:, None, :].expand_as(out.gates)].any()


@pytest.mark.parametrize("mixture", MIXTURES)
def test_task_losses_reach_only_their_own_head(features: FeatureSet, mixture: str) -> None:
    torch.manual_seed(0)
    model = build_model(features, small_cfg(mixture), NAMES)
    labels = {"click": torch.tensor([1.0, 0, 1, 0]), "watch_time_s": torch.tensor([3.0, 0, 40, 0])}
    for task, other in (("click", "watch_time"), ("watch_time", "click")):
        model.zero_grad(set_to_none=True)
        losses = task_losses(model(torch.randn(4, 1), model_sparse()), labels, MODEL_TASKS)
        losses[task].backward()
        assert all(p.grad is None or not p.grad.any() for p in model.heads[other].parameters())
        assert any(p.grad is not None and p.grad.any() for p in model.heads[task].parameters())
        assert any(p.grad is not None and p.grad.any() for p in model.mixture.parameters())
    if mixture == "single_task":  # independent bottoms: the click loss leaves bottom 1 alone
        model.zero_grad(set_to_none=True)
        losses = task_losses(model(torch.randn(4, 1), model_sparse()), labels, MODEL_TASKS)
        losses["click"].backward()
        assert all(not w.grad[1].any() for w in model.mixture.bottoms.weights)


def _toy_problem(n: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D_IN, generator=g)
    click = (x[:, 0] + x[:, 1] * x[:, 2] > 0).float()
    watch = (x[:, 3] - x[:, 0]).abs() + 0.5 * x[:, 4]
    return x, click, watch


@pytest.mark.parametrize("mixture", MIXTURES)
def test_every_mixture_learns(mixture: str) -> None:
    torch.manual_seed(0)
    x, click, watch = _toy_problem()
    mix = build_mixture(small_cfg(mixture, gate_dropout=0.1), D_IN, T)
    heads = torch.nn.ModuleList(TaskHead(mix.out_dim, [8]) for _ in range(T))
    opt = torch.optim.Adam([*mix.parameters(), *heads.parameters()], lr=1e-2)
    history = []
    for _ in range(120):
        out = mix(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(heads[0](out.mixed[0]), click)
        loss = loss + torch.nn.functional.mse_loss(heads[1](out.mixed[1]), watch)
        total = loss if out.balance_loss is None else loss + 0.01 * out.balance_loss
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(loss.item())
    assert np.mean(history[-10:]) < 0.5 * np.mean(history[:10]), (history[:3], history[-3:])


def _count_expert_rows(mix: TopKMMoE) -> tuple[list[int], list[int]]:
    """Patch ``mix`` to record rows given to each single-expert call and batched calls."""
    rows = [0] * mix.experts.num_experts
    batched: list[int] = []
    single = mix.experts.expert

    def counted(e: int, x: torch.Tensor) -> torch.Tensor:
        rows[e] += x.shape[0]
        return single(e, x)

    mix.experts.expert = counted  # type: ignore[method-assign]
    mix.experts.register_forward_hook(lambda *_: batched.append(1))
    return rows, batched


@pytest.mark.parametrize("num_tasks", [1, 2])
def test_topk_computes_only_the_routed_experts(num_tasks: int) -> None:
    torch.manual_seed(0)
    e, b = 4, 300
    experts = Experts(e, D_IN, [16, 8])
    mix = TopKMMoE(experts=experts, gate=Gate(D_IN, num_tasks, e), top_k=1).eval()
    rows, batched = _count_expert_rows(mix)
    x = torch.randn(b, D_IN)
    out = mix(x)
    routed = (out.gates > 0).any(0)  # [B, E]
    assert (out.gates > 0).sum(-1).eq(1).all()  # k = 1 per example and task
    assert rows == routed.sum(0).tolist() and not batched  # each expert ran on its rows only
    assert sum(rows) <= num_tasks * b and (num_tasks > 1 or sum(rows) == b)
    assert mix.last_experts_per_example == sum(rows) / b
    # same result as running every expert densely and mixing with the sparse gates
    dense = torch.einsum("tbe,ebh->tbh", out.gates, experts(x))
    torch.testing.assert_close(out.mixed, dense)


def test_topk_capacity_drops_overflow_in_training_only() -> None:
    torch.manual_seed(0)
    e, b = 4, 400
    gate = Gate(D_IN, 1, e)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))  # expert 0 oversubscribed
    mix = TopKMMoE(experts=Experts(e, D_IN, [8]), gate=gate, top_k=1, capacity_factor=1.0)
    rows, _ = _count_expert_rows(mix)
    x = torch.randn(b, D_IN)
    out = mix(x)
    assert max(rows) <= b // e and 0 < out.drop_rate.item() < 1
    assert out.drop_rate.item() == pytest.approx(1 - sum(rows) / b)
    dropped = (out.mixed[0].abs().sum(-1) == 0).float().mean().item()  # k=1: dropped rows are 0
    assert dropped == pytest.approx(out.drop_rate.item(), abs=0.02)
    mix.eval()
    assert mix(x).drop_rate.item() == 0.0


def test_load_balancing_loss_evens_usage() -> None:
    torch.manual_seed(0)
    e = 4
    gate = Gate(D_IN, T, e)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([2.0, 1.0, 0.0, 0.0]).repeat(T))
    mix = TopKMMoE(experts=Experts(e, D_IN, [8]), gate=gate, top_k=1)
    x = torch.rand(1024, D_IN) * 2 - 1  # uniform random inputs

    def ratio() -> float:
        with torch.no_grad():
            usage = expert_usage(mix(x).gates)
        return (usage.max(-1).values / usage.min(-1).values.clamp_min(1e-3)).max().item()

    before = ratio()
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(40):
        loss = mix(x).balance_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ratio()
    assert before > 10 and after < 2, (before, after)
    assert mix(x).balance_loss.item() == pytest.approx(T, rel=0.1)  # T at perfect balance


def test_model_cost_counts_and_matched_compute(features: FeatureSet) -> None:
    cfg = small_cfg("mmoe")
    costs = {m: model_cost(replace(cfg, mixture=m), features, NAMES) for m in MIXTURES}
    assert all(c["parameters"] > 0 and c["flops_per_example"] > 0 for c in costs.values())
    d = 4 + 6 + 3 + 1
    expert = 2 * (d * 16 + 16 * 8)
    heads = T * 2 * (8 * 8 + 8 * 1)
    assert costs["mmoe"]["flops_per_example"] == 4 * expert + 2 * d * T * 4 + heads
    assert costs["shared_bottom"]["flops_per_example"] == expert + heads
    assert costs["single_task"]["flops_per_example"] == T * expert + heads
    assert costs["topk_mmoe"]["flops_per_example"] == T * 1 * expert + 2 * d * T * 4 + heads
    assert costs["ple"]["flops_per_example"] > costs["cgc"]["flops_per_example"]
    model = build_model(features, cfg, NAMES)
    assert model_cost(model, features, NAMES) == costs["mmoe"]
    budget = costs["mmoe"]["flops_per_example"]
    for mixture in ("shared_bottom", "single_task", "ple", "topk_mmoe"):
        matched = match_compute(replace(cfg, mixture=mixture), features, NAMES, budget)
        flops = model_cost(matched, features, NAMES)["flops_per_example"]
        assert 0.9 * budget <= flops <= budget, (mixture, flops, budget)
    wide = match_compute(replace(cfg, mixture="shared_bottom"), features, NAMES, budget)
    assert wide.bottom_dims[0] > cfg.expert_dims[0]  # one bottom gets the experts' budget


# ---- gate statistics ----------------------------------------------------------------------------
def known_gates() -> torch.Tensor:
    uniform = torch.full((2, 4), 0.25)  # task 0: uniform on both examples
    onehot = torch.tensor([[0.0, 0, 1, 0], [0, 0, 1, 0]])  # task 1: always expert 2
    return torch.stack([uniform, onehot])  # [T=2, B=2, E=4]


def test_gate_stats_on_known_gates() -> None:
    g = known_gates()
    torch.testing.assert_close(expert_usage(g), torch.tensor([[0.25] * 4, [0, 0, 1.0, 0]]))
    torch.testing.assert_close(top1_share(g)[1], torch.tensor([0, 0, 1.0, 0]))
    torch.testing.assert_close(gate_entropy(g), torch.tensor([1.0, 0.0]))
    half = torch.tensor([[[0.5, 0.5, 0, 0], [1.0, 0, 0, 0]]])
    torch.testing.assert_close(expert_usage(half), torch.tensor([[0.75, 0.25, 0, 0]]))
    torch.testing.assert_close(gate_entropy(half), torch.tensor([0.25]))  # (log 2 + 0)/2/log 4
    # a CGC-style task that sees 2 of 4 experts and splits evenly is at maximum entropy
    support = torch.tensor([[True, False, True, False]])
    even = torch.tensor([[[0.5, 0, 0.5, 0]]])
    torch.testing.assert_close(gate_entropy(even, support), torch.tensor([1.0]))
    stats = gate_stats(even, ["click"], support)
    assert stats["gates/click/entropy"] == pytest.approx(1.0)
    assert set(stats) == {"gates/click/entropy"} | {
        f"gates/click/{k}_e{i}" for k in ("usage", "top1") for i in (0, 2)
    }


def test_polarization_detector() -> None:
    warning = polarization_warning(known_gates(), ["click", "watch_time"])
    assert warning is not None and "'watch_time'" in warning and "'click'" not in warning
    assert "expert 2" in warning
    assert polarization_warning(known_gates()[:1], ["click"]) is None
    # a gate over a single expert (shared_bottom) is not polarized, it has no choice
    assert polarization_warning(torch.ones(2, 5, 1), ["click", "watch_time"]) is None


def test_usage_by_group_and_heatmap(tmp_path, features: FeatureSet) -> None:
    g = torch.tensor([[[1.0, 0], [0, 1], [0.5, 0.5], [0, 1]]])  # [T=1, B=4, E=2]
    by = usage_by_group(g, torch.tensor([0, 1, 0, 1]), num_groups=3)
    assert by.shape == (1, 3, 2)
    np.testing.assert_allclose(by[0, :2], [[0.75, 0.25], [0.0, 1.0]])
    assert np.isnan(by[0, 2]).all()  # no examples in group 2
    model = build_model(features, small_cfg("cgc"), NAMES)
    rows = pl.DataFrame(
        {"user_id": [1, 2, 3, 4] * 2, "item_id": [5, 6, 7, 8] * 2,
         "tags": [[1], [2, 3], [], [4]] * 2, "duration_s": [0.1, -0.2, 0.3, 0.0] * 2},
        schema_overrides={"tags": pl.List(pl.Int64)},
    )  # fmt: skip
    _, gates = predict_with_gates(model, to_tensor_data(rows, features), MODEL_TASKS, batch_size=4)
    assert gates.shape == (T, 8, 4) and model.training
    by_group = usage_by_group(gates, torch.tensor([0, 1, 2, 0] * 2), 3)
    path = plot_expert_heatmap(by_group, ["a", "b", "c"], tmp_path / "h.png", task_names=NAMES)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
