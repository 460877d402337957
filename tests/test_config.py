from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys_moe.config import DEMO_CONFIG, config_from_dict, load_config
from recsys_moe.training.train import GPU_HOST_THREADS, cpu_threads


def test_demo_config_loads_with_its_feature_definitions() -> None:
    cfg = load_config()
    assert Path(cfg.features_path).is_file()
    fs = cfg.feature_set()
    assert {t.name for t in cfg.tasks} == {"click", "watch_time"}
    assert fs.sparse and fs.dense


def test_overrides_parse_toml_values_and_nested_keys(tmp_path: Path) -> None:
    cfg = load_config(
        DEMO_CONFIG,
        [
            "train.epochs=7",
            "model.expert_dims=[8, 4]",
            "mlflow.experiment=exp-x",
            "score.weights.click=2.5",
            "tasks.watch_time.mask=click",
        ],
        workdir=tmp_path,
    )
    assert cfg.train.epochs == 7
    assert cfg.model.expert_dims == [8, 4]
    assert cfg.mlflow.experiment == "exp-x"
    assert cfg.score.weights["click"] == 2.5
    assert {t.name: t.mask for t in cfg.tasks} == {"click": "", "watch_time": "click"}
    assert cfg.store_dir == tmp_path / "data"
    assert cfg.tracking_uri().startswith("sqlite:///") or cfg.tracking_uri()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epocs=3", "epocs"),
        ("nonsense", "key=value"),
        ("tasks=[{name='x'}]", "tasks"),
        ("tasks.clik.weight=2", "no tasks entry named 'clik'"),
        ("tasks.weight=2", "'tasks' is not a section"),
    ],
)
def test_bad_config_values_are_named(override: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_config(DEMO_CONFIG, [override])


@pytest.mark.parametrize(
    "override, needle",
    [  # every bad value fails at load, naming the key, the value and what is accepted
        ("train.batch_size=abc", r"train.batch_size: expected an integer, got 'abc'"),
        ("train.epochs=2.5", r"train.epochs: expected an integer, got 2.5"),
        ("train.epochs=0", r"train.epochs must be >= 1, got 0"),
        ("train.checkpoint.every=-1", r"train.checkpoint.every must be >= 0"),
        ("train.lr=-1e-3", r"train.lr must be a finite number > 0"),
        ("train.bf16=1", r"train.bf16: expected true or false, got 1"),
        ("model.mixture=moe", r"model.mixture: expected one of 'single_task', .*'ple', got 'moe'"),
        (
            "train.loader=disk",
            r"train.loader: expected one of 'auto', 'memory', 'device', 'stream'",
        ),
        ("train.lr_schedule=cosine", r"train.lr_schedule: expected one of 'constant', 'linear'"),
        ("train.pipeline=fast", r"train.pipeline: expected one of 'auto', 'sparse_dist'"),
        ("train.sharding.types=['row']", r"train.sharding.types\[0\]: expected one of .*"),
        ("model.expert_dims=[64, 'a']", r"model.expert_dims\[1\]: expected an integer"),
        ("model.expert_dims=[]", r"model.expert_dims must be widths >= 1"),
        ("model.gate_dropout=1.0", r"model.gate_dropout must lie in \[0, 1\)"),
        ("model.loss_weighting=gradnorm", r"model.loss_weighting: expected one of 'fixed'"),
        ("tasks.click.kind=ordinal", r"tasks.click.kind: expected one of 'binary', 'regression'"),
        ("tasks.watch_time.objective=huber", r"tasks.watch_time.objective: expected one of"),
        ("score.weights.clik=1.0", r"score.weights: no task\(s\) \['clik'\]"),
        ("score.top_k=0", r"score.top_k must be >= 1"),
        ("synth.task_conflict=2.0", r"synth.task_conflict must lie in \[0, 1\]"),
        ("data=3", r"data: expected a table of settings, got 3"),
        ("train.epoch=3", r"train: unknown key\(s\) \['epoch'\] \(did you mean \['epochs'\]\?\)"),
    ],
)
def test_bad_values_fail_at_load_with_the_accepted_ones(override: str, needle: str) -> None:
    with pytest.raises(ValueError, match=f"config .*demo.toml: {needle}"):
        load_config(DEMO_CONFIG, [override])


def test_values_are_conformed_and_objectives_resolved_at_load() -> None:
    cfg = load_config(DEMO_CONFIG, ["train.lr=1", "model.gate_dropout=0"])
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.model.gate_dropout, float)
    assert {t.name: t.objective for t in cfg.tasks} == {"click": "bce", "watch_time": "mse_log1p"}
    assert cfg.train.resume is False
    assert load_config(DEMO_CONFIG, ["train.resume=latest"]).train.resume == "latest"


def test_the_feature_set_is_parsed_once_per_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from feature_store import FeatureSet

    cfg = load_config(DEMO_CONFIG)
    calls = []
    original = FeatureSet.load
    monkeypatch.setattr(FeatureSet, "load", lambda p, **kw: calls.append(p) or original(p, **kw))
    assert cfg.feature_set() is cfg.feature_set()
    assert len(calls) == 1


def test_config_round_trips_through_dict() -> None:
    cfg = load_config(DEMO_CONFIG, ["train.lr=0.01"])
    back = config_from_dict(cfg.to_dict(), config_dir=cfg.config_dir, where="test")
    assert back.to_dict() == cfg.to_dict()


def test_cpu_threads_auto_caps_a_gpu_hosts_threads_only() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(GPU_HOST_THREADS + 2)
        assert cpu_threads(0, torch.device("cuda", 0)) == GPU_HOST_THREADS
        assert cpu_threads(0, torch.device("cpu")) == 0  # torch's default stays
        assert cpu_threads(3, torch.device("cuda", 0)) == 3  # a setting wins
        torch.set_num_threads(1)
        assert cpu_threads(0, torch.device("cuda", 0)) == 1  # never more than torch has
    finally:
        torch.set_num_threads(before)
