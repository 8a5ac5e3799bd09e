"""The model bundle: the one artifact that passes from finetune/ to bot/.

A directory holding `bundle.json` and safetensors weights (a head; a peft adapter plus a
head; or a full encoder plus a head), optionally the domain pack's `responses.yaml`.
`bundle.json` lists every file with its sha256; `load()` refuses a bundle whose format
version is foreign or whose files are missing or damaged, naming the bad file.

bundle.json has a schema, `Manifest` (pydantic): the writer (finetune/train.py) builds it and every
reader (bot/classifier.py, finetune/evaluate.py, ...) reads typed fields, so a default such as
"a bundle without `encoder.precision` serves fp32" is written once, here. The JSON on disk is
unchanged by the schema (format 1); sections the schema does not name pass through untouched.

`load()` also checks that the head's output size (head.safetensors, read from its header without
loading the weights) equals the number of `labels`: bundle.json is not among the checksummed files,
so a hand-edited label list passed the sha256 checks and failed later in torch ("size mismatch").

What `write()` may replace (decision): a bundle (a folder with bundle.json whose other entries are
all files it lists: retraining into models/default is the normal flow) or an empty folder. Anything
else at the path (a folder with other files, a plain file) is a person's and is refused, before
anything is written, by `check_output`; commands call it before they train, so the refusal comes
first, not after minutes of work. Before, such a folder was deleted and a plain file was renamed to
a hidden `.NAME.old-PID`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SupportbotError
from .fileio import check_output_folder, sha256_file
from .precision import Precision

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
HEAD = "head.safetensors"


class BundleError(SupportbotError):
    """A bundle that cannot be used: missing, damaged, foreign, or built on other base weights."""


# ---- the manifest (bundle.json) as a schema -------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")  # a newer writer may add a field; this reader keeps it


class BaseWeights(_Section):
    """The pretrained base the bundle was trained on, and the sha256 of its weight files."""

    id: str
    sha256: str


class EncoderSettings(_Section):
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = Field(ge=1)
    precision: Precision = "fp32"  # bundles from before int8 have no precision: they serve fp32


class HeadSettings(_Section):
    hidden: int = Field(default=0, ge=0)
    dropout: float = 0.1
    scale: float = 10.0


class Calibration(_Section):
    """Fitted on validation data: data of a model version, never constants in code."""

    temperature: float = Field(gt=0)
    confidence_floor: float = Field(ge=0, le=1)
    ambiguity_gap: float = Field(ge=0, le=1)
    method: str = ""
    objective: float | None = None


class TrainingRecord(_Section):
    """How the bundle was made: the recipe as used (finetune's TrainConfig, stored as JSON) and the run's counts."""

    config: dict[str, Any] | None = None
    data_fingerprint: str | None = None
    n_train: int | None = None
    n_validation: int | None = None
    n_train_out_of_scope: int | None = None
    epochs_run: int | None = None
    history: list[dict[str, float]] = []
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    seconds: float | None = None
    # set when the model was refitted on train + validation (TrainConfig.refit): the epochs each supervised
    # phase trained there; n_train then counts the validation examples too, and the history and the
    # validation metrics are the first run's (the one validation chose on)
    refit_epochs: list[int] | None = None


class OnnxGraph(_Section):
    """The ONNX serving graph (finetune/export.py, bot/onnx_backend.py); a bundle without it serves on torch."""

    file: str = "model.onnx"
    opset: int | None = None
    exporter: str = ""
    parity: dict[str, Any] = {}  # texts, max_abs_diff, tolerance, argmax_disagreements: what the export gate measured


class ManifestBody(_Section):
    """What a trainer writes into bundle.json; `write` adds the stamp fields of `Manifest`.

    Sections no model here names (a feature's own, e.g. knowledge passages) pass through as
    they are: `extra="allow"` keeps them on read and on write.
    """

    base: BaseWeights
    strategy: str
    labels: list[str] = Field(min_length=1)
    out_of_scope_label: str = "oos"
    encoder: EncoderSettings
    head: HeadSettings = HeadSettings()
    lora: dict[str, Any] | None = None  # the strategy's settings (lora: r, alpha, dropout, target_modules)
    calibration: Calibration
    metrics: dict[str, Any] = {}
    training: TrainingRecord = TrainingRecord()
    onnx: OnnxGraph | None = None


class Manifest(ManifestBody):
    """bundle.json: the body plus format, version id, creation time and every file's sha256."""

    format_version: int
    version: str
    created: str = ""
    files: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """As written to disk: stamp fields first, then the body in schema order, `files` last."""
        data = self.model_dump(mode="json")
        stamp = {key: data.pop(key) for key in ("format_version", "version", "created")}
        files = data.pop("files")
        return {**stamp, **data, "files": files}


def _version_id(files: dict[str, str], body: ManifestBody) -> str:
    """Content hash over the files and what decides behaviour (labels, calibration)."""
    payload = json.dumps(
        {"files": files, "labels": body.labels, "calibration": body.calibration.model_dump(mode="json")}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class Bundle:
    """A loaded, verified bundle directory."""

    path: Path
    manifest: Manifest

    @property
    def meta(self) -> dict[str, Any]:
        """The manifest as JSON (what bundle.json holds), for sections the schema leaves untyped."""
        return self.manifest.to_json()

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def strategy(self) -> str:
        return self.manifest.strategy

    @property
    def calibration(self) -> Calibration:
        return self.manifest.calibration

    def file(self, name: str) -> Path | None:
        """Path of a listed file, or None when the bundle has no such file."""
        return self.path / name if name in self.manifest.files else None


def check_output(out_dir: str | Path, *, name: str = "--output") -> Path:
    """`out_dir` as a Path when `write` may put a bundle there (see the module docstring); BundleError otherwise."""
    out = check_output_folder(out_dir, error=BundleError, name=name, beside=True)
    if not out.is_dir():
        return out
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return out
    if MANIFEST not in entries:
        raise BundleError(f"{name} {out}: a folder that is not a model bundle (it holds {_some(entries)}): "
                          "refusing to replace it; name a new or empty folder, or a bundle")
    try:
        listed = json.loads((out / MANIFEST).read_text()).get("files") or {}
        known = {MANIFEST, *(Path(str(file)).parts[0] for file in listed)}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return out  # a damaged bundle: replacing it is how it is mended
    others = [entry for entry in entries if entry not in known]
    if others:
        raise BundleError(f"{name} {out}: a model bundle that also holds {_some(others)}, which is not part of it: "
                          "refusing to replace it; move those files away or name another folder")
    return out


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def write(
    out_dir: str | Path, body: ManifestBody | Mapping[str, Any], writers: Mapping[str, Callable[[Path], None]]
) -> Bundle:
    """Write a bundle atomically: files go to a temporary sibling, which replaces `out_dir`.

    `writers` maps a relative file name to a function that writes that file. `body` (validated
    against `ManifestBody` when given as a mapping) gets the format version, created time, file
    checksums and version id added. What is at `out_dir` is replaced only when `check_output` allows it.
    """
    check_output(out_dir, name="bundle output")
    body = body if isinstance(body, ManifestBody) else ManifestBody.model_validate(dict(body))
    body_json = body.model_dump(mode="json")
    for stamp in ("format_version", "version", "created", "files"):  # a copied manifest's stamps are replaced
        body_json.pop(stamp, None)
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, write_file in writers.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target)
        files = {name: sha256_file(tmp / name) for name in sorted(writers)}
        manifest = Manifest.model_validate({
            **body_json,
            "format_version": FORMAT_VERSION,
            "version": _version_id(files, body),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": files,
        })
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
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
    return Bundle(path=out, manifest=manifest)


def rewrite(
    source: Bundle, out_dir: str | Path, *, meta_update: Mapping[str, Any], writers: Mapping[str, Callable[[Path], None]],
    drop: Sequence[str] = (),
) -> Bundle:
    """A copy of `source` written atomically to `out_dir` (which may be `source`'s own folder): its files byte for
    byte except those in `drop` or `writers`, then `writers`' files; its manifest with `meta_update` merged."""
    meta = {key: value for key, value in source.meta.items() if key not in ("format_version", "version", "created", "files")}
    meta.update(meta_update)
    files: dict[str, Callable[[Path], None]] = {
        name: file_copier(source.path / name) for name in source.manifest.files if name not in drop and name not in writers
    }
    files.update(writers)
    return write(out_dir, meta, files)


def file_copier(source: Path) -> Callable[[Path], None]:
    """A bundle file writer that copies `source` byte for byte."""

    def copy(target: Path) -> None:
        shutil.copyfile(source, target)

    return copy


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
    manifest = parse_manifest(meta, manifest_path)
    for name, expected in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise BundleError(f"bundle {folder}: file {name} is missing")
        if sha256_file(file) != expected:
            raise BundleError(f"bundle {folder}: file {name} is damaged (sha256 does not match {MANIFEST})")
    if HEAD in manifest.files:
        outputs = head_outputs(folder / HEAD)
        if outputs != len(manifest.labels):
            raise BundleError(f"bundle {folder}: {HEAD} has {outputs} outputs but {MANIFEST} lists "
                              f"{len(manifest.labels)} labels")
    return Bundle(path=folder.resolve(), manifest=manifest)


def head_outputs(path: Path) -> int:
    """The head's number of outputs: the rows of its last layer's weight, read from the safetensors header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as weights:
            names: list[str] = list(weights.keys())  # safe_open is not iterable
            layers = {int(key.split(".")[1]): key for key in names
                      if key.startswith("layers.") and key.endswith(".weight") and key.split(".")[1].isdigit()}
            shape = weights.get_slice(layers[max(layers)]).get_shape() if layers else []
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"bundle {path.parent}: {path.name} is not readable: {exc}") from None
    if len(shape) != 2:
        raise BundleError(f"bundle {path.parent}: {path.name} is not an intent head (no layers.N.weight matrix)")
    return int(shape[0])


def parse_manifest(meta: dict[str, Any], where: Path | str = MANIFEST) -> Manifest:
    """bundle.json's content as a `Manifest`; one line naming the first bad field otherwise."""
    try:
        return Manifest.model_validate(meta)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        if first["type"] == "missing":
            raise BundleError(f"{where} lacks the field {field!r}") from None
        raise BundleError(f"{where}: {field}: {first['msg']}") from None
