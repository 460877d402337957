"""The registered model: an MLflow pyfunc defined as code (MLflow "models from code").

MLflow logs this file itself, not a pickled object; loading runs it, and ``load_context`` reads
the model bundle (``torch.load(weights_only=True)``, TOML, JSON, Parquet). Input: a DataFrame of
raw feature columns (the signature); output: one column per task in natural units
(``p_click``, ``watch_time_s``).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import polars as pl
import pyarrow as pa
from mlflow.pyfunc import PythonModel

CODE_PATH = str(Path(__file__).resolve())


class RecsysModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 (MLflow's PythonModelContext)
        from recsys_moe.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict_polars(self, frame: pl.DataFrame) -> pl.DataFrame:
        from recsys_moe.evaluation.predict import predict_frame

        b = self.bundle
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
