"""Data contracts, the finer points: the ``non_finite`` policy, entity-table and event checks
(feature_store/validate.py), numeric statistics over finite values (pipelines/mappings.py), and
the training-set builder's clock, start and coverage checks. The CLI corpus of bad inputs is
tests/test_bad_inputs.py."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from fixtures import MAPPINGS_TOML

from feature_store import DataError, FeatureSet, OfflineStore
from feature_store.validate import validate_events, validate_table
from pipelines.mappings import STD_FLOOR, apply_mappings, fit_mappings
from pipelines.training_set import MIN_COVERAGE, build_training_set, load_manifest
from recsys_moe.config import DataConfig

FEATURES_DIR = Path(__file__).resolve().parents[1] / "configs" / "features"
SYNTH = FEATURES_DIR / "synth.toml"
LABELS = {"click": "binary", "watch_time_s": "regression"}
T0 = datetime(2024, 3, 1)
DAY = timedelta(days=1)
N_DAYS = 10


# ---- the non_finite policy -------------------------------------------------------------------


def _numeric_toml(extra: str, kind: str = "numeric") -> str:
    return f"""
[entities.user]
key = "user_id"
table = "users"

[events]
table = "impressions"
time = "ts"

[[features]]
name = "score"
entity = "user"
kind = "{kind}"
num_embeddings = 8
{extra}
"""


def test_non_finite_policy_parsed_and_checked() -> None:
    (f,) = FeatureSet.from_toml(_numeric_toml("")).features
    assert f.non_finite == "reject"  # the default
    (f,) = FeatureSet.from_toml(_numeric_toml('non_finite = "missing"')).features
    assert f.non_finite == "missing"
    (f,) = FeatureSet.from_toml(_numeric_toml('non_finite = "reject"')).features
    assert f.non_finite == "reject"
    with pytest.raises(ValueError, match=r"features\[0\] \(score\): non_finite 'drop' is not one "):
        FeatureSet.from_toml(_numeric_toml('non_finite = "drop"'))
    with pytest.raises(ValueError, match="non_finite applies to numeric features only"):
        FeatureSet.from_toml(_numeric_toml('non_finite = "missing"', kind="categorical"))


def test_fingerprints_of_existing_definitions_unchanged() -> None:
    """The fingerprint hashes the parsed definitions: pinned here so that a change to what it
    covers (which invalidates every training set and bundle) is a visible decision."""
    pinned = {
        "bench.toml": "accd4e490f892917",
        "census.toml": "8324b509b090bc80",
        "kuairand.toml": "1436ad1cb1a0e765",
        "movielens.toml": "852389cf3da10903",
        "synth.toml": "783740aef3f18183",
    }
    for name, fingerprint in pinned.items():
        features = FeatureSet.load(FEATURES_DIR / name)
        assert features.fingerprint() == fingerprint, name
        assert {f.non_finite for f in features.features} == {"reject"}


def test_fingerprint_ignores_text_keeps_meaning() -> None:
    """Comments, blank lines, key order and spelled-out defaults keep the fingerprint; a changed
    setting or feature order changes it."""
    text = (FEATURES_DIR / "synth.toml").read_text()
    base = FeatureSet.from_toml(text).fingerprint()
    assert FeatureSet.from_toml("# a comment\n\n" + text + "\n# end\n").fingerprint() == base
    spelled = text.replace('kind = "numeric"', 'kind = "numeric"\nnon_finite = "reject"', 1)
    assert spelled != text and FeatureSet.from_toml(spelled).fingerprint() == base
    bigger = text.replace("embedding_dim = 8", "embedding_dim = 9", 1)
    assert bigger != text and FeatureSet.from_toml(bigger).fingerprint() != base
    ttl = text.replace('ttl = "', 'ttl = "1', 1)
    assert ttl != text and FeatureSet.from_toml(ttl).fingerprint() != base
    fs = FeatureSet.from_toml(text)
    swapped = FeatureSet(fs.entities, fs.events, (fs.features[1], fs.features[0], *fs.features[2:]))
    assert swapped.fingerprint() != base


# ---- numeric statistics and their application -----------------------------------------------


def _mappings_set() -> FeatureSet:
    return FeatureSet.from_toml(MAPPINGS_TOML)


def _users(dur: list[float | None], score: list[float | None]) -> pl.LazyFrame:
    n = len(dur)
    return pl.DataFrame(
        {
            "user_id": list(range(n)),
            "seg": ["a"] * n,
            "country": ["x"] * n,
            "tags": [["t"]] * n,
            "dur": dur,
            "raw_score": score,
        },
        schema_overrides={"dur": pl.Float64, "raw_score": pl.Float64},
    ).lazy()


def test_numeric_statistics_over_finite_values_only() -> None:
    inf, nan = math.inf, math.nan
    score = [1.0, 2.0, 3.0, inf, -inf, nan, None]
    dur = [0.0, 1.0, -1.0, -5.0, inf, 3.0, None]  # log1p: -1 → -inf, -5 → NaN, inf → inf
    m = fit_mappings(_users(dur, score), _mappings_set())
    assert m.numeric["score"]["mean"] == 2.0
    assert m.numeric["score"]["std"] == pytest.approx(math.sqrt(2 / 3), rel=1e-12)
    finite_dur = pl.Series([0.0, 1.0, 3.0]).log1p()
    assert m.numeric["dur"]["mean"] == pytest.approx(finite_dur.mean(), rel=1e-12)
    assert m.numeric["dur"]["std"] == pytest.approx(finite_dur.std(ddof=0), rel=1e-12)

    out = apply_mappings(_users(dur, score), _mappings_set(), m).collect()
    std = m.numeric["score"]["std"]
    expected = [-1 / std, 0.0, 1 / std, 0.0, 0.0, 0.0, 0.0]  # non-finite and null → 0.0
    assert out["score"].to_list() == pytest.approx(expected, rel=1e-6)
    assert out["score"].dtype == pl.Float32 and out["dur"].dtype == pl.Float32
    assert out["dur"].is_finite().all()
    assert out["dur"].to_list()[2:5] == [0.0, 0.0, 0.0]  # -inf, NaN, inf after log1p


def test_numeric_statistics_unchanged_on_finite_data() -> None:
    """Without a non-finite value the statistics are the plain ones, computed as before."""
    score = [0.1 * i + 1e-3 * i * i for i in range(50)] + [None]
    dur = [float(i % 7) for i in range(50)] + [None]
    lf = _users(dur, score)
    m = fit_mappings(lf, _mappings_set())
    plain = lf.select(
        pl.col("raw_score").mean().alias("sm"),
        pl.col("raw_score").std(ddof=0).alias("ss"),
        pl.col("dur").log1p().mean().alias("dm"),
        pl.col("dur").log1p().std(ddof=0).alias("ds"),
    ).collect(engine="streaming")
    assert m.numeric["score"] == {"mean": plain["sm"].item(), "std": plain["ss"].item()}
    assert m.numeric["dur"] == {"mean": plain["dm"].item(), "std": plain["ds"].item()}


def test_numeric_statistics_without_finite_values_centre_at_zero() -> None:
    m = fit_mappings(_users([1.0, 2.0], [math.nan, math.inf]), _mappings_set())
    assert m.numeric["score"] == {"mean": 0.0, "std": 1.0}


def test_numeric_statistics_that_overflow_are_rejected() -> None:
    with pytest.raises(DataError, match=r"'score'.*not finite \(mean=inf.*transform = \"log1p\""):
        fit_mappings(_users([1.0] * 3, [1e308] * 3), _mappings_set())
    with pytest.raises(DataError, match=r"'score'.*std=inf"):
        fit_mappings(_users([1.0] * 2, [1e200, -1e200]), _mappings_set())


def test_z_score_beyond_float32_maps_to_zero() -> None:
    m = fit_mappings(_users([1.0, 1.0], [0.0, 0.0]), _mappings_set())
    assert m.numeric["score"] == {"mean": 0.0, "std": STD_FLOOR}
    out = apply_mappings(_users([1.0, 1.0], [1e35, 1.0]), _mappings_set(), m).collect()
    assert out["score"].to_list() == [0.0, pytest.approx(1e6)]  # 1e41 overflows Float32


# ---- entity tables and events (validate.py) --------------------------------------------------


def _features(toml: str) -> list:
    return list(FeatureSet.from_toml(toml).features)


def _table(**columns: list) -> pl.LazyFrame:
    n = len(next(iter(columns.values())))
    base = {"user_id": list(range(1, n + 1)), "valid_from": [T0] * n}
    return pl.DataFrame(base | columns).lazy()


def _check_table(lf: pl.LazyFrame, numeric_toml: str = "") -> None:
    validate_table(
        lf, path="users.parquet", key="user_id", time="valid_from",
        columns={"score": "a feature"}, numeric=_features(_numeric_toml(numeric_toml)),
        entity="user",
    )  # fmt: skip


def test_entity_table_values() -> None:
    _check_table(_table(score=[1.0, None, 3.0]))  # nulls are missing values, not errors
    with pytest.raises(DataError, match="has no rows; no event would get the features of entity"):
        _check_table(_table(score=[1.0]).head(0))
    with pytest.raises(DataError, match=r"'valid_from' must be not null, but 1 of 2 .*user_id=2"):
        _check_table(_table(score=[1.0, 2.0], valid_from=[T0, None]))
    exact = _table(score=[1.0, 1.0], user_id=[4, 4])  # identical copies
    with pytest.raises(DataError, match=r"2 of 2 rows .*user_id=4.*identical copies are rejected"):
        _check_table(exact)
    with pytest.raises(DataError, match=r"'score' \(numeric feature score\) must be finite"):
        _check_table(_table(score=[1.0, -math.inf]))
    _check_table(_table(score=[1.0, math.nan, math.inf]), 'non_finite = "missing"')
    with pytest.raises(DataError, match=r"'score' .*has dtype String, expected a number"):
        _check_table(_table(score=["1.0"]))


def test_log1p_domain_is_part_of_the_contract() -> None:
    log1p = 'transform = "log1p"'
    _check_table(_table(score=[0, 5, None]), log1p)
    with pytest.raises(DataError, match=r"finite and > -1 \(its transform is log1p\).*e\.g\. -1\)"):
        _check_table(_table(score=[0, -1]), log1p)  # integers too
    with pytest.raises(DataError, match=r"1 of 2 rows are not \(e\.g\. -3\.0\)"):
        _check_table(_table(score=[-0.5, -3.0]), log1p)
    _check_table(_table(score=[-3.0, 2.0]), log1p + '\nnon_finite = "missing"')


def _events(ts: list[datetime]) -> pl.LazyFrame:
    n = len(ts)
    data = {"user_id": list(range(n)), "ts": ts, "score": [1.0] * n}
    return pl.DataFrame(data, schema_overrides={"ts": pl.Datetime("us")}).lazy()


def _check_events(lf: pl.LazyFrame, **kw: object) -> None:
    validate_events(
        lf, path="ev.parquet", required={"user_id": "key"}, int_ids=["user_id"],
        binary_labels=[], nonneg_labels=[], time_column="ts", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_event_times_against_the_clock_and_the_start() -> None:
    ts = [datetime(2026, 1, 1, 12), datetime(2026, 1, 2, 12)]
    _check_events(_events(ts), not_after=datetime(2026, 1, 2, 12), not_before=ts[0])
    with pytest.raises(DataError, match=r"no later than 2026-01-02 11:00:00 UTC.*1 of 2 rows .*"
                       r"\(latest 2026-01-02 12:00:00\)"):  # fmt: skip
        _check_events(_events(ts), not_after=datetime(2026, 1, 2, 11, tzinfo=UTC))
    with pytest.raises(DataError, match=r"\(min_event_time\) 2026-01-01 13:00:00 UTC.*1 of 2 rows"
                       r".*\(earliest 2026-01-01 12:00:00\)"):  # fmt: skip
        _check_events(_events(ts), not_before=datetime(2026, 1, 1, 13))
    # a zoned column is compared in UTC: 12:00 in Berlin is 11:00 UTC
    berlin = _events(ts).with_columns(pl.col("ts").dt.replace_time_zone("Europe/Berlin"))
    _check_events(berlin, not_after=datetime(2026, 1, 2, 11))
    with pytest.raises(DataError, match=r"latest 2026-01-02 11:00:00"):
        _check_events(berlin, not_after=datetime(2026, 1, 2, 10, 59))
    zoned_start = datetime(2026, 1, 1, 12, 30, tzinfo=UTC).astimezone()  # any zone: same instant
    with pytest.raises(DataError, match=r"2026-01-01 12:30:00 UTC.*earliest 2026-01-01 11:00:00"):
        _check_events(berlin, not_before=zoned_start)


def test_numeric_event_columns_follow_the_policy() -> None:
    lf = _events([T0, T0]).with_columns(score=pl.Series([1.0, math.inf]))
    with pytest.raises(DataError, match=r"events file ev\.parquet: column 'score' \(numeric feat"):
        _check_events(lf, numeric=_features(_numeric_toml("")))
    _check_events(lf, numeric=_features(_numeric_toml('non_finite = "missing"')))


# ---- the training-set builder: clock, start, coverage ----------------------------------------


def write_store(root: Path, *, users: pl.DataFrame | None = None, t0: datetime = T0, **more):
    """Users 1..3 (user 3 from day 3), items 10..11, 4 impressions a day for N_DAYS days."""
    tables = {
        "users": pl.DataFrame(
            {
                "user_id": [1, 2, 3],
                "valid_from": [t0 - DAY, t0 - DAY, t0 + 3 * DAY],
                "segment": ["s1", "s2", "s3"],
                "age_bucket": ["18-24", "25-34", "35-44"],
                "country": ["us", "fr", "de"],
                "interests": [["a"], ["b"], []],
            }
        ),
        "items": pl.DataFrame(
            {
                "item_id": [10, 11],
                "valid_from": [t0 - DAY, t0 - DAY],
                "category": ["news", "music"],
                "author": [7, 8],
                "tags": [["t1"], ["t2"]],
                "duration_s": [30.0, 240.0],
            }
        ),
    }
    rows = []
    for d in range(N_DAYS):
        for j, (user, item) in enumerate([(1, 10), (2, 11), (3, 10), (1, 11)]):
            ts = t0 + d * DAY + timedelta(hours=6 * j)
            rows.append((len(rows), user, item, ts, (d + j) % 2, float(d * j)))
    tables["impressions"] = pl.DataFrame(
        rows,
        schema=["request_id", "user_id", "item_id", "ts", "click", "watch_time_s"],
        orient="row",
    )
    if users is not None:
        tables["users"] = users
    tables |= more
    root.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.write_parquet(root / f"{name}.parquet")
    return OfflineStore(root)


def build(store: OfflineStore, out: Path, features: FeatureSet | None = None, **kw) -> dict:
    return build_training_set(
        store=store, out=out, features=features or FeatureSet.load(SYNTH), labels=LABELS,
        valid_days=2, test_days=3, **kw,
    )  # fmt: skip


def test_coverage_in_the_manifest_and_warnings(tmp_path: Path, caplog) -> None:
    store = write_store(tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="pipelines.training_set"):
        manifest = build(store, tmp_path / "ds")
    assert manifest == load_manifest(tmp_path / "ds")
    # user 3 (a quarter of the impressions) has no row before day 3: train days 0-4 miss 3 of 20
    assert manifest["coverage"] == {
        "user": {"table": "users", "rows": 40, "found": 37, "share": 0.925,
                 "splits": {"train": 0.85, "valid": 1.0, "test": 1.0}},
        "item": {"table": "items", "rows": 40, "found": 40, "share": 1.0,
                 "splits": {"train": 1.0, "valid": 1.0, "test": 1.0}},
    }  # fmt: skip
    assert manifest["min_coverage"] == MIN_COVERAGE == 0.5
    (warning,) = manifest["warnings"]
    assert warning.startswith("entity user: 92.5% of the event rows (train 85.0%, valid 100.0%")
    assert [r.getMessage() for r in caplog.records] == [warning]


def test_coverage_floor_names_the_cause(tmp_path: Path) -> None:
    text = SYNTH.read_text()
    # key mismatch: the items table holds other ids
    store = write_store(tmp_path / "a", items=pl.read_parquet(_items(tmp_path)))
    with pytest.raises(DataError, match=r"items\.parquet: only 0\.0% .*entity item.*key mismatch: "
                       r"0 of 40 .*missing e\.g\. \[10"):  # fmt: skip
        build(store, tmp_path / "ds")
    # TTL too short: rows valid from the day before, TTL 1 hour
    short = FeatureSet.from_toml(text.replace('ttl = "400d"', 'ttl = "1h"', 1))
    store = write_store(tmp_path / "b")
    with pytest.raises(DataError, match=r"users\.parquet: only 0\.0% .*entity user.*TTL too short"):
        build(store, tmp_path / "ds", short)
    # valid_from after the events; accepted (with a warning) when the floor is 0
    late = pl.read_parquet(store.path("users")).with_columns(valid_from=pl.lit(T0 + 30 * DAY))
    store = write_store(tmp_path / "c", users=late)
    with pytest.raises(DataError, match=r"valid_from in the future of the events.*lower min_cov"):
        build(store, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    manifest = build(store, tmp_path / "ds", min_coverage=0.0)
    assert manifest["coverage"]["user"]["share"] == 0.0
    assert manifest["warnings"][0].startswith("entity user: 0.0% of the event rows")
    with pytest.raises(ValueError, match=r"min_coverage must lie in \[0, 1\], got 1\.5"):
        build(store, tmp_path / "ds2", min_coverage=1.5)


def _items(tmp_path: Path) -> Path:
    path = tmp_path / "other_items.parquet"
    pl.DataFrame(
        {
            "item_id": [110, 111],
            "valid_from": [T0 - DAY, T0 - DAY],
            "category": ["news", "music"],
            "author": [7, 8],
            "tags": [["t1"], ["t2"]],
            "duration_s": [30.0, 240.0],
        }
    ).write_parquet(path)
    return path


def test_event_times_checked_against_the_build_clock(tmp_path: Path) -> None:
    """The last day ends within the tolerance (a day) of now: accepted; two days later: not."""
    now = datetime.now(UTC).replace(tzinfo=None)
    store = write_store(tmp_path / "ok", t0=now - (N_DAYS - 1) * DAY)  # last event: now + 18h
    build(store, tmp_path / "ds")
    store = write_store(tmp_path / "late", t0=now - (N_DAYS - 2) * DAY)  # last: now + 1 day 18h
    with pytest.raises(DataError, match=r"'ts' must be no later than .*the build's clock"):
        build(store, tmp_path / "ds2")
    assert not (tmp_path / "ds2").exists()


def test_min_event_time(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store")
    assert build(store, tmp_path / "ds", min_event_time="2024-03-01")["rows"]["train"] == 20
    build(store, tmp_path / "ds", min_event_time=T0)
    # 00:00 in UTC+1 is 23:00 UTC the day before: the first day's four events are earlier
    with pytest.raises(DataError, match=r"2024-03-01 23:00:00 UTC, but 4 of 40 rows .*earliest "
                       r"2024-03-01 00:00:00"):  # fmt: skip
        build(store, tmp_path / "ds2", min_event_time="2024-03-02T00:00:00+01:00")
    with pytest.raises(ValueError, match="expected an ISO time like '2026-01-01', got 'soon'"):
        build(store, tmp_path / "ds2", min_event_time="soon")
    assert not (tmp_path / "ds2").exists()


def test_data_config_contract_fields() -> None:
    assert DataConfig().min_coverage == MIN_COVERAGE and DataConfig().min_event_time == ""
    assert DataConfig(min_event_time="2026-01-01T06:00:00+02:00").min_event_time
    with pytest.raises(ValueError, match=r"data\.min_coverage must lie in \[0, 1\]"):
        DataConfig(min_coverage=1.5)
    with pytest.raises(ValueError, match=r"data\.min_coverage must be >= 0\.0"):
        DataConfig(min_coverage=-0.1)
    with pytest.raises(ValueError, match=r"data\.min_event_time: expected an ISO time"):
        DataConfig(min_event_time="yesterday")


def test_columns_a_loss_reads_are_checked_like_labels(tmp_path: Path) -> None:
    """A mask or positive indicator must be 0/1, a duration the target is divided by finite and
    > 0 (a zero would make the target inf): named with the count, before anything is written."""
    from recsys_moe.config import TaskConfig
    from recsys_moe.dataset import loss_column_checks

    tasks = [
        TaskConfig(name="click", label="click", kind="binary"),
        TaskConfig(name="wt", label="watch_time_s", kind="regression", mask="click"),
        TaskConfig(name="share", label="watch_time_s", kind="regression",
                   objective="duration_quantile", quantile_of="dur", mask="seen"),
    ]  # fmt: skip
    checks = loss_column_checks(tasks)
    assert checks == {"click": "binary", "seen": "binary", "dur": "positive"}
    good = write_store(tmp_path / "good")
    events = pl.read_parquet(good.path("impressions"))
    n = events.height
    ok = events.with_columns(dur=pl.lit(10.0), seen=pl.lit(1))
    ok.write_parquet(good.path("impressions"))
    build(good, tmp_path / "ds-ok", carry=["dur", "seen"], carry_checks=checks)
    for column, values, want in [
        ("dur", [0.0] + [10.0] * (n - 1), r"column 'dur' .*finite and > 0.*1 of \d+ rows"),
        ("dur", [math.inf] * 2 + [10.0] * (n - 2), r"column 'dur' .*finite and > 0.*2 of"),
        ("seen", [2] + [1] * (n - 1), r"column 'seen' .*0 or 1.*1 of"),
    ]:
        store = write_store(tmp_path / f"bad-{column}-{values[0]}")
        ok.with_columns(pl.Series(column, values)).write_parquet(store.path("impressions"))
        out = tmp_path / f"ds-{column}-{values[0]}"
        with pytest.raises(DataError, match=want):
            build(store, out, carry=["dur", "seen"], carry_checks=checks)
        assert not out.exists()
