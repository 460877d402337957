"""Numeric-only feature sets end to end: real TorchRec, a real SQLite MLflow store in tmp dirs.

1. A plain table of rows (no entity) with 24 numeric columns (declared by one pattern block)
   and two regression targets of any sign: training set (random split) → train (no embedding
   tables; train.pipeline sparse_dist falls back to plain steps) → evaluate → register → the
   registered pyfunc.
2. The synthetic demo data with its numeric item columns only (a names group): train → register
   → the candidate-scoring job.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow.types.schema import DataType
from torchrec import EmbeddingBagCollection

from feature_store import FeatureSet
from pipelines.mappings import Mappings
from pipelines.synth import synthesize
from pipelines.training_set import load_manifest, load_split
from recsys_moe.bundle import load_bundle
from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.evaluation.evaluate import evaluate
from recsys_moe.evaluation.predict import predict_frame
from recsys_moe.registry import register
from recsys_moe.training.train import train
from serving.pyfunc import CODE_PATH
from serving.score import PART, score

pytestmark = pytest.mark.slow  # two trainings, an evaluation, two registrations: ~1-2 min

ROWS, DIMS = 8000, 24

FEATURES = """
# a plain table of rows: no entity, the features are columns of the events table, no time
# column (the split is random)
[events]
table = "rows"
keys = ["row_id"]

[[features]]
pattern = "x_*"        # x_0 .. x_23, resolved against the rows table
kind = "numeric"
"""

CONFIG = """
features = "features.toml"

[data]
split = "random"

[model]
expert_dims = [32, 16]
tower_dims = [16]

[[tasks]]
name = "a"
kind = "regression"
label = "a"

[[tasks]]
name = "b"
kind = "regression"
label = "b"

[train]
epochs = 4
batch_size = 256
pipeline = "sparse_dist"   # no tables: plain steps (TorchRec's pipeline needs a sharded module)
heatmap_by = []

[mlflow]
experiment = "byo"
registered_model = "byo"

[score]
weights = { a = 1.0, b = 0.0 }
"""


def _write_table(store: Path) -> None:
    """Targets of any sign and scale from a few of the columns, with noise."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(ROWS, DIMS))
    a = 40.0 * x[:, 0] - 30.0 * np.tanh(2 * x[:, 1]) - 20.0 + 5.0 * rng.normal(size=ROWS)
    b = -0.01 * (np.abs(x[:, 3]) + x[:, 4]) + 0.002 * rng.normal(size=ROWS)
    columns = {"row_id": np.arange(ROWS), "a": a, "b": b} | {f"x_{j}": x[:, j] for j in range(DIMS)}
    store.mkdir(parents=True)
    pl.DataFrame(columns).write_parquet(store / "rows.parquet")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("byo")
    _write_table(work / "data")
    (work / "features.toml").write_text(FEATURES)
    (work / "config.toml").write_text(CONFIG)
    cfg = load_config(work / "config.toml", [], workdir=work)
    build_dataset(cfg)
    result = train(cfg)
    report = evaluate(cfg, run_id=result.run_id)
    reg = register(cfg, python_model=CODE_PATH, run_id=result.run_id)
    return SimpleNamespace(cfg=cfg, result=result, report=report, reg=reg)


def test_the_model_has_no_tables_and_beats_the_mean(plain: SimpleNamespace) -> None:
    model = plain.result.model
    assert model.tower.ebc is None and model.tower.out_dim == DIMS
    assert not [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    m = plain.report["metrics"]
    for task in ("a", "b"):  # test split, in the label's unit
        assert np.isfinite(m[f"{task}_rmse"]), task
        assert m[f"{task}_rmse"] < 0.5 * m[f"{task}_rmse_mean_predictor"], (task, m)


def test_the_pattern_is_expanded_in_the_training_set_and_the_bundle(plain: SimpleNamespace) -> None:
    fs = plain.cfg.feature_set()
    assert [f.name for f in fs.features] == [f"x_{j}" for j in range(DIMS)]
    assert load_manifest(plain.cfg.dataset_dir)["feature_set_fingerprint"] == fs.fingerprint()
    bundle = load_bundle(plain.result.model_dir)
    text = (plain.result.model_dir / "features.toml").read_text()
    assert "pattern" not in text.split("\n", 1)[1] and text.count("[[features]]") == DIMS
    assert bundle.features.fingerprint() == fs.fingerprint()


def test_the_registered_pyfunc_predicts_the_rows(plain: SimpleNamespace) -> None:
    fs = plain.cfg.feature_set()
    rows = load_split(plain.cfg.dataset_dir, "test").collect()
    expected = predict_frame(
        plain.result.model, fs, Mappings.load(plain.cfg.dataset_dir / "mappings", fs),
        plain.cfg.tasks, rows, batch_size=plain.cfg.train.eval_batch_size,
    )  # fmt: skip
    loaded = mlflow.pyfunc.load_model(plain.reg.uri)
    inputs = loaded.metadata.get_input_schema().inputs
    assert [c.name for c in inputs] == [f"x_{j}" for j in range(DIMS)]
    assert {c.type for c in inputs} == {DataType.double}
    got = loaded.predict(rows.select(fs.input_columns).to_pandas())
    assert list(got.columns) == list(expected)
    for col, want in expected.items():
        np.testing.assert_array_equal(got[col].to_numpy(), want)
        assert np.isfinite(want).all() and (want < 0).any(), col  # any sign: b is negative


def test_numeric_only_features_score_candidates(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The demo data with only its numeric item columns (one names group): the scoring job."""
    work = tmp_path_factory.mktemp("byo-synth")
    text = FeatureSet.load(DEMO_CONFIG.parent / "features" / "synth.toml").source
    head = text.split("[[features]]")[0]
    (work / "numeric.toml").write_text(
        head + '[[features]]\nnames = ["duration_s", "author"]\nentity = "item"\n'
        'kind = "numeric"\ntransform = "log1p"\n'
    )  # fmt: skip
    small = ["synth.users=600", "synth.items=200", "synth.days=5", "train.epochs=2",
             "train.batch_size=256", f"features={work / 'numeric.toml'}",
             "mlflow.experiment=byo-synth", "mlflow.registered_model=byo-synth"]  # fmt: skip
    cfg = load_config(DEMO_CONFIG, small, workdir=work)
    s = cfg.synth
    synthesize(cfg.store_dir, users=s.users, items=s.items, days=s.days, seed=s.seed)
    build_dataset(cfg)
    result = train(cfg)
    assert result.model.tower.ebc is None and result.model.tower.out_dim == 2
    evaluate(cfg, run_id=result.run_id)
    reg = register(cfg, python_model=CODE_PATH, run_id=result.run_id)
    out = work / "scores"
    candidates = cfg.store_dir / "candidates.parquet"
    manifest = score(model_uri=reg.uri, candidates=candidates, output=out, top_k=5, cfg=cfg)
    top = pl.read_parquet(out / PART)
    assert manifest["rows"] == top.height > 0
    assert top["p_click"].is_between(0, 1).all() and top["score"].is_finite().all()
    # the job's tower-once path against the registered pyfunc on each item's row in effect at
    # the scoring time (no user features: an item's scores do not depend on the user)
    as_of = datetime.fromisoformat(manifest["as_of"])
    items = (
        pl.read_parquet(cfg.store_dir / "items.parquet")
        .filter(pl.col("valid_from") <= as_of)
        .sort("valid_from")
        .group_by("item_id")
        .last()
    )
    rows = top.select("item_id", "p_click").unique().join(items, on="item_id")
    assert rows.height == top["item_id"].n_unique()
    got = mlflow.pyfunc.load_model(reg.uri).predict(rows.select("duration_s", "author").to_pandas())
    np.testing.assert_allclose(got["p_click"].to_numpy(), rows["p_click"].to_numpy(), rtol=1e-5)
    assert top["p_click"].n_unique() > 1  # the items' durations and authors move the score
