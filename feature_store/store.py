"""Offline store: named tables of Parquet under one root directory.

A table ``t`` is either one file ``<root>/t.parquet`` or a directory ``<root>/t/`` of Parquet files
(hive partitions such as ``t/day=2024-01-01/part-0.parquet`` allowed). Tables are scanned lazily.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from feature_store.validate import DataError


class OfflineStore:
    """Parquet tables under ``root``; ``scan(table)`` returns a ``LazyFrame``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"OfflineStore({str(self.root)!r})"

    def path(self, table: str) -> Path:
        """Where ``table`` lives: the ``.parquet`` file, else the directory, else the file's
        expected path (which does not exist)."""
        file = self.root / f"{table}.parquet"
        folder = self.root / table
        if not file.exists() and folder.is_dir():
            return folder
        return file

    def exists(self, table: str) -> bool:
        path = self.path(table)
        return path.is_file() or (path.is_dir() and any(path.rglob("*.parquet")))

    def scan(self, table: str) -> pl.LazyFrame:
        """The table, lazily; its Parquet footer is read now so a broken file fails here."""
        path = self.path(table)
        if path.is_file():
            return _readable(pl.scan_parquet(path), path)
        if path.is_dir() and any(path.rglob("*.parquet")):
            lf = pl.scan_parquet(path / "**" / "*.parquet", hive_partitioning=True)
            return _readable(lf, path)
        raise ValueError(
            f"offline store {self.root}: table {table!r} not found (looked for "
            f"{self.root / f'{table}.parquet'} and a directory {self.root / table}/ of Parquet "
            f"files); write it first, e.g. `recsys-moe data synth --out {self.root}`, or point "
            "the store at the directory that holds it"
        )


def _readable(lf: pl.LazyFrame, path: Path) -> pl.LazyFrame:
    try:
        lf.collect_schema()
    except Exception as e:  # polars raises ComputeError / OSError subclasses for broken files
        raise DataError(
            f"offline store: {path} is not a readable Parquet file (truncated or not Parquet: "
            f"{str(e).splitlines()[0]}); rewrite it from its source"
        ) from e
    return lf
