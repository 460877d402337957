"""The registered model: an MLflow pyfunc defined as code (MLflow "models from code").

MLflow logs this file itself, not a pickled object; loading runs it, and ``load_context`` reads
the model bundle (``torch.load(weights_only=True)``, TOML, JSON, Parquet). Input: a DataFrame of
raw feature columns (the signature); output: one column per task in natural units
(``p_click``, ``watch_time_s``).

Missing values: a ``None`` list cell (an entity the store does not know, features past their TTL)
is an empty bag, exactly as ``[]``; a missing categorical value is the unknown id (index 0); a
missing numeric is the feature's mean. The signature admits ``None`` in list columns
(``feature_store.signature``); a column whose every cell is ``None`` (or ``[]``) carries no type,
so it gets the type its mapping reads before mapping.
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
        else:  # pandas after MLflow's schema enforcement: list cells may be numpy arrays
            frame = pl.from_arrow(
                pa.Table.from_pandas(pd.DataFrame(model_input), preserve_index=False)
            )
        return self.predict_polars(frame).to_pandas()


mlflow.models.set_model(RecsysModel())
