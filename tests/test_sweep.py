from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipelines.synth import synthesize
from recsys_moe.cli import main
from recsys_moe.config import DEMO_CONFIG, TaskConfig, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.model import model_cost
from recsys_moe.tracking import client_for
from recsys_moe.training.sweep import parse_grid, shown_metrics

SMALL = [
    "synth.users=150", "synth.items=60", "synth.days=4", "train.epochs=1",
    "train.batch_size=512", "model.expert_dims=[16]", "model.tower_dims=[8]",
    "mlflow.experiment=sweep",
]  # fmt: skip


def test_grid_values_split_on_top_level_commas_only() -> None:
    assert parse_grid(["model.expert_dims=[64, 32],[8]", "a=x,'y,z'"]) == [
        ("model.expert_dims", ["[64, 32]", "[8]"]),
        ("a", ["x", "'y,z'"]),
    ]
    with pytest.raises(ValueError, match="key=v1,v2"):
        parse_grid(["model.num_experts"])


@pytest.mark.slow
def test_sweep_runs_each_setting_as_a_child_run(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg = load_config(DEMO_CONFIG, SMALL, workdir=tmp_path)
    synthesize(cfg.store_dir, users=150, items=60, days=4, seed=0)
    build_dataset(cfg)
    args = ["sweep", "--workdir", str(tmp_path), "--grid", "model.mixture=mmoe,shared_bottom",
            "--grid", "train.seed=0,1"]  # fmt: skip
    assert main(args + [a for s in SMALL for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "| mmoe | 0 |" in out and "| shared_bottom | 1 |" in out
    # over seeds: one row per mixture, mean ± sd of each metric, and the FLOPs per example
    summary = out.split("Mean ± standard deviation over train.seed:")[1]
    rows = [line for line in summary.splitlines() if line.startswith("| mmoe") or
            line.startswith("| shared_bottom")]  # fmt: skip
    assert len(rows) == 2 and all("| 2 |" in r and " ± " in r for r in rows)

    client = client_for(cfg)
    exp = client.get_experiment_by_name("sweep").experiment_id
    parent = client.search_runs([exp], "tags.`recsys_moe.job` = 'sweep'")[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert (
        sorted(c.data.params["model.mixture"] for c in children)
        == ["mmoe"] * 2 + ["shared_bottom"] * 2
    )
    assert all("valid/click_auc" in c.data.metrics for c in children)
    flops = {c.data.params["model.mixture"]: int(c.data.params["model.flops_per_example"])
             for c in children}  # fmt: skip
    assert all(f > 0 for f in flops.values()) and flops["mmoe"] != flops["shared_bottom"]
    table = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/sweep.md")
    assert table.startswith("| model.mixture | train.seed | flops_per_example |")
    assert "Mean ± standard deviation" in table and parent.data.params["grid.0.model.mixture"]


@pytest.mark.slow
def test_match_compute_gives_every_setting_the_base_configs_flops(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = load_config(DEMO_CONFIG, SMALL, workdir=tmp_path)
    synthesize(cfg.store_dir, users=150, items=60, days=4, seed=0)
    build_dataset(cfg)
    budget = model_cost(cfg.model, cfg.feature_set(), [t.name for t in cfg.tasks])
    args = ["sweep", "--workdir", str(tmp_path), "--match-compute",
            "--grid", "model.mixture=mmoe,shared_bottom,cgc"]  # fmt: skip
    assert main(args + [a for s in SMALL for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "| model.mixture | widths | flops_per_example |" in out
    # the planner is built as TorchRec recommends: none of its per-run notices (sharding.py)
    assert "constructed directly" not in caplog.text and "known issue" not in caplog.text

    client = client_for(cfg)
    exp = client.get_experiment_by_name("sweep").experiment_id
    parent = client.search_runs([exp], "tags.`recsys_moe.job` = 'sweep'")[0]
    assert parent.data.params["match_compute"] == "true"
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    runs = {c.data.params["model.mixture"]: c.data.params for c in children}
    flops = {m: int(p["model.flops_per_example"]) for m, p in runs.items()}
    # at or under the MMoE's budget, and within a few percent of it (widths are integers)
    assert all(0.9 * budget["flops_per_example"] <= f <= budget["flops_per_example"]
               for f in flops.values()), (flops, budget)  # fmt: skip
    # one bottom gets the compute of four experts: wider than an expert
    assert int(runs["shared_bottom"]["model.bottom_dims"].strip("[]").split(",")[0]) > 16


def test_the_table_shows_each_configured_tasks_metrics() -> None:
    tasks = [
        TaskConfig(name="income", kind="binary", label="y"),
        TaskConfig(name="secs", kind="regression", label="s", transform="log1p"),
        TaskConfig(name="rating", kind="regression", label="r"),
    ]
    assert shown_metrics(tasks) == [
        "income_auc", "income_logloss", "secs_rmse", "secs_rmse_log", "rating_rmse"
    ]  # fmt: skip


def test_match_compute_names_a_setting_that_cannot_fit(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    # the budget of a one-unit shared bottom is below any MMoE's gates alone
    sets = [*SMALL, "model.mixture=shared_bottom", "model.bottom_dims=[1]"]
    args = ["sweep", "--workdir", str(tmp_path), "--match-compute",
            "--grid", "model.mixture=shared_bottom,mmoe"]  # fmt: skip
    assert main(args + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert "--match-compute" in err and "mmoe" in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran, nothing was logged
