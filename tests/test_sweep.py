from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import mlflow
import polars as pl
import pytest

from pipelines.synth import synthesize
from recsys_moe.cli import main
from recsys_moe.config import DEMO_CONFIG, TaskConfig, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.model import model_cost
from recsys_moe.tracking import chart_sections, client_for
from recsys_moe.training.sweep import BEST_TAG, parse_grid, report, shown_metrics, summarize

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
    assert "valid/...: the validation split, test/...: the test split" in out
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
    assert table.startswith(
        "| model.mixture | train.seed | flops_per_example | epoch | valid/click_auc | "
        "valid/click_logloss | valid/watch_time_rmse | valid/watch_time_rmse_log | "
        "test/click_auc |"
    )
    assert "Mean ± standard deviation" in table and parent.data.params["grid.0.model.mixture"]

    # each run's numbers are its selected checkpoint's, logged to the run, and the JSON and CSV
    # artifacts say which split each is from
    sweep_json = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/sweep.json")
    runs = {r["run_id"]: r for r in sweep_json["runs"]}
    assert "test/...: the test split" in sweep_json["splits"]
    assert sweep_json["seeds"] == ["train.seed"]
    for child in children:
        row, logged = runs[child.info.run_id], child.data.metrics
        assert row["epoch"] == logged["train/selected_epoch"] == 1
        for split in ("valid", "test"):
            assert row[f"{split}/click_auc"] == pytest.approx(logged[f"selected.{split}.click_auc"])
            assert 0.0 < row[f"{split}/click_auc"] < 1.0  # tiny data, one epoch: any AUC
        assert row["valid/click_auc"] == pytest.approx(logged["valid/click_auc"])  # 1 epoch
        assert row["test/click_auc"] != row["valid/click_auc"]  # another split, not a copy
        sections = [name for name, _ in chart_sections(list(logged))]
        assert sections[:2] == ["train", "valid"], sections  # the loss curves first
    mmoe = [s for s in sweep_json["summary"] if s["model.mixture"] == "mmoe"][0]
    seeds = [r["test/click_auc"] for r in runs.values() if r["model.mixture"] == "mmoe"]
    assert mmoe["runs"] == 2 and mmoe["test/click_auc"] == pytest.approx(statistics.mean(seeds))
    assert mmoe["test/click_auc_sd"] == pytest.approx(statistics.stdev(seeds))
    header = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/sweep.csv").splitlines()[0]
    assert header.startswith("model.mixture,train.seed,") and ",test/click_auc," in header
    best = parent.data.tags[BEST_TAG]
    assert runs[best]["valid/selection_score"] == max(
        r["valid/selection_score"] for r in runs.values()
    )

    # evaluate without --run-id: the sweep's last run, said so, with the sweep's best named;
    # its test AUC, from the registered-model path (raw rows mapped again), is the sweep's
    assert main(["evaluate", "--workdir", str(tmp_path), "--set", "mlflow.experiment=sweep"]) == 0
    out = capsys.readouterr().out
    last = [r for r in runs.values() if r["model.mixture"] == "shared_bottom"][-1]["run_id"]
    assert f"evaluated run {last}, the latest finished training run (the last of sweep " in out
    assert f"{parent.info.run_id}: model.mixture=shared_bottom train.seed=1)" in out
    if best != last:
        assert f"the sweep's best by validation selection score is run {best}" in out
        assert f"pass --run-id {best}" in out
    evaluated = json.loads((tmp_path / "eval" / f"{last}-test.json").read_text())["metrics"]
    assert evaluated["click_auc"] == pytest.approx(runs[last]["test/click_auc"], abs=1e-6)
    assert evaluated["watch_time_rmse"] == pytest.approx(
        runs[last]["test/watch_time_rmse"], rel=1e-5
    )


@pytest.mark.slow
def test_a_grid_over_data_seeds_builds_a_training_set_per_data_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sets = [*SMALL, "data.split=random"]
    args = ["sweep", "--workdir", str(tmp_path), "--grid", "synth.seed=0,1",
            "--grid", "data.split_seed=3,4"]  # fmt: skip
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "Mean ± standard deviation over data.split_seed × synth.seed:" in out

    (folder,) = (tmp_path / "sweeps").iterdir()
    stores = sorted(folder.glob("store-*"))
    datasets = sorted(folder.glob("dataset-*"))
    assert len(stores) == 2 and len(datasets) == 4
    # two synthetic stores of other seeds: other impressions
    a, b = (pl.read_parquet(s / "impressions.parquet") for s in stores)
    assert not a.equals(b)
    # per store, the two split seeds put other rows in the test split, out of the same rows
    cfg = load_config(DEMO_CONFIG, sets, workdir=tmp_path)
    keys = list(cfg.feature_set().events.keys)
    tests = {}
    for d in datasets:
        manifest = json.loads((d / "manifest.json").read_text())
        source = Path(manifest["sources"]["impressions"]).parent
        seed = manifest["split_rule"].split("with seed ")[1].split(":")[0]
        test = pl.read_parquet(d / "test.parquet", columns=keys)
        tests[(source.name, seed)] = set(test.iter_rows())
        assert sum(manifest["rows"].values()) == pl.scan_parquet(
            source / "impressions.parquet").select(pl.len()).collect().item()  # fmt: skip
    assert sorted(tests) == [(s.name, seed) for s in stores for seed in ("3", "4")]
    for s in stores:
        assert tests[(s.name, "3")] != tests[(s.name, "4")]

    client = client_for(cfg)
    exp = client.get_experiment_by_name("sweep").experiment_id
    parent = client.search_runs([exp], "tags.`recsys_moe.job` = 'sweep'")[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trained = {c.data.tags["recsys_moe.dataset"] for c in children}
    assert trained == {str(d.resolve()) for d in datasets}
    summary = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/sweep.json")["summary"]
    assert len(summary) == 1 and summary[0]["runs"] == 4 and summary[0]["test/click_auc_sd"] > 0

    # evaluating one of them with the base config would score another split: a warning says so
    run = children[0]
    args = ["evaluate", "--workdir", str(tmp_path), "--run-id", run.info.run_id]
    sets_base = [*sets, "data.store=" + str(stores[0]), "data.dataset=" + str(datasets[0])]
    if run.data.tags["recsys_moe.dataset"] == str(datasets[0].resolve()):
        sets_base[-1] = "data.dataset=" + str(datasets[1])
    assert main(args + [a for s in sets_base for a in ("--set", s)]) == 0
    err = capsys.readouterr().err
    assert f"warning: run {run.info.run_id} was trained on the training set" in err
    assert f"--set data.dataset={run.data.tags['recsys_moe.dataset']}" in err


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


def test_mean_and_sd_over_every_seed_key_of_the_grid() -> None:
    keys = ["model.mixture", "data.split_seed", "train.seed"]
    rows = [
        {"model.mixture": m, "data.split_seed": d, "train.seed": t, "flops_per_example": 10,
         "epoch": e, "valid/y_auc": v, "test/y_auc": x, "valid/selection_score": 2 * v - 1}
        for m, d, t, e, v, x in [
            ("mmoe", "0", "0", 3, 0.80, 0.70), ("mmoe", "1", "0", 5, 0.82, 0.74),
            ("mmoe", "0", "1", 4, 0.84, math.nan),  # an undefined test AUC is left out
            ("cgc", "0", "0", 2, 0.60, 0.50), ("cgc", "1", "0", 2, 0.62, 0.52),
            ("cgc", "0", "1", 2, 0.64, 0.54),
        ]
    ]  # fmt: skip
    summary = summarize(rows, keys, ["y_auc"])
    assert [s["model.mixture"] for s in summary] == ["mmoe", "cgc"]
    mmoe = summary[0]
    assert mmoe["runs"] == 3 and mmoe["epoch"] == 4.0
    assert mmoe["valid/y_auc"] == pytest.approx(0.82) and mmoe["valid/y_auc_sd"] == pytest.approx(
        0.02
    )
    assert mmoe["test/y_auc"] == pytest.approx(0.72) and mmoe["test/y_auc_sd"] == pytest.approx(
        statistics.stdev([0.70, 0.74])
    )
    text = report(rows, keys, summary, None)
    assert "Mean ± standard deviation over train.seed × data.split_seed:" in text
    assert "| cgc | 3 | 10 | 2.0 ± 0.0 | 0.6200 ± 0.0200 | 0.5200 ± 0.0200 |" in text
    assert "valid/...: the validation split, test/...: the test split" in text
    # one seed value in the grid: no mean over seeds
    assert summarize(rows[:1], keys, ["y_auc"]) == []
