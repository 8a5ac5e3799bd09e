"""The `contrastive` few-shot strategy: intent-aware batches, the supervised contrastive loss, and a real
run on a 10-shot slice of BANKING77 whose adapted body separates unseen texts of different intents better
than the base does, and whose bundle serves through the lora load half under its own name."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from bot.classifier import IntentClassifier
from bot.encoder import Encoder
from finetune.config import load_config
from finetune.contrastive import intent_batches, supervised_contrastive_loss
from finetune.data import load
from finetune.train import train


def test_intent_batches_hold_every_example_once_in_groups_of_one_intent():
    labels = [i % 5 for i in range(47)]  # 5 intents, 9 or 10 examples each
    batches = intent_batches(range(47), labels, batch_size=16, per_intent=4, rng=random.Random(0))
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(47))
    assert all(len(batch) <= 16 for batch in batches)
    for batch in batches:  # every example meets at least one other example of its intent
        counts = Counter(labels[i] for i in batch)
        assert all(counts[labels[i]] >= 2 for i in batch)


def test_the_loss_is_lower_when_same_intent_vectors_coincide():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    together = F.normalize(torch.eye(3).repeat_interleave(2, dim=0) + 0.01 * torch.randn(6, 3), dim=-1)
    scattered = F.normalize(torch.randn(6, 3), dim=-1)
    assert supervised_contrastive_loss(together, labels, 0.1) < supervised_contrastive_loss(scattered, labels, 0.1)
    lonely = torch.tensor([0, 1, 2, 3, 4, 5])  # no positives: no pull, and no NaN
    assert supervised_contrastive_loss(scattered, lonely, 0.1).item() == 0.0


def _separation(vectors: torch.Tensor, labels: list[str]) -> float:
    """Silhouette (cosine distance): how much closer each text is to its own intent than to the nearest other one,
    relative to the larger of the two, so a body that merely spreads every vector apart does not score."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(vectors.numpy(), labels, metric="cosine"))


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory, banking_slice):
    cfg = load_config(None, [
        f"data={banking_slice['train']}", "strategy=contrastive", "few_shot=10", "epochs=3", "lr=1e-3", "batch_size=32",
        "max_length=32", "lora.r=8", "onnx=false", f"output={tmp_path_factory.mktemp('contrastive') / 'bundle'}",
    ])
    return train(cfg, progress=False, log=lambda _m: None)


def test_contrastive_body_separates_unseen_texts_of_different_intents_better_than_the_base(contrastive_run, banking_slice):
    test = load(str(banking_slice["test"]))["train"]
    texts, labels = list(test["text"]), list(test["label"])
    base = Encoder.load("sentence-transformers/all-MiniLM-L6-v2", max_length=32)
    model = contrastive_run.model.eval()
    with torch.inference_mode():
        adapted = model.encoder.forward(model.body, base.tokenize(texts))
    assert _separation(adapted, labels) > _separation(base.embed(texts), labels) + 0.02


def test_contrastive_bundle_records_both_phases_and_serves_under_its_own_name(contrastive_run, banking_slice):
    meta = json.loads((contrastive_run.bundle.path / "bundle.json").read_text())
    assert meta["strategy"] == "contrastive" and meta["lora"]["r"] == 8
    assert set(meta["files"]) == {"head.safetensors", "adapter.safetensors"}
    history = meta["training"]["history"]
    body_losses = [row["contrastive_loss"] for row in history if "contrastive_loss" in row]
    assert len(body_losses) == 3 and body_losses[-1] < body_losses[0]
    assert any("val_loss" in row for row in history)  # then the head phase, with early stopping
    test = load(str(banking_slice["test"]))["train"]
    classifier = IntentClassifier.from_bundle(contrastive_run.bundle.path, backend="torch")
    predictions = classifier.predict(list(test["text"]))
    assert sum(p.label == gold for p, gold in zip(predictions, test["label"])) / len(test) > 0.8
