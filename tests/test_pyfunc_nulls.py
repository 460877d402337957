"""The registered pyfunc on rows with missing features (issue 13): a candidate whose user the store
does not know has a null ``interests`` list (and null scalar user features) after the point-in-time
join; one whose item it does not know has a null ``author`` (an integer categorical column), which
pandas holds as float64 ``NaN``. Through ``mlflow.pyfunc.load_model(...).predict`` and ``mlflow
models predict`` (MLflow's schema enforcement included) such rows score on the unknown path,
exactly as with an empty list or a null in Polars, finite; the signature still checks the list
columns' types and the model checks the integer ids (``author`` is declared ``Any``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import polars as pl
import pytest
from fixtures import registered_model

from feature_store import OfflineStore, join_features
from recsys_moe.tracking import client_for

TINY = [
    "synth.users=240",
    "synth.items=50",
    "synth.days=3",
    "train.epochs=1",
    "train.batch_size=256",
    "train.log_every=50",
    "mlflow.experiment=nulls",
    "mlflow.registered_model=nulls-model",
    "eval.bootstrap=0",  # register needs the test metrics, not their intervals
]
OUTPUTS = ("p_click", "watch_time_s")
UNKNOWN = 10**9  # added to every 3rd candidate's user (item) id: one the store does not know
pytestmark = pytest.mark.slow  # the fixture trains and registers a model (~45 s)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A registered model, loaded through the registry, and 60 point-in-time rows of candidates,
    every 3rd one with a user unknown to the store (null list and null user features); and 60
    with every 3rd item unknown (``irows``: null ``author``, ``category``, ``tags``)."""
    import mlflow

    m = registered_model(tmp_path_factory.mktemp("nulls"), TINY)
    client_for(m.cfg)
    model = mlflow.pyfunc.load_model(m.reg.uri)
    features = model.unwrap_python_model().bundle.features
    as_of = datetime.fromisoformat(m.meta["scoring_time"])
    head = pl.read_parquet(m.cfg.store_dir / "candidates.parquet").head(60).with_row_index("i")

    def joined(key: str) -> pl.DataFrame:
        cands = head.with_columns(
            pl.when(pl.col("i") % 3 == 0).then(pl.col(key) + UNKNOWN).otherwise(pl.col(key))
        ).drop("i")
        return join_features(
            cands.lazy().with_columns(pl.lit(as_of).cast(pl.Datetime("us")).alias("ts")),
            OfflineStore(m.cfg.store_dir), features, event_time="ts",
        ).collect()  # fmt: skip

    rows, irows = joined("user_id"), joined("item_id")
    return SimpleNamespace(
        cfg=m.cfg, reg=m.reg, model=model, rows=rows.select(features.input_columns),
        unknown=(rows["user_id"] >= UNKNOWN).to_numpy(),
        irows=irows.select(features.input_columns),
        unknown_item=(irows["item_id"] >= UNKNOWN).to_numpy(),
    )  # fmt: skip


def _empty_lists(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.with_columns(
        pl.col(c).fill_null(pl.lit([], dtype=t)) for c, t in rows.schema.items() if t == pl.List
    )


# Rows scored in another batch (a subset alone): the same up to float32 rounding. The CPU's
# GEMMs block the work by the batch's rows, so a product can differ in its last bit (a fresh
# CI clone saw 0.13150063 against 0.13150065, 1 of 20 rows).
OTHER_BATCH_RTOL = 1e-6


def _assert_same(
    got: pd.DataFrame, want: pd.DataFrame | pl.DataFrame, *, rtol: float = 0.0
) -> None:
    """Finite scores equal to ``want``'s: bit for bit, or within ``rtol`` (another batch)."""
    for col in OUTPUTS:
        a, b = got[col].to_numpy(), want[col].to_numpy()
        assert np.isfinite(a).all(), col
        if rtol:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=col)
        else:
            np.testing.assert_array_equal(a, b, err_msg=col)


def test_signature_admits_none_only_in_list_columns(run: SimpleNamespace) -> None:
    from mlflow.types.schema import AnyType, Array, DataType

    specs = {c.name: c for c in run.model.metadata.get_input_schema().inputs}
    assert specs["interests"].type == Array(DataType.string) and not specs["interests"].required
    assert specs["tags"].type == Array(DataType.string) and not specs["tags"].required
    assert specs["segment"].type == DataType.string and specs["segment"].required
    assert [c for c, s in specs.items() if not s.required] == ["interests", "tags"]
    # the item's integer categorical column: Any (checked by the model); the key stays long
    assert isinstance(specs["author"].type, AnyType) and specs["author"].required
    assert specs["item_id"].type == DataType.long
    assert [c for c, s in specs.items() if isinstance(s.type, AnyType)] == ["author"]


def test_null_list_cell_of_an_unknown_user_scores_as_the_empty_list(run: SimpleNamespace) -> None:
    rows = run.rows
    assert run.unknown.sum() == 20
    assert rows["interests"].is_null().to_numpy().tolist() == run.unknown.tolist()
    assert rows["segment"].is_null().to_numpy().tolist() == run.unknown.tolist()
    got = run.model.predict(rows.to_pandas())
    _assert_same(got, run.model.predict(_empty_lists(rows).to_pandas()))
    # the same as the model in process (no MLflow schema enforcement in between)
    _assert_same(got, run.model.unwrap_python_model().predict_polars(rows))
    # the unknown path is not a constant: known users score otherwise
    assert len(set(got["p_click"][~run.unknown])) > 1
    assert not set(got["p_click"][run.unknown]) & set(got["p_click"][~run.unknown])
    # a batch of unknown users only: the list column is all None (no type to infer), and all []
    alone = rows.filter(pl.Series(run.unknown))
    assert alone["interests"].null_count() == alone.height
    _assert_same(run.model.predict(alone.to_pandas()), got[run.unknown], rtol=OTHER_BATCH_RTOL)
    _assert_same(
        run.model.predict(_empty_lists(alone).to_pandas()), got[run.unknown], rtol=OTHER_BATCH_RTOL
    )
    _assert_same(
        run.model.predict(alone.head(1).to_pandas()),
        got[run.unknown].head(1),
        rtol=OTHER_BATCH_RTOL,
    )


def test_list_columns_are_still_type_checked(run: SimpleNamespace) -> None:
    from mlflow.exceptions import MlflowException

    frame = run.rows.to_pandas()
    n = len(frame)
    with pytest.raises(MlflowException, match="convert int64"):  # ints where strings are due
        run.model.predict(frame.assign(interests=[[1, 2]] * n))
    with pytest.raises(MlflowException, match="list or numpy array, got str"):
        run.model.predict(frame.assign(interests=["t1"] * n))
    # optional in MLflow's sense only so that cells may be None: the column itself is needed
    with pytest.raises(ValueError, match=r"lacks feature column\(s\) \['interests'\]"):
        run.model.predict(frame.drop(columns=["interests"]))


def test_unknown_item_null_author_scores_on_the_unknown_path(run: SimpleNamespace) -> None:
    """``author`` null (an unknown item): float64 NaN (what pandas makes of it), pandas Int64
    <NA>, or an object column of ints and None all score exactly as the null in Polars."""
    rows, unknown = run.irows, run.unknown_item
    assert unknown.sum() == 20
    assert rows["author"].is_null().to_numpy().tolist() == unknown.tolist()
    frame = rows.to_pandas()
    assert frame["author"].dtype == np.float64 and frame["author"].isna().sum() == 20
    want = run.model.unwrap_python_model().predict_polars(rows)
    got = run.model.predict(frame)
    _assert_same(got, want)
    ids = rows["author"].to_list()
    _assert_same(run.model.predict(frame.assign(author=pd.array(ids, dtype="Int64"))), want)
    _assert_same(run.model.predict(frame.assign(author=pd.Series(ids, dtype=object))), want)
    # the unknown items' own rows: known items score otherwise
    assert not set(got["p_click"][unknown]) & set(got["p_click"][~unknown])
    # a batch of unknown items alone (author all NaN), and of known items alone (plain int64)
    alone = rows.filter(pl.Series(unknown))
    assert alone.to_pandas()["author"].isna().all()
    _assert_same(run.model.predict(alone.to_pandas()), got[unknown], rtol=OTHER_BATCH_RTOL)
    known = rows.filter(pl.Series(~unknown))
    assert known.to_pandas()["author"].dtype == np.int64
    _assert_same(run.model.predict(known.to_pandas()), got[~unknown], rtol=OTHER_BATCH_RTOL)


def test_integer_id_columns_are_still_checked(run: SimpleNamespace) -> None:
    """``author`` is ``Any`` in the signature: the model refuses what is not an integer id."""
    from mlflow.exceptions import MlflowException

    frame = run.irows.to_pandas()
    n = len(frame)
    for value, match in [
        ("a7", r"column 'author': expected integer ids, got String \(e.g. 'a7'\)"),
        (True, r"column 'author': expected integer ids, got Boolean"),
        (2.5, r"column 'author': 60 of 60 values are not integer ids .* \(e.g. 2.5;"),
        (float(2**53), r"column 'author': 60 of 60 values .* magnitude at most 2\*\*53 - 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            run.model.predict(frame.assign(author=[value] * n))
    with pytest.raises(ValueError, match="column 'author': its values are not of one type"):
        run.model.predict(frame.assign(author=["a7", 3] * (n // 2)))
    # the key column stays long: MLflow refuses a string there, and NaN
    with pytest.raises(MlflowException, match="column item_id"):
        run.model.predict(frame.assign(item_id=["x"] * n))
    with pytest.raises(MlflowException, match="column item_id"):
        run.model.predict(frame.assign(item_id=np.where(run.unknown_item, np.nan, 1.0)))
    # the largest float that holds every integer below it is still an id
    ok = run.model.predict(frame.assign(author=[float(2**53 - 1)] * n))
    assert np.isfinite(ok["p_click"]).all()


def test_mlflow_models_predict_scores_null_list_cells(run: SimpleNamespace, tmp_path: Path) -> None:
    """The MLflow CLI (a fresh process, the local environment): JSON nulls in a list column
    (unknown users) and in ``author`` (unknown items)."""
    both = pl.concat([run.rows, run.irows])
    frame = both.to_pandas()
    payload = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
    cells = payload["dataframe_split"]["data"]
    col = payload["dataframe_split"]["columns"].index("interests")
    assert [r[col] is None for r in cells] == [*run.unknown, *[False] * len(run.irows)]
    author = payload["dataframe_split"]["columns"].index("author")
    assert [r[author] is None for r in cells] == [*[False] * len(run.rows), *run.unknown_item]
    (tmp_path / "in.json").write_text(json.dumps(payload))
    env = {**os.environ, "MLFLOW_TRACKING_URI": run.cfg.tracking_uri()}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m", run.reg.uri,
         "-i", str(tmp_path / "in.json"), "-t", "json", "-o", str(tmp_path / "out.json"),
         "--env-manager", "local"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = pd.DataFrame(json.loads((tmp_path / "out.json").read_text())["predictions"])
    _assert_same(out, run.model.unwrap_python_model().predict_polars(_empty_lists(both)))
