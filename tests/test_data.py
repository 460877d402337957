"""to_tensor_data + iterate_batches: a batch's KJT holds exactly the rows of the input frame."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from fixtures import DATA_DENSE, DATA_HEADER, DATA_SPARSE

from feature_store.definitions import FeatureSet
from recsys_moe.data import Batch, _cut_kjts, _gathered_kjts, iterate_batches, to_tensor_data

N = 53


def make_frames(with_dense: bool = True) -> tuple[FeatureSet, pl.DataFrame, pl.DataFrame]:
    features = FeatureSet.from_toml(DATA_HEADER + DATA_SPARSE + (DATA_DENSE if with_dense else ""))
    rng = np.random.default_rng(0)
    tags = [rng.integers(0, 20, size=rng.integers(0, 4)).tolist() for _ in range(N)]
    cols: dict[str, pl.Series] = {
        "user_id": pl.Series(rng.integers(0, 50, N), dtype=pl.Int64),
        "tags": pl.Series(tags, dtype=pl.List(pl.Int64)),
        "item_id": pl.Series(rng.integers(0, 30, N), dtype=pl.Int64),
    }
    if with_dense:
        cols["duration_s"] = pl.Series(rng.normal(size=N), dtype=pl.Float32)
        cols["age"] = pl.Series(rng.normal(size=N), dtype=pl.Float32)
    labels = pl.DataFrame(
        {
            "click": pl.Series(rng.integers(0, 2, N), dtype=pl.Int8),
            "watch_time_s": rng.exponential(30.0, N),
        }
    )
    # A sliced, multi-chunk frame: the Arrow list offsets then don't start at 0.
    big = pl.concat([pl.DataFrame(cols).head(20), pl.DataFrame(cols)], rechunk=False)
    mapped = big.slice(20, N)
    assert any(tags) and not all(tags)  # non-empty and empty lists
    return features, mapped, labels


def rows_of(batch: Batch, keys: list[str]) -> list[dict[str, list[int]]]:
    jt = batch.sparse.to_dict()
    assert list(batch.sparse.keys()) == keys
    per_key = {k: jt[k].to_dense() for k in keys}  # list of [len_i] per row
    return [{k: per_key[k][i].tolist() for k in keys} for i in range(len(batch))]


@pytest.mark.parametrize("shuffle", [False, True])
def test_round_trip(shuffle: bool) -> None:
    features, mapped, labels = make_frames()
    data = to_tensor_data(mapped, features, labels)
    assert data.num_rows == N and data.dense.shape == (N, 2) and data.dense.dtype == torch.float32
    assert data.labels["click"].dtype == torch.float32
    keys = [f.name for f in features.sparse]
    batches = list(iterate_batches(data, 8, shuffle=shuffle, seed=3))
    assert [len(b) for b in batches] == [8] * 6 + [5]  # last partial batch kept
    expected = mapped.to_dicts()
    seen = []
    for batch in batches:
        for i, row in enumerate(rows_of(batch, keys)):
            # find the source row through a unique-per-row probe: the dense values
            j = int(np.flatnonzero(mapped["duration_s"].to_numpy() == batch.dense[i, 0].item())[0])
            seen.append(j)
            src = expected[j]
            assert row == {
                "user_id": [src["user_id"]],
                "tags": src["tags"],
                "item_id": [src["item_id"]],
            }
            assert batch.dense[i].tolist() == pytest.approx([src["duration_s"], src["age"]])
            assert batch.labels["click"][i].item() == labels["click"][j]
            assert batch.labels["watch_time_s"][i].item() == pytest.approx(
                labels["watch_time_s"][j]
            )
    assert sorted(seen) == list(range(N))  # each row exactly once: a permutation
    assert (seen != list(range(N))) == shuffle


def test_shuffle_is_deterministic_for_a_seed() -> None:
    features, mapped, labels = make_frames()
    data = to_tensor_data(mapped, features, labels)

    def order(seed: int) -> list[float]:
        return torch.cat(
            [b.dense[:, 0] for b in iterate_batches(data, 10, shuffle=True, seed=seed)]
        ).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_drop_last() -> None:
    features, mapped, _ = make_frames()
    data = to_tensor_data(mapped, features)
    assert data.labels == {}
    assert [len(b) for b in iterate_batches(data, 8, drop_last=True)] == [8] * 6
    assert [len(b) for b in iterate_batches(data, 100)] == [N]


@pytest.mark.parametrize("rows", [N, N - N % 8])  # with and without a short last batch
def test_gathered_layout_equals_the_cut_one(rows: int) -> None:
    """The GPU's batch-major layout (one gather per epoch) gives each batch exactly the KJT that
    cutting and joining every feature's column gives (the CPU's way), empty bags included."""
    features, mapped, labels = make_frames()
    data = to_tensor_data(mapped, features, labels)
    bounds = [*range(0, rows, 8), rows]
    cut, gathered = list(_cut_kjts(data, bounds)), list(_gathered_kjts(data, bounds))
    assert len(cut) == len(gathered) == len(bounds) - 1
    for a, b in zip(cut, gathered, strict=True):
        assert a.keys() == b.keys() and a.stride() == b.stride()
        assert torch.equal(a.values(), b.values()) and torch.equal(a.lengths(), b.lengths())
        assert a.length_per_key() == b.length_per_key()
        assert a.offset_per_key() == b.offset_per_key()


def test_no_dense_features() -> None:
    features, mapped, labels = make_frames(with_dense=False)
    data = to_tensor_data(mapped, features, labels)
    assert data.dense.shape == (N, 0)
    batch = next(iterate_batches(data, 16, shuffle=True))
    assert batch.dense.shape == (16, 0)
    assert batch.sparse.lengths().shape == (3 * 16,)
    moved = batch.to("cpu")
    assert moved.dense.shape == (16, 0) and torch.equal(
        moved.sparse.values(), batch.sparse.values()
    )


def test_out_of_range_ids_are_rejected() -> None:
    features, mapped, _ = make_frames()
    bad = mapped.with_columns(pl.lit(50, dtype=pl.Int64).alias("user_id"))
    with pytest.raises(ValueError, match="user_id"):
        to_tensor_data(bad, features)
