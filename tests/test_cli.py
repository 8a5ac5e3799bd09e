"""The command line as a user runs it: a real process, real bundles, --help, one-line errors."""

from __future__ import annotations

import json
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
    for word in ("--strategy {head,lora,full}", "--set KEY=VALUE", "pack:shop", "hf:NAME", ":test", "oos"):
        assert word in out


def test_train_then_predict(tmp_path, banking_slice):
    out = tmp_path / "model"
    run = supportbot("train", "--data", str(banking_slice["train"]), "--eval-data", str(banking_slice["test"]),
                     "--output", str(out), "--quiet", "--set", "epochs=40")
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
        (["train", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read"),
        (["train", "--set", "epochs=-3"], "epochs: Input should be greater than or equal to 1"),
        (["train", "--set", "no_such_field=1"], "no_such_field: Extra inputs are not permitted"),
        (["train", "--data", "pack:nope"], "pack:nope: no such packaged domain pack"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, message):
    run = supportbot(*args)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1
