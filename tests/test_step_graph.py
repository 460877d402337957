"""``train.compile = "step"`` (training/step_graph.py): the dense step, its backward and Adam's
update as one CUDA graph, the tables' lookup and backward eager around it.

On the CPU the same body runs eagerly on the graph's buffers each step (``graph=False``): it
trains the same steps as the plain step, bit for bit (split backward, buffers, the rates of a
schedule, a batch of another size). The CUDA graph itself is checked by ``pytest -m gpu``
(tests/test_gpu.py).
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrec import KeyedJaggedTensor

from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.data import Batch
from recsys_moe.training.dist import DistInfo
from recsys_moe.training.sharding import build_optimizer, train_step
from recsys_moe.training.step_graph import StepGraph
from recsys_moe.training.train import compile_mode, drop_last
from tests.test_sharding import _one_process_dmp

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / ".venv" / "bin" / "torchrun"


def _batches(dmp: Any, sizes: list[int], seed: int = 3) -> list[Batch]:
    """Random batches of the demo's features and labels (clicks, watch time on clicks)."""
    ebc = dmp.module.model.tower.ebc
    configs = ebc._embedding_bag_configs  # noqa: SLF001
    keys = [f for c in configs for f in c.feature_names]
    rows = {f: c.num_embeddings for c in configs for f in c.feature_names}
    num_dense = dmp.module.model.tower.num_dense
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        lengths = torch.randint(0, 4, (len(keys), b), generator=g)
        values = torch.cat([torch.randint(0, rows[k], (int(n.sum()),), generator=g)
                            for k, n in zip(keys, lengths, strict=True)])  # fmt: skip
        click = (torch.rand(b, generator=g) < 0.3).float()
        watch = torch.where(click > 0, 1 + 30 * torch.rand(b, generator=g), torch.nan)
        out.append(Batch(
            dense=torch.randn(b, num_dense, generator=g),
            sparse=KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.flatten()),
            labels={"click": click, "watch_time_s": watch},
        ))  # fmt: skip
    return out


def _train(
    tmp_path: Path, graphed: bool, sizes: list[int], muon_lr: float = 0.0
) -> tuple[list, dict, StepGraph | None]:
    """Steps over batches of ``sizes`` rows with rates that change every third step (Adam's,
    Muon's where ``muon_lr`` > 0, and the tables'); the logged losses and every weight after."""
    with _one_process_dmp(tmp_path / f"{graphed}-{muon_lr}.init", []) as dmp:
        optimizer = build_optimizer(dmp, 1e-2, 0.0, muon_lr=muon_lr, muon_momentum=0.9)
        # rates held for a few steps, then changed (the tables' rate reaches fbgemm only when
        # it changes)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s // 3))
        step = StepGraph.of(dmp, optimizer, torch.device("cpu"), graph=False) if graphed else None
        progress = step.progress if step else train_step(dmp, optimizer, torch.device("cpu"),
                                                         pipeline="plain")[0]  # fmt: skip
        batches = iter(_batches(dmp, sizes))
        losses = []
        for _ in sizes:
            total, per_task = progress(batches)
            losses.append((total.item(), {k: v.item() for k, v in per_task.items()}))
            scheduler.step()
        return losses, _weights(dmp), step


def _weights(dmp: Any) -> dict[str, torch.Tensor]:
    """Copies of this rank's weights: the dense ones, and its shards of the tables (a table
    held by another rank is left out)."""
    weights = {}
    for k, v in dmp.state_dict().items():
        if hasattr(v, "local_shards"):
            shards = v.local_shards()
            v = torch.cat([sh.tensor for sh in shards], dim=1) if shards else None
        if v is not None:
            weights[k] = v.detach().clone()
    return weights


def test_the_step_graphs_body_trains_the_plain_steps_bit_for_bit(tmp_path: Path) -> None:
    """The dense step on the graph's buffers, its gradient for the pooled lookups handed to the
    tables' backward (their fused Adagrad), Adam's update: the same losses and weights as the
    plain step, bit for bit, with the rates changing during the run. A batch of another size (40
    rows) takes a plain step and the buffered steps go on after it."""
    sizes = [64, 64, 64, 64, 64, 40, 64, 64]
    plain_losses, plain_weights, _ = _train(tmp_path, False, sizes)
    graph_losses, graph_weights, step = _train(tmp_path, True, sizes)
    assert step is not None and step.steps == len(sizes) - 1  # one step was not on the buffers
    assert graph_losses == plain_losses
    assert len({round(t, 6) for t, _ in plain_losses}) == len(sizes)  # the losses move
    assert graph_weights.keys() == plain_weights.keys()
    for k, v in plain_weights.items():
        assert torch.equal(graph_weights[k], v), k
    # and training moved the tables and the dense weights (the comparison is not of untouched
    # weights)
    (tmp_path / "none").mkdir()
    _, untouched, _ = _train(tmp_path / "none", False, [])
    moved = {k for k, v in untouched.items() if not torch.equal(v, plain_weights[k])}
    assert any("ebc" in k for k in moved) and any("mixture" in k for k in moved)


def test_the_step_graphs_body_trains_muons_plain_steps_bit_for_bit(tmp_path: Path) -> None:
    """Under ``train.dense_optimizer`` muon the body steps Muon (the matrices) and Adam (the
    rest): the same losses and weights as the plain step, bit for bit, a batch of another size
    included; the matrices moved by Muon's update."""
    sizes = [64, 64, 64, 40, 64, 64]
    plain_losses, plain_weights, _ = _train(tmp_path, False, sizes, muon_lr=4e-2)
    graph_losses, graph_weights, step = _train(tmp_path, True, sizes, muon_lr=4e-2)
    assert step is not None and len(step.dense) == 2  # Adam and Muon
    muon = step.dense[1]
    assert type(muon).__name__ == "Muon" and muon.state  # its momentum made by the steps
    assert graph_losses == plain_losses
    for k, v in plain_weights.items():
        assert torch.equal(graph_weights[k], v), k
    _, adam_weights, _ = _train(tmp_path, False, sizes)  # the same steps under Adam alone
    experts = [k for k in plain_weights if "mixture" in k and plain_weights[k].dim() == 3]
    assert experts and all(not torch.equal(adam_weights[k], plain_weights[k]) for k in experts)


def test_step_graph_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StepGraph(None, [], torch.optim.Adam([torch.zeros(1, requires_grad=True)]),  # type: ignore[arg-type]
                  torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="train.compile = 'step' .* takes plain steps"):
        load_config(DEMO_CONFIG, ["train.compile=step", "train.pipeline=sparse_dist"])
    # a data_parallel table is trained by Adam with a gradient made after the graph's update:
    # refused (it would silently never train)
    with (
        _one_process_dmp(tmp_path / "dp.init", ["train.sharding.types=['data_parallel']"]) as dmp,
        pytest.raises(ValueError, match="data_parallel"),
    ):
        StepGraph.of(dmp, build_optimizer(dmp, 1e-2, 0.0), torch.device("cpu"), graph=False)


@pytest.mark.parametrize(
    ("device", "world", "sets", "mode"),
    [
        ("cuda", 1, [], "step"),  # one GPU: the step graph
        ("cpu", 1, [], False),  # a CPU: eager, as before auto
        ("cuda", 2, [], False),  # several processes: TorchRec's pipeline, eager
        ("cuda", 1, ["model.mixture=topk_mmoe"], False),  # routes rows by data: no graph
        ("cuda", 1, ["train.pipeline=sparse_dist"], False),  # the graph takes plain steps
        ("cuda", 1, ["train.pipeline=plain"], "step"),
        ("cuda", 1, ["train.compile=cudagraphs"], "cudagraphs"),  # a setting stays as given
        ("cpu", 1, ["train.compile=step"], "step"),
        ("cuda", 1, ["train.compile=false"], False),
    ],
)
def test_compile_auto_is_the_step_graph_in_one_gpu_process_only(
    device: str, world: int, sets: list[str], mode: bool | str
) -> None:
    cfg = load_config(DEMO_CONFIG, sets)
    assert cfg.train.compile == ("auto" if not any("compile" in x for x in sets) else mode)
    info = DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device(device),
                    owns_group=False)  # fmt: skip
    assert compile_mode(cfg, info) == mode
    # a compiled step leaves the short last batch out (train.drop_last = auto), as resolved
    assert drop_last(replace(cfg.train, compile=mode)) == bool(mode)
    if cfg.train.compile == "auto":  # unresolved (a loader built outside train): no compile
        assert drop_last(cfg.train) is False


@pytest.mark.slow  # two torchrun processes: ~30 s
@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs the project's .venv/bin/torchrun")
def test_the_step_graphs_body_on_two_ranks_trains_as_ddp_does(tmp_path: Path) -> None:
    """Two processes (gloo), each its own batches: the step graph's body, which averages the
    dense gradients with its own all-reduce, trains the same losses and weights as plain steps
    under DDP, bit for bit on each rank, a batch of another size included
    (tests/step_graph_ranks.py)."""
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "step_graph_ranks.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for run in runs:
        assert run["graph"]["losses"] == run["plain"]["losses"], run["rank"]
        for k, v in run["plain"]["weights"].items():
            assert torch.equal(run["graph"]["weights"][k], v), (run["rank"], k)
    # the ranks saw different rows (their losses differ) and yet hold the same dense weights:
    # the gradients were averaged; their shards of the column-wise table differ
    assert runs[0]["plain"]["losses"] != runs[1]["plain"]["losses"]
    dense = [k for k in runs[0]["plain"]["weights"] if "mixture" in k]
    assert dense and all(torch.equal(runs[0]["graph"]["weights"][k], runs[1]["graph"]["weights"][k])
                         for k in dense)  # fmt: skip
