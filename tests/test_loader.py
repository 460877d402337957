"""Loaders (recsys_moe/training/loader.py): streamed batches equal the in-memory path; rank
shards are disjoint, equal in size and cover all but the documented remainder; resume is exact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from feature_store import FeatureSet
from pipelines.mappings import Mappings, apply_mappings, fit_mappings
from recsys_moe.data import Batch, iterate_batches, to_tensor_data
from recsys_moe.training.loader import Loader, MemoryLoader, ParquetLoader

FEATURES = Path(__file__).resolve().parents[1] / "configs" / "features" / "synth.toml"
N = 1001  # not a multiple of the batch size, the row-group size or the world sizes below
LABELS = ["click", "watch_time_s", "rid"]  # rid: the row's position, to identify rows


@dataclass
class Split:
    path: Path  # the mapped split, as the training-set builder writes it: mapped/train.parquet
    frame: pl.DataFrame  # its raw rows
    features: FeatureSet
    mappings: Mappings


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Split:
    """One split file in small row groups; list features with empty and null lists."""
    rng = np.random.default_rng(0)
    tags = [f"t{i}" for i in range(12)]

    def lists(i: int) -> list[str] | None:
        return None if i % 7 == 0 else list(rng.choice(tags, size=i % 4, replace=False))

    frame = pl.DataFrame(
        {
            "segment": rng.choice(["s0", "s1", "s2", None], N).tolist(),
            "age_bucket": rng.choice(["18-24", "25-34"], N).tolist(),
            "country": rng.choice(["US", "FR", "DE"], N).tolist(),
            "interests": [lists(i) for i in range(N)],
            "item_id": rng.integers(1, 200, N),
            "category": rng.choice(["c0", "c1", "c2"], N).tolist(),
            "author": rng.integers(1, 40, N),
            "tags": [lists(i + 3) for i in range(N)],
            "duration_s": np.where(rng.random(N) < 0.05, np.nan, rng.uniform(5, 600, N)),
            "click": rng.integers(0, 2, N).astype(np.int8),
            "watch_time_s": rng.uniform(0, 100, N),
            "rid": np.arange(N),
        },
        schema_overrides={"interests": pl.List(pl.String), "tags": pl.List(pl.String)},
    )
    features = FeatureSet.load(FEATURES)
    mappings = fit_mappings(frame.lazy(), features)
    path = tmp_path_factory.mktemp("split") / "mapped" / "train.parquet"
    path.parent.mkdir()
    mapped = apply_mappings(frame.lazy(), features, mappings, keep=LABELS).collect()
    mapped.write_parquet(path, row_group_size=97)
    return Split(path, frame, features, mappings)


@pytest.fixture(params=["parquet", "memory"])
def kind(request) -> str:
    return request.param


def loader(split: Split, kind: str = "parquet", **kwargs) -> Loader:
    if kind == "memory":
        return MemoryLoader.from_split(
            split.path.parent.parent, "train", features=split.features,
            labels=LABELS, **{"batch_size": 64} | kwargs,
        )  # fmt: skip
    kwargs = {"batch_size": 64, "buffer_batches": 3} | kwargs
    return ParquetLoader([split.path], features=split.features, labels=LABELS, **kwargs)


def rows(batch: Batch) -> list[int]:
    return batch.labels["rid"].long().tolist()


def assert_same(a: Batch, b: Batch) -> None:
    torch.testing.assert_close(a.dense, b.dense)
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert torch.equal(a.sparse.values(), b.sparse.values())
    for k in a.labels:
        torch.testing.assert_close(a.labels[k], b.labels[k], equal_nan=True)


def test_equals_in_memory_path(split, kind):
    ld = loader(split, kind)
    mapped = apply_mappings(split.frame.lazy(), split.features, split.mappings).collect()
    data = to_tensor_data(mapped, split.features, split.frame.select(LABELS))
    expected = list(iterate_batches(data, 64))
    got = list(ld)
    assert len(got) == len(expected) == len(ld) == -(-N // 64)
    for a, b in zip(got, expected, strict=True):
        assert_same(a, b)
    # empty and null lists come through as zero-length bags
    lengths = got[0].sparse["interests"].lengths()
    assert (lengths == 0).any() and (lengths[0::7] == 0).all()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("world", "drop_last"), [(2, False), (3, False), (3, True), (4, True)])
def test_rank_shards(split, kind, world, drop_last, shuffle):
    kw = {"world_size": world, "shuffle": shuffle, "drop_last": drop_last}
    shards = [[rows(b) for b in loader(split, kind, rank=r, **kw)] for r in range(world)]
    per_rank = N // world
    counts = {len(s) for s in shards}
    assert counts == {per_rank // 64 if drop_last else -(-per_rank // 64)}  # equal steps
    seen = [r for shard in shards for batch in shard for r in batch]
    assert len(seen) == len(set(seen))  # disjoint
    unused = N - len(seen)
    assert unused == (N % world if not drop_last else N - world * (per_rank // 64) * 64)
    if not shuffle:  # rank r holds the r-th contiguous range; the last N % world rows unused
        used = per_rank // 64 * 64 if drop_last else per_rank
        expected = [r * per_rank + i for r in range(world) for i in range(used)]
        assert seen == expected


def test_shuffle_changes_with_epoch_and_seed(split, kind):
    ld = loader(split, kind, shuffle=True, seed=1)
    epoch0 = [r for b in ld for r in rows(b)]
    epoch1 = [r for b in ld for r in rows(b)]
    other = [r for b in loader(split, kind, shuffle=True, seed=2) for r in rows(b)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(N))
    assert epoch0 != epoch1 and epoch0 != other and epoch0 != list(range(N))
    assert ld.state_dict()["epoch"] == 2


@pytest.mark.parametrize("stop", [1, 3, 4, 7, 8])  # 3 batches a buffer, 8 an epoch
def test_resume_continues_with_the_next_batch(split, kind, stop):
    kw = {"shuffle": True, "seed": 3, "rank": 1, "world_size": 2}
    straight = loader(split, kind, **kw)
    expected = [list(straight) for _ in range(2)]  # two epochs
    first = loader(split, kind, **kw)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == stop
    resumed = loader(split, kind, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(expected[0])
    for a, b in zip(head + rest, expected[0], strict=True):
        assert_same(a, b)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batches"] == 0
    for a, b in zip(resumed, expected[1], strict=True):  # the next epoch too
        assert_same(a, b)


def test_state_from_other_settings_rejected(split):
    state = loader(split, batch_size=64).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        loader(split, batch_size=32).load_state_dict(state)
    with pytest.raises(ValueError, match="order"):  # same rows, other batches: not a resume
        loader(split, "memory", batch_size=64).load_state_dict(state)


def test_a_state_of_another_drop_last_is_refused_with_or_without_its_key(split):
    """A checkpoint's position (``state_after(step)``) from a loader with another
    ``drop_last``: refused by the recorded key, and, in a state written before the key was
    recorded, by where the step falls once past the first epoch."""
    kept = loader(split, batch_size=64)  # N rows: a short last batch
    dropped = loader(split, batch_size=64, drop_last=True)
    assert len(kept) == len(dropped) + 1
    state = kept.state_after(len(kept) + 2)  # epoch 1, batch 2
    with pytest.raises(ValueError, match="drop_last=False but this loader True"):
        loader(split, batch_size=64, drop_last=True).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "drop_last"}
    resumed = loader(split, batch_size=64, drop_last=True)
    resumed.load_state_dict(older)
    with pytest.raises(ValueError, match="train.drop_last"):
        resumed.check_step(len(kept) + 2)
    same = loader(split, batch_size=64)  # the saving loader's settings: where the step falls
    same.load_state_dict(older)
    same.check_step(len(kept) + 2)
    # within the first epoch the two count the same steps: an older state resumes there
    first_epoch = loader(split, batch_size=64, drop_last=True)
    first_epoch.load_state_dict({k: v for k, v in kept.state_after(2).items() if k != "drop_last"})
    first_epoch.check_step(2)


def test_a_loader_held_on_a_device_yields_the_same_batches(split):
    """``train.loader = "device"``: the rows held where training runs (here the CPU; on a GPU
    tests/test_gpu.py checks the same), permuted and cut there, batch for batch as in memory."""
    held = loader(split, "memory", shuffle=True, seed=3, world_size=2, rank=1)
    moved = MemoryLoader(held.data, batch_size=64, shuffle=True, seed=3, world_size=2, rank=1,
                         device="cpu")  # fmt: skip
    for _ in range(2):  # two epochs: the permutation changes with the epoch
        pairs = list(zip(held, moved, strict=True))
        assert pairs
        for a, b in pairs:
            assert_same(a, b)
            assert b.sparse.length_per_key() == [int(x) for x in b.sparse.lengths().view(
                len(b.sparse.keys()), -1).sum(1)]  # fmt: skip
