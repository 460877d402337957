"""Candidates for scoring: one Parquet file or a folder of them, read in bounded memory.

Input: ``user_id``, ``item_id`` and optionally ``request_id`` (integer ids); other columns are
ignored. A folder is every ``*.parquet`` below it (hive partitions allowed), in sorted path order;
names starting with ``.`` or ``_`` are skipped. The unit of reading is one row group of one file.

Sharding key. Top K is taken per request (or per user without ``request_id``), so all candidates
of a group must land in the same output shard, wherever they sit in the input. A group's shard is
``hash_index(group id) - 1`` modulo the shard count (splitmix64 of the id: stable across runs,
machines and library versions). Scoring therefore runs in two phases:

1. partition: each rank reads its row groups (unit ``u`` belongs to rank ``u % world``) and
   writes, per shard, the rows that hash to it into ``_spill/s-<shard>/u-<unit>.parquet``, with
   their global row number (so "the first of repeated pairs" means the first in the input);
2. score: each rank scores its shards (shard ``s`` belongs to rank ``s % world``) from the spill
   files alone.

Memory is bounded by one row group in phase 1 and one shard in phase 2 (``score.shard_rows``).
Rows with a null id cannot be placed in a group: they are dropped in phase 1 and counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from feature_store import DataError
from pipelines.atomic import write_text_atomic
from pipelines.mappings import hash_index

ROW = "__row"  # global row number of a candidate in the input (files, then row groups, in order)
SHARD = "__shard"
SPILL = "_spill"


@dataclass(frozen=True)
class Unit:
    path: Path
    row_group: int
    rows: int
    first_row: int  # global row number of its first row


class CandidateSource:
    """The candidate files, checked (schema, integer ids) and listed by row group."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            files = sorted(
                p
                for p in self.path.rglob("*.parquet")
                if not any(part.startswith((".", "_")) for part in p.relative_to(self.path).parts)
            )
            if not files:
                raise DataError(f"candidates {self.path}: a folder without *.parquet files")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise DataError(f"candidates {self.path}: no such file or folder")
        self.files = files
        self.units: list[Unit] = []
        self.has_request = False
        start = 0
        for i, f in enumerate(files):
            has_request = self._check(f)
            if i and has_request != self.has_request:
                raise DataError(
                    f"candidates {f}: column 'request_id' is {'' if has_request else 'not '}"
                    f"there but {'not ' if has_request else ''}in {files[0]}; every file of a "
                    "candidate set needs the same columns"
                )
            self.has_request = has_request
            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.units.append(Unit(f, g, n, start))
                start += n
        self.rows = start

    @property
    def group(self) -> str:
        """The column top K is taken per."""
        return "request_id" if self.has_request else "user_id"

    @property
    def ids(self) -> list[str]:
        return ["request_id", "user_id", "item_id"] if self.has_request else ["user_id", "item_id"]

    def _check(self, f: Path) -> bool:
        try:
            schema = pl.scan_parquet(f).collect_schema()
        except Exception as e:  # a truncated or non-Parquet file
            raise DataError(f"candidates {f}: not a readable Parquet file ({e})") from e
        ids = check_id_columns(
            str(f),
            dict(schema),
            lambda t: t.is_integer(),
            "cast to Int64 where the file is written",
        )
        return "request_id" in ids

    def identity(self) -> dict:
        """What a resumed run must find unchanged: every file's path, size and row count."""
        return {
            "path": str(self.path.resolve()),
            "files": [
                {
                    "path": str(f.relative_to(self.path)) if f != self.path else f.name,
                    "bytes": f.stat().st_size,
                }
                for f in self.files
            ],  # fmt: skip
            "rows": self.rows,
        }

    def read_unit(self, unit: Unit) -> pl.DataFrame:
        table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=self.ids)
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        return frame.select(pl.col(self.ids).cast(pl.Int64)).with_columns(
            pl.int_range(unit.first_row, unit.first_row + frame.height, dtype=pl.Int64).alias(ROW)
        )


def check_id_columns(
    where: str, dtypes: dict[str, Any], is_integer: Callable[[Any], bool], cast: str
) -> list[str]:
    """The candidates' id columns (``request_id`` first when there, ``user_id``, ``item_id``);
    a missing ``user_id`` or ``item_id``, or an id column whose dtype is not ``is_integer``, is
    a ``DataError`` (``cast``: how to fix the type)."""
    for col in ("user_id", "item_id", "request_id"):
        if col not in dtypes:
            if col == "request_id":
                continue
            raise DataError(
                f"candidates {where}: missing required column {col!r}; columns: {list(dtypes)}"
            )
        if not is_integer(dtypes[col]):
            raise DataError(
                f"candidates {where}: column {col!r} has dtype {dtypes[col]}, expected an "
                f"integer id ({cast})"
            )
    return [c for c in ("request_id", "user_id", "item_id") if c in dtypes]


def shard_count(rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(rows / shard_rows))


def shard_of(column: str, shards: int) -> pl.Expr:
    """The output shard of a group id: stable (splitmix64), in ``[0, shards)``."""
    return (hash_index(pl.col(column), shards + 1) - 1).cast(pl.Int32)


def unit_done(output: Path, index: int) -> Path:
    return output / SPILL / "units" / f"u-{index:06d}.json"


def partition_unit(source: CandidateSource, index: int, shards: int, output: Path) -> dict:
    """Phase 1 for unit ``index``: its rows, split by shard, into the spill folder; then a marker
    with its counts (written last: a unit with a marker is complete)."""
    unit = source.units[index]
    frame = source.read_unit(unit)
    kept = frame.drop_nulls(source.ids)
    counts = {"rows": frame.height, "null_id": frame.height - kept.height}
    kept = kept.with_columns(shard_of(source.group, shards).alias(SHARD))
    for (s,), part in kept.partition_by(SHARD, as_dict=True, maintain_order=True).items():
        folder = output / SPILL / f"s-{s:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"u-{index:06d}.parquet"
        tmp = folder / f".u-{index:06d}.parquet.tmp"
        part.drop(SHARD).write_parquet(tmp)
        tmp.replace(final)
    write_text_atomic(unit_done(output, index), json.dumps(counts))
    return counts


def read_shard(output: Path, shard: int, ids: list[str]) -> pl.DataFrame:
    """Phase 2's input: the shard's candidates from every unit, in input order."""
    files = sorted((output / SPILL / f"s-{shard:05d}").glob("u-*.parquet"))
    schema = {c: pl.Int64 for c in [*ids, ROW]}
    if not files:
        return pl.DataFrame(schema=schema)
    return pl.read_parquet(files).sort(ROW)


def clean(frame: pl.DataFrame, group: str) -> tuple[pl.DataFrame, int]:
    """Repeated (group, item) pairs dropped, the first in input order kept; how many dropped."""
    unique = frame.unique([group, "item_id"], keep="first", maintain_order=True)
    return unique, frame.height - unique.height
