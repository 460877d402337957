"""Embedding tower: pooled sparse embeddings concatenated with the dense features.

Notation: B batch, Dn dense features, D_in = Σ embedding dims of the pooled features + Dn.

    dense  [B, Dn] ─────────────────────────────┐
    sparse KJT (F keys, B bags each) ─► EBC ─► [B, Σ dims] ─► concat ─► [B, D_in]

A feature in ``averaged`` has its bag summed by the tables and divided here by the number of ids
in it (0 for an empty bag): the mean pooling of ``pooling = "mean"`` features, in the same fused
lookup as the summed ones (``model.summed_tables``).

``forward(dense, sparse) = combine(lookup(sparse), bag_sizes(sparse), dense, dtype)``: the
tables' lookups, then tensor work only (averaging, concat, cast), which training compiles with
the layers after it (``recsys_moe.training.module``).

The ``EmbeddingBagCollection`` is built elsewhere (``model.build_model``) and passed in, as in
TorchRec's ``SparseArch``, so that sharding can replace it without touching this module.

A numeric-only feature set has no tables: ``ebc=None``, the tower is the dense features
(``D_in = Dn``) and the batch's KJT has no keys (it is not read). The model then holds no
``EmbeddingBagCollection``, so sharding plans no table and the model trains as a dense module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, KeyedTensor


class EmbeddingTower(nn.Module):
    """``forward(dense [B, Dn], sparse KJT) -> [B, D_in]``: pooled embeddings in the order of the
    table configs (the same sharded or not), then the dense features."""

    def __init__(
        self, *, ebc: EmbeddingBagCollection | None, num_dense: int, averaged: Sequence[str] = ()
    ) -> None:
        super().__init__()
        if ebc is None and num_dense < 1:
            raise ValueError("the tower needs at least one feature (categorical or numeric)")
        self.ebc = ebc
        self.num_dense = num_dense
        configs = ebc.embedding_bag_configs() if ebc is not None else []
        # fixed here, before sharding: a sharded EBC groups its outputs by sharding type
        self._feature_names = [f for c in configs for f in c.feature_names]
        self._embedding_dim = sum(c.embedding_dim * len(c.feature_names) for c in configs)
        unknown = sorted(set(averaged) - set(self._feature_names))
        if unknown:
            raise ValueError(f"averaged features {unknown} have no table in the tower")
        self.averaged = list(averaged)
        # averaged features' rows in the KJT (the batch's keys are the tables' features, in
        # the configs' order: recsys_moe.data), and for each pooled column the scale it takes:
        # 0 = none (summed), 1 + m = 1 / ids in averaged feature m's bag
        dims = {f: c.embedding_dim for c in configs for f in c.feature_names}
        source = [1 + self.averaged.index(f) if f in self.averaged else 0
                  for f in self._feature_names for _ in range(dims[f])]  # fmt: skip
        rows = [self._feature_names.index(f) for f in self.averaged]
        self.register_buffer("_averaged_rows", torch.tensor(rows, dtype=torch.long), False)
        self.register_buffer("_column_scale", torch.tensor(source, dtype=torch.long), False)

    @property
    def out_dim(self) -> int:
        return self._embedding_dim + self.num_dense

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        if self.ebc is None:  # numeric-only: no tables, the KJT has no keys
            return dense
        lengths = self.bag_sizes(sparse)
        pooled = self.lookup(sparse)
        if isinstance(dense, torch.fx.Proxy):  # TorchRec's train pipeline traces the forward
            return self.combine(pooled, lengths, dense, None)
        return self.combine(pooled, lengths, dense, _compute_dtype(dense))

    def bag_sizes(self, sparse: KeyedJaggedTensor) -> Tensor | None:
        """What ``combine`` needs of the batch besides the lookups: the bags' lengths ``[F·B]``
        where some features are averaged (else ``None``)."""
        if not self.averaged or self.ebc is None:
            return None
        # combine reads the bags' lengths by position (not on the fx Proxy of a pipeline trace)
        if not isinstance(sparse, torch.fx.Proxy) and sparse.keys() != self._feature_names:
            raise ValueError(
                f"the batch's features {sparse.keys()} are not the tower's "
                f"{self._feature_names}, in that order"
            )
        return sparse.lengths()

    def lookup(self, sparse: KeyedJaggedTensor) -> Tensor | None:
        """The tables' pooled outputs ``[B, Σ D_f]`` in the configs' order (no tables: None)."""
        if self.ebc is None:
            return None
        pooled = self.ebc(sparse)  # KeyedTensor: [B, Σ D_f] in its keys' order
        if isinstance(pooled, KeyedTensor) and pooled.keys() == self._feature_names:
            # already in the configs' order (unsharded, or one sharding type; not the fx Proxy
            # of TorchRec's pipeline trace): no split into F tensors and concat (2F + 2 fewer
            # autograd nodes per step)
            return pooled.values()
        # several sharding types (or the trace): their parts in the configs' order, as one
        # tensor, so that the compiled step takes one input for them
        by_name = pooled.to_dict()  # feature name -> [B, D_f]
        return torch.cat([by_name[f] for f in self._feature_names], dim=1)

    def combine(
        self,
        pooled: Tensor | None,
        lengths: Tensor | None,
        dense: Tensor,
        dtype: torch.dtype | None,
    ) -> Tensor:
        """``[B, D_in]``: the lookups' output (``lookup``), the averaged features divided by
        their bags' sizes (``bag_sizes``), then the dense features, in ``dtype`` (that of the
        layers after it; ``None``: the dense features'). Tensors only: training compiles it
        with the layers after it (``recsys_moe.training.module``)."""
        if pooled is None:  # numeric-only
            return dense
        if self.averaged:
            assert lengths is not None, "averaged features need the bags' lengths"
            pooled = self._average(pooled, lengths)
        return self._concat(pooled, dense, dtype)

    def _average(self, pooled: Tensor, lengths: Tensor) -> Tensor:
        """The pooled columns ``[B, Σ D_f]`` with each averaged feature's sum divided by the
        ids in its bag (an empty bag stays 0)."""
        per_feature = lengths.view(len(self._feature_names), -1)  # [F, B]
        ids = per_feature.index_select(0, self._averaged_rows).t()  # [B, M]
        inverse = ids.clamp(min=1).to(pooled.dtype).reciprocal()
        scale = torch.nn.functional.pad(inverse, (1, 0), value=1.0)  # [B, 1 + M]: 1 = summed
        return pooled * scale.index_select(1, self._column_scale)

    @staticmethod
    def _concat(pooled: Tensor, dense: Tensor, dtype: torch.dtype | None) -> Tensor:
        """``[pooled, dense]`` in ``dtype`` (the next layers'; the lookups may already output
        it: ``train.sharding.embedding_output``), else the dense features' (float32). One
        concat, no float32 copy to be cast again by the first GEMM."""
        if isinstance(dense, torch.fx.Proxy):  # TorchRec's train pipeline traces the forward
            return torch.cat([pooled, dense], dim=1)
        dtype = dtype or dense.dtype
        return torch.cat([pooled.to(dtype), dense.to(dtype)], dim=1)


def _compute_dtype(dense: Tensor) -> torch.dtype:
    """The dtype the layers after the tower compute in: autocast's where it is on, else the
    dense features'."""
    kind = dense.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else dense.dtype
