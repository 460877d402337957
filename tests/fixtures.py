"""Feature definitions (TOML) and inputs shared by test modules: ``from fixtures import ...``.

Test modules import from here, never from one another. The definitions differ where the tests
need them to; each says what it is for. They are built from the same entity and events blocks.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import polars as pl
import torch
from torchrec import KeyedJaggedTensor

from feature_store import OfflineStore
from recsys_moe.config import TaskConfig

USER = """
[entities.user]
key = "user_id"
table = "users"
"""
ITEM = """
[entities.item]
key = "item_id"
table = "items"
"""
EVENTS = """
[events]
table = "impressions"
time = "ts"
"""

# ---- the tiny model (test_model, test_losses, test_mixtures) -------------------------------------
# Every feature kind, each table with its own size and dim: the tower's input is 4 + 6 + 3
# embedding dims + 1 dense = 14 wide (test_model's D_IN). ``MODEL_TASKS``: a binary and a
# log1p-regression task on it; ``model_sparse()``: a batch of its sparse inputs.

MODEL_FEATURES_TOML = (
    USER
    + ITEM
    + EVENTS
    + """keys = ["user_id", "item_id"]

[[features]]
name = "user_id"
entity = "user"
kind = "categorical"
num_embeddings = 10
embedding_dim = 4

[[features]]
name = "item_id"
entity = "item"
kind = "categorical"
num_embeddings = 12
embedding_dim = 6

[[features]]
name = "tags"
entity = "item"
kind = "multi_categorical"
num_embeddings = 8
embedding_dim = 3

[[features]]
name = "duration_s"
entity = "item"
kind = "numeric"
"""
)

MODEL_TASKS = [
    TaskConfig(name="click", kind="binary", label="click"),
    TaskConfig(name="watch_time", kind="regression", label="watch_time_s", transform="log1p"),
]


def model_sparse() -> KeyedJaggedTensor:
    """The sparse inputs of ``MODEL_FEATURES_TOML`` for 4 examples; tags lengths 2, 0, 1, 3 (one
    empty bag)."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "tags"],
        values=torch.tensor([1, 2, 3, 9, 0, 5, 11, 7, 1, 2, 4, 5, 6, 7]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 2, 0, 1, 3]),
    )


# ---- frames to tensors (test_data) ---------------------------------------------------------------
# Default embedding dims and no event keys (to_tensor_data needs neither), tables sized for ids
# drawn from 50 users, 20 tags and 30 items. The dense features are a block of their own so that
# a set without them can be built: ``DATA_HEADER + DATA_SPARSE (+ DATA_DENSE)``.

DATA_HEADER = USER + ITEM + EVENTS
DATA_SPARSE = """
[[features]]
name = "user_id"
entity = "user"
kind = "categorical"
num_embeddings = 50

[[features]]
name = "tags"
entity = "item"
kind = "multi_categorical"
num_embeddings = 20

[[features]]
name = "item_id"
entity = "item"
kind = "categorical"
num_embeddings = 30
"""
DATA_DENSE = """
[[features]]
name = "duration_s"
entity = "item"
kind = "numeric"

[[features]]
name = "age"
entity = "user"
kind = "numeric"
"""

# ---- vocabularies, hashing, standardization (test_mappings) --------------------------------------
# Only a user entity, whose raw columns are fitted: a hashed id (11 rows), string vocabularies
# (one with room for 3 values, one with min_count, a list feature), a log1p numeric and a numeric
# read from another column. test_hash_stable_and_in_range cuts it before "seg" and edits "= 11".

MAPPINGS_TOML = (
    USER
    + EVENTS
    + """keys = ["user_id"]

[[features]]
name = "user_id"
entity = "user"
kind = "categorical"
mapping = "hash"
num_embeddings = 11

[[features]]
name = "seg"
entity = "user"
kind = "categorical"
num_embeddings = 4   # at most 3 values

[[features]]
name = "country"
entity = "user"
kind = "categorical"
num_embeddings = 10
min_count = 2

[[features]]
name = "tags"
entity = "user"
kind = "multi_categorical"
num_embeddings = 10

[[features]]
name = "dur"
entity = "user"
kind = "numeric"
transform = "log1p"

[[features]]
name = "score"
column = "raw_score"
entity = "user"
kind = "numeric"
"""
)


# ---- a small store (test_real_labels, test_splits) -------------------------------------------
def small_store(root: Path, delta: list[float], **columns: list) -> OfflineStore:
    """A store for configs/features/synth.toml: users 1-2, items 10-11 from day 0, one event
    every 6 hours from 2026-01-02 per value of ``delta`` (a signed label), plus ``columns``."""
    t0 = pl.datetime(2026, 1, 1)
    root.mkdir(parents=True)
    users = pl.DataFrame({"user_id": [1, 2], "segment": ["a", "b"], "age_bucket": ["x", "y"],
                          "country": ["us", "fr"], "interests": [["a"], ["b"]]})  # fmt: skip
    items = pl.DataFrame({"item_id": [10, 11], "category": ["n", "m"], "author": [7, 8],
                          "tags": [["t"], ["u"]], "duration_s": [30.0, 60.0]})  # fmt: skip
    for frame, name in ((users, "users"), (items, "items")):
        frame.with_columns(valid_from=t0).select(pl.col("valid_from"), pl.all().exclude(
            "valid_from")).write_parquet(root / f"{name}.parquet")  # fmt: skip
    n = len(delta)
    pl.DataFrame({
        "request_id": list(range(n)), "user_id": [1 + i % 2 for i in range(n)],
        "item_id": [10 + i % 2 for i in range(n)],
        "ts": pl.datetime_range(pl.datetime(2026, 1, 2), pl.datetime(2026, 1, 2) + pl.duration(
            hours=6 * (n - 1)), "6h", eager=True),
        "click": [i % 2 for i in range(n)], "watch_time_s": [1.0] * n, "delta": delta,
        **columns,
    }).write_parquet(root / "impressions.parquet")  # fmt: skip
    return OfflineStore(root)


# ---- small demo training sets, weight comparisons (test_recipe, test_selection, test_checkpoint)
def small_demo_work(prefix: str, sets: list[str]) -> Path:
    """A fresh workdir holding the demo config's training set for ``sets`` (150 users, 60
    items, 4 days of synthetic data)."""
    import tempfile

    from pipelines.synth import synthesize
    from recsys_moe.config import DEMO_CONFIG, load_config
    from recsys_moe.dataset import build_dataset

    root = Path(tempfile.mkdtemp(prefix=prefix))
    cfg = load_config(DEMO_CONFIG, sets, workdir=root)
    synthesize(cfg.store_dir, users=150, items=60, days=4, seed=0)
    build_dataset(cfg)
    return root


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bit-identical state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ---- a trained, evaluated and registered model (test_score_job, test_spark_score) -------------
def registered_model(work: Path, sets: list[str]) -> SimpleNamespace:
    """The demo config with ``sets`` in ``work``: synthetic store, training set, one model trained,
    evaluated and registered with the pyfunc (``cfg``, ``meta`` of the synthetic data, ``reg``)."""
    from pipelines.synth import synthesize
    from recsys_moe.config import DEMO_CONFIG, load_config
    from recsys_moe.dataset import build_dataset
    from recsys_moe.evaluation.evaluate import evaluate
    from recsys_moe.registry import register
    from recsys_moe.training.train import train
    from serving.pyfunc import CODE_PATH

    cfg = load_config(DEMO_CONFIG, sets, workdir=work)
    s = cfg.synth
    meta = synthesize(cfg.store_dir, users=s.users, items=s.items, days=s.days, seed=s.seed)
    build_dataset(cfg)
    result = train(cfg)
    evaluate(cfg, run_id=result.run_id)
    reg = register(cfg, python_model=CODE_PATH, run_id=result.run_id)
    return SimpleNamespace(cfg=cfg, meta=meta, reg=reg)
