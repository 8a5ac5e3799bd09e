"""Exporting a bundle's serving graph to ONNX, behind a parity gate (`supportbot export`, and the end of training).

Decisions:
- Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), PyTorch's maintained
  exporter. optimum's exporter wraps the same torch.onnx call with per-architecture configs for
  Hugging Face models; our graph is not a Hugging Face model but encoder + mean pooling + our own
  head, which optimum would need a custom config for, and it would add a dependency for no better
  graph. The legacy TorchScript exporter (dynamo=False) is deprecated upstream.
- What is exported is what the torch backend serves: the bundle is loaded through
  `TorchBackend.from_bundle` (LoRA merged, full weights attached), so export cannot drift from
  serving. Inputs `input_ids` and `attention_mask` with dynamic batch and sequence axes; output
  the pooled unit vectors `embeddings` (knowledge retrieval reuses them) and the raw `logits`
  (temperature and thresholds are applied in bot/classifier.py for both backends).
- The parity gate: on the bundle's validation texts, the graph run as it will serve (ONNX
  Runtime, ORT_ENABLE_ALL, bot/onnx_backend.py) must give the torch probabilities (after the
  bundle's temperature) and pooled vectors within `tolerance` (max absolute difference, default
  1e-4) and the same argmax for every text. If not, nothing is written: the bundle keeps serving on PyTorch.
- The graph joins the bundle's file list with its sha256 like every other file (the bundle is
  rewritten atomically through bot/bundle.py), and bundle.json gains an `onnx` section: file,
  opset, exporter, parity figures. A bundle without that section serves on torch, so bundles
  written before this module load unchanged; the format version stays 1.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bot import bundle as bundle_mod
from bot.bundle import Bundle, BundleError, OnnxGraph
from bot.classifier import IntentClassifier, TorchBackend, configure_threads
from bot.encoder import Encoder
from bot.heads import IntentHead
from bot.onnx_backend import GRAPH_FILE, OnnxBackend
from bot.threads import serving_threads

OPSET = 18
DEFAULT_TOLERANCE = 1e-4


class ExportError(BundleError):
    """The graph could not be exported (exporter missing, unsupported bundle); the bundle is unchanged."""


class ParityError(ExportError):
    """The exported graph does not reproduce the torch probabilities; the bundle is unchanged."""


class ServingGraph(nn.Module):
    """token ids + attention mask -> logits: the body, the shared mean pooling + normalisation, the head."""

    def __init__(self, encoder: Encoder, head: IntentHead):
        super().__init__()
        self.encoder = encoder
        self.body = encoder.model
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.encoder.forward(self.body, {"input_ids": input_ids, "attention_mask": attention_mask})
        logits: torch.Tensor = self.head(pooled)
        return pooled, logits


@dataclass
class Parity:
    texts: int
    max_abs_diff: float
    tolerance: float
    argmax_disagreements: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_disagreements == 0

    def as_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "argmax_disagreements": self.argmax_disagreements}


def export_graph(backend: TorchBackend, out: Path) -> None:
    """Write `backend`'s encoder + pooling + head as one ONNX graph with dynamic batch and sequence axes."""
    graph = ServingGraph(backend.encoder, backend.head).eval()
    sample = backend.encoder.tokenize(["where is my order", "hi"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with the install hint, not deep inside torch)
    except ImportError:
        raise ExportError("the ONNX exporter is not installed: pip install 'supportbot[export]'") from None
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and the like are not ours to act on
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (sample["input_ids"], sample["attention_mask"]), str(out), dynamo=True, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["embeddings", "logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            external_data=False, verbose=False, report=False,
        )
    exporter_log.setLevel(level)


def check_parity(torch_classifier: IntentClassifier, onnx: OnnxBackend, texts: list[str], tolerance: float) -> Parity:
    """Compare the two backends' calibrated probabilities on `texts`."""
    ref_vectors, ref_logits = torch_classifier.embed_and_logits(texts)
    vectors, logits = onnx.embed_and_logits(texts)
    reference, candidate = torch_classifier.probabilities(ref_logits), torch_classifier.probabilities(logits)
    # probabilities decide answers; the pooled vectors decide knowledge retrieval: both within the tolerance
    diff = max(float((reference - candidate).abs().max()), float((ref_vectors - vectors).abs().max())) if len(texts) else 0.0
    disagreements = int((reference.argmax(-1) != candidate.argmax(-1)).sum())
    return Parity(len(texts), diff, tolerance, disagreements)


def validation_texts(bundle: Bundle, data: str | None = None) -> list[str]:
    """The texts the bundle was validated on (its recipe's split, re-derived), or every text of `data`."""
    from . import data as data_mod
    from .config import recipe_of
    from .loop import prepare_data

    if data is not None:
        splits = data_mod.load(data)
        return [str(t) for split in splits.values() for t in split["text"]]
    try:
        prepared = prepare_data(recipe_of(bundle))
    except (BundleError, data_mod.DataError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"cannot re-read the bundle's validation texts ({first}); pass --data SPEC") from None
    return [str(t) for t in prepared.val["text"]]


def export_bundle(
    path: str | Path,
    *,
    texts: list[str] | None = None,
    data: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> tuple[Bundle, dict[str, Any]]:
    """Export `path`'s serving graph, gate it on parity, and rewrite the bundle with it.

    Raises ExportError (ParityError for a failed gate) and leaves the bundle as it was.
    Returns the rewritten bundle and a summary.
    """
    started = time.perf_counter()
    configure_threads()
    bundle = bundle_mod.load(path)
    precision = bundle.manifest.encoder.precision
    if precision != "fp32":
        raise ExportError(f"bundle {bundle.path} runs its encoder at {precision} (bot/precision.py): served by PyTorch only")
    if texts is None:
        texts = validation_texts(bundle, data)
    if not texts:
        raise ExportError(f"no texts to check parity on for {bundle.path}; pass --data SPEC")
    torch_classifier = IntentClassifier.from_bundle(bundle.path, backend="torch")
    backend = torch_classifier.backend
    assert isinstance(backend, TorchBackend)
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=bundle.path.parent) as tmp:
        graph_file = Path(tmp) / GRAPH_FILE
        log(f"exporting the serving graph of {bundle.path.name} (torch.onnx, opset {OPSET})...")
        try:
            export_graph(backend, graph_file)
        except ExportError:
            raise
        except Exception as exc:  # the exporter's failures are many and untyped
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(f"torch.onnx could not export the graph: {type(exc).__name__}: {first[:200]}") from None
        onnx = OnnxBackend(graph_file, backend.encoder.tokenizer, backend.encoder.max_length, len(bundle.labels),
                           threads=serving_threads())
        log(f"parity check on {len(texts)} validation texts...")
        parity = check_parity(torch_classifier, onnx, texts, tolerance)
        if not parity.passed:
            raise ParityError(
                f"parity gate failed: max |p_onnx - p_torch| = {parity.max_abs_diff:.2e} (tolerance {tolerance:.0e}), "
                f"{parity.argmax_disagreements} of {parity.texts} labels differ"
            )
        import onnx as onnx_pkg

        info = OnnxGraph(
            file=GRAPH_FILE, opset=OPSET,
            exporter=f"torch.onnx (dynamo) {torch.__version__.split('+')[0]}, onnx {onnx_pkg.__version__}",
            parity=parity.as_dict(),
        )
        del onnx
        rewritten = add_files(bundle, {GRAPH_FILE: graph_file}, {"onnx": info.model_dump(mode="json")})
    summary = {
        "bundle": str(rewritten.path),
        "graph": GRAPH_FILE,
        "graph_mb": round((rewritten.path / GRAPH_FILE).stat().st_size / 1e6, 1),
        "parity_texts": parity.texts,
        "parity_max_abs_diff": f"{parity.max_abs_diff:.1e}",
        "parity_tolerance": f"{tolerance:.0e}",
        "argmax_disagreements": parity.argmax_disagreements,
        "version": rewritten.version,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return rewritten, summary


def add_files(bundle: Bundle, files: dict[str, Path], meta_update: dict[str, Any]) -> Bundle:
    """Rewrite `bundle` in place (atomically, through bot/bundle.py) with `files` added and `meta_update` merged."""
    return bundle_mod.rewrite(bundle, bundle.path, meta_update=meta_update,
                              writers={name: bundle_mod.file_copier(source) for name, source in files.items()})
