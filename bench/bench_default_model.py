"""The default model on the shop pack's held-out test set, through the real dialogue engine (issue 3).

    python bench/bench_default_model.py                 # train configs/default.yaml with seeds 42, 1, 2 and score each
    python bench/bench_default_model.py --seeds 42      # one seed
    python bench/bench_default_model.py --model DIR     # score an existing bundle (no training)

For each bundle it measures, on bot/domains/shop/test.yaml (never trained on):
  - in-scope top-1 accuracy and macro-F1, and the share answered correctly at the bundle's floor;
  - out-of-scope recall at the bundle's floor (top probability below the confidence floor);
  - the action mix when every test message opens a fresh conversation with the Chatbot
    (answer / clarify / fallback / handoff), separately for in-scope and out-of-scope messages,
    with right and wrong answers told apart;
  - the cost of the dialogue engine: Chatbot.respond() per message (classify + policy + responses
    + SQLite commit), and respond() given the prediction (the engine alone), each as a ratio of
    IntentClassifier.predict() on the same single messages in the same run.
Prints a table and appends a section to BENCHMARKS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import append_section  # noqa: E402
from bot.chatbot import Chatbot, load_domain  # noqa: E402
from bot.classifier import IntentClassifier  # noqa: E402
from bot.domains import pack_path  # noqa: E402
from bot.policy import ACTIONS, Action  # noqa: E402
from bot.sessions import SQLiteSessionStore  # noqa: E402
from finetune import data  # noqa: E402
from finetune.config import load_config  # noqa: E402
from finetune.train import score_bundle, train  # noqa: E402

DEFAULT_RECIPE = ROOT / "configs" / "default.yaml"
TIMED_MESSAGES = 100


def dialogue_mix(classifier: IntentClassifier, texts: list[str], labels: list[str], workdir: Path) -> dict[str, float]:
    """Every test message as the first message of its own session: shares of each action."""
    store = SQLiteSessionStore(workdir / "bench-sessions.sqlite3")
    bot = Chatbot(classifier, store, load_domain(classifier.bundle))
    counts: dict[str, Counter] = {"in": Counter(), "oos": Counter()}
    for i, (text, label, prediction) in enumerate(zip(texts, labels, classifier.predict(texts))):
        reply = bot.respond(f"bench-{i}", text, prediction=prediction)
        group = "oos" if label == data.OOS_LABEL else "in"
        counts[group][reply.action] += 1
        if group == "in" and reply.action == Action.ANSWER:
            counts[group]["right" if reply.intent == label else "wrong"] += 1
    store.close()
    out = {}
    for group, counter in counts.items():
        total = sum(counter[a] for a in ACTIONS) or 1
        for key in (*ACTIONS, "right", "wrong"):
            if group == "oos" and key in ("right", "wrong"):
                continue
            out[f"{group}_{key}"] = counter[key] / total
    return out


def engine_overhead(classifier: IntentClassifier, texts: list[str], workdir: Path) -> dict[str, float]:
    """Seconds per message: predict() alone (baseline) vs the full respond(), same messages, same run."""
    sample = texts[:TIMED_MESSAGES]
    classifier.predict(sample[:5])  # warm up
    start = time.perf_counter()
    for text in sample:
        classifier.predict([text])
    baseline = (time.perf_counter() - start) / len(sample)
    store = SQLiteSessionStore(workdir / "timing-sessions.sqlite3")
    bot = Chatbot(classifier, store, load_domain(classifier.bundle))
    start = time.perf_counter()
    for i, text in enumerate(sample):
        bot.respond(f"timing-{i % 10}", text)  # 10 sessions, 10 turns each
    full = (time.perf_counter() - start) / len(sample)
    predictions = classifier.predict(sample)
    start = time.perf_counter()
    for i, (text, prediction) in enumerate(zip(sample, predictions)):
        bot.respond(f"given-{i % 10}", text, prediction=prediction)  # the engine alone: policy, words, store
    engine = (time.perf_counter() - start) / len(sample)
    store.close()
    return {
        "predict_ms": 1000 * baseline, "respond_ms": 1000 * full, "respond_over_predict": full / baseline,
        "engine_ms": 1000 * engine, "engine_over_predict": engine / baseline,
    }


def measure(bundle: Path, workdir: Path) -> dict[str, float]:
    test = data.load(f"{pack_path('shop')}:test")["test"]
    classifier = IntentClassifier.from_bundle(bundle)
    scores = score_bundle(bundle, test, classifier.labels)
    texts, labels = list(test["text"]), list(test["label"])
    return {
        "n_in": sum(label != data.OOS_LABEL for label in labels),
        "n_oos": sum(label == data.OOS_LABEL for label in labels),
        "floor": classifier.confidence_floor,
        "gap": classifier.ambiguity_gap,
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "answered_right_at_floor": scores["in_scope_accuracy"],
        "oos_recall": scores["oos_recall"],
        **dialogue_mix(classifier, texts, labels, workdir),
        **engine_overhead(classifier, texts, workdir),
        "version": classifier.version,
    }


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def mean_sd(values: list[float], fmt=pct) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


ROWS = [
    ("in-scope top-1 accuracy", "accuracy", pct),
    ("in-scope macro-F1", "macro_f1", pct),
    ("in-scope answered right at the floor", "answered_right_at_floor", pct),
    ("out-of-scope recall at the floor", "oos_recall", pct),
    ("in-scope: answer (right)", "in_right", pct),
    ("in-scope: answer (wrong)", "in_wrong", pct),
    ("in-scope: clarify", "in_clarify", pct),
    ("in-scope: fallback", "in_fallback", pct),
    ("in-scope: handoff", "in_handoff", pct),
    ("out-of-scope: answer", "oos_answer", pct),
    ("out-of-scope: clarify", "oos_clarify", pct),
    ("out-of-scope: fallback", "oos_fallback", pct),
    ("out-of-scope: handoff", "oos_handoff", pct),
    ("confidence floor", "floor", lambda x: f"{x:.2f}"),
    ("ambiguity gap", "gap", lambda x: f"{x:.2f}"),
    ("predict() per message, ms (baseline)", "predict_ms", lambda x: f"{x:.1f}"),
    ("respond() per message, ms", "respond_ms", lambda x: f"{x:.1f}"),
    ("respond() / predict()", "respond_over_predict", lambda x: f"{x:.2f}x"),
    ("respond(prediction=...) per message, ms (engine only)", "engine_ms", lambda x: f"{x:.1f}"),
    ("engine only / predict()", "engine_over_predict", lambda x: f"{x:.3f}x"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="score this bundle instead of training the default recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="training seeds (default 42 1 2)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    results, train_seconds = [], []
    with tempfile.TemporaryDirectory(prefix="bench-default-") as tmp:
        workdir = Path(tmp)
        if args.model is not None:
            runs = [("given", args.model)]
        else:
            runs = []
            for seed in args.seeds:
                cfg = load_config(DEFAULT_RECIPE, [f"output={workdir / f'seed-{seed}'}", f"seed={seed}"])
                print(f"training the default recipe, seed {seed} ...", flush=True)
                result = train(cfg, progress=False, log=lambda m: print("   ", m))
                train_seconds.append(result.summary["seconds"])
                runs.append((str(seed), result.bundle.path))
        for name, bundle in runs:
            print(f"scoring {bundle} ...", flush=True)
            scratch = workdir / f"score-{name}"
            scratch.mkdir()
            results.append(measure(bundle, scratch))

    seeds = ", ".join(name for name, _ in runs)
    header = f"| metric | {'mean ± sd over seeds ' + seeds if len(results) > 1 else 'value'} |"
    lines = [header, "|---|---|"]
    for title, key, fmt in ROWS:
        lines.append(f"| {title} | {mean_sd([r[key] for r in results], fmt)} |")
    table = "\n".join(lines)
    first = results[0]
    body = (
        f"Default model (`configs/default.yaml`: shop pack, `head` strategy) on the pack's held-out "
        f"`bot/domains/shop/test.yaml`: {first['n_in']} in-scope and {first['n_oos']} out-of-scope messages; "
        f"{'seeds ' + seeds if args.model is None else f'bundle {args.model}'} (bundle versions "
        f"{', '.join(r['version'] for r in results)}). Thresholds are each bundle's own (fitted on validation). "
        f"Action mix: every test message opens a fresh Chatbot session (real policy, responses, SQLite store); "
        f"'handoff' among in-scope messages is the `talk_to_human` intent. Timing: {TIMED_MESSAGES} single messages, "
        f"predict() alone vs the full respond(), same process and run"
        + (f"; training took {mean_sd(train_seconds, lambda x: f'{x:.0f} s')}." if train_seconds else ".")
        + "\n\n" + table
    )
    print(body)
    if not args.no_record:
        command = "python bench/bench_default_model.py" + (f" --model {args.model}" if args.model else
                                                          f" --seeds {' '.join(map(str, args.seeds))}")
        append_section("Default model: held-out accuracy, out-of-scope recall, dialogue action mix", command, body)
        print("appended to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
