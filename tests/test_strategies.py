"""Training strategies are a registry: a strategy defined outside finetune/ trains, writes its own
bundle files and loads back for serving, without finetune/train.py or bot/classifier.py knowing it."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bot import strategies as serving_strategies
from bot.bundle import Bundle, BundleError
from bot.classifier import IntentClassifier, TorchBackend
from bot.encoder import Encoder, resolve_base
from finetune import strategies
from finetune.config import ConfigError, TrainConfig, load_config
from finetune.loop import Run
from finetune.strategies import BundleParts, EncoderStrategy, Trained, tensors_writer
from finetune.train import train


class BiasServing(serving_strategies.ServingStrategy):
    """Load half of BitFit: the trained bias terms replace the base's."""

    name = "test_bitfit"
    files = ("biases.safetensors",)

    def attach(self, bundle: Bundle, encoder: Encoder) -> None:
        _, unexpected = encoder.model.load_state_dict(load_file(str(bundle.path / "biases.safetensors")), strict=False)
        if unexpected:
            raise BundleError(f"bundle {bundle.path}: biases.safetensors does not fit the base")


class BitFit(EncoderStrategy):
    """BitFit (Ben Zaken et al. 2022) on the top layer: only its bias terms train, with the head
    (the top layer only, so backward stops there and the test stays fast)."""

    name = "test_bitfit"
    serving = BiasServing
    defaults: ClassVar[dict[str, Any]] = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "patience": 3}

    def body(self, run: Run) -> nn.Module:
        body = run.encoder.model.requires_grad_(False)
        for name, parameter in body.named_parameters():
            parameter.requires_grad_(name.startswith("encoder.layer.5.") and name.endswith(".bias"))
        return body

    def bundle_parts(self, trained: Trained) -> BundleParts:
        body = trained.fitted.model.body
        return BundleParts({"biases.safetensors": tensors_writer({n: p for n, p in body.named_parameters() if p.requires_grad})})


@pytest.fixture
def bitfit():
    strategies.register(BitFit)
    yield BitFit
    strategies.unregister(BitFit.name)


def test_a_strategy_registered_outside_finetune_trains_writes_its_files_and_serves(tmp_path, banking_slice, bitfit):
    from transformers import AutoModel

    seen: list[str] = []

    def note_serving_model(trained: Trained) -> BundleParts:  # a bundle hook, as an ONNX export would be
        seen.append(type(trained.serving_model).__name__)
        labels = json.dumps(trained.run.prepared.labels).encode()
        return BundleParts({"labels-copy.json": lambda path: path.write_bytes(labels)})

    cfg = load_config(None, [f"data={banking_slice['train']}", "strategy=test_bitfit", f"output={tmp_path / 'bitfit'}",
                             "max_length=32", "few_shot=8", "onnx=false"])  # the files the strategy writes, no export
    strategies.register_bundle_hook(note_serving_model)
    try:
        result = train(cfg, progress=False, log=lambda _m: None)
    finally:
        strategies.unregister_bundle_hook(note_serving_model)
    assert seen == ["EncoderClassifier"]

    manifest = json.loads((result.bundle.path / "bundle.json").read_text())
    assert manifest["strategy"] == "test_bitfit"
    assert set(manifest["files"]) == {"head.safetensors", "biases.safetensors", "labels-copy.json"}
    assert result.summary["epochs"] == 2

    # only the top layer's bias terms moved away from the base
    original = AutoModel.from_pretrained(resolve_base(cfg.base)).state_dict()
    trained = result.model.body.state_dict()
    changed = {name for name, tensor in original.items() if not torch.equal(tensor, trained[name])}
    assert changed and all(name.startswith("encoder.layer.5.") and name.endswith(".bias") for name in changed)

    # the bundle loads through the registry and serves what was trained
    classifier = IntentClassifier.from_bundle(result.bundle.path, backend="torch")
    assert isinstance(classifier.backend, TorchBackend)
    texts = ["I still have not received my new card", "how do I activate my card", "can I use apple pay"]
    with torch.inference_mode():
        batch = classifier.backend.encoder.tokenize(texts)
        expected = result.model.eval()({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert torch.allclose(classifier.logits(texts), expected, atol=1e-4)


def test_an_unknown_strategy_is_refused_in_a_recipe_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"strategy: .*unknown strategy 'bitfit'; registered: head, lora, full"):
        load_config(None, ["strategy=bitfit"])


def test_a_bundle_of_an_unregistered_strategy_is_refused(tmp_path, banking_head_bundle):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(banking_head_bundle, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["strategy"] = "prefix_tuning"
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"unknown strategy 'prefix_tuning' \(this supportbot knows head, lora, full"):
        IntentClassifier.from_bundle(copy)


def test_each_strategy_fills_its_own_defaults():
    head, lora = TrainConfig().resolved(), TrainConfig(strategy="lora").resolved()
    assert (head.epochs, head.batch_size, head.lr, head.head_lr) == (300, 256, 3e-3, 3e-3)
    assert (lora.epochs, lora.batch_size, lora.lr, lora.head_lr) == (6, 32, 1e-3, 1e-2)
    assert TrainConfig(strategy="full", lr=1e-4).resolved().head_lr == pytest.approx(1e-3)


def test_registering_both_halves_under_different_names_is_refused():
    class Mismatched(BitFit):
        name = "test_other"

    with pytest.raises(ValueError, match="serving half is named 'test_bitfit'"):
        strategies.register(Mismatched)
    assert "test_other" not in strategies.names()


def test_the_built_in_strategies_are_registered_on_both_sides():
    assert strategies.names()[:3] == ["head", "lora", "full"]
    assert serving_strategies.names()[:3] == ["head", "lora", "full"]
