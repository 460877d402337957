"""training/sharding.py: the planner's default sharding types (whole tables in one process) and
the fused lookups' settings."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

from recsys_moe.config import DEMO_CONFIG, ShardingConfig, load_config
from recsys_moe.model import build_model
from recsys_moe.training.sharding import CUDA_DEFAULT_TYPES, constraints_for, fused_params


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


def test_fused_lookup_settings_follow_the_config_and_autocast() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = ShardingConfig()
    # bfloat16 lookups only where the model runs under bf16 autocast on a GPU
    assert fused_params(default, cuda, bf16=True)["output_dtype"] == SparseType.BF16
    assert fused_params(default, cuda, bf16=False)["output_dtype"] == SparseType.FP32
    assert fused_params(default, cpu, bf16=True)["output_dtype"] == SparseType.FP32
    forced = ShardingConfig(embedding_output="float32")
    assert fused_params(forced, cuda, bf16=True)["output_dtype"] == SparseType.FP32
    # no second check on the device by default (recsys_moe.data checks ids on the host)
    assert fused_params(default, cpu, bf16=False)["bounds_check_mode"] == BoundsCheckMode.NONE
    for name in ("warning", "fatal", "v2_warning", "v2_fatal", "none"):
        mode = fused_params(ShardingConfig(bounds_check=name), cpu, bf16=False)
        assert mode["bounds_check_mode"].name == name.upper()


def test_sharding_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="bounds_check"):
        load_config(DEMO_CONFIG, ["train.sharding.bounds_check=strict"])
    with pytest.raises(ValueError, match="embedding_output"):
        load_config(DEMO_CONFIG, ["train.sharding.embedding_output=fp16"])
