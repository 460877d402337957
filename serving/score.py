"""Candidate scoring, a batch job over a registered model: streaming, sharded, resumable.

    recsys-moe score --config configs/demo.toml --model models:/recsys-moe-demo@champion \\
        --candidates demo-run/data/candidates.parquet --output demo-run/scores --top-k 10
    torchrun --nproc-per-node 4 -m recsys_moe.cli score ...      # each rank takes its shards

Candidates (``user_id``, ``item_id``, optional ``request_id``; a file or a folder of Parquet) get
their features as of ONE scoring time (``--as-of``, default the store's latest feature time, never
the wall clock; ``serving.asof``), the registry model's predictions (``p_click``,
``watch_time_s``) and a combined score ``prod_t p_t ** w_t`` (binary tasks) ``* (1 + y_t) **
w_t`` (regression tasks). The top K per request (or per user) are written, ranked, to
``OUTPUT/part-<shard>.parquet``; shards are hash buckets of the request (or user) id, so a
group never spans two shards (``serving.candidates``).

Output protocol: ``OUTPUT/_run.json`` (what this output is: model version and run, feature
fingerprint, as-of, candidates, K, weights, shard count) is written first; a later run with a
different one is refused (``--overwrite`` replaces the output). Each shard is written to a hidden
temporary name and renamed when complete, its counts in ``_shards/`` before it; a rerun skips
complete shards. ``_manifest.json`` is written last, by rank 0 once every shard exists: a reader
takes the output as complete when the manifest is there. Parquet parts depend only on the inputs
(not on the number of ranks or on interruptions): a rerun from scratch is byte-identical.

``--device`` (``auto`` by default: this rank's GPU, ``LOCAL_RANK``, where CUDA is available, else
the CPU; or ``cpu``, ``cuda``) is where the model, the tower rows, gathers and forwards run; it is
part of the run's identity (a GPU's floats differ from the CPU's in the last bits).
``scripts/gpu_score_job.sh`` checks a GPU's scores against the CPU's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import mlflow
import polars as pl
from tqdm import tqdm

from feature_store import DataError, FeatureSet, OfflineStore
from pipelines import progress
from pipelines.atomic import check_output, write_text_atomic
from recsys_moe.config import Config, TaskConfig
from serving.asof import (
    AsOfFeatures,
    TimeRange,
    check_missing_share,
    scoring_time,
)
from serving.candidates import (
    SPILL,
    CandidateSource,
    clean,
    partition_unit,
    read_shard,
    shard_count,
    unit_done,
)
from serving.model import (
    ModelRef,
    check_finite,
    combined_score,
    predict_from_tower,
    resolve_model,
    scoring_device,
)
from serving.output import open_output, sha256, wait_for
from serving.quantize import QUANTIZE, Quantize, prediction_change, quantize_embeddings

log = logging.getLogger(__name__)

PART = "part-00000.parquet"  # the first shard's file (the only one of a small candidate set)
MANIFEST = "_manifest.json"
SHARDS = "_shards"
CHUNK = 262_144  # candidates gathered and predicted at once (bounds tensor memory)
# rows per forward of the mixture and heads: small blocks stay in cache (demo model, one thread
# of the 2-core CPU: 362k rows/s at 2048, 154k at 65536)
BATCH = 2048


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


# ---- one shard -----------------------------------------------------------------------------------
@dataclass
class Job:
    """What every shard of one run shares."""

    source: CandidateSource
    output: Path
    model: object  # serving.pyfunc.RecsysModel
    feats: AsOfFeatures
    tasks: list[TaskConfig]
    weights: dict[str, float]
    top_k: int
    as_of: datetime
    time_column: str
    max_missing_share: float
    ranges: dict[str, TimeRange]
    store: OfflineStore
    batch_size: int
    reference: AsOfFeatures | None = None  # fp32 tower rows when the job's tables are int8


def score_shard(job: Job, shard: int, rank: int, bar: tqdm) -> dict:
    """Score shard ``shard`` and write its top K (temporary name, then renamed); its counts."""
    src = job.source
    frame, duplicates = clean(read_shard(job.output, shard, src.ids), src.group)
    counts: dict[str, int] = {}
    preds: list[pl.DataFrame] = []
    change: dict[str, float] = {}
    for start in range(0, frame.height, CHUNK):
        chunk = frame.slice(start, CHUNK)
        x, c = job.feats.gather(chunk)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        _check_missing(job, shard, counts, start + chunk.height)
        preds.append(predict_from_tower(job.model.bundle.model, x, job.tasks, job.batch_size))
        if job.reference is not None and start == 0:  # int8 against fp32 on the first chunk
            x32 = job.reference.gather(chunk)[0]
            fp32 = predict_from_tower(job.model.bundle.model, x32, job.tasks, job.batch_size)
            change = prediction_change(fp32, preds[-1])
        bar.update(chunk.height)
    keys = src.ids
    if preds:
        scored = pl.concat([frame.select(keys), pl.concat(preds)], how="horizontal")
    else:  # an empty shard (no group hashed to it): an empty part, same columns
        from recsys_moe.model.objectives import output_name

        names = [output_name(t) for t in job.tasks]
        scored = frame.select(keys).with_columns(pl.lit(None, pl.Float64).alias(n) for n in names)
    pred_cols = [c for c in scored.columns if c not in keys]
    scored = scored.with_columns(
        pl.lit(job.as_of).cast(pl.Datetime("us")).alias(job.time_column),
        score=combined_score(job.tasks, job.weights),
    ).select(*keys, job.time_column, *pred_cols, "score")
    check_finite(scored, [*pred_cols, "score"], keys, src.path)
    group = src.group
    sizes = scored.group_by(group).len()
    ranked = (
        scored.sort([group, "score", "item_id"], descending=[False, True, False])
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over(group).cast(pl.Int32))
        .filter(pl.col("rank") <= job.top_k)
    )
    stats = {
        **({"prediction_change": change} if job.reference is not None and preds else {}),
        "shard": shard,
        "file": part_name(shard),
        "rank": rank,
        "candidates": frame.height,
        "rows": ranked.height,
        "groups": sizes.height,
        "duplicates_dropped": duplicates,
        "short_requests": int((sizes["len"] < job.top_k).sum()),
        **counts,
    }
    final = job.output / part_name(shard)
    tmp = job.output / f".{final.name}.tmp-{os.getpid()}"
    write_text_atomic(job.output / SHARDS / f"{final.name}.json", json.dumps(stats))
    ranked.write_parquet(tmp)
    os.replace(tmp, final)  # the part appears whole, after its counts
    return stats


def _check_missing(job: Job, shard: int, counts: dict[str, int], seen: int) -> None:
    check_missing_share(
        counts, seen, max_share=job.max_missing_share, as_of=job.as_of, ranges=job.ranges,
        store=job.store, candidates=str(job.source.path), scope=f" in shard {shard}",
        consequence="Nothing written for this shard",
    )  # fmt: skip


# ---- the job -------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (torchrun's environment; 0 and 1 alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def score(
    *,
    model_uri: str,
    candidates: str | Path,
    output: str | Path,
    top_k: int,
    cfg: Config,
    as_of: datetime | None = None,
    store_dir: str | Path | None = None,
    overwrite: bool = False,
    quantize: Quantize = "none",
    device: str = "auto",
) -> dict:
    """Score ``candidates`` with the registry model ``model_uri``; write the top ``top_k`` per
    request (or user) into ``output``. Under torchrun each rank does its share; rank 0 writes the
    manifest and returns it (the other ranks return their shards' counts).

    Refused before anything is read when ``output`` would replace or delete an input, and before
    anything is written when the candidates are empty, the as-of precedes the store's features,
    or ``output`` holds another run's scores."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize!r}: expected one of {QUANTIZE}")
    rank, world = rank_and_world()
    dev = scoring_device(device)
    store_path = Path(store_dir or cfg.store_dir)
    candidates, output = Path(candidates), Path(output)
    check_output(
        output, what="--output",
        inputs=cfg.protected_paths() | {"candidates": candidates, "store": store_path},
        roots={"workdir": Path(cfg.workdir), "current folder": Path.cwd()},
    )  # fmt: skip
    source = CandidateSource(candidates)
    if source.rows == 0:
        raise DataError(
            f"candidates {candidates}: no rows; nothing to score (previous output kept)"
        )
    ref = resolve_model(cfg, model_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{ref.name}/{ref.version}")
    model = pyfunc.unwrap_python_model()
    bundle = model.bundle
    features = bundle.features
    store = OfflineStore(store_path)
    as_of_given = as_of is not None
    as_of, ranges = scoring_time(as_of, store, features)
    time_col = features.events.time
    if time_col in pl.scan_parquet(source.files[0]).collect_schema():
        log.warning(
            "candidates %s: column %r is not used; every candidate is scored as of %s",
            candidates, time_col, as_of.isoformat(),
        )  # fmt: skip
    shards = shard_count(source.rows, cfg.score.shard_rows)
    identity = run_identity(ref, features, as_of, store_path, source.identity(), top_k, cfg) | {
        "shards": shards,
        "quantize": quantize,
        "device": dev.type,
    }
    bundle.model.to(dev)  # tower rows, gathers and forwards run there
    scoring_model = quantize_embeddings(bundle.model) if quantize == "int8" else bundle.model
    feats = AsOfFeatures(store, features, bundle.mappings, as_of, scoring_model)
    open_output(output, identity, rank=rank, overwrite=overwrite)  # the first write
    job = Job(
        source=source, output=output, model=model, feats=feats, tasks=bundle.config.tasks,
        weights=cfg.score.weights, top_k=top_k, as_of=as_of, time_column=features.events.time,
        max_missing_share=cfg.score.max_missing_share, ranges=ranges, store=store,
        batch_size=BATCH,
        reference=None if quantize == "none"
        else AsOfFeatures(store, features, bundle.mappings, as_of, bundle.model),
    )  # fmt: skip
    mine = [s for s in range(shards) if s % world == rank]
    todo = [s for s in mine if not (output / part_name(s)).is_file()]
    if any(not (output / part_name(s)).is_file() for s in range(shards)):
        _partition(source, shards, output, rank, world)
    done: list[dict] = []
    rows = sum(spilled_rows(output, s) for s in todo)
    desc = f"scoring (rank {rank}/{world})" if world > 1 else "scoring"
    with progress.bar(rows, desc=desc, unit="pair") as pairs:
        for s in todo:
            for tmp in output.glob(f".{part_name(s)}.tmp-*"):  # a killed attempt's leftover
                tmp.unlink(missing_ok=True)
            done.append(score_shard(job, s, rank, pairs))
    if rank != 0:
        return {"rank": rank, "shards": done}
    wait_for(lambda: all((output / part_name(s)).is_file() for s in range(shards)),
          f"every shard in {output}")  # fmt: skip
    manifest = _manifest(job, ref, identity, shards, as_of_given)
    write_text_atomic(output / MANIFEST, json.dumps(manifest, indent=2))
    shutil.rmtree(output / SPILL, ignore_errors=True)
    return manifest | {"output": str(output)}


def spilled_rows(output: Path, shard: int) -> int:
    """The rows of a shard's spill files (the progress bar's total), from their footers."""
    import pyarrow.parquet as pq

    files = (output / SPILL / f"s-{shard:05d}").glob("u-*.parquet")
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _partition(source: CandidateSource, shards: int, output: Path, rank: int, world: int) -> None:
    """Phase 1: this rank's row groups into the spill folder; then wait for every rank's."""
    units = [u for u in range(len(source.units)) if u % world == rank]
    with progress.bar(len(units), desc="partitioning", unit="row group") as groups:
        for u in units:
            if not unit_done(output, u).is_file():
                partition_unit(source, u, shards, output)
            groups.update(1)
    # every unit partitioned (or the job already finished: rank 0 removes the spill after the
    # manifest, which a slow rank must not wait for)
    n = len(source.units)
    wait_for(
        lambda: (
            all(unit_done(output, u).is_file() for u in range(n)) or (output / MANIFEST).is_file()
        ),
        f"the other ranks' partitions in {output / SPILL}",
    )


def _manifest(job: Job, ref: ModelRef, identity: dict, shards: int, as_of_given: bool) -> dict:
    out = job.output
    per_shard = [json.loads((out / SHARDS / f"{part_name(s)}.json").read_text())
                 for s in range(shards)]  # fmt: skip
    for st in per_shard:
        st["sha256"] = sha256(out / st["file"])
    null_ids = 0
    units = sorted((out / SPILL / "units").glob("u-*.json"))
    if units:
        null_ids = sum(json.loads(u.read_text())["null_id"] for u in units)
    else:  # a rerun over a complete output: the spill is gone, the previous manifest has it
        prev = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
        null_ids = prev.get("null_ids_dropped", 0)
    keys = [k for k in per_shard[0]
            if k not in ("shard", "file", "rank", "sha256", "prediction_change")]  # fmt: skip
    totals = {k: sum(st.get(k, 0) for st in per_shard) for k in keys}
    scored = totals["candidates"]
    if scored == 0:
        raise DataError(
            f"candidates {job.source.path}: all {job.source.rows} rows have a null id "
            f"({', '.join(job.source.ids)}); nothing to score"
        )
    counts = count_fields(
        totals, input_rows=job.source.rows, null_ids=null_ids, entities=list(job.ranges),
        max_share=job.max_missing_share, group=job.source.group, top_k=job.top_k,
    )  # fmt: skip
    return {
        **model_fields(ref, identity, as_of_given),
        "candidates": str(job.source.path.resolve()),
        **counts,
        "shard_key": f"splitmix64({job.source.group}) mod {shards}",
        "quantize": identity["quantize"],
        **({"prediction_change": _worst_change(per_shard)} if job.reference is not None else {}),
        "shards": per_shard,
        "files": [st["file"] for st in per_shard],
    }


def run_identity(
    ref: ModelRef,
    features: FeatureSet,
    as_of: datetime,
    store: Path,
    candidates: dict,
    top_k: int,
    cfg: Config,
) -> dict:
    """What an output is (``_run.json``; the scoring job's and the Spark job's): model version
    and run, feature fingerprint, as-of, store, ``candidates`` (what identifies them), K,
    weights. A rerun with another identity is refused (``serving.output.same_run``)."""
    return {
        "model_name": ref.name,
        "model_version": ref.version,
        "model_run_id": ref.run_id,
        "features_fingerprint": features.fingerprint(),
        "as_of": as_of.isoformat(),
        "store": str(store.resolve()),
        "candidates": candidates,
        "top_k": top_k,
        "weights": dict(sorted(cfg.score.weights.items())),
    }


def model_fields(ref: ModelRef, identity: dict, as_of_given: bool) -> dict:
    """The manifest's model, features and as-of keys (the scoring job's and the Spark job's)."""
    return {
        "model_uri": ref.uri,
        "model_name": ref.name,
        "model_version": ref.version,
        "model_run_id": ref.run_id,
        "features_fingerprint": identity["features_fingerprint"],
        "as_of": identity["as_of"],
        "as_of_from": "--as-of" if as_of_given else "the store's latest feature time",
        "store": identity["store"],
    }


def count_fields(
    totals: dict[str, int],
    *,
    input_rows: int,
    null_ids: int,
    entities: list[str],
    max_share: float,
    group: str,
    top_k: int,
) -> dict:
    """The manifest's counts (the scoring job's and the Spark job's) from ``totals``:
    ``candidates`` (scored, after dropping null ids and duplicates), ``duplicates_dropped``,
    ``AsOfFeatures.gather``'s counts, ``short_requests``, ``groups`` and ``rows`` (written)."""
    scored = totals["candidates"]
    coverage = {
        e: round(1 - (totals.get(f"unknown_{e}s", 0) + totals.get(f"expired_{e}_features", 0))
                 / scored, 6)
        for e in entities
    }  # fmt: skip
    return {
        "candidate_input_rows": input_rows,
        "candidate_rows": scored,
        "null_ids_dropped": null_ids,
        "duplicates_dropped": totals["duplicates_dropped"],
        "dropped": {"null_id": null_ids, "duplicate": totals["duplicates_dropped"]},
        **{k: v for k, v in totals.items() if k.startswith(("unknown_", "expired_", "missing_"))},
        "missing_features_share": round(totals.get("missing_features", 0) / scored, 6),
        "max_missing_share": max_share,
        "coverage": coverage,
        "short_requests": totals["short_requests"],
        "group_by": group,
        "groups": totals["groups"],
        "top_k": top_k,
        "rows": totals["rows"],
    }


def _worst_change(per_shard: list[dict]) -> dict[str, float]:
    """Over the shards' first chunks: rows compared, the largest mean and max changes."""
    changes = [st["prediction_change"] for st in per_shard if st.get("prediction_change")]
    if not changes:
        return {}
    keys = [k for k in changes[0] if k != "rows"]
    return {"rows": sum(c["rows"] for c in changes)} | {k: max(c[k] for c in changes) for k in keys}
