"""training/sharding.py: the planner's default sharding types (whole tables in one process) and
the fused lookups' settings."""

from __future__ import annotations

import math

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

from recsys_moe.config import DEMO_CONFIG, ShardingConfig, load_config
from recsys_moe.model import build_model
from recsys_moe.training.sharding import (
    CUDA_DEFAULT_TYPES,
    constraints_for,
    embedding_optimizer,
    fused_params,
)


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


def _fused_state(name: str, tmp_path) -> tuple[dict, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The fused table optimizer's state after one training step with
    ``train.embedding_optimizer = name`` on the CPU, and a table's weights before and after."""
    import torch.distributed as dist

    from recsys_moe.training.module import TrainLoss, TrainModule
    from recsys_moe.training.sharding import build_optimizer, shard

    cfg = load_config(DEMO_CONFIG, [])
    features, names = cfg.feature_set(), [t.name for t in cfg.tasks]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/{name}.init", rank=0,
                            world_size=1)  # fmt: skip
    try:
        torch.manual_seed(0)
        module = TrainModule(build_model(features, cfg.model, names, device="meta"),
                             TrainLoss.for_config(cfg.model, cfg.tasks))  # fmt: skip
        dmp, _ = shard(module, cfg.train.sharding, device=torch.device("cpu"), embedding_lr=0.1,
                       embedding_optimizer_name=name)  # fmt: skip
        key = next(k for k in dmp.state_dict() if k.endswith("item_id.weight"))
        # every table in one fused lookup: the averaged (mean-pooled) ones too (summed_tables)
        lookups = [e for m in dmp.module.model.tower.ebc._lookups for e in m._emb_modules]  # noqa: SLF001
        assert len(lookups) == 1, lookups

        def table() -> torch.Tensor:
            return dmp.state_dict()[key].local_shards()[0].tensor.detach().clone()

        before = table()
        optimizer = build_optimizer(dmp, 1e-3, 0.0)
        ebc = dmp.module.model.tower.ebc
        ids = torch.tensor([3, 3, 7, 11])
        kjt = _one_feature_kjt(ebc, "item_id", ids)
        optimizer.zero_grad()
        ebc(kjt).values().sum().backward()
        optimizer.step()
        state = dmp.fused_optimizer.state_dict()["state"]
        return {k: v for k, v in state.items() if "item_id" in k}, before, table()
    finally:
        dist.destroy_process_group()


def _one_feature_kjt(ebc: torch.nn.Module, feature: str, ids: torch.Tensor):  # noqa: ANN202
    """A batch of ``len(ids)`` rows: ``ids`` as ``feature``'s one id per row, no id for the
    other features."""
    from torchrec import KeyedJaggedTensor

    keys = [f for c in ebc._embedding_bag_configs for f in c.feature_names]  # noqa: SLF001
    lengths = torch.cat([torch.ones(len(ids), dtype=torch.int64) if k == feature
                         else torch.zeros(len(ids), dtype=torch.int64) for k in keys])  # fmt: skip
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=lengths)


def test_the_tables_optimizer_is_the_configured_fused_one(tmp_path) -> None:  # noqa: ANN001
    """``train.embedding_optimizer``: fbgemm's fused optimizer of that kind updates exactly the
    rows looked up, with its own state (row-wise Adagrad one accumulator per row, Adagrad one
    per weight, SGD none); the ones fbgemm's CPU build lacks are refused on the CPU, naming
    the setting and what to use instead."""
    rows, dim = 5001, 8  # the demo's item_id table
    looked_up = {3, 7, 11}
    for name, sizes in (("rowwise_adagrad", [rows]), ("adagrad", [rows * dim]), ("sgd", [])):
        state, before, after = _fused_state(name, tmp_path)
        changed = set(torch.nonzero((after != before).any(dim=1)).flatten().tolist())
        assert changed == looked_up, name
        # (sharded tensors: ``size()``, not ``numel()``)
        states = [v for s in state.values() for v in s.values() if hasattr(v, "size")]
        assert sorted(math.prod(v.size()) for v in states) == sizes, name
    for name in ("adam", "rowwise_adam", "lamb", "rowwise_lamb"):
        with pytest.raises(ValueError, match=f"embedding_optimizer = '{name}' runs on CUDA only"):
            embedding_optimizer(name, torch.device("cpu"))
        assert embedding_optimizer(name, torch.device("cuda")) is not None
    with pytest.raises(ValueError, match="embedding_optimizer"):
        load_config(DEMO_CONFIG, ["train.embedding_optimizer=adamw"])
