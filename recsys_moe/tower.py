"""Embedding tower: pooled sparse embeddings concatenated with the dense features.

Notation: B batch, Dn dense features, D_in = Σ embedding dims of the pooled features + Dn.

    dense  [B, Dn] ─────────────────────────────┐
    sparse KJT (F keys, B bags each) ─► EBC ─► [B, Σ dims] ─► concat ─► [B, D_in]

The ``EmbeddingBagCollection`` is built elsewhere (``model.build_model``) and passed in, as in
TorchRec's ``SparseArch``, so that sharding can replace it without touching this module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor


class EmbeddingTower(nn.Module):
    """``forward(dense [B, Dn], sparse KJT) -> [B, D_in]``: pooled embeddings (EBC order), dense."""

    def __init__(self, *, ebc: EmbeddingBagCollection, num_dense: int) -> None:
        super().__init__()
        self.ebc = ebc
        self.num_dense = num_dense
        self._embedding_dim = sum(
            c.embedding_dim * len(c.feature_names) for c in ebc.embedding_bag_configs()
        )

    @property
    def out_dim(self) -> int:
        return self._embedding_dim + self.num_dense

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        pooled = self.ebc(sparse).values()  # [B, Σ dims]
        return torch.cat([pooled, dense], dim=1)
