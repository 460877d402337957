"""A training set for the GPU benchmark's model (``configs/features/bench.toml``), written
directly in the training-set layout (``pipelines.training_set``): raw splits, ``mappings/``,
``mapped/`` splits and ``manifest.json``, so that a run reads it as it reads any other.

    write_bench_dataset("bench-run/dataset", features, rows=4_000_000, seed=0)

No store and no point-in-time join: the benchmark measures training, not feature joins. Rows:
each sparse feature holds 1-4 ids drawn from a heavy-tailed (Zipf) law over 10^9 raw ids, so
that head ids repeat and embeddings have something to learn; dense features are standard normal.
Labels follow a known model: ``click ~ Bernoulli(sigmoid(-1.2 + 0.6 d01 - 0.4 d02 + Σ_f e_f))``
with ``e_f`` a fixed pseudo-random effect of the first id of features c01-c04 and c14-c17;
``watch_time_s`` (only where click = 1) is log-normal around ``exp(3 + 0.4 d03 + e_c05)``.
Written in chunks of ``chunk`` rows: memory stays bounded by a chunk.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store import FeatureSet
from pipelines.atomic import replacing_dir
from pipelines.training_set import MANIFEST, ROW_GROUP_ROWS, label_stats, load_split, map_splits

LABELS = {"click": "binary", "watch_time_s": "regression"}
CLICK_FEATURES = ("c01", "c02", "c03", "c04", "c14", "c15", "c16", "c17")
START = datetime(2026, 1, 1)
_US_PER_DAY = 86_400_000_000


def _effect(ids: np.ndarray, salt: int) -> np.ndarray:
    """A fixed effect in [-0.6, 0.6) of each raw id (a multiplicative hash, no table)."""
    h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15 + salt)) >> np.uint64(40)
    return (h % np.uint64(1000)).astype(np.float64) / 1000 * 1.2 - 0.6


def _chunk(
    rng: np.random.Generator, features: FeatureSet, n: int, first_row: int, day: int
) -> pa.Table:
    cols: dict[str, Any] = {}
    cols["request_id"] = np.arange(first_row, first_row + n, dtype=np.int64) // 8
    cols["user_id"] = rng.integers(1, 10_000_000, n, dtype=np.int64)
    cols["item_id"] = rng.integers(1, 1_000_000, n, dtype=np.int64)
    ts = START.timestamp() * 1e6 + day * _US_PER_DAY + rng.integers(0, _US_PER_DAY, n)
    cols["ts"] = pa.array(ts.astype("datetime64[us]"))
    logit = np.full(n, -1.2)
    first: dict[str, np.ndarray] = {}
    for f in features.sparse:
        lengths = rng.integers(1, 5, n)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.minimum(rng.zipf(1.2, int(offsets[-1])), 10**9).astype(np.int64)
        first[f.name] = ids[offsets[:-1]]
        cols[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
    dense = rng.standard_normal((n, len(features.dense))).astype(np.float32)
    for i, f in enumerate(features.dense):
        cols[f.name] = dense[:, i]
    for k, name in enumerate(CLICK_FEATURES):
        if name in first:
            logit += _effect(first[name], k)
    logit += 0.6 * dense[:, 0] - 0.4 * dense[:, 1]
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    mu = 3 + 0.4 * dense[:, 2] + (_effect(first["c05"], 99) if "c05" in first else 0.0)
    watch = np.where(click, np.exp(mu + 0.5 * rng.standard_normal(n)), 0.0)
    cols["click"] = click.astype(np.int8)
    cols["watch_time_s"] = watch
    return pa.table(cols)


def write_bench_dataset(
    out: str | Path,
    features: FeatureSet,
    *,
    rows: int,
    valid_rows: int = 200_000,
    test_rows: int = 200_000,
    seed: int = 0,
    chunk: int = 1_000_000,
) -> dict[str, Any]:
    """Write the training set (atomically) and return its manifest."""
    if rows < 1 or valid_rows < 1 or test_rows < 0 or chunk < 1:
        raise ValueError(f"rows ({rows}), valid_rows ({valid_rows}) must be >= 1")
    missing = [n for n in ("c05",) if n not in {f.name for f in features.sparse}]
    if missing:
        raise ValueError(f"the bench feature set needs sparse feature(s) {missing}")
    rng = np.random.default_rng(seed)
    with replacing_dir(out) as tmp:
        done = 0
        for day, (split, n) in enumerate(
            [("train", rows), ("valid", valid_rows), ("test", test_rows)]
        ):
            writer = None
            for start in range(0, max(n, 1), chunk):
                table = _chunk(rng, features, min(chunk, n - start), done, day)
                done += table.num_rows
                if writer is None:
                    writer = pq.ParquetWriter(tmp / f"{split}.parquet", table.schema)
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            writer.close()
        keep = list(LABELS)
        map_splits(tmp, features, keep)
        manifest = {
            "feature_set_fingerprint": features.fingerprint(),
            "created_at": datetime.now(UTC).isoformat(),
            "event_time": features.events.time,
            "keys": list(features.events.keys),
            "feature_columns": list(dict.fromkeys(features.input_columns)),
            "labels": label_stats(load_split(tmp, "train"), LABELS),
            "rows": {"train": rows, "valid": valid_rows, "test": test_rows},
            "sources": {"generator": "pipelines.bench", "seed": seed},
            "mapped_columns": keep,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
