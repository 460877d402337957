"""Ranking metrics per request on the combined score: NDCG@k, recall@k, MRR.

Each request's rows are ranked by the combined score the scoring job ranks by (``combined_score``:
``prod_t p_t ** w_t`` over binary tasks times ``(1 + y_t) ** w_t`` over regression tasks, the
weights of ``[score]``). Per request, as torchmetrics' retrieval functions define them (computed
for all requests at once on padded ``[requests, rows]`` tensors: torchmetrics loops over requests
in Python, 50 s for the demo's 8,443 test requests on a loaded 2-core box; ties in the score keep
the rows' order):

- ``ndcg_at_<k>``: NDCG@k with the binary relevance (click), linear gain, log2 discount;
- ``ndcg_graded_at_<k>``: NDCG@k with a graded relevance (watch time in seconds);
- ``recall_at_<k>``: relevant rows in the top k over the request's relevant rows;
- ``mrr``: 1 / rank of the first relevant row.

A request without a relevant row has no value and is skipped (``requests_skipped``); the
metrics are the means over the other requests. ``RequestRanking`` keeps the rows (``cat``
states, gathered over ranks) because a request's rows may arrive in several batches.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import torch
from torch import Tensor
from torchmetrics import Metric

from recsys_moe.config import TaskConfig
from recsys_moe.evaluation.pairwise import cat_state
from recsys_moe.model.objectives import output_name

F64 = torch.float64


def score_expr(tasks: list[TaskConfig], weights: dict[str, float]) -> pl.Expr:
    """The combined score, the one definition of the scoring job's ranking (``serving.model``)
    and of the ranking metrics here: ``prod_t p_t ** w_t`` over binary tasks (clipped at 0) times
    ``(1 + y_t) ** w_t`` over regression tasks, on the prediction columns (``output_name``) as
    Float64; tasks without a weight (or weight 0) do not count."""
    expr = pl.lit(1.0, dtype=pl.Float64)
    for t in tasks:
        w = weights.get(t.name, 0.0)
        if w == 0.0:
            continue
        col = pl.col(output_name(t)).cast(pl.Float64)
        expr = expr * (col.clip(lower_bound=0.0) if t.kind == "binary" else 1.0 + col).pow(w)
    return expr


def combined_score(
    tasks: list[TaskConfig], weights: dict[str, float], preds: dict[str, np.ndarray]
) -> np.ndarray:
    """``score_expr`` of ``preds`` (arrays by ``output_name``)."""
    frame = pl.DataFrame({k: np.asarray(v, dtype=np.float64) for k, v in preds.items()})
    return frame.with_columns(score_expr(tasks, weights).alias("__score"))["__score"].to_numpy()


def metric_names(ks: list[int], graded: bool) -> list[str]:
    names = [f"ndcg_at_{k}" for k in ks] + [f"recall_at_{k}" for k in ks] + ["mrr"]
    return names + ([f"ndcg_graded_at_{k}" for k in ks] if graded else [])


class RequestRanking(Metric):
    """NDCG@k, recall@k and MRR per request (module doc); ``update(score, relevant, request,
    graded=None)`` per batch, ``per_request()`` for each request's values, ``compute()`` for
    their means and counts."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: list[int], *, graded: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.ks, self.graded = list(ks), graded
        for name in ("scores", "relevant", "requests", "grades"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(
        self, score: Tensor, relevant: Tensor, request: Tensor, graded: Tensor | None = None
    ) -> None:
        if self.graded and graded is None:
            raise ValueError("RequestRanking(graded=True) needs the graded relevance")
        self.scores.append(score.to(F64))
        self.relevant.append(relevant.long())
        self.requests.append(request.long())
        self.grades.append((graded if graded is not None else relevant).to(F64))

    def per_request(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Request ids (sorted) and each metric's value per request (NaN: skipped)."""
        names = metric_names(self.ks, self.graded)
        req = cat_state(self.requests)
        if req is None:
            return np.zeros(0, np.int64), {k: np.zeros(0) for k in names}
        order = torch.argsort(req, stable=True)
        ids, sizes = torch.unique_consecutive(req[order], return_counts=True)
        score, rel, grade = (
            padded(cat_state(x)[order], sizes, fill)
            for x, fill in ((self.scores, -math.inf), (self.relevant, 0), (self.grades, 0.0))
        )
        out = request_metrics(score, rel.double(), self.ks)
        if self.graded:
            graded = request_metrics(score, grade, self.ks)
            out |= {f"ndcg_graded_at_{k}": graded[f"ndcg_at_{k}"] for k in self.ks}
        return ids.numpy(), {k: out[k].numpy() for k in names}

    def compute(self) -> dict[str, float]:
        _, values = self.per_request()
        return summarize(values)


def padded(values: Tensor, sizes: Tensor, fill: float) -> Tensor:
    """``[R, L]``: the rows of each request (``values`` sorted by request, ``sizes`` rows each)
    left-aligned in a row of the longest request's length, the rest ``fill``."""
    rows = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(len(values)) - starts[rows]
    out = torch.full((len(sizes), int(sizes.max())), fill, dtype=values.dtype)
    out[rows, pos] = values
    return out


def request_metrics(score: Tensor, rel: Tensor, ks: list[int]) -> dict[str, Tensor]:
    """Per request (rows of ``[R, L]`` padded tensors; padding: score -inf, relevance 0), as
    torchmetrics' ``retrieval_normalized_dcg`` / ``retrieval_recall`` /
    ``retrieval_reciprocal_rank`` compute them one request at a time (tests check they agree),
    for all requests at once: NaN where a request has no relevant row."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    ranked = rel.gather(1, order)
    ideal = torch.sort(rel, dim=1, descending=True).values
    discount = 1.0 / torch.log2(torch.arange(rel.shape[1], dtype=F64) + 2.0)
    relevant = (ranked > 0).double()
    count = relevant.sum(1)
    none = count == 0
    out: dict[str, Tensor] = {}
    for k in ks:
        dcg = (ranked[:, :k] * discount[:k]).sum(1)
        idcg = (ideal[:, :k] * discount[:k]).sum(1)
        out[f"ndcg_at_{k}"] = torch.where(none, math.nan, dcg / idcg.clamp_min(1e-300))
        out[f"recall_at_{k}"] = torch.where(none, math.nan, relevant[:, :k].sum(1) / count)
    first = relevant.argmax(1).double()  # the first relevant position (0 when none: masked)
    out["mrr"] = torch.where(none, math.nan, 1.0 / (first + 1.0))
    return out


def summarize(values: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over the requests that have a value, and how many requests were counted and
    skipped (without a relevant row)."""
    out: dict[str, float] = {}
    mrr = values.get("mrr", np.zeros(0))
    for k, v in values.items():
        ok = np.isfinite(v)
        out[k] = float(v[ok].mean()) if ok.any() else math.nan
    out["requests"] = float(np.isfinite(mrr).sum())
    out["requests_skipped"] = float((~np.isfinite(mrr)).sum())
    return out
