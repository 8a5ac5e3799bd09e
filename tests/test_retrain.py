"""`supportbot retrain` on a tiny real slice of BANKING77: corrections merged into the serving bundle's own
data and recipe, the paired comparison on the test split, and promotion only when the new bundle is not
worse (the fleet record in the data folder's SQLite). Also the pack merge of a new intent."""

from __future__ import annotations

import csv

import pytest
import yaml
from conftest import BANKING77

from bot.review import OUT_OF_SCOPE, Corrections, locked_corrections
from finetune import data
from finetune.retrain import check_retrain_outputs, merge_data
from serve.fleet import FLEET_FILE, FleetStore
from supportbot.cli import main


def slice_rows(labels: list[str], skip: int, per_label: int) -> dict[str, list[str]]:
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    with open(BANKING77 / "train.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in by_label:
                by_label[row["category"]].append(row["text"])
    return {label: texts[skip: skip + per_label] for label, texts in by_label.items()}


def write_corrections(path, rows: dict[str, list[str]]) -> None:
    with locked_corrections(path) as corrections:
        for label, texts in rows.items():
            corrections.add(texts, label)


@pytest.fixture
def isolated(tmp_path, monkeypatch, _isolated_data_dir):
    """The test's own data folder (the fleet record); the embedding cache stays the session's
    (`--set cache_dir`), so the slice is not embedded again."""
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path, f"cache_dir={_isolated_data_dir / 'cache'}"


def summary_value(out: str, row: str) -> str:
    return next(line for line in out.splitlines() if row in line).split()[-2]


def test_retrain_promotes_a_bundle_that_is_not_worse(banking_head_bundle, banking_slice, isolated, capsys):
    isolated, cache = isolated
    labels = sorted(set(data.load(str(banking_slice["train"]))["train"]["label"]))
    corrections = isolated / "corrections.yaml"
    write_corrections(corrections, slice_rows(labels, skip=40, per_label=25))  # unseen, correctly labelled
    output = isolated / "retrained"
    code = main(["retrain", "--model", str(banking_head_bundle), "--corrections", str(corrections), "--output",
                 str(output), "--test", str(banking_slice["test"]), "--promote", "--quiet",
                 "--set", cache])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "retrain summary" in out and "yes (generation 1)" in out
    report = yaml.safe_load((output.with_name("retrained.eval") / "report.json").read_text())
    assert report["compare"]["metrics"]["accuracy"]["delta"] >= 0 and report["compare"]["mcnemar"]["method"]
    trained = data.load(str(output.with_name("retrained.data")))["train"]
    added = int(summary_value(out, "corrections added"))
    assert added >= 8 * 25 - 2 and len(trained) == 8 * 40 + added  # the serving data plus the corrections
    record = FleetStore(sqlite_path=isolated / "data" / FLEET_FILE).get()
    assert record is not None and record.path == str(output.resolve()) and record.generation == 1


def test_retrain_refuses_to_promote_a_worse_bundle(banking_head_bundle, banking_slice, isolated, capsys):
    isolated, cache = isolated
    labels = sorted(set(data.load(str(banking_slice["train"]))["train"]["label"]))
    rows = slice_rows(labels, skip=40, per_label=25)  # the texts of the test above: their vectors are cached
    wrong = {labels[(i + 1) % len(labels)]: rows[label] for i, label in enumerate(labels)}  # every text mislabelled
    corrections = isolated / "corrections.yaml"
    write_corrections(corrections, wrong)
    code = main(["retrain", "--model", str(banking_head_bundle), "--corrections", str(corrections), "--output",
                 str(isolated / "worse"), "--test", str(banking_slice["test"]), "--promote", "--quiet",
                 "--set", cache])
    out, err = capsys.readouterr()
    assert code == 1 and "nothing promoted" in err and err.count("\n") >= 1
    assert "not worse" in out and FleetStore(sqlite_path=isolated / "data" / FLEET_FILE).get() is None


def test_retrain_errors_are_one_line(banking_head_bundle, isolated, capsys):
    isolated, _cache = isolated
    empty = isolated / "empty.yaml"
    empty.write_text("")
    for argv, expected in [
        (["--corrections", str(empty), "--output", str(isolated / "x")], "no labelled texts"),
        (["--corrections", str(isolated / "missing.yaml"), "--output", str(isolated / "x")], "no such file"),
        (["--corrections", str(empty), "--output", str(banking_head_bundle)], "is the serving bundle"),
    ]:
        assert main(["retrain", "--model", str(banking_head_bundle), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def test_pack_merge_adds_a_new_intent_and_keeps_test_texts_out(tmp_path):
    test_text = data.load("pack:shop")["test"]["text"][0]
    corrections = Corrections(tmp_path / "c.yaml")
    corrections.add(["can you gift wrap it", "gift wrapping please", test_text], "gift_wrap", new=True)
    corrections.add(["what is the meaning of life"], OUT_OF_SCOPE)
    corrections.add(["where is my order"], "order_status")  # already an example of the pack
    merged = merge_data("pack:shop", corrections, tmp_path / "merged")
    assert (merged.added, merged.duplicates, merged.in_test, merged.new_intents) == (3, 1, 1, ["gift_wrap"])
    assert (tmp_path / "merged" / "responses.yaml").is_file() and merged.test_spec == f"{tmp_path / 'merged'}:test"
    splits = data.load(str(tmp_path / "merged"))
    assert list(splits["train"]["label"]).count("gift_wrap") == 2 and "what is the meaning of life" in splits["train"]["text"]
    assert len(splits["test"]) == len(data.load("pack:shop")["test"])


def test_retrain_refuses_an_output_data_folder_it_did_not_write_before_any_work(banking_head_bundle, isolated, capsys):
    isolated, _cache = isolated
    corrections = isolated / "corrections.yaml"
    write_corrections(corrections, {"activate_my_card": ["please switch my new card on"]})
    mine = isolated / "out.data"
    mine.mkdir()
    (mine / "mine.txt").write_text("precious")
    (isolated / "file.data").write_text("a file")
    for output, expected in [(isolated / "out", f"retrain data folder {mine}: exists and was not written by "
                                                "supportbot retrain"),
                             (isolated / "file", f"retrain data folder {isolated / 'file.data'}: exists and is not a folder")]:
        assert main(["retrain", "--model", str(banking_head_bundle), "--corrections", str(corrections),
                     "--output", str(output), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert [p.name for p in mine.iterdir()] == ["mine.txt"] and (mine / "mine.txt").read_text() == "precious"
    assert (isolated / "file.data").read_text() == "a file" and not (isolated / "out").exists()
    (mine / "mine.txt").unlink()
    (mine / "recipe.yaml").write_text(yaml.safe_dump({"data": str(mine), "output": str(isolated / "out")}))
    check_retrain_outputs(isolated / "out")  # a data folder retrain wrote (its recipe names it) is replaced


@pytest.mark.parametrize("content, entry", [
    ('intents: {activate_my_card: {examples: ["", "switch my card on"]}}\n', "intent 'activate_my_card' example 1: empty text"),
    ('intents: {"": {examples: ["switch my card on"]}}\n', "intent 1 under 'intents': empty name"),
])
def test_retrain_names_the_corrections_entry_with_an_empty_text_or_name(banking_head_bundle, isolated, capsys,
                                                                         content, entry):
    isolated, _cache = isolated
    corrections = isolated / "corrections.yaml"
    corrections.write_text(content)
    assert main(["retrain", "--model", str(banking_head_bundle), "--corrections", str(corrections),
                 "--output", str(isolated / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"supportbot retrain: error: {corrections}: {entry}\n"
    assert sorted(p.name for p in isolated.iterdir()) == ["corrections.yaml"]  # no out.data/ written
