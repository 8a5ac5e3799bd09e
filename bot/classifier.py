"""Intent classification at run time: a verified bundle turned into calibrated predictions."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import bundle as bundle_mod
from .bundle import Bundle, BundleError
from .encoder import Encoder, base_weights_sha256, resolve_base
from .heads import IntentHead
from .precision import apply_precision
from .strategies import serving_strategy


@dataclass(frozen=True)
class Prediction:
    """One text's prediction. `confidence` is the temperature-scaled top probability."""

    label: str
    confidence: float
    ranking: list[tuple[str, float]] = field(default_factory=list)
    out_of_scope: bool = False
    # The pooled sentence vector the intents were read from; knowledge retrieval reuses it (bot/knowledge.py).
    embedding: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def margin(self) -> float:
        """Top-1 minus top-2 probability (1.0 when there is only one label)."""
        if len(self.ranking) < 2:
            return 1.0
        return self.ranking[0][1] - self.ranking[1][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "confidence": self.confidence,
            "out_of_scope": self.out_of_scope,
            "ranking": [{"name": name, "confidence": p} for name, p in self.ranking],
        }


def configure_threads(num_threads: int | None = None) -> None:
    """Use every core for intra-op work unless told otherwise (torch's default can be 1 in containers)."""
    wanted = num_threads or int(os.environ.get("SUPPORTBOT_THREADS", "0")) or (os.cpu_count() or 1)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


class IntentClassifier:
    """Predicts intents for a batch of texts with a bundle's encoder, head, temperature and floor."""

    def __init__(self, bundle: Bundle, encoder: Encoder, head: IntentHead):
        self.bundle = bundle
        self.encoder = encoder
        self.head = head.eval()
        self.labels = bundle.labels
        calibration = bundle.calibration
        self.temperature = calibration.temperature
        self.confidence_floor = calibration.confidence_floor
        self.ambiguity_gap = calibration.ambiguity_gap
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    @property
    def version(self) -> str:
        return self.bundle.version

    @classmethod
    def from_bundle(cls, path: str | Path, *, num_threads: int | None = None) -> IntentClassifier:
        configure_threads(num_threads)
        bundle = bundle_mod.load(path)
        manifest = bundle.manifest
        encoder = Encoder.load(manifest.base.id, max_length=manifest.encoder.max_length)
        _check_base(bundle)
        serving_strategy(bundle).attach(bundle, encoder)  # lora adapter, full weights, ... (bot/strategies.py)
        encoder.model = apply_precision(encoder.model, manifest.encoder.precision)
        settings = manifest.head
        head = IntentHead(encoder.dim, len(bundle.labels), hidden=settings.hidden, dropout=settings.dropout, scale=settings.scale)
        head.load_state_dict(load_file(str(bundle.path / "head.safetensors")))
        return cls(bundle, encoder, head)

    def logits(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Raw (uncalibrated) logits, rows in input order."""
        return self.embed_and_logits(texts, batch_size=batch_size)[1]

    def embed_and_logits(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled unit vectors, raw logits), rows in input order: one encoder pass for both."""
        with self._lock, torch.inference_mode():
            embeddings = self.encoder.embed(texts, batch_size=batch_size)
            logits: torch.Tensor = self.head(embeddings)
            return embeddings, logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, dim=-1)

    def predict(self, texts: Sequence[str], *, top_k: int = 5, batch_size: int = 64) -> list[Prediction]:
        if not texts:
            return []
        embeddings, logits = self.embed_and_logits(texts, batch_size=batch_size)
        return self.predictions_from_logits(logits, top_k=top_k, embeddings=embeddings)

    def predictions_from_logits(
        self, logits: torch.Tensor, *, top_k: int = 5, embeddings: torch.Tensor | None = None
    ) -> list[Prediction]:
        probs = self.probabilities(logits)
        k = min(top_k, len(self.labels))
        values, indices = probs.topk(k, dim=-1)
        predictions = []
        for row, (row_values, row_indices) in enumerate(zip(values.tolist(), indices.tolist())):
            ranking = [(self.labels[i], round(p, 6)) for i, p in zip(row_indices, row_values)]
            top_label, top_p = ranking[0]
            predictions.append(
                Prediction(label=top_label, confidence=top_p, ranking=ranking, out_of_scope=top_p < self.confidence_floor,
                           embedding=embeddings[row] if embeddings is not None else None)
            )
        return predictions


def _check_base(bundle: Bundle) -> None:
    base = bundle.manifest.base
    installed = base_weights_sha256(resolve_base(base.id))
    if installed != base.sha256:
        raise BundleError(
            f"bundle {bundle.path} was trained on {base.id} with weights sha256 {base.sha256[:12]}..., "
            f"but the base found here has {installed[:12]}...; retrain or install the matching base"
        )
