"""The planner's default sharding types (training/sharding.py): whole tables in one process."""

from __future__ import annotations

import torch

from recsys_moe.config import DEMO_CONFIG, ShardingConfig, load_config
from recsys_moe.model import build_model
from recsys_moe.training.sharding import CUDA_DEFAULT_TYPES, constraints_for


def test_one_process_gets_whole_tables_and_several_the_planners_pick() -> None:
    cfg = load_config(DEMO_CONFIG, [])
    model = build_model(cfg.feature_set(), cfg.model, [t.name for t in cfg.tasks], device="meta")
    cuda = torch.device("cuda")  # the constraints only read the device's type
    one = constraints_for(model, ShardingConfig(), cuda, 1)
    two = constraints_for(model, ShardingConfig(), cuda, 2)
    assert one.keys() == two.keys() and len(one) == len(cfg.feature_set().sparse)
    assert {tuple(c.sharding_types) for c in one.values()} == {("table_wise",)}
    assert {tuple(c.sharding_types) for c in two.values()} == {CUDA_DEFAULT_TYPES}
    assert "column_wise" in CUDA_DEFAULT_TYPES
    # what the config says wins, in one process too
    forced = constraints_for(model, ShardingConfig(types=["column_wise"]), cuda, 1)
    assert {tuple(c.sharding_types) for c in forced.values()} == {("column_wise",)}
