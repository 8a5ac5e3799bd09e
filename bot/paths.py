"""Where supportbot keeps its files: the data folder, the embedding cache and the default model.

Decision: one module resolves these folders, and it lives in bot/ because bot is the lowest
layer (serve and finetune import from it, never the other way round). Before, the data folder
was resolved three ways (serve settings, the session store, the embedding cache) and each
could drift from the others. Functions, not constants, so the environment is read when the
path is needed (tests and the CLI set it after import).

- data folder: $SUPPORTBOT_DATA_DIR, else ./.supportbot (sessions, outbox, terminal history);
- embedding cache: <data folder>/cache when $SUPPORTBOT_DATA_DIR is set, else
  $XDG_CACHE_HOME/supportbot (~/.cache/supportbot), so training outside a deployment does not
  fill the working directory;
- default model: $SUPPORTBOT_MODEL, else models/default (configs/default.yaml's output).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "SUPPORTBOT_DATA_DIR"
MODEL_ENV = "SUPPORTBOT_MODEL"
DEFAULT_DATA_DIR = Path(".supportbot")
DEFAULT_MODEL_DIR = Path("models/default")
SESSIONS_FILE = "sessions.sqlite3"
CACHE_FOLDER = "cache"


def data_dir() -> Path:
    """$SUPPORTBOT_DATA_DIR, else ./.supportbot."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def sessions_path(folder: Path | None = None) -> Path:
    """The SQLite session store in `folder` (default: the data folder)."""
    return (folder if folder is not None else data_dir()) / SESSIONS_FILE


def cache_dir() -> Path:
    """<data folder>/cache when $SUPPORTBOT_DATA_DIR is set, else $XDG_CACHE_HOME/supportbot."""
    if os.environ.get(DATA_DIR_ENV):
        return data_dir() / CACHE_FOLDER
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "supportbot"


def model_dir() -> Path:
    """$SUPPORTBOT_MODEL, else models/default."""
    return Path(os.environ.get(MODEL_ENV) or DEFAULT_MODEL_DIR)
