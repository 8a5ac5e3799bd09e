"""Few-shot benchmark (issue 14): every method trains on exactly the same sampled examples.

    python bench/bench_fewshot.py                                   # BANKING77 10-shot, seeds 1-3: head, lora, contrastive
    python bench/bench_fewshot.py --methods setfit5 --seeds 1       # SetFit, num_iterations 5, on the same sample
    python bench/bench_fewshot.py --data clinc150 --shots 5 20      # CLINC150's 150 in-scope intents, 5 and 20 shots
    python bench/bench_fewshot.py --split validation --set epochs=12  # tuning: scored on held-out training rows, never test

The sample: `finetune.data.few_shot(train, K, seed)` (K examples per intent, drawn over the sorted labels with
the seed), as `supportbot train --set few_shot=K --set seed=S` draws it and as bench/bench_train.py's fewshot
does. It is written once per (data, K, seed) and every method reads that file, so the methods differ only in
how they train. supportbot's strategies hold one example per intent of it out (their validation split, for
early stopping and calibration); SetFit trains on all of it.

Scored on the full test split (BANKING77: 3,080 texts; CLINC150: its 4,500 in-scope texts; out-of-scope is not
part of this benchmark), argmax accuracy. With `--split validation` the score is taken on rows the sample does
not hold instead: BANKING77 has no validation split, so 10 other training rows per intent (seed 0); CLINC150 its
validation split's in-scope rows. Recipes are tuned that way, never on test.

Methods:
- `head`, `lora`, `contrastive`: `supportbot train` with configs/head.yaml, configs/lora.yaml, configs/fewshot.yaml
  (`--set` overrides apply to contrastive only). Training seconds: the bundle's `training.seconds` (model load,
  data, fit; calibration and bundle writing excluded).
- `setfit5`: SetFit 1.x on the same packaged all-MiniLM-L6-v2, `num_iterations=5`, 1 epoch, its other defaults
  (batch 16, body lr 2e-5, logistic-regression head). Seconds: model load + `Trainer.train()`.
- `setfit`: SetFit at its defaults (num_iterations None, oversampling). Its pair count grows with the square of
  the sample, so the benchmark prints the count and, given a measured `setfit5` run, the estimated time; it
  only runs when `--run-setfit-defaults` says so.

Each run appends a section to BENCHMARKS.md's History (`--no-record` to skip); the current table is edited by hand.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import append_section, command_line  # noqa: E402
from bot.encoder import DEFAULT_BASE, resolve_base  # noqa: E402
from finetune import data  # noqa: E402
from finetune.config import load_config  # noqa: E402
from finetune.train import score_bundle, train  # noqa: E402

DATASETS = {
    "banking77": ROOT.parent / "shared" / "data" / "banking77",
    "clinc150": ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json",
}
RECIPES = {"head": "configs/head.yaml", "lora": "configs/lora.yaml", "contrastive": "configs/fewshot.yaml"}
METHODS = ("head", "lora", "contrastive", "setfit5", "setfit")


@dataclass
class Cell:
    """One method at one (data, shots): accuracy and training seconds per seed."""

    accuracy: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    def accuracy_text(self) -> str:
        values = list(self.accuracy.values())
        if not values:
            return "not run"
        if len(values) == 1:
            return f"{100 * values[0]:.2f}% (one seed)"
        return f"{100 * statistics.mean(values):.2f}% ± {100 * statistics.stdev(values):.2f}"

    def seconds_text(self) -> str:
        return f"{statistics.mean(self.seconds.values()):.0f}" if self.seconds else "-"


def splits(name: str) -> dict[str, object]:
    """train, validation (or None) and test, out-of-scope rows dropped (this benchmark scores intents only)."""
    loaded = data.load(str(DATASETS[name]))
    if "test" not in loaded:
        loaded["test"] = data.load(f"{DATASETS[name]}:test")["test"]
    return {
        split: loaded[split].filter(lambda row: row["label"] != data.OOS_LABEL) if split in loaded else None
        for split in ("train", "validation", "test")
    }


def scoring_split(all_splits: dict, sample, split: str):
    if split == "test":
        return all_splits["test"]
    if all_splits["validation"] is not None:
        return all_splits["validation"]
    held = set(sample["text"])
    rest = all_splits["train"].filter(lambda row: row["text"] not in held)
    return data.few_shot(rest, 10, 0)


def write_csv(dataset, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(dataset["text"], dataset["label"], strict=True))
    return path


def run_supportbot(method: str, sample_csv: Path, seed: int, scored, overrides: list[str], tmp: Path) -> tuple[float, float]:
    extra = overrides if method == "contrastive" else []
    cfg = load_config(ROOT / RECIPES[method], [f"data={sample_csv}", f"seed={seed}", f"output={tmp / method}", "onnx=false",
                                               f"cache_dir={tmp / 'cache'}", *extra])
    result = train(cfg, progress=False, log=lambda m: print("     ", m))
    scores = score_bundle(result.bundle.path, scored, result.bundle.labels)
    return scores["accuracy"], float(result.bundle.manifest.training.seconds)


def setfit_pairs(labels: list[str], iterations: int | None) -> int:
    """Sentence pairs SetFit trains its body on in one epoch: 2 x iterations x examples with num_iterations,
    else (oversampling) twice the larger of its positive pairs (with each text paired with itself) and negative pairs."""
    if iterations:
        return 2 * iterations * len(labels)
    counts = Counter(labels).values()
    positive = sum(n * (n + 1) // 2 for n in counts)
    negative = (len(labels) ** 2 - sum(n * n for n in counts)) // 2
    return 2 * max(positive, negative)


def run_setfit(sample, seed: int, scored, iterations: int | None, tmp: Path) -> tuple[float, float]:
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    started = time.perf_counter()
    model = SetFitModel.from_pretrained(resolve_base(DEFAULT_BASE))
    args = TrainingArguments(output_dir=str(tmp / "setfit"), num_iterations=iterations, num_epochs=1, seed=seed,
                             report_to="none", save_strategy="no", show_progress_bar=False)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": sample["text"], "label": sample["label"]}))
    trainer.train()
    seconds = time.perf_counter() - started
    predictions = list(model.predict(list(scored["text"]), batch_size=64))
    accuracy = sum(str(p) == gold for p, gold in zip(predictions, scored["label"], strict=True)) / len(scored)
    return accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=["banking77"])
    parser.add_argument("--shots", nargs="+", type=int, default=[10], help="examples per intent (default 10)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["head", "lora", "contrastive"])
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="what is scored (tune on validation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for the contrastive strategy, e.g. --set epochs=12")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SUPPORTBOT_THREADS", "0") or 0) or None,
                        help="torch threads for every method (default: supportbot's, all cores this process may use)")
    parser.add_argument("--run-setfit-defaults", action="store_true", help="run `setfit` at its defaults even if it takes hours")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        import torch

        os.environ["SUPPORTBOT_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    sections = []
    for name in args.data:
        all_splits = splits(name)
        for shots in args.shots:
            cells = {method: Cell() for method in args.methods}
            notes = []
            for seed in args.seeds:
                sample = data.few_shot(all_splits["train"], shots, seed)
                scored = scoring_split(all_splits, sample, args.split)
                print(f"== {name} {shots}-shot seed {seed}: {len(sample)} examples, {len(set(sample['label']))} intents; "
                      f"scored on {args.split} ({len(scored)})")
                with tempfile.TemporaryDirectory() as folder:
                    tmp = Path(folder)
                    sample_csv = write_csv(sample, tmp / "sample.csv")
                    for method in args.methods:
                        if method in RECIPES:
                            accuracy, seconds = run_supportbot(method, sample_csv, seed, scored, args.overrides, tmp)
                        elif method == "setfit5":
                            accuracy, seconds = run_setfit(sample, seed, scored, 5, tmp)
                        else:
                            pairs = setfit_pairs(list(sample["label"]), None)
                            five = cells.get("setfit5", Cell()).seconds.get(seed)
                            estimate = f", about {five * pairs / setfit_pairs(list(sample['label']), 5) / 3600:.1f} h at the " \
                                       "setfit5 run's pace" if five else ""
                            notes.append(f"SetFit defaults, seed {seed}: {pairs:,} pairs for the body (setfit5: "
                                         f"{setfit_pairs(list(sample['label']), 5):,}){estimate}")
                            print("    ", notes[-1])
                            if not args.run_setfit_defaults:
                                continue
                            accuracy, seconds = run_setfit(sample, seed, scored, None, tmp)
                        cells[method].accuracy[seed] = accuracy
                        cells[method].seconds[seed] = seconds
                        print(f"    {method}: accuracy {100 * accuracy:.2f}%, {seconds:.0f} s")
            rows = [
                f"| {method} | {cell.accuracy_text()} | "
                + ", ".join(f"{100 * a:.2f}" for a in cell.accuracy.values())
                + f" | {cell.seconds_text()} |"
                for method, cell in cells.items()
            ]
            sections.append("\n".join([
                f"{name}, {shots} examples per intent, seeds {', '.join(map(str, args.seeds))}; scored on {args.split} "
                f"(argmax accuracy, in-scope intents); contrastive overrides: `{' '.join(args.overrides) or 'none'}`.",
                "",
                "| method | accuracy, mean ± sd | per seed (%) | training s (mean) |",
                "|---|---|---|---|",
                *rows,
                *(["", *(f"- {note}" for note in notes)] if notes else []),
            ]))
            print(sections[-1])
    if not args.no_record:
        append_section("Few-shot: supportbot strategies and SetFit on the same examples", command_line("bench/bench_fewshot.py"),
                       "\n\n".join(sections))


if __name__ == "__main__":
    main()
