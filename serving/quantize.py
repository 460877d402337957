"""int8 embedding tables for scoring (``recsys-moe score --quantize int8``).

The model's ``EmbeddingBagCollection`` is replaced by TorchRec's quantized one
(``torchrec.quant.embedding_modules.EmbeddingBagCollection.from_float``: fbgemm's int8
table-batched embedding bags, one scale and bias per row, fp32 output); the mixture and heads stay
fp32. Tables take about a quarter of their fp32 memory. The copy is scored next to the fp32 model
on the first chunk of every shard, and the differences go to the manifest
(``prediction_change``).
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import polars as pl
import torch
from torch.ao.quantization import PlaceholderObserver, QConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from recsys_moe.model import MultiTaskModel

Quantize = Literal["none", "int8"]
QUANTIZE: tuple[str, ...] = ("none", "int8")


def quantize_embeddings(model: MultiTaskModel) -> MultiTaskModel:
    """A copy of ``model`` whose embedding tables are int8 (the model itself is unchanged)."""
    if model.tower.ebc is None:
        raise ValueError(
            "--quantize int8: the model has no embedding tables (its features are all numeric); "
            "score it without --quantize"
        )
    q = copy.deepcopy(model).eval()
    ebc = q.tower.ebc
    ebc.qconfig = QConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=torch.qint8),
    )
    q.tower.ebc = QuantEmbeddingBagCollection.from_float(ebc)
    return q


def prediction_change(fp32: pl.DataFrame, quant: pl.DataFrame) -> dict[str, float]:
    """Per prediction column: the mean and max absolute change, and the rows compared."""
    out: dict[str, float] = {"rows": fp32.height}
    for col in fp32.columns:
        d = np.abs(fp32[col].to_numpy() - quant[col].to_numpy())
        out[f"{col}_mean_abs_change"] = float(d.mean()) if d.size else 0.0
        out[f"{col}_max_abs_change"] = float(d.max()) if d.size else 0.0
    return out
