"""Importers of real public data samples (census-income, MovieLens, KuaiRand) into the offline
store layout; where to get each sample: the README's "Real data" section.

Over 400 lines on purpose: three importers (census, MovieLens, KuaiRand) sharing one writer and
one contract; each importer is a screen or two and reads alone.

    import_dataset("movielens", src="downloads/ml-latest-small", out="movielens-run/data")

Each importer reads the source CSVs lazily, writes ``<table>.parquet`` files plus ``meta.json``
(source, licence, attribution, row counts, tasks, notes) and copies the source's SOURCE.md and
licence files next to them, all into a hidden sibling directory renamed into place at the end.
The tables have the shape ``pipelines.training_set`` expects: an events table with Int64 keys, a
Datetime ``ts`` and label columns; entity tables with an Int64 key, a Datetime ``valid_from`` and
feature columns. ``configs/<name>.toml`` and ``configs/features/<name>.toml`` run them.

- ``census`` (UCI Census-Income KDD, the MMoE paper's benchmark): one row = one event
  (``event_id``) of one person (``person_id`` = ``event_id``); tasks ``income_50k`` and
  ``never_married``. ``ts`` spreads rows over 10 days by a splitmix64 hash of ``event_id``, so the
  by-day split is a deterministic pseudo-random one (1 + 1 of 10 days = 80/10/10).
- ``movielens`` (ml-latest-small): events = ratings; tasks ``liked`` (rating >= 4) and ``rating``;
  per-user statistics as point-in-time rows valid from the start of the day after each rating day.
- ``kuairand`` (KuaiRand-1K random-exposure subset + KuaiRand-Pure side tables): tasks ``click``
  (``is_click``) and ``watch_time`` (``play_time_ms`` / 1000); no watch-time column of the log
  reaches an entity table, so none can become a model input.

Timestamps are naive UTC, microseconds. Ids are Int64 throughout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.mappings import hash_index
from pipelines.synth import write_atomically

GENERATOR = "pipelines.importers"
VERSION = 1
# the samples' folder names where the project's test fixtures keep them (tests/test_importers.py)
DEFAULT_SRC: dict[str, str] = {
    "census": "census_income_kdd",
    "movielens": "movielens_latest_small",
    "kuairand": "kuairand",
}
EPOCH = datetime(1970, 1, 1)  # valid_from of attribute rows that hold for the whole log
TS = pl.Datetime("us")
CANDIDATE_USERS = 50
CANDIDATES_PER_USER = 30


def import_dataset(name: str, *, src: str | Path, out: str | Path) -> dict:
    """Import data set ``name`` (census | movielens | kuairand) from ``src`` into ``out``;
    return the ``meta.json`` dict."""
    importers: dict[str, Callable[..., dict]] = {
        "census": import_census,
        "movielens": import_movielens,
        "kuairand": import_kuairand,
    }
    if name not in importers:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(importers)}")
    return importers[name](src=src, out=out)


# ---- census ------------------------------------------------------------------------------------

CENSUS_FILE = "census-income.test.gz"
# census-income.names order (SOURCE.md), snake_case; "divdends" spelled right.
CENSUS_COLUMNS: tuple[str, ...] = (
    "age", "class_of_worker", "industry_code", "occupation_code", "education", "wage_per_hour",
    "enrolled_in_edu_inst_last_wk", "marital_status", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains",
    "capital_losses", "dividends_from_stocks", "tax_filer_status", "region_of_previous_residence",
    "state_of_previous_residence", "detailed_household_and_family_stat",
    "detailed_household_summary_in_household", "instance_weight", "migration_code_change_in_msa",
    "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer", "family_members_under_18", "country_of_birth_father",
    "country_of_birth_mother", "country_of_birth_self", "citizenship",
    "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
)  # fmt: skip
CENSUS_NUMERIC: tuple[str, ...] = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
    "num_persons_worked_for_employer", "weeks_worked_in_year",
)  # fmt: skip
# Label sources and the survey weight never reach the persons table (no way to become inputs).
CENSUS_DROPPED: tuple[str, ...] = ("instance_weight", "marital_status", "income")
CENSUS_CATEGORICAL: tuple[str, ...] = tuple(
    c for c in CENSUS_COLUMNS if c not in CENSUS_NUMERIC and c not in CENSUS_DROPPED
)
CENSUS_INCOME = {"- 50000.": 0, "50000+.": 1}
CENSUS_START = datetime(1995, 1, 1)  # pseudo event period: 10 days from here
CENSUS_DAYS = 10


def import_census(*, src: str | Path, out: str | Path) -> dict:
    src, out = Path(src), _check_out(Path(out))
    path = _source(src, CENSUS_FILE, "census")
    raw = _scan_csv(path, has_header=False, infer_schema=False, new_columns=list(CENSUS_COLUMNS))
    n_cols = len(raw.collect_schema())
    if n_cols != len(CENSUS_COLUMNS):
        raise ValueError(
            f"census source {path}: {n_cols} columns, expected {len(CENSUS_COLUMNS)} (the UCI "
            "census-income file without header); pass --src with the original census-income.test.gz"
        )
    text = [pl.col(c).str.strip_chars() for c in CENSUS_COLUMNS]
    missing = [pl.when(pl.col(c) != "?").then(pl.col(c)).alias(c) for c in CENSUS_COLUMNS]
    rows = _collect(
        raw.select(text)
        .select(missing)
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("event_id")),
        path,
    )
    bad = rows.filter(~pl.col("income").is_in(list(CENSUS_INCOME)) | pl.col("income").is_null())
    if bad.height:
        raise ValueError(
            f"census source {path}: column 'income' (last) must be one of {list(CENSUS_INCOME)}, "
            f"but {bad.height} rows are not (e.g. {bad['income'][0]!r}); is it the census file?"
        )
    offset_s = hash_index(pl.col("event_id"), CENSUS_DAYS * 86_400 + 1) - 1  # 0 .. 10 days - 1 s
    events = rows.select(
        "event_id",
        pl.col("event_id").alias("person_id"),
        (pl.lit(CENSUS_START) + pl.duration(seconds=offset_s)).cast(TS).alias("ts"),
        pl.col("income").replace_strict(CENSUS_INCOME, return_dtype=pl.Int8).alias("income_50k"),
        (pl.col("marital_status") == "Never married").cast(pl.Int8).alias("never_married"),
    )
    persons = rows.select(
        pl.col("event_id").alias("person_id"),
        pl.lit(EPOCH).cast(TS).alias("valid_from"),
        *[pl.col(c).cast(pl.Float64) for c in CENSUS_NUMERIC],
        *CENSUS_CATEGORICAL,
    )
    tasks = [_task("income_50k", "binary"), _task("never_married", "binary")]
    frames = {"events": events, "persons": persons}
    notes = [
        "One row of census-income.test = one event; person_id = event_id; no user/item, so "
        "`recsys-moe score` (which needs user_id/item_id candidates) does not apply; "
        "features build, train, evaluate and register do.",
        f"ts = {CENSUS_START.date()} + splitmix64(event_id) mod {CENSUS_DAYS} days (pipelines."
        "mappings.hash_index): the by-day split with valid_days = test_days = 1 is a "
        "deterministic pseudo-random 80/10/10 split.",
        "Dropped from the inputs: marital_status (source of never_married), income (source of "
        "income_50k), instance_weight (survey weight, per census-income.names). The household "
        "columns (detailed_household_*) are kept as in the MMoE paper although they partly "
        "encode marital status (e.g. 'Child <18 never marr not in subfamily').",
        "'?' = missing (null); categorical codes kept as strings, 7 continuous columns as Float64.",
    ]
    meta = _meta(
        "census", src, [path], frames, tasks, notes, events_table="events",
        keys=["event_id"],
        licence=(
            "CC BY 4.0 (as listed by the UCI Machine Learning Repository; see SOURCE.md)"
        ),
        attribution=(
            "Lane, T. & Kohavi, R., Census-Income (KDD), UCI Machine Learning Repository, "
            "doi:10.24432/C5N30T; copy from github.com/drawbridge/keras-mmoe "
            "data/census-income.test.gz (tasks of Ma et al., KDD 2018, Section 6.3)"
        ),
    )  # fmt: skip
    meta["label_rates"] = _rates(events, ["income_50k", "never_married"])
    write_atomically(out, frames, meta, [src / "SOURCE.md"])
    return meta


# ---- movielens ---------------------------------------------------------------------------------

ML_RATINGS = "ratings.csv.gz"
ML_MOVIES = "movies.csv.gz"
ML_LIKED = 4.0


def import_movielens(
    *,
    src: str | Path,
    out: str | Path,
    candidate_users: int = CANDIDATE_USERS,
    candidates_per_user: int = CANDIDATES_PER_USER,
) -> dict:
    src, out = Path(src), _check_out(Path(out))
    rpath = _source(src, ML_RATINGS, "movielens")
    mpath = _source(src, ML_MOVIES, "movielens")
    ratings = _require(_scan_csv(rpath), rpath, ["userId", "movieId", "rating", "timestamp"])
    movies = _require(_scan_csv(mpath), mpath, ["movieId", "title", "genres"])
    events = _collect(
        ratings.select(
            pl.col("userId").cast(pl.Int64).alias("user_id"),
            pl.col("movieId").cast(pl.Int64).alias("item_id"),
            pl.from_epoch(pl.col("timestamp").cast(pl.Int64), time_unit="s").cast(TS).alias("ts"),
            pl.col("rating").cast(pl.Float64),
            (pl.col("rating").cast(pl.Float64) >= ML_LIKED).cast(pl.Int8).alias("liked"),
        ).sort("ts", "user_id", "item_id"),
        rpath,
    )
    _unique(events, ["user_id", "item_id"], rpath)
    items = _collect(
        movies.select(
            pl.col("movieId").cast(pl.Int64).alias("item_id"),
            pl.lit(EPOCH).cast(TS).alias("valid_from"),
            pl.col("genres").str.split("|"),
            pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int64).alias("year"),
        ).sort("item_id"),
        mpath,
    )
    users = user_rating_stats(events)
    candidates, scoring_time = _candidates(
        events, items["item_id"], candidate_users, candidates_per_user
    )
    frames = {"ratings": events, "users": users, "items": items, "candidates": candidates}
    tasks = [_task("liked", "binary"), _task("rating", "regression")]
    notes = [
        f"Events = ratings (user_id = userId, item_id = movieId, ts = timestamp as UTC); liked = "
        f"rating >= {ML_LIKED}; rating regressed as is (0.5 .. 5 stars).",
        "users: per-user statistics as slowly changing rows: one row per (user, day with "
        "ratings) valid from the start of the NEXT day (UTC) holding n_ratings_before and "
        "mean_rating_before over all earlier days, plus a row at 1970-01-01 with 0 / null; a "
        "rating never sees its own day's ratings.",
        "items: genres split on '|' (multi-categorical), year parsed from the title (null when "
        "absent). tags.csv and links.csv are not used (tags carry later timestamps).",
        f"candidates: {candidate_users} most recently active users x {candidates_per_user} "
        "movies they never rated, drawn by a splitmix64 hash among the 1,000 most rated, with ts "
        "= the day after the last rating (the scoring time).",
        "The log spans 1996-2018 with few ratings per day: split on the last 300 / the 200 "
        "days before them that have ratings (about 10 % / 6 % of the rows).",
    ]
    meta = _meta(
        "movielens", src, [rpath, mpath], frames, tasks, notes, events_table="ratings",
        keys=["user_id", "item_id"],
        licence=(
            "GroupLens MovieLens licence: research use only, no commercial use without "
            "permission, redistribution (including transformations) only under the same "
            "conditions, no implied endorsement; full text in README_GroupLens.txt"
        ),
        attribution=(
            "F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and "
            "Context. ACM TiiS 5(4): 19:1-19:19. doi:10.1145/2827872 (ml-latest-small, "
            "GroupLens Research, University of Minnesota, generated 2018-09-26)"
        ),
    )  # fmt: skip
    meta["label_rates"] = _rates(events, ["liked", "rating"])
    meta["scoring_time"] = scoring_time.isoformat()
    write_atomically(out, frames, meta, [src / "SOURCE.md", src / "README_GroupLens.txt"])
    return meta


def user_rating_stats(events: pl.DataFrame) -> pl.DataFrame:
    """Point-in-time user statistics from ``events`` (user_id, ts, rating): a row at the epoch
    with 0 ratings, then one row per (user, rating day) valid from the next day's start."""
    day = pl.col("ts").dt.date()
    daily = (
        events.lazy()
        .group_by("user_id", day.alias("day"))
        .agg(pl.len().alias("n"), pl.col("rating").sum().alias("s"))
        .sort("user_id", "day")
        .select(
            "user_id",
            (pl.col("day") + pl.duration(days=1)).cast(TS).alias("valid_from"),
            pl.col("n").cum_sum().over("user_id").cast(pl.Float64).alias("n_ratings_before"),
            (pl.col("s").cum_sum().over("user_id") / pl.col("n").cum_sum().over("user_id"))
            .cast(pl.Float64)
            .alias("mean_rating_before"),
        )
    )
    first = (
        events.lazy()
        .select(pl.col("user_id").unique())
        .select(
            "user_id",
            pl.lit(EPOCH).cast(TS).alias("valid_from"),
            pl.lit(0.0).alias("n_ratings_before"),
            pl.lit(None, dtype=pl.Float64).alias("mean_rating_before"),
        )
    )
    return pl.concat([first, daily]).sort("user_id", "valid_from").collect()


# ---- kuairand ----------------------------------------------------------------------------------

KR_LOG = "kuairand_1k_log_random_subset.csv.gz"
KR_USERS = "user_features_pure.csv.gz"
KR_VIDEOS = "video_features_basic_pure.csv.gz"
KR_LICENCE = "LICENSE_KuaiRand_CC-BY-SA-4.0.txt"
KR_USER_CATEGORICAL = (
    "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
    "register_days_range", *(f"onehot_feat{i}" for i in range(18)),
)  # fmt: skip
KR_USER_NUMERIC = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")


def import_kuairand(
    *,
    src: str | Path,
    out: str | Path,
    candidate_users: int = CANDIDATE_USERS,
    candidates_per_user: int = CANDIDATES_PER_USER,
) -> dict:
    src, out = Path(src), _check_out(Path(out))
    lpath, upath, vpath = (_source(src, f, "kuairand") for f in (KR_LOG, KR_USERS, KR_VIDEOS))
    log = _require(
        _scan_csv(lpath), lpath,
        ["user_id", "video_id", "time_ms", "is_click", "play_time_ms", "long_view", "is_like"],
    )  # fmt: skip
    user_cols = ["user_id", *KR_USER_CATEGORICAL, *KR_USER_NUMERIC]
    video_cols = ["video_id", "author_id", "video_type", "upload_dt", "upload_type",
                  "visible_status", "video_duration", "server_width", "server_height",
                  "music_id", "music_type", "tag"]  # fmt: skip
    users_raw = _require(_scan_csv(upath, infer_schema_length=None), upath, user_cols)
    videos_raw = _require(_scan_csv(vpath, infer_schema_length=None), vpath, video_cols)
    # Only ids, time and labels leave the log: play_time_ms, long_view, profile/comment stay
    # times and duration_ms are never copied into an entity table, so no input can see them.
    events = _collect(
        log.select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("video_id").cast(pl.Int64).alias("item_id"),
            pl.from_epoch(pl.col("time_ms").cast(pl.Int64), time_unit="ms").cast(TS).alias("ts"),
            pl.col("is_click").cast(pl.Int8).alias("click"),
            (pl.col("play_time_ms").cast(pl.Float64) / 1000.0).alias("watch_time_s"),
            pl.col("long_view").cast(pl.Int8),
            pl.col("is_like").cast(pl.Int8).alias("like"),
        ).sort("ts", "user_id", "item_id"),
        lpath,
    )
    _unique(events, ["user_id", "item_id"], lpath)
    users = _collect(
        users_raw.join(events.lazy().select(pl.col("user_id").unique()), on="user_id", how="semi")
        .select(
            pl.col("user_id").cast(pl.Int64),
            pl.lit(EPOCH).cast(TS).alias("valid_from"),
            *_codes(users_raw, KR_USER_CATEGORICAL),
            *[pl.col(c).cast(pl.Float64) for c in KR_USER_NUMERIC],
        )
        .sort("user_id"),
        upath,
    )
    width, height = pl.col("server_width"), pl.col("server_height")
    videos = _collect(
        videos_raw.select(
            pl.col("video_id").cast(pl.Int64).alias("item_id"),
            pl.lit(EPOCH).cast(TS).alias("valid_from"),
            *_codes(videos_raw, ["author_id", "video_type", "upload_type", "visible_status",
                                 "music_id", "music_type"]),
            (pl.col("video_duration").cast(pl.Float64).fill_nan(None) / 1000.0).alias(
                "duration_s"
            ),
            pl.when(width < height).then(pl.lit("portrait"))
            .when(width > height).then(pl.lit("landscape"))
            .when(width == height).then(pl.lit("square"))
            .alias("orientation"),
            pl.col("tag").cast(pl.String).str.split(","),
            pl.col("upload_dt").cast(pl.String).str.to_date(strict=False).alias("upload_date"),
        ).sort("item_id"),
        vpath,
    )  # fmt: skip
    missing = events.join(users, on="user_id", how="anti").height
    missing_v = events.join(videos, on="item_id", how="anti").height
    candidates, scoring_time = _candidates(
        events, videos["item_id"], candidate_users, candidates_per_user, pool=None
    )
    frames = {"log": events, "users": users, "videos": videos, "candidates": candidates}
    tasks = [_task("click", "binary"), _task("watch_time", "regression", "watch_time_s", "log1p")]
    notes = [
        "Events = the 3,557-row KuaiRand-1K random-exposure subset; item_id = video_id, ts = "
        "time_ms as UTC (calendar days of the split are UTC days, not Beijing dates).",
        "click = is_click, which in this log is the 'valid play' signal (about play > 7 s); "
        "watch_time_s = play_time_ms / 1000. play_time_ms, duration_ms, long_view, "
        "profile_stay_time and comment_stay_time stay out of every entity table, so they cannot "
        "be inputs; long_view and like are kept in the log as optional extra labels.",
        "users: the KuaiRand-Pure user features of the log's users (valid from 1970-01-01); "
        "videos: the whole 7,583-video random-exposure pool (duration_s = video_duration / "
        "1000, an item attribute; tag split on ','; orientation from server width/height).",
        f"(user_id, item_id) is unique in the log, so it is the event key; log rows without a "
        f"user row: {missing}, without a video row: {missing_v}.",
        f"candidates: {candidate_users} most recently active users x {candidates_per_user} "
        "videos of the pool they were never shown (splitmix64 hash draw), ts = the day after "
        "the last event.",
    ]
    meta = _meta(
        "kuairand", src, [lpath, upath, vpath], frames, tasks, notes, events_table="log",
        keys=["user_id", "item_id"],
        licence="CC BY-SA 4.0 (attribution + share-alike; full text in " + KR_LICENCE + ")",
        attribution=(
            "Gao, Chongming et al. KuaiRand: An Unbiased Sequential Recommendation Dataset with "
            "Randomly Exposed Videos. CIKM 2022, doi:10.1145/3511808.3557624 "
            "(github.com/chongminggao/KuaiRand); log subset via github.com/RobertDeLaCruzNEU/"
            "CS7180-GROUP-007-RecSys, side tables via github.com/Applied-Machine-Learning-Lab/"
            "KuaiSim; see SOURCE.md"
        ),
    )  # fmt: skip
    meta["label_rates"] = _rates(events, ["click", "watch_time_s"])
    meta["scoring_time"] = scoring_time.isoformat()
    write_atomically(out, frames, meta, [src / "SOURCE.md", src / KR_LICENCE])
    return meta


# ---- shared steps ------------------------------------------------------------------------------


def _candidates(
    events: pl.DataFrame,
    item_ids: pl.Series,
    n_users: int,
    per_user: int,
    pool: int | None = 1000,
) -> tuple[pl.DataFrame, datetime]:
    """The ``n_users`` most recently active users x ``per_user`` items each never interacted
    with, drawn by a hash of (user, item) among the ``pool`` most frequent items (None: all)."""
    last_day: date = events["ts"].max().date()  # type: ignore[union-attr]
    scoring_time = datetime.combine(last_day + timedelta(days=1), datetime.min.time())
    users = (
        events.group_by("user_id")
        .agg(pl.col("ts").max().alias("last"))
        .sort(["last", "user_id"], descending=[True, False])
        .head(n_users)
        .select("user_id")
    )
    counts = events.group_by("item_id").len()
    items = (
        pl.DataFrame({"item_id": item_ids.cast(pl.Int64)})
        .unique()
        .join(counts, on="item_id", how="left")
        .sort([pl.col("len").fill_null(0), "item_id"], descending=[True, False])
    )
    items = items.head(pool) if pool else items
    key = pl.col("user_id") * 1_000_003 + pl.col("item_id")
    cands = (
        users.join(items.select("item_id"), how="cross")
        .join(events.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
        .with_columns(hash_index(key, 1 << 31).alias("__draw"))
        .sort("user_id", "__draw", "item_id")
        .filter(pl.int_range(pl.len()).over("user_id") < per_user)
        .select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("item_id").cast(pl.Int64),
            pl.lit(scoring_time).cast(TS).alias("ts"),
        )
    )
    return cands, scoring_time


def _task(name: str, kind: str, label: str | None = None, transform: str = "none") -> dict:
    return {"name": name, "kind": kind, "label": label or name, "transform": transform}


def _rates(events: pl.DataFrame, labels: list[str]) -> dict[str, float]:
    return {c: float(events[c].cast(pl.Float64).mean()) for c in labels}  # type: ignore[arg-type]


def _codes(lf: pl.LazyFrame, columns: tuple[str, ...] | list[str]) -> list[pl.Expr]:
    """Categorical side columns: strings stay strings; numbers (floats holding codes, NaN =
    missing) become Int64, so the vocabularies hold ids rather than 1.0 / 2.0."""
    schema = lf.collect_schema()
    out = []
    for c in columns:
        x = pl.col(c)
        if schema[c].is_float():
            x = x.fill_nan(None)
        out.append(x.cast(pl.Int64) if schema[c].is_numeric() else x.cast(pl.String))
    return out


def _source(src: Path, name: str, dataset: str) -> Path:
    path = src / name
    if not path.is_file():
        raise ValueError(
            f"{dataset} importer: source file {path} not found; pass --src the folder that holds "
            f'{name} (the README\'s "Real data" section says where to get it)'
        )
    return path


def _scan_csv(path: Path, **kwargs: Any) -> pl.LazyFrame:
    try:
        lf = pl.scan_csv(path, **kwargs)
        lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise ValueError(f"source file {path}: not a readable CSV ({e})") from e
    return lf


def _require(lf: pl.LazyFrame, path: Path, columns: list[str]) -> pl.LazyFrame:
    names = lf.collect_schema().names()
    for c in columns:
        if c not in names:
            raise ValueError(
                f"source file {path}: missing column {c!r}; columns present: {names}; "
                "use the original file named in SOURCE.md"
            )
    return lf


def _collect(lf: pl.LazyFrame, path: Path) -> pl.DataFrame:
    try:
        return lf.collect()
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"source file {path}: cannot be read as expected ({e})") from e


def _unique(events: pl.DataFrame, keys: list[str], path: Path) -> None:
    n = events.select(pl.struct(keys).n_unique()).item()
    if n != events.height:
        raise ValueError(
            f"source file {path}: {events.height - n} duplicate ({', '.join(keys)}) rows; the "
            "event keys must be unique per event: deduplicate the source or add an event_id key"
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _meta(
    name: str,
    src: Path,
    files: list[Path],
    frames: dict[str, pl.DataFrame],
    tasks: list[dict],
    notes: list[str],
    *,
    events_table: str,
    keys: list[str],
    licence: str,
    attribution: str,
) -> dict:
    ts = frames[events_table]["ts"]
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "dataset": name,
        "source": {
            "dir": str(src.resolve()),
            "files": {p.name: {"sha256": _sha256(p)} for p in files},
            "details": "SOURCE.md (copied next to this file)",
        },
        "licence": licence,
        "attribution": attribution,
        "rows": {t: f.height for t, f in frames.items()},
        "events": {"table": events_table, "time": "ts", "keys": keys},
        "tasks": tasks,
        "first_event_ts": ts.min().isoformat(),  # type: ignore[union-attr]
        "last_event_ts": ts.max().isoformat(),  # type: ignore[union-attr]
        "notes": notes,
    }


def _check_out(out: Path) -> Path:
    """``out`` may be replaced only when absent, empty or an earlier output of an importer."""
    if not out.exists():
        return out
    ours = False
    if out.is_dir():
        try:
            ours = not any(out.iterdir()) or (
                json.loads((out / "meta.json").read_text()).get("generator") == GENERATOR
            )
        except (OSError, ValueError, AttributeError):
            ours = False
    if not ours:
        raise ValueError(
            f"{out} exists and is not an earlier output of an importer (no meta.json naming "
            f"{GENERATOR}); choose a new directory or remove it first"
        )
    return out
