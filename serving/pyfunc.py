"""The registered model: an MLflow pyfunc defined as code (MLflow "models from code").

MLflow logs this file itself, not a pickled object; loading runs it, and ``load_context`` reads
the model bundle (``torch.load(weights_only=True)``, TOML, JSON, Parquet). Input: a DataFrame of
raw feature columns (the signature); output: one column per task in natural units
(``p_click``, ``watch_time_s``).

Missing values: a ``None`` list cell (an entity the store does not know, features past their TTL)
is an empty bag, exactly as ``[]``; a missing categorical value (``None``, or ``NaN`` in a float
column) is the unknown id (index 0); a missing numeric is the feature's mean. The signature admits
``None`` in list columns and declares joined integer categorical columns ``Any``
(``feature_store.signature``): ``integer_ids`` checks those here, since MLflow no longer does. A
column whose every cell is ``None`` (or ``[]``) carries no type, so it gets the type its mapping
reads before mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
import polars as pl
import pyarrow as pa
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from feature_store.definitions import Feature

CODE_PATH = str(Path(__file__).resolve())


def _typed(feature: Feature, vocabs: dict[str, pl.DataFrame]) -> pl.DataType:
    """The raw dtype ``feature``'s mapping reads (vocabulary values, or Int64 ids to hash)."""
    if feature.kind == "numeric":
        return pl.Float64
    scalar = vocabs[feature.name].schema["value"] if feature.mapping == "vocab" else pl.Int64
    return pl.List(scalar) if feature.kind == "multi_categorical" else scalar


def _untyped(dtype: pl.DataType) -> bool:
    return dtype == pl.Null or (isinstance(dtype, pl.List) and _untyped(dtype.inner))


MAX_EXACT_ID = 2**53 - 1  # the largest magnitude below which a float64 holds every integer


def integer_ids(column: pl.Series) -> pl.Series:
    """An integer categorical column as integer ids: integers as they are; a float column (what
    pandas makes of integers with a missing value) as Int64 with ``NaN`` as null, where every
    value is a whole number of magnitude at most ``MAX_EXACT_ID``; else a ``ValueError`` naming
    the column and what to send instead."""
    name, dtype = column.name, column.dtype
    if dtype.is_integer() or dtype == pl.Null:
        return column
    fix = (
        "send integer ids as int64 (pandas Int64, or an object column of ints and None, where an "
        "id is missing; through Spark's spark_udf, a LongType column with "
        "spark.sql.execution.pythonUDF.pandas.preferIntExtensionDtype=true, as serving.spark sets)"
    )
    if not dtype.is_float():
        example = column.drop_nulls().head(1).to_list()
        raise ValueError(
            f"column {name!r}: expected integer ids, got {dtype}"
            f"{f' (e.g. {example[0]!r})' if example else ''}; {fix}"
        )
    values = column.fill_nan(None)
    bad = values.is_not_null() & (
        ~values.is_finite() | (values != values.floor()) | (values.abs() > MAX_EXACT_ID)
    )
    if bad.any():
        example = values.filter(bad)[0]
        raise ValueError(
            f"column {name!r}: {bad.sum()} of {len(values)} values are not integer ids that a "
            f"float holds exactly (e.g. {example!r}; ids must be whole numbers of magnitude at "
            f"most 2**53 - 1, and a larger id in a float column may already have been rounded); "
            f"{fix}"
        )
    return values.cast(pl.Int64)


def _from_pandas(frame: pd.DataFrame) -> pl.DataFrame:
    """pandas (after MLflow's schema enforcement: list cells may be numpy arrays; ``Any`` columns
    as given) to Polars; a column Arrow cannot type (mixed values) is a ``ValueError`` naming it."""
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        for name in frame.columns:
            try:
                pa.array(frame[name], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as col_error:
                raise ValueError(
                    f"column {name!r}: its values are not of one type ({col_error}); send one "
                    "type per column (integer ids as int64, with None for a missing id)"
                ) from e
        raise
    out = pl.from_arrow(table)
    assert isinstance(out, pl.DataFrame)
    return out


class RecsysModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 (MLflow's PythonModelContext)
        from recsys_moe.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict_polars(self, frame: pl.DataFrame) -> pl.DataFrame:
        from recsys_moe.evaluation.predict import predict_frame

        b = self.bundle
        missing = [c for c in b.features.input_columns if c not in frame.columns]
        if missing:  # the signature's list columns are optional only so that cells may be None
            raise ValueError(
                f"input lacks feature column(s) {missing}; send every signature column (a list "
                "cell may be None or [] for no ids)"
            )
        vocabs = b.mappings.vocabs
        ids = {f.column for f in b.features.features
               if f.kind == "categorical" and _typed(f, vocabs).is_integer()}  # fmt: skip
        frame = frame.with_columns(integer_ids(frame[c]) for c in sorted(ids))
        frame = frame.with_columns(
            pl.col(f.column).cast(_typed(f, b.mappings.vocabs))
            for f in b.features.features
            if _untyped(frame.schema[f.column])
        )
        preds = predict_frame(
            b.model, b.features, b.mappings, b.config.tasks, frame,
            batch_size=b.config.train.eval_batch_size,
        )  # fmt: skip
        return pl.DataFrame(preds)

    # the logged signature (generated from the feature definitions) validates the columns
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        if isinstance(model_input, pl.DataFrame):
            frame = model_input
        else:
            frame = _from_pandas(pd.DataFrame(model_input))
        return self.predict_polars(frame).to_pandas()


mlflow.models.set_model(RecsysModel())
