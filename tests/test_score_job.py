"""The scoring job end to end on a tiny trained and registered model (real TorchRec, a real
SQLite MLflow registry): the same scores as the registered pyfunc, exact counts of what lacks
features, the output protocol (resume, refusal, byte-identical reruns), kills, torchrun."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from fixtures import registered_model

from feature_store import DataError, OfflineStore, join_features
from recsys_moe.config import DEMO_CONFIG, load_config
from serving.output import RUN
from serving.score import MANIFEST, part_name, score

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / ".venv" / "bin" / "torchrun"
TINY = [
    "synth.users=800",
    "synth.items=120",
    "synth.days=4",
    "train.epochs=1",
    "train.batch_size=256",
    "train.log_every=50",
    "mlflow.experiment=score",
    "mlflow.registered_model=score-model",
    "eval.bootstrap=0",  # register needs the test metrics, not their intervals (saves ~60 s)
]
pytestmark = pytest.mark.slow  # the fixture trains and registers a model (~20-40 s)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    work = tmp_path_factory.mktemp("score")
    m = registered_model(work, TINY)
    cands = pl.read_parquet(m.cfg.store_dir / "candidates.parquet")
    return SimpleNamespace(cfg=m.cfg, meta=m.meta, reg=m.reg, cands=cands, work=work)


def _cfg(run: SimpleNamespace, *sets: str):  # noqa: ANN202
    return load_config(DEMO_CONFIG, [*TINY, *sets], workdir=run.work)


def _parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


def test_scores_equal_the_registered_pyfunc_on_point_in_time_rows(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    import mlflow

    as_of = datetime.fromisoformat(run.meta["scoring_time"])
    out = tmp_path / "s"
    m = score(model_uri=run.reg.uri, candidates=run.cfg.store_dir / "candidates.parquet",
              output=out, top_k=10_000, cfg=run.cfg, as_of=as_of)  # fmt: skip
    got = pl.read_parquet(list(out.glob("part-*.parquet"))).sort("request_id", "item_id")
    assert got.height == run.cands.height == m["rows"]  # top K above every request's size
    model = mlflow.pyfunc.load_model(run.reg.uri).unwrap_python_model()
    feats = model.bundle.features
    rows = join_features(
        run.cands.lazy().with_columns(pl.lit(as_of).cast(pl.Datetime("us")).alias("ts")),
        OfflineStore(run.cfg.store_dir), feats, event_time="ts",
    ).collect()  # fmt: skip
    ref = pl.concat([rows.select("request_id", "item_id"), model.predict_polars(rows)],
                    how="horizontal").sort("request_id", "item_id")  # fmt: skip
    for col in ("p_click", "watch_time_s"):
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=1e-5, atol=1e-7)


def test_missing_expired_duplicate_and_short_are_counted_exactly(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    cfg = _cfg(run, "score.max_missing_share=0.5", f"data.store={tmp_path / 'store'}")
    store = tmp_path / "store"
    store.mkdir()
    src = run.cfg.store_dir
    (store / "items.parquet").write_bytes((src / "items.parquet").read_bytes())
    users = pl.read_parquet(src / "users.parquet")
    old = users["user_id"].unique().sort().head(25)  # every row 500 days earlier: past the TTL
    users.with_columns(
        pl.when(pl.col("user_id").is_in(old.implode()))
        .then(pl.col("valid_from") - timedelta(days=500))
        .otherwise(pl.col("valid_from"))
    ).write_parquet(store / "users.parquet")
    as_of = datetime.fromisoformat(run.meta["scoring_time"])
    c = run.cands.with_row_index("i")
    c = c.with_columns(
        user_id=pl.when(pl.col("i") % 11 == 0).then(pl.col("user_id") + 10**9)
        .otherwise(pl.col("user_id")),
        item_id=pl.when(pl.col("i") % 13 == 0).then(pl.col("item_id") + 10**9)
        .otherwise(pl.col("item_id")),
    ).drop("i")  # fmt: skip
    dup = c.head(17)
    path = tmp_path / "c.parquet"
    pl.concat([c, dup]).write_parquet(path)
    m = score(model_uri=run.reg.uri, candidates=path, output=tmp_path / "o", top_k=6, cfg=cfg,
              as_of=as_of)  # fmt: skip
    unknown_user = c["user_id"] >= 10**9
    unknown_item = c["item_id"] >= 10**9
    expired = c["user_id"].is_in(old.implode())
    assert m["unknown_users"] == unknown_user.sum() > 0
    assert m["unknown_items"] == unknown_item.sum() > 0
    assert m["expired_user_features"] == m["expired_features"] == expired.sum() > 0
    assert m["expired_item_features"] == 0
    assert m["missing_features"] == (unknown_user | unknown_item | expired).sum()
    assert m["duplicates_dropped"] == 17 and m["dropped"] == {"null_id": 0, "duplicate": 17}
    assert m["short_requests"] == int((c.group_by("request_id").len()["len"] < 6).sum()) > 0
    assert m["candidate_rows"] == c.height and m["candidate_input_rows"] == c.height + 17
    shard_sum = sum(s["unknown_items"] for s in m["shards"])
    assert shard_sum == m["unknown_items"]
    # the same candidates under the default threshold (1 %): the job fails, nothing written
    with pytest.raises(DataError, match=r"above score.max_missing_share \(1%\).*ids the store"):
        score(model_uri=run.reg.uri, candidates=path, output=tmp_path / "p", top_k=5,
              cfg=_cfg(run, f"data.store={store}"), as_of=as_of)  # fmt: skip
    assert not list((tmp_path / "p").glob("part-*")) and not (tmp_path / "p" / MANIFEST).exists()


def test_as_of_defaults_to_the_store_and_may_not_precede_it(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    cands = run.cfg.store_dir / "candidates.parquet"
    m = score(model_uri=run.reg.uri, candidates=cands, output=tmp_path / "a", top_k=3,
              cfg=run.cfg)  # fmt: skip
    latest = max(pl.read_parquet(run.cfg.store_dir / f"{t}.parquet")["valid_from"].max()
                 for t in ("users", "items"))  # fmt: skip
    assert m["as_of"] == latest.isoformat() and m["as_of_from"] == "the store's latest feature time"
    with pytest.raises(DataError, match=r"--as-of 2000-01-01T00:00:00 is before the first"):
        score(model_uri=run.reg.uri, candidates=cands, output=tmp_path / "b", top_k=3,
              cfg=run.cfg, as_of=datetime(2000, 1, 1))  # fmt: skip
    assert not (tmp_path / "b").exists()
    # long past the store (a stale store): every feature expired, the job fails saying so
    with pytest.raises(DataError, match="older than their TTL.*stale"):
        score(model_uri=run.reg.uri, candidates=cands, output=tmp_path / "c", top_k=3,
              cfg=run.cfg, as_of=latest + timedelta(days=800))  # fmt: skip


def _cli(run: SimpleNamespace, *args: str, launcher: list[str] | None = None,
         **kw: object) -> subprocess.Popen | subprocess.CompletedProcess:  # fmt: skip
    sets = [a for s in TINY for a in ("--set", s)]
    cmd = [*(launcher or [sys.executable]), "-m", "recsys_moe.cli", "score",
           "--workdir", str(run.work), *sets, *args]  # fmt: skip
    if kw.pop("background", False):
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_model_by_version_or_alias_and_unknown_ones(
    run: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recsys_moe.cli import main

    cands = str(run.cfg.store_dir / "candidates.parquet")
    by_version = f"models:/score-model/{run.reg.version}"
    a = _cli(run, "--model", run.reg.uri, "--candidates", cands, "--output", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    assert "scoring" not in a.stderr  # no progress bar when stderr is not a terminal
    # the CLI's main in this process (a subprocess each costs its imports: ~20 s under load)
    sets = [x for s in TINY for x in ("--set", s)]
    common = ["score", "--workdir", str(run.work), *sets, "--candidates", cands]
    assert main([*common, "--model", by_version, "--output", str(tmp_path / "b")]) == 0
    assert _parts(tmp_path / "a") == _parts(tmp_path / "b")
    capsys.readouterr()
    for uri in ("models:/score-model@nope", "models:/score-model/99", "models:/other@champion"):
        assert main([*common, "--model", uri, "--output", str(tmp_path / "c")]) == 2, uri
        err = capsys.readouterr().err
        assert "error: --model" in err and "score-model" in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


def test_rerun_resumes_is_byte_identical_and_another_run_is_refused(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    cfg = _cfg(run, "score.shard_rows=1500")  # several shards
    cands = run.cfg.store_dir / "candidates.parquet"
    out = tmp_path / "o"
    m = score(model_uri=run.reg.uri, candidates=cands, output=out, top_k=4, cfg=cfg)
    first = _parts(out)
    assert len(first) == len(m["shards"]) > 1 and m["files"] == list(first)
    assert not (out / "_spill").exists()
    again = score(model_uri=run.reg.uri, candidates=cands, output=tmp_path / "p", top_k=4, cfg=cfg)
    assert _parts(tmp_path / "p") == first  # from scratch: byte-identical
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    gone = out / part_name(1)
    gone.unlink()
    (out / MANIFEST).unlink()
    mtime = (out / part_name(0)).stat().st_mtime_ns
    resumed = score(model_uri=run.reg.uri, candidates=cands, output=out, top_k=4, cfg=cfg)
    assert _parts(out) == first and (out / part_name(0)).stat().st_mtime_ns == mtime
    assert resumed["rows"] == m["rows"]
    earlier = datetime.fromisoformat(run.meta["scoring_time"]) - timedelta(days=1)
    with pytest.raises(ValueError, match=r"holds scores of another run \(as_of"):
        score(model_uri=run.reg.uri, candidates=cands, output=out, top_k=4, cfg=cfg, as_of=earlier)
    with pytest.raises(ValueError, match=r"another run \(top_k"):
        score(model_uri=run.reg.uri, candidates=cands, output=out, top_k=5, cfg=cfg)
    assert _parts(out) == first
    score(model_uri=run.reg.uri, candidates=cands, output=out, top_k=5, cfg=cfg, overwrite=True)
    assert json.loads((out / RUN).read_text())["top_k"] == 5


def test_killed_runs_resume_to_the_uninterrupted_output(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    cands = tmp_path / "cands"
    cands.mkdir()
    for i in range(4):  # a folder of files: several units and shards
        run.cands.with_columns(pl.col("request_id") + 10**6 * i).write_parquet(
            cands / f"c{i}.parquet", row_group_size=2000
        )
    shard = ["--set", "score.shard_rows=4000"]
    args = ["--model", run.reg.uri, "--candidates", str(cands), *shard, "--top-k", "5"]
    ref = _cli(run, *args, "--output", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    expected = _parts(tmp_path / "ref")
    out = tmp_path / "killed"
    rng = random.Random(0)
    for attempt in range(4):
        proc = _cli(run, *args, "--output", str(out), background=True)
        time.sleep(rng.uniform(1.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name, data in _parts(out).items():  # no partial file under a final name
            assert data == expected[name], (attempt, name)
    done = _cli(run, *args, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert _parts(out) == expected
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_two_ranks_under_torchrun_give_the_rows_of_one(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    args = ["--model", run.reg.uri, "--candidates", str(run.cfg.store_dir / "candidates.parquet"),
            "--set", "score.shard_rows=2000"]  # fmt: skip
    one = _cli(run, *args, "--output", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _cli(run, *args, "--output", str(tmp_path / "two"),
               launcher=[str(TORCHRUN), "--standalone", "--nproc-per-node", "2"])  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / MANIFEST).read_text())
    m2 = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert {s["rank"] for s in m2["shards"]} == {0, 1}
    rows = [pl.read_parquet(list((tmp_path / d).glob("part-*"))).sort("request_id", "rank")
            for d in ("one", "two")]  # fmt: skip
    assert rows[0].equals(rows[1]) and rows[0].height == m1["rows"] == m2["rows"]
    assert _parts(tmp_path / "one") == _parts(tmp_path / "two")
    assert os.environ.get("RANK") is None  # the test process itself is no rank


def test_int8_tables_score_close_to_fp32_and_are_another_run(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    cands = run.cfg.store_dir / "candidates.parquet"
    out = tmp_path / "q"
    fp32 = score(model_uri=run.reg.uri, candidates=cands, output=tmp_path / "f", top_k=10_000,
                 cfg=run.cfg)  # fmt: skip
    m = score(model_uri=run.reg.uri, candidates=cands, output=out, top_k=10_000, cfg=run.cfg,
              quantize="int8")  # fmt: skip
    change = m["prediction_change"]
    assert m["quantize"] == "int8" and change["rows"] == run.cands.height
    a = pl.read_parquet(list((tmp_path / "f").glob("part-*"))).sort("request_id", "item_id")
    b = pl.read_parquet(list(out.glob("part-*"))).sort("request_id", "item_id")
    d = (a["p_click"] - b["p_click"]).abs()
    assert d.max() == pytest.approx(change["p_click_max_abs_change"])
    assert 0 < d.max() < 0.05
    assert "prediction_change" not in fp32
    with pytest.raises(ValueError, match="quantize"):
        score(model_uri=run.reg.uri, candidates=cands, output=out, top_k=10_000, cfg=run.cfg)
