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

Feature groups: one ``[[features]]`` block may declare many features with the same kind, entity
and settings: ``names = ["f1", "f2"]`` lists them; ``pattern = "x_*"`` (a glob: ``*``, ``?``,
``[...]``) or ``regex = "x_\\d+"`` (a full match) takes every column of the source table that
matches, in the table's column order, minus ``exclude`` (names or globs) and the table's key and
time columns. A pattern is resolved against the table's schema when the definitions are loaded
with a ``columns`` function (``FeatureSet.load(path, columns=...)``; the config passes its
offline store), and the loaded set is then its expansion: one feature per member, the
fingerprint of the expanded definitions (the same as writing each block out by hand), and
``source`` the expanded TOML (what bundles and runs keep, so a model never resolves a pattern
again). A group's members take their column from their name (``column`` is for one feature).

    [[features]]
    pattern = "x_*"        # x_0, x_1, ... of the source table
    kind = "numeric"

Tables without entities: ``[entities]`` may be left out and a feature's ``entity`` too: such a
feature is a column of the events table itself (no join), as in a plain table of rows with one
row per example. The events' ``time`` is then optional (it is what point-in-time joins match
on, required when an entity is defined).

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

import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
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
    time: str  # "" when the events have no time (no entity: nothing is joined as of a time)
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Feature:
    """One model input. ``column`` is its column in the entity table (the events table when
    ``entity`` is ``""``) and in the training set."""

    name: str
    entity: str  # "" = a column of the events table
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

    @property
    def event_features(self) -> tuple[Feature, ...]:
        """Features read from the events rows themselves, not joined: those without an entity
        and those whose column is their entity's key (e.g. ``user_id``)."""
        return tuple(
            f for f in self.features if not f.entity or f.column == self.entities[f.entity].key
        )

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
    def load(cls, path: str | Path, *, columns: TableColumns | None = None) -> FeatureSet:
        """The definitions in ``path``; ``columns(table)`` (the column names of a store table)
        resolves pattern groups, and is only called when the file has one."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"feature definitions {path}: cannot read ({e.strerror})") from e
        return cls.from_toml(text, where=str(path), columns=columns)

    @classmethod
    def from_toml(
        cls, text: str, *, where: str = "<features>", columns: TableColumns | None = None
    ) -> FeatureSet:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"feature definitions {where}: invalid TOML: {e}") from e
        return _parse(raw, text, where, columns)

    def to_toml(self) -> str:
        """The definitions as TOML, one block per feature with every setting spelled out:
        parsed again, the same feature set (and fingerprint)."""
        lines: list[str] = []
        for e in self.entities.values():
            lines += [f"[entities.{_toml(e.name)}]", f"key = {_toml(e.key)}",
                      f"table = {_toml(e.table)}", f"time = {_toml(e.time)}"]  # fmt: skip
            if e.ttl is not None:
                seconds = e.ttl.total_seconds()
                text = str(int(seconds)) if seconds == int(seconds) else repr(seconds)
                lines.append(f"ttl = {_toml(text + 's')}")
            lines.append("")
        lines += ["[events]", f"table = {_toml(self.events.table)}"]
        if self.events.time:
            lines.append(f"time = {_toml(self.events.time)}")
        lines += [f"keys = [{', '.join(_toml(k) for k in self.events.keys)}]", ""]
        for f in self.features:
            lines.append("[[features]]")
            for key, value in asdict(f).items():
                if key == "entity" and not value:
                    continue  # a column of the events table
                if key == "non_finite" and f.is_sparse:
                    continue  # numeric only (and the parser says so)
                lines.append(f"{key} = {_toml(value)}")
            lines.append("")
        return "\n".join(lines)


TableColumns = Callable[[str], Sequence[str]]  # store table name -> its column names
# keys of a [[features]] block that name its members: exactly one of them
_MEMBER_KEYS = ("name", "names", "pattern", "regex")


def _toml(value: Any) -> str:
    """A scalar or list as a TOML value (JSON's string escapes are TOML's basic strings')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _req(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"feature definitions {where}: missing required key {key!r}")
    return d[key]


def _block_label(where: str, i: int, block: dict[str, Any]) -> str:
    """How errors name a [[features]] block: its index and what names its members."""
    for key in _MEMBER_KEYS:
        if key in block:
            shown = block[key] if key == "name" else f"{key} {block[key]!r}"
            if key == "names" and isinstance(block[key], list) and len(block[key]) > 3:
                shown = f"names [{', '.join(map(repr, block[key][:3]))}, ...]"
            return f"{where} features[{i}] ({shown})"
    return f"{where} features[{i}] (?)"


def _members(
    block: dict[str, Any],
    w: str,
    entities: dict[str, Entity],
    events: Events,
    columns: TableColumns | None,
) -> list[tuple[str, str]]:
    """``(name, column)`` of each feature a block declares, in order."""
    given = [k for k in _MEMBER_KEYS if k in block]
    if len(given) != 1:
        raise ValueError(
            f"{w}: a [[features]] block names its feature(s) with exactly one of "
            f"name, names (a list), pattern (a glob) or regex; got {given or 'none'}"
        )
    key = given[0]
    if key != "name" and "column" in block:
        raise ValueError(f"{w}: column is for a single feature (name = ...); a group's members "
                         "are read from the columns of their names")  # fmt: skip
    if key not in ("pattern", "regex") and "exclude" in block:
        raise ValueError(f"{w}: exclude applies to pattern and regex groups only; remove it")
    if key == "name":
        name = block["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{w}: name must be a non-empty string, got {name!r}")
        return [(name, block.get("column", name))]
    if key == "names":
        names = block["names"]
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise ValueError(f"{w}: names must be a non-empty list of strings, got {names!r}")
        return [(n, n) for n in names]
    # pattern / regex: the columns of the source table
    spec = block[key]
    exclude = block.get("exclude", [])
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{w}: {key} must be a non-empty string, got {spec!r}")
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise ValueError(f"{w}: exclude must be a list of names or globs, got {exclude!r}")
    if key == "regex":
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{w}: regex {spec!r} does not compile: {e}") from e
        matches: Callable[[str], bool] = lambda c: rx.fullmatch(c) is not None  # noqa: E731
    else:
        matches = lambda c: fnmatch.fnmatchcase(c, spec)  # noqa: E731
    entity = block.get("entity", "")
    ent = entities.get(entity)
    table = ent.table if ent else events.table
    reserved = {ent.key, ent.time} if ent else {*events.keys, events.time}
    reserved |= set() if ent else {e.key for e in entities.values()}
    if columns is None:
        raise ValueError(
            f"{w}: a {key} is resolved against the columns of table {table!r} of the offline "
            "store; load the definitions through a config (its [data] store), or with "
            "FeatureSet.load(path, columns=...)"
        )
    try:
        available = list(columns(table))
    except ValueError as e:
        raise ValueError(f"{w}: cannot resolve {key} {spec!r}: {e}") from e
    found = [
        c
        for c in available
        if matches(c) and c not in reserved and not any(fnmatch.fnmatchcase(c, x) for x in exclude)
    ]
    if not found:
        shown = ", ".join(available[:10]) + (", ..." if len(available) > 10 else "")
        raise ValueError(
            f"{w}: {key} {spec!r} matches no column of table {table!r}"
            f"{' (after exclude)' if exclude else ''} (key and time columns excluded); its "
            f"columns: {shown}"
        )
    return [(c, c) for c in found]


def _parse(
    raw: dict[str, Any], text: str, where: str, columns: TableColumns | None = None
) -> FeatureSet:
    entities: dict[str, Entity] = {}
    for name, e in raw.get("entities", {}).items():
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
        time=ev.get("time", ""),
        keys=tuple(ev.get("keys", ())),
    )
    if entities and not events.time:
        raise ValueError(
            f"feature definitions {where} [events]: missing required key 'time': the entities "
            f"{sorted(entities)} are joined as of each event's time (leave [entities] out for a "
            "table whose rows hold their features)"
        )
    features: list[Feature] = []
    seen: dict[str, str] = {}  # feature name -> the block that declared it
    grouped = False
    for i, f in enumerate(_req(raw, "features", where)):
        w = _block_label(where, i, f)
        grouped |= "pattern" in f or "regex" in f
        entity = f.get("entity", "")
        if entity and entity not in entities:
            raise ValueError(f"{w}: unknown entity {entity!r}; defined: {sorted(entities)}")
        kind = _req(f, "kind", w)
        if kind not in KINDS:
            raise ValueError(f"{w}: kind {kind!r} is not one of {KINDS}")
        for name, column in _members(f, w, entities, events, columns):
            if name in seen:
                also = "" if f"{where} {seen[name]}" == w else f" (also declared by {seen[name]})"
                raise ValueError(
                    f"{w}: duplicate feature name {name!r}{also}; feature names must be unique"
                )
            seen[name] = w.removeprefix(f"{where} ")  # the block, without the file again
            features.append(_feature(f, w, name, column, entity, kind))
    if not features:
        raise ValueError(f"feature definitions {where}: no [[features]] defined")
    out = FeatureSet(entities=entities, events=events, features=tuple(features), source=text)
    if grouped:  # keep the expansion: a bundle or run never resolves a pattern again
        expanded = f"# {where}, its pattern groups resolved against the store's columns\n"
        out = replace(out, source=expanded + out.to_toml())
    return out


def _feature(f: dict[str, Any], w: str, name: str, column: str, entity: str, kind: str) -> Feature:
    """One feature of a block, its settings checked."""
    feat = Feature(
        name=name,
        entity=entity,
        kind=kind,  # type: ignore[arg-type]  # checked against KINDS by the caller
        column=column,
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
    return feat
