"""The supervised training loop every built-in strategy shares, and the state of one run.

A strategy (finetune/strategies.py) decides what trains and what it reads; this module owns how:
shuffled (or length-grouped) batches, cross-entropy on in-scope examples, AdamW with the
strategy's parameter groups and schedule, early stopping on validation loss (with the recipe's
label smoothing, as trained) with the best epoch's trainable weights restored; in a refit, each
phase trains the epochs the first run kept and keeps its last. With `ema`, the weights judged and
kept are a moving average of the steps' weights (`WeightAverage`), not the last step's. It runs on
`accelerate`, so the same code runs on one CPU, one GPU, or under `accelerate launch`.

`Run` is what a strategy may read while it trains (recipe, data, base encoder, head); `Inputs`
is what it hands back (how to batch each split); `Fitted` is what the loop returns. A strategy
that trains differently (e.g. a contrastive phase first) overrides `TrainingStrategy.fit` and
may still call `fit_supervised` for its classification phase.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from bot.encoder import Encoder, length_sorted_batches
from bot.heads import IntentHead

from . import data

if TYPE_CHECKING:
    from .config import TrainConfig
    from .strategies import TrainingStrategy

Batch = Any  # a tensor of vectors, or a dict of token tensors
T = TypeVar("T")


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

    def in_scope(self, split: str) -> list[int]:
        y = self.y_train if split == "train" else self.y_val
        return (y >= 0).nonzero().flatten().tolist()

    def out_of_scope(self, split: str) -> list[int]:
        y = self.y_train if split == "train" else self.y_val
        return (y < 0).nonzero().flatten().tolist()


@dataclass
class Run:
    """One training run as a strategy sees it: the resolved recipe, the data, the base and a fresh head."""

    cfg: TrainConfig
    prepared: Prepared
    encoder: Encoder  # the base as loaded (fp32); strategies derive their bodies from it
    base_sha256: str
    head: IntentHead
    accelerator: Accelerator
    progress: bool = True
    log: Callable[[str], None] = print
    # the epoch each supervised phase kept, in the order the phases ran (a refit replays them)
    kept_epochs: list[int] = field(default_factory=list)
    # a refit (finetune/train.py `refit`): each supervised phase trains exactly this many epochs, in order,
    # and keeps its last one; validation has already chosen them, and its examples are now training data
    replay_epochs: list[int] | None = None


@dataclass
class Inputs:
    """How a strategy's model is fed: `batch(split, indices)` builds one batch of "train" or "val".

    `lengths` holds each split's token counts when inputs are token ids, so training batches
    group similar lengths and evaluation runs in length order (less padding); None for vectors.
    `eval_rows` is how many rows one evaluation forward pass takes.
    """

    batch: Callable[[str, list[int]], Batch]
    lengths: Mapping[str, list[int]] | None = None
    eval_rows: int = 64

    def length_order(self, split: str, indices: list[int]) -> list[int]:
        """`indices` in ascending token length (unchanged for vectors): the order calibration reads them in."""
        if self.lengths is None:
            return indices
        lengths = self.lengths[split]
        return sorted(indices, key=lambda i: lengths[i])


@dataclass
class Fitted:
    """What fitting returns: the trained model (unwrapped, best epoch restored) and its history."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    best_loss: float
    trainable_parameters: int
    total_parameters: int


def logits(run: Run, net: nn.Module, inputs: Inputs, split: str, indices: list[int]) -> torch.Tensor:
    """Eval-mode logits of `net` for `indices` of `split`, rows in the order of `indices`."""
    was_training = net.training
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(indices), inputs.eval_rows):
            chunk = indices[start : start + inputs.eval_rows]
            out.append(net(to_device(inputs.batch(split, chunk), run.accelerator.device)).float().cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(run.prepared.labels))


def fit_supervised(strategy: TrainingStrategy, run: Run, model: nn.Module, inputs: Inputs) -> Fitted:
    """Cross-entropy on the in-scope training examples; early stopping on in-scope validation loss."""
    cfg, prepared, accelerator = run.cfg, run.prepared, run.accelerator
    epochs, batch_size, patience = resolved(cfg.epochs), resolved(cfg.batch_size), resolved(cfg.patience)
    replayed = None
    if run.replay_epochs is not None:  # a refit: this phase trains for exactly the epochs the first run's kept
        if not run.replay_epochs:  # a refit runs the phases of the run it repeats: one more is a strategy bug
            raise RuntimeError(f"refit: {cfg.strategy} ran more supervised phases than the run it repeats "
                               f"(which kept {run.kept_epochs})")
        replayed = epochs = run.replay_epochs.pop(0)  # the schedule still spans the recipe's epochs: the refit stops where the first run's choice did
    in_scope = prepared.in_scope("train")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(strategy.param_groups(run, model), weight_decay=resolved(cfg.weight_decay))
    scheduler = strategy.schedule(run, optimizer, steps_per_epoch=math.ceil(len(in_scope) / batch_size))
    model, optimizer = accelerator.prepare(model, optimizer)
    average = WeightAverage(model, cfg.ema) if cfg.ema is not None else None
    rng = random.Random(cfg.seed)
    val_in = inputs.length_order("val", prepared.in_scope("val"))
    y_val = prepared.y_val[val_in]
    train_lengths = inputs.lengths["train"] if inputs.lengths is not None else None
    best: dict[str, Any] = {"loss": math.inf, "epoch": 0, "state": None}
    history: list[dict[str, float]] = []
    epochs_bar = tqdm(range(1, epochs + 1), desc=f"train {cfg.strategy}", unit="epoch", disable=None if run.progress else True)
    for epoch in epochs_bar:
        model.train()
        # every process draws the same shuffled batches (same seed) and takes its share of them
        batches = epoch_batches(in_scope, train_lengths, batch_size, rng)
        batches = batches[accelerator.process_index :: accelerator.num_processes]
        steps = tqdm(batches, desc=f"epoch {epoch}", unit="step", leave=False,
                     disable=None if run.progress and train_lengths is not None else True)
        running = 0.0
        for indices in steps:
            batch = to_device(inputs.batch("train", indices), accelerator.device)
            loss = F.cross_entropy(model(batch), prepared.y_train[indices].to(accelerator.device), label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update()
            running += loss.item() * len(indices)
            steps.set_postfix(loss=f"{loss.item():.3f}")
        if replayed is not None:  # validation has chosen already, and its rows are training data now: nothing to judge
            history.append({"epoch": epoch, "train_loss": running / max(len(in_scope), 1)})
            epochs_bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}")
            with averaged(average):  # the last epoch as it stands (the model itself unless averaging)
                best = {"loss": math.nan, "epoch": epoch, "state": None if average is None else trainable_state(model)}
            continue
        with averaged(average):  # validation judges what the bundle would hold, and keeps it when it is the best yet
            val_logits = logits(run, model, inputs, "val", val_in)
            # measured as trained: unsmoothed loss penalises the lower confidence that smoothing asks for,
            # so it could stop a smoothed run early or keep an earlier epoch than the one the schedule ends on
            val_loss = F.cross_entropy(val_logits, y_val, label_smoothing=cfg.label_smoothing).item() if len(val_in) else 0.0
            improved = val_loss < best["loss"] - 1e-5
            if improved:
                best = {"loss": val_loss, "epoch": epoch, "state": trainable_state(model)}
        val_acc = (val_logits.argmax(-1) == y_val).float().mean().item() if len(val_in) else 0.0
        history.append({"epoch": epoch, "train_loss": running / max(len(in_scope), 1), "val_loss": val_loss, "val_accuracy": val_acc})
        epochs_bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}")
        if not improved and epoch - best["epoch"] >= patience:
            break
    epochs_bar.close()
    if best["state"] is not None:
        accelerator.unwrap_model(model).load_state_dict(best["state"], strict=False)
    run.kept_epochs.append(best["epoch"])
    return Fitted(accelerator.unwrap_model(model), history, best["epoch"], best["loss"], trainable, total)


class WeightAverage:
    """An exponential moving average of a model's trainable weights, updated after every optimizer step
    (Polyak averaging, as timm's ModelEmaV2 keeps one): the average of the last 1 / (1 - decay) steps or
    so sits nearer the middle of the loss basin than the last step does. It starts from zero and is
    divided by 1 - decay^t (Adam's bias correction), so at step t it is a proper weighted mean of the
    steps taken, with no pull towards the initial weights and no warm-up that shortens its reach."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sums = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        for total, param in zip(self.sums, self.params, strict=True):
            total.mul_(self.decay).add_(param.detach(), alpha=1.0 - self.decay)

    def averages(self) -> list[torch.Tensor]:
        if not self.steps:
            return [p.detach().clone() for p in self.params]
        correction = 1.0 - self.decay**self.steps
        return [total / correction for total in self.sums]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block and its own weights again after it."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, average in zip(self.params, self.averages(), strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, weights in zip(self.params, own, strict=True):
                    param.copy_(weights)


def averaged(average: WeightAverage | None) -> contextlib.AbstractContextManager[None]:
    return average.swapped_in() if average is not None else contextlib.nullcontext()


def warmup_then_decay(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """Linear warm-up over `cfg.warmup` of the steps, then linear decay to zero."""
    total = max(1, steps_per_epoch * resolved(cfg.epochs))
    warm = max(1, int(total * cfg.warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))
    )


def constant(optimizer: torch.optim.Optimizer) -> Any:
    """A constant learning rate (early stopping decides the length)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def resolved(value: T | None) -> T:
    """A recipe field the strategy's defaults fill in (`TrainConfig.resolved()`), as its set value."""
    if value is None:
        raise ValueError("the recipe is not resolved: call TrainConfig.resolved() before training")
    return value


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, dict) or hasattr(batch, "items"):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def epoch_batches(indices: list[int], lengths: list[int] | None, batch_size: int, rng: random.Random) -> list[list[int]]:
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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


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
    if test_ds is not None:  # scored after training: labels it cannot predict would make its test figures meaningless
        data.check_labels(test_ds, labels, model=f"trained on {cfg.data}", name=cfg.eval_data or "the test data")
    return Prepared(labels, train_ds, val_ds, test_ds)
