"""Model parts on a tiny feature set: shapes, gates, batched experts, gradients, learning."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fixtures import MODEL_FEATURES_TOML, MODEL_TASKS, model_sparse
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, PoolingType

from feature_store.definitions import FeatureSet
from recsys_moe.config import ModelConfig
from recsys_moe.model import ModelOutput, MultiTaskModel, build_model, count_parameters
from recsys_moe.model.heads import TaskHead
from recsys_moe.model.mixture import Experts, Gate, MMoE, mix, mix_unrolled
from recsys_moe.model.model import summed_tables
from recsys_moe.model.objectives import to_natural
from recsys_moe.model.tower import EmbeddingTower
from recsys_moe.training.losses import task_losses, total_loss

CFG = ModelConfig(num_experts=3, expert_dims=[16, 8], tower_dims=[8])
B, T, E, H = 4, 2, 3, 8
D_IN = 4 + 6 + 3 + 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def features() -> FeatureSet:
    return FeatureSet.from_toml(MODEL_FEATURES_TOML)


def make_model(features: FeatureSet, **overrides: object) -> MultiTaskModel:
    cfg = ModelConfig(**{**CFG.__dict__, **overrides})
    return build_model(features, cfg, [t.name for t in MODEL_TASKS])


def test_shapes_of_every_part(features: FeatureSet) -> None:
    torch.manual_seed(0)
    dense, sparse = torch.randn(B, 1), model_sparse()
    ebc = EmbeddingBagCollection(tables=features.embedding_bag_configs())
    tower = EmbeddingTower(ebc=ebc, num_dense=1)
    x = tower(dense, sparse)
    assert tower.out_dim == D_IN and x.shape == (B, D_IN)
    assert torch.equal(x[:, -1:], dense)  # dense features come last
    experts = Experts(E, D_IN, [16, H])
    assert experts(x).shape == (E, B, H)
    mmoe = MMoE(experts=experts, gate=Gate(D_IN, T, E))
    mixed, gates, _, _ = mmoe(x)
    assert mixed.shape == (T, B, H) and gates.shape == (T, B, E) and mmoe.out_dim == H
    assert TaskHead(H, [8]).forward(mixed[0]).shape == (B,)
    out = make_model(features)(dense, sparse)
    assert isinstance(out, ModelOutput)
    assert list(out.logits) == ["click", "watch_time"]
    assert all(v.shape == (B,) for v in out.logits.values())
    assert out.gates.shape == (T, B, E)


def test_tower_concat_is_in_the_dtype_the_next_layers_compute_in(features: FeatureSet) -> None:
    """Under bf16 autocast the tower hands out bfloat16 (the lookups may already output it),
    equal to the float32 tower's output rounded; without autocast, float32 as before."""
    torch.manual_seed(0)
    dense, sparse = torch.randn(B, 1), model_sparse()
    tower = EmbeddingTower(ebc=EmbeddingBagCollection(tables=features.embedding_bag_configs()),
                           num_dense=1)  # fmt: skip
    full = tower(dense, sparse)
    assert full.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = tower(dense, sparse)
        # a bfloat16 lookup output (train.sharding.embedding_output) and float32 dense features
        mixed = tower.combine(full[:, :-1].to(torch.bfloat16), None, dense, torch.bfloat16)
    assert half.dtype == mixed.dtype == torch.bfloat16
    assert torch.equal(half, full.to(torch.bfloat16)) and torch.equal(mixed, half)


def test_mix_as_multiply_adds_equals_the_broadcast_sum() -> None:
    torch.manual_seed(0)
    gates = torch.randn(T, B, E).softmax(-1)
    outs = torch.randn(E, B, H).relu()
    assert torch.allclose(mix_unrolled(gates, outs), mix(gates, outs), atol=1e-6)
    levels = torch.randn(2, E, B, H)  # PLE's upper levels: leading dimensions
    assert torch.allclose(mix_unrolled(gates, levels), mix(gates, levels), atol=1e-6)
    rounded = mix_unrolled(gates, outs.to(torch.bfloat16))  # the gates follow the experts' dtype
    assert rounded.dtype == torch.bfloat16
    assert torch.allclose(rounded.float(), mix(gates, outs), atol=0.05)


def test_empty_bag_pools_to_zero(features: FeatureSet) -> None:
    ebc = EmbeddingBagCollection(tables=features.embedding_bag_configs())
    x = EmbeddingTower(ebc=ebc, num_dense=1)(torch.zeros(B, 1), model_sparse())
    assert torch.all(x[1, 10:13] == 0)  # example 1 has no tags; mean pooling of nothing is 0


def test_averaged_features_equal_mean_pooled_lookups(features: FeatureSet) -> None:
    """``pooling = "mean"``: the model's tables sum every bag (one fused lookup for all of them)
    and the tower divides the averaged features by their ids; the same outputs and table
    gradients as mean-pooled lookups, an empty bag included (the tags of example 1)."""
    configs = features.embedding_bag_configs()
    tables, averaged = summed_tables(configs)
    assert averaged == ["tags"] and {c.pooling for c in tables} == {PoolingType.SUM}
    model = build_model(features, CFG, [t.name for t in MODEL_TASKS])
    assert model.tower.averaged == ["tags"]
    torch.manual_seed(0)
    mean = EmbeddingTower(ebc=EmbeddingBagCollection(tables=configs), num_dense=1)
    summed = EmbeddingTower(ebc=model.tower.ebc, num_dense=1, averaged=averaged)
    summed.ebc.load_state_dict(mean.ebc.state_dict())
    dense, sparse = torch.randn(B, 1), model_sparse()
    want, got = mean(dense, sparse), summed(dense, sparse)
    torch.testing.assert_close(got, want)
    assert torch.all(got[1, 10:13] == 0) and not torch.all(got[0, 10:13] == 0)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    for (name, a), b in zip(mean.ebc.named_parameters(), summed.ebc.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    with pytest.raises(ValueError, match="not the tower's"):  # the batch's keys in another order
        summed(dense, sparse.permute([1, 0, 2]))
    # tables of one pooling are one fused group already: left as they are, nothing averaged
    same = [replace(c, pooling=PoolingType.MEAN) for c in configs]
    assert summed_tables(same) == (same, [])
    assert summed_tables(tables) == (tables, [])


@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.9])
def test_gates_sum_to_one(dropout: float) -> None:
    torch.manual_seed(0)
    mmoe = MMoE(experts=Experts(E, D_IN, [H]), gate=Gate(D_IN, T, E, dropout))
    x = torch.randn(2048, D_IN)
    for train in (True, False):
        mmoe.train(train)
        gates = mmoe(x).gates
        assert torch.isfinite(gates).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(T, 2048))
        dropped = (gates == 0).float().mean().item()
        if train and dropout > 0:
            assert (gates > 0).any(-1).all()  # never all experts masked
            # each gate masked with prob. p, except that an all-masked example gets one back
            expected = dropout - dropout**E / E
            assert abs(dropped - expected) < 0.02
        else:
            assert dropped == 0.0


def test_experts_equal_per_expert_loop() -> None:
    torch.manual_seed(0)
    experts = Experts(E, D_IN, [16, H])
    x = torch.randn(B, D_IN)
    expected = []
    for e in range(E):
        h = x
        for w, b in zip(experts.weights, experts.biases, strict=True):
            h = torch.relu(h @ w[e] + b[e, 0])
        expected.append(h)
    torch.testing.assert_close(experts(x), torch.stack(expected))
    assert [tuple(w.shape) for w in experts.weights] == [(E, D_IN, 16), (E, 16, H)]


def test_task_losses_are_isolated_to_their_heads(features: FeatureSet) -> None:
    torch.manual_seed(0)
    model = make_model(features)
    labels = {"click": torch.tensor([1.0, 0, 1, 0]), "watch_time_s": torch.tensor([3.0, 0, 40, 0])}
    for task, other in (("click", "watch_time"), ("watch_time", "click")):
        model.zero_grad(set_to_none=True)
        losses = task_losses(model(torch.randn(B, 1), model_sparse()), labels, MODEL_TASKS)
        losses[task].backward()
        assert all(p.grad is None or not p.grad.any() for p in model.heads[other].parameters())
        assert any(p.grad is not None and p.grad.any() for p in model.heads[task].parameters())
        assert any(p.grad is not None and p.grad.any() for p in model.mixture.parameters())


def test_losses_and_natural_units() -> None:
    out = ModelOutput(
        logits={"click": torch.zeros(3), "watch_time": torch.log1p(torch.tensor([0.0, 1, 9]))},
        gates=torch.zeros(T, 3, E),
    )
    labels = {"click": torch.tensor([1.0, 0, 1]), "watch_time_s": torch.tensor([0.0, 1, 9])}
    losses = task_losses(out, labels, MODEL_TASKS)
    torch.testing.assert_close(losses["click"], torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(losses["watch_time"], torch.tensor(0.0))
    torch.testing.assert_close(total_loss(losses, MODEL_TASKS), torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(to_natural(MODEL_TASKS[0], torch.zeros(2)), torch.full((2,), 0.5))
    torch.testing.assert_close(
        to_natural(MODEL_TASKS[1], out.logits["watch_time"]), labels["watch_time_s"]
    )
    assert to_natural(MODEL_TASKS[1], torch.tensor([-5.0])).item() == 0.0
    with pytest.raises(ValueError, match="watch_time_s"):
        task_losses(out, {"click": labels["click"]}, MODEL_TASKS)


def test_loss_falls_on_learnable_problem(features: FeatureSet) -> None:
    torch.manual_seed(0)
    n = 512
    user, item = torch.randint(0, 10, (n,)), torch.randint(0, 12, (n,))
    tag_len = torch.randint(0, 3, (n,))
    tags = torch.randint(0, 8, (int(tag_len.sum()),))
    dense = torch.randn(n, 1)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "tags"],
        values=torch.cat([user, item, tags]),
        lengths=torch.cat(
            [torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long), tag_len]
        ),
    )
    affinity = torch.randn(10, 12)
    score = affinity[user, item] + dense[:, 0]
    labels = {"click": (score > 0).float(), "watch_time_s": torch.expm1(score.abs() + 1)}
    model = make_model(features, gate_dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(300):
        loss = total_loss(task_losses(model(dense, sparse), labels, MODEL_TASKS), MODEL_TASKS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-10:]) / 10 < 0.3 * sum(history[:10]) / 10


def test_build_model_on_meta_device(features: FeatureSet) -> None:
    model = build_model(features, CFG, ["click", "watch_time"], device="meta")
    assert all(p.is_meta for p in model.tower.ebc.parameters())
    assert not any(p.is_meta for p in model.mixture.parameters())
    tables = 10 * 4 + 12 * 6 + 8 * 3
    assert count_parameters(model) > tables
    assert count_parameters(model.tower) == tables


def test_unknown_mixture_is_rejected(features: FeatureSet) -> None:
    with pytest.raises(ValueError, match="mmoe"):
        build_model(features, ModelConfig(mixture="nope"), ["click"])
