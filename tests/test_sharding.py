"""training/sharding.py: the planner's default sharding types (whole tables in one process) and
the fused lookups' settings."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    # bfloat16 lookups only for a forward alone under bf16 autocast on a GPU: trained lookups
    # output float32 (the averaging as the saved model serves it)
    assert fused_params(default, cuda, bf16=True, backward=False)["output_dtype"] == SparseType.BF16
    assert fused_params(default, cuda, bf16=True)["output_dtype"] == SparseType.FP32
    assert (
        fused_params(default, cuda, bf16=False, backward=False)["output_dtype"] == SparseType.FP32
    )
    assert fused_params(default, cpu, bf16=True, backward=False)["output_dtype"] == SparseType.FP32
    forced_bf16 = ShardingConfig(embedding_output="bfloat16")
    assert fused_params(forced_bf16, cuda, bf16=True)["output_dtype"] == SparseType.BF16
    forced = ShardingConfig(embedding_output="float32")
    assert fused_params(forced, cuda, bf16=True)["output_dtype"] == SparseType.FP32
    # no second check on the device by default (recsys_moe.data checks ids on the host)
    assert fused_params(default, cpu, bf16=False)["bounds_check_mode"] == BoundsCheckMode.NONE
    for name in ("warning", "fatal", "v2_warning", "v2_fatal", "none"):
        mode = fused_params(ShardingConfig(bounds_check=name), cpu, bf16=False)
        assert mode["bounds_check_mode"].name == name.upper()


def test_every_configurable_embedding_optimizer_has_torchrecs_class() -> None:
    """The names ``train.embedding_optimizer`` accepts (config.EmbeddingOptimizer) are those
    sharding maps to TorchRec's classes, and fbgemm's CPU kernels are among them."""
    from typing import get_args

    from recsys_moe.config import EmbeddingOptimizer
    from recsys_moe.training.sharding import CPU_EMBEDDING_OPTIMIZERS, EMBEDDING_OPTIMIZERS

    assert set(get_args(EmbeddingOptimizer)) == set(EMBEDDING_OPTIMIZERS)
    assert set(CPU_EMBEDDING_OPTIMIZERS) <= set(EMBEDDING_OPTIMIZERS)


def test_sharding_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="bounds_check"):
        load_config(DEMO_CONFIG, ["train.sharding.bounds_check=strict"])
    with pytest.raises(ValueError, match="embedding_output"):
        load_config(DEMO_CONFIG, ["train.sharding.embedding_output=fp16"])


@contextlib.contextmanager
def _one_process_dmp(init_file: Path, sets: list[str], **shard_kwargs: Any) -> Iterator[Any]:
    """The demo model (config overrides ``sets``) sharded in a one-process gloo group on the
    CPU, seed 0; the group is destroyed on exit."""
    import torch.distributed as dist

    from recsys_moe.training.module import TrainLoss, TrainModule
    from recsys_moe.training.sharding import shard

    cfg = load_config(DEMO_CONFIG, sets)
    features, names = cfg.feature_set(), [t.name for t in cfg.tasks]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        module = TrainModule(build_model(features, cfg.model, names, device="meta"),
                             TrainLoss.for_config(cfg.model, cfg.tasks))  # fmt: skip
        dmp, _ = shard(module, cfg.train.sharding, device=torch.device("cpu"), embedding_lr=0.1,
                       **shard_kwargs)  # fmt: skip
        yield dmp
    finally:
        dist.destroy_process_group()


def _fused_state(name: str, tmp_path) -> tuple[dict, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The fused table optimizer's state after one training step with
    ``train.embedding_optimizer = name`` on the CPU, and a table's weights before and after."""
    from recsys_moe.training.sharding import build_optimizer

    with _one_process_dmp(tmp_path / f"{name}.init", [], embedding_optimizer_name=name) as dmp:
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


def _trained_tables(tmp_path, direct: bool, batches: list) -> tuple[list, dict, int]:  # noqa: ANN001
    """The demo model's pooled outputs for ``batches`` and its tables after a training step on
    each, in one process, with or without the direct lookup; whether the batches took it."""
    from recsys_moe.training.sharding import _DirectLookup, build_optimizer

    sets = [f"train.sharding.direct_lookup={str(direct).lower()}"]
    with _one_process_dmp(tmp_path / f"{direct}.init", sets) as dmp:
        ebc = dmp.module.model.tower.ebc
        installed = isinstance(ebc.__dict__.get("forward"), _DirectLookup)
        optimizer = build_optimizer(dmp, 1e-3, 0.0)
        outputs = []
        for kjt in batches:
            optimizer.zero_grad()
            pooled = ebc(kjt)
            outputs.append(pooled.to_dict())
            (pooled.values() * torch.arange(pooled.values().shape[1])).sum().backward()
            optimizer.step()
        tables = {k: v.local_shards()[0].tensor.detach().clone()
                  for k, v in dmp.state_dict().items() if hasattr(v, "local_shards")}  # fmt: skip
        # the batches went to the kernel directly: TorchRec's input dist was never set up
        direct_count = int(installed and ebc._has_uninitialized_input_dist)  # noqa: SLF001
        if batches and direct:  # the first batch, its keys reversed: TorchRec's forward (its
            # first call: it keeps the order it first sees, whichever it is)
            first = batches[0]
            flipped = first.permute(list(reversed(range(len(first.keys())))))
            with torch.no_grad():
                outputs += [ebc(first).to_dict(), ebc(flipped).to_dict()]
        return outputs, tables, direct_count


def test_the_direct_lookup_in_one_process_equals_torchrecs_forward(tmp_path) -> None:  # noqa: ANN001
    """``train.sharding.direct_lookup``: in one process the fused lookup is called on the batch
    without TorchRec's dists. Same pooled features and the same tables after training as
    TorchRec's forward, bit for bit; a batch whose keys are in another order takes TorchRec's
    forward (which reorders them) and gets the same result."""
    from torchrec import KeyedJaggedTensor

    cfg = load_config(DEMO_CONFIG, [])
    configs = build_model(cfg.feature_set(), cfg.model, [t.name for t in cfg.tasks],
                          device="meta").tower.ebc.embedding_bag_configs()  # fmt: skip
    keys = [f for c in configs for f in c.feature_names]
    rows = {f: c.num_embeddings for c in configs for f in c.feature_names}
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        lengths = torch.randint(0, 4, (len(keys), 16), generator=g)
        values = torch.cat([torch.randint(0, rows[k], (int(n.sum()),), generator=g)
                            for k, n in zip(keys, lengths, strict=True)])  # fmt: skip
        batches.append(KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.flatten()))
    out_direct, tables_direct, n_direct = _trained_tables(tmp_path, True, batches)
    out_trec, tables_trec, n_trec = _trained_tables(tmp_path, False, batches)
    assert (n_direct, n_trec) == (1, 0)
    assert len(out_direct) == len(out_trec) + 2 == len(batches) + 2
    for a, b in zip(out_direct[: len(out_trec)], out_trec, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    in_order, flipped = out_direct[-2:]  # the direct lookup, and TorchRec's forward
    assert all(torch.equal(in_order[k], flipped[k]) for k in in_order)
    assert tables_direct.keys() == tables_trec.keys() and len(tables_direct) == len(keys)
    for k, v in tables_direct.items():
        assert torch.equal(v, tables_trec[k]), k
    # and the training moved the tables: the comparison is not of untouched weights
    (tmp_path / "untrained").mkdir()
    _, untouched, _ = _trained_tables(tmp_path / "untrained", True, [])
    assert any(not torch.equal(untouched[k], v) for k, v in tables_direct.items())


def test_a_sharding_type_forced_on_one_process_keeps_torchrecs_forward(tmp_path) -> None:  # noqa: ANN001
    """Column shards of a table, forced on one process (``train.sharding.types``), are joined
    again by TorchRec's output dist: no direct lookup there, and the pooled features still have
    the tables' widths."""
    from recsys_moe.training.sharding import _DirectLookup

    with _one_process_dmp(tmp_path / "cw.init", ['train.sharding.types=["column_wise"]']) as dmp:
        ebc = dmp.module.model.tower.ebc
        assert not isinstance(ebc.__dict__.get("forward"), _DirectLookup)
        ids = torch.tensor([3, 7])
        pooled = ebc(_one_feature_kjt(ebc, "item_id", ids)).to_dict()
        assert pooled["item_id"].shape == (2, 8) and pooled["item_id"].abs().sum() > 0
