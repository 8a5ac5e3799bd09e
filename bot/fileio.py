"""Reading and replacing files the one way: a file's sha256, a YAML file as data, an atomic write.

Why here: bot is the bottom layer (serve -> bot <- finetune), so bundles, domain packs,
training recipes and serving settings can all use these two functions; before, each of the
four YAML readers had its own wording for the same three failures, and two modules hashed
files with their own loops.

`read_yaml` raises the caller's error class (a `SupportbotError` subclass: `ConfigError`,
`DataError`, `ResponsesError`, `SettingsError`), so each caller keeps its own error type while
the message has one shape: `<file>: cannot read: <reason>`, `<file>: not UTF-8 text`,
`<file>: line N: not valid YAML`, `<file>: nested too deeply`, `<file>: larger than N MiB`.

`parse_yaml` is the one place YAML text becomes data, for a file (`read_yaml`), an article's front
matter (bot/knowledge.py) and a recipe's `--set key=value` (finetune/config.py). PyYAML composes
and constructs nodes recursively, so a few thousand `[` exhaust Python's stack and raise
RecursionError, which is not a `yaml.YAMLError`: it is caught here, once, and reported as
"nested too deeply" in the caller's error class, never as a traceback.

`atomic_write_text` (and `atomic_write_bytes`, for a picture) is the one way to replace a small file a
person may be relying on (discovery output, review corrections): a temporary file in the same folder, flushed and fsynced, then
`os.replace`d, so a reader sees the old file or the new one, never half of one.

`check_output_folder` is the one check of a folder a command will write into (a bundle, an evaluation
report, discovery output), made before any work: the path is a folder or can be made one (its nearest
existing parent is a folder this process can create entries in, probed with an empty temporary folder
that is removed at once). Before, `--output plainfile/sub` or `--output /proc/x` failed with a traceback,
for `supportbot train` only after minutes of training.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import SupportbotError

CHUNK = 1 << 20


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8, newlines as given) to `path` atomically (`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def nearest_existing(path: Path) -> Path:
    """`path` itself when something is there, else its nearest ancestor that exists (the root at worst)."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def check_output_folder(
    path: str | Path, *, error: type[SupportbotError], name: str = "--output", beside: bool = False
) -> Path:
    """`path` as a Path when it is a folder or can be created as one; `error` (one line naming it) otherwise.

    Nothing is created: the nearest existing folder is probed with an empty temporary folder, removed again;
    with `beside`, the nearest existing parent of `path` (a bundle is written next to its folder and renamed)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{name} {path}: exists and is not a folder")
    parent = nearest_existing(path.absolute().parent if beside else path.absolute())
    if not parent.is_dir():
        raise error(f"{name} {path}: cannot be created: {parent} is not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".supportbot-probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise error(f"{name} {path}: cannot write in {parent}: {exc.strerror or exc}") from None
    return path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_yaml(path: str | Path, *, error: type[SupportbotError], max_bytes: int | None = None) -> Any:
    """The data in a YAML file (None for an empty file); unreadable or invalid YAML raises `error`."""
    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise error(f"{path}: larger than {max_bytes / (1 << 20):g} MiB")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    return parse_yaml(text, where=path, error=error)


def parse_yaml(text: str, *, where: str | Path, error: type[SupportbotError]) -> Any:
    """The data in YAML `text`; invalid or too deeply nested YAML raises `error` with one line starting with `where`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(f"{where}: {f'line {mark.line + 1}: ' if mark else ''}not valid YAML") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply") from None
