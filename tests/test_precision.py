"""int8 inference: the layer's arithmetic, and int8 bundles (head and lora) trained, calibrated and
served as int8, on a slice of BANKING77 with the real encoder."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_bundle
from torch import nn

from bot.classifier import IntentClassifier, TorchBackend
from bot.precision import Int8Linear, apply_precision
from finetune.calibrate import fit_temperature
from finetune.config import load_config
from finetune.data import load
from finetune.train import prepare_data


def _test_rows(path) -> tuple[list[str], list[str]]:
    rows = load(str(path))["train"]
    return list(rows["text"]), list(rows["label"])


def test_int8_linear_is_close_to_fp32_and_each_row_is_independent_of_the_batch():
    torch.manual_seed(0)
    linear = nn.Linear(384, 1536)
    quantised = Int8Linear(linear)
    x = torch.randn(4, 9, 384)
    with torch.inference_mode():
        exact, approx = linear(x), quantised(x)
        assert ((exact - approx).norm() / exact.norm()).item() < 0.02
        assert torch.equal(quantised(x[2:3, 4:5]), approx[2:3, 4:5])  # alone == in a batch, bit for bit
        assert quantised(torch.zeros(0, 384)).shape == (0, 1536)


def test_layers_reading_one_input_quantise_it_once_and_notice_an_in_place_change():
    torch.manual_seed(1)
    layers = nn.ModuleDict({"query": nn.Linear(16, 8), "key": nn.Linear(16, 8)})
    shared = apply_precision(layers, "int8")  # the two share one cache of the last input
    alone = {name: Int8Linear(layer) for name, layer in layers.items()}
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(shared["query"](x), alone["query"](x))
        assert torch.equal(shared["key"](x), alone["key"](x))  # served from the cache, same numbers
        x.mul_(3.0)  # a changed tensor is quantised afresh
        assert torch.equal(shared["key"](x), alone["key"](x))
        assert torch.equal(shared["query"](x.clone()), alone["query"](x))


def test_apply_precision_converts_a_copy_and_refuses_unknown_names():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert apply_precision(model, "fp32") is model
    converted = apply_precision(model, "int8")
    assert [type(m).__name__ for m in converted] == ["Int8Linear", "ReLU", "Int8Linear"]
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        apply_precision(model, "int4")


@pytest.fixture(scope="module")
def int8_head_bundle(tmp_path_factory, banking_slice):
    return train_bundle(tmp_path_factory.mktemp("bundles") / "int8-head", f"data={banking_slice['train']}", "precision=int8")


def test_int8_head_bundle_serves_int8_and_agrees_with_fp32(int8_head_bundle, banking_head_bundle, banking_slice):
    meta = json.loads((int8_head_bundle / "bundle.json").read_text())
    assert meta["encoder"]["precision"] == "int8"
    int8 = IntentClassifier.from_bundle(int8_head_bundle)
    assert isinstance(int8.backend, TorchBackend)  # int8 bundles have no ONNX graph: bot/precision.py runs in torch
    linears = [type(m).__name__ for m in int8.backend.encoder.model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert linears and set(linears) == {"Int8Linear"}
    texts, gold = _test_rows(banking_slice["test"])
    quick = int8.predict(texts)
    exact = IntentClassifier.from_bundle(banking_head_bundle).predict(texts)
    accuracy = sum(p.label == g for p, g in zip(quick, gold)) / len(gold)
    agreement = sum(a.label == b.label for a, b in zip(quick, exact)) / len(texts)
    assert accuracy > 0.8 and agreement > 0.9, (accuracy, agreement)


def test_an_int8_prediction_does_not_depend_on_the_batch(int8_head_bundle, banking_slice):
    """Per-token activation scales: the same text gets the same answer alone or among others."""
    classifier = IntentClassifier.from_bundle(int8_head_bundle)
    texts, _ = _test_rows(banking_slice["test"])
    batched = classifier.predict(texts[:24])
    for text, together in zip(texts[:24], batched):
        alone = classifier.predict([text])[0]
        assert alone.label == together.label
        assert alone.confidence == pytest.approx(together.confidence, abs=1e-4)


def test_int8_lora_bundle_is_calibrated_on_the_merged_int8_body(tmp_path, banking_slice):
    overrides = [f"data={banking_slice['train']}", "strategy=lora", "precision=int8", "epochs=1", "max_length=32",
                 "lora.r=4", "batch_size=16"]
    path = train_bundle(tmp_path / "int8-lora", *overrides)
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["encoder"]["precision"] == "int8" and set(meta["files"]) == {"head.safetensors", "adapter.safetensors"}
    classifier = IntentClassifier.from_bundle(path)
    texts, gold = _test_rows(banking_slice["test"])
    accuracy = sum(p.label == g for p, g in zip(classifier.predict(texts), gold)) / len(gold)
    assert accuracy > 0.5, accuracy
    # the temperature was fitted on the logits the served (merged, int8) model gives on validation
    prepared = prepare_data(load_config(None, overrides))
    served_logits = classifier.logits(list(prepared.val["text"])).clone()  # out of inference mode, for LBFGS
    assert fit_temperature(served_logits, prepared.y_val) == pytest.approx(meta["calibration"]["temperature"], rel=1e-3)


def test_the_embedding_cache_keeps_int8_vectors_apart_from_fp32(tmp_path):
    from bot.encoder import Encoder
    from finetune.cache import EmbeddingCache

    encoder = Encoder.load("sentence-transformers/all-MiniLM-L6-v2")
    int8 = Encoder(apply_precision(encoder.model, "int8"), encoder.tokenizer, encoder.max_length)
    texts = ["where is my parcel", "refund please", "hello"]
    fp32_cache = EmbeddingCache(tmp_path, "0" * 64, 64)
    int8_cache = EmbeddingCache(tmp_path, "0" * 64, 64, "int8")
    exact, computed = fp32_cache.embed(encoder, texts, progress=False)
    assert computed == 3
    quick, computed = int8_cache.embed(int8, texts, progress=False)
    assert computed == 3 and not torch.equal(exact, quick)  # not served the fp32 vectors
    again, computed = int8_cache.embed(int8, texts, progress=False)
    assert computed == 0 and torch.equal(again, quick)


def test_an_int8_bundle_gets_no_onnx_graph_and_serves_on_torch(int8_head_bundle):
    from finetune.export import ExportError, export_bundle

    assert json.loads((int8_head_bundle / "bundle.json").read_text()).get("onnx") is None
    with pytest.raises(ExportError, match="served by PyTorch only"):
        export_bundle(int8_head_bundle, texts=["where is my order"])
