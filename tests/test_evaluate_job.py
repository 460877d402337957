"""``recsys-moe evaluate`` end to end on a small synthetic run (real TorchRec, a real SQLite MLflow
store): the numbers of the report recomputed from ``--predictions`` alone, the report and plots
on the run, the registered pyfunc predicting the same rows identically, the output guarded."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import polars as pl
import pytest
from packaging.requirements import Requirement
from scipy.stats import rankdata

from pipelines.synth import synthesize
from pipelines.training_set import load_split
from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.evaluation.evaluate import EVAL_RUN_TAG, TABLE, evaluation_run
from recsys_moe.registry import TORCH_CPU_INDEX, register
from recsys_moe.tracking import chart_sections, client_for
from recsys_moe.training.train import train
from serving.pyfunc import CODE_PATH

SMALL = [
    "synth.users=800",
    "synth.items=200",
    "synth.days=5",
    "train.epochs=1",
    "train.batch_size=256",
    "eval.bootstrap=20",
    "mlflow.experiment=ev",
    "mlflow.registered_model=ev-model",
]
pytestmark = pytest.mark.slow  # synth, train, evaluate in a subprocess: a minute


def _cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    sets = [a for s in SMALL for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", "evaluate", "--workdir", str(work), *sets, *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(DEMO_CONFIG, SMALL, workdir=work)
    s = cfg.synth
    synthesize(cfg.store_dir, users=s.users, items=s.items, days=s.days, seed=s.seed)
    build_dataset(cfg)
    result = train(cfg)
    preds = work / "out" / "predictions.parquet"
    proc = _cli(work, "--run-id", result.run_id, "--predictions", str(preds))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "eval" / f"{result.run_id}-test.json").read_text())
    return SimpleNamespace(
        cfg=cfg, run_id=result.run_id, preds=preds, report=report, stdout=proc.stdout
    )


def _auc(pred: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney U from average ranks (scipy), independent of the report's code."""
    r = rankdata(pred)
    pos = label == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_report_numbers_are_recomputed_from_the_predictions_file(run: SimpleNamespace) -> None:
    frame = pl.read_parquet(run.preds)
    test = load_split(run.cfg.dataset_dir, "test").collect()
    assert frame.height == test.height == run.report["rows"]
    assert frame.select("request_id", "user_id", "item_id").equals(
        test.select("request_id", "user_id", "item_id")
    )
    m = run.report["metrics"]
    p, y = frame["pred_click"].to_numpy(), frame["click"].to_numpy()
    assert m["click_auc"] == pytest.approx(_auc(p, y), abs=1e-6)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    assert m["click_logloss"] == pytest.approx(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    assert m["click_calibration"] == pytest.approx(q.mean() / y.mean())
    clicked = frame.filter(pl.col("click") == 1)
    err = (clicked["pred_watch_time"] - clicked["watch_time_s"]).to_numpy()
    assert m["watch_time_rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
    # GAUC by user and MRR per request with Polars, from the same file
    gauc, rows = [], []
    for _, g in frame.group_by("user_id"):
        if 0 < g["click"].sum() < g.height:
            gauc.append(_auc(g["pred_click"].to_numpy(), g["click"].to_numpy()))
            rows.append(g.height)
    assert m["click_gauc_user_id"] == pytest.approx(np.average(gauc, weights=rows), rel=1e-9)
    rr = (
        frame.with_columns(rank=pl.col("score").rank("ordinal", descending=True).over("request_id"))
        .filter(pl.col("click") == 1)
        .group_by("request_id")
        .agg(rr=1.0 / pl.col("rank").min())
    )
    assert m["rank_mrr"] == pytest.approx(rr["rr"].mean(), rel=1e-6)  # torchmetrics: float32
    assert m["rank_requests"] == rr.height
    lo, hi = run.report["ci"]["click_auc"]
    assert lo < m["click_auc"] < hi
    assert "click_auc" in run.stdout and "[" in run.stdout


def test_metrics_report_and_plots_are_on_the_evaluation_run(run: SimpleNamespace) -> None:
    client = client_for(run.cfg)
    ev = evaluation_run(client, run.run_id)
    assert ev.info.run_id == run.report["evaluation_run_id"]
    assert ev.data.tags["mlflow.parentRunId"] == run.run_id  # nested under the training run
    assert ev.info.run_name == f"eval-test-{client.get_run(run.run_id).info.run_name}"
    metrics = ev.data.metrics
    m = run.report["metrics"]
    assert metrics["test/click_auc"] == pytest.approx(m["click_auc"])
    assert metrics["test/rank_ndcg_at_3"] == pytest.approx(m["rank_ndcg_at_3"])
    # the headline numbers only: segments and intervals are the table's
    assert {k.removeprefix("test/") for k in metrics} == {k for k, v in m.items() if
                                                         np.isfinite(v)}  # fmt: skip
    table = client.load_table(ev.info.experiment_id, TABLE, [ev.info.run_id])
    seg, ci = run.report["segments"]["segment"], run.report["segment_ci"]["segment"]
    value = next(iter(seg))
    row = table[(table["column"] == "segment") & (table["value"] == value)
                & (table["metric"] == "click_auc")].iloc[0]  # fmt: skip
    assert row["estimate"] == pytest.approx(seg[value]["click_auc"])
    assert [row["ci_low"], row["ci_high"]] == pytest.approx(ci[value]["click_auc"])
    whole = table[table["column"].isna() & (table["metric"] == "watch_time_xauc")].iloc[0]
    assert [whole["ci_low"], whole["ci_high"]] == pytest.approx(run.report["ci"]["watch_time_xauc"])
    names = {a.path for a in client.list_artifacts(ev.info.run_id)}
    for f in ("report.md", "click_curves.png", "by_segment.png", "experts_by_segment.png", TABLE,
              f"{run.run_id}-test.json"):  # fmt: skip
        assert f in names
    page = Path(run.report["report"]).read_text()
    assert "## By segment" in page and "![click_curves](click_curves.png)" in page
    # the training run keeps its own page: no test/ series, its sections start train, valid
    train_run = client.get_run(run.run_id)
    assert not [k for k in train_run.data.metrics if k.startswith("test/")]
    assert [s for s, _ in chart_sections(list(train_run.data.metrics))][:2] == ["train", "valid"]
    assert train_run.data.tags[f"{EVAL_RUN_TAG}.test"] == ev.info.run_id


@pytest.fixture(scope="module")
def registered(run: SimpleNamespace) -> SimpleNamespace:
    return register(run.cfg, python_model=CODE_PATH, run_id=run.run_id)


def test_registered_pyfunc_predicts_the_evaluated_rows_identically(
    run: SimpleNamespace, registered: SimpleNamespace
) -> None:
    client_for(run.cfg)
    model = mlflow.pyfunc.load_model(f"models:/{registered.name}/{registered.version}")
    test = load_split(run.cfg.dataset_dir, "test").collect()
    features = run.cfg.feature_set().input_columns
    out = model.predict(test.select(features).to_pandas())
    frame = pl.read_parquet(run.preds)
    assert np.array_equal(out["p_click"].to_numpy(), frame["pred_click"].to_numpy())
    assert np.array_equal(out["watch_time_s"].to_numpy(), frame["pred_watch_time"].to_numpy())


def test_version_has_numeric_metrics_hashes_and_the_runs_datasets(
    run: SimpleNamespace, registered: SimpleNamespace
) -> None:
    client = client_for(run.cfg)
    version = client.get_model_version(registered.name, registered.version)
    assert version.source.startswith("models:/m-")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    metrics = {m.key: m.value for m in logged.metrics}
    assert metrics["test/click_auc"] == pytest.approx(run.report["metrics"]["click_auc"])
    assert "test/rank_mrr" in metrics and not any("/by_" in k or "_ci_" in k for k in metrics)
    manifest = (run.cfg.dataset_dir / "manifest.json").read_bytes()
    assert version.tags["recsys_moe.data_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert len(version.tags["recsys_moe.config_sha256"]) == 64
    assert "click_auc" in version.description and "config sha256" in version.description
    _requirements_install_on_a_cpu_machine(f"models:/{registered.name}/1")
    evaluation = client.get_run(run.report["evaluation_run_id"])
    assert version.tags["recsys_moe.eval_run"] == evaluation.info.run_id
    inputs = evaluation.inputs.dataset_inputs
    tested = [i for i in inputs if i.dataset.name == f"{run.cfg.dataset_dir.name}/test"]
    assert len(tested) == 1
    tags = {t.key: t.value for t in tested[0].tags}
    assert tags["mlflow.data.context"] == "evaluation" and tags["rows"] == str(run.report["rows"])
    auc = next(m for m in logged.metrics if m.key == "test/click_auc")  # names its data
    assert (auc.dataset_name, auc.dataset_digest) == (
        tested[0].dataset.name,
        tested[0].dataset.digest,
    )


def _requirements_install_on_a_cpu_machine(uri: str) -> None:
    """The model's requirements.txt, as pip reads it on a clean CPU machine: versions without
    local labels, torch from PyTorch's CPU index, the CPU fbgemm and never the CUDA one (which
    torchrec's wheel would pull: torchrec travels as the model's code instead), torchrec's
    runtime dependencies as its installed metadata names them. (A fresh venv installed from this
    file and predicted identically: README, "The registered model on another machine".)"""
    path = Path(mlflow.pyfunc.get_model_dependencies(uri))
    lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
    pins = dict(x.split("==") for x in lines if "==" in x)
    assert [x for x in lines if "==" not in x] == [f"--extra-index-url {TORCH_CPU_INDEX}"]
    assert not [v for v in pins.values() if "+" in v], pins
    assert "fbgemm-gpu" not in pins and "torchrec" not in pins
    assert pins["fbgemm-gpu-cpu"] == md.version("fbgemm-gpu-cpu")
    assert pins["torch"] == md.version("torch").split("+")[0]
    needed = {Requirement(r).name for r in md.requires("torchrec") or [] if "extra ==" not in r}
    assert needed - {"fbgemm-gpu"} <= set(pins), needed
    code = path.parent / "code"
    assert (code / "torchrec" / "__init__.py").is_file()
    meta = (code / f"torchrec-{md.version('torchrec')}.dist-info" / "METADATA").read_text()
    assert f"Version: {md.version('torchrec')}" in meta
    assert not list((code / "torchrec").rglob("*.pyc"))


@pytest.mark.parametrize("ref", ["@champion", "/1"])
def test_mlflow_models_predict_serves_registry_uris(
    run: SimpleNamespace, registered: SimpleNamespace, ref: str, tmp_path: Path
) -> None:
    """The MLflow CLI itself (a fresh process, the local environment) on the SQLite store."""
    assert registered.version == "1" and registered.alias == "champion"
    test = load_split(run.cfg.dataset_dir, "test").head(7).collect()
    rows = test.select(run.cfg.feature_set().input_columns).to_pandas()
    payload = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    (tmp_path / "in.json").write_text(json.dumps(payload))
    env = {**os.environ, "MLFLOW_TRACKING_URI": run.cfg.tracking_uri()}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "models", "predict",
         "-m", f"models:/{registered.name}{ref}", "-i", str(tmp_path / "in.json"), "-t", "json",
         "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = pl.DataFrame(json.loads((tmp_path / "out.json").read_text())["predictions"])
    frame = pl.read_parquet(run.preds).head(7)
    assert out["p_click"].to_numpy() == pytest.approx(frame["pred_click"].to_numpy(), rel=1e-6)
    assert out["watch_time_s"].to_numpy() == pytest.approx(
        frame["pred_watch_time"].to_numpy(), rel=1e-6
    )


def test_predictions_may_not_overwrite_an_input(run: SimpleNamespace) -> None:
    target = run.cfg.store_dir / "impressions.parquet"
    before = target.read_bytes()
    proc = _cli(Path(run.cfg.workdir), "--run-id", run.run_id, "--predictions", str(target))
    assert proc.returncode == 2 and "sits inside the store" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert target.read_bytes() == before
