"""Data SPEC loading: every format, every error (one line naming file and row)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import BANKING77, CLINC150, ROOT, SHARED_DATA

from finetune import data
from finetune.data import DataError


def test_banking77_folder_has_train_and_test():
    splits = data.load(str(BANKING77))
    assert set(splits) == {"train", "test"}
    assert len(splits["train"]) == 10003 and len(splits["test"]) == 3080
    assert len(set(splits["train"]["label"])) == 77
    # a quoted multi-line text is one example, whitespace folded
    assert all("\n" not in t for t in splits["train"]["text"])


def test_clinc_json_folds_oos_into_each_split():
    splits = data.load(str(CLINC150 / "data_full.json"))
    assert len(splits["train"]) == 15100 and len(splits["validation"]) == 3100 and len(splits["test"]) == 5500
    assert list(splits["test"]["label"]).count(data.OOS_LABEL) == 1000


def test_split_suffix_picks_one_split():
    only = data.load(f"{CLINC150 / 'data_small.json'}:test")
    assert list(only) == ["test"]


def test_bitext_split_folders_and_column_names():
    splits = data.load(str(SHARED_DATA / "bitext_customer_support" / "intent_detection_8.1k"))
    assert len(splits["train"]) == 6480 and len(splits["validation"]) == 810 and len(splits["test"]) == 810
    assert "cancel_order" in set(splits["train"]["label"])  # `intent` preferred over `category`


def test_bitext_llm_csv_uses_instruction_column():
    folder = SHARED_DATA / "bitext_customer_support" / "llm_chatbot_4.5k"
    csv_file = next(folder.glob("*.csv"))
    rows = data.load(str(csv_file))["train"]
    assert len(rows) > 4000 and len(set(rows["label"])) == 27


def test_jsonl_json_and_yaml(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"utterance": "hi there", "intent": "greet"}\n\n{"utterance": "bye", "intent": "bye"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"query": "hi", "label": "greet"}]))
    (tmp_path / "c.yaml").write_text("intents:\n  greet:\n    examples: [hello, hi]\nout_of_scope: [what is the weather]\n")
    assert list(data.load(str(tmp_path / "a.jsonl"))["train"]["label"]) == ["greet", "bye"]
    assert list(data.load(str(tmp_path / "b.json"))["train"]["text"]) == ["hi"]
    assert list(data.load(str(tmp_path / "c.yaml"))["train"]["label"]) == ["greet", "greet", "oos"]


def test_folder_with_train_and_test_files(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,x\nc,y\nd,y\n")
    (tmp_path / "test.jsonl").write_text('{"text": "e", "label": "x"}\n')
    splits = data.load(str(tmp_path))
    assert len(splits["train"]) == 4 and len(splits["test"]) == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("nolabel.csv", "text,foo\nhello,x\n", "no label column (looked for label, intent, category; found text, foo)"),
        ("notext.csv", "sentence,label\nhello,x\n", "no text column"),
        ("empty_text.csv", "text,label\nhello,x\n  ,x\n", "row 3: empty text"),
        ("empty_label.csv", "text,label\nhello,x\nbye,\n", "row 3: empty label"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{broken\n', "row 2: not valid JSON"),
        ("bad.json", "[{", "line 1: not valid JSON"),
        ("extra.csv", "text,label\na,b,c\n", "row 2: more fields than the header has"),
        ("empty.csv", "", "no rows"),
        ("data.txt", "hello", "unsupported file type .txt"),
    ],
)
def test_bad_files_name_file_row_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        data.load(str(path))
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


PACK_INTENTS = "intents:\n  a: {examples: [one, two]}\n  b: {examples: [three, four]}\n"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("scalar.json", "5", "expected a JSON list of objects, one per row, got the number 5"),
        ("null.json", "null", "expected a JSON list of objects, one per row, got null"),
        ("mapping.json", '{"rows": []}', "expected a JSON list of objects, one per row, got a mapping"),
        ("clinc.json", '{"train": 5}', "train: expected a list of [text, label] rows, got the number 5"),
        ("clinc_null.json", '{"train": [["hi", "greet"]], "oos_train": null}',
         "oos_train: expected a list of [text, label] rows, got null"),
        ("pack.yaml", PACK_INTENTS + "out_of_scope: 5\n", "expected a list of texts under 'out_of_scope', got the number 5"),
    ],
)
def test_a_file_of_the_wrong_shape_says_what_was_expected(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        data.load(str(path))
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("deep.json", "[" * 100_000, "nested too deeply"),
        ("deep.jsonl", '{"text": "a", "label": "x"}\n' + "[" * 100_000 + "\n", "row 2: nested too deeply"),
        ("deep.yaml", "[" * 5000, "nested too deeply"),
    ],
)
def test_data_nested_too_deeply_is_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        data.load(str(path))
    assert str(err.value) == f"{path}: {message}"


def test_a_split_file_of_the_wrong_shape_in_a_folder_is_named(tmp_path):
    (tmp_path / "train.json").write_text("null")
    with pytest.raises(DataError) as err:
        data.load(str(tmp_path))
    assert str(err.value) == f"{tmp_path / 'train.json'}: expected a JSON list of objects, one per row, got null"


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        data.load(str(tmp_path / "missing.csv"))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x00garbage")
    with pytest.raises(DataError, match="cannot read"):
        data.load(str(binary))


def test_unknown_split_is_named():
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        data.load(f"{CLINC150 / 'data_small.json'}:holdout")


def test_label_with_one_example_is_refused_with_its_row(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\na,x\nb,x\nc,lonely\n")
    with pytest.raises(DataError, match=r"train.csv: row 4: label 'lonely' has only one example"):
        data.validate_training(data.load(str(path))["train"])


def test_stratified_split_is_seeded_and_keeps_every_label():
    rows = data.load(str(BANKING77 / "test.csv"))["train"]
    train_a, val_a = data.stratified_split(rows, 0.1, seed=7)
    _train_b, val_b = data.stratified_split(rows, 0.1, seed=7)
    _, val_c = data.stratified_split(rows, 0.1, seed=8)
    assert list(val_a["text"]) == list(val_b["text"]) and list(val_a["text"]) != list(val_c["text"])
    assert set(val_a["label"]) == set(rows["label"]) == set(train_a["label"])
    assert len(train_a) + len(val_a) == len(rows)
    assert abs(len(val_a) / len(rows) - 0.1) < 0.02


def test_few_shot_takes_k_per_label():
    rows = data.load(str(BANKING77 / "train.csv"))["train"]
    subset = data.few_shot(rows, 10, seed=1)
    assert len(subset) == 770
    assert data.few_shot(rows, 10, seed=1)["text"][:5] == subset["text"][:5]


def test_fingerprint_ignores_order(tmp_path):
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text("text,label\nx,1\ny,2\n")
    b.write_text("text,label\ny,2\nx,1\n")
    assert data.fingerprint(data.load(str(a))["train"]) == data.fingerprint(data.load(str(b))["train"])


def test_cli_reports_bad_data_in_one_line_exit_2(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nhello,x\n,x\n")
    run = subprocess.run(
        [sys.executable, "-m", "supportbot.cli", "train", "--data", str(path), "--output", str(tmp_path / "m")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert lines == [f"supportbot train: error: {path}: row 3: empty text"]


def test_hf_spec_goes_through_datasets(tmp_path, monkeypatch):
    """`hf:NAME` is handed to datasets.load_dataset; a local dataset folder exercises the same path offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "train.csv").write_text("utterance,intent\nhello,greet\nhi,greet\nbye,bye\nsee you,bye\n")
    (tmp_path / "test.csv").write_text("utterance,intent\nhey,greet\n")
    splits = data.load(f"hf:{tmp_path}")
    assert set(splits) == {"train", "test"}
    assert list(splits["train"]["label"]) == ["greet", "greet", "bye", "bye"]


def test_hf_spec_unreachable_is_one_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The libraries read these at import (the suite has imported them already): set both, so the hub
    # is unreachable at once instead of after the network's own timeouts and retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match=r"^hf:nobody/no-such-dataset: cannot load from the Hugging Face hub") as err:
        data.load("hf:nobody/no-such-dataset")
    assert "\n" not in str(err.value)
