"""Training, read top to bottom: prepare, fit, calibrate, write.

What trains and how is the strategy's business (finetune/strategies.py: head, lora, full, or any
registered strategy); the shared supervised loop is finetune/loop.py. This module only runs the
steps in order: read the data, load the base, let the strategy fit, calibrate the model *as it
will serve* (temperature on in-scope validation logits, then the confidence floor and ambiguity
gap, finetune/calibrate.py), optionally refit on train + validation (`refit`), and write
everything as a verified bundle (bot/bundle.py).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, concatenate_datasets
from torch import nn

from bot import bundle as bundle_mod
from bot.bundle import BaseWeights, Bundle, Calibration, EncoderSettings, HeadSettings, ManifestBody, TrainingRecord
from bot.classifier import choose_backend, configure_threads
from bot.encoder import Encoder, base_weights_sha256, resolve_base
from bot.heads import IntentHead

from . import data
from .calibrate import Thresholds, choose_thresholds, fit_temperature
from .config import TrainConfig
from .knowledge_train import knowledge_summary  # importing it registers the knowledge bundle hook
from .loop import Fitted, Inputs, Prepared, Run, logits, prepare_data, prepare_splits
from .metrics import training_metrics
from .strategies import BundleParts, Trained, TrainingStrategy, bundle_hooks, tensors_writer, training_strategy

__all__ = ["Prepared", "TrainResult", "prepare_data", "prepare_splits", "score_bundle", "train"]


@dataclass
class TrainResult:
    bundle: Bundle
    summary: dict[str, Any]
    model: nn.Module  # what trained: the head, or the encoder classifier (peft-wrapped for lora)


def train(
    cfg: TrainConfig, *, prepared: Prepared | None = None, progress: bool = True, log: Callable[[str], None] = print
) -> TrainResult:
    """Train per `cfg` and write its bundle. `prepared` (e.g. cross-validation folds) replaces reading cfg.data."""
    cfg = cfg.resolved()
    strategy = training_strategy(cfg.strategy)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # peft calls deprecated names
    started = time.perf_counter()
    configure_threads()
    set_seed(cfg.seed)
    run = start_run(cfg, prepared or prepare_data(cfg), progress=progress, log=log)

    # fit: the strategy's inputs and model, trained (best validation epoch restored)
    inputs = strategy.inputs(run)
    fitted = strategy.fit(run, strategy.model(run), inputs)

    # calibrate the model as it will serve
    trained = calibrate(run, fitted, strategy.serving_model(run, fitted), inputs)
    if cfg.refit:  # keep the first run's choices and let its model go: one model in memory while the second trains
        first = FirstRun.of(trained)
        del trained, fitted, inputs, run
        trained = refit(first, strategy)
        run, fitted = trained.run, trained.fitted
    train_seconds = time.perf_counter() - started

    # write: under `accelerate launch`, one process writes the bundle and the others read it
    if run.accelerator.is_main_process:
        parts = bundle_parts(trained, strategy)
        body = ManifestBody.model_validate({**manifest(trained, strategy, train_seconds).model_dump(), **parts.meta})
        bundle_mod.write(cfg.output, body, parts.files)
        export_serving_graph(cfg, Path(cfg.output), list(run.prepared.val["text"]), log)
    run.accelerator.wait_for_everyone()
    written = bundle_mod.load(cfg.output)
    if not run.accelerator.is_main_process:
        return TrainResult(written, {}, fitted.model)
    summary = training_summary(trained, written, time.perf_counter() - started) | knowledge_summary(written)
    if run.prepared.test is not None:
        summary.update({f"test_{k}": v for k, v in score_bundle(written.path, run.prepared.test, run.prepared.labels).items()})
    return TrainResult(written, summary, fitted.model)


def start_run(cfg: TrainConfig, prepared: Prepared, *, progress: bool, log: Callable[[str], None]) -> Run:
    """The base encoder (with the hash of its weights), a fresh head, and the accelerator."""
    resolved_base = resolve_base(cfg.base)
    encoder = Encoder.load(resolved_base, max_length=cfg.max_length)
    head = IntentHead(encoder.dim, len(prepared.labels), hidden=cfg.head.hidden, dropout=cfg.head.dropout, scale=cfg.head.scale)
    log(f"training {cfg.strategy} on {len(prepared.train)} examples, {len(prepared.labels)} intents, "
        f"validating on {len(prepared.val)}")
    return Run(cfg, prepared, encoder, base_weights_sha256(resolved_base), head, Accelerator(), progress, log)


@dataclass(frozen=True)
class FirstRun:
    """What a refit keeps of the run it repeats: the choices validation made (the epochs each phase kept, the
    calibration) and the record, not the model, so that the first model can be freed before the second trains."""

    cfg: TrainConfig
    prepared: Prepared
    kept_epochs: list[int]
    progress: bool
    log: Callable[[str], None]
    history: list[dict[str, float]]
    best_epoch: int
    best_loss: float
    temperature: float
    thresholds: Thresholds
    metrics: dict[str, float]

    @classmethod
    def of(cls, trained: Trained) -> FirstRun:
        run, fitted = trained.run, trained.fitted
        return cls(run.cfg, run.prepared, list(run.kept_epochs), run.progress, run.log, fitted.history,
                   fitted.best_epoch, fitted.best_loss, trained.temperature, trained.thresholds, trained.metrics)


def refit(first: FirstRun, strategy: TrainingStrategy) -> Trained:
    """Train again from the base on train + validation, each supervised phase for the epochs the first run kept.

    Validation has done its work by then: it chose the epochs (early stopping) and fitted the temperature
    and the thresholds. The refitted model keeps that calibration, because the examples that could
    calibrate it are now its training data; it keeps the first run's validation metrics for the same
    reason. What it gains is the held-out tenth of the examples to learn from, as scikit-learn's `refit`
    and AutoGluon's `refit_full` do: on BANKING77 (LoRA, 3 seeds) that is BENCHMARKS.md's refit rows.
    The same seed drives both runs, so a refit is as reproducible as the run it repeats.
    """
    prepared = first.prepared
    merged = concatenate_datasets([prepared.train, prepared.val])
    first.log(f"refit: training again on train + validation ({len(merged)} examples) for the epochs validation chose: {first.kept_epochs}")
    set_seed(first.cfg.seed)
    # a fresh base, not the first run's encoder: lora injects its adapters into the loaded model and full trains it in place
    again = dataclasses.replace(
        start_run(first.cfg, Prepared(prepared.labels, merged, prepared.val, prepared.test), progress=first.progress, log=first.log),
        replay_epochs=list(first.kept_epochs),
    )
    inputs = strategy.inputs(again)
    fitted = strategy.fit(again, strategy.model(again), inputs)
    # the record keeps the first run's history and choice: the refit's "validation" losses are on rows it trained on
    fitted = dataclasses.replace(fitted, history=first.history, best_epoch=first.best_epoch, best_loss=first.best_loss)
    return Trained(again, fitted, strategy.serving_model(again, fitted), inputs, first.temperature, first.thresholds, first.metrics)


def calibrate(run: Run, fitted: Fitted, serving: nn.Module, inputs: Inputs) -> Trained:
    """Temperature on in-scope validation logits of the serving model, then floor and gap, with the out-of-scope
    examples of both splits.

    No strategy trains on out-of-scope examples (there is no "out of scope" class to learn: they only calibrate),
    so those in the training split are as unseen as the validation ones, and the floor is fitted on all of them.
    That is where most of them are: CLINC150 holds 100 in train and 100 in validation, and a pack without a
    validation split keeps 90% of its out-of-scope examples in train (the shop pack: 138 of 153). With 100
    alone, a floor fitted for `calibration.target_oos_recall` 0.75 landed at 73.1% ± 0.8 on CLINC150's test.
    """
    prepared = run.prepared
    val_in = inputs.length_order("val", prepared.in_scope("val"))
    y_val = prepared.y_val[val_in]
    val_logits = logits(run, serving, inputs, "val", val_in)
    temperature = fit_temperature(val_logits, y_val)
    val_probs = torch.softmax(val_logits / temperature, -1).numpy()
    oos_logits = [logits(run, serving, inputs, split, inputs.length_order(split, prepared.out_of_scope(split)))
                  for split in ("val", "train") if prepared.out_of_scope(split)]
    oos_probs = torch.softmax(torch.cat(oos_logits) / temperature, -1).numpy() if oos_logits else None
    thresholds = choose_thresholds(val_probs, y_val.numpy(), oos_probs, run.cfg.calibration)
    metrics = training_metrics(val_probs, y_val.numpy(), oos_probs, thresholds.confidence_floor)
    metrics["out_of_scope_examples"] = 0 if oos_probs is None else len(oos_probs)
    return Trained(run, fitted, serving, inputs, temperature, thresholds, metrics)


def manifest(trained: Trained, strategy: TrainingStrategy, train_seconds: float) -> ManifestBody:
    """bundle.json's body (bot/bundle.py `write` adds the format, version, creation time and file checksums)."""
    run, fitted, cfg = trained.run, trained.fitted, trained.run.cfg
    n_in_scope = len(run.prepared.in_scope("train"))
    return ManifestBody(
        base=BaseWeights(id=cfg.base, sha256=run.base_sha256),
        strategy=strategy.name,
        labels=run.prepared.labels,
        out_of_scope_label=data.OOS_LABEL,
        encoder=EncoderSettings(pooling="mean", normalize=True, max_length=cfg.max_length, precision=cfg.precision),
        head=HeadSettings(**cfg.head.model_dump()),
        lora=None,
        calibration=Calibration(temperature=trained.temperature, **trained.thresholds.as_dict()),
        metrics={"validation": {**trained.metrics, "best_epoch": fitted.best_epoch, "val_loss": fitted.best_loss}},
        training=TrainingRecord(
            config=cfg.model_dump(),
            data_fingerprint=data.fingerprint(run.prepared.train, run.prepared.val),
            n_train=n_in_scope,
            n_validation=len(run.prepared.val),
            n_train_out_of_scope=len(run.prepared.train) - n_in_scope,
            epochs_run=len(fitted.history),
            refit_epochs=list(run.kept_epochs) if cfg.refit else None,
            history=fitted.history,
            trainable_parameters=fitted.trainable_parameters,
            total_parameters=fitted.total_parameters,
            seconds=round(train_seconds, 2),
        ),
    )


def bundle_parts(trained: Trained, strategy: TrainingStrategy) -> BundleParts:
    """Every bundle has the head (and the pack's responses); then the strategy's files, then each hook's."""
    parts = BundleParts({"head.safetensors": tensors_writer(trained.run.head.state_dict())})
    responses = _pack_responses(trained.run.cfg.data)
    if responses is not None:
        parts = parts.merge(BundleParts({"responses.yaml": bundle_mod.file_copier(responses)}))
    for extra in (strategy.bundle_parts(trained), *(hook(trained) for hook in bundle_hooks())):
        parts = parts.merge(extra)
    return parts


def export_serving_graph(cfg: TrainConfig, path: Path, val_texts: list[str], log: Callable[[str], None]) -> None:
    """Add the ONNX serving graph to the written bundle (finetune/export.py); when export is off, the
    exporter is missing or the parity gate fails, the bundle stays as written and serves on PyTorch."""
    if not cfg.onnx or cfg.precision != "fp32":
        return
    from .export import ExportError, export_bundle

    try:
        export_bundle(path, texts=val_texts, log=log)
    except ExportError as exc:
        log(f"ONNX export: {exc}; the bundle serves on PyTorch")


def training_summary(trained: Trained, written: Bundle, seconds: float) -> dict[str, Any]:
    """The table `supportbot train` prints."""
    cfg, fitted, metrics, thresholds = trained.run.cfg, trained.fitted, trained.metrics, trained.thresholds
    summary: dict[str, Any] = {
        "strategy": cfg.strategy,
        "precision": cfg.precision,
        "trainable_parameters": fitted.trainable_parameters,
        "total_parameters": fitted.total_parameters,
        "epochs": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "val_accuracy": metrics["accuracy"],
        "val_macro_f1": metrics["macro_f1"],
        "confidence_floor": thresholds.confidence_floor,
        "ambiguity_gap": thresholds.ambiguity_gap,
        "temperature": trained.temperature,
        "seconds": round(seconds, 2),
        "bundle": str(written.path),
        "version": written.version,
        "backend": choose_backend(written),
    }
    refit_epochs = written.manifest.training.refit_epochs
    if refit_epochs is not None:  # the validation figures above are the first run's; the bundle is the refitted model
        summary["refit_epochs"] = ", ".join(map(str, refit_epochs))
        summary["refit_examples"] = len(trained.run.prepared.train)
    if "oos_recall" in metrics:
        summary["val_in_scope_accuracy"] = metrics["in_scope_accuracy"]
        summary["val_oos_recall"] = metrics["oos_recall"]
    return summary


def score_bundle(path: Path, test: Dataset, labels: list[str]) -> dict[str, float]:
    """Held-out scores of the written bundle, through the same inference path as serving."""
    from bot.classifier import IntentClassifier

    classifier = IntentClassifier.from_bundle(path)
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index.get(label, -1) for label in test["label"]])
    probs = classifier.probabilities(classifier.logits(list(test["text"]))).numpy()
    in_scope = y >= 0
    scores = training_metrics(probs[in_scope], y[in_scope], probs[~in_scope] if (~in_scope).any() else None, classifier.confidence_floor)
    scores["n"] = len(y)
    return scores


# ---- helpers ---------------------------------------------------------------------------------------


def _pack_responses(spec: str) -> Path | None:
    """A domain pack's responses.yaml travels in the bundle, so model and answers version together."""
    if spec.startswith("pack:"):
        from bot.domains import pack_path

        folder = pack_path(spec[5:])
    else:
        folder = Path(spec.rsplit(":", 1)[0] if not Path(spec).exists() else spec)
    candidate = folder / "responses.yaml" if folder.is_dir() else None
    return candidate if candidate is not None and candidate.is_file() else None
