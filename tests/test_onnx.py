"""The ONNX serving backend on the real model: parity with PyTorch (head and lora bundles), the export
command and its gate, checksums, and backend selection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_bundle

from bot.bundle import BundleError
from bot.bundle import load as load_bundle
from bot.classifier import IntentClassifier, TorchBackend, choose_backend
from bot.onnx_backend import GRAPH_FILE, OnnxBackend
from bot.threads import serving_threads
from finetune.data import load as load_data
from serve.settings import SettingsError, load_settings

TOLERANCE = 1e-4  # the export's default gate (finetune/export.py), checked again here on held-out texts


def supportbot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supportbot.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)


def held_out_texts(spec: Path) -> list[str]:
    return [str(t) for t in load_data(str(spec))["train"]["text"]]


def assert_backends_agree(bundle: Path, texts: list[str]) -> None:
    onnx = IntentClassifier.from_bundle(bundle)
    reference = IntentClassifier.from_bundle(bundle, backend="torch")
    assert isinstance(onnx.backend, OnnxBackend) and isinstance(reference.backend, TorchBackend)
    v_onnx, l_onnx = onnx.embed_and_logits(texts)
    v_torch, l_torch = reference.embed_and_logits(texts)
    p_onnx, p_torch = onnx.probabilities(l_onnx), reference.probabilities(l_torch)
    assert float((p_onnx - p_torch).abs().max()) <= TOLERANCE
    assert float((v_onnx - v_torch).abs().max()) <= TOLERANCE  # the vectors knowledge retrieval searches with
    assert torch.equal(p_onnx.argmax(-1), p_torch.argmax(-1))
    assert [p.label for p in onnx.predict(texts[:5])] == [p.label for p in reference.predict(texts[:5])]


@pytest.fixture(scope="module")
def exported_head_bundle(banking_head_bundle, tmp_path_factory) -> Path:
    """A copy of the torch-only BANKING77 head bundle, given its graph by `supportbot export`."""
    target = tmp_path_factory.mktemp("export") / "head"
    shutil.copytree(banking_head_bundle, target)
    run = supportbot("export", str(target))
    assert run.returncode == 0, run.stderr
    assert "export summary" in run.stdout and "parity_max_abs_diff" in run.stdout
    return target


def test_export_adds_a_checksummed_graph_that_serves_by_default(exported_head_bundle, banking_head_bundle):
    before = json.loads((banking_head_bundle / "bundle.json").read_text())
    after = json.loads((exported_head_bundle / "bundle.json").read_text())
    assert set(after["files"]) == set(before["files"]) | {GRAPH_FILE}
    assert after["onnx"]["file"] == GRAPH_FILE and after["onnx"]["parity"]["argmax_disagreements"] == 0
    assert after["onnx"]["parity"]["texts"] == before["training"]["n_validation"]
    assert after["labels"] == before["labels"] and after["calibration"] == before["calibration"]
    assert after["version"] != before["version"]  # a different served artefact is a different version
    assert choose_backend(load_bundle(exported_head_bundle)) == "onnx"
    assert choose_backend(load_bundle(banking_head_bundle)) == "torch"  # no graph: PyTorch, as before


def test_head_bundle_onnx_reproduces_torch_on_held_out_texts(exported_head_bundle, banking_slice):
    assert_backends_agree(exported_head_bundle, held_out_texts(banking_slice["test"]))


def test_lora_bundle_trains_with_its_graph_and_onnx_reproduces_torch(tmp_path, banking_slice):
    path = train_bundle(
        tmp_path / "lora", f"data={banking_slice['train']}", "strategy=lora", "few_shot=12", "epochs=1", "max_length=32",
        "lora.r=4", "batch_size=16", "onnx=true",
    )
    meta = json.loads((path / "bundle.json").read_text())
    assert set(meta["files"]) == {"head.safetensors", "adapter.safetensors", GRAPH_FILE}
    assert meta["onnx"]["parity"]["max_abs_diff"] <= meta["onnx"]["parity"]["tolerance"]
    assert_backends_agree(path, held_out_texts(banking_slice["test"]))


def test_a_failed_parity_gate_leaves_the_bundle_serving_on_torch(banking_head_bundle, tmp_path):
    target = tmp_path / "strict"
    shutil.copytree(banking_head_bundle, target)
    manifest = (target / "bundle.json").read_bytes()
    run = supportbot("export", str(target), "--tolerance", "1e-12")
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("supportbot export: parity gate failed") and "keeps serving on PyTorch" in lines[-1]
    assert "Traceback" not in run.stderr
    assert (target / "bundle.json").read_bytes() == manifest and not (target / GRAPH_FILE).exists()
    assert IntentClassifier.from_bundle(target).backend_name == "torch"


def test_a_damaged_graph_is_refused_by_its_checksum(shop_bundle, tmp_path):
    target = tmp_path / "damaged"
    shutil.copytree(shop_bundle, target)
    graph = target / GRAPH_FILE
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{GRAPH_FILE} is damaged"):
        IntentClassifier.from_bundle(target)
    run = supportbot("predict", "--model", str(target), "hello")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and GRAPH_FILE in run.stderr


def test_backend_selection(shop_bundle, banking_head_bundle, monkeypatch):
    assert IntentClassifier.from_bundle(shop_bundle).backend_name == "onnx"
    assert IntentClassifier.from_bundle(shop_bundle, backend="torch").backend_name == "torch"
    monkeypatch.setenv("SUPPORTBOT_BACKEND", "torch")
    assert IntentClassifier.from_bundle(shop_bundle).backend_name == "torch"
    assert IntentClassifier.from_bundle(shop_bundle, backend="onnx").backend_name == "onnx"  # the argument wins
    monkeypatch.setenv("SUPPORTBOT_BACKEND", "tpu")
    with pytest.raises(BundleError, match="unknown backend 'tpu'"):
        IntentClassifier.from_bundle(shop_bundle)
    monkeypatch.delenv("SUPPORTBOT_BACKEND")
    with pytest.raises(BundleError, match=r"has no ONNX graph.*supportbot export"):
        IntentClassifier.from_bundle(banking_head_bundle, backend="onnx")


def test_the_serving_backend_is_a_setting(tmp_path, monkeypatch):
    assert load_settings(None, data_dir=tmp_path).backend is None
    monkeypatch.setenv("SUPPORTBOT_BACKEND", "torch")
    assert load_settings(None, data_dir=tmp_path).backend == "torch"
    monkeypatch.setenv("SUPPORTBOT_BACKEND", "gpu")
    with pytest.raises(SettingsError, match="backend"):
        load_settings(None, data_dir=tmp_path)
    monkeypatch.delenv("SUPPORTBOT_BACKEND")
    config = tmp_path / "serve.yaml"
    config.write_text("backend: onnx\n")
    assert load_settings(config, data_dir=tmp_path).backend == "onnx"


def test_the_threads_setting_wins_then_omp_num_threads_then_the_cores(monkeypatch):
    monkeypatch.delenv("SUPPORTBOT_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert serving_threads() == 1  # the knob torch users set to share a machine is honoured, not overridden by the cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # OpenMP's nested form: the first level counts
    assert serving_threads() == 3
    monkeypatch.setenv("SUPPORTBOT_THREADS", "2")
    assert serving_threads() == 2 and serving_threads(5) == 5
    monkeypatch.delenv("SUPPORTBOT_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: ignored, as OpenMP ignores it
    assert serving_threads() == len(os.sched_getaffinity(0))


def test_onnx_threads_follow_the_processs_share_and_do_not_spin(shop_bundle):
    classifier = IntentClassifier.from_bundle(shop_bundle, num_threads=1)
    backend = classifier.backend
    assert isinstance(backend, OnnxBackend) and backend.threads == 1
    options = backend.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    one = classifier.logits(["where is my order"])
    batched = classifier.logits(["where is my order", "I would like to return the shoes I bought, they are too small"])
    assert torch.allclose(one[0], batched[0], atol=1e-5)  # padding in a batch does not change a text's answer
