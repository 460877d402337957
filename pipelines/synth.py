"""The embedded default data set: a synthetic recommendation log with a known generating process.

Over 400 lines on purpose: one generating process (world, users, items, requests, outcomes,
oracle) whose parts share its random streams; split up, the order of draws would be hidden.

    synthesize("demo-run/data")   # users, items, impressions, candidates, oracle, meta.json

Tables (all timestamps naive UTC, microseconds):

- ``users``: slowly changing attributes, one row per version. Every user has a first row 1 hour to
  180 days before the event period (inside the 400-day TTL of ``configs/features/synth.toml``);
  about 15% get a second row inside the period where the segment and/or interests change.
- ``items``: the same for items. About 10% of items are published inside the period (their first
  row starts there and they are impressed only afterwards); about 10% get a later row with tags
  and/or duration re-estimated.
- ``impressions``: requests of ``items_per_request`` distinct items each, sorted by ``ts``.
- ``candidates``: a scoring job input for ``meta["scoring_time"]`` (the end of the period).
- ``oracle``: the true ``p_click``, ``E[watch_time_s]`` and ``E[watch_time_s | click]`` of every
  impression, same order.

Generating process. A hidden "world" (drawn from the seed) fixes a segment × category affinity
matrix where each of 8 segments strongly likes 2-3 of 20 categories (each category is liked by
exactly one segment), a rank-1 age-bucket × category effect, small country effects, per-category
tag pools, per-author and per-item quality and per-user click biases. With the user row and the
item row *in effect at impression time* (what a point-in-time join gives a model)::

    logit = base + affinity[segment, category] + age_cat[age_bucket, category] + country[country]
            + 0.5 * min(|interests ∩ tags|, 2) + quality[item_id] + bias[user_id]
    click ~ Bernoulli(sigmoid(logit))

Position is recorded only; it has no effect. Items are chosen per request by popularity (a
per-item weight, independent of everything in the click model) among the items that exist. Watch
time: for a click, ``duration_s * sigmoid(m + 0.6 * noise)`` with ``noise ~ N(0, 1)`` and
``m = 0.3 + 0.7 * affinity + 0.4 * min(overlap, 2) + 0.5 * quality - 0.45 * log(duration_s / 60)``;
for a non-click a skip of ``uniform(0, min(3, duration_s))`` seconds. ``E[watch_time_s]`` in the
oracle is exact up to a 32-node Gauss-Hermite quadrature. Every effect is a function of
``user_id, segment, age_bucket, country, interests, item_id, category, author, tags, duration_s``;
no per-event latent exists besides the Bernoulli, noise and skip draws.

Everything is drawn from ``np.random.default_rng(seed)``: the same seed gives identical files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from pipelines import progress
from pipelines.atomic import replacing_dir

GENERATOR = "pipelines.synth"
VERSION = 1

N_SEGMENTS = 8
N_CATEGORIES = 20
N_TAGS = 48  # < 64: a tag set fits in one int64 bit mask
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_PROBS = (0.18, 0.27, 0.22, 0.15, 0.11, 0.07)
COUNTRIES = ("US", "IN", "BR", "GB", "DE", "FR", "JP", "CA", "ES", "MX")
COUNTRY_PROBS = (0.3, 0.16, 0.1, 0.08, 0.08, 0.07, 0.06, 0.05, 0.05, 0.05)
CANDIDATES_PER_USER = 40
FEW_CANDIDATES = 5  # every 10th scored user gets only this many, fewer than a top-10
MAX_CANDIDATE_USERS = 300
BASE_LOGIT = -2.2

USERS_SCHEMA = {
    "user_id": pl.Int64,
    "valid_from": pl.Datetime("us"),
    "segment": pl.String,
    "age_bucket": pl.String,
    "country": pl.String,
    "interests": pl.List(pl.String),
}
ITEMS_SCHEMA = {
    "item_id": pl.Int64,
    "valid_from": pl.Datetime("us"),
    "category": pl.String,
    "author": pl.Int64,
    "tags": pl.List(pl.String),
    "duration_s": pl.Float64,
}
IMPRESSIONS_SCHEMA = {
    "request_id": pl.Int64,
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "ts": pl.Datetime("us"),
    "position": pl.Int32,
    "click": pl.Int8,
    "watch_time_s": pl.Float64,
}
CANDIDATES_SCHEMA = {"request_id": pl.Int64, "user_id": pl.Int64, "item_id": pl.Int64}
ORACLE_SCHEMA = CANDIDATES_SCHEMA | {
    "p_click": pl.Float64,
    "expected_watch_time_s": pl.Float64,  # E[watch_time_s]
    "expected_watch_time_s_given_click": pl.Float64,  # E[watch_time_s | click = 1]
}

_US_PER_DAY = 86_400 * 1_000_000
_NEVER = np.iinfo(np.int64).max
_EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True)
class _World:
    affinity: np.ndarray  # [segment, category]
    age_cat: np.ndarray  # [age_bucket, category]
    country: np.ndarray  # [country]
    tag_pools: np.ndarray  # [category] → int64 bit mask of the category's 4 typical tags
    liked: np.ndarray  # [segment] → bit mask of the tags typical of the categories it likes
    watch_affinity: np.ndarray | None = None  # [segment, category]; None = ``affinity``


@dataclass(frozen=True)
class _Users:
    """Two versions per user; version 1 equals version 0 where ``t1`` is ``_NEVER``."""

    first_from: np.ndarray
    t1: np.ndarray
    segment: np.ndarray  # [2, U]
    interests: np.ndarray  # [2, U] bit masks
    age: np.ndarray
    country: np.ndarray
    bias: np.ndarray
    activity: np.ndarray


@dataclass(frozen=True)
class _Items:
    first_from: np.ndarray  # published at (inside the period for new items)
    t1: np.ndarray
    tags: np.ndarray  # [2, I] bit masks
    duration: np.ndarray  # [2, I]
    category: np.ndarray
    author: np.ndarray
    quality: np.ndarray
    log_popularity: np.ndarray


@dataclass
class SynthParams:
    """The generator's settings: the one source of their defaults (``synthesize``'s keywords,
    the config's ``[synth]`` section, ``recsys-moe data synth``'s flags)."""

    users: int = 4000
    items: int = 800
    days: int = 14
    seed: int = 0
    requests_per_user_day: float = 0.7
    items_per_request: int = 10
    task_conflict: float = 0.0  # share of watch time's affinity that click does not share


_D = SynthParams()


def synthesize(
    out: str | Path,
    *,
    users: int = _D.users,
    items: int = _D.items,
    days: int = _D.days,
    seed: int = _D.seed,
    requests_per_user_day: float = _D.requests_per_user_day,
    items_per_request: int = _D.items_per_request,
    test_days: int = 1,
    start: str = "2026-01-01",
    task_conflict: float = _D.task_conflict,
) -> dict:
    """Write the data set into directory ``out`` (atomically) and return its ``meta.json`` dict.

    ``task_conflict`` in [0, 1]: the share of watch time's affinity that comes from a second
    segment x category matrix (its own liked categories) instead of click's; 0 = the tasks share
    one affinity (the default data set is unchanged)."""
    if not 0.0 <= task_conflict <= 1.0:
        raise ValueError(f"task_conflict must be in [0, 1], got {task_conflict}")
    out = Path(out)
    t0 = _validate(out, users, items, days, seed, requests_per_user_day, items_per_request,
                   test_days, start)  # fmt: skip
    params = {
        "users": int(users), "items": int(items), "days": int(days), "seed": int(seed),
        "requests_per_user_day": float(requests_per_user_day),
        "items_per_request": int(items_per_request), "test_days": int(test_days), "start": start,
    }  # fmt: skip
    if task_conflict:
        params["task_conflict"] = float(task_conflict)
    start_us = _to_us(t0)
    end_us = start_us + days * _US_PER_DAY
    rng = np.random.default_rng(seed)
    world = _world(rng)
    if task_conflict:  # its own stream: the default data set's draws stay as they were
        other = _world(np.random.default_rng([seed, 1])).affinity
        mixed = (1 - task_conflict) * world.affinity + task_conflict * other
        world = dataclasses.replace(world, watch_affinity=mixed)
    us = _users(rng, world, users, start_us, end_us)
    it = _items(rng, world, items, items_per_request, start_us, end_us)
    req_user, req_ts = _requests(rng, us, days * requests_per_user_day, start_us, end_us)
    if req_user.size == 0:
        raise ValueError("no requests were drawn; raise users, days or requests_per_user_day")
    k = items_per_request
    imp = {
        "request_id": np.repeat(np.arange(1, req_user.size + 1, dtype=np.int64), k),
        "user_id": np.repeat(req_user, k),
        "item_id": _slates(rng, it, req_ts, k).reshape(-1),
        "ts": np.repeat(req_ts, k),
        "position": np.tile(np.arange(k), req_user.size),
    }
    p, click, watch, expected, given_click = _outcomes(
        rng, world, us, it, imp["user_id"], imp["item_id"], imp["ts"]
    )
    imp |= {"user_id": imp["user_id"] + 1, "item_id": imp["item_id"] + 1}  # ids start at 1
    cand = _candidates(rng, users, items, req_user.size)
    frames = {
        "users": _users_frame(us),
        "items": _items_frame(it),
        "impressions": _frame(imp | {"click": click, "watch_time_s": watch}, IMPRESSIONS_SCHEMA),
        "candidates": _frame(cand, CANDIDATES_SCHEMA),
        "oracle": _frame(
            imp
            | {
                "p_click": p,
                "expected_watch_time_s": expected,
                "expected_watch_time_s_given_click": given_click,
            },
            ORACLE_SCHEMA,
        ),  # fmt: skip
    }
    test_start_us = end_us - test_days * _US_PER_DAY
    meta = _meta(params, frames, imp["ts"], click, watch, p, expected, start_us, end_us,
                 test_start_us)  # fmt: skip
    write_atomically(out, frames, meta)
    return meta


# --- arguments -------------------------------------------------------------------------------


def _validate(out, users, items, days, seed, rate, per_request, test_days, start) -> datetime:
    def whole(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    whole("users", users, 1)
    whole("items_per_request", per_request, 1)
    whole("items", items, per_request)
    whole("test_days", test_days, 1)
    whole("seed", seed, 0)
    if isinstance(days, bool) or not isinstance(days, int | np.integer) or days <= test_days + 1:
        raise ValueError(
            f"days must be an integer > test_days + 1 = {test_days + 1} (the test split is the "
            f"last test_days days and at least two days must remain for training), got {days!r}"
        )
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not rate > 0
        or rate == np.inf
    ):
        raise ValueError(f"requests_per_user_day must be a finite number > 0, got {rate!r}")
    try:
        t0 = datetime.fromisoformat(str(start))
    except ValueError:
        raise ValueError(f"start must be an ISO date like '2026-01-01', got {start!r}") from None
    if t0.tzinfo is not None:
        raise ValueError(f"start must be naive (UTC implied), e.g. '2026-01-01', got {start!r}")
    if out.exists() and not _replaceable(out):
        raise ValueError(
            f"{out} exists and is not an earlier output of this generator (no meta.json naming "
            f"{GENERATOR}); choose a new directory or remove it first"
        )
    return t0


def _replaceable(out: Path) -> bool:
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        return json.loads((out / "meta.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


# --- the world, users, items -----------------------------------------------------------------


def _world(rng: np.random.Generator) -> _World:
    # Each category is liked by exactly one segment: 4 segments like 3 categories, 4 like 2.
    owner = rng.permutation(np.arange(N_CATEGORIES) % N_SEGMENTS)
    affinity = rng.normal(-0.35, 0.12, (N_SEGMENTS, N_CATEGORIES))
    affinity[owner, np.arange(N_CATEGORIES)] += 2.4
    age_score = np.linspace(-1.0, 1.0, len(AGE_BUCKETS))
    age_cat = np.outer(age_score, rng.normal(0.0, 0.45, N_CATEGORIES))
    country = rng.normal(0.0, 0.12, len(COUNTRIES))
    pools = np.array([rng.choice(N_TAGS, 4, replace=False) for _ in range(N_CATEGORIES)])
    tag_pools = (np.int64(1) << pools).sum(axis=1)
    liked = np.zeros(N_SEGMENTS, dtype=np.int64)
    np.bitwise_or.at(liked, owner, tag_pools)
    return _World(affinity, age_cat, country, tag_pools, liked)


def _tag_sets(rng: np.random.Generator, boosted: np.ndarray, boost: float, low: int, high: int):
    """One set of ``low..high`` distinct tags per row, tags in ``boosted`` (bit masks) favoured."""
    bits = np.int64(1) << np.arange(N_TAGS, dtype=np.int64)
    weight = np.where((boosted[:, None] & bits) != 0, 1.0 + boost, 1.0)
    keys = np.log(weight) + rng.gumbel(size=weight.shape)
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)  # Gumbel top-k: sampling w/o replacement
    count = rng.integers(low, high + 1, size=len(boosted))
    return np.where(rank < count[:, None], bits, 0).sum(axis=1)


def _users(rng, world: _World, n: int, start_us: int, end_us: int) -> _Users:
    segment = rng.integers(0, N_SEGMENTS, n)
    age = rng.choice(len(AGE_BUCKETS), n, p=AGE_PROBS)
    country = rng.choice(len(COUNTRIES), n, p=COUNTRY_PROBS)
    interests = _tag_sets(rng, world.liked[segment], 8.0, 1, 4)
    first_from = start_us - rng.integers(_US_PER_DAY // 24, 180 * _US_PER_DAY, n)
    changes = rng.random(n) < 0.15
    t1 = np.where(changes, rng.integers(start_us, end_us, n), _NEVER)
    kind = rng.integers(0, 3, n)  # 0: segment changes, 1: interests change, 2: both
    seg1 = np.where(
        changes & (kind != 1), (segment + rng.integers(1, N_SEGMENTS, n)) % N_SEGMENTS, segment
    )
    redrawn = _tag_sets(rng, world.liked[seg1], 8.0, 1, 4)
    int1 = np.where(changes & (kind != 0), redrawn, interests)
    bias = rng.normal(0.0, 0.25, n)
    activity = rng.lognormal(0.0, 0.5, n)
    return _Users(first_from, t1, np.stack([segment, seg1]), np.stack([interests, int1]), age,
                  country, bias, activity / activity.mean())  # fmt: skip


def _items(rng, world: _World, n: int, per_request: int, start_us: int, end_us: int) -> _Items:
    category = rng.integers(0, N_CATEGORIES, n)
    author = rng.integers(0, max(1, n // 4), n)
    author_q = rng.normal(0.0, 0.2, max(1, n // 4))
    quality = author_q[author] + rng.normal(0.0, 0.3, n)
    tags = _tag_sets(rng, world.tag_pools[category], 20.0, 1, 3)
    log_mean = np.log(60.0) + rng.normal(0.0, 0.4, N_CATEGORIES)
    duration = np.clip(np.exp(log_mean[category] + rng.normal(0.0, 0.8, n)), 5.0, 600.0)
    # New items appear in the first half of the period so each still gets enough impressions;
    # at least ``per_request`` items exist before the first request.
    new = rng.permutation(np.arange(n) < min(n // 10, n - per_request))
    half = start_us + (end_us - start_us) // 2
    pre = start_us - rng.integers(_US_PER_DAY // 24, 180 * _US_PER_DAY, n)
    first_from = np.where(new, rng.integers(start_us, half, n), pre)
    changes = rng.random(n) < 0.10
    since = np.maximum(first_from, start_us) + 1  # the later row falls inside the period
    t1 = np.where(changes, since + (rng.random(n) * (end_us - since)).astype(np.int64), _NEVER)
    kind = rng.integers(0, 3, n)  # 0: tags re-estimated, 1: duration, 2: both
    tags1 = np.where(changes & (kind != 1), _tag_sets(rng, world.tag_pools[category], 20.0, 1, 3),
                     tags)  # fmt: skip
    rescaled = np.clip(duration * rng.lognormal(0.0, 0.25, n), 5.0, 600.0)
    dur1 = np.where(changes & (kind != 0), rescaled, duration)
    log_popularity = np.clip(rng.normal(0.0, 0.3, n), -0.5, 0.6)
    return _Items(first_from, t1, np.stack([tags, tags1]), np.stack([duration, dur1]), category,
                  author, quality, log_popularity)  # fmt: skip


# --- events ----------------------------------------------------------------------------------


def _requests(rng, us: _Users, per_user: float, start_us: int, end_us: int):
    """Request owners and times, sorted by (time, user)."""
    counts = rng.poisson(per_user * us.activity)
    user = np.repeat(np.arange(counts.size), counts)
    ts = rng.integers(start_us, end_us, user.size)
    order = np.lexsort((user, ts))
    return user[order], ts[order]


def _slates(rng, it: _Items, req_ts: np.ndarray, k: int) -> np.ndarray:
    """[R, k] distinct item indices per request, by popularity among the items that exist."""
    n_items = it.first_from.size
    chunk = max(1, 2_000_000 // n_items)
    out = np.empty((req_ts.size, k), dtype=np.int64)
    for lo in range(0, req_ts.size, chunk):  # chunks bound memory at ~16 MB of keys
        ts = req_ts[lo : lo + chunk]
        keys = it.log_popularity + rng.gumbel(size=(ts.size, n_items))
        keys[it.first_from[None, :] > ts[:, None]] = -np.inf
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        out[lo : lo + chunk] = top  # position = arbitrary order in the top k: it carries no signal
    return out


def _at(versions: np.ndarray, t1: np.ndarray, idx: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """The attribute version in effect at ``ts`` (point in time: the later row once it is valid)."""
    return versions[(t1[idx] <= ts).astype(np.int64), idx]


def _outcomes(rng, world: _World, us: _Users, it: _Items, user, item, ts):
    seg = _at(us.segment, us.t1, user, ts)
    interests = _at(us.interests, us.t1, user, ts)
    tags = _at(it.tags, it.t1, item, ts)
    duration = _at(it.duration, it.t1, item, ts)
    cat = it.category[item]
    overlap = np.minimum(np.bitwise_count(interests & tags), 2).astype(np.float64)
    affinity = world.affinity[seg, cat]
    user_side = world.country[us.country[user]] + us.bias[user]
    logit = BASE_LOGIT + affinity + world.age_cat[us.age[user], cat] + 0.5 * overlap
    logit += it.quality[item] + user_side
    p = 1.0 / (1.0 + np.exp(-logit))
    click = rng.random(p.size) < p
    watch_aff = affinity if world.watch_affinity is None else world.watch_affinity[seg, cat]
    m = 0.3 + 0.7 * watch_aff + 0.4 * overlap + 0.5 * it.quality[item]
    m -= 0.45 * np.log(duration / 60)
    completion = 1.0 / (1.0 + np.exp(-(m + 0.6 * rng.normal(size=p.size))))
    skip = rng.random(p.size) * np.minimum(3.0, duration)
    watch = np.where(click, duration * completion, skip)
    given_click = duration * _mean_sigmoid(m, 0.6)
    expected = p * given_click + (1.0 - p) * np.minimum(3.0, duration) / 2
    return p, click.astype(np.int8), watch, expected, given_click


def _mean_sigmoid(mu: np.ndarray, sigma: float) -> np.ndarray:
    """E[sigmoid(mu + sigma * Z)], Z ~ N(0, 1), by Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite.hermgauss(32)
    z = mu[:, None] + sigma * np.sqrt(2.0) * x[None, :]
    return (w / (1.0 + np.exp(-z))).sum(axis=1) / np.sqrt(np.pi)


def _candidates(rng, n_users: int, n_items: int, n_requests: int):
    """One request per scored user; every 10th user gets only a few candidates."""
    chosen = np.sort(rng.choice(n_users, min(n_users, MAX_CANDIDATE_USERS), replace=False))
    few = np.arange(chosen.size) % 10 == 0
    count = np.minimum(np.where(few, FEW_CANDIDATES, CANDIDATES_PER_USER), n_items)
    rank = np.argsort(rng.random((chosen.size, n_items)), axis=1)  # all items exist by then
    take = np.arange(n_items)[None, :] < count[:, None]
    rows, cols = np.nonzero(take)
    request = n_requests + 1 + np.arange(chosen.size, dtype=np.int64)
    return {
        "request_id": request[rows],
        "user_id": chosen[rows] + 1,
        "item_id": rank[rows, cols] + 1,
    }


# --- frames, metadata, writing ---------------------------------------------------------------


def _tag_lists(masks: np.ndarray) -> list[list[str]]:
    bits = (masks[:, None] >> np.arange(N_TAGS, dtype=np.int64)) & 1
    return [[f"t{j}" for j in np.flatnonzero(row)] for row in bits]


def _frame(columns: dict, schema: dict) -> pl.DataFrame:
    out = {}
    for name, dtype in schema.items():
        col = pl.Series(name, columns[name])
        out[name] = col.cast(pl.Int64).cast(dtype) if dtype == pl.Datetime("us") else col
    return pl.DataFrame(out).cast(schema)


def _version_rows(t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entity index, version) of every attribute row: version 0 for all, 1 where ``t1`` is set;
    sorted by entity, then version."""
    second = np.flatnonzero(t1 != _NEVER)
    idx = np.concatenate([np.arange(t1.size), second])
    version = np.concatenate([np.zeros(t1.size, np.int64), np.ones(second.size, np.int64)])
    order = np.lexsort((version, idx))
    return idx[order], version[order]


def _users_frame(us: _Users) -> pl.DataFrame:
    idx, version = _version_rows(us.t1)
    cols = {
        "user_id": idx + 1,
        "valid_from": np.where(version == 0, us.first_from[idx], us.t1[idx]),
        "segment": np.array([f"s{s}" for s in range(N_SEGMENTS)])[us.segment[version, idx]],
        "age_bucket": np.array(AGE_BUCKETS)[us.age[idx]],
        "country": np.array(COUNTRIES)[us.country[idx]],
        "interests": _tag_lists(us.interests[version, idx]),
    }
    return _frame(cols, USERS_SCHEMA)


def _items_frame(it: _Items) -> pl.DataFrame:
    idx, version = _version_rows(it.t1)
    cols = {
        "item_id": idx + 1,
        "valid_from": np.where(version == 0, it.first_from[idx], it.t1[idx]),
        "category": np.array([f"c{c}" for c in range(N_CATEGORIES)])[it.category[idx]],
        "author": it.author[idx] + 1,
        "tags": _tag_lists(it.tags[version, idx]),
        "duration_s": it.duration[version, idx],
    }
    return _frame(cols, ITEMS_SCHEMA)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Rank-based ROC AUC (ties get average ranks); None when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _rmse(pred: np.ndarray, target: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean((pred - target) ** 2))) if target.size else None


def _iso(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=int(us))).isoformat()


def _to_us(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def _meta(params, frames, ts, click, watch, p, expected, start_us, end_us, test_start_us) -> dict:
    test = ts >= test_start_us
    train_mean = float(watch[~test].mean()) if (~test).any() else None
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "params": params,
        "seed": params["seed"],
        "rows": {name: f.height for name, f in frames.items()}
        | {
            "requests": int(frames["impressions"]["request_id"].n_unique()),
            "candidate_requests": int(frames["candidates"]["request_id"].n_unique()),
        },  # fmt: skip
        "period_start": _iso(start_us),
        "period_end": _iso(end_us),
        "first_event_ts": _iso(ts.min()),
        "last_event_ts": _iso(ts.max()),
        "scoring_time": _iso(end_us),
        "test_days": params["test_days"],
        "test_start": _iso(test_start_us),
        "test_rows": int(test.sum()),
        "click_rate": float(click.mean()),
        "test_click_rate": float(click[test].mean()) if test.any() else None,
        "bayes_optimal_click_auc": _auc(p[test], click[test]),
        "bayes_optimal_watch_time_rmse_s": _rmse(expected[test], watch[test]),
        "mean_predictor_watch_time_rmse_s": _rmse(
            np.full(test.sum(), train_mean or 0.0), watch[test]
        ),
        "train_mean_watch_time_s": train_mean,
        "vocabularies": {
            "segment": [f"s{s}" for s in range(N_SEGMENTS)],
            "age_bucket": list(AGE_BUCKETS),
            "country": list(COUNTRIES),
            "category": [f"c{c}" for c in range(N_CATEGORIES)],
            "tags": [f"t{t}" for t in range(N_TAGS)],
        },
        "process": (
            "click ~ Bernoulli(sigmoid(base + affinity[segment, category] + age_cat[age_bucket, "
            "category] + country_effect + 0.5*min(|interests & tags|, 2) + item quality + user "
            "bias)) with the user and item rows in effect at impression time; each segment "
            "strongly likes 2-3 of 20 categories; position has no effect. watch_time_s: for a "
            "click duration_s * sigmoid(m + 0.6*N(0,1)) with m from affinity, overlap, quality and "
            "log duration; otherwise a skip uniform(0, min(3, duration_s)). Items are drawn by "
            "popularity among those published; the oracle holds the true p_click and "
            "E[watch_time_s]."
        ),
    }


def write_atomically(
    out: Path, frames: dict[str, pl.DataFrame], meta: dict, copies: Sequence[Path] = ()
) -> None:
    """A data set folder: ``<name>.parquet`` per frame, ``meta.json`` and ``copies`` (files such
    as a licence, skipped when absent), built in a sibling temp dir and renamed into place; an
    existing ``out`` is replaced (``pipelines.atomic.replacing_dir``)."""
    with replacing_dir(out) as tmp:
        bar = progress.bar(total=len(frames), desc=f"write {out.name}", unit="table")
        for name, frame in frames.items():
            bar.set_postfix_str(f"{name} ({frame.height:,} rows)")
            frame.write_parquet(tmp / f"{name}.parquet")
            bar.update(1)
        bar.close()
        for path in copies:
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
