"""Sweeps: every combination of a grid of config values, each a child run of one MLflow run.

    recsys-moe sweep --config configs/demo.toml --grid model.mixture=mmoe,shared_bottom \\
        --grid model.num_experts=4,8 [--set train.epochs=2 ...]

A grid value is parsed like a ``--set`` value (TOML, else a bare string); commas inside
brackets or quotes belong to the value (``--grid "model.expert_dims=[64, 32],[128, 64]"``).
The parent run (named after the grid, described with it) holds the grid and, at the end, the
results table (``sweep.md``); a progress bar on stderr counts the runs. The table shows
each task's headline validation metrics (binary: AUC and log loss; regression: RMSE, and RMSE on
the log scale for ``log1p`` tasks).

Matched compute (``--match-compute``): every setting's widths are rescaled
(``recsys_moe.model.match_compute``: expert widths, or the bottom's for shared_bottom /
single_task, by one factor) to the dense FLOPs per example of the base config (the config with
``--set`` values, before the grid), so that e.g. ``--grid model.mixture=mmoe,shared_bottom``
compares the two at one compute budget. The widths used are a column of the table and the runs'
params.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines import progress
from recsys_moe.config import Config, TaskConfig, load_config
from recsys_moe.model import match_compute, model_cost
from recsys_moe.tracking import (
    NOTE_TAG,
    TRAIN_JOB_TAG,
    client_for,
    ensure_experiment,
    run_owner_tags,
)
from recsys_moe.training.train import train

SEED = "train.seed"  # a grid over it adds a mean ± sd table per other setting


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, str | float]]
    table: str


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
    combos = [dict(zip([k for k, _ in axes], vs, strict=True))
              for vs in itertools.product(*[v for _, v in axes])]  # fmt: skip
    cfgs = [
        load_config(config, [*overrides, *(f"{k}={v}" for k, v in c.items())], workdir=workdir)
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
        + ". The table of validation metrics is the artifact `sweep.md`."
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
    rows: list[dict[str, str | float]] = []
    ok = False
    runs = progress.bar(total=len(combos), desc="sweep", unit="run")
    try:
        for combo, cfg in zip(combos, cfgs, strict=True):
            runs.set_postfix_str(" ".join(f"{k}={v}" for k, v in combo.items()))
            result = train(cfg, parent_run_id=pid)
            row: dict[str, str | float] = dict(combo)
            if match:
                row["widths"] = str(_widths(cfg))
            row |= {"flops_per_example": result.cost.get("flops_per_example", 0)}
            row |= {k: result.valid[k] for k in shown if k in result.valid}
            row |= {"samples_per_s": result.samples_per_s, "run_id": result.run_id}
            rows.append(row)
            runs.update(1)
        ok = True
    finally:
        runs.close()
        table = format_table(rows)
        summary = summarize(rows, [k for k, _ in axes], shown)
        if summary:
            table += f"\n\nMean ± standard deviation over {SEED}:\n\n{summary}"
        client.log_text(pid, table, "sweep.md")
        client.set_terminated(pid, "FINISHED" if ok else "FAILED")
    return SweepResult(parent_run_id=pid, rows=rows, table=table)


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


def format_table(rows: list[dict[str, str | float]], *, header: bool = True) -> str:
    """A Markdown table of the rows (validation metrics per setting)."""
    if not rows:
        return "(no runs)"
    cols = list(rows[0])
    fmt = [lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)] * len(cols)
    lines = []
    if header:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r[c]) for f, c in zip(fmt, cols, strict=True)) + " |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


def summarize(rows: list[dict[str, str | float]], keys: list[str], shown: list[str]) -> str:
    """With ``train.seed`` among the grid ``keys``: a table of each other setting's metrics as
    mean ± sample standard deviation over its seeds ("" otherwise)."""
    if SEED not in keys or len({r[SEED] for r in rows}) < 2:
        return ""
    by = [k for k in keys if k != SEED]
    groups: dict[tuple, list[dict[str, str | float]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    metrics = [m for m in ("flops_per_example", *shown) if m in rows[0]]
    out = []
    for setting, members in groups.items():
        row: dict[str, str | float] = dict(zip(by, setting, strict=True)) | {
            "runs": str(len(members))
        }
        for m in metrics:
            values = [float(r[m]) for r in members]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            row[m] = (
                f"{statistics.mean(values):.4f} ± {sd:.4f}" if m in shown else str(int(values[0]))
            )
        out.append(row)
    return format_table(out)
