"""Entity features as of one scoring time, mapped once per entity row and gathered per candidate.

A scoring job has one as-of time, so each user and item has at most one feature row in effect:
the row with the greatest ``valid_from <= as_of`` (the point-in-time join's rule; the store's
contract allows one row per key and time). Those rows are mapped (``apply_mappings``), turned into
tensors (``to_tensor_data``) and passed through the model's embedding tower once, with every other
entity's bags empty and its dense values 0: the tower's output is a concatenation, so a
candidate's tower output is the sum of its user's and its item's rows. A candidate then costs an
index lookup and a gather instead of a join, a mapping and an embedding lookup per pair; the
model's mixture and heads run on the gathered rows (``serving.score``). Row 0 of every entity's
rows is a row of nulls: what a candidate without features gets, exactly as ``predict_frame``
would give it.

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
from recsys_moe.data import JaggedColumn, TensorData, iterate_batches, to_tensor_data
from recsys_moe.model import MultiTaskModel

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
class EntityRows:
    """One entity's tower rows ``[n + 1, D_in]``: row 0 the unknown row, row i + 1 key
    ``keys[i]``."""

    keys: pl.DataFrame  # key, __idx (Int64), expired (bool)
    tower: Tensor


def check_entity_features(features: FeatureSet) -> None:
    """Scoring joins every feature from the store's entity tables: a model with features read
    from each event row is a ``ValueError``."""
    rowwise = [f.name for f in features.features if not f.entity]
    if rowwise:
        raise ValueError(
            f"scoring: feature(s) {rowwise} have no entity (they are read from each event "
            "row); recsys-moe score joins every feature from the store's entity tables and "
            "cannot score such a model yet"
        )


class AsOfFeatures:
    """Every entity's features in effect at ``as_of``, mapped; ``gather`` builds a candidate
    batch and counts unknown and expired entities."""

    def __init__(
        self,
        store: OfflineStore,
        features: FeatureSet,
        mappings: Mappings,
        as_of: datetime,
        model: MultiTaskModel,
        batch_size: int = 4096,
    ) -> None:
        check_entity_features(features)
        self.features = features
        self.mappings = mappings
        self.model = model
        self.batch_size = batch_size
        self.device = next(model.parameters()).device  # the model's: a GPU's when it is on one
        self.entities: dict[str, EntityRows] = {}
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
            self.entities[name] = EntityRows(keys=keys, tower=self._tower(mapped, sub))
        self.key_features = [f for f in features.event_features if f.entity]

    def gather(self, cands: pl.DataFrame) -> tuple[Tensor, dict[str, int]]:
        """The tower output ``[N, D_in]`` for ``cands`` (rows in order), and counts: per entity
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
            idx = got[IDX].fill_null(0).to_numpy().astype(np.int64)
            index[name] = torch.from_numpy(idx).to(self.device)
        counts["expired_features"] = int(expired_any.sum())
        counts["missing_features"] = int((unknown_any | expired_any).sum())
        x = torch.zeros(n, self.model.tower.out_dim, device=self.device)
        for name, et in self.entities.items():
            x += et.tower[index[name]]
        if self.key_features:  # mapped per distinct key of this chunk, then gathered
            sub = _subset(self.features, self.key_features)
            keys = [self.features.entities[f.entity].key for f in self.key_features]
            distinct = cands.select(keys).unique(maintain_order=True)
            mapped = apply_mappings(distinct.lazy(), sub, self.mappings).collect()
            rows = self._tower(mapped, sub)
            pos = cands.select(keys).join(
                distinct.with_row_index(IDX), on=keys, how="left", maintain_order="left"
            )[IDX]
            x += rows[torch.from_numpy(pos.to_numpy().astype(np.int64)).to(self.device)]
        return x, counts

    @torch.no_grad()
    def _tower(self, mapped: pl.DataFrame, sub: FeatureSet) -> Tensor:
        """The tower's output for mapped rows of the features ``sub`` (the other features: empty
        bags, dense 0, which add nothing to the concatenation)."""
        own = to_tensor_data(mapped, sub)
        n = own.num_rows
        empty = JaggedColumn(
            values=torch.zeros(0, dtype=torch.int64), offsets=torch.zeros(n + 1, dtype=torch.int64)
        )
        sparse = {f.name: own.sparse.get(f.name, empty) for f in self.features.sparse}
        dense = torch.zeros(n, len(self.features.dense))
        names = [f.name for f in sub.dense]
        for j, f in enumerate(self.features.dense):
            if f.name in names:
                dense[:, j] = own.dense[:, names.index(f.name)]
        data = TensorData(dense=dense, sparse=sparse, num_rows=n).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = [
                self.model.tower(b.dense, b.sparse) for b in iterate_batches(data, self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        return (
            torch.cat(out) if out else torch.zeros(0, self.model.tower.out_dim, device=self.device)
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


def scoring_time(
    as_of: datetime | None, store: OfflineStore, features: FeatureSet
) -> tuple[datetime, dict[str, TimeRange]]:
    """The job's as-of (naive UTC; ``None``: the store's latest feature time, never the wall
    clock), checked against the store's time ranges (``check_as_of``), and those ranges."""
    ranges = store_time_ranges(store, features)
    if as_of is None:
        as_of = max(r.last for r in ranges.values())
    as_of = as_of.replace(tzinfo=None)
    check_as_of(as_of, ranges, store)
    return as_of, ranges


def check_missing_share(
    counts: dict[str, int],
    seen: int,
    *,
    max_share: float,
    as_of: datetime,
    ranges: dict[str, TimeRange],
    store: OfflineStore,
    candidates: str,
    scope: str = "",
    consequence: str = "Nothing written",
) -> None:
    """Too many of ``seen`` candidates without features (``counts["missing_features"]`` above
    ``score.max_missing_share``) is a ``DataError`` naming the likely cause: an as-of past the
    store's range or a stale store (mostly expired), or ids the store does not know (mostly
    unknown). ``counts``: ``AsOfFeatures.gather``'s keys; ``scope`` and ``consequence`` say which
    candidates were checked and what the job did not write."""
    missing = counts.get("missing_features", 0)
    if seen == 0 or missing / seen <= max_share:
        return
    expired = counts.get("expired_features", 0)
    detail = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    span = "; ".join(
        f"{name} rows {r.first.isoformat()} .. {r.last.isoformat()}" for name, r in ranges.items()
    )
    if expired >= missing - expired:
        cause = (
            f"most of them have features older than their TTL as of {as_of.isoformat()}: "
            f"the store looks stale (refresh it), or --as-of lies past its range ({span})"
        )
    else:
        cause = (
            f"most of them are ids the store {store.root} has no row for as of "
            f"{as_of.isoformat()} ({span}): candidates of another store (--store), or an "
            "--as-of before their first rows"
        )
    raise DataError(
        f"candidates {candidates}: {missing} of {seen} candidates{scope} "
        f"({100 * missing / seen:.2f}%) lack features, above score.max_missing_share "
        f"({100 * max_share:g}%): {cause}. Counts: {detail}. {consequence}; raise "
        "score.max_missing_share only if scoring them unknown is intended"
    )
