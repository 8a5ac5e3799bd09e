"""The model bundle: the one artifact that passes from finetune/ to bot/.

A directory holding `bundle.json` and safetensors weights (a head; a peft adapter plus a
head; or a full encoder plus a head), optionally the domain pack's `responses.yaml`.
`bundle.json` lists every file with its sha256; `load()` refuses a bundle whose format
version is foreign or whose files are missing or damaged, naming the bad file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import SupportbotError

FORMAT_VERSION = 1
MANIFEST = "bundle.json"


class BundleError(SupportbotError):
    """A bundle that cannot be used: missing, damaged, foreign, or built on other base weights."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version_id(files: dict[str, str], meta: dict[str, Any]) -> str:
    """Content hash over the files and what decides behaviour (labels, calibration)."""
    payload = json.dumps(
        {"files": files, "labels": meta.get("labels"), "calibration": meta.get("calibration")}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class Bundle:
    """A loaded, verified bundle directory."""

    path: Path
    meta: dict[str, Any] = field(repr=False)

    @property
    def version(self) -> str:
        return str(self.meta["version"])

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def strategy(self) -> str:
        return str(self.meta["strategy"])

    @property
    def calibration(self) -> dict[str, Any]:
        return dict(self.meta["calibration"])

    def file(self, name: str) -> Path | None:
        """Path of a listed file, or None when the bundle has no such file."""
        return self.path / name if name in self.meta["files"] else None


def write(out_dir: str | Path, meta: dict[str, Any], writers: dict[str, Callable[[Path], None]]) -> Bundle:
    """Write a bundle atomically: files go to a temporary sibling, which replaces `out_dir`.

    `writers` maps a relative file name to a function that writes that file. `meta` gets
    the format version, created time, file checksums and version id added.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, write_file in writers.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target)
        files = {name: _sha256(tmp / name) for name in sorted(writers)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": _version_id(files, meta),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **meta,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(path=out, meta=manifest)


def load(path: str | Path) -> Bundle:
    """Open and verify a bundle: manifest, format version, every file's presence and sha256."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"no model bundle at {folder} (not a directory)")
    if not manifest_path.is_file():
        raise BundleError(f"{folder} is not a supportbot bundle: {MANIFEST} is missing")
    try:
        meta = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is damaged: {exc}") from None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise BundleError(f"{manifest_path} is not a supportbot bundle manifest")
    if meta["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format {meta['format_version']!r} is not supported (this supportbot reads {FORMAT_VERSION})"
        )
    for key in ("version", "labels", "strategy", "calibration", "files", "base"):
        if key not in meta:
            raise BundleError(f"{manifest_path} lacks the field {key!r}")
    for name, expected in meta["files"].items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"bundle {folder}: file {name} is missing")
        if _sha256(file) != expected:
            raise BundleError(f"bundle {folder}: file {name} is damaged (sha256 does not match {MANIFEST})")
    return Bundle(path=folder.resolve(), meta=meta)
