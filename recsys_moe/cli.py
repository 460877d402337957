"""``recsys-moe``: the batch jobs of the system, one subcommand each, and the demo that chains them.

    recsys-moe demo [--workdir DIR]
    recsys-moe data synth [--config FILE] [--out DIR] [--users N --items N --days N --seed S]
    recsys-moe data import {census,movielens,kuairand} --src DIR --out DIR
    recsys-moe features build --config FILE [--set key=value ...]
    recsys-moe train --config FILE [--set key=value ...]
    recsys-moe sweep --config FILE --grid key=v1,v2 [--grid ...] [--set key=value ...]
    recsys-moe evaluate --config FILE [--run-id ID] [--split test] [--output FILE]
                        [--predictions FILE]
    recsys-moe register --config FILE [--run-id ID]
    recsys-moe promote --config FILE --model NAME --version V [--alias champion]
    recsys-moe score --config FILE --model models:/NAME@ALIAS --candidates PATH --output DIR
                     [--top-k K] [--as-of ISO-TIME] [--overwrite]

Every job takes ``--config`` (default: the embedded ``configs/demo.toml``), ``--set key=value``
overrides and ``--workdir``. Bad input ends with ``error: ...`` on stderr and exit status 2.
Under torchrun, each rank runs this module: ``torchrun --nproc-per-node 2 -m recsys_moe.cli
train ...``. The top floor: nothing imports this module, and it is the only one below
``serving/`` that imports ``serving`` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, fields, replace
from datetime import datetime
from pathlib import Path

from pipelines.atomic import check_output
from pipelines.synth import SynthParams
from recsys_moe.config import Config, load_config

SYNTH_FLAGS = tuple(f.name for f in fields(SynthParams))


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set, workdir=args.workdir)


# ---- jobs: each parses its arguments, calls the plain function and prints what it did --------
def cmd_synth(args: argparse.Namespace) -> None:
    cfg = _config(args)
    flags = {k: getattr(args, k) for k in SYNTH_FLAGS if getattr(args, k) is not None}
    out = args.out or cfg.store_dir
    synth_data(
        cfg,
        out,
        replace(cfg.synth, **flags),
        test_days=cfg.data.test_days if args.test_days is None else args.test_days,
    )


def synth_data(cfg: Config, out: Path, params: SynthParams, *, test_days: int) -> dict:
    """The synthetic data set into ``out``: a store, so it may replace the config's store but no
    other input (the training set, the MLflow store, ...) nor the workdir itself."""
    from pipelines.synth import synthesize

    protected = {k: v for k, v in cfg.protected_paths().items() if k != "store"}
    check_output(out, what="data synth --out", inputs=protected,
                 roots={"workdir": Path(cfg.workdir), "current folder": Path.cwd()})  # fmt: skip
    meta = synthesize(out, test_days=test_days, **asdict(params))
    print(synth_summary(out, meta))
    return meta


def synth_summary(out: Path, meta: dict) -> str:
    """What ``data synth`` wrote, in words."""
    p, r = meta["params"], meta["rows"]
    return (
        f"wrote {out}: {p['users']:,} users ({r['users']:,} attribute rows), {p['items']:,} items "
        f"({r['items']:,} rows), {r['impressions']:,} impressions in {r['requests']:,} requests "
        f"over {p['days']} days (click rate {meta['click_rate']:.3f}), {r['candidates']:,} "
        f"candidates in {r['candidate_requests']:,} requests; seed {p['seed']}, task conflict "
        f"{p['task_conflict']:g}; Bayes-optimal click AUC {meta['bayes_optimal_click_auc']:.4f} "
        f"on the last {meta['test_days']} day(s)"
    )


def cmd_import(args: argparse.Namespace) -> None:
    from pipelines.importers import import_dataset

    src = args.src
    check_output(args.out, what="data import --out", inputs={"source": Path(src)},
                 roots={"current folder": Path.cwd()})  # fmt: skip
    meta = import_dataset(args.name, src=src, out=args.out)
    rows = ", ".join(f"{n:,} {table} rows" for table, n in meta.get("rows", {}).items())
    print(f"imported {args.name} from {src} into {args.out}: {rows}")


def build(cfg: Config) -> dict:
    from recsys_moe.dataset import build_dataset

    manifest = build_dataset(cfg)
    rows = ", ".join(f"{n:,} {split}" for split, n in manifest["rows"].items())
    print(f"wrote training set {cfg.dataset_dir}: {rows} rows")
    return manifest


def run_train(cfg: Config):  # noqa: ANN201  (TrainResult: torch is imported only when training)
    from recsys_moe.training.train import train

    result = train(cfg)
    if result.model is not None:  # rank 0 (the only rank without torchrun)
        valid = " ".join(f"{k}={v:.4f}" for k, v in result.valid.items())
        print(f"trained run {result.run_id}: {result.samples_per_s:,.0f} samples/s "
              f"({result.samples_per_s_steady:,.0f} after warm-up); valid {valid}")  # fmt: skip
        print(f"model bundle: {result.model_dir}")
    return result


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.resume is not None:
        cfg.train.resume = args.resume
    run_train(cfg)


def run_evaluate(
    cfg: Config,
    run_id: str | None,
    split: str,
    output: Path | None,
    predictions: Path | None = None,
) -> dict:
    from recsys_moe.evaluation.evaluate import evaluate
    from recsys_moe.training.sweep import dataset_note, picked_note

    report = evaluate(cfg, run_id=run_id, split=split, output=output, predictions=predictions)
    picked = "" if run_id else picked_note(cfg, report["run_id"])
    warning = dataset_note(cfg, report["run_id"])
    if warning:
        print(warning, file=sys.stderr)
    print(f"evaluated run {report['run_id']}{picked} on {split} ({report['rows']} rows)")
    logged = "test" if split == "test" else f"eval_{split}"  # the keys evaluate logs them as
    for k, v in report["metrics"].items():
        if not k.endswith(("_groups", "_skipped", "requests")):
            ci = report["ci"].get(k)
            shown = f"   [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            print(f"  {logged}/{k:<32} {v:.4f}{shown}")
    print(f"wrote {report['output']} and {report['report']}")
    print(f"logged as evaluation run {report['evaluation_run_id']} (a child of the training run)")
    if report["predictions"]:
        print(f"wrote {report['predictions']} (one row per evaluated event)")
    return report


def run_register(cfg: Config, run_id: str | None):  # noqa: ANN201  (registry.Registered)
    from recsys_moe.registry import register
    from recsys_moe.training.sweep import picked_note
    from serving.pyfunc import CODE_PATH

    reg = register(cfg, python_model=CODE_PATH, run_id=run_id)
    picked = "" if run_id else picked_note(cfg, reg.run_id)
    print(f"registered {reg.name} version {reg.version} (run {reg.run_id}{picked}) as @{reg.alias}")
    return reg


def run_score(
    cfg: Config,
    model: str,
    candidates: Path,
    output: Path,
    *,
    top_k: int | None = None,
    as_of: str | None = None,
    store: Path | None = None,
    overwrite: bool = False,
    quantize: str = "none",
    device: str = "auto",
) -> dict:
    from serving.score import score

    manifest = score(
        model_uri=model,
        candidates=candidates,
        output=output,
        top_k=cfg.score.top_k if top_k is None else top_k,
        cfg=cfg,
        as_of=datetime.fromisoformat(as_of) if as_of else None,
        store_dir=store,
        overwrite=overwrite,
        quantize=quantize,  # type: ignore[arg-type]  (one of argparse's choices)
        device=device,
    )
    if "output" not in manifest:  # a rank other than 0 under torchrun: rank 0 reports the job
        print(f"rank {manifest['rank']}: scored {len(manifest['shards'])} shard(s)")
        return manifest
    print(
        f"scored {manifest['candidate_rows']} candidates with {manifest['model_uri']} "
        f"(version {manifest['model_version']}): top {manifest['top_k']} of "
        f"{manifest['groups']} {manifest['group_by']}s → {manifest['output']}"
    )
    counts = ", ".join(f"{k} {manifest[k]}" for k in manifest if k.startswith(("unknown_",
                       "expired_")) or k in ("duplicates_dropped", "short_requests"))  # fmt: skip
    print(f"  as of {manifest['as_of']} ({manifest['as_of_from']}); {counts}")
    if "prediction_change" in manifest:
        change = ", ".join(f"{k} {v:.3g}" for k, v in manifest["prediction_change"].items())
        print(f"  int8 tables against fp32 (first chunk of each shard): {change}")
    return manifest


def cmd_build(args: argparse.Namespace) -> None:
    build(_config(args))


def cmd_evaluate(args: argparse.Namespace) -> None:
    output = Path(args.output) if args.output else None
    predictions = Path(args.predictions) if args.predictions else None
    run_evaluate(_config(args), args.run_id, args.split, output, predictions)


def cmd_register(args: argparse.Namespace) -> None:
    run_register(_config(args), args.run_id)


def cmd_promote(args: argparse.Namespace) -> None:
    from recsys_moe.registry import promote

    p = promote(_config(args), name=args.model, version=args.version, alias=args.alias)
    before = f" (was version {p.previous})" if p.previous else " (no holder before)"
    print(f"{p.name} version {p.version} is now @{p.alias}{before}")
    for key, (a, b) in p.compared.items():
        print(f"  test/{key:<24} {a:.4f}   @{p.alias} before: {b:.4f}")


def cmd_score(args: argparse.Namespace) -> None:
    run_score(_config(args), args.model, args.candidates, args.output, top_k=args.top_k,
              as_of=args.as_of, store=args.store, overwrite=args.overwrite,
              quantize=args.quantize, device=args.device)  # fmt: skip


def cmd_sweep(args: argparse.Namespace) -> None:
    from recsys_moe.training.sweep import sweep

    result = sweep(args.config, args.grid, args.set, workdir=args.workdir, match=args.match_compute)
    print(f"sweep {result.parent_run_id} ({len(result.rows)} runs; validation and test metrics "
          "of each run's selected checkpoint; artifacts sweep.md/csv/json):")  # fmt: skip
    print(result.table)


def cmd_demo(args: argparse.Namespace) -> None:
    """Every job on the embedded synthetic data, in ``--workdir`` (default ./demo-run)."""
    cfg = _config(args)
    t0 = time.perf_counter()
    store = cfg.store_dir
    print(f"== 1/6 synthetic data → {store}")
    meta = synth_data(cfg, store, cfg.synth, test_days=cfg.data.test_days)
    print("== 2/6 training set (point-in-time features, split by time)")
    build(cfg)
    print("== 3/6 train")
    result = run_train(cfg)
    print("== 4/6 evaluate (test split)")
    ev = run_evaluate(cfg, result.run_id, "test", None)
    print("== 5/6 register")
    reg = run_register(cfg, result.run_id)
    print("== 6/6 score candidates")
    sc = run_score(cfg, reg.uri, store / "candidates.parquet", cfg.path("scores"),
                   as_of=meta["scoring_time"], overwrite=True)  # fmt: skip
    m = ev["metrics"]
    print("\n== summary")
    print(f"  click AUC (test)       {m['click_auc']:.4f}   Bayes-optimal {meta_auc(m, meta):.4f}")
    print(f"  click logloss          {m['click_logloss']:.4f}")
    watch = next((t for t in cfg.tasks if t.name == "watch_time"), None)
    rows = f" (rows where {watch.mask} = 1)" if watch is not None and watch.mask else ""
    bayes = m.get("bayes_optimal_watch_time_rmse")
    print(
        f"  watch time RMSE (s)    {m['watch_time_rmse']:.2f}    "
        + (f"Bayes-optimal {bayes:.2f}   " if bayes is not None else "")
        + f"predicting the train mean {m['watch_time_rmse_mean_predictor']:.2f}{rows}"
    )
    print(f"  watch time RMSE (log)  {m['watch_time_rmse_log']:.4f}")
    print(f"  MLflow run             {result.run_id}")
    print(f"  registered model       {reg.name} version {reg.version} @{reg.alias}")
    print(f"  scores                 {sc['output']} ({sc['rows']} rows)")
    print(f"  took                   {time.perf_counter() - t0:.0f} s")
    from recsys_moe.tracking import client_for, ui_link

    experiment = client_for(cfg).get_run(result.run_id).info.experiment_id
    print("\nOpen the MLflow UI on this store:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {cfg.tracking_uri()} --port 5000")
    print("then the experiment's runs and the run's charts (MLflow opens on its GenAI view):")
    print(f"  {ui_link(experiment)}\n  {ui_link(experiment, result.run_id)}")


def meta_auc(metrics: dict, meta: dict) -> float:
    """The Bayes-optimal AUC on the evaluated rows, else the data set's own figure."""
    return metrics.get("bayes_optimal_click_auc", meta["bayes_optimal_click_auc"])


# ---- parser ----------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config TOML (default: the embedded configs/demo.toml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )  # fmt: skip
    p.add_argument("--workdir", help="override the config's workdir (relative paths resolve here)")
    _output_flags(p, default=argparse.SUPPRESS)


def _output_flags(p: argparse.ArgumentParser, default: object = False) -> None:
    """-v and -q, accepted before and after the subcommand (``SUPPRESS`` on the subcommands:
    a flag given before it is not reset by the subcommand's default)."""
    p.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="also print the project's own debug lines (not the libraries' notices)",
    )  # fmt: skip
    p.add_argument(
        "-q", "--quiet", action="store_true", default=default,
        help="no progress bars (they show only when stderr is a terminal anyway)",
    )  # fmt: skip


# Each subcommand's --help ends with examples and where its output goes.
EXAMPLES = {
    "demo": """examples:
  recsys-moe demo                              # in ./demo-run
  recsys-moe demo --workdir /tmp/demo -q       # elsewhere, no progress bars

writes (under --workdir): data/ (synthetic store), dataset/ (training set), mlflow.db and
mlartifacts/ (MLflow runs and registry), models/RUN_ID/ (bundles), eval/, scores/""",
    "data synth": """examples:
  recsys-moe data synth --config configs/demo.toml        # the demo's data, in demo-run/data
  recsys-moe data synth --users 4000 --seed 1 --out /tmp/small

writes: --out (default: the config's data.store, WORKDIR/data): users.parquet, items.parquet,
impressions.parquet, candidates.parquet, oracle.parquet, meta.json; replaced as a whole""",
    "data import": """examples:
  recsys-moe data import census --src DOWNLOADS/census-income --out census-run/data
  recsys-moe data import movielens --src DOWNLOADS/ml-latest-small --out movielens-run/data

writes: --out, the store layout (entity tables, events, meta.json with source and licence);
the README's "Real data" section says which files each importer reads and where to get them""",
    "features build": """examples:
  recsys-moe features build --config configs/demo.toml
  recsys-moe features build --config configs/movielens.toml --set data.valid_days=7

writes: the config's data.dataset (WORKDIR/dataset): train/valid/test.parquet, mapped/,
mappings/, manifest.json (rows, coverage, feature fingerprint)""",
    "train": """examples:
  recsys-moe train --config configs/demo.toml --set train.epochs=5
  recsys-moe train --set model.mixture=shared_bottom -v
  torchrun --standalone --nproc-per-node 2 -m recsys_moe.cli train --config configs/demo.toml

writes: an MLflow run in WORKDIR/mlflow.db (losses, validation metrics, gates/, plots/, the
bundle as artifact model/), the bundle in WORKDIR/models/RUN_ID/; prints the run id""",
    "sweep": """examples:
  recsys-moe sweep --grid model.mixture=mmoe,shared_bottom --grid train.seed=0,1 \\
      --set train.epochs=3 --match-compute

  recsys-moe sweep --config configs/census.toml --grid data.split_seed=0,1,2 \\
      --grid train.seed=0,1 --grid train.weight_decay=0,1e-4

writes: a parent MLflow run (artifacts sweep.md, sweep.csv, sweep.json) with one child training
run per setting; a grid over data.* or synth.* builds a training set per data setting under
WORKDIR/sweeps/; prints each run's validation and test metrics of its selected checkpoint and
their mean ± sd over the seeds in the grid (train.seed, data.split_seed, synth.seed)""",
    "evaluate": """examples:
  recsys-moe evaluate --config configs/demo.toml               # the latest training run, test
  recsys-moe evaluate --run-id RUN_ID --split valid --output report.json

writes: metrics on the run, WORKDIR/eval/RUN-SPLIT.json and the report beside it""",
    "register": """examples:
  recsys-moe register --config configs/demo.toml               # the latest evaluated run

writes: a version of the registered model (mlflow.registered_model), alias champion for the
first, challenger after; prints the name, version and alias""",
    "promote": """examples:
  recsys-moe promote --model recsys-moe-demo --version 2

writes: the alias (default champion) moved to --version, or an error naming the worse task""",
    "score": """examples:
  recsys-moe score --model models:/recsys-moe-demo@champion \\
      --candidates demo-run/data/candidates.parquet --output demo-run/scores --top-k 10

writes: --output: part-*.parquet (top K per request or user), _manifest.json (counts, model)""",
}


def _with_examples(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for path, text in EXAMPLES.items():
        p = parser
        for name in path.split():
            sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
            p = sub.choices[name]
        p.epilog, p.formatter_class = text, argparse.RawDescriptionHelpFormatter
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-moe", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"recsys-moe {_version()}")
    _output_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run every job on synthetic data in --workdir")
    _common(p)
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser(
        "synth", help="write the synthetic data set (users, items, impressions)",
        description="Write the synthetic data set. Settings come from the config's [synth] "
        "section (default: the embedded demo config, so this reproduces the demo's data); a flag "
        "overrides one of them.",
    )  # fmt: skip
    _common(p)
    p.add_argument("--out", type=Path, help="output folder, replaced if present (default: "
                   "the config's data.store)")  # fmt: skip
    p.add_argument("--users", type=int, help="number of users")
    p.add_argument("--items", type=int, help="number of items")
    p.add_argument("--days", type=int, help="days of impressions")
    p.add_argument("--seed", type=int, help="random seed (same seed, same data)")
    p.add_argument("--test-days", type=int, help="days the Bayes AUC is reported on "
                   "(default: the config's data.test_days)")  # fmt: skip
    p.add_argument("--requests-per-user-day", type=float, help="mean requests")
    p.add_argument("--items-per-request", type=int, help="impressions per request")
    p.add_argument(
        "--task-conflict", type=float,
        help="0..1: share of watch time's segment x category affinity that click does not share",
    )  # fmt: skip
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("import", help="import a real public data sample into the store layout")
    p.add_argument("name", choices=["census", "movielens", "kuairand"], help="which data set")
    p.add_argument(
        "--src", type=Path, required=True,
        help="folder holding the downloaded sample's files (README, \"Real data\": which files, "
        "from where)",
    )  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output store folder")
    _output_flags(p, default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_import)

    feats = sub.add_parser("features", help="feature store jobs")
    fsub = feats.add_subparsers(dest="features_cmd", required=True)
    p = fsub.add_parser("build", help="build the training set (point-in-time joins, time split)")
    _common(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="train the multi-task model, tracked in MLflow")
    _common(p)
    p.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="PATH",
        help="continue from the newest checkpoint (train.checkpoint.every > 0), or from PATH "
        "(a run's checkpoint folder or a ckpt-<step> folder); sets train.resume",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="train every combination of a grid, child runs of one run")
    _common(p)
    p.add_argument(
        "--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
        help="values to sweep, e.g. --grid model.mixture=mmoe,shared_bottom (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--match-compute", action="store_true",
        help="rescale each setting's expert (or bottom) widths to the base config's FLOPs/example",
    )  # fmt: skip
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evaluate", help="offline metrics of a training run on a split")
    _common(p)
    p.add_argument("--run-id", help="MLflow run id (default: the latest finished training run)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split")
    p.add_argument("--output", help="JSON report path (default: WORKDIR/eval/RUN-SPLIT.json); "
                   "the Markdown report and plots go to a folder beside it")  # fmt: skip
    p.add_argument(
        "--predictions", help="also write each evaluated row (keys, labels, every task's "
        "prediction, score, segments) as Parquet here",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register a run's model as an MLflow pyfunc version")
    _common(p)
    p.add_argument("--run-id", help="MLflow run id (default: the latest finished training run)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "promote", help="move an alias (champion) to a version that passes every task's gate",
        description="Give --alias to --version only if, for every task, its test metric "
        "tasks.<name>.gate is no worse than the alias holder's (within gate_tolerance), both "
        "evaluated on the same data; otherwise say which task failed and keep the alias.",
    )  # fmt: skip
    _common(p)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--version", required=True, help="the version to promote")
    p.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("score", help="score candidates with a registered model, keep the top K")
    _common(p)
    p.add_argument(
        "--model", required=True, help="registry URI, models:/NAME@ALIAS or models:/NAME/VERSION"
    )
    p.add_argument(
        "--candidates", required=True, type=Path,
        help="Parquet file or folder of them: user_id, item_id[, request_id]",
    )  # fmt: skip
    p.add_argument(
        "--output", required=True, type=Path,
        help="output folder: one part per shard, _manifest.json last; a rerun of the same run "
        "resumes, another run's output is refused",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --output that holds another run's scores")  # fmt: skip
    p.add_argument(
        "--quantize", choices=["none", "int8"], default="none",
        help="int8: score with int8 embedding tables (TorchRec's quantized EBC); the change "
        "against fp32 goes to the manifest",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where the model runs (auto: this rank's GPU where CUDA is available, else the CPU)",
    )  # fmt: skip
    p.add_argument("--top-k", type=int, help="rows kept per request/user (default: score.top_k)")
    p.add_argument("--as-of", help="scoring time, ISO (default: the store's latest feature time)")
    p.add_argument("--store", type=Path, help="offline store root (default: the config's)")
    p.set_defaults(func=cmd_score)
    return _with_examples(parser)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler, torchrun stopping the other ranks) ends the job like an error: the
    ``finally`` blocks run, so the MLflow run is ended FAILED and temporary outputs removed."""
    raise SystemExit(128 + signum)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recsys-moe")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


PROJECT_LOGGERS = ("recsys_moe", "pipelines", "feature_store", "serving")


def quiet_libraries(verbose: bool) -> None:
    """Warnings and errors from the libraries; their notices a user cannot act on stay hidden
    (MLflow's database set-up lines, torch's ``is_fx_tracing`` warning at every TorchRec trace,
    fbgemm's loaded-library lines, TorchRec's planner tables). ``-v`` adds the project's own
    debug lines only."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    quiet_libraries(getattr(args, "verbose", False))
    if getattr(args, "quiet", False):
        from pipelines import progress

        progress.set_mode("never")
    try:
        args.func(args)
    except ValueError as e:  # user errors (DataError is one): say what to do, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MLflow's "not found" for a run id, model, version or alias named
        message = _mlflow_user_error(e, args)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def _mlflow_user_error(e: Exception, args: argparse.Namespace) -> str | None:
    if "mlflow" not in sys.modules:
        return None
    from recsys_moe.tracking import user_error

    try:
        uri = _config(args).tracking_uri() if hasattr(args, "set") else None
    except ValueError:
        uri = None
    return user_error(e, uri)


if __name__ == "__main__":
    sys.exit(main())
