"""Sweeps: every combination of a grid of config values, each a child run of one MLflow run.

    recsys-moe sweep --config configs/demo.toml --grid model.mixture=mmoe,shared_bottom \\
        --grid model.num_experts=4,8 --grid train.seed=0,1,2 [--set train.epochs=2 ...]

A grid value is parsed like a ``--set`` value (TOML, else a bare string); commas inside
brackets or quotes belong to the value (``--grid "model.expert_dims=[64, 32],[128, 64]"``).
The parent run (named after the grid, described with it) holds the grid and, at the end, the
results: ``sweep.md`` (the table), ``sweep.csv`` (one row per run) and ``sweep.json`` (runs,
mean ± sd per setting, the data sets, which split each number is from); a progress bar on stderr
counts the runs.

Each run's numbers are those of its **selected checkpoint** (``train.select``: the best
validation epoch by default, the ``epoch`` column): ``valid/<metric>`` on the validation split
(as training scored it) and ``test/<metric>`` on the test split, the selected model predicting
the mapped test rows with the metrics of validation (``split_metrics``); both are also logged to
the child run as ``selected.valid.<metric>`` and ``selected.test.<metric>`` (no ``/``: MLflow's
run page puts such keys after the ``train/`` and ``valid/`` sections, so the loss curves stay
first). Per task: AUC and log loss
(binary), RMSE, and RMSE on the log scale for ``log1p`` tasks (regression).

Seeds: a grid over ``train.seed``, ``data.split_seed`` (a random split) or ``synth.seed`` (the
synthetic data) adds a table of each other setting's mean ± sample sd over all its seeds. A grid
over any ``data.`` or ``synth.`` key (except ``data.dataset``) builds one training set per data
setting (``dataset-<i>``; for ``synth.`` keys first a synthetic store per setting of those,
``store-<j>``) under ``WORKDIR/sweeps/<id>/``, kept there: the runs were trained on them (their
``recsys_moe.dataset`` tag), and evaluating such a run needs ``--set data.dataset=<that folder>``
(``recsys-moe evaluate`` warns otherwise).

Matched compute (``--match-compute``): every setting's widths are rescaled
(``recsys_moe.model.match_compute``: expert widths, or the bottom's for shared_bottom /
single_task, by one factor) to the dense FLOPs per example of the base config (the config with
``--set`` values, before the grid), so that e.g. ``--grid model.mixture=mmoe,shared_bottom``
compares the two at one compute budget. The widths used are a column of the table and the runs'
params.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import secrets
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipelines import progress
from pipelines.synth import synthesize
from pipelines.training_set import load_manifest
from recsys_moe.config import Config, TaskConfig, label_columns, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.model import match_compute, model_cost
from recsys_moe.tracking import (
    NOTE_TAG,
    TRAIN_JOB_TAG,
    client_for,
    ensure_experiment,
    run_owner_tags,
)
from recsys_moe.training.selection import selection_score
from recsys_moe.training.train import TrainResult, train

SEEDS = ("train.seed", "data.split_seed", "synth.seed")  # grids over these: mean ± sd
BEST_TAG = "recsys_moe.sweep.best_run"  # the child with the best validation selection score
SCORE = "valid/selection_score"
SPLITS_NOTE = (
    "valid/...: the validation split, test/...: the test split, each run's own training set; "
    "all of each run's selected checkpoint (train.select; the epoch column)"
)


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, str | float]]
    table: str
    summary: list[dict[str, str | float]]  # per setting: mean and sd over its seeds
    best_run_id: str  # the best validation selection score ("" without runs)


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", ...]`` → ``[("a.b", ["1", "2"]), ...]``, splitting on top-level commas."""
    axes = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid {item!r}: expected key=v1,v2,... e.g. model.num_experts=4,8")
        key, text = item.split("=", 1)
        values, depth, quote, cur = [], 0, "", ""
        for ch in text:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
            elif ch == "," and depth == 0:
                values.append(cur.strip())
                cur = ""
                continue
            cur += ch
        values.append(cur.strip())
        if not all(values):
            raise ValueError(f"--grid {item!r}: empty value in the list")
        axes.append((key.strip(), values))
    return axes


def data_keys(keys: list[str]) -> list[str]:
    """The grid keys that change the training set (each setting of them gets its own build):
    ``data.*`` and ``synth.*``, none if the grid names ``data.dataset`` (sets built already)."""
    if "data.dataset" in keys:
        return []
    return [k for k in keys if k.startswith(("data.", "synth."))]


def sweep(
    config: str | Path | None,
    grid: list[str],
    overrides: list[str] = (),
    *,
    workdir: str | Path | None = None,
    match: bool = False,
) -> SweepResult:
    """Train every combination of ``grid``; ``match`` rescales each setting's widths to the
    base config's FLOPs per example (module docstring)."""
    axes = parse_grid(grid)
    if not axes:
        raise ValueError("sweep needs at least one --grid key=v1,v2")
    keys = [k for k, _ in axes]
    combos = [dict(zip(keys, vs, strict=True))
              for vs in itertools.product(*[v for _, v in axes])]  # fmt: skip
    rebuild = data_keys(keys)
    synth = [k for k in rebuild if k.startswith("synth.")]
    folder = f"sweeps/{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}" if rebuild else ""
    datasets: dict[tuple[str, ...], str] = {}  # data setting -> its training set's folder
    stores: dict[tuple[str, ...], str] = {}  # synth setting -> its store's folder
    for c in combos:
        datasets.setdefault(tuple(c[k] for k in rebuild), f"{folder}/dataset-{len(datasets)}")
        stores.setdefault(tuple(c[k] for k in synth), f"{folder}/store-{len(stores)}")

    def data_sets(c: dict[str, str]) -> list[str]:
        if not rebuild:
            return []
        out = [f"data.dataset={datasets[tuple(c[k] for k in rebuild)]}"]
        return out + ([f"data.store={stores[tuple(c[k] for k in synth)]}"] if synth else [])

    cfgs = [
        load_config(
            config,
            [*overrides, *(f"{k}={v}" for k, v in c.items()), *data_sets(c)],
            workdir=workdir,
        )
        for c in combos
    ]  # fmt: skip  (all parsed before anything runs: bad values fail early)
    if match:
        cfgs = matched(load_config(config, list(overrides), workdir=workdir), cfgs)
    shown = shown_metrics(cfgs[0].tasks)
    client = client_for(cfgs[0])
    name = "sweep " + " ".join(f"{k}={','.join(v)}" for k, v in axes)
    note = (
        f"`recsys-moe sweep`: {len(combos)} training runs (the child runs), one per combination "
        f"of {', '.join(f'`{k}` in {v}' for k, v in axes)}"
        + (", widths rescaled to the base config's FLOPs per example" if match else "")
        + (f", one training set per data setting under `{folder}`" if rebuild else "")
        + ". Results (validation and test metrics of each run's selected checkpoint, mean ± sd "
        "over seeds): the artifacts `sweep.md`, `sweep.csv`, `sweep.json`."
    )
    parent = client.create_run(
        ensure_experiment(cfgs[0]),
        run_name=name[:250],
        tags={TRAIN_JOB_TAG: "sweep", NOTE_TAG: note, **run_owner_tags()},
    )
    pid = parent.info.run_id
    for i, (key, values) in enumerate(axes):
        client.log_param(pid, f"grid.{i}.{key}", ",".join(values))
    if match:
        client.log_param(pid, "match_compute", "true")
    if rebuild:
        client.log_param(pid, "sweep.folder", folder)
    rows: list[dict[str, str | float]] = []
    built: set[Path] = set()
    ok = False
    runs = progress.bar(total=len(combos), desc="sweep", unit="run")
    try:
        for combo, cfg in zip(combos, cfgs, strict=True):
            runs.set_postfix_str(" ".join(f"{k}={v}" for k, v in combo.items()))
            if synth and cfg.store_dir not in built:
                synthesize(cfg.store_dir, test_days=cfg.data.test_days, **asdict(cfg.synth))
                built.add(cfg.store_dir)
            if rebuild and cfg.dataset_dir not in built:
                build_dataset(cfg)
                built.add(cfg.dataset_dir)
            result = train(cfg, parent_run_id=pid)
            selected = selected_metrics(cfg, result)
            log_selected(client, result.run_id, selected)
            epoch = client.get_run(result.run_id).data.metrics.get("train/selected_epoch", 0.0)
            row: dict[str, str | float] = dict(combo)
            if match:
                row["widths"] = str(_widths(cfg))
            row |= {"flops_per_example": result.cost.get("flops_per_example", 0)}
            row |= {"epoch": int(epoch)}
            for split in ("valid", "test"):
                row |= {f"{split}/{m}": selected.get(f"{split}/{m}", math.nan) for m in shown}
            row |= {SCORE: selected[SCORE]}
            row |= {"samples_per_s": round(result.samples_per_s), "run_id": result.run_id}
            rows.append(row)
            runs.update(1)
        ok = True
    finally:
        runs.close()
        summary = summarize(rows, keys, shown)
        best = max(rows, key=lambda r: _finite(r[SCORE]), default=None)
        best_id = str(best["run_id"]) if best is not None else ""
        table = report(rows, keys, summary, best)
        client.log_text(pid, table, "sweep.md")
        client.log_text(pid, to_csv(rows), "sweep.csv")
        sets = {d: dict(zip(rebuild, s, strict=True)) for s, d in datasets.items()}
        sets |= {d: dict(zip(synth, s, strict=True)) for s, d in stores.items() if synth}
        client.log_dict(pid, {"grid": dict(axes), "splits": SPLITS_NOTE, "runs": _json(rows),
                              "summary": _json(summary), "seeds": seed_keys(rows, keys),
                              "best_run": best_id, "datasets": sets}, "sweep.json")  # fmt: skip
        if best_id:
            client.set_tag(pid, BEST_TAG, best_id)
        client.set_terminated(pid, "FINISHED" if ok else "FAILED")
    return SweepResult(pid, rows, table, summary, best_id)


def selected_metrics(cfg: Config, result: TrainResult) -> dict[str, float]:
    """The selected checkpoint's metrics: ``valid/<m>`` (training's validation of that epoch),
    its ``valid/selection_score``, and ``test/<m>``: the model (rank 0's) on the mapped test
    split, scored as validation is (none where the split is empty or on other ranks)."""
    from recsys_moe.evaluation.metrics import split_metrics
    from recsys_moe.evaluation.predict import predict_tensors
    from recsys_moe.training.loader import read_mapped

    out = {f"valid/{k}": v for k, v in result.valid.items()}
    out[SCORE] = selection_score(result.valid, cfg.tasks, cfg.train.selection_metric)
    if result.model is None:
        return out
    test = read_mapped(cfg.dataset_dir, "test", cfg.feature_set(), label_columns(cfg.tasks))
    if test.num_rows == 0:
        return out
    preds = predict_tensors(result.model, test, cfg.tasks, batch_size=cfg.train.eval_batch_size)
    labels = {k: v.numpy() for k, v in test.labels.items()}
    metrics = split_metrics(cfg.tasks, preds, labels, load_manifest(cfg.dataset_dir))
    return out | {f"test/{k}": v for k, v in metrics.items()}


def log_selected(client, run_id: str, selected: dict[str, float]) -> None:  # noqa: ANN001
    """``selected`` (``valid/<metric>``, ``test/<metric>``) as the child run's
    ``selected.valid.<metric>`` and ``selected.test.<metric>``: without a ``/`` they chart in the
    run page's last section, after ``train/`` and ``valid/`` (``tracking.chart_sections``)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric("selected." + k.replace("/", "."), float(v), now, 0)
             for k, v in selected.items()
             if math.isfinite(v)]  # fmt: skip
    client.log_batch(run_id, metrics=batch)


def shown_metrics(tasks: list[TaskConfig]) -> list[str]:
    """The table's metric columns: per task, AUC and log loss (binary) or RMSE, and RMSE on the
    log scale for ``log1p`` targets (regression)."""
    out = []
    for t in tasks:
        if t.kind == "binary":
            out += [f"{t.name}_auc", f"{t.name}_logloss"]
        else:
            out += [f"{t.name}_rmse"] + ([f"{t.name}_rmse_log"] if t.transform == "log1p" else [])
    return out


def matched(base: Config, cfgs: list[Config]) -> list[Config]:
    """``cfgs`` with each model's widths rescaled to ``base``'s dense FLOPs per example."""
    features = base.feature_set()
    tasks = [t.name for t in base.tasks]
    budget = model_cost(base.model, features, tasks)["flops_per_example"]
    out = []
    for cfg in cfgs:
        try:
            model = match_compute(cfg.model, features, [t.name for t in cfg.tasks], budget)
        except ValueError as e:
            raise ValueError(
                f"--match-compute: {e} (the base config's budget); raise the base config's "
                f"widths or drop this setting"
            ) from None
        out.append(replace(cfg, model=model))
    return out


def _widths(cfg: Config) -> list[int]:
    m = cfg.model
    bottom = m.mixture in ("single_task", "shared_bottom")
    return (m.bottom_dims or m.expert_dims) if bottom else m.expert_dims


def decimals(v: float) -> int:
    """Decimals to show ``v`` with: 4, or 3 significant digits for a number under 0.1 (an RMSE
    of 0.0027 shows as 0.00272)."""
    if not math.isfinite(v) or v == 0 or abs(v) >= 0.1:
        return 4
    return 2 - math.floor(math.log10(abs(v)))


def format_table(rows: list[dict[str, str | float]], *, header: bool = True) -> str:
    """A Markdown table of the rows (validation metrics per setting)."""
    if not rows:
        return "(no runs)"
    cols = list(rows[0])
    fmt = [lambda v: f"{v:.{decimals(v)}f}" if isinstance(v, float) else str(v)] * len(cols)
    lines = []
    if header:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r[c]) for f, c in zip(fmt, cols, strict=True)) + " |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


def seed_keys(rows: list[dict[str, str | float]], keys: list[str]) -> list[str]:
    """The grid's seed keys (``SEEDS``), if together they take at least two values."""
    seeds = [k for k in SEEDS if k in keys]
    return seeds if len({tuple(r[k] for k in seeds) for r in rows}) > 1 else []


def summarize(
    rows: list[dict[str, str | float]], keys: list[str], shown: list[str]
) -> list[dict[str, str | float]]:
    """With seed keys in the grid (``seed_keys``): per setting of the other keys, its runs'
    count and each metric's mean and sample sd (``<col>`` and ``<col>_sd``) over its seeds,
    validation and test apart; ``[]`` otherwise."""
    seeds = seed_keys(rows, keys)
    if not seeds:
        return []
    by = [k for k in keys if k not in seeds]
    groups: dict[tuple, list[dict[str, str | float]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    columns = ["epoch", *(f"{s}/{m}" for s in ("valid", "test") for m in shown), SCORE]
    out = []
    for setting, members in groups.items():
        row: dict[str, str | float] = dict(zip(by, setting, strict=True)) | {"runs": len(members)}
        row["flops_per_example"] = members[0]["flops_per_example"]
        for c in columns:
            values = [float(r[c]) for r in members if math.isfinite(float(r[c]))]
            row[c] = statistics.mean(values) if values else math.nan
            row[f"{c}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def format_summary(summary: list[dict[str, str | float]]) -> str:
    """``summarize``'s rows as a Markdown table of "mean ± sd" cells."""
    if not summary:
        return ""
    rows = []
    for s in summary:
        row: dict[str, str | float] = {}
        for k, v in s.items():
            if k.endswith("_sd"):
                continue
            if f"{k}_sd" in s:
                digits = 1 if k == "epoch" else decimals(float(v))
                row[k] = f"{float(v):.{digits}f} ± {float(s[f'{k}_sd']):.{digits}f}"
            else:
                row[k] = str(v)
        rows.append(row)
    return format_table(rows)


def report(
    rows: list[dict[str, str | float]],
    keys: list[str],
    summary: list[dict[str, str | float]],
    best: dict[str, str | float] | None,
) -> str:
    """The sweep's Markdown report: the runs, which split each number is from, the mean ± sd
    table over seeds, and the best run by validation selection score."""
    text = format_table(rows) + f"\n\n{SPLITS_NOTE}."
    if summary:
        seeds = " × ".join(seed_keys(rows, keys))
        text += f"\n\nMean ± standard deviation over {seeds}:\n\n{format_summary(summary)}"
    if best is not None:
        setting = " ".join(f"{k}={best[k]}" for k in keys)
        text += (f"\n\nBest validation selection score: run {best['run_id']} ({setting}), "
                 f"{float(best[SCORE]):.4f}.")  # fmt: skip
    return text


def to_csv(rows: list[dict[str, str | float]]) -> str:
    """The runs as CSV (the table's columns; valid/ and test/ name the split)."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def _json(rows: list[dict[str, str | float]]) -> list[dict[str, str | float | None]]:
    """``rows`` with undefined numbers (NaN: e.g. an AUC of one class) as null, valid JSON."""
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for r in rows]  # fmt: skip


def _finite(value: str | float) -> float:
    v = float(value)
    return v if math.isfinite(v) else -math.inf


def picked_note(cfg: Config, run_id: str) -> str:
    """Why a job without ``--run-id`` took ``run_id`` (the latest finished training run), for
    its message; for a sweep's child run also the sweep, the run's setting and the sweep's best
    run by validation selection score (``BEST_TAG``), with how to take that one instead."""
    client = client_for(cfg)
    run = client.get_run(run_id)
    note = ", the latest finished training run"
    parent_id = run.data.tags.get("mlflow.parentRunId", "")
    parent = client.get_run(parent_id) if parent_id else None
    if parent is None or parent.data.tags.get(TRAIN_JOB_TAG) != "sweep":
        return note
    keys = [k.split(".", 2)[2] for k in sorted(parent.data.params) if k.startswith("grid.")]

    def setting(r) -> str:  # noqa: ANN001
        return " ".join(f"{k}={r.data.params.get(k, '?')}" for k in keys)

    note += f" (the last of sweep {parent_id}: {setting(run)})"
    best_id = parent.data.tags.get(BEST_TAG, "")
    if best_id == run_id:
        return note + "; also the sweep's best by validation selection score"
    if best_id:
        best = setting(client.get_run(best_id))
        note += (f"; the sweep's best by validation selection score is run {best_id} ({best}): "
                 f"pass --run-id {best_id} for it")  # fmt: skip
    return note


def dataset_note(cfg: Config, run_id: str) -> str:
    """A warning when ``run_id`` was trained on another training set than ``cfg``'s (e.g. a
    sweep's run over ``data.split_seed``): its test split is not the run's ("" otherwise)."""
    trained = client_for(cfg).get_run(run_id).data.tags.get("recsys_moe.dataset", "")
    here = str(cfg.dataset_dir.resolve())
    if not trained or trained == here:
        return ""
    return (
        f"warning: run {run_id} was trained on the training set {trained}, not this config's "
        f"{here}: its splits differ (rows the model trained on may be evaluated); pass "
        f"--set data.dataset={trained}"
    )
