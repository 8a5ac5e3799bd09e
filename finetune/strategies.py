"""Training strategies as a registry: one class per way of training, registered by name (like peft's methods).

A strategy answers, for one run (finetune/loop.py `Run`):
- `defaults`: its values for the recipe fields left unset (epochs, batch size, learning rate, ...);
- `inputs`: what its model reads (cached sentence vectors, or token ids) -> `Inputs`;
- `model`: what trains (the head alone, or encoder body + head);
- `param_groups` and `schedule`: the optimiser's groups and learning-rate schedule;
- `fit`: the training itself (default: the shared supervised loop, `fit_supervised`);
- `serving_model`: the model as `IntentClassifier` will run it (calibration is fitted on it);
- `bundle_parts`: the files (and manifest sections) it adds to the bundle;
- `serving`: its load half, a `bot.strategies.ServingStrategy`, which puts those files back onto
  the base when a bundle is opened. bot/ cannot import finetune/ (serve -> bot <- finetune), so
  that half lives in bot/strategies.py and `register` registers both halves.

finetune/train.py never asks which strategy it runs: it calls these methods in order. A new
strategy is one subclass here (or in its own module) decorated with `@register`, plus its
serving half; `--strategy NAME` and `strategy: NAME` in a recipe then pick it.

After the serving model is built, every function registered with `register_bundle_hook` may add
files to the bundle (an ONNX export of the serving model, for instance): hooks see the same
`Trained` the strategy's `bundle_parts` sees.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from bot import strategies as serving_registry
from bot.encoder import Encoder
from bot.heads import IntentHead
from bot.precision import apply_precision
from bot.strategies import ContrastiveServing, FullServing, HeadServing, LoraServing, ServingStrategy, lora_config

from .cache import EmbeddingCache, default_cache_dir
from .loop import Fitted, Inputs, Run, constant, fit_supervised, warmup_then_decay

if TYPE_CHECKING:
    from .calibrate import Thresholds
    from .config import TrainConfig

Writer = Callable[[Path], None]  # writes one bundle file at the path it is given


@dataclass
class BundleParts:
    """What a strategy or a bundle hook adds to a bundle: files (name -> writer) and manifest sections."""

    files: dict[str, Writer] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: BundleParts) -> BundleParts:
        clash = (set(self.files) & set(other.files)) | (set(self.meta) & set(other.meta))
        if clash:
            raise ValueError(f"two writers for the same bundle entries: {', '.join(sorted(clash))}")
        return BundleParts({**self.files, **other.files}, {**self.meta, **other.meta})


@dataclass
class Trained:
    """A finished run: what bundle parts and hooks are built from."""

    run: Run
    fitted: Fitted
    serving_model: nn.Module  # what IntentClassifier will run: batch -> logits
    inputs: Inputs  # how serving_model is fed (vectors for `head`, token ids otherwise)
    temperature: float
    thresholds: Thresholds
    metrics: dict[str, float]  # validation metrics of serving_model at the fitted thresholds


class TrainingStrategy:
    """The training half of a strategy. Subclasses set `name`, `serving`, `defaults` and implement
    `inputs` and `model`; the other methods have the defaults most strategies want."""

    name: ClassVar[str] = ""
    serving: ClassVar[type[ServingStrategy]] = HeadServing
    defaults: ClassVar[dict[str, Any]] = {}  # epochs, batch_size, lr, weight_decay, patience
    description: ClassVar[str] = ""

    def head_lr(self, cfg: TrainConfig) -> float:
        """Learning rate of the head when the recipe leaves it unset: 10x the body's, 1e-2 at most."""
        assert cfg.lr is not None
        return min(cfg.lr * 10, 1e-2)

    def inputs(self, run: Run) -> Inputs:
        raise NotImplementedError

    def model(self, run: Run) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, run: Run, model: nn.Module) -> list[dict[str, Any]]:
        """The head at `head_lr`; every other trainable parameter at `lr`."""
        head_ids = {id(p) for p in run.head.parameters()}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups: list[dict[str, Any]] = [{"params": list(run.head.parameters()), "lr": run.cfg.head_lr}]
        if body:
            groups.append({"params": body, "lr": run.cfg.lr})
        return groups

    def schedule(self, run: Run, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
        return warmup_then_decay(optimizer, run.cfg, steps_per_epoch)

    def fit(self, run: Run, model: nn.Module, inputs: Inputs) -> Fitted:
        return fit_supervised(self, run, model, inputs)

    def serving_model(self, run: Run, fitted: Fitted) -> nn.Module:
        """The trained model as `IntentClassifier` will run it, fed the same inputs (default: as trained)."""
        return fitted.model

    def bundle_parts(self, trained: Trained) -> BundleParts:
        """Files beyond head.safetensors (and the pack's responses.yaml) that this strategy's bundles carry."""
        return BundleParts()


T = TypeVar("T", bound=type[TrainingStrategy])

_REGISTRY: dict[str, type[TrainingStrategy]] = {}
_BUNDLE_HOOKS: list[Callable[[Trained], BundleParts]] = []


def register(cls: T) -> T:
    """Class decorator: make `cls` trainable as `strategy: cls.name`, and its `serving` half loadable."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a training strategy needs a name")
    if cls.serving.name != cls.name:
        raise ValueError(f"{cls.__qualname__}: its serving half is named {cls.serving.name!r}, not {cls.name!r}")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and taken is not cls and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"training strategy {cls.name!r} is already registered ({taken.__qualname__})")
    serving_registry.register(cls.serving)
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget the strategy `name` (both halves): for a strategy registered for a while, as tests do."""
    _REGISTRY.pop(name, None)
    serving_registry.unregister(name)


def training_strategy(name: str) -> TrainingStrategy:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise KeyError(name)
    return cls()


def names() -> list[str]:
    """Registered strategy names, in registration order."""
    return list(_REGISTRY)


def register_bundle_hook(hook: Callable[[Trained], BundleParts]) -> Callable[[Trained], BundleParts]:
    """Run `hook` on every finished run, after the serving model is built; its parts join the bundle."""
    if hook not in _BUNDLE_HOOKS:
        _BUNDLE_HOOKS.append(hook)
    return hook


def unregister_bundle_hook(hook: Callable[[Trained], BundleParts]) -> None:
    if hook in _BUNDLE_HOOKS:
        _BUNDLE_HOOKS.remove(hook)


def bundle_hooks() -> list[Callable[[Trained], BundleParts]]:
    return list(_BUNDLE_HOOKS)


def tensors_writer(state: dict[str, torch.Tensor]) -> Writer:
    """A writer of `state` as safetensors (detached, contiguous, on the CPU at the time of the call)."""
    frozen = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return lambda path: save_file(frozen, str(path))


class EncoderClassifier(nn.Module):
    """Encoder body (frozen + LoRA, or unfrozen) -> mean pooling -> head."""

    def __init__(self, encoder: Encoder, body: nn.Module, head: IntentHead):
        super().__init__()
        self.encoder = encoder
        self.body = body
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder.forward(self.body, batch))
        return out


def body_of(model: nn.Module) -> nn.Module:
    """The encoder body of a trained `EncoderClassifier`."""
    if not isinstance(model, EncoderClassifier):
        raise TypeError(f"expected an EncoderClassifier, got {type(model).__name__}")
    return model.body


def token_inputs(run: Run) -> Inputs:
    """Token ids of both splits, tokenised once; batches padded per call and grouped by length."""
    features = {
        "train": run.encoder.tokenize(run.prepared.train["text"], pad=False),
        "val": run.encoder.tokenize(run.prepared.val["text"], pad=False),
    }
    lengths = {split: [len(ids) for ids in f["input_ids"]] for split, f in features.items()}
    return Inputs(lambda split, indices: run.encoder.pad(features[split], indices), lengths, eval_rows=64)


# ---- the built-in strategies ---------------------------------------------------------------------


@register
class Head(TrainingStrategy):
    """The base stays frozen: texts are embedded once (cached on disk) and only the head trains."""

    name = "head"
    serving = HeadServing
    defaults: ClassVar[dict[str, Any]] = {"epochs": 300, "batch_size": 256, "lr": 3e-3, "weight_decay": 1e-3, "patience": 20}
    description = "the head only, on cached embeddings of the frozen base"

    def head_lr(self, cfg: TrainConfig) -> float:
        assert cfg.lr is not None
        return cfg.lr  # the head is all that trains

    def inputs(self, run: Run) -> Inputs:
        """Sentence vectors of the serving-precision base (so an int8 head trains on int8 embeddings)."""
        cfg, prepared = run.cfg, run.prepared
        cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), run.base_sha256, cfg.max_length, cfg.precision)
        texts = list(prepared.train["text"]) + list(prepared.val["text"])
        serving_encoder = Encoder(apply_precision(run.encoder.model, cfg.precision), run.encoder.tokenizer, cfg.max_length)
        vectors, computed = cache.embed(serving_encoder, texts, batch_size=cfg.embed_batch_size, progress=run.progress)
        cache.close()
        run.log(f"embeddings: {computed} computed, {len(texts) - computed} from the cache ({cache.path})")
        split = {"train": vectors[: len(prepared.train)], "val": vectors[len(prepared.train) :]}
        return Inputs(lambda name, indices: split[name][indices], None, eval_rows=256)  # vectors are cheap

    def model(self, run: Run) -> nn.Module:
        return run.head

    def schedule(self, run: Run, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
        return constant(optimizer)  # early stopping decides the length


class EncoderStrategy(TrainingStrategy):
    """Strategies that train (part of) the encoder body with the head, on token ids."""

    def inputs(self, run: Run) -> Inputs:
        return token_inputs(run)

    def model(self, run: Run) -> nn.Module:
        body = self.body(run)
        body.train()
        return EncoderClassifier(run.encoder, body, run.head)

    def body(self, run: Run) -> nn.Module:
        raise NotImplementedError

    def fit(self, run: Run, model: nn.Module, inputs: Inputs) -> Fitted:
        if run.cfg.probe_head:
            probe_head(run, body_of(model))
        return fit_supervised(self, run, model, inputs)

    def merged_body(self, model: nn.Module) -> nn.Module:
        """The trained body as plain encoder modules (what `apply_precision` converts)."""
        return body_of(model)

    def serving_model(self, run: Run, fitted: Fitted) -> nn.Module:
        """At int8: a copy of the trained body (adapters merged) with int8 linear layers (apply_precision copies).
        The head strategy needs none of this: it already trained on int8 embeddings."""
        if run.cfg.precision == "fp32":
            return fitted.model
        body = apply_precision(self.merged_body(fitted.model), run.cfg.precision)
        return EncoderClassifier(run.encoder, body, run.head)


def probe_head(run: Run, body: nn.Module) -> None:
    """LP-FT's first phase (Kumar et al., 2022): fit `run.head` alone on the frozen base's sentence vectors,
    exactly as the `head` strategy trains it (its defaults, its embedding cache), so that joint training
    starts from a head that already separates the intents instead of a random one, which would pull
    the adapters towards its own noise in the first steps.

    `body` is the model that will train; it is put in eval mode while the vectors are taken (no
    dropout: the cache holds the base's deterministic vectors) and its LoRA layers, still at their
    zero initialisation, leave those vectors unchanged. The vectors are float32 whatever the recipe's
    `precision`: the joint phase trains the body in float32 (int8 is applied to the serving copy after
    it), so that is what the probed head must fit.
    """
    head_cfg = run.cfg.model_copy(update={**Head.defaults, "head_lr": Head.defaults["lr"], "precision": "fp32"})
    head_run = dataclasses.replace(run, cfg=head_cfg)
    body.eval()
    vectors = Head().inputs(head_run)
    body.train()
    probed = fit_supervised(Head(), head_run, run.head, vectors)
    run.log(f"head probed on the frozen base: best epoch {probed.best_epoch}, validation loss {probed.best_loss:.3f}")


@register
class Lora(EncoderStrategy):
    """peft LoRA adapters on the frozen base, trained jointly with the head."""

    name = "lora"
    serving = LoraServing
    defaults: ClassVar[dict[str, Any]] = {"epochs": 6, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "patience": 2}
    description = "LoRA adapters on the frozen base, plus the head"

    def body(self, run: Run) -> nn.Module:
        from peft import get_peft_model

        peft_body: nn.Module = get_peft_model(run.encoder.model, lora_config(run.cfg.lora.model_dump()))
        return peft_body

    def merged_body(self, model: nn.Module) -> nn.Module:
        peft_body: Any = copy.deepcopy(body_of(model))  # a copy: the trained adapters stay
        merged: nn.Module = peft_body.merge_and_unload()
        return merged

    def bundle_parts(self, trained: Trained) -> BundleParts:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(body_of(trained.fitted.model))
        return BundleParts({"adapter.safetensors": tensors_writer(adapter)}, {"lora": trained.run.cfg.lora.model_dump()})


@register
class Full(EncoderStrategy):
    """Every encoder weight trains: the baseline the other two are measured against."""

    name = "full"
    serving = FullServing
    defaults: ClassVar[dict[str, Any]] = {"epochs": 4, "batch_size": 32, "lr": 5e-5, "weight_decay": 0.01, "patience": 2}
    description = "every encoder weight, plus the head"

    def body(self, run: Run) -> nn.Module:
        return run.encoder.model.requires_grad_(True)

    def bundle_parts(self, trained: Trained) -> BundleParts:
        return BundleParts({"encoder.safetensors": tensors_writer(body_of(trained.fitted.model).state_dict())})


@register
class Contrastive(Lora):
    """Few-shot: LoRA adapters trained with a supervised contrastive loss on in-batch positives of the same
    intent (finetune/contrastive.py), then a head on the adapted body's vectors, as `head` trains one.

    The recipe's epochs, batch_size, lr, weight_decay and warmup are the body phase's; head_lr and
    patience are the head phase's (which otherwise runs with the `head` strategy's settings).
    """

    name = "contrastive"
    serving = ContrastiveServing
    defaults: ClassVar[dict[str, Any]] = {"epochs": 4, "batch_size": 64, "lr": 2e-4, "weight_decay": 0.01, "patience": 20}
    description = "few-shot: LoRA adapters trained contrastively on same-intent examples, then the head"

    def head_lr(self, cfg: TrainConfig) -> float:
        return float(Head.defaults["lr"])

    def fit(self, run: Run, model: nn.Module, inputs: Inputs) -> Fitted:
        from .contrastive import embed_splits, train_body

        body = body_of(model)
        history = train_body(run, body, inputs)
        vectors = embed_splits(run, body, inputs)
        run.log(f"contrastive body: {len(history)} epochs, loss {history[0]['contrastive_loss']:.3f} -> "
                f"{history[-1]['contrastive_loss']:.3f}; fitting the head on its vectors")
        head_cfg = run.cfg.model_copy(update={**Head.defaults, "lr": run.cfg.head_lr, "patience": run.cfg.patience})
        head_run = dataclasses.replace(run, cfg=head_cfg)
        vector_inputs = Inputs(lambda split, indices: vectors[split][indices], None, eval_rows=256)
        head_fit = fit_supervised(Head(), head_run, run.head, vector_inputs)
        classifier = EncoderClassifier(run.encoder, body, run.head)
        return Fitted(
            classifier,
            history + head_fit.history,
            head_fit.best_epoch,
            head_fit.best_loss,
            sum(p.numel() for p in classifier.parameters() if p.requires_grad),
            sum(p.numel() for p in classifier.parameters()),
        )
