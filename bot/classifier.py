"""Intent classification at run time: a verified bundle turned into calibrated predictions.

One classifier, two backends that compute the same pooled vectors and logits: `onnx` runs the
bundle's ONNX serving graph in ONNX Runtime (bot/onnx_backend.py), `torch` runs the encoder and
head in PyTorch. ONNX is the default wherever the bundle has a graph (it passed the parity gate
when it was exported, finetune/export.py); a bundle without one serves on torch. Temperature,
floor and gap are applied here, after either backend, so calibration does not depend on the backend.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import load_file

from . import bundle as bundle_mod
from .bundle import Bundle, BundleError
from .encoder import Encoder, base_weights_sha256, resolve_base
from .heads import IntentHead
from .onnx_backend import OnnxBackend, graph_path
from .precision import apply_precision
from .strategies import serving_strategy
from .threads import serving_threads

Backend = Literal["onnx", "torch"]
BACKENDS: tuple[str, ...] = ("onnx", "torch")


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
    """Use the process's share of the cores for intra-op work (torch's default can be 1 in containers)."""
    wanted = serving_threads(num_threads)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def choose_backend(bundle: Bundle, requested: str | None = None) -> Backend:
    """The backend to serve `bundle` on: `requested`, else $SUPPORTBOT_BACKEND, else onnx when the bundle has a graph."""
    wanted = requested or os.environ.get("SUPPORTBOT_BACKEND") or None
    if wanted is None:
        return "onnx" if graph_path(bundle) is not None else "torch"
    if wanted == "onnx":
        return "onnx"
    if wanted == "torch":
        return "torch"
    raise BundleError(f"unknown backend {wanted!r}: expected one of {', '.join(BACKENDS)}")


class ClassifierBackend(Protocol):
    """What computes (pooled unit vectors, raw logits) for texts, rows in input order."""

    name: str

    def embed_and_logits(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchBackend:
    """The encoder (any adapter merged, any precision applied) and the head, in eager PyTorch."""

    name = "torch"

    def __init__(self, encoder: Encoder, head: IntentHead):
        self.encoder = encoder
        self.head = head.eval()
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TorchBackend:
        manifest = bundle.manifest
        encoder = Encoder.load(manifest.base.id, max_length=manifest.encoder.max_length)
        serving_strategy(bundle).attach(bundle, encoder)  # lora adapter, full weights, ... (bot/strategies.py)
        encoder.model = apply_precision(encoder.model, manifest.encoder.precision)
        settings = manifest.head
        head = IntentHead(encoder.dim, len(bundle.labels), hidden=settings.hidden, dropout=settings.dropout, scale=settings.scale)
        head.load_state_dict(load_file(str(bundle.path / "head.safetensors")))
        return cls(encoder, head)

    def embed_and_logits(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock, torch.inference_mode():
            embeddings = self.encoder.embed(texts, batch_size=batch_size)
            logits: torch.Tensor = self.head(embeddings)
            return embeddings, logits


class IntentClassifier:
    """Predicts intents for a batch of texts with a bundle's backend, temperature and floor."""

    def __init__(self, bundle: Bundle, backend: ClassifierBackend):
        self.bundle = bundle
        self.backend = backend
        self.labels = bundle.labels
        calibration = bundle.calibration
        self.temperature = calibration.temperature
        self.confidence_floor = calibration.confidence_floor
        self.ambiguity_gap = calibration.ambiguity_gap

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @classmethod
    def from_bundle(
        cls, path: str | Path, *, backend: str | None = None, num_threads: int | None = None
    ) -> IntentClassifier:
        """Load a verified bundle on `backend` (default: `choose_backend`)."""
        configure_threads(num_threads)
        bundle = bundle_mod.load(path)
        _check_base(bundle)
        chosen = choose_backend(bundle, backend)
        runner: ClassifierBackend
        if chosen == "onnx":
            runner = OnnxBackend.from_bundle(bundle, threads=serving_threads(num_threads))
        else:
            runner = TorchBackend.from_bundle(bundle)
        return cls(bundle, runner)

    def logits(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Raw (uncalibrated) logits, rows in input order."""
        return self.embed_and_logits(texts, batch_size=batch_size)[1]

    def embed_and_logits(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled unit vectors, raw logits), rows in input order: one pass of the backend for both."""
        return self.backend.embed_and_logits(texts, batch_size=batch_size)

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
