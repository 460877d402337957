"""Feature definitions: the one place features are declared.

A definitions file (TOML) names the entities (user, item: key column, source table, time column,
TTL), the events table, and each feature (entity, kind, embedding table size, dim, pooling). From it
come the Polars schemas of the store, the columns of the training set, the TorchRec
``EmbeddingBagConfig``s of the tower, the MLflow signature and the scoring job's joins.

Example (``configs/features/synth.toml``)::

    [entities.user]
    key = "user_id"        # join key, int64 in events and in the entity table
    table = "users"        # offline store table (Parquet) holding the attribute rows
    time = "valid_from"    # the row is in effect from this timestamp on
    ttl = "90d"            # optional: rows older than this at event time count as missing

    [events]
    table = "impressions"
    time = "ts"
    keys = ["request_id", "user_id", "item_id"]

    [[features]]
    name = "category"      # column in the entity table (``column`` overrides)
    entity = "item"
    kind = "categorical"   # categorical | multi_categorical | numeric
    num_embeddings = 64    # rows of the embedding table; row 0 is for unknown / missing values
    embedding_dim = 16

    [[features]]
    name = "duration_s"
    entity = "item"
    kind = "numeric"
    transform = "log1p"    # none | log1p: applied before standardization
    non_finite = "reject"  # numeric only: reject (default) | missing

``non_finite`` says what a non-finite value of a numeric feature is: NaN, +inf or -inf, after the
feature's transform (with ``log1p`` also a value <= -1). ``"reject"`` (the default): the build
fails with a ``DataError`` naming the table, the column, how many rows and an example.
``"missing"``: such a value counts as missing, like a null: the numeric statistics skip it and it
maps to 0.0 (the mean). Leaving the key out is the same as ``"reject"``.

The feature set's fingerprint (``FeatureSet.fingerprint``, stored in training-set manifests, model
bundles and run tags) hashes the parsed definitions, every setting with its default filled in: a
comment, blank lines, the order of keys or spelling out a default leave it unchanged; any change
to what is built (a table size, a TTL, the order of the features) changes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

FeatureKind = Literal["categorical", "multi_categorical", "numeric"]
KINDS: tuple[str, ...] = ("categorical", "multi_categorical", "numeric")
MAPPINGS: tuple[str, ...] = ("vocab", "hash")
POOLINGS: tuple[str, ...] = ("sum", "mean")
TRANSFORMS: tuple[str, ...] = ("none", "log1p")
NON_FINITE: tuple[str, ...] = ("reject", "missing")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str, *, where: str = "duration") -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"`` → ``timedelta``."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"{where}: {text!r} is not a duration; write e.g. '30d', '12h', '15m'")
    return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})


@dataclass(frozen=True)
class Entity:
    name: str
    key: str
    table: str
    time: str
    ttl: timedelta | None = None


@dataclass(frozen=True)
class Events:
    table: str
    time: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Feature:
    """One model input. ``column`` is its column in the entity table and in the training set."""

    name: str
    entity: str
    kind: FeatureKind
    column: str
    num_embeddings: int = 0  # categorical kinds: table rows, row 0 = unknown / missing
    embedding_dim: int = 16
    pooling: str = "sum"
    mapping: str = "vocab"  # vocab: most frequent training values; hash: int ids modulo the table
    min_count: int = 1  # vocab: values seen fewer times in the training split map to row 0
    transform: str = "none"  # numeric: applied before standardization
    non_finite: str = "reject"  # numeric: NaN / ±inf (after transform) rejected, or "missing"

    @property
    def is_sparse(self) -> bool:
        return self.kind != "numeric"


@dataclass(frozen=True)
class FeatureSet:
    entities: dict[str, Entity]
    events: Events
    features: tuple[Feature, ...]
    source: str = field(default="", compare=False)  # the TOML text it was parsed from

    # ---- views -------------------------------------------------------------------------------
    @property
    def sparse(self) -> tuple[Feature, ...]:
        """Categorical and multi-categorical features, in definition order (= KJT key order)."""
        return tuple(f for f in self.features if f.is_sparse)

    @property
    def dense(self) -> tuple[Feature, ...]:
        """Numeric features, in definition order (= columns of the dense tensor)."""
        return tuple(f for f in self.features if not f.is_sparse)

    def for_entity(self, entity: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.entity == entity)

    def joined_columns(self, entity: str) -> list[str]:
        """The columns a point-in-time join brings from ``entity``'s table: its features'
        columns, first-seen order, without the key (the events hold that)."""
        key = self.entities[entity].key
        return [c for c in dict.fromkeys(f.column for f in self.for_entity(entity)) if c != key]

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Raw feature columns the model consumes (training set, pyfunc input)."""
        return tuple(f.column for f in self.features)

    def fingerprint(self) -> str:
        """16 hex digits of the SHA-256 of the parsed definitions (module docstring): entities by
        name, the events, the features in order (their order is the KJT's and the dense
        tensor's), each with every field."""
        canonical = {
            "entities": {
                name: asdict(e) | {"ttl": e.ttl.total_seconds() if e.ttl else None}
                for name, e in sorted(self.entities.items())
            },
            "events": asdict(self.events),
            "features": [asdict(f) for f in self.features],
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ---- generated artefacts -------------------------------------------------------------------
    def polars_schema(self, entity: str) -> dict[str, Any]:
        """Expected Polars dtypes of an entity table: key, time and its features' columns."""
        import polars as pl

        ent = self.entities[entity]
        schema: dict[str, Any] = {ent.key: pl.Int64, ent.time: pl.Datetime}
        for f in self.for_entity(entity):
            if f.column == ent.key:
                continue
            schema[f.column] = {
                "numeric": pl.Float64,
                "categorical": None,  # any scalar (int or string)
                "multi_categorical": pl.List,
            }[f.kind]
        return schema

    def embedding_bag_configs(self) -> list[Any]:
        """One TorchRec ``EmbeddingBagConfig`` per sparse feature (table ``t_<name>``)."""
        from torchrec import EmbeddingBagConfig, PoolingType

        return [
            EmbeddingBagConfig(
                name=f"t_{f.name}",
                embedding_dim=f.embedding_dim,
                num_embeddings=f.num_embeddings,
                feature_names=[f.name],
                pooling=PoolingType.MEAN if f.pooling == "mean" else PoolingType.SUM,
            )
            for f in self.sparse
        ]

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"feature definitions {path}: cannot read ({e.strerror})") from e
        return cls.from_toml(text, where=str(path))

    @classmethod
    def from_toml(cls, text: str, *, where: str = "<features>") -> FeatureSet:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"feature definitions {where}: invalid TOML: {e}") from e
        return _parse(raw, text, where)


def _req(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"feature definitions {where}: missing required key {key!r}")
    return d[key]


def _parse(raw: dict[str, Any], text: str, where: str) -> FeatureSet:
    entities: dict[str, Entity] = {}
    for name, e in _req(raw, "entities", where).items():
        w = f"{where} [entities.{name}]"
        ttl = e.get("ttl")
        entities[name] = Entity(
            name=name,
            key=_req(e, "key", w),
            table=_req(e, "table", w),
            time=e.get("time", "valid_from"),
            ttl=parse_duration(ttl, where=f"{w} ttl") if ttl else None,
        )
    ev = _req(raw, "events", where)
    events = Events(
        table=_req(ev, "table", f"{where} [events]"),
        time=_req(ev, "time", f"{where} [events]"),
        keys=tuple(ev.get("keys", ())),
    )
    features: list[Feature] = []
    seen: set[str] = set()
    for i, f in enumerate(_req(raw, "features", where)):
        w = f"{where} features[{i}] ({f.get('name', '?')})"
        name = _req(f, "name", w)
        if name in seen:
            raise ValueError(f"{w}: duplicate feature name {name!r}; feature names must be unique")
        seen.add(name)
        entity = _req(f, "entity", w)
        if entity not in entities:
            raise ValueError(f"{w}: unknown entity {entity!r}; defined: {sorted(entities)}")
        kind = _req(f, "kind", w)
        if kind not in KINDS:
            raise ValueError(f"{w}: kind {kind!r} is not one of {KINDS}")
        feat = Feature(
            name=name,
            entity=entity,
            kind=kind,
            column=f.get("column", name),
            num_embeddings=int(f.get("num_embeddings", 0)),
            embedding_dim=int(f.get("embedding_dim", 16)),
            pooling=f.get("pooling", "mean" if kind == "multi_categorical" else "sum"),
            mapping=f.get("mapping", "vocab"),
            min_count=int(f.get("min_count", 1)),
            transform=f.get("transform", "none"),
            non_finite=f.get("non_finite", "reject"),
        )
        if feat.is_sparse and feat.num_embeddings < 2:
            raise ValueError(f"{w}: num_embeddings must be >= 2 (row 0 is for unknown values)")
        if feat.mapping not in MAPPINGS:
            raise ValueError(f"{w}: mapping {feat.mapping!r} is not one of {MAPPINGS}")
        if feat.pooling not in POOLINGS:
            raise ValueError(f"{w}: pooling {feat.pooling!r} is not one of {POOLINGS}")
        if feat.transform not in TRANSFORMS:
            raise ValueError(f"{w}: transform {feat.transform!r} is not one of {TRANSFORMS}")
        if feat.non_finite not in NON_FINITE:
            raise ValueError(f"{w}: non_finite {feat.non_finite!r} is not one of {NON_FINITE}")
        if "non_finite" in f and feat.is_sparse:
            raise ValueError(
                f"{w}: non_finite applies to numeric features only (this one is {kind}); remove it"
            )
        features.append(feat)
    if not features:
        raise ValueError(f"feature definitions {where}: no [[features]] defined")
    return FeatureSet(entities=entities, events=events, features=tuple(features), source=text)
