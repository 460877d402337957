"""One rank of ``test_step_graph.py``'s two-process check, under torchrun on the CPU (gloo):

    torchrun --standalone --nproc-per-node 2 tests/step_graph_ranks.py OUT_DIR

From the same start, the demo model (one table column-wise: the ranks' shards differ) trains the
same batches twice, each rank its own: plain steps (DDP's hooks average the dense gradients)
and the step graph's body without a graph (``StepGraph(graph=False)``: its own all-reduce).
Each rank writes both runs' losses and its weights to ``OUT_DIR/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys_moe.config import DEMO_CONFIG, load_config  # noqa: E402
from recsys_moe.model import build_model  # noqa: E402
from recsys_moe.training.module import TrainLoss, TrainModule  # noqa: E402
from recsys_moe.training.sharding import build_optimizer, shard, train_step  # noqa: E402
from recsys_moe.training.step_graph import StepGraph  # noqa: E402
from tests.test_step_graph import _batches, _weights  # noqa: E402

SIZES = [64, 64, 64, 64, 40, 64, 64]  # rates change every third step; one batch of 40 rows
SETS = ['train.sharding.types=["table_wise"]',
        'train.sharding.constraints={ t_item_id = ["column_wise"] }']  # fmt: skip


def run(graphed: bool) -> dict[str, Any]:
    cfg = load_config(DEMO_CONFIG, SETS)
    features, names = cfg.feature_set(), [t.name for t in cfg.tasks]
    torch.manual_seed(0)
    module = TrainModule(build_model(features, cfg.model, names, device="meta"),
                         TrainLoss.for_config(cfg.model, cfg.tasks))  # fmt: skip
    cpu = torch.device("cpu")
    dmp, _ = shard(module, cfg.train.sharding, device=cpu, embedding_lr=0.1)
    optimizer = build_optimizer(dmp, 1e-2, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s // 3))
    if graphed:
        step = StepGraph.of(dmp, optimizer, cpu, graph=False)
        assert step.world == 2, step.world
        progress = step.progress
    else:
        progress = train_step(dmp, optimizer, cpu, pipeline="plain")[0]
    batches = iter(_batches(dmp, SIZES, seed=3 + dist.get_rank()))  # each rank its own rows
    losses = []
    for _ in SIZES:
        total, per_task = progress(batches)
        losses.append([total.item(), *(v.item() for v in per_task.values())])
        scheduler.step()
    return {"losses": losses, "weights": _weights(dmp)}


def main() -> None:
    dist.init_process_group("gloo")
    try:
        out = {"plain": run(False), "graph": run(True), "rank": dist.get_rank()}
        torch.save(out, Path(sys.argv[1]) / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
