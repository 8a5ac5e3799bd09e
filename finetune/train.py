"""Training: one loop for the three strategies, read top to bottom.

- head: the base stays frozen; texts are embedded once (cached on disk) and a head is
  trained on the vectors.
- lora: peft LoRA adapters on the frozen base, trained jointly with the head.
- full: every encoder weight trains (the baseline the other two are measured against).

The loop runs on `accelerate`, so the same code runs on one CPU, one GPU, or under
`accelerate launch`. After training: temperature and thresholds are fitted on validation
data and everything is written as a verified bundle (bot/bundle.py).
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from tqdm.auto import tqdm

from bot import bundle as bundle_mod
from bot.bundle import Bundle
from bot.classifier import configure_threads, lora_config
from bot.encoder import Encoder, base_weights_sha256, length_sorted_batches, resolve_base
from bot.heads import IntentHead
from bot.precision import apply_precision

from . import data
from .cache import EmbeddingCache, default_cache_dir
from .calibrate import choose_thresholds, fit_temperature
from .config import TrainConfig


@dataclass
class Prepared:
    """The texts a run trains and calibrates on, with label ids (-1 marks out of scope)."""

    labels: list[str]
    train: Dataset
    val: Dataset
    test: Dataset | None
    y_train: torch.Tensor = field(init=False)
    y_val: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        index = {label: i for i, label in enumerate(self.labels)}
        self.y_train = torch.tensor([index.get(label, -1) for label in self.train["label"]])
        self.y_val = torch.tensor([index.get(label, -1) for label in self.val["label"]])


@dataclass
class TrainResult:
    bundle: Bundle
    summary: dict[str, Any]
    model: nn.Module  # what trained: the head, or the encoder classifier (peft-wrapped for lora)


class EncoderClassifier(nn.Module):
    """Encoder body (frozen + LoRA, or unfrozen) -> mean pooling -> head."""

    def __init__(self, encoder: Encoder, body: nn.Module, head: IntentHead):
        super().__init__()
        self.encoder = encoder
        self.body = body
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder.forward(self.body, batch))


def prepare_data(cfg: TrainConfig) -> Prepared:
    splits = data.load(cfg.data)
    if "train" not in splits:
        raise data.DataError(f"{cfg.data}: no training split")
    test_ds = None
    if cfg.eval_data:
        test_ds = data.evaluation_split(data.load(cfg.eval_data))[1]
    return prepare_splits(cfg, splits["train"], splits.get("validation"), test_ds)


def prepare_splits(cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset | None, test_ds: Dataset | None = None) -> Prepared:
    """The recipe's data rules (few-shot, validation split, label checks) on splits already read.

    `prepare_data` reads cfg.data through it; cross-validation folds (finetune/evaluate.py) call it directly.
    """
    if cfg.few_shot:
        train_ds = data.few_shot(train_ds, cfg.few_shot, cfg.seed)
    data.validate_training(train_ds)
    if val_ds is None:
        train_ds, val_ds = data.stratified_split(train_ds, cfg.val_fraction, cfg.seed)
    labels = sorted(set(train_ds["label"]) - {data.OOS_LABEL})
    if len(labels) < 2:
        raise data.DataError(f"{cfg.data}: need at least 2 intents besides {data.OOS_LABEL!r}, found {len(labels)}")
    unknown = sorted(set(val_ds["label"]) - set(labels) - {data.OOS_LABEL})
    if unknown:
        raise data.DataError(f"{cfg.data}: validation labels not in training data: {', '.join(unknown[:5])}")
    return Prepared(labels, train_ds, val_ds, test_ds)


def train(
    cfg: TrainConfig, *, prepared: Prepared | None = None, progress: bool = True, log: Callable[[str], None] = print
) -> TrainResult:
    """Train per `cfg` and write its bundle. `prepared` (e.g. cross-validation folds) replaces reading cfg.data."""
    cfg = cfg.resolved()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # peft calls deprecated names
    started = time.perf_counter()
    configure_threads()
    set_seed(cfg.seed)
    prepared = prepared or prepare_data(cfg)
    accelerator = Accelerator()
    resolved_base = resolve_base(cfg.base)
    encoder = Encoder.load(resolved_base, max_length=cfg.max_length)
    base_sha = base_weights_sha256(resolved_base)
    head = IntentHead(encoder.dim, len(prepared.labels), hidden=cfg.head.hidden, dropout=cfg.head.dropout, scale=cfg.head.scale)
    log(f"training {cfg.strategy} on {len(prepared.train)} examples, {len(prepared.labels)} intents, "
        f"validating on {len(prepared.val)}")

    in_scope = (prepared.y_train >= 0).nonzero().flatten().tolist()
    val_in = (prepared.y_val >= 0).nonzero().flatten().tolist()
    val_oos = (prepared.y_val < 0).nonzero().flatten().tolist()

    # Inputs: for `head` the cached embeddings; otherwise token ids, batched by similar length.
    if cfg.strategy == "head":
        cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), base_sha, cfg.max_length, cfg.precision)
        texts = list(prepared.train["text"]) + list(prepared.val["text"])
        serving_encoder = Encoder(apply_precision(encoder.model, cfg.precision), encoder.tokenizer, cfg.max_length)
        vectors, computed = cache.embed(serving_encoder, texts, batch_size=cfg.embed_batch_size, progress=progress)
        cache.close()
        log(f"embeddings: {computed} computed, {len(texts) - computed} from the cache ({cache.path})")
        x_train, x_val = vectors[: len(prepared.train)], vectors[len(prepared.train) :]
        model: nn.Module = head

        def make_inputs(split: str, indices: list[int]):
            return (x_train if split == "train" else x_val)[indices]

        train_lengths = None
    else:
        body = encoder.model
        if cfg.strategy == "lora":
            from peft import get_peft_model

            body = get_peft_model(body, lora_config(cfg.lora.model_dump()))
        else:
            body.requires_grad_(True)
        body.train()
        model = EncoderClassifier(encoder, body, head)
        features = {
            "train": encoder.tokenize(prepared.train["text"], pad=False),
            "val": encoder.tokenize(prepared.val["text"], pad=False),
        }
        train_lengths = [len(ids) for ids in features["train"]["input_ids"]]

        def make_inputs(split: str, indices: list[int]):
            return encoder.pad(features[split], indices)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(_param_groups(model, head, cfg), weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(in_scope) / cfg.batch_size)
    scheduler = _schedule(optimizer, cfg, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = random.Random(cfg.seed)

    def logits_for(split: str, indices: list[int], net: nn.Module | None = None) -> torch.Tensor:
        """Eval-mode logits of `net` (default: the model in training), rows in the order of `indices`."""
        net = model if net is None else net
        net.eval()
        out = []
        step = 256 if cfg.strategy == "head" else 64  # vectors are cheap; token batches are not
        with torch.inference_mode():
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                out.append(net(_to(make_inputs(split, chunk), accelerator.device)).float().cpu())
        model.train()
        return torch.cat(out) if out else torch.zeros(0, len(prepared.labels))

    def val_order(indices: list[int]) -> list[int]:
        if cfg.strategy == "head":
            return indices
        lengths = [len(features["val"]["input_ids"][i]) for i in indices]
        return [indices[j] for j in sorted(range(len(indices)), key=lengths.__getitem__)]

    val_in_sorted = val_order(val_in)
    y_val_sorted = prepared.y_val[val_in_sorted]
    best = {"loss": math.inf, "epoch": 0, "state": None, "acc": 0.0}
    history = []
    epochs_bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {cfg.strategy}", unit="epoch", disable=None if progress else True)
    for epoch in epochs_bar:
        model.train()
        # every process draws the same shuffled batches (same seed) and takes its share of them
        batches = _epoch_batches(in_scope, train_lengths, cfg.batch_size, rng)
        batches = batches[accelerator.process_index :: accelerator.num_processes]
        steps = tqdm(batches, desc=f"epoch {epoch}", unit="step", leave=False, disable=None if progress and cfg.strategy != "head" else True)
        running = 0.0
        for indices in steps:
            inputs = _to(make_inputs("train", indices), accelerator.device)
            targets = prepared.y_train[indices].to(accelerator.device)
            loss = F.cross_entropy(model(inputs), targets, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item() * len(indices)
            steps.set_postfix(loss=f"{loss.item():.3f}")
        val_logits = logits_for("val", val_in_sorted)
        val_loss = F.cross_entropy(val_logits, y_val_sorted).item() if len(val_in) else 0.0
        val_acc = (val_logits.argmax(-1) == y_val_sorted).float().mean().item() if len(val_in) else 0.0
        history.append({"epoch": epoch, "train_loss": running / max(len(in_scope), 1), "val_loss": val_loss, "val_accuracy": val_acc})
        epochs_bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}")
        if val_loss < best["loss"] - 1e-5:
            best = {"loss": val_loss, "epoch": epoch, "acc": val_acc, "state": _trainable_state(model)}
        elif epoch - best["epoch"] >= cfg.patience:
            break
    epochs_bar.close()
    if best["state"] is not None:
        accelerator.unwrap_model(model).load_state_dict(best["state"], strict=False)
    model = accelerator.unwrap_model(model)
    train_seconds = time.perf_counter() - started

    # Calibration on validation, of the model as it will serve: temperature on in-scope logits, then floor and gap.
    serving = _serving_model(model, encoder, head, cfg)
    val_logits = logits_for("val", val_in_sorted, serving)
    temperature = fit_temperature(val_logits, y_val_sorted)
    val_probs = torch.softmax(val_logits / temperature, -1).numpy()
    oos_probs = torch.softmax(logits_for("val", val_order(val_oos), serving) / temperature, -1).numpy() if val_oos else None
    thresholds = choose_thresholds(val_probs, y_val_sorted.numpy(), oos_probs, cfg.calibration)
    metrics = _metrics(val_probs, y_val_sorted.numpy(), oos_probs, thresholds.confidence_floor)
    metrics["best_epoch"] = best["epoch"]
    metrics["val_loss"] = best["loss"]

    meta = {
        "base": {"id": cfg.base, "sha256": base_sha},
        "strategy": cfg.strategy,
        "labels": prepared.labels,
        "out_of_scope_label": data.OOS_LABEL,
        "encoder": {"pooling": "mean", "normalize": True, "max_length": cfg.max_length, "precision": cfg.precision},
        "head": cfg.head.model_dump(),
        "lora": cfg.lora.model_dump() if cfg.strategy == "lora" else None,
        "calibration": {"temperature": temperature, **thresholds.as_dict()},
        "metrics": {"validation": metrics},
        "training": {
            "config": cfg.model_dump(),
            "data_fingerprint": data.fingerprint(prepared.train, prepared.val),
            "n_train": len(in_scope),
            "n_validation": len(prepared.val),
            "n_train_out_of_scope": len(prepared.train) - len(in_scope),
            "epochs_run": len(history),
            "history": history,
            "trainable_parameters": trainable,
            "total_parameters": total_params,
            "seconds": round(train_seconds, 2),
        },
    }
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # under `accelerate launch`, one process writes the bundle
        return TrainResult(bundle_mod.Bundle(Path(cfg.output), meta), {}, model)
    written = bundle_mod.write(cfg.output, meta, _bundle_writers(cfg, model, head))
    summary = {
        "strategy": cfg.strategy,
        "precision": cfg.precision,
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "val_accuracy": metrics["accuracy"],
        "val_macro_f1": metrics["macro_f1"],
        "confidence_floor": thresholds.confidence_floor,
        "ambiguity_gap": thresholds.ambiguity_gap,
        "temperature": temperature,
        "seconds": round(time.perf_counter() - started, 2),
        "bundle": str(written.path),
        "version": written.version,
    }
    if "oos_recall" in metrics:
        summary["val_in_scope_accuracy"] = metrics["in_scope_accuracy"]
        summary["val_oos_recall"] = metrics["oos_recall"]
    if prepared.test is not None:
        summary.update({f"test_{k}": v for k, v in score_bundle(written.path, prepared.test, prepared.labels).items()})
    return TrainResult(written, summary, model)


def score_bundle(path: Path, test: Dataset, labels: list[str]) -> dict[str, float]:
    """Held-out scores of the written bundle, through the same inference path as serving."""
    from bot.classifier import IntentClassifier

    classifier = IntentClassifier.from_bundle(path)
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index.get(label, -1) for label in test["label"]])
    probs = classifier.probabilities(classifier.logits(list(test["text"]))).numpy()
    in_scope = y >= 0
    scores = _metrics(probs[in_scope], y[in_scope], probs[~in_scope] if (~in_scope).any() else None, classifier.confidence_floor)
    scores["n"] = len(y)
    return scores


# ---- pieces of the loop ---------------------------------------------------------------------


def _serving_model(model: nn.Module, encoder: Encoder, head: IntentHead, cfg: TrainConfig) -> nn.Module:
    """What `IntentClassifier` will run: for lora/full at int8, a copy of the trained body (adapters
    merged) with int8 linear layers. The head strategy already trained on int8 embeddings."""
    if cfg.precision == "fp32" or cfg.strategy == "head":
        return model
    body = copy.deepcopy(model.body).merge_and_unload() if cfg.strategy == "lora" else model.body
    return EncoderClassifier(encoder, apply_precision(body, cfg.precision), head)  # apply_precision copies


def _to(inputs, device):
    if isinstance(inputs, dict) or hasattr(inputs, "items"):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _epoch_batches(indices: list[int], lengths: list[int] | None, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches; with token lengths, grouped by length within shuffled windows (less padding)."""
    order = indices[:]
    rng.shuffle(order)
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        for group in length_sorted_batches([lengths[i] for i in chunk], batch_size):
            batches.append([chunk[j] for j in group])
    rng.shuffle(batches)
    return batches


def _param_groups(model: nn.Module, head: IntentHead, cfg: TrainConfig) -> list[dict[str, Any]]:
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": list(head.parameters()), "lr": cfg.head_lr}]
    if body:
        groups.append({"params": body, "lr": cfg.lr})
    return groups


def _schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Constant for `head` (early stopping decides the length); linear warm-up and decay otherwise."""
    if cfg.strategy == "head":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    total = max(1, steps_per_epoch * cfg.epochs)
    warm = max(1, int(total * cfg.warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))
    )


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def _metrics(probs: np.ndarray, targets: np.ndarray, oos_probs: np.ndarray | None, floor: float) -> dict[str, float]:
    pred = probs.argmax(1)
    out = {
        "accuracy": float(accuracy_score(targets, pred)) if len(targets) else 0.0,
        "macro_f1": float(f1_score(targets, pred, average="macro")) if len(targets) else 0.0,
    }
    if oos_probs is not None and len(oos_probs):
        out["in_scope_accuracy"] = float(((pred == targets) & (probs.max(1) >= floor)).mean())
        out["oos_recall"] = float((oos_probs.max(1) < floor).mean())
    return out


def _bundle_writers(cfg: TrainConfig, model: nn.Module, head: IntentHead) -> dict[str, Callable[[Path], None]]:
    """What goes into the bundle: always the head; an adapter (lora) or encoder weights (full); the pack's responses."""
    head_state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    writers: dict[str, Callable[[Path], None]] = {"head.safetensors": lambda p: save_file(head_state, str(p))}
    if cfg.strategy == "lora":
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model.body).items()}
        writers["adapter.safetensors"] = lambda p: save_file(adapter, str(p))
    elif cfg.strategy == "full":
        encoder_state = {k: v.detach().contiguous().cpu() for k, v in model.body.state_dict().items()}
        writers["encoder.safetensors"] = lambda p: save_file(encoder_state, str(p))
    responses = _pack_responses(cfg.data)
    if responses is not None:
        writers["responses.yaml"] = lambda p: shutil.copyfile(responses, p)
    return writers


def _pack_responses(spec: str) -> Path | None:
    """A domain pack's responses.yaml travels in the bundle, so model and answers version together."""
    if spec.startswith("pack:"):
        from bot.domains import pack_path

        folder = pack_path(spec[5:])
    else:
        folder = Path(spec.rsplit(":", 1)[0] if not Path(spec).exists() else spec)
    candidate = folder / "responses.yaml" if folder.is_dir() else None
    return candidate if candidate is not None and candidate.is_file() else None
