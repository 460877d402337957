"""Numeric-only feature sets in the model: a tower without embedding tables, batches whose KJT has
no keys, costs and matched compute, the int8 scoring path refusing a model without tables."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from torchrec import EmbeddingBagCollection

from feature_store import FeatureSet
from recsys_moe.config import ModelConfig
from recsys_moe.data import iterate_batches, to_tensor_data
from recsys_moe.model import build_model, match_compute, model_cost
from recsys_moe.model.tower import EmbeddingTower
from serving.quantize import quantize_embeddings

NUMERIC = """
[events]
table = "rows"
keys = ["row_id"]

[[features]]
names = ["x_0", "x_1", "x_2", "x_3", "x_4"]
kind = "numeric"
"""
TASKS = ["a", "b"]


@pytest.fixture
def features() -> FeatureSet:
    return FeatureSet.from_toml(NUMERIC)


def test_the_tower_is_the_dense_features(features: FeatureSet) -> None:
    torch.manual_seed(0)
    model = build_model(features, ModelConfig(expert_dims=[8], tower_dims=[4]), TASKS)
    assert model.tower.ebc is None and model.tower.out_dim == 5
    assert not [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    frame = pl.DataFrame({f"x_{j}": [float(i * j) for i in range(10)] for j in range(5)})
    data = to_tensor_data(frame, features, pl.DataFrame({"a": [1.0] * 10, "b": [-1.0] * 10}))
    batches = list(iterate_batches(data, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(b.sparse.keys() == [] and b.sparse.stride() == len(b) for b in batches)
    assert torch.equal(model.tower(batches[0].dense, batches[0].sparse), batches[0].dense)
    out = model(batches[0].dense, batches[0].sparse)
    assert set(out.logits) == set(TASKS) and all(v.shape == (4,) for v in out.logits.values())
    loss = sum(v.sum() for v in out.logits.values())
    loss.backward()  # every dense parameter gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_costs_and_matched_compute_without_tables(features: FeatureSet) -> None:
    cfg = ModelConfig(mixture="mmoe", num_experts=4, expert_dims=[16, 8])
    cost = model_cost(cfg, features, TASKS)
    # 4 experts 5x16 + 16x8, the gate 5x(2*4), the heads' towers over 8: all from D_in = 5
    assert cost["flops_per_example"] > 2 * 4 * (5 * 16 + 16 * 8)
    sb = match_compute(
        ModelConfig(mixture="shared_bottom", expert_dims=[16, 8]), features, TASKS,
        cost["flops_per_example"],
    )  # fmt: skip
    assert model_cost(sb, features, TASKS)["flops_per_example"] <= cost["flops_per_example"]


def test_a_tower_needs_some_feature() -> None:
    with pytest.raises(ValueError, match="at least one feature"):
        EmbeddingTower(ebc=None, num_dense=0)


def test_int8_scoring_refuses_a_model_without_tables(features: FeatureSet) -> None:
    model = build_model(features, ModelConfig(), TASKS)
    with pytest.raises(ValueError, match=r"--quantize int8: the model has no embedding tables"):
        quantize_embeddings(model)
