"""Reading labelled utterances from a data SPEC into `datasets` tables.

SPEC (docs/design.md, Data rules): a CSV, JSONL, JSON or YAML file; a folder holding `train.*` / `test.*`
(or `train/`, `dev/`, `test/` subfolders with one file each); a domain pack folder
(`nlu.yaml`, `test.yaml`); `pack:NAME` for a pack shipped with supportbot; CLINC150's
`{split: [[text, label], ...]}` JSON (with `oos` as out of scope); `hf:NAME` through
`datasets` (online only). A trailing `:SPLIT` picks one split (`data_full.json:test`).

Every problem is a `DataError` whose message is one line naming the file, the row and
what is wrong; the command line prints it and exits 2. That includes a file of the wrong shape
(a JSON number where a list of rows belongs, `{"train": null}`, `out_of_scope: 5`): each
container is checked where it is read, and the message says what was expected and what was found
(`_kind`), rather than a TypeError from iterating it. JSON nested deeper than the decoder can
follow raises RecursionError in `json.loads`; it is reported as "nested too deeply".
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from bot.errors import SupportbotError
from bot.fileio import read_yaml
from bot.validation import MAX_MESSAGE_CHARS

OOS_LABEL = "oos"
TEXT_COLUMNS = ("text", "utterance", "instruction", "query", "message", "content")  # content: Chatwoot's message field
LABEL_COLUMNS = ("label", "intent", "category")
SPLIT_NAMES = {
    "train": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test",
}
DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".yaml", ".yml")
MAX_TEXT_CHARS = MAX_MESSAGE_CHARS  # a training text may be as long as a customer message, no longer

csv.field_size_limit(1 << 24)


class DataError(SupportbotError):
    """Unusable training or evaluation data; the message is one line naming file, row and problem."""


@dataclass
class Rows:
    """Texts and labels read from one source, with the row number of each for error messages."""

    texts: list[str]
    labels: list[str]
    where: list[str]  # "file: row N", for error messages

    def extend(self, other: Rows) -> None:
        self.texts += other.texts
        self.labels += other.labels
        self.where += other.where


def load(spec: str, *, labelled: bool = True) -> DatasetDict:
    """Read SPEC into a DatasetDict with splits among train / validation / test (columns text, label).
    `labelled=False` (discovery reads chat logs): a CSV, JSONL or JSON table needs only a text column, and
    its labels are not read (empty), so a missing or blank label column is no error."""
    spec = str(spec)
    path_part, split = _split_suffix(spec)
    if path_part.startswith("hf:"):
        splits = _load_hub(path_part[3:])
    elif path_part.startswith("pack:"):
        splits = _load_folder(_pack_dir(path_part[5:]), labelled)
    else:
        path = Path(path_part).expanduser()
        if path.is_dir():
            splits = _load_folder(path, labelled)
        elif path.is_file():
            splits = _load_file(path, labelled)
        else:
            raise DataError(f"{path_part}: no such file or folder")
    if split is not None:
        if split not in splits:
            raise DataError(f"{path_part}: unknown split {split!r}; it has {', '.join(sorted(splits))}")
        splits = {"train" if split == "train" else split: splits[split]}
    return DatasetDict({name: _to_dataset(rows) for name, rows in splits.items()})


def evaluation_split(splits: DatasetDict) -> tuple[str, Dataset]:
    """The split to score on: test when there is one, else validation, else the whole file."""
    for name in ("test", "validation", "train"):
        if name in splits:
            return name, splits[name]
    raise DataError("no data to evaluate on")


def validate_training(rows: Dataset) -> None:
    """A class needs at least two examples (one to train on, one to validate)."""
    counts = Counter(rows["label"])
    for label, where in zip(rows["label"], rows["where"]):
        if counts[label] < 2:
            raise DataError(f"{where}: label {label!r} has only one example; give it at least 2")


def check_labels(dataset: Dataset, known: Sequence[str], *, model: str, name: str = "the data") -> None:
    """Labels of `dataset` (named `name`) that the model cannot predict, other than `oos`, make its scores on it
    meaningless: `evaluate` and training's held-out test split (--eval-data) both refuse them with this one line."""
    unknown = sorted(set(dataset["label"]) - set(known) - {OOS_LABEL})
    if unknown:
        shown = ", ".join(repr(label) for label in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DataError(f"{len(unknown)} label(s) in {name} are unknown to the model {model}: {shown}")


def fingerprint(*datasets: Dataset) -> str:
    """Order-independent sha256 of (text, label) pairs: names the training data in a bundle."""
    digest = hashlib.sha256()
    for dataset in datasets:
        for text, label in sorted(zip(dataset["text"], dataset["label"])):
            digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def stratified_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded per-label split: each label with n >= 2 puts round(n * fraction) (at least 1, at most n-1) aside."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(dataset["label"]):
        by_label[label].append(index)
    rng = random.Random(seed)
    train_idx, val_idx = [], []
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        n_val = min(max(1, round(len(indices) * fraction)), len(indices) - 1) if len(indices) > 1 else 0
        val_idx += indices[:n_val]
        train_idx += indices[n_val:]
    return dataset.select(sorted(train_idx)), dataset.select(sorted(val_idx))


def few_shot(dataset: Dataset, per_label: int, seed: int) -> Dataset:
    """Seeded subset with at most `per_label` examples of each label (k-shot benchmarks)."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(dataset["label"]):
        by_label[label].append(index)
    rng = random.Random(seed)
    keep = []
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        keep += indices[:per_label]
    return dataset.select(sorted(keep))


# ---- sources ---------------------------------------------------------------------------------


def _split_suffix(spec: str) -> tuple[str, str | None]:
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail in SPLIT_NAMES and not Path(spec).exists():
        return head, SPLIT_NAMES[tail]
    if sep and head and tail.isidentifier() and not Path(spec).exists() and Path(head).exists():
        raise DataError(f"{head}: unknown split {tail!r}; use one of train, validation (val, dev), test")
    return spec, None


def _pack_dir(name: str) -> Path:
    from bot.domains import pack_path

    try:
        return pack_path(name)
    except KeyError as exc:
        raise DataError(str(exc.args[0])) from None


def _to_dataset(rows: Rows) -> Dataset:
    return Dataset.from_dict({"text": rows.texts, "label": rows.labels, "where": rows.where})


def _load_folder(folder: Path, labelled: bool = True) -> dict[str, Rows]:
    splits: dict[str, Rows] = {}
    if (folder / "nlu.yaml").is_file():  # a domain pack
        splits["train"] = _read_pack_file(folder / "nlu.yaml")
        if (folder / "test.yaml").is_file():
            splits["test"] = _read_pack_file(folder / "test.yaml")
        return splits
    for entry in sorted(folder.iterdir()):
        split = SPLIT_NAMES.get(entry.stem.lower() if entry.is_file() else entry.name.lower())
        if split is None:
            continue
        if entry.is_file() and entry.suffix.lower() in DATA_SUFFIXES:
            rows = _read_table(entry, labelled=labelled)
        elif entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
            if len(files) != 1:
                raise DataError(f"{entry}: expected one data file in this split folder, found {len(files)}")
            rows = _read_table(files[0], labelled=labelled)
        else:
            continue
        if split in splits:
            raise DataError(f"{entry}: a second {split} split in {folder}")
        splits[split] = rows
    if "train" not in splits and "test" not in splits:
        raise DataError(f"{folder}: no train.* or test.* data file (csv, jsonl, json, yaml) and no nlu.yaml")
    return splits


def _load_file(path: Path, labelled: bool = True) -> dict[str, Rows]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and any(key in data for key in ("train", "val", "test")):
            return _read_clinc(path, data)
        return {"train": _read_table(path, _json_rows(path, data), labelled=labelled)}
    if suffix in (".yaml", ".yml"):
        return {"train": _read_pack_file(path)}
    return {"train": _read_table(path, labelled=labelled)}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply") from None


def _json_rows(path: Path, data: Any) -> list:
    """A JSON file's rows: its top level must be a list (of objects, which `_read_table` checks row by row)."""
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, one per row, got {_kind(data)}")
    return data


def _kind(value: object) -> str:
    """What a JSON or YAML value is, in the words of a "expected ..., got ..." message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a text"
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__


def _read_clinc(path: Path, data: dict) -> dict[str, Rows]:
    """CLINC150: {train, val, test, oos_train, oos_val, oos_test}: [[text, label], ...]; oos rows join their split."""
    splits: dict[str, Rows] = {}
    for key, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = Rows([], [], [])
        for part in (key, f"oos_{key}"):
            items = data.get(part, [])
            if not isinstance(items, list):
                raise DataError(f"{path}: {part}: expected a list of [text, label] rows, got {_kind(items)}")
            for number, item in enumerate(items, start=1):
                if not (isinstance(item, list) and len(item) == 2):
                    raise DataError(f"{path}: {part} row {number}: expected [text, label], got {str(item)[:60]!r}")
                rows.extend(_checked(path, f"{part} row {number}", item[0], item[1]))
        if rows.texts:
            splits[split] = rows
    return splits


def _read_pack_file(path: Path) -> Rows:
    data = read_yaml(path, error=DataError)
    if not isinstance(data, dict) or not isinstance(data.get("intents"), dict):
        raise DataError(f"{path}: expected a mapping with 'intents: {{name: {{examples: [...]}}}}'")
    rows = Rows([], [], [])
    for intent, body in data["intents"].items():
        examples = body.get("examples") if isinstance(body, dict) else None
        if not isinstance(examples, list):
            raise DataError(f"{path}: intent {intent!r}: expected a list under 'examples'")
        for number, text in enumerate(examples, start=1):
            rows.extend(_checked(path, f"intent {intent!r} example {number}", text, intent))
    out_of_scope = data.get("out_of_scope")
    if out_of_scope is not None and not isinstance(out_of_scope, list):
        raise DataError(f"{path}: expected a list of texts under 'out_of_scope', got {_kind(out_of_scope)}")
    for number, text in enumerate(out_of_scope or [], start=1):
        rows.extend(_checked(path, f"out_of_scope example {number}", text, OOS_LABEL))
    return rows


def _read_table(path: Path, records: list | None = None, *, labelled: bool = True) -> Rows:
    """CSV, JSONL, or a JSON list of objects, with recognised text and label columns (the label column
    not read when not `labelled`)."""
    suffix = path.suffix.lower()
    try:
        if records is not None:
            numbered = list(enumerate(records, start=1))
        elif suffix == ".csv":
            numbered = _csv_records(path)
        elif suffix == ".jsonl":
            numbered = _jsonl_records(path)
        elif suffix == ".json":
            numbered = list(enumerate(_json_rows(path, _read_json(path)), start=1))
        else:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use csv, jsonl, json or yaml")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not numbered:
        raise DataError(f"{path}: no rows")
    first = numbered[0][1]
    if not isinstance(first, dict):
        raise DataError(f"{path}: row {numbered[0][0]}: expected an object with text and label fields")
    text_key = next((c for c in TEXT_COLUMNS if c in first), None)
    label_key = next((c for c in LABEL_COLUMNS if c in first), None) if labelled else None
    if text_key is None or (label_key is None and labelled):
        missing = "text" if text_key is None else "label"
        wanted = TEXT_COLUMNS if text_key is None else LABEL_COLUMNS
        raise DataError(
            f"{path}: no {missing} column (looked for {', '.join(wanted)}; found {', '.join(map(str, first)) or 'none'})"
        )
    rows = Rows([], [], [])
    for number, record in numbered:
        if not isinstance(record, dict):
            fields = f"{text_key!r} and {label_key!r}" if label_key else repr(text_key)
            raise DataError(f"{path}: row {number}: expected an object with {fields}")
        label = record.get(label_key) if label_key else None
        rows.extend(_checked(path, f"row {number}", record.get(text_key), label, labelled=labelled))
    return rows


def _csv_records(path: Path) -> list[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return []
        records = []
        for record in reader:
            if None in record:  # more fields than the header
                raise DataError(f"{path}: row {reader.line_num}: more fields than the header has")
            records.append((reader.line_num, record))
        return records


def _jsonl_records(path: Path) -> list[tuple[int, dict]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: row {number}: nested too deeply") from None
    return records


def _checked(path: Path | str, where: str, text, label, *, labelled: bool = True) -> Rows:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}: {where}: empty text")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"{path}: {where}: text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    if not labelled:
        return Rows([" ".join(text.split())], [""], [f"{path}: {where}"])
    if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (dict, list)):
        raise DataError(f"{path}: {where}: empty label")
    return Rows([" ".join(text.split())], [str(label).strip()], [f"{path}: {where}"])


def _load_hub(name: str) -> dict[str, Rows]:
    """A Hugging Face dataset (needs the network): column names mapped as for files."""
    from datasets import load_dataset

    try:
        hub = load_dataset(name)
    except Exception as exc:
        raise DataError(f"hf:{name}: cannot load from the Hugging Face hub: {str(exc).splitlines()[0]}") from None
    splits: dict[str, Rows] = {}
    for split_name, table in hub.items():
        split = SPLIT_NAMES.get(split_name)
        if split is None:
            continue
        text_key = next((c for c in TEXT_COLUMNS if c in table.column_names), None)
        label_key = next((c for c in LABEL_COLUMNS if c in table.column_names), None)
        if text_key is None or label_key is None:
            raise DataError(f"hf:{name}: split {split_name}: no text/label columns (found {', '.join(table.column_names)})")
        feature = table.features[label_key]
        names = getattr(feature, "names", None)
        rows = Rows([], [], [])
        for number, (text, label) in enumerate(zip(table[text_key], table[label_key]), start=1):
            rows.extend(_checked(f"hf:{name}:{split_name}", f"row {number}", text, names[label] if names else label))
        splits[split] = rows
    return splits
