"""Ranking metrics per request on the combined score: NDCG@k, recall@k, MRR.

Each request's rows are ranked by the combined score the scoring job ranks by (``combined_score``:
``prod_t p_t ** w_t`` over binary tasks times ``(1 + y_t) ** w_t`` over regression tasks, the
weights of ``[score]``). Per request, with torchmetrics' retrieval functions:

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
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.retrieval import (
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from recsys_moe.config import TaskConfig
from recsys_moe.evaluation.metrics import cat_state
from recsys_moe.model.objectives import output_name

F64 = torch.float64


def combined_score(
    tasks: list[TaskConfig], weights: dict[str, float], preds: dict[str, np.ndarray]
) -> np.ndarray:
    """The scoring job's ranking score (``serving.score.combined_score``) of ``preds`` (by
    ``output_name``): tasks without a weight (or weight 0) do not count."""
    n = len(next(iter(preds.values())))
    out = np.ones(n, dtype=np.float64)
    for t in tasks:
        w = weights.get(t.name, 0.0)
        if w == 0.0:
            continue
        p = np.asarray(preds[output_name(t)], dtype=np.float64)
        out *= (np.clip(p, 0.0, None) if t.kind == "binary" else 1.0 + p) ** w
    return out


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
        req, score = req[order], cat_state(self.scores)[order]
        rel, grade = cat_state(self.relevant)[order], cat_state(self.grades)[order]
        ids, sizes = torch.unique_consecutive(req, return_counts=True)
        out = {k: np.full(len(ids), math.nan) for k in names}
        splits = sizes.tolist()
        parts = zip(*(torch.split(x, splits) for x in (score, rel, grade)), strict=True)
        for i, (s, r, g) in enumerate(parts):
            if r.sum() > 0:
                for k in self.ks:
                    out[f"ndcg_at_{k}"][i] = float(retrieval_normalized_dcg(s, r, top_k=k))
                    out[f"recall_at_{k}"][i] = float(retrieval_recall(s, r, top_k=k))
                out["mrr"][i] = float(retrieval_reciprocal_rank(s, r))
            if self.graded and g.sum() > 0:
                for k in self.ks:
                    out[f"ndcg_graded_at_{k}"][i] = float(retrieval_normalized_dcg(s, g, top_k=k))
        return ids.numpy(), out

    def compute(self) -> dict[str, float]:
        _, values = self.per_request()
        return summarize(values)


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
