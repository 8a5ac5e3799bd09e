"""The classification head that sits on pooled sentence vectors (trained in finetune/, run in bot/)."""

from __future__ import annotations

import torch
from torch import nn


class IntentHead(nn.Module):
    """Linear layer, or a bottleneck MLP when `hidden` > 0, over L2-normalised embeddings.

    Normalised vectors have unit length, so raw logits would be tiny; `scale` multiplies the
    input back to a range where a plain linear layer trains quickly with default init.
    """

    def __init__(self, dim: int, n_labels: int, *, hidden: int = 0, dropout: float = 0.1, scale: float = 10.0):
        super().__init__()
        self.scale = scale
        if hidden > 0:
            self.layers = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_labels)
            )
        else:
            self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_labels))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(embeddings * self.scale)
        return out
