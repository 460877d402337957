"""Validation sharded over ranks (training/validation.py): each rank predicts its block of the
split through the sharded model (a collective forward), and the gathered predictions and gates
equal those of every rank predicting the whole split, row for row. Two gloo processes, the demo
model with its tables sharded table-wise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import small_demo_work

from recsys_moe.config import DEMO_CONFIG, label_columns, load_config
from recsys_moe.training.validation import block

SETS = ["train.sharding.types=['table_wise']", "model.expert_dims=[16]", "model.tower_dims=[8]"]


def test_blocks_cover_the_split_once_with_one_padded_size() -> None:
    for n, world in ((10, 3), (9, 3), (2, 4), (1, 2), (1030, 2)):
        blocks = [block(n, r, world) for r in range(world)]
        rows = [i for start, stop, _ in blocks for i in range(start, stop)]
        assert rows == list(range(n))
        assert len({size for *_, size in blocks}) == 1
        assert all(stop - start <= size for start, stop, size in blocks)


def _rank(rank: int, world: int, work: str, out: str, config: str) -> None:
    import torch.distributed as dist

    from recsys_moe.evaluation.predict import predict_with_gates
    from recsys_moe.model import build_model
    from recsys_moe.training import sharding
    from recsys_moe.training.loader import read_mapped
    from recsys_moe.training.module import OnDevice, TrainLoss, TrainModule
    from recsys_moe.training.validation import predict_sharded

    dist.init_process_group("gloo", init_method=f"file://{out}.init", rank=rank, world_size=world)
    cfg = load_config(config, SETS, workdir=work)
    names = [t.name for t in cfg.tasks]
    torch.manual_seed(0)
    module = TrainModule(build_model(cfg.feature_set(), cfg.model, names, device="meta"),
                         TrainLoss.for_config(cfg.model, cfg.tasks))  # fmt: skip
    dmp, plan = sharding.shard(module, cfg.train.sharding, device=torch.device("cpu"),
                               embedding_lr=0.1)  # fmt: skip
    model = OnDevice(dmp.module.model, torch.device("cpu"))
    valid = read_mapped(cfg.dataset_dir, "valid", cfg.feature_set(), label_columns(cfg.tasks))
    whole = predict_with_gates(model, valid, cfg.tasks, batch_size=100)
    sharded = predict_sharded(model, valid, cfg.tasks, batch_size=100, rank=rank, world_size=world)
    ranks = sorted({r for p in sharding.plan_summary(plan).values() for r in p["ranks"]})
    torch.save({"whole": whole, "sharded": sharded, "ranks": ranks, "n": valid.num_rows},
               f"{out}.{rank}")  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_validation_equals_every_rank_predicting_the_whole_split(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    work = small_demo_work("validation-", SETS)
    out = str(tmp_path / "v")
    # the config's path from here: a spawned child imports the project from sys.path, where an
    # earlier test's mlflow.pyfunc.load_model may have put a model's copy of the code (no configs)
    mp.spawn(_rank, args=(2, str(work), out, str(DEMO_CONFIG)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["ranks"] == [0, 1]  # the tables really are on both ranks
        (whole_preds, whole_gates), (preds, gates) = got["whole"], got["sharded"]
        assert whole_gates.shape[1] == gates.shape[1] == got["n"] > 200  # several batches each
        assert whole_preds.keys() == preds.keys()
        for k in preds:
            np.testing.assert_allclose(preds[k], whole_preds[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gates, whole_gates, rtol=1e-5, atol=1e-6)
