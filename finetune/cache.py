"""On-disk cache of frozen-base embeddings, keyed by base-weights hash + max length + precision + text.

The `head` strategy embeds every text once; a second run over the same data reads the
vectors back instead of running the encoder.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bot import paths
from bot.encoder import Encoder
from bot.precision import REVISIONS


def default_cache_dir() -> Path:
    """The embedding cache folder (bot.paths)."""
    return paths.cache_dir()


class EmbeddingCache:
    def __init__(self, folder: str | Path, base_sha256: str, max_length: int, precision: str = "fp32"):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"embeddings-{base_sha256[:16]}.sqlite"
        # fp32 keys stay as they were before int8 existed, so old caches remain valid
        self._prefix = f"{max_length}\0" if precision == "fp32" else f"{max_length}\0{REVISIONS[precision]}\0"
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")

    def _key(self, text: str) -> bytes:
        return hashlib.sha1(f"{self._prefix}{text}".encode()).digest()

    def embed(self, encoder: Encoder, texts: Sequence[str], *, batch_size: int = 64, progress: bool = True) -> tuple[torch.Tensor, int]:
        """Embeddings for `texts` (input order) and how many had to be computed."""
        keys = [self._key(t) for t in texts]
        found: dict[bytes, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, vec in self._db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk):
                found[key] = np.frombuffer(vec, dtype=np.float32)
        todo = sorted({i for i, k in enumerate(keys) if k not in found}, key=lambda i: keys[i])
        unique_todo = list({keys[i]: i for i in todo}.values())
        if unique_todo:
            fresh = encoder.embed([texts[i] for i in unique_todo], batch_size=batch_size, progress=progress).numpy()
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)",
                    [(keys[i], fresh[j].astype(np.float32).tobytes()) for j, i in enumerate(unique_todo)],
                )
            for j, i in enumerate(unique_todo):
                found[keys[i]] = fresh[j]
        matrix = np.stack([found[k] for k in keys]) if keys else np.zeros((0, encoder.dim), dtype=np.float32)
        return torch.from_numpy(matrix.astype(np.float32)), len(unique_todo)

    def close(self) -> None:
        self._db.close()
