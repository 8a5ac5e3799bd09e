"""The ONNX Runtime backend: a bundle's serving graph (model.onnx) run by onnxruntime.

Why: one customer message through MiniLM in eager PyTorch pays Python and dispatcher overhead
on every op; ONNX Runtime runs the same arithmetic from one fused graph, about 3x faster per
message on a CPU (BENCHMARKS.md, "Serving backends"). Training stays on PyTorch; the graph is
written from the trained bundle by finetune/export.py and passes a parity gate there.

Decisions:
- The graph is text-free: token ids and attention mask in; out the pooled unit vectors (which
  knowledge retrieval reuses) and the raw logits (encoder with any LoRA adapter merged, mean
  pooling, L2 normalisation, head). Tokenising, batching by length,
  temperature and thresholds stay in Python, shared with the torch backend (bot/encoder.py,
  bot/classifier.py), so the two backends differ only in who multiplies the matrices.
- Graph optimisations (ORT_ENABLE_ALL: constant folding, LayerNorm/GELU/attention fusions) run
  at session start, not at export: the optimised graph depends on the CPU it runs on, the
  exported one does not.
- Threads: intra-op threads are the process's share of the cores (`serving_threads`, the same
  figure torch gets); inter-op is 1 (one sequential graph per call). Spinning is off: an idle
  ORT worker that spins takes a core from the event loop and the batcher, which are what hand
  the model its next batch (measured in bench/bench_backends.py: BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bundle import Bundle, BundleError
from .encoder import load_tokenizer, run_batched

GRAPH_FILE = "model.onnx"

# Whether idle ORT workers spin. Off for serving (see the module docstring); bench/bench_backends.py
# turns it on in one child process to measure what it would cost.
SPINNING = False


def graph_path(bundle: Bundle) -> Path | None:
    """The bundle's ONNX serving graph, or None when it has none (an older bundle, or a failed export)."""
    graph = bundle.manifest.onnx
    return bundle.file(graph.file) if graph is not None else None


def session_options(threads: int) -> Any:
    """ONNX Runtime session options for serving with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    spin = "1" if SPINNING else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    return options


class OnnxBackend:
    """Logits for texts from an ONNX graph; thread-safe (`InferenceSession.run` is re-entrant)."""

    name = "onnx"

    def __init__(self, graph: Path, tokenizer: Any, max_length: int, n_labels: int, *, threads: int):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(graph), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise BundleError(f"{graph}: ONNX Runtime cannot load the graph: {str(exc).splitlines()[0]}") from None
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if inputs != {"input_ids", "attention_mask"} or set(outputs) != {"embeddings", "logits"}:
            raise BundleError(f"{graph}: expected inputs input_ids, attention_mask and outputs embeddings, logits; "
                              "run `supportbot export` on the bundle again")
        width = outputs["embeddings"].shape[-1]
        if not isinstance(width, int):
            raise BundleError(f"{graph}: the embeddings output has no fixed width")
        self.dim = width
        self.graph = graph
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.n_labels = n_labels
        self.threads = threads

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, threads: int) -> OnnxBackend:
        graph = graph_path(bundle)
        if graph is None:
            raise BundleError(f"bundle {bundle.path} has no ONNX graph; run `supportbot export {bundle.path}` or serve on torch")
        manifest = bundle.manifest
        tokenizer = load_tokenizer(manifest.base.id)
        return cls(graph, tokenizer, manifest.encoder.max_length, len(bundle.labels), threads=threads)

    def _run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: np.ascontiguousarray(batch[name].numpy(), dtype=np.int64) for name in ("input_ids", "attention_mask")}
        embeddings, logits = self.session.run(["embeddings", "logits"], feeds)
        return torch.from_numpy(np.concatenate([embeddings, logits], axis=1).astype(np.float32, copy=False))

    def embed_and_logits(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        both = run_batched(self.tokenizer, self.max_length, texts, self._run, self.dim + self.n_labels, batch_size=batch_size)
        return both[:, : self.dim], both[:, self.dim :]
