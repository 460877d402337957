"""The MLflow model signature generated from the feature definitions.

Input columns are the raw feature columns (as point-in-time joins return them), typed from the
training set's schema; outputs are the model's prediction columns.

Missing values. A point-in-time join leaves an entity's columns null for an entity the store does
not know or whose features are past their TTL; the model scores such a row on the unknown path
(``serving.pyfunc``). How MLflow 3.17's schema enforcement admits those nulls decides two types:

- List columns are declared ``required=False``: that is what admits a ``None`` cell in an
  ``Array`` column (a required one refuses it: "Expected data to be list or numpy array, got
  NoneType"). Non-null cells are still checked against the element type. The model reads a null
  list as an empty one.
- Integer categorical columns that a join fills (an entity's feature, not the entity key: the
  demo's ``author``) are declared ``Any``. In pandas, and in Spark's Arrow-to-pandas conversion,
  a nullable int64 column becomes float64 with ``NaN``, which a ``long`` column refuses
  (float64 -> int64 is not a safe cast), and a pandas ``Int64`` column with ``<NA>`` fails its
  cast to int64. ``double`` would admit the ``NaN`` but refuse a plain int64 column (MLflow casts
  int to double only up to 6 bytes) and round ids above 2**53. ``Any`` passes the values
  through; the model checks them itself (``serving.pyfunc.integer_ids``): integers (int64, a
  pandas ``Int64`` or an object column of ints and ``None``) as they are, ``None``/``NaN`` as the
  missing value (the unknown id), a float column only where every value is a whole number below
  2**53 in magnitude (no id it holds can have been rounded); anything else (a string, a bool, 2.5,
  3e17) is refused with the column's name. Entity keys (``item_id``) and columns of the events
  rows keep ``long``: a candidate always carries them.

Every column stays required by the model: ``serving.pyfunc`` refuses input without one.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from feature_store.definitions import Feature, FeatureSet

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


def _joined_ids(features: FeatureSet, f: Feature, dtype: pl.DataType) -> bool:
    joined = bool(f.entity) and f.column != features.entities[f.entity].key
    return joined and f.kind == "categorical" and dtype.is_integer()


def model_signature(
    features: FeatureSet, schema: dict[str, pl.DataType], outputs: list[str]
) -> Any:
    """``ModelSignature``: one input column per feature (typed as in ``schema``; list columns
    accept ``None`` cells; joined integer categorical columns ``Any``, checked by the model),
    double outputs."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    inputs = []
    for f in features.features:
        if f.column not in schema:
            raise ValueError(f"feature {f.name!r}: column {f.column!r} not in the training set")
        dtype = _mlflow_type(schema[f.column], f.column)
        if _joined_ids(features, f, schema[f.column]):
            dtype = AnyType()
        inputs.append(ColSpec(dtype, f.column, required=not isinstance(dtype, Array)))
    return ModelSignature(
        inputs=Schema(inputs), outputs=Schema([ColSpec(DataType.double, o) for o in outputs])
    )
