"""`supportbot evaluate` end to end on real bundles and real data slices (BANKING77, CLINC150).

Every number in report.json is recomputed here from predictions.jsonl with scikit-learn and
numpy, the records are checked against the classifier and the policy directly, and the
pictures are opened as images.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BANKING77, CLINC150, ROOT, train_bundle, write_slice
from matplotlib import image as mpimg
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

from bot import bundle as bundle_mod
from bot import policy
from bot.classifier import IntentClassifier
from bot.policy import decide
from finetune.evaluate import mcnemar
from finetune.metrics import expected_calibration_error
from supportbot.cli import main

STABLE_KEYS = {
    "model_version", "n", "accuracy", "macro_f1", "weighted_f1", "top3_accuracy", "per_intent", "out_of_scope",
    "actions", "calibration", "latency_ms", "confused_pairs", "worst_errors",
}
PICTURES = ("confusion_matrix.png", "reliability_diagram.png", "confidence_histogram.png", "threshold_sweep.png")
CLINC_INTENTS = ("balance", "book_flight", "change_language", "weather")


# ---- fixtures: real bundles, real evaluations run once per module --------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["evaluate", *argv, "--quiet", "--latency-sample", "20"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def evaluate_once(tmp_path_factory, name: str, *argv: str) -> Path:
    """Run `supportbot evaluate` in this process (no capsys in module fixtures) and return its output folder."""
    out = tmp_path_factory.mktemp(name)
    code = main(["evaluate", *argv, "--output", str(out), "--quiet", "--latency-sample", "20"])
    assert code == 0
    return out


def read_output(out: Path) -> tuple[dict, list[dict]]:
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return report, records


@pytest.fixture(scope="module")
def banking_weaker_bundle(tmp_path_factory, banking_slice) -> Path:
    """A second model on the same intents, trained on 5 examples per intent (the "production" model to compare with)."""
    return train_bundle(tmp_path_factory.mktemp("bundles") / "banking-5shot", f"data={banking_slice['train']}", "few_shot=5")


@pytest.fixture(scope="module")
def banking_eval(tmp_path_factory, banking_head_bundle, banking_slice, banking_weaker_bundle) -> Path:
    """The BANKING77 slice's test split, compared with the 5-shot model, behind a gate it passes."""
    return evaluate_once(
        tmp_path_factory, "eval-banking", "--model", str(banking_head_bundle), "--data", str(banking_slice["test"].parent),
        "--compare", str(banking_weaker_bundle), "--min-accuracy", "0.5", "--worst", "7",
    )


@pytest.fixture(scope="module")
def clinc_slice(tmp_path_factory) -> Path:
    """CLINC150 in its own JSON format: four intents plus out-of-scope examples in every split."""
    full = json.loads((CLINC150 / "data_full.json").read_text())
    sizes = {"train": 30, "val": 10, "test": 15}
    out = {split: [row for intent in CLINC_INTENTS for row in [r for r in full[split] if r[1] == intent][:n]]
           for split, n in sizes.items()}
    out |= {"oos_train": full["oos_train"][:20], "oos_val": full["oos_val"][:30], "oos_test": full["oos_test"][:40]}
    path = tmp_path_factory.mktemp("clinc-slice") / "clinc_slice.json"
    path.write_text(json.dumps(out))
    return path


@pytest.fixture(scope="module")
def clinc_bundle(tmp_path_factory, clinc_slice) -> Path:
    return train_bundle(tmp_path_factory.mktemp("bundles") / "clinc-head", f"data={clinc_slice}")


@pytest.fixture(scope="module")
def clinc_eval(tmp_path_factory, clinc_bundle, clinc_slice) -> Path:
    return evaluate_once(tmp_path_factory, "eval-clinc", "--model", str(clinc_bundle), "--data", str(clinc_slice))


# ---- an independent recomputation of report.json from predictions.jsonl ---------------------------


def assert_report_matches_records(report: dict, records: list[dict]) -> None:
    gold = [r["gold"] for r in records]
    predicted = [r["predicted"] for r in records]
    intents = sorted(set(gold))
    assert set(report) >= STABLE_KEYS
    assert report["n"] == len(records)
    assert all(r["correct"] == (r["gold"] == r["predicted"]) for r in records)
    assert report["accuracy"] == pytest.approx(np.mean([g == p for g, p in zip(gold, predicted)]))
    assert report["macro_f1"] == pytest.approx(f1_score(gold, predicted, labels=intents, average="macro", zero_division=0))
    assert report["weighted_f1"] == pytest.approx(f1_score(gold, predicted, labels=intents, average="weighted", zero_division=0))
    top3 = np.mean([r["gold"] in [name for name, _ in r["top3"]] or r["gold"] == r["predicted"] for r in records])
    assert report["top3_accuracy"] == pytest.approx(top3)
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=intents, zero_division=0)
    assert list(report["per_intent"]) == intents
    for i, name in enumerate(intents):
        row = report["per_intent"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((precision[i], recall[i], f1[i], support[i]))
    counts = Counter(r["action"] for r in records)
    assert report["actions"] == pytest.approx({a: counts[a] / len(records) for a in policy.ACTIONS})
    in_scope = [r for r in records if r["gold"] != "oos"]
    right = np.array([r["top3"][0][0] == r["gold"] for r in in_scope], dtype=float)
    assert report["calibration"]["ece_raw"] == pytest.approx(expected_calibration_error(np.array([r["confidence_raw"] for r in in_scope]), right, 15))
    assert report["calibration"]["ece_calibrated"] == pytest.approx(expected_calibration_error(np.array([r["confidence"] for r in in_scope]), right, 15))
    assert_confusions_match(report, gold, predicted)
    wrong = sorted((r for r in records if not r["correct"]), key=lambda r: -r["confidence"])
    assert [e["confidence"] for e in report["worst_errors"]] == [r["confidence"] for r in wrong[: len(report["worst_errors"])]]
    assert all(e["gold"] != e["predicted"] for e in report["worst_errors"])


def assert_confusions_match(report: dict, gold: list[str], predicted: list[str]) -> None:
    pairs: Counter = Counter(frozenset((g, p)) for g, p in zip(gold, predicted) if g != p)
    listed = report["confused_pairs"]
    assert [p["count"] for p in listed] == sorted(pairs.values(), reverse=True)[: len(listed)]
    for pair in listed:
        assert pairs[frozenset((pair["a"], pair["b"]))] == pair["count"] == pair["a_predicted_as_b"] + pair["b_predicted_as_a"]


def assert_records_follow_the_bot(records: list[dict], bundle_dir: Path, *, open_set: bool) -> None:
    """Each record's action is the policy's decision at the bundle's thresholds; `oos` iff below the floor."""
    calibration = bundle_mod.load(bundle_dir).calibration
    floor, gap = calibration.confidence_floor, calibration.ambiguity_gap
    for r in records:
        assert r["confidence"] == r["top3"][0][1] and len(r["top3"]) == 3
        assert r["action"] == decide(r["top3"][0][1], r["top3"][1][1], floor, gap)  # no handoff intent in these models
        below = r["confidence"] < floor
        assert r["predicted"] == ("oos" if open_set and below else r["top3"][0][0])


# ---- the tests -------------------------------------------------------------------------------------


def test_banking_report_agrees_with_its_predictions(banking_eval, banking_head_bundle, banking_slice):
    report, records = read_output(banking_eval)
    assert_report_matches_records(report, records)
    assert_records_follow_the_bot(records, banking_head_bundle, open_set=False)
    test_rows = (banking_slice["test"]).read_text().splitlines()[1:]
    assert len(records) == len(test_rows) == 120 and report["data"]["split"] == "test"
    assert report["model_version"] == bundle_mod.load(banking_head_bundle).version
    assert report["out_of_scope"] is None and report["model"]["precision"] == "fp32"
    assert 0.75 < report["accuracy"] <= report["top3_accuracy"] <= 1.0  # 8 intents, a real encoder
    assert len(report["worst_errors"]) == min(7, sum(not r["correct"] for r in records))
    latency = report["latency_ms"]
    assert 0 < latency["single_p50"] <= latency["single_p95"] and latency["batch_per_text"] > 0
    assert latency["single_sample"] == 20 and latency["batched_texts"] == 120


def test_records_are_the_classifiers_predictions(banking_eval, banking_head_bundle):
    _, records = read_output(banking_eval)
    classifier = IntentClassifier.from_bundle(banking_head_bundle)
    sample = records[::17]
    for record, prediction in zip(sample, classifier.predict([r["text"] for r in sample], top_k=3)):
        assert record["top3"][0][0] == prediction.label
        assert record["confidence"] == pytest.approx(prediction.confidence, abs=1e-5)


def test_every_file_is_written_and_the_html_embeds_the_pictures(banking_eval):
    report, _ = read_output(banking_eval)
    for name in ("report.json", "report.html", "predictions.jsonl", "compare_predictions.jsonl", *PICTURES):
        assert (banking_eval / name).is_file(), name
        assert name in report["files"]
    page = (banking_eval / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(PICTURES)
    assert {base64.b64decode(e) for e in embedded} == {(banking_eval / name).read_bytes() for name in PICTURES}
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)  # self-contained
    for name in PICTURES:
        pixels = mpimg.imread(banking_eval / name)
        height, width = pixels.shape[:2]
        assert 400 <= width <= 3000 and 300 <= height <= 3000, (name, width, height)
        assert pixels.std() > 0.01, f"{name} is blank"
    assert "McNemar" in page and "Most confused intent pairs" in page and "worst F1 first" in page


def test_compare_pairs_the_two_models(banking_eval, banking_weaker_bundle):
    report, records = read_output(banking_eval)
    other = [json.loads(line) for line in (banking_eval / "compare_predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in other] == [r["text"] for r in records]
    compare = report["compare"]
    assert compare["other_version"] == bundle_mod.load(banking_weaker_bundle).version
    b = sum(r["correct"] and not o["correct"] for r, o in zip(records, other))
    c = sum(o["correct"] and not r["correct"] for r, o in zip(records, other))
    test = compare["mcnemar"]
    assert (test["model_only_right"], test["other_only_right"]) == (b, c)
    assert test["method"] == ("exact binomial" if 0 < b + c < 25 else "chi-squared with continuity correction" if b + c else "no discordant pairs")
    other_accuracy = np.mean([o["correct"] for o in other])
    assert compare["metrics"]["accuracy"]["other"] == pytest.approx(other_accuracy)
    assert compare["metrics"]["accuracy"]["delta"] == pytest.approx(report["accuracy"] - other_accuracy)
    for name, change in compare["per_intent_f1"].items():
        assert change["delta"] == pytest.approx(report["per_intent"][name]["f1"] - change["other"])
    assert report["gate"] == {"min_accuracy": 0.5, "min_oos_recall": None, "passed": True, "reason": None}


def test_mcnemar_exact_and_chi_squared():
    def paired(b: int, c: int, both: int = 30) -> tuple[np.ndarray, np.ndarray]:
        model = np.array([True] * b + [False] * c + [True] * both)
        other = np.array([False] * b + [True] * c + [True] * both)
        return model, other

    exact = mcnemar(*paired(10, 2))  # two-sided binomial: 2 * P(X <= 2 | n=12, p=1/2) = 2 * 79 / 4096
    assert exact.method == "exact binomial" and exact.p_value == pytest.approx(158 / 4096)
    assert exact.verdict.startswith("model is better")
    chi = mcnemar(*paired(20, 40))  # (|20 - 40| - 1)^2 / 60 = 6.0167, p = 0.01418
    assert chi.method.startswith("chi-squared") and chi.statistic == pytest.approx(361 / 60)
    assert chi.p_value == pytest.approx(0.014179, abs=1e-5) and chi.verdict.startswith("other is better")
    assert mcnemar(*paired(0, 0)).p_value == 1.0


def test_clinc_out_of_scope(clinc_eval, clinc_bundle):
    report, records = read_output(clinc_eval)
    assert_report_matches_records(report, records)
    assert_records_follow_the_bot(records, clinc_bundle, open_set=True)
    assert report["data"]["split"] == "test" and report["n"] == 4 * 15 + 40
    gold = np.array([r["gold"] for r in records])
    said = np.array([r["predicted"] for r in records])
    oos = report["out_of_scope"]
    assert oos["in_scope_accuracy"] == pytest.approx(np.mean(said[gold != "oos"] == gold[gold != "oos"]))
    assert oos["recall"] == pytest.approx(np.mean(said[gold == "oos"] == "oos"))
    assert oos["precision"] == pytest.approx(np.mean(gold[said == "oos"] == "oos"))
    assert oos["recall"] == report["per_intent"]["oos"]["recall"] and report["per_intent"]["oos"]["support"] == 40
    assert report["calibration"]["n"] == 60  # in-scope messages only
    assert oos["in_scope_accuracy"] > 0.8 and oos["recall"] > 0.2  # four distinct intents; the floor catches real oos
    page = (clinc_eval / "report.html").read_text()
    assert "OOS recall" in page and "out of scope: predicted oos when" in page


def test_shop_pack_action_mix_follows_the_dialogue_policy(tmp_path, shop_bundle):
    """The default domain: a handoff intent, small talk and out-of-scope examples in its test split."""
    out = tmp_path / "shop"
    assert main(["evaluate", "--model", str(shop_bundle), "--data", "pack:shop", "--output", str(out), "--quiet",
                 "--latency-sample", "10"]) == 0
    report, records = read_output(out)
    assert_report_matches_records(report, records)
    special = yaml.safe_load((ROOT / "bot" / "domains" / "shop" / "responses.yaml").read_text())["special"]
    assert report["model"]["handoff_intent"] == special["handoff"] and report["out_of_scope"] is not None
    calibration = bundle_mod.load(shop_bundle).calibration
    social = {special["greeting"], special["goodbye"], special["thanks"]}
    for r in records:  # the policy's documented rules, re-derived for a first message
        (top, p1), (second, p2) = r["top3"][0], r["top3"][1]
        action = decide(p1, p2, calibration.confidence_floor, calibration.ambiguity_gap)
        if action == "clarify" and social & {top, second}:  # no "hello or refund?" question: answer the real one
            action, top = "answer", next((o for o in (top, second) if o not in social), top)
        if action == "answer" and top == special["handoff"]:
            action = "handoff"
        assert r["action"] == action, r
    assert report["actions"]["handoff"] > 0  # the test split asks for a person several times


def test_gates_block_a_model_that_falls_short(capsys, tmp_path, clinc_eval, clinc_bundle, clinc_slice):
    report, _ = read_output(clinc_eval)
    recall, accuracy = report["out_of_scope"]["recall"], report["accuracy"]
    assert accuracy < 1.0 and recall < 1.0
    code, _, err = run_cli(
        capsys, "--model", str(clinc_bundle), "--data", str(clinc_slice), "--output", str(tmp_path / "gated"),
        "--min-accuracy", f"{(accuracy + 1) / 2:.6f}", "--min-oos-recall", f"{(recall + 1) / 2:.6f}",
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supportbot evaluate: gate failed: accuracy")
    assert "--min-accuracy" in lines[0] and "--min-oos-recall" in lines[0]
    written = json.loads((tmp_path / "gated" / "report.json").read_text())
    assert written["gate"]["passed"] is False  # the report is still written for the CI artefacts


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{tmp}/no-such-model", "--data", "{test}"], "no model bundle at"),
        (["--model", "{model}", "--data", "{tmp}/missing.csv"], "no such file or folder"),
        (["--model", "{model}", "--data", "{garbage}"], "no text column"),
        (["--model", "{model}", "--data", "{unknown}"], "unknown to the model"),
        (["--model", "{model}", "--data", "{test}", "--min-accuracy", "1.5"], "between 0 and 1"),
        (["--model", "{model}", "--data", "{test}", "--min-oos-recall", "0.5"], "needs out-of-scope"),
        (["--model", "{model}", "--data", "{test}", "--cv", "1"], "at least 2 folds"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, banking_head_bundle, banking_slice, argv, message):
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("foo,bar\n1,2\n")
    unknown = write_slice(BANKING77 / "test.csv", tmp_path / "other-intents.csv", labels=12, per_label=2)
    names = {"tmp": tmp_path, "model": banking_head_bundle, "test": banking_slice["test"], "garbage": garbage, "unknown": unknown}
    code, _, err = run_cli(capsys, *[a.format(**names) for a in argv], "--output", str(tmp_path / "out"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_unknown_labels_are_named(capsys, tmp_path, banking_head_bundle):
    data = write_slice(BANKING77 / "test.csv", tmp_path / "more.csv", labels=10, per_label=2)
    code, _, err = run_cli(capsys, "--model", str(banking_head_bundle), "--data", str(data), "--output", str(tmp_path / "o"))
    extra = sorted({line.rsplit(",", 1)[1] for line in data.read_text().splitlines()[1:]})[8:]
    assert code == 2 and all(f"'{name}'" in err for name in extra)


def test_cross_validation_on_a_small_training_set(capsys, tmp_path, banking_head_bundle):
    data = write_slice(BANKING77 / "train.csv", tmp_path / "small.csv", labels=4, per_label=12, skip=40)
    out = tmp_path / "cv"
    code, stdout, _ = run_cli(capsys, "--model", str(banking_head_bundle), "--data", str(data), "--cv", "3", "--output", str(out))
    assert code == 0 and "mean ± sd" in stdout
    report, records = read_output(out)
    assert_report_matches_records(report, records)
    cv = report["cross_validation"]
    assert cv["k"] == 3 and [f["fold"] for f in cv["folds"]] == [1, 2, 3]
    with open(data, newline="") as handle:
        assert sorted(r["text"] for r in records) == sorted(" ".join(row["text"].split()) for row in csv.DictReader(handle))
    assert Counter(r["fold"] for r in records) == {f["fold"]: f["n"] for f in cv["folds"]} == {1: 16, 2: 16, 3: 16}
    for fold in cv["folds"]:
        own = [r for r in records if r["fold"] == fold["fold"]]
        assert fold["accuracy"] == pytest.approx(np.mean([r["correct"] for r in own]))
        assert fold["n_train"] == 32
    accuracies = [f["accuracy"] for f in cv["folds"]]
    assert cv["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert cv["sd"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    assert report["accuracy"] > 0.6  # 4 intents, 8 training examples each per fold


def test_cross_validation_needs_enough_examples_per_label(capsys, tmp_path, banking_head_bundle):
    data = write_slice(BANKING77 / "train.csv", tmp_path / "tiny.csv", labels=3, per_label=2)
    code, _, err = run_cli(capsys, "--model", str(banking_head_bundle), "--data", str(data), "--cv", "3", "--output", str(tmp_path / "o"))
    assert code == 2 and "3-fold cross-validation needs at least 3 per label" in err


@pytest.mark.parametrize(
    ("k", "counts", "needed"),
    [
        (5, [6, 4, 6], 5),  # 4 examples keep 3 for training, but StratifiedKFold needs one in each of 5 test parts
        (3, [2, 1, 6], 3),  # two labels short: the one with the fewest is named, not the first in order
    ],
)
def test_cross_validation_names_the_smallest_label_before_any_training(capsys, tmp_path, banking_head_bundle, k, counts, needed):
    source = write_slice(BANKING77 / "train.csv", tmp_path / "slice.csv", labels=len(counts), per_label=max(counts))
    with source.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    labels = sorted({label for _text, label in rows})
    seen: Counter[str] = Counter()
    data = tmp_path / "tiny.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for text, label in rows:
            seen[label] += 1
            if seen[label] <= counts[labels.index(label)]:
                writer.writerow([text, label])
    code, _, err = run_cli(capsys, "--model", str(banking_head_bundle), "--data", str(data), "--cv", str(k), "--output", str(tmp_path / "o"))
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (f"supportbot evaluate: error: {data}: label {labels[1]!r} has {counts[1]} example(s), the fewest of "
                           f"any label; {k}-fold cross-validation needs at least {needed} per label")
    assert not (tmp_path / "o").exists()


def test_clinc_report_carries_the_operating_curve_and_auroc(clinc_eval):
    report, records = read_output(clinc_eval)
    oos = report["out_of_scope"]
    is_in = np.array([r["gold"] != "oos" for r in records])
    confidence = np.array([r["confidence"] for r in records])
    right = np.array([r["top3"][0][0] == r["gold"] for r in records])
    assert oos["auroc"] == pytest.approx(roc_auc_score(is_in, confidence)) and 0.5 < oos["auroc"] <= 1.0
    floors = [p["floor"] for p in oos["curve"]]
    assert len(floors) >= 5 and floors == sorted(floors)
    for point in oos["curve"]:
        kept = confidence >= point["floor"]
        assert point["in_scope_answered_right"] == pytest.approx(np.mean((kept & right)[is_in]))
        assert point["oos_recall"] == pytest.approx(np.mean(~kept[~is_in]))
    recalls = [p["oos_recall"] for p in oos["curve"]]
    assert recalls == sorted(recalls)  # a higher floor never catches fewer oos messages
    assert (clinc_eval / "operating_curve.png").stat().st_size > 0 and mpimg.imread(clinc_eval / "operating_curve.png").ndim == 3
    page = (clinc_eval / "report.html").read_text()
    assert "Out-of-scope operating curve" in page and "AUROC" in page


def _calibration_oos_recall(bundle_dir: Path, slice_path: Path) -> float:
    """Out-of-scope recall over every out-of-scope example calibration reads: validation's and train's (never trained on)."""
    classifier = IntentClassifier.from_bundle(bundle_dir)
    rows = json.loads(slice_path.read_text())
    texts = [text for text, _ in rows["oos_val"] + rows["oos_train"]]
    floor = classifier.confidence_floor
    return float(np.mean([p.confidence < floor for p in classifier.predictions_from_logits(classifier.logits(texts), top_k=3)]))


def test_a_higher_oos_recall_target_gives_a_floor_at_least_as_high(tmp_path, clinc_slice, clinc_bundle):
    floors = {}
    for target in (0.1, 0.25):  # four distinct intents: oos messages look confident, 0.3 is the most any floor reaches
        bundle_dir = train_bundle(tmp_path / f"target-{target}", f"data={clinc_slice}", f"calibration.target_oos_recall={target}")
        calibration = bundle_mod.load(bundle_dir).calibration
        assert "lowest floor with out-of-scope recall" in calibration.method and "not reached" not in calibration.method
        assert _calibration_oos_recall(bundle_dir, clinc_slice) >= target
        floors[target] = calibration.confidence_floor
    assert floors[0.25] >= floors[0.1]
    balanced = bundle_mod.load(clinc_bundle).calibration  # no target: today's balanced point
    assert "out-of-scope recall on held-out examples" in balanced.method and "lowest floor" not in balanced.method


def test_out_of_scope_training_examples_calibrate_the_floor_with_the_validation_ones(tmp_path, clinc_slice, clinc_bundle):
    """No strategy trains on out-of-scope examples, so train's are unseen: the floor is fitted on both splits' (20 + 30
    here), and a data set whose out-of-scope examples are all in train still gets a floor that weighs them."""
    validation = bundle_mod.load(clinc_bundle).manifest.metrics["validation"]
    assert validation["out_of_scope_examples"] == 50
    assert validation["oos_recall"] == pytest.approx(_calibration_oos_recall(clinc_bundle, clinc_slice), abs=1e-6)
    rows = json.loads(clinc_slice.read_text())
    only_train = tmp_path / "oos_in_train_only.json"
    only_train.write_text(json.dumps({**rows, "oos_val": []}))
    bundle = bundle_mod.load(train_bundle(tmp_path / "only-train", f"data={only_train}"))
    assert bundle.manifest.metrics["validation"]["out_of_scope_examples"] == 20
    assert "out-of-scope recall" in bundle.calibration.method  # the balanced point with out-of-scope examples
