"""Checkpoints: resume continues exactly; a save killed before its commit leaves the previous one.

Single process (a gloo group of one), a tiny synthetic training set; ``train.checkpoint.every``
makes the straight run leave the checkpoints that the resumed runs start from.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import assert_same_weights
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

from pipelines.synth import synthesize
from recsys_moe.config import DEMO_CONFIG, Config, label_columns, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.tracking import client_for
from recsys_moe.training import checkpoint
from recsys_moe.training.dist import DistInfo
from recsys_moe.training.loader import MemoryLoader, ParquetLoader
from recsys_moe.training.train import TrainResult, train, train_loader

ROOT = Path(__file__).resolve().parents[1]
# 2 epochs of a few steps (~2000 training rows, batch 512); a checkpoint every 3 steps
SMALL = [
    "synth.users=150", "synth.items=60", "synth.days=4",
    "train.epochs=2", "train.batch_size=512", "train.log_every=2",
    "train.checkpoint.every=3", "train.checkpoint.keep=0",
    "model.expert_dims=[16]", "model.tower_dims=[8]",
    "mlflow.experiment=ckpt",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ckpt-data")
    cfg = load_config(DEMO_CONFIG, SMALL, workdir=work)
    synthesize(cfg.store_dir, users=150, items=60, days=4, seed=0)
    build_dataset(cfg)
    return cfg.dataset_dir


def config(work: Path, dataset: Path, *extra: str) -> Config:
    return load_config(DEMO_CONFIG, [*SMALL, f"data.dataset={dataset}", *extra], workdir=work)


# slow (a training run); the tests that use it are marked slow, so that -m "not slow" skips it
@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> tuple[Config, TrainResult]:
    cfg = config(tmp_path_factory.mktemp("straight"), dataset)
    return cfg, train(cfg)


@pytest.mark.slow
def test_resume_continues_exactly(straight: tuple[Config, TrainResult]) -> None:
    cfg, full = straight
    steps = len(full.losses)
    assert 7 <= steps <= 14  # checkpoints at 3, 6 (and 9, 12)
    run_dir = cfg.path("checkpoints") / full.run_id
    assert (run_dir / checkpoint.LATEST).read_text() == f"ckpt-{steps - steps % 3}"
    # resume mid-epoch (step 3 of 4) from the straight run's checkpoint: same losses, same weights
    resumed = train(
        config(Path(cfg.workdir), Path(cfg.data.dataset), f"train.resume={run_dir}/ckpt-3")
    )
    assert resumed.run_id == full.run_id  # the same MLflow run continues
    assert resumed.losses == full.losses[3:]
    assert_same_weights(resumed.model, full.model)


@pytest.mark.slow
def test_resume_continues_exactly_under_muon(tmp_path: Path, dataset: Path) -> None:
    """train.dense_optimizer = muon: its momentum buffers are in the checkpoint (a third part of
    the combined optimizer), so a resumed run takes the straight run's steps."""
    muon = "train.dense_optimizer=muon"
    cfg = config(tmp_path, dataset, muon)
    full = train(cfg)
    params = client_for(cfg).get_run(full.run_id).data.params
    assert params["train.dense_optimizer_effective"] == "muon"
    assert float(params["train.muon_lr_effective"]) == pytest.approx(4 * cfg.train.lr)
    run_dir = cfg.path("checkpoints") / full.run_id
    resumed = train(config(tmp_path, dataset, muon, f"train.resume={run_dir}/ckpt-3"))
    assert resumed.losses == full.losses[3:]
    assert_same_weights(resumed.model, full.model)
    # the same checkpoint resumed by Adam: refused by name, not a half-loaded optimizer
    with pytest.raises(ValueError, match=r"ckpt-3 has no optimizer\.state\.dense\.model\.\S+"
                       r"weight\.exp_avg \(and \d+ more\): it was written by a run with another "
                       r"model or other optimizers \(train.dense_optimizer"):  # fmt: skip
        train(config(tmp_path, dataset, "train.dense_optimizer=adam",
                     f"train.resume={run_dir}/ckpt-3"))  # fmt: skip


def test_a_checkpoint_of_other_keys_is_refused_by_name(tmp_path: Path) -> None:
    """``check_keys`` compares DCP's metadata with the state to load: a key this run needs and
    the checkpoint lacks, or model weights this run's model lacks (which ``dcp.load`` would
    leave unread: a smaller model would resume silently), is named; equal keys pass."""
    import torch.distributed.checkpoint as dcp

    t = torch.ones(2)
    saved = {"model": {"a": t, "b": t}, "optimizer": {"state": {"a": {"m": t}}}}
    dcp.save(saved, checkpoint_id=str(tmp_path / "ckpt-1"))
    checkpoint.check_keys(tmp_path / "ckpt-1", saved)
    smaller = {"model": {"a": t}, "optimizer": saved["optimizer"]}
    with pytest.raises(ValueError, match=r"ckpt-1 holds model\.b, which this run's model lacks"):
        checkpoint.check_keys(tmp_path / "ckpt-1", smaller)
    other = {"model": saved["model"], "optimizer": {"state": {"a": {"v": t, "w": t}}}}
    with pytest.raises(ValueError, match=r"ckpt-1 has no optimizer\.state\.a\.v \(and 1 "
                       r"more\): it was written by a run with another model or other"):  # fmt: skip
        checkpoint.check_keys(tmp_path / "ckpt-1", other)


@pytest.mark.slow
def test_the_loops_own_collections_train_the_same_and_give_the_collector_back(
    tmp_path: Path, dataset: Path, straight: tuple[Config, TrainResult]
) -> None:
    """train.gc_every: Python's automatic collection is off in the loop, young collections
    every N steps instead; the losses and weights are those of a plain run."""
    _, full = straight
    assert gc.isenabled()
    run = train(config(tmp_path, dataset, "train.gc_every=2"))
    assert gc.isenabled()
    assert run.losses == full.losses
    assert_same_weights(run.model, full.model)


@pytest.mark.slow
def test_killed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, dataset: Path, straight: tuple[Config, TrainResult]
) -> None:
    env = os.environ | {checkpoint.FAULT_ENV: "6", "PYTHONPATH": str(ROOT)}
    args = [arg for s in [*SMALL, f"data.dataset={dataset}"] for arg in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", "train", "--workdir", str(tmp_path), *args],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 17, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    assert (run_dir / checkpoint.LATEST).read_text() == "ckpt-3"
    assert (run_dir / "ckpt-6").is_dir() and not (run_dir / "ckpt-6" / checkpoint.COMPLETE).exists()
    assert json.loads((run_dir / "ckpt-3" / checkpoint.COMPLETE).read_text())["step"] == 3
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.resolve(str(run_dir / "ckpt-6"), tmp_path / "checkpoints")

    # --resume (latest) picks ckpt-3 and finishes as the straight run did
    resumed = train(config(tmp_path, dataset, "train.resume=true"))
    assert resumed.run_id == run_dir.name
    _, full = straight
    assert resumed.losses == full.losses[3:]
    assert_same_weights(resumed.model, full.model)
    steps = len(full.losses)
    assert (run_dir / checkpoint.LATEST).read_text() == f"ckpt-{steps - steps % 3}"
    assert (run_dir / "ckpt-6" / checkpoint.COMPLETE).is_file()
    # the killed attempt logged steps 1-6 (windows of 2 and before each save); the resumed one
    # trained from step 4 and logged only what was missing: every step exactly once
    client = client_for(config(tmp_path, dataset))
    history = client.get_metric_history(resumed.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))


@pytest.mark.slow
def test_torchrec_train_pipeline_matches_the_plain_step(
    straight: tuple[Config, TrainResult], dataset: Path, tmp_path: Path
) -> None:
    """TorchRec's TrainPipelineSparseDist (what CUDA runs use) traces the model with torch.fx;
    on CPU it must trace too and train the same steps as the plain loop."""
    _, plain = straight
    piped = train(config(tmp_path, dataset, "train.pipeline=sparse_dist"))
    assert len(piped.losses) == len(plain.losses)
    assert piped.losses == pytest.approx(plain.losses, rel=1e-5)


@pytest.mark.slow
def test_resume_with_the_streaming_loader_and_not_across_loaders(
    tmp_path: Path, dataset: Path
) -> None:
    threads = torch.get_num_threads()
    stream = config(tmp_path, dataset, "train.loader=stream", "train.cpu_threads=1")
    full = train(stream)
    assert torch.get_num_threads() == threads  # train.cpu_threads holds for the run only
    # nothing of the run's sharded model is left for the next run in this process (sweeps)
    assert not [o for o in gc.get_objects() if isinstance(o, ShardedEmbeddingBagCollection)]
    run_dir = stream.path("checkpoints") / full.run_id
    # the same thread count as the run it resumes: CPU kernels split their sums by thread, and
    # 1 and 2 threads give weights a few 1e-8 apart (seen on a 2-core machine)
    resumed = train(
        config(tmp_path, dataset, "train.loader=stream", "train.cpu_threads=1",
               f"train.resume={run_dir}/ckpt-3")
    )  # fmt: skip
    assert resumed.losses == full.losses[3:]
    assert_same_weights(resumed.model, full.model)
    # the in-memory loader orders rows differently: resuming this run with it would not be exact
    with pytest.raises(ValueError, match="order"):
        train(config(tmp_path, dataset, "train.loader=memory", f"train.resume={run_dir}/ckpt-3"))
    # another train.drop_last (train.compile's auto sets it on a GPU) puts the steps elsewhere
    with pytest.raises(ValueError, match="drop_last=False but this loader True"):
        train(config(tmp_path, dataset, "train.loader=stream", "train.drop_last=true",
                     f"train.resume={run_dir}/ckpt-3"))  # fmt: skip
    with pytest.raises(
        ValueError, match="train.loader: expected one of 'auto', 'memory', 'device', 'stream'"
    ):
        train(config(tmp_path, dataset, "train.loader=disk"))


def test_auto_loader_holds_small_splits_and_streams_large_ones(
    tmp_path: Path, dataset: Path
) -> None:
    info = DistInfo(
        rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), owns_group=False
    )
    for limit, kind in [(128, MemoryLoader), (0, ParquetLoader)]:
        cfg = config(tmp_path, dataset, f"train.memory_loader_max_mb={limit}")
        features = cfg.feature_set()
        labels = label_columns(cfg.tasks)
        loader = train_loader(cfg.dataset_dir, cfg.train, features, labels, info)
        assert type(loader) is kind and (loader.rank, loader.world_size) == (1, 2)


@pytest.mark.slow
def test_a_killed_training_leaves_no_running_run_once_the_next_job_starts(
    tmp_path: Path, dataset: Path
) -> None:
    """SIGKILL (no handler runs) while training: the run stays RUNNING until the next job of the
    experiment starts, which marks it KILLED and does not take it for a finished run."""
    sets = [*SMALL, f"data.dataset={dataset}", "train.epochs=500"]
    args = [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_moe.cli", "train", "--workdir", str(tmp_path), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    client = client_for(config(tmp_path, dataset))
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name("ckpt")
            if exp and client.search_runs([exp.experiment_id]):
                break
            time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    (run,) = client.search_runs([client.get_experiment_by_name("ckpt").experiment_id])
    assert run.info.status == "RUNNING"  # nothing could end it
    nxt = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", "evaluate", "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert nxt.returncode == 2 and "no finished training run" in nxt.stderr, nxt.stderr[-2000:]
    assert client.get_run(run.info.run_id).info.status == "KILLED"


@pytest.mark.parametrize(
    "job, setting, needle",
    [
        ("train", "train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
        ("train", "train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
        ("train", "train.epochs=0", "train.epochs must be >= 1"),
        ("train", "train.checkpoint.every=-1", "train.checkpoint.every must be >= 0"),
        ("evaluate", "model.mixture=moe", "model.mixture: expected one of"),
    ],
)
def test_bad_settings_end_before_any_run(
    tmp_path: Path, dataset: Path, job: str, setting: str, needle: str
) -> None:
    args = [a for s in [*SMALL, f"data.dataset={dataset}", setting] for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", job, "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: config "), proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no run, no checkpoint
