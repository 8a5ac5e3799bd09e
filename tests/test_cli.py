"""The command line as a user runs it: a real process, real bundles, --help, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def supportbot(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supportbot.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("command", ["train", "evaluate", "serve", "chat", "predict"])
def test_help_explains_every_command(command):
    run = supportbot(command, "--help")
    assert run.returncode == 0
    assert "usage: supportbot " + command in run.stdout
    assert len(run.stdout.splitlines()) > 5


def test_train_help_documents_data_specs_and_overrides():
    out = supportbot("train", "--help").stdout
    for word in ("--strategy {head,lora,contrastive,full}", "--set KEY=VALUE", "pack:shop", "hf:NAME", ":test", "oos"):
        assert word in out


def test_train_then_predict(tmp_path, banking_slice):
    out = tmp_path / "model"
    run = supportbot("train", "--data", str(banking_slice["train"]), "--eval-data", str(banking_slice["test"]),
                     "--output", str(out), "--quiet", "--set", "epochs=40", "--set", "onnx=false")
    assert run.returncode == 0, run.stderr
    assert "training summary" in run.stdout and "test_accuracy" in run.stdout and "val_accuracy" in run.stdout
    run = supportbot("predict", "--model", str(out), "how do I activate my new card", "can I pay with apple pay")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["how do I activate my new card", "can I pay with apple pay"]
    manifest = json.loads((out / "bundle.json").read_text())
    for line in lines:
        assert line["label"] in manifest["labels"] and 0 < line["confidence"] <= 1
        assert line["model_version"] == manifest["version"] and len(line["ranking"]) == 3
    assert [line["label"] for line in lines] == ["activate_my_card", "apple_pay_or_google_pay"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "--model", "/nonexistent/bundle", "hi"], "no model bundle at /nonexistent/bundle"),
        (["predict", "--model", "/nonexistent/bundle", "--top-k", "0", "hi"], "--top-k 0: expected 1 or more"),
        (["train", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read"),
        (["train", "--set", "epochs=-3"], "epochs: Input should be greater than or equal to 1"),
        (["train", "--set", "no_such_field=1"], "no_such_field: Extra inputs are not permitted"),
        (["train", "--data", "pack:nope"], "pack:nope: no such packaged domain pack"),
        (["train", "--set", "epochs=["], "supportbot train: error: --set epochs: line 1: not valid YAML"),
        (["train", "--set", "calibration.min_floor=0.95"], "calibration: Value error, min_floor 0.95 is above max_floor 0.9"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, message):
    run = supportbot(*args)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    run = supportbot("--version")
    assert run.returncode == 0
    assert run.stdout.strip() == f"supportbot {version('supportbot')}"


def test_chat_on_a_damaged_sessions_file_is_one_line_exit_2(tmp_path, banking_head_bundle):
    (tmp_path / "sessions.sqlite3").write_bytes(b"this is not an SQLite database, it was damaged" * 100)
    run = subprocess.run(
        [sys.executable, "-m", "supportbot.cli", "chat", "--model", str(banking_head_bundle)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, input="",
        env={**os.environ, "SUPPORTBOT_DATA_DIR": str(tmp_path)},
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith("supportbot chat: error: ") and "sessions.sqlite3" in run.stderr


def test_a_recipe_that_is_not_yaml_is_one_line_exit_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("strategy: [head\n  epochs: : 3\n")
    run = supportbot("train", "--config", str(recipe))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"supportbot train: error: {recipe}: line 2: not valid YAML"


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "{deep}"],
        ["train", "--config", "{deep}"],
        ["review", "--config", "{deep}"],
        ["retrain", "--model", "{bundle}", "--corrections", "{deep}", "--output", "{out}"],
    ],
)
def test_a_yaml_file_nested_too_deeply_is_one_line_exit_2(tmp_path, request, args):
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000, encoding="utf-8")
    bundle = request.getfixturevalue("banking_head_bundle") if "{bundle}" in args else ""
    run = supportbot(*(a.format(deep=deep, bundle=bundle, out=tmp_path / "new") for a in args))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"supportbot {args[0]}: error: {deep}: nested too deeply"


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_damaged_bundle_is_one_line_exit_2(tmp_path, banking_head_bundle, banking_slice, command):
    damaged = tmp_path / "bundle"
    shutil.copytree(banking_head_bundle, damaged)
    with open(damaged / "head.safetensors", "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\0\0\0\0")
    args = ["predict", "--model", str(damaged), "hi"] if command == "predict" else [
        "evaluate", "--model", str(damaged), "--data", str(banking_slice["test"]), "--output", str(tmp_path / "eval")]
    run = supportbot(*args)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        f"supportbot {command}: error: bundle {damaged}: file head.safetensors is damaged (sha256 does not match bundle.json)"
    )


def one_line_error(run: subprocess.CompletedProcess, command: str) -> str:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"supportbot {command}: error: ")
    return run.stderr.strip()


@pytest.mark.parametrize("command", ["train", "knowledge"])
def test_an_output_that_is_not_a_bundle_is_refused_before_any_work_and_kept(tmp_path, banking_head_bundle,
                                                                            banking_slice, command):
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    plain = tmp_path / "afile"
    plain.write_text("mine")
    for output, message in [(folder, "a folder that is not a model bundle (it holds notes.txt)"),
                            (plain, "exists and is not a folder")]:
        args = (["train", "--data", str(banking_slice["train"]), "--set", "onnx=false"] if command == "train"
                else ["knowledge", "--model", str(banking_head_bundle)])
        error = one_line_error(supportbot(*args, "--output", str(output), "--quiet"), command)  # one line: no training log
        assert f"--output {output}: {message}" in error
    assert (folder / "notes.txt").read_text() == "precious" and [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert plain.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "victim"]


@pytest.mark.parametrize("command, output, message", [
    ("train", "afile/sub", "cannot be created: {tmp}/afile is not a folder"),
    ("train", "/proc/supportbot-out", "cannot write in /proc"),
    ("evaluate", "afile", "exists and is not a folder"),
    ("discover", "afile", "exists and is not a folder"),
])
def test_an_unusable_output_path_is_one_line_exit_2_before_any_work(tmp_path, banking_head_bundle, banking_slice,
                                                                    command, output, message):
    (tmp_path / "afile").write_text("mine")
    output = output if output.startswith("/") else str(tmp_path / output)
    args = {"train": ["train", "--data", str(banking_slice["train"]), "--set", "onnx=false"],
            "evaluate": ["evaluate", "--model", str(banking_head_bundle), "--data", str(banking_slice["test"])],
            "discover": ["discover", "--data", str(banking_slice["test"])]}[command]
    error = one_line_error(supportbot(*args, "--output", output, "--quiet"), command)
    assert f"--output {output}: {message.format(tmp=tmp_path)}" in error
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("command", ["predict", "promote"])
def test_a_bundle_whose_labels_do_not_match_its_head_is_refused_in_one_line(tmp_path, banking_head_bundle, command):
    edited = tmp_path / "lab7"
    shutil.copytree(banking_head_bundle, edited)
    meta = json.loads((edited / "bundle.json").read_text())
    meta["labels"] = meta["labels"][:-1]
    (edited / "bundle.json").write_text(json.dumps(meta))
    args = ["predict", "--model", str(edited), "hello"] if command == "predict" else ["promote", str(edited)]
    run = subprocess.run([sys.executable, "-m", "supportbot.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env={**os.environ, "SUPPORTBOT_DATA_DIR": str(tmp_path / "data")})
    assert one_line_error(run, command) == (
        f"supportbot {command}: error: bundle {edited}: head.safetensors has 8 outputs but bundle.json lists 7 labels")
    if command == "promote":
        from serve.fleet import FLEET_FILE, FleetStore

        assert FleetStore(sqlite_path=tmp_path / "data" / FLEET_FILE).get() is None, "nothing promoted"
