"""Domain packs shipped with supportbot (training examples, test set, responses)."""

from __future__ import annotations

from pathlib import Path

PACKS_DIR = Path(__file__).resolve().parent


def pack_path(name: str) -> Path:
    """Folder of a packaged domain pack; KeyError with a readable message when unknown."""
    folder = PACKS_DIR / name
    if not (folder / "nlu.yaml").is_file():
        known = sorted(p.name for p in PACKS_DIR.iterdir() if (p / "nlu.yaml").is_file())
        raise KeyError(f"pack:{name}: no such packaged domain pack (known: {', '.join(known) or 'none'})")
    return folder
