"""Retrain, compare, promote: `supportbot retrain --model SERVING --corrections FILE --output DIR [--promote]`.

1. Data: the serving bundle's own training recipe (bundle.json, `training.config`) names its data.
   That data plus the corrections file (bot/review.py; the pack nlu.yaml format) are written to
   `DIR.data/`: a domain pack folder (nlu.yaml with the corrections merged in, the pack's test.yaml,
   responses.yaml and knowledge copied) when the recipe trained on a pack, else train.csv and the
   other splits as CSV. A correction whose text is in the test split is left out (it would leak the
   test set into training) and counted; one already among the examples is not added twice.
2. Train: the same recipe (strategy, seed, hyperparameters) on that data, to DIR; `overrides` may
   change it (`--set key=value`, as for `supportbot train`).
3. Compare: the existing paired comparison (finetune/evaluate.py, `supportbot evaluate --compare`) of
   the new bundle and the serving one on the test split (the pack's test.yaml, or `--test SPEC`):
   both bundles predict the same texts; accuracy, macro F1 and McNemar's test on the paired answers.
   The full report (report.json, predictions) is written to DIR.eval/.
4. Promote, with `--promote`, only if the new bundle is not worse: its test accuracy is at least the
   serving bundle's (decision: the point estimate, not McNemar's verdict; "not significantly worse"
   would let a slightly worse model through on a small test set, and a retrain that only adds
   examples should not lose any). Promotion is the fleet's (serve/fleet.py, `supportbot promote`):
   every replica sharing the database loads it with an atomic reload. Without `--promote` the
   verdict is printed and nothing changes.

What retrain replaces (decision, `check_retrain_outputs`, called before any training): DIR as `supportbot
train` does (a new path, an empty folder or a bundle; bot/bundle.py `check_output`); `DIR.data/` only when
it is new, empty, or a folder retrain wrote before, known by its `recipe.yaml` naming that folder as its
data (written right after the merge; retrain outputs from before this check have it too); `DIR.eval/` is
a report folder like `supportbot evaluate --output` (its report files are rewritten). Anything else there
is refused in one line naming it, and nothing is touched: before, `DIR.data/` was deleted whatever it held.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bot import bundle as bundle_mod
from bot.fileio import atomic_write_text, check_output_folder, read_yaml
from bot.review import OUT_OF_SCOPE, Corrections, normalise

from . import data
from .config import ConfigError, load_config, recipe_of

DATA_SUFFIX = ".data"
EVAL_SUFFIX = ".eval"
RECIPE_FILE = "recipe.yaml"  # in DIR.data/: the recipe retrain trains with; it also marks the folder as retrain's


def data_folder(output: Path) -> Path:
    return output.with_name(output.name + DATA_SUFFIX)


def eval_folder(output: Path) -> Path:
    return output.with_name(output.name + EVAL_SUFFIX)


def written_by_retrain(folder: Path) -> bool:
    """Whether `folder` is a data folder retrain wrote: its recipe.yaml names the folder itself as its data."""
    recipe = folder / RECIPE_FILE
    if not recipe.is_file():
        return False
    try:
        raw = read_yaml(recipe, error=ConfigError)
    except ConfigError:
        return False
    return isinstance(raw, dict) and isinstance(raw.get("data"), str) and Path(raw["data"]).name == folder.name


def check_data_folder(folder: Path) -> None:
    """ConfigError (one line) unless `folder` is new, an empty folder or one retrain wrote (see the module docstring)."""
    check_output_folder(folder, error=ConfigError, name="retrain data folder", beside=True)
    if folder.is_dir() and any(folder.iterdir()) and not written_by_retrain(folder):
        raise ConfigError(f"retrain data folder {folder}: exists and was not written by supportbot retrain (no "
                          f"{RECIPE_FILE} naming it): refusing to replace it; move it away or choose another --output")


def check_retrain_outputs(output: Path) -> None:
    """Everything retrain writes for `output` (the bundle, DIR.data/, DIR.eval/) is usable and may be replaced."""
    bundle_mod.check_output(output)
    check_data_folder(data_folder(output))
    check_output_folder(eval_folder(output), error=ConfigError, name="retrain report folder")


@dataclass
class MergedData:
    folder: Path
    added: int  # corrections added to the training data
    duplicates: int  # already among the training examples
    in_test: int  # left out: their text is in the test split
    new_intents: list[str]
    test_spec: str | None  # the merged data's test split, when it has one


def _pack_folder(spec: str) -> Path | None:
    if spec.startswith("pack:"):
        from bot.domains import pack_path

        try:
            return pack_path(spec[5:])
        except KeyError as exc:
            raise data.DataError(str(exc.args[0])) from None
    folder = Path(spec).expanduser()
    return folder if (folder / "nlu.yaml").is_file() else None


def merge_data(spec: str, corrections: Corrections, folder: Path) -> MergedData:
    """The recipe's data at `spec` plus the corrections, written to `folder` (see the module docstring)."""
    splits = data.load(spec)
    if "train" not in splits:
        raise data.DataError(f"{spec}: the serving bundle's data has no train split to add corrections to")
    test_texts = {normalise(t) for t in splits["test"]["text"]} if "test" in splits else set()
    train_texts = {normalise(t) for t in splits["train"]["text"]}
    known_labels = set(splits["train"]["label"])
    rows: list[tuple[str, str]] = []
    duplicates = in_test = 0
    for label, texts in [*corrections.intents.items(), (OUT_OF_SCOPE, corrections.out_of_scope)]:
        for text in texts:
            key = normalise(text)
            if key in test_texts:
                in_test += 1
            elif key in train_texts:
                duplicates += 1
            else:
                train_texts.add(key)
                rows.append((" ".join(text.split()), label))
    new_intents = sorted({label for _, label in rows} - known_labels - {OUT_OF_SCOPE})
    check_data_folder(folder)
    if folder.exists():
        shutil.rmtree(folder)
    pack = _pack_folder(spec)
    if pack is not None:
        shutil.copytree(pack, folder)
        nlu = read_yaml(folder / "nlu.yaml", error=data.DataError) or {}
        intents = nlu.setdefault("intents", {})
        for text, label in rows:
            if label == OUT_OF_SCOPE:
                nlu.setdefault("out_of_scope", []).append(text)
            else:
                body = intents.setdefault(label, {"description": "added in review", "examples": []})
                body.setdefault("examples", []).append(text)
        header = "# Training examples with the review corrections merged in (supportbot retrain).\n"
        atomic_write_text(folder / "nlu.yaml", header + yaml.safe_dump(nlu, sort_keys=False, allow_unicode=True, width=1000))
        test_spec = str(folder) + ":test" if (folder / "test.yaml").is_file() else None
    else:
        folder.mkdir(parents=True)
        for name, split in splits.items():
            pairs = list(zip(split["text"], split["label"]))
            if name == "train":
                pairs += rows
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(pairs)
            atomic_write_text(folder / f"{name}.csv", buffer.getvalue())
        test_spec = str(folder / "test.csv") if "test" in splits else None
    return MergedData(folder, len(rows), duplicates, in_test, new_intents, test_spec)


@dataclass
class RetrainResult:
    bundle: Path
    merged: MergedData
    test_spec: str
    accuracy: float
    serving_accuracy: float
    p_value: float
    verdict: str
    not_worse: bool
    promoted: bool
    generation: int | None
    summary: dict[str, Any]


def retrain(
    serving: str | Path, corrections_path: str | Path, output: str | Path, *, test: str | None = None,
    overrides: list[str] | None = None, promote: Callable[[Path], int] | None = None, progress: bool = True,
    log: Callable[[str], None] = print,
) -> RetrainResult:
    """Merge, train, compare on the test split, and call `promote(bundle) -> generation` only when not worse."""
    from . import evaluate
    from .report import write_outputs
    from .train import train

    serving_path, output = Path(serving), Path(output)
    if output.resolve() == serving_path.resolve():
        raise ConfigError(f"--output {output} is the serving bundle: write the new one elsewhere")
    check_retrain_outputs(output)
    bundle = bundle_mod.load(serving_path)
    recipe = recipe_of(bundle)
    corrections = Corrections.read(corrections_path)
    if corrections.count() == 0:
        raise data.DataError(f"{corrections_path}: no labelled texts to retrain with")
    merged = merge_data(recipe.data, corrections, data_folder(output))
    recipe_file = merged.folder / RECIPE_FILE  # first: it marks the folder as retrain's (check_data_folder)
    raw = recipe.model_dump(mode="json")
    raw.update({"data": str(merged.folder), "output": str(output)})
    atomic_write_text(recipe_file, yaml.safe_dump(raw, sort_keys=False))
    test_spec = test or merged.test_spec or recipe.eval_data
    if not test_spec:
        raise data.DataError(f"{recipe.data}: no test split to compare on; name one with --test SPEC")
    log(f"training on {merged.folder} ({merged.added} corrections added, {merged.duplicates} already there, "
        f"{merged.in_test} left out as test texts)")
    cfg = load_config(recipe_file, list(overrides or []))
    trained = train(cfg, progress=progress, log=log)
    evaluation = evaluate.run(trained.bundle.path, test_spec, compare=serving_path, progress=progress, latency_sample=20)
    write_outputs(eval_folder(output), evaluation)
    comparison = evaluation.report.compare
    assert comparison is not None
    accuracy = evaluation.report.accuracy
    serving_accuracy = float(comparison.metrics["accuracy"].other or 0.0)
    not_worse = accuracy >= serving_accuracy
    generation = promote(trained.bundle.path) if promote is not None and not_worse else None
    summary = {
        "corrections added": merged.added, "already in the data": merged.duplicates,
        "left out (in the test set)": merged.in_test, "new intents": ", ".join(merged.new_intents) or "-",
        "test set": test_spec, "test texts": evaluation.report.n,
        "serving accuracy": serving_accuracy, "new accuracy": accuracy,
        "McNemar p": comparison.mcnemar.p_value, "McNemar verdict": comparison.mcnemar.verdict,
        "not worse": "yes" if not_worse else "no",
        "promoted": f"yes (generation {generation})" if generation is not None else "no",
        "new bundle": str(trained.bundle.path),
    }
    return RetrainResult(trained.bundle.path, merged, test_spec, accuracy, serving_accuracy,
                         comparison.mcnemar.p_value, comparison.mcnemar.verdict, not_worse, generation is not None,
                         generation, summary)
