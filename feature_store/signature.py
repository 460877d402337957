"""The MLflow model signature generated from the feature definitions.

Input columns are the raw feature columns (as point-in-time joins return them), typed from the
training set's schema; outputs are the model's prediction columns.

List columns are declared ``required=False``: in MLflow's schema enforcement that is what admits a
``None`` cell in an ``Array`` column (a required one refuses it: "Expected data to be list or numpy
array, got NoneType"), and a point-in-time join leaves the list null for an entity the store does
not know or whose features are past their TTL. Non-null cells are still checked against the
element type. The model reads a null list as an empty one (the empty bag). The column itself stays
required by the model: ``serving.pyfunc`` refuses input without it.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from feature_store.definitions import FeatureSet

_SCALARS = {
    pl.Int8: "long", pl.Int16: "long", pl.Int32: "long", pl.Int64: "long",
    pl.UInt8: "long", pl.UInt16: "long", pl.UInt32: "long",
    pl.Float32: "double", pl.Float64: "double", pl.String: "string", pl.Boolean: "boolean",
}  # fmt: skip


def _mlflow_type(dtype: pl.DataType, column: str) -> Any:
    from mlflow.types.schema import Array, DataType

    if isinstance(dtype, pl.List):
        return Array(_mlflow_type(dtype.inner, column))
    name = _SCALARS.get(dtype.base_type())
    if name is None:
        raise ValueError(f"column {column!r}: dtype {dtype} has no MLflow signature type")
    return getattr(DataType, name)


def model_signature(
    features: FeatureSet, schema: dict[str, pl.DataType], outputs: list[str]
) -> Any:
    """``ModelSignature``: one input column per feature (typed as in ``schema``; list columns
    accept ``None`` cells), double outputs."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = []
    for f in features.features:
        if f.column not in schema:
            raise ValueError(f"feature {f.name!r}: column {f.column!r} not in the training set")
        dtype = _mlflow_type(schema[f.column], f.column)
        inputs.append(ColSpec(dtype, f.column, required=not isinstance(dtype, Array)))
    return ModelSignature(
        inputs=Schema(inputs), outputs=Schema([ColSpec(DataType.double, o) for o in outputs])
    )
