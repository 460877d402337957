"""The evaluation report of a predictions frame: metrics per task, ranking metrics per request,
breakdowns by segment, bootstrap intervals, plots and a Markdown page a person reads.

The input is the frame ``recsys-moe evaluate --predictions`` writes: one row per evaluated event
with its keys, labels (and masks), every task's prediction in natural units (``pred_<task>``:
``pred_click`` a probability, ``pred_watch_time`` seconds), the combined ``score`` and the segment
columns. Everything here is computed
from that frame alone, so anyone holding the Parquet can recompute every number.

- ``metrics``: each task's metrics (``metrics.TaskMetrics``, GAUC by ``eval.gauc_by``) and, when
  the frame has ``eval.request``, the ranking metrics of ``ranking.RequestRanking`` keyed
  ``rank_<metric>``.
- ``segments``: the same per value of each ``eval.segments`` column (ranking metrics only for a
  column constant within each request, e.g. the user's segment, not the item's category).
- ``ci``: percentile intervals at ``eval.ci`` over ``eval.bootstrap`` resamples of requests with
  replacement (seeded by ``eval.seed``; rows when the frame has no ``eval.request``): a request
  drawn m times counts its rows m times; the ranking metrics are means over requests, so they
  are resampled as per-request values.
- ``segment_ci``: the same per segment value, resampling the requests within that value's rows
  (each value's resampling seeded by ``eval.seed`` alone, so a value's interval is reproducible
  from its rows).
- ``metrics_table``: every number above as one long table (column, value, metric, estimate,
  interval, rows), the machine-readable form of the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsys_moe.config import EvalConfig, TaskConfig
from recsys_moe.evaluation.metrics import TaskMetrics, task_label_stats
from recsys_moe.evaluation.ranking import RequestRanking

SCORE = "score"


def pred_column(task: TaskConfig) -> str:
    """The predictions frame's column of a task's prediction (not ``output_name``: a regression
    task's output is named after its label, ``watch_time_s``, which the frame holds too)."""
    return f"pred_{task.name}"


CHUNK = 1 << 16  # rows per metric update: the metrics accumulate batch by batch
# counts, not qualities: no interval, not gated, not plotted
COUNT_SUFFIXES = ("_groups", "_groups_skipped", "_rows_skipped", "requests", "requests_skipped")


@dataclass
class EvalReport:
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    segments: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    segment_ci: dict[str, dict[str, dict[str, tuple[float, float]]]] = field(default_factory=dict)
    reliability: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rows: int = 0


def is_count(key: str) -> bool:
    return key.endswith(COUNT_SUFFIXES)


def _codes(frame: pl.DataFrame, column: str) -> np.ndarray:
    """Dense int64 ids of a column's values (any dtype; nulls are one group)."""
    return frame[column].rank("dense").fill_null(0).cast(pl.Int64).to_numpy()


def _ranking(
    frame: pl.DataFrame, ev: EvalConfig, graded: bool, request: np.ndarray
) -> RequestRanking:
    import torch

    metric = RequestRanking(ev.ks, graded=graded)
    for lo in range(0, frame.height, CHUNK):
        part = frame.slice(lo, CHUNK)
        metric.update(
            torch.tensor(part[SCORE].to_numpy()),
            torch.tensor(part[ev.relevance].to_numpy()),
            torch.tensor(request[lo : lo + CHUNK]),
            torch.tensor(part[ev.graded_relevance].to_numpy()) if graded else None,
        )
    return metric


def frame_metrics(
    frame: pl.DataFrame,
    tasks: list[TaskConfig],
    ev: EvalConfig,
    manifest: dict,
    *,
    ranking: bool = True,
    auc_from_ranks: bool = False,
    evaluators: dict[str, TaskMetrics] | None = None,
    groups: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, TaskMetrics], RequestRanking | None]:
    """Every task's metrics (and the ranking metrics, when ``ranking`` and the frame has the
    request column) of a predictions frame, updated chunk by chunk (``auc_from_ranks``:
    ``TaskMetrics``'s). ``evaluators`` of an earlier call on a frame of the same columns are
    reset and reused, ``groups`` (column → group ids of the rows) replace the GAUC columns'
    codes: the bootstrap's replicates."""
    if groups is None:
        groups = {g: _codes(frame, g) for g in ev.gauc_by if g in frame.columns}
    group_by = tuple(groups)
    if evaluators is not None:
        for e in evaluators.values():
            e.reset()
    evaluators = evaluators or {
        t.name: TaskMetrics(
            t,
            label_stats=task_label_stats(t, manifest),
            group_by=group_by if t.kind == "binary" else (),
            reliability_bins=ev.reliability_bins,
            auc_from_ranks=auc_from_ranks,
        )  # fmt: skip
        for t in tasks
    }
    for lo in range(0, frame.height, CHUNK):
        part = frame.slice(lo, CHUNK)
        for t in tasks:
            evaluators[t.name].update(
                part[pred_column(t)].to_numpy(), part[t.label].cast(pl.Float64).to_numpy(),
                mask=part[t.mask].to_numpy() if t.mask else None,
                groups={g: v[lo : lo + CHUNK] for g, v in groups.items()},
            )  # fmt: skip
    out: dict[str, float] = {}
    for e in evaluators.values():
        out |= e.compute()
    rank = None
    if ranking and _has_ranking(frame, ev):
        rank = _ranking(frame, ev, _graded(frame, ev), _codes(frame, ev.request))
        out |= {f"rank_{k}": v for k, v in rank.compute().items()}
    return out, evaluators, rank


def _has_ranking(frame: pl.DataFrame, ev: EvalConfig) -> bool:
    return bool(ev.request) and {ev.request, ev.relevance, SCORE} <= set(frame.columns)


def _graded(frame: pl.DataFrame, ev: EvalConfig) -> bool:
    return bool(ev.graded_relevance) and ev.graded_relevance in frame.columns


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: the metrics are many small ops (a sort, a cumsum over ~1e5 rows),
    where thread hand-offs cost more than they save. Demo test split (84k rows, 20 bootstrap
    resamples) on the shared 2-core box: 25.6 s with torch's default threads, 6.5 s with one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_report(
    frame: pl.DataFrame, tasks: list[TaskConfig], ev: EvalConfig, manifest: dict
) -> EvalReport:
    """Metrics, segment breakdowns and bootstrap intervals of a predictions frame (module doc)."""
    with one_thread():
        return _build_report(frame, tasks, ev, manifest)


def _build_report(
    frame: pl.DataFrame, tasks: list[TaskConfig], ev: EvalConfig, manifest: dict
) -> EvalReport:
    metrics, evaluators, rank = frame_metrics(frame, tasks, ev, manifest)
    report = EvalReport(metrics=metrics, rows=frame.height)
    report.reliability = {
        name: curve for name, e in evaluators.items() if (curve := e.reliability()) is not None
    }
    missing = [c for c in (*ev.gauc_by, *ev.segments) if c not in frame.columns]
    if missing:
        report.notes.append(f"columns not in the evaluated rows, skipped: {sorted(set(missing))}")
    if not _has_ranking(frame, ev):
        report.notes.append(
            f"no ranking metrics: the rows lack the request column {ev.request!r} "
            f"or the relevance {ev.relevance!r} (eval.request, eval.relevance)"
        )
    report.segments, report.segment_ci = segment_metrics(frame, tasks, ev, manifest, report.notes)
    if ev.bootstrap:
        report.ci = bootstrap_ci(frame, tasks, ev, manifest, rank)
        how = f"requests ({ev.request})" if _by_request(frame, ev) else "rows"
        report.notes.append(
            f"intervals: {ev.ci:.0%} percentile bootstrap over {ev.bootstrap} resamples of "
            f"{how}, seed {ev.seed}; by segment: resampling within each segment value"
        )
    return report


def segment_metrics(
    frame: pl.DataFrame,
    tasks: list[TaskConfig],
    ev: EvalConfig,
    manifest: dict,
    notes: list[str],
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, dict[str, tuple]]]]:
    """Column → value → metrics (and ``rows``) of the rows with that value, and column → value
    → bootstrap intervals of those metrics (resampling the requests within the value's rows;
    none when ``eval.bootstrap`` is 0)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    ci: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    for col in (c for c in ev.segments if c in frame.columns):
        values = frame[col].cast(pl.String).fill_null("(missing)")
        distinct = values.n_unique()
        if distinct > ev.max_segment_values:
            notes.append(f"segment {col!r} skipped: {distinct} values > eval.max_segment_values")
            continue
        per_request = _has_ranking(frame, ev) and (
            frame.group_by(ev.request).agg(pl.col(col).n_unique()).get_column(col).max() == 1
        )
        if _has_ranking(frame, ev) and not per_request:
            notes.append(f"segment {col!r} varies within requests: no ranking metrics by it")
        tagged = frame.with_columns(values.alias("__segment"))
        out[col], ci[col] = {}, {}
        for (value,), part in sorted(tagged.group_by("__segment"), key=lambda kv: str(kv[0])):
            part = part.drop("__segment")
            m, _, rank = frame_metrics(part, tasks, ev, manifest, ranking=per_request)
            out[col][str(value)] = {"rows": float(part.height)} | m
            if ev.bootstrap:
                ci[col][str(value)] = bootstrap_ci(part, tasks, ev, manifest, rank)
    return out, ci


def _by_request(frame: pl.DataFrame, ev: EvalConfig) -> bool:
    return bool(ev.request) and ev.request in frame.columns


def bootstrap_ci(
    frame: pl.DataFrame,
    tasks: list[TaskConfig],
    ev: EvalConfig,
    manifest: dict,
    rank: RequestRanking | None,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every non-count metric over resamples of requests (module doc)."""
    rng = np.random.default_rng(ev.seed)
    unit = _codes(frame, ev.request) - 1 if _by_request(frame, ev) else np.arange(frame.height)
    units = int(unit.max()) + 1 if frame.height else 0
    per_request = rank.per_request()[1] if rank is not None else {}
    codes = {g: _codes(frame, g) for g in ev.gauc_by if g in frame.columns}
    used = [c for t in tasks for c in (pred_column(t), t.label, t.mask) if c]
    frame = frame.select(list(dict.fromkeys(used)))  # the replicates gather these only
    draws: dict[str, list[float]] = {}
    evaluators = None  # made by the first replicate, reset by the others
    for _ in range(ev.bootstrap):
        times = np.bincount(rng.integers(0, units, units), minlength=units)
        rows = np.repeat(np.arange(frame.height), times[unit])
        m, evaluators, _ = frame_metrics(
            frame[rows], tasks, ev, manifest, ranking=False, auc_from_ranks=True,
            evaluators=evaluators, groups={g: c[rows] for g, c in codes.items()},
        )  # fmt: skip
        for k, v in per_request.items():  # request ids are the dense codes in order
            ok = np.isfinite(v) & (times > 0)
            m[f"rank_{k}"] = float((v[ok] * times[ok]).sum() / times[ok].sum()) if ok.any() else 0
        for k, v in m.items():
            draws.setdefault(k, []).append(v)
    lo, hi = (1 - ev.ci) / 2, 1 - (1 - ev.ci) / 2
    out = {}
    for k, vals in draws.items():
        a = np.asarray(vals, dtype=np.float64)
        a = a[np.isfinite(a)]
        if not is_count(k) and a.size:
            out[k] = (float(np.quantile(a, lo)), float(np.quantile(a, hi)))
    return out


# ---- plots and the Markdown page --------------------------------------------------------------
def _plt():  # noqa: ANN202  (matplotlib.pyplot, imported on use with the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_binary(frame: pl.DataFrame, task: TaskConfig, curve: dict, out_dir: Path) -> Path:
    """Reliability curve, ROC and precision-recall of a binary task, side by side (one PNG)."""
    import torch
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    rows = frame.filter(pl.col(task.mask) == 1) if task.mask else frame
    p = torch.tensor(rows[pred_column(task)].to_numpy())
    y = torch.tensor(rows[task.label].cast(pl.Int64).to_numpy())
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ok = curve["rows"] > 0
    ax[0].plot([0, 1], [0, 1], "k:", lw=1)
    ax[0].plot(curve["mean_pred"][ok], curve["observed"][ok], "o-")
    ax[0].set(xlabel="mean predicted probability", ylabel="observed rate",
              title=f"{task.name}: reliability ({int(ok.sum())} bins)")  # fmt: skip
    fpr, tpr, _ = binary_roc(p, y)
    ax[1].plot([0, 1], [0, 1], "k:", lw=1)
    ax[1].plot(fpr.numpy(), tpr.numpy())
    ax[1].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    prec, rec, _ = binary_precision_recall_curve(p, y)
    ax[2].plot(rec.numpy(), prec.numpy())
    ax[2].axhline(float(y.double().mean()), color="k", ls=":", lw=1)
    ax[2].set(xlabel="recall", ylabel="precision", title="precision-recall")
    return _save(fig, out_dir / f"{task.name}_curves.png")


def plot_segments(
    segments: dict[str, dict[str, float]], keys: list[str], column: str, out_dir: Path
) -> Path:
    """One bar chart per metric of ``keys`` over the values of a segment column."""
    plt = _plt()
    names = list(segments)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 0.3 * len(names) + 1.5),
                             squeeze=False)  # fmt: skip
    for ax, key in zip(axes[0], keys, strict=True):
        vals = [segments[n].get(key, math.nan) for n in names]
        ax.barh(range(len(names)), vals)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([f"{n} ({int(segments[n]['rows'])})" for n in names], fontsize=7)
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            span = max(finite) - min(finite)
            ax.set_xlim(min(finite) - 0.1 * span - 1e-9, max(finite) + 0.1 * span + 1e-9)
        ax.set_title(key, fontsize=9)
    fig.suptitle(f"metrics by {column} (rows)")
    return _save(fig, out_dir / f"by_{column}.png")


def _save(fig, path: Path) -> Path:  # noqa: ANN001 (a matplotlib Figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path


def headline_keys(tasks: list[TaskConfig], metrics: dict[str, float]) -> list[str]:
    """The metrics shown per segment: each task's gate metric and GAUC, the first NDCG."""
    keys = [f"{t.name}_{t.gate}" for t in tasks]
    keys += [k for k in metrics if "_gauc_" in k and not is_count(k)][:1]
    keys += [k for k in metrics if k.startswith("rank_ndcg_at_")][:1]
    return [k for k in keys if k in metrics]


def _fmt(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"


def _cell(v: float, ci: tuple[float, float] | None) -> str:
    return _fmt(v) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def metrics_table(report: EvalReport) -> pl.DataFrame:
    """Every number of the report as one long table: ``column`` and ``value`` (null for all
    rows, else the segment column and its value), ``metric``, ``estimate``, ``ci_low`` and
    ``ci_high`` (null without an interval: counts, or no bootstrap) and ``rows``."""
    parts = [(None, None, report.metrics, report.ci, report.rows)]
    for col, seg in report.segments.items():
        for value, m in seg.items():
            ci = report.segment_ci.get(col, {}).get(value, {})
            parts.append((col, value, {k: v for k, v in m.items() if k != "rows"}, ci, m["rows"]))
    records = [
        {"column": col, "value": value, "metric": k, "estimate": float(v),
         "ci_low": ci[k][0] if k in ci else None, "ci_high": ci[k][1] if k in ci else None,
         "rows": int(rows)}
        for col, value, m, ci, rows in parts for k, v in m.items()
    ]  # fmt: skip
    schema = {"column": pl.String, "value": pl.String, "metric": pl.String,
              "estimate": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
              "rows": pl.Int64}  # fmt: skip
    return pl.DataFrame(records, schema=schema)


def markdown(
    report: EvalReport,
    tasks: list[TaskConfig],
    *,
    title: str,
    images: list[Path],
    extra: dict[str, float] | None = None,
    seesaw: dict[str, float] | None = None,
) -> str:
    """The report as Markdown (images linked by file name: they sit beside the page)."""
    m, ci = report.metrics, report.ci
    lines = [f"# {title}", "", f"{report.rows:,} rows evaluated.", ""]
    lines += ["| metric | value | interval |", "| --- | ---: | --- |"]
    for k, v in m.items():
        if is_count(k):
            continue
        iv = ci.get(k)
        shown = f"[{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else ""
        lines.append(f"| {k} | {_fmt(v)} | {shown} |")
    counts = {k: v for k, v in m.items() if is_count(k)}
    if counts:
        lines += ["", "Counts: " + ", ".join(f"{k} {int(v):,}" for k, v in counts.items()), ""]
    if extra:
        lines += ["", "| reference | value |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in extra.items()]
    if seesaw:
        n = int(seesaw.get("baselines", 0))
        lines += ["", "## Multi-task check (seesaw)", "",
                  f"Gain of this model over the mean of {n} single-task run(s) of its sweep, "
                  "validation split, positive = better:", "", "| task metric | gain |",
                  "| --- | ---: |"]  # fmt: skip
        gains = {k: v for k, v in seesaw.items() if k != "baselines"}
        lines += [f"| {k.removesuffix('_gain')} | {v:+.4f} |" for k, v in gains.items()]
        worse = [k.removesuffix("_gain") for k, v in gains.items() if v < 0]
        if worse and len(worse) < len(gains):
            lines += ["", f"Seesaw: worse than single-task on {', '.join(worse)}."]
    keys = headline_keys(tasks, m)
    for col, seg in report.segments.items():
        lines += ["", f"## By {col}", "", "| " + " | ".join([col, "rows", *keys]) + " |",
                  "| --- | ---: |" + " ---: |" * len(keys)]  # fmt: skip
        for value, sm in seg.items():
            ci = report.segment_ci.get(col, {}).get(value, {})
            cells = [_cell(sm.get(k, math.nan), ci.get(k)) for k in keys]
            lines.append("| " + " | ".join([value, f"{int(sm['rows']):,}", *cells]) + " |")
        if report.segment_ci.get(col):
            lines += ["", f"Intervals: requests resampled within each {col} value."]
    if images:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write_plots(
    frame: pl.DataFrame, tasks: list[TaskConfig], report: EvalReport, out_dir: Path
) -> list[Path]:
    out = [
        plot_binary(frame, t, report.reliability[t.name], out_dir)
        for t in tasks
        if t.kind == "binary" and t.name in report.reliability
    ]
    keys = headline_keys(tasks, report.metrics)
    for col, seg in report.segments.items():
        if seg and keys:
            out.append(plot_segments(seg, keys, col, out_dir))
    return out
