"""serving/score.py's value checks, without a model: candidates cleaned and counted, no score
that is not a finite number ever written."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from feature_store import DataError
from serving.score import check_finite, clean_candidates


def test_null_ids_and_repeats_are_dropped_and_counted() -> None:
    frame = pl.DataFrame(
        {
            "request_id": [1, 1, 1, 2, 2, None],
            "user_id": [5, 5, 5, 6, 6, 7],
            "item_id": [10, 11, 10, 10, None, 12],
        }
    )
    lf, dropped = clean_candidates(frame.lazy(), Path("c.parquet"))
    assert dropped == {"null_id": 2, "duplicate": 1}
    assert lf.collect().rows() == [(1, 5, 10), (1, 5, 11), (2, 6, 10)]  # first kept, in order


def test_no_candidate_left_is_an_error() -> None:
    empty = pl.DataFrame({"user_id": [], "item_id": []}, schema={"user_id": pl.Int64,
                                                                 "item_id": pl.Int64})  # fmt: skip
    with pytest.raises(DataError, match="no rows"):
        clean_candidates(empty.lazy(), Path("c.parquet"))
    nulls = pl.DataFrame({"user_id": [None, 1], "item_id": [3, None]})
    with pytest.raises(DataError, match="all 2 rows have a null id"):
        clean_candidates(nulls.lazy(), Path("c.parquet"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_score_that_is_not_finite_fails_naming_the_row(bad: float | None) -> None:
    frame = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [7, 8, 9],
            "p_click": [0.1, bad, 0.3],
            "score": [0.1, 0.2, 0.3],
        }  # fmt: skip
    )
    with pytest.raises(DataError, match=r"1 of 3 rows .*'item_id': 8"):
        check_finite(frame, ["p_click", "score"], ["user_id", "item_id"], Path("c.parquet"))
    check_finite(frame.head(1), ["p_click", "score"], ["user_id", "item_id"], Path("c.parquet"))
