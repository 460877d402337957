"""point_in_time_join against a brute-force oracle (property-based and one seeded random case)."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_store import point_in_time_join

T0 = datetime(2024, 1, 1)


def oracle(events: pl.DataFrame, features: pl.DataFrame, ttl: timedelta | None) -> list:
    """For each event, scan all feature rows: greatest time <= event time, last row on ties."""
    rows = features.rows(named=True)
    out = []
    for e in events.rows(named=True):
        best, best_t = None, None
        for r in rows:  # in frame order, so ">=" makes the last of equal timestamps win
            if e["k"] is None or e["t"] is None or r["k"] is None or r["vt"] is None:
                continue
            if r["k"] == e["k"] and r["vt"] <= e["t"] and (best_t is None or r["vt"] >= best_t):
                best, best_t = r, r["vt"]
        if best is not None and ttl is not None and e["t"] - best_t > ttl:
            best = None
        out.append((best["v"], best["w"]) if best else (None, None))
    return out


def check(events: pl.DataFrame, features: pl.DataFrame, ttl: timedelta | None) -> None:
    got = point_in_time_join(
        events.lazy(), features.lazy(), entity="k", event_time="t", feature_time="vt", ttl=ttl
    ).collect()
    assert got.columns == [*events.columns, "v", "w"]
    assert got.select(events.columns).equals(events)  # every event, original order
    assert list(zip(got["v"], got["w"], strict=True)) == oracle(events, features, ttl)


def frames(ev_k, ev_t, ft_k, ft_t) -> tuple[pl.DataFrame, pl.DataFrame]:
    def ts(hours):
        return [None if h is None else T0 + timedelta(hours=int(h)) for h in hours]

    events = pl.DataFrame(
        {"eid": range(len(ev_k)), "k": ev_k, "t": ts(ev_t)},
        schema={"eid": pl.Int64, "k": pl.Int64, "t": pl.Datetime("us")},
    )
    features = pl.DataFrame(
        {
            "k": ft_k,
            "vt": ts(ft_t),
            "v": [f"v{i}" for i in range(len(ft_k))],
            "w": range(len(ft_k)),
        },
        schema={"k": pl.Int64, "vt": pl.Datetime("us"), "v": pl.String, "w": pl.Int64},
    )
    return events, features


keys = st.one_of(st.none(), st.integers(0, 4))  # key 4 rarely has rows; None = null key
hours = st.one_of(st.none(), st.integers(0, 30))  # small range: many equal timestamps


@settings(max_examples=200, deadline=None, database=None)
@given(
    ev=st.lists(st.tuples(keys, hours), max_size=25),
    ft=st.lists(st.tuples(keys, hours), max_size=25),
    ttl_h=st.one_of(st.none(), st.integers(0, 12)),
)
def test_matches_oracle(ev, ft, ttl_h):
    events, features = frames(
        [k for k, _ in ev], [h for _, h in ev], [k for k, _ in ft], [h for _, h in ft]
    )
    check(events, features, None if ttl_h is None else timedelta(hours=ttl_h))


@pytest.mark.parametrize("ttl_h", [None, 0, 5, 48])
def test_matches_oracle_seeded(ttl_h):
    rng = np.random.default_rng(0)
    n_ev, n_ft = 400, 300
    events, features = frames(
        rng.integers(0, 30, n_ev).tolist(),
        rng.integers(0, 200, n_ev).tolist(),
        rng.integers(0, 25, n_ft).tolist(),  # keys 25..29 have no feature rows
        rng.integers(0, 200, n_ft).tolist(),
    )
    check(events, features, None if ttl_h is None else timedelta(hours=ttl_h))


def test_edges():
    # key 1: rows at h0 ("a") and h5 twice ("b" then "c": the last one wins); key 2: none.
    events, features = frames(
        [1, 1, 1, 1, 2, None, 1],
        [4, 5, 9, 10, 5, 5, None],
        [1, 1, 1, 3],
        [5, 0, 5, 1],
    )
    features = features.with_columns(v=pl.Series(["b", "a", "c", "z"]))
    got = point_in_time_join(
        events.lazy(),
        features.lazy(),
        entity="k",
        event_time="t",
        feature_time="vt",
        ttl=timedelta(hours=4),
    ).collect()
    # h4: "a" (age 4h == ttl, kept); h5: "c" (inclusive, last of the tie); h9: "c" (age 4h);
    # h10: age 5h > ttl → null; key 2 / null key / null time → null
    assert got["v"].to_list() == ["a", "c", "c", None, None, None, None]
    assert got["eid"].to_list() == list(range(7))


def test_time_dtypes_are_reconciled():
    events = pl.DataFrame({"k": [1, 1], "t": [datetime(2024, 1, 2, 12), datetime(2024, 1, 1)]})
    events = events.with_columns(pl.col("t").cast(pl.Datetime("ns")))
    features = pl.DataFrame({"k": [1], "vt": [datetime(2024, 1, 2).date()], "v": ["x"]})
    got = point_in_time_join(
        events.lazy(), features.lazy(), entity="k", event_time="t", feature_time="vt"
    ).collect()
    assert got["v"].to_list() == ["x", None]
    assert got.schema["t"] == pl.Datetime("ns")  # the events' own columns are untouched
    assert "vt" not in got.columns
