from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys_moe.config import DEMO_CONFIG, config_from_dict, load_config
from recsys_moe.train import GPU_HOST_THREADS, cpu_threads


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
