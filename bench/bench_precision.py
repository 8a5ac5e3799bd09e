"""Inference precision: fp32 against int8 bundles, accuracy and single-text latency (bot/precision.py).

    python bench/bench_precision.py              # BANKING77 and the shop pack, head strategy, seed 1
    python bench/bench_precision.py --no-record  # print only

For each dataset, two `head` bundles are trained with the same recipe and seed, one per
precision, and scored on the held-out test set: accuracy, and how many test labels the two
agree on. Then, in one process, IntentClassifier.predict([text]) is timed one message at a
time on the shop pack's test messages, in alternating blocks per precision, on every core and
on one thread: p50/p95, and the time per text in batches of 32. Appends a section to
BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As `supportbot serve` runs; OpenMP reads these once, when torch loads, so before `import torch`.
from supportbot.cli import set_serving_openmp  # noqa: E402

set_serving_openmp()

import torch  # noqa: E402

from bench.bench_serve import omp_settings, shop_messages  # noqa: E402
from bench.record import append_section, command_line  # noqa: E402
from bot.classifier import IntentClassifier  # noqa: E402
from finetune import data  # noqa: E402
from finetune.config import load_config  # noqa: E402
from finetune.train import train  # noqa: E402

DATASETS = {"BANKING77": ("../shared/data/banking77", "../shared/data/banking77:test"),
            "shop pack": ("pack:shop", "pack:shop:test")}
PRECISIONS = ("fp32", "int8")


def scored(train_spec: str, test_spec: str, precision: str, out: Path) -> tuple[IntentClassifier, list[str], list[str]]:
    """Train a head bundle at `precision`; its classifier, test predictions and gold labels."""
    cfg = load_config(None, [f"data={train_spec}", f"output={out}", f"precision={precision}", "seed=1"])
    bundle = train(cfg, progress=False, log=lambda m: print("   ", m, file=sys.stderr)).bundle
    classifier = IntentClassifier.from_bundle(bundle.path)
    test = data.load(test_spec)["test"]
    known = [i for i, label in enumerate(test["label"]) if label in set(classifier.labels)]  # in scope only
    texts, gold = [test["text"][i] for i in known], [test["label"][i] for i in known]
    return classifier, [p.label for p in classifier.predict(texts)], gold


def latencies(classifiers: dict[str, IntentClassifier], messages: list[str], n: int, blocks: int = 10) -> dict[str, list[float]]:
    """Seconds per predict([text]), in blocks of consecutive calls that alternate between precisions.

    Consecutive, because a server runs one model: timing fp32 and int8 call by call would let each
    evict the other's weights from the CPU cache. Alternating blocks, so both see the same load.
    """
    timings: dict[str, list[float]] = {name: [] for name in classifiers}
    texts = (messages * (n // len(messages) + 1))[:n]
    per_block = max(1, n // blocks)
    for block in range(blocks):
        names = list(classifiers) if block % 2 == 0 else list(reversed(classifiers))
        for name in names:
            chunk = texts[block * per_block : (block + 1) * per_block]
            for text in chunk[:5]:  # warm this model's weights into the cache
                classifiers[name].predict([text])
            for text in chunk:
                started = time.perf_counter()
                classifiers[name].predict([text])
                timings[name].append(time.perf_counter() - started)
    return timings


def per_text_in_batches(classifier: IntentClassifier, messages: list[str], size: int = 32) -> float:
    """Seconds per text when predicting `size` texts at a time (best of 3 passes over 320 texts)."""
    batches = [messages[i : i + size] for i in range(0, 320, size)]
    classifier.predict(batches[0])
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for batch in batches:
            classifier.predict(batch)
        best = min(best, (time.perf_counter() - started) / sum(map(len, batches)))
    return best


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600, help="single-text predictions timed per precision")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    rows = ["| dataset (test split) | fp32 accuracy | int8 accuracy | labels agreeing |", "|---|---:|---:|---:|"]
    shop: dict[str, IntentClassifier] = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for name, (train_spec, test_spec) in DATASETS.items():
            results = {}
            for precision in PRECISIONS:
                print(f"{name}: training the {precision} head bundle...", file=sys.stderr)
                results[precision] = scored(train_spec, test_spec, precision, Path(tmp) / f"{name}-{precision}")
            (_, fp32, gold), (_, int8, _) = results["fp32"], results["int8"]
            accuracy = {p: sum(a == g for a, g in zip(results[p][1], gold)) / len(gold) for p in PRECISIONS}
            agree = sum(a == b for a, b in zip(fp32, int8)) / len(gold)
            rows.append(f"| {name} ({len(gold):,} in-scope texts) | {100 * accuracy['fp32']:.2f}% "
                        f"| {100 * accuracy['int8']:.2f}% | {100 * agree:.2f}% |")
            if name == "shop pack":
                shop = {p: results[p][0] for p in PRECISIONS}
        messages = shop_messages()
        speed: dict[tuple[int, str], dict[str, float]] = {}
        for threads in (torch.get_num_threads(), 1):
            torch.set_num_threads(threads)
            print(f"timing single-text predictions, {threads} thread(s)...", file=sys.stderr)
            timings = latencies(shop, messages, args.requests)
            for p in PRECISIONS:
                speed[threads, p] = {"p50": 1000 * statistics.median(timings[p]), "p95": 1000 * quantile(timings[p], 0.95),
                                     "batch": 1000 * per_text_in_batches(shop[p], messages)}
    table = ["| precision | torch threads | p50 ms | p95 ms | per text in batches of 32, ms |", "|---|---:|---:|---:|---:|"]
    table += [f"| {p} | {t} | {v['p50']:.2f} | {v['p95']:.2f} | {v['batch']:.2f} |" for (t, p), v in speed.items()]
    fastest = min(speed.items(), key=lambda kv: kv[1]["p50"])
    default = speed[max(t for t, _ in speed), "fp32"]
    lines = [
        "Two `head` bundles per dataset, same recipe and seed 1, one per `precision`; accuracy on the "
        "test split's in-scope texts.", "", *rows, "",
        f"Single-text latency, IntentClassifier.predict([text]), {args.requests} shop test messages per row, in "
        f"blocks of consecutive calls alternating between precisions ({omp_settings()}); 1-minute load average {os.getloadavg()[0]:.1f} at the end:", "",
        *table, "",
        f"- fastest single text: {fastest[0][1]} on {fastest[0][0]} thread(s), p50 **{fastest[1]['p50']:.2f} ms**, "
        f"{default['p50'] / fastest[1]['p50']:.2f}x faster than fp32 on every core (target p50 <= 5 ms)",
    ]
    body = "\n".join(lines)
    print(body)
    if args.record:
        append_section("Inference precision: fp32 vs int8", command_line("bench/bench_precision.py"), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
