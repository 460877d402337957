"""Sweeps: every combination of a grid of config values, each a child run of one MLflow run.

    recsys-moe sweep --config configs/demo.toml --grid model.mixture=mmoe,shared_bottom \\
        --grid model.num_experts=4,8 [--set train.epochs=2 ...]

A grid value is parsed like a ``--set`` value (TOML, else a bare string); commas inside
brackets or quotes belong to the value (``--grid "model.expert_dims=[64, 32],[128, 64]"``).
The parent run holds the grid and, at the end, the results table (``sweep.md``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from recsys_moe.config import load_config
from recsys_moe.tracking import TRAIN_JOB_TAG, client_for, ensure_experiment
from recsys_moe.train import train

SHOWN = ("click_auc", "click_logloss", "watch_time_rmse", "watch_time_rmse_log")


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
) -> SweepResult:
    axes = parse_grid(grid)
    if not axes:
        raise ValueError("sweep needs at least one --grid key=v1,v2")
    combos = [dict(zip([k for k, _ in axes], vs, strict=True))
              for vs in itertools.product(*[v for _, v in axes])]  # fmt: skip
    cfgs = [
        load_config(config, [*overrides, *(f"{k}={v}" for k, v in c.items())], workdir=workdir)
        for c in combos
    ]  # fmt: skip  (all parsed before anything runs: bad values fail early)
    client = client_for(cfgs[0])
    parent = client.create_run(
        ensure_experiment(cfgs[0]), tags={TRAIN_JOB_TAG: "sweep", "mlflow.runName": "sweep"}
    )
    pid = parent.info.run_id
    for i, (key, values) in enumerate(axes):
        client.log_param(pid, f"grid.{i}.{key}", ",".join(values))
    rows: list[dict[str, str | float]] = []
    ok = False
    try:
        for combo, cfg in zip(combos, cfgs, strict=True):
            result = train(cfg, parent_run_id=pid)
            row: dict[str, str | float] = dict(combo)
            row |= {k: result.valid[k] for k in SHOWN if k in result.valid}
            row |= {"samples_per_s": result.samples_per_s, "run_id": result.run_id}
            rows.append(row)
            print(format_table(rows[-1:], header=len(rows) == 1), flush=True)
        ok = True
    finally:
        table = format_table(rows)
        client.log_text(pid, table, "sweep.md")
        client.set_terminated(pid, "FINISHED" if ok else "FAILED")
    return SweepResult(parent_run_id=pid, rows=rows, table=table)


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
