"""Entity features as of one scoring time, mapped once per entity row and gathered per candidate.

A scoring job has one as-of time, so each user and item has at most one feature row in effect:
the row with the greatest ``valid_from <= as_of`` (the point-in-time join's rule; the store's
contract allows one row per key and time). Those rows are mapped (``apply_mappings``) and turned
into tensors (``to_tensor_data``) once; a candidate then costs an index lookup and a gather
instead of a join and a mapping per pair. Row 0 of every entity's tensors is the mapping of a row
of nulls: what a candidate without features gets, exactly as ``predict_frame`` would give it.

A candidate's entity is ``unknown`` when the store has no row of its key in effect as of the
scoring time (the id is not in the store, or its first row is later), ``expired`` when the row in
effect is older than the entity's TTL. Both are scored on the unknown path and counted.
Features whose column is the entity key itself (``item_id``) are mapped from the candidate's id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl
import torch
from torch import Tensor

from feature_store import DataError, FeatureSet, OfflineStore
from feature_store.validate import validate_table
from pipelines.mappings import Mappings, apply_mappings
from recsys_moe.data import JaggedColumn, TensorData, gather_jagged, to_tensor_data

IDX = "__idx"


@dataclass(frozen=True)
class TimeRange:
    first: datetime
    last: datetime


def store_time_ranges(store: OfflineStore, features: FeatureSet) -> dict[str, TimeRange]:
    """Per entity with features, the first and last ``valid_from`` of its table."""
    out = {}
    for name, ent in features.entities.items():
        if not features.for_entity(name):
            continue
        lo, hi = store.scan(ent.table).select(
            pl.col(ent.time).min().alias("lo"), pl.col(ent.time).max().alias("hi")
        ).collect().row(0)  # fmt: skip
        out[name] = TimeRange(lo, hi)
    return out


def _subset(features: FeatureSet, keep: list) -> FeatureSet:
    return dataclasses.replace(features, features=tuple(keep))


@dataclass
class EntityTensors:
    """One entity's mapped feature rows: row 0 the unknown row, row i + 1 key ``keys[i]``."""

    keys: pl.DataFrame  # key, __idx (Int64), expired (bool)
    data: TensorData
    dense_names: list[str]  # the columns of data.dense


class AsOfFeatures:
    """Every entity's features in effect at ``as_of``, mapped; ``gather`` builds a candidate
    batch and counts unknown and expired entities."""

    def __init__(
        self,
        store: OfflineStore,
        features: FeatureSet,
        mappings: Mappings,
        as_of: datetime,
    ) -> None:
        self.features = features
        self.mappings = mappings
        self.entities: dict[str, EntityTensors] = {}
        for name, ent in features.entities.items():
            own = [f for f in features.for_entity(name) if f.column != ent.key]
            if not own:
                continue
            columns = features.joined_columns(name)
            table = store.scan(ent.table)
            validate_table(
                table, path=str(store.path(ent.table)), key=ent.key, time=ent.time,
                columns={c: f"feature column of entity {name}" for c in columns},
                numeric=[f for f in own if f.kind == "numeric"], entity=name,
            )  # fmt: skip
            stamp = pl.lit(as_of).cast(pl.Datetime("us"))
            rows = (
                table.filter(pl.col(ent.time).cast(pl.Datetime("us")) <= stamp)
                .sort(ent.time)
                .group_by(ent.key, maintain_order=True)
                .last()
                .sort(ent.key)
                .collect()
            )
            if ent.ttl is not None:
                age = stamp - pl.col(ent.time).cast(pl.Datetime("us"))
                expired = (age > pl.lit(ent.ttl)).alias("expired")
            else:
                expired = pl.lit(False).alias("expired")
            rows = rows.with_columns(expired)
            live = rows.filter(~pl.col("expired"))
            frame = pl.concat([live.clear(1), live]).select(columns)  # row 0: nulls (unknown)
            sub = _subset(features, own)
            mapped = apply_mappings(frame.lazy(), sub, mappings).collect()
            keys = rows.select(
                ent.key, "expired",
                pl.when(pl.col("expired")).then(0)
                .otherwise(pl.col("expired").not_().cum_sum()).cast(pl.Int64).alias(IDX),
            )  # fmt: skip
            self.entities[name] = EntityTensors(
                keys=keys, data=to_tensor_data(mapped, sub), dense_names=[f.name for f in sub.dense]
            )
        self.key_features = [
            f for f in features.features if f.column == features.entities[f.entity].key
        ]

    def gather(self, cands: pl.DataFrame) -> tuple[TensorData, dict[str, int]]:
        """The model input for ``cands`` (rows in order), and counts of candidates: per entity
        ``unknown_<entity>s`` and ``expired_<entity>_features``; ``expired_features`` (any entity
        expired) and ``missing_features`` (any entity unknown or expired)."""
        n = cands.height
        index: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        unknown_any = np.zeros(n, dtype=bool)
        expired_any = np.zeros(n, dtype=bool)
        for name, et in self.entities.items():
            key = self.features.entities[name].key
            got = cands.select(key).join(et.keys, on=key, how="left", maintain_order="left")
            unknown = got["expired"].is_null().to_numpy()
            expired = got["expired"].fill_null(False).to_numpy()
            unknown_any |= unknown
            expired_any |= expired
            counts[f"unknown_{name}s"] = int(unknown.sum())
            counts[f"expired_{name}_features"] = int(expired.sum())
            index[name] = torch.from_numpy(got[IDX].fill_null(0).to_numpy().astype(np.int64))
        counts["expired_features"] = int(expired_any.sum())
        counts["missing_features"] = int((unknown_any | expired_any).sum())
        keyed = None
        if self.key_features:
            sub = _subset(self.features, self.key_features)
            mapped = apply_mappings(cands.lazy(), sub, self.mappings).collect()
            keyed = EntityTensors(cands, to_tensor_data(mapped, sub), [f.name for f in sub.dense])
        dense_cols: list[Tensor] = []
        sparse: dict[str, JaggedColumn] = {}
        for f in self.features.features:
            if f in self.key_features:
                assert keyed is not None
                src, idx = keyed, None
            else:
                src, idx = self.entities[f.entity], index[f.entity]
            if f.is_sparse:
                col = src.data.sparse[f.name]
                sparse[f.name] = col if idx is None else _take(col, idx)
            else:
                block = src.data.dense[:, src.dense_names.index(f.name)]
                dense_cols.append(block if idx is None else block[idx])
        dense = torch.stack(dense_cols, dim=1) if dense_cols else torch.zeros(n, 0)
        return TensorData(dense=dense, sparse=sparse, num_rows=n), counts


def _take(col: JaggedColumn, idx: Tensor) -> JaggedColumn:
    lengths = col.lengths[idx]
    offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return JaggedColumn(
        values=gather_jagged(col.offsets[idx], lengths, col.values), offsets=offsets
    )


def check_as_of(as_of: datetime, ranges: dict[str, TimeRange], store: OfflineStore) -> None:
    """An as-of before an entity table's first row finds no features at all: an error."""
    for name, r in ranges.items():
        if as_of < r.first:
            raise DataError(
                f"--as-of {as_of.isoformat()} is before the first feature row of entity {name} "
                f"in {store.root} ({r.first.isoformat()} .. {r.last.isoformat()}): every "
                "candidate would be scored without its features; pass an --as-of inside that "
                "range (or leave it out: the store's latest feature time)"
            )
