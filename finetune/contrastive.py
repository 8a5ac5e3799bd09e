"""The body phase of the `contrastive` strategy: supervised contrastive learning on in-batch positives.

SetFit (Tunstall et al. 2022) showed that, with a handful of examples per intent, pulling the
sentence vectors of one intent together *before* fitting a classifier beats training the
classifier on the encoder as it is. SetFit does it with generated pairs (a cosine loss on each
pair) and updates every weight; both cost: the pair count grows with the square of the data,
and a full copy of the body must be stored. Here the same idea is done as:

- **in-batch positives, not pairs.** A batch holds `per_intent` examples of each of several
  intents (`intent_batches`); every other example of the same intent is a positive and every
  example of another intent a negative, all at once (the supervised contrastive loss of Khosla
  et al. 2020, the multi-positive form of MultipleNegativesRanking). One epoch reads each text
  once, so its cost is that of one supervised epoch, whatever the number of intents.
- **LoRA adapters on the frozen base**, as the `lora` strategy trains them: the base stays
  bit-identical and a bundle carries a few MB of adapter.
- **on the serving vectors**: the loss is computed on the same mean-pooled, L2-normalised vectors
  (`Encoder.forward`) that the head later reads, so nothing learnt here is lost to a different pooling.

The phase runs a fixed number of epochs (the recipe's `epochs`): with one validation example
per intent, a validation loss is too noisy to stop on. The head phase that follows (the
strategy's `fit`) trains on the vectors of the adapted body with early stopping, as `head` does.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .loop import Inputs, Run, resolved, to_device, warmup_then_decay


def supervised_contrastive_loss(vectors: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors with a positive of -mean log p(positive | anchor), softmax over the batch minus the anchor.

    `vectors` are unit-length rows; anchors whose intent has no other example in the batch only serve as negatives.
    """
    n = len(labels)
    similarity = vectors @ vectors.T / temperature
    itself = torch.eye(n, dtype=torch.bool, device=vectors.device)
    similarity = similarity.masked_fill(itself, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~itself
    counts = positive.sum(dim=1)
    anchors = counts > 0
    if not anchors.any():
        return vectors.sum() * 0.0  # no intent twice in the batch: nothing to pull together
    per_anchor = log_prob.masked_fill(~positive, 0.0).sum(dim=1)[anchors] / counts[anchors]
    return -per_anchor.mean()


def intent_batches(indices: Sequence[int], labels: Sequence[int], batch_size: int, per_intent: int,
                   rng: random.Random, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Batches of at most `batch_size` made of groups of `per_intent` examples of one intent.

    Each intent's examples are shuffled and cut into groups (a last group of one joins the one
    before, so every example has a positive); the groups are shuffled and packed into batches,
    and the batches shuffled. With token `lengths`, groups of similar longest length are packed
    together (a batch is padded to its longest text; one long text among short ones would
    multiply the work), still in a new random draw of groups every epoch. Every index appears
    exactly once per epoch.
    """
    by_label: dict[int, list[int]] = defaultdict(list)
    for index in indices:
        by_label[labels[index]].append(index)
    groups: list[list[int]] = []
    for label in sorted(by_label):
        members = by_label[label][:]
        rng.shuffle(members)
        chunks = [members[start : start + per_intent] for start in range(0, len(members), per_intent)]
        if len(chunks) > 1 and len(chunks[-1]) < 2:
            leftover = chunks.pop()
            chunks[-1].extend(leftover)
        groups += chunks
    rng.shuffle(groups)
    if lengths is not None:
        groups.sort(key=lambda group: max(lengths[i] for i in group))  # stable: ties stay shuffled
    batches: list[list[int]] = []
    current: list[int] = []
    for group in groups:
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        current += group
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def train_body(run: Run, body: nn.Module, inputs: Inputs) -> list[dict[str, float]]:
    """The contrastive phase on the in-scope training examples: `body`'s trainable parameters (the adapters)
    at the recipe's lr with warm-up then decay, for `epochs` epochs. Returns one history row per epoch."""
    cfg, accelerator = run.cfg, run.accelerator
    settings = cfg.contrastive
    epochs, batch_size = resolved(cfg.epochs), resolved(cfg.batch_size)
    in_scope = run.prepared.in_scope("train")
    labels = run.prepared.y_train.tolist()
    rng = random.Random(cfg.seed)
    groups: list[dict[str, Any]] = [{"params": [p for p in body.parameters() if p.requires_grad], "lr": resolved(cfg.lr)}]
    if settings.ce_weight > 0:  # the head learns alongside, as the anchor of the cross-entropy term
        run.head.to(accelerator.device)
        groups.append({"params": list(run.head.parameters()), "lr": resolved(cfg.head_lr)})
    optimizer = torch.optim.AdamW(groups, weight_decay=resolved(cfg.weight_decay))
    lengths = inputs.lengths["train"] if inputs.lengths is not None else None
    steps_per_epoch = len(intent_batches(in_scope, labels, batch_size, settings.per_intent, random.Random(cfg.seed), lengths))
    scheduler = warmup_then_decay(optimizer, cfg, steps_per_epoch)
    body, optimizer = accelerator.prepare(body, optimizer)
    body.train()
    run.head.train()
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, epochs + 1), desc="contrastive body", unit="epoch", disable=None if run.progress else True)
    for epoch in bar:
        batches = intent_batches(in_scope, labels, batch_size, settings.per_intent, rng, lengths)
        batches = batches[accelerator.process_index :: accelerator.num_processes]
        total, seen = 0.0, 0
        for indices in batches:
            batch = to_device(inputs.batch("train", indices), accelerator.device)
            vectors = run.encoder.forward(body, batch)
            targets = torch.tensor([labels[i] for i in indices], device=vectors.device)
            loss = supervised_contrastive_loss(vectors, targets, settings.temperature)
            if settings.ce_weight > 0:
                loss = loss + settings.ce_weight * F.cross_entropy(run.head(vectors), targets, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(indices)
            seen += len(indices)
        history.append({"contrastive_epoch": epoch, "contrastive_loss": total / max(seen, 1)})
        bar.set_postfix(loss=f"{history[-1]['contrastive_loss']:.3f}")
    bar.close()
    body = accelerator.unwrap_model(body)
    body.eval()
    return history


def embed_splits(run: Run, body: nn.Module, inputs: Inputs) -> dict[str, torch.Tensor]:
    """Pooled vectors of every train and validation row through `body` (eval mode), in row order."""
    out: dict[str, torch.Tensor] = {}
    sizes = {"train": len(run.prepared.train), "val": len(run.prepared.val)}
    was_training = body.training
    body.eval()
    with torch.inference_mode():
        for split, size in sizes.items():
            order = inputs.length_order(split, list(range(size)))
            vectors = torch.empty(size, run.encoder.dim)
            for start in range(0, size, inputs.eval_rows):
                chunk = order[start : start + inputs.eval_rows]
                vectors[chunk] = run.encoder.forward(body, to_device(inputs.batch(split, chunk), run.accelerator.device)).float().cpu()
            out[split] = vectors
    body.train(was_training)
    return out
