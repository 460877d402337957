"""Loaders of a training split by rank: ``ParquetLoader`` streams the mapped split's Parquet row
groups → ``Batch``es; ``MemoryLoader`` (end of the file) reads the split once and holds it.
Both share the sharding rule, ``state_dict`` and exact resume; ``train.loader`` picks one.
A loader is the one owner of the step schedule (``len(loader)`` batches per epoch, the rows of
each) and of the data position (``state_after(steps)``).

    loader = ParquetLoader.from_split(dataset_dir, "train", features=fs,
                                      labels=["click", "watch_time_s"], batch_size=4096,
                                      rank=rank, world_size=world, shuffle=True, seed=0)
    for batch in loader.until_epoch(epochs):   # from the position to the end of training
        ...
    checkpoint["data"] = loader.state_after(step)   # after any step: resumes mid-epoch

The split's ids were mapped when the training set was built (``mapped/<split>.parquet``, see
``pipelines.training_set``): the loaders read ready integer columns. Each buffer of
``buffer_batches * batch_size`` rows (by default the fewest batches that hold ``BUFFER_ROWS``)
is read with pyarrow (only the row groups it overlaps), turned into tensors once and cut into
batches by ``recsys_moe.data.iterate_batches``, so a batch equals what the in-memory path
(``to_tensor_data`` + ``iterate_batches``) gives for the same rows. ``READ_AHEAD`` buffers are
prepared in background threads; a few buffers are in memory at a time. A row group that
straddles two buffers is decoded by both: row groups well below the buffer size keep that small
(the builder writes 16k-row groups; buffers are 64k rows by default).

Order of an epoch. The split's row groups, in file order, or permuted with ``(seed, epoch)`` when
``shuffle``, are laid end to end as one sequence of N rows.

Sharding rule (``DistributedModelParallel`` needs every rank to step equally often): each rank
gets ``R = N // world_size`` rows, rank ``r`` the contiguous range ``[r * R, (r + 1) * R)`` of
that sequence; the last ``N % world_size`` rows (fewer than ``world_size``) are not used that
epoch (with shuffle they are different rows each epoch). Ranks are disjoint, hold the same number
of rows and hence the same number of batches: ``ceil(R / batch_size)``, or ``R // batch_size``
with ``drop_last`` (then up to ``batch_size - 1`` more rows per rank go unused).

Shuffle: besides the row-group order, the rows of each buffer are permuted with a seed of
``(seed, epoch, rank, buffer index)``, so the stream is a function of those alone, and
``state_dict()`` (epoch, batches consumed) is enough to resume exactly: the loader skips whole
buffers without reading them and re-derives the one it was in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from feature_store import FeatureSet
from pipelines.training_set import mapped_files
from recsys_moe.data import Batch, TensorData, iterate_batches, take_rows, to_tensor_data

STATE_VERSION = 3
READ_AHEAD = 2  # buffers read in background threads while one is being batched
BUFFER_ROWS = 65_536  # default buffer: rows of ~4 shuffled row groups are mixed in each batch


@dataclass(frozen=True)
class _Group:
    file: int  # index into the loader's files
    index: int  # row group within the file
    rows: int


class _Position:
    """Epoch and batches consumed, and the settings an exact resume needs to match."""

    order = ""  # how rows are ordered into batches: a resume must use the same
    epoch: int
    batches: int
    seed: int
    shuffle: bool
    batch_size: int
    world_size: int
    num_rows: int

    def _settings(
        self, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int, drop_last: bool
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.batches = 0, 0  # data position: batches consumed in this epoch

    def _rows(self, num_rows: int) -> None:
        """The sharding rule: ``num_rows // world_size`` rows and equal batch counts per rank."""
        self.num_rows = num_rows
        self.rows_per_rank = num_rows // self.world_size
        whole, part = divmod(self.rows_per_rank, self.batch_size)
        self._num_batches = whole + (1 if part and not self.drop_last else 0)

    def __len__(self) -> int:
        """Batches per epoch on this rank (every rank the same)."""
        return self._num_batches

    def rows_in_batch(self, index: int) -> int:
        """Rows of batch ``index`` (0-based, within an epoch): the last one may be short."""
        return min(self.batch_size, self.rows_per_rank - index * self.batch_size)

    def state_after(self, steps: int) -> dict[str, Any]:
        """The position after ``steps`` batches counted from the start of epoch 0, as
        ``state_dict`` gives it; for checkpoints, since train pipelines read batches ahead and
        the loader's own position is then further on."""
        epoch, batches = divmod(steps, len(self))
        return self.state_dict() | {"epoch": epoch, "batches": batches}

    def until_epoch(self, epochs: int) -> Iterator[Batch]:
        """Every batch from the current position to the end of epoch ``epochs - 1``."""
        while self.epoch < epochs:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "order": self.order,
            "epoch": self.epoch,
            "batches": self.batches,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_rows": self.num_rows,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        keys = ["version", "order", "seed", "shuffle", "batch_size", "world_size", "num_rows"]
        # drop_last sets the steps per epoch, so where a step falls (states since 2026-12-02)
        keys += ["drop_last"] if "drop_last" in state else []
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader {mine[key]!r}; "
                    "resume with the saved run's data and settings (train.loader, "
                    "train.batch_size, train.seed, train.drop_last and train.compile, number "
                    "of processes)"
                )
        if not 0 <= state["batches"] <= len(self):
            raise ValueError(f"loader state: batches={state['batches']} outside [0, {len(self)}]")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])

    def check_step(self, step: int) -> None:
        """After ``load_state_dict`` of a checkpoint's ``state_after(step)``: the position is
        where ``step`` batches of this loader end. A state saved with another count of batches
        per epoch (another ``drop_last``; states before 2026-12-02 do not record it) is not,
        once past its first epoch."""
        if self.epoch * len(self) + self.batches != step:
            raise ValueError(
                f"loader state: epoch {self.epoch}, batch {self.batches} is not where step "
                f"{step} falls with {len(self)} batches per epoch; the checkpoint was written "
                "with another count of batches per epoch: resume with the saved run's "
                "train.drop_last (auto: true with train.compile, which is 'step' by default "
                "on one GPU)"
            )


class ParquetLoader(_Position):
    """Iterable of ``Batch`` over Parquet files (see the module docstring for order, sharding,
    shuffle and resume). ``len(loader)`` is the number of batches per epoch on this rank."""

    order = "parquet-buffers"

    def __init__(
        self,
        files: Sequence[str | Path],
        *,
        features: FeatureSet,
        labels: Sequence[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        buffer_batches: int | None = None,
    ) -> None:
        self._settings(batch_size, rank, world_size, shuffle, seed, drop_last)
        if buffer_batches is None:
            buffer_batches = max(1, -(-BUFFER_ROWS // batch_size))
        if buffer_batches < 1:
            raise ValueError(f"buffer_batches ({buffer_batches}) must be >= 1")
        if not files:
            raise ValueError("no Parquet files to load")
        self.files = [Path(f) for f in files]
        self.features, self.labels = features, list(labels)
        self.buffer_rows = buffer_batches * batch_size
        self.columns = mapped_columns(features, self.labels)
        self._groups = self._row_groups()
        self._rows(sum(g.rows for g in self._groups))

    @classmethod
    def from_split(cls, dataset_dir: str | Path, split: str, **kwargs: Any) -> ParquetLoader:
        """A loader over split ``split`` of a training set (its ``mapped/`` file)."""
        return cls(mapped_files(dataset_dir, split), **kwargs)

    # ---- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch; afterwards the position is the start of
        the next epoch. The next ``READ_AHEAD`` buffers are read and mapped in background
        threads (pyarrow and Polars release the GIL) while this one is cut into batches."""
        epoch, skip = self.epoch, self.batches
        per_buffer = self.buffer_rows // self.batch_size
        ranges = self._rank_ranges(epoch)
        # buffers before the saved position's are not read at all
        todo = list(range(skip // per_buffer, -(-self.rows_per_rank // self.buffer_rows)))
        pool = ThreadPoolExecutor(max_workers=READ_AHEAD)
        pending = [pool.submit(self._buffer, ranges, b) for b in todo[:READ_AHEAD]]
        try:
            for k, b in enumerate(todo):
                data = pending.pop(0).result()
                if k + READ_AHEAD < len(todo):
                    pending.append(pool.submit(self._buffer, ranges, todo[k + READ_AHEAD]))
                batches = iterate_batches(
                    data,
                    self.batch_size,
                    shuffle=self.shuffle,
                    seed=self._buffer_seed(epoch, b),
                    drop_last=self.drop_last,
                )
                for i, batch in enumerate(batches):
                    if b * per_buffer + i < skip:
                        continue
                    self.batches += 1
                    yield batch
        finally:  # also when the consumer stops early: drop what was prefetched
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)
        self.epoch, self.batches = epoch + 1, 0

    def _buffer(self, ranges: list[tuple[_Group, int, int]], b: int) -> TensorData:
        start = b * self.buffer_rows
        table = self._read(ranges, start, min(start + self.buffer_rows, self.rows_per_rank))
        return self._tensors(table)

    def _buffer_seed(self, epoch: int, buffer: int) -> int:
        seq = np.random.SeedSequence([self.seed, epoch, self.rank, buffer])
        return int(seq.generate_state(1, dtype=np.uint64)[0] >> 1)

    def _row_groups(self) -> list[_Group]:
        groups = []
        for i, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            missing = [c for c in self.columns if c not in meta.schema.to_arrow_schema().names]
            if missing:
                raise ValueError(
                    f"{path}: no column(s) {missing}; is it a split of this feature set and "
                    "these tasks? rebuild it with `recsys-moe features build`"
                )
            groups += [_Group(i, j, meta.row_group(j).num_rows) for j in range(meta.num_row_groups)]
        return groups

    def _rank_ranges(self, epoch: int) -> list[tuple[_Group, int, int]]:
        """This rank's rows as (row group, first row, end row) slices, in epoch order."""
        order = list(range(len(self._groups)))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(order)).tolist()
        lo = self.rank * self.rows_per_rank
        hi = lo + self.rows_per_rank
        out, pos = [], 0
        for g in (self._groups[i] for i in order):
            a, b = max(lo, pos), min(hi, pos + g.rows)
            if a < b:
                out.append((g, a - pos, b - pos))
            pos += g.rows
        return out

    def _read(self, ranges: list[tuple[_Group, int, int]], start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of this rank's sequence."""
        tables, pos, files = [], 0, {}  # one ParquetFile per call: threads share none
        for g, a, b in ranges:
            lo, hi = max(start, pos), min(stop, pos + b - a)
            if lo < hi:
                if g.file not in files:
                    files[g.file] = pq.ParquetFile(self.files[g.file])
                table = files[g.file].read_row_group(g.index, columns=self.columns)
                tables.append(table.slice(a + lo - pos, hi - lo))
            pos += b - a
            if pos >= stop:
                break
        return pa.concat_tables(tables)

    def _tensors(self, table: pa.Table) -> TensorData:
        return mapped_tensors(pl.from_arrow(table), self.features, self.labels)


class MemoryLoader(_Position):
    """The split read once and held in memory; same interface, sharding rule and resume as
    ``ParquetLoader``, with a global shuffle: epoch e permutes all N rows with seed ``seed + e``
    and rank r takes the r-th of ``world_size`` slices of ``N // world_size`` rows.

    No per-epoch Parquet decode, and a shuffle over the whole split rather than over buffers,
    but the mapped split must fit in memory (``train.loader = "auto"`` picks it for small
    splits). ``device``: where the rows are held and batches are cut; on a GPU
    (``train.loader = "device"``) the permutation, the gather and every batch stay on the GPU,
    and the host only launches kernels (no copy, no sync per batch)."""

    order = "memory-global"

    def __init__(
        self,
        data: TensorData,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self._settings(batch_size, rank, world_size, shuffle, seed, drop_last)
        self.data = data if device is None else data.to(device)
        self._rows(data.num_rows)

    @classmethod
    def from_split(
        cls,
        dataset_dir: str | Path,
        split: str,
        *,
        features: FeatureSet,
        labels: Sequence[str],
        **kwargs: Any,
    ) -> MemoryLoader:
        """A loader over split ``split`` of a training set, read now."""
        return cls(read_mapped(dataset_dir, split, features, labels), **kwargs)

    def __iter__(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch; then the position is the next epoch's."""
        epoch, skip = self.epoch, self.batches
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=gen)
        else:
            order = torch.arange(self.num_rows)
        lo = self.rank * self.rows_per_rank
        idx = order[lo : lo + self.rows_per_rank][skip * self.batch_size :]
        rows = take_rows(self.data, idx.to(self.data.dense.device))
        for batch in iterate_batches(rows, self.batch_size, drop_last=self.drop_last):
            self.batches += 1
            yield batch
        self.epoch, self.batches = epoch + 1, 0


Loader = ParquetLoader | MemoryLoader


def mapped_columns(features: FeatureSet, labels: Sequence[str]) -> list[str]:
    """The columns of a mapped split the model reads: features (by name), then labels."""
    return list(dict.fromkeys([*(f.name for f in features.features), *labels]))


def mapped_tensors(frame: pl.DataFrame, features: FeatureSet, labels: Sequence[str]) -> TensorData:
    """Tensors of mapped-split rows (``frame``'s feature columns and ``labels``)."""
    return to_tensor_data(frame, features, frame.select(list(labels)))


def read_mapped(
    dataset_dir: str | Path, split: str, features: FeatureSet, labels: Sequence[str]
) -> TensorData:
    """A whole mapped split as tensors (validation, the memory loader)."""
    files = mapped_files(dataset_dir, split)
    columns = mapped_columns(features, labels)
    schema = pq.read_schema(files[0]).names
    missing = [c for c in columns if c not in schema]
    if missing:
        raise ValueError(
            f"{files[0]}: no column(s) {missing}; is it a split of this feature set and these "
            "tasks? rebuild it with `recsys-moe features build`"
        )
    return mapped_tensors(pl.read_parquet(files, columns=columns), features, labels)
