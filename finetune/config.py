"""Training recipes: one pydantic config object, one loader (YAML file + `--set key=value`).

A recipe is checked whole when it is loaded, before anything trains: each field's range, and the
rules across fields (the calibration's floor range must hold a point of the grid calibration
searches), so a mistake is one line now, not an error after minutes of training. `--set` values
are YAML, parsed by `bot.fileio.parse_yaml` like every YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bot import paths
from bot.bundle import Bundle, BundleError
from bot.encoder import DEFAULT_BASE
from bot.errors import SupportbotError
from bot.fileio import parse_yaml, read_yaml
from bot.precision import Precision
from bot.validation import describe_validation_errors

from . import strategies

# the confidence floors and ambiguity gaps calibration (finetune/calibrate.py) chooses from
CALIBRATION_GRID = tuple(round(step / 100, 2) for step in range(101))


class ConfigError(SupportbotError):
    """A recipe that cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeadConfig(_Strict):
    hidden: int = Field(default=0, ge=0, description="0: a linear head; >0: a bottleneck MLP of this width")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    scale: float = Field(default=10.0, gt=0, description="multiplies the unit-length embedding before the head")


class LoraConfig(_Strict):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = ["query", "key", "value", "dense"]


class ContrastiveConfig(_Strict):
    """The body phase of the `contrastive` strategy (the head phase then runs as the `head` strategy does)."""

    temperature: float = Field(default=0.1, gt=0, le=1, description="softmax temperature of the supervised contrastive loss")
    per_intent: int = Field(default=4, ge=2, description="examples of one intent that enter a batch together (its in-batch positives)")
    ce_weight: float = Field(default=0.0, ge=0, description="weight of a cross-entropy term through the head in the body phase (0: contrastive only)")


class CalibrationConfig(_Strict):
    wrong_answer_cost: float = Field(default=1.0, ge=0, description="what a wrong answer costs, in right answers, when picking thresholds")
    clarify_value: float = Field(default=0.5, ge=0, le=1, description="worth of a clarify question whose options hold the answer")
    min_floor: float = Field(default=0.0, ge=0, le=1)
    max_floor: float = Field(default=0.9, ge=0, le=1)
    max_gap: float = Field(default=0.3, ge=0, le=1)
    target_oos_recall: float | None = Field(
        default=None, gt=0, le=1,
        description="with out-of-scope validation examples: the lowest floor whose out-of-scope recall reaches this "
        "(None: the balanced point that maximises in-scope utility + out-of-scope recall)",
    )

    @model_validator(mode="after")
    def _floor_range_holds_a_grid_point(self) -> CalibrationConfig:
        """Calibration picks the floor among the grid's points from min_floor to max_floor; a range with none of
        them failed only after training (a zero-size array in finetune/calibrate.py), so the recipe is refused."""
        if self.min_floor > self.max_floor:
            raise ValueError(f"min_floor {self.min_floor:g} is above max_floor {self.max_floor:g}")
        if not any(self.min_floor <= point <= self.max_floor for point in CALIBRATION_GRID):
            raise ValueError(f"no floor of the {CALIBRATION_GRID[1]:g} grid lies from min_floor {self.min_floor:g} "
                             f"to max_floor {self.max_floor:g}")
        return self


class RetrievalAdapterConfig(_Strict):
    enabled: bool = Field(default=False, description="train a LoRA adapter that moves passage vectors towards the questions of questions/train.yaml")
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = ["query", "key", "value", "dense"]
    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=16, ge=2)
    lr: float = Field(default=5e-4, gt=0)


class QuestionMapConfig(_Strict):
    enabled: bool = Field(default=True, description="learn a linear map of question vectors towards the passages that answer them, from questions/train.yaml (skipped without that file); costs one 384 x 384 product per message, no encoder pass")
    l2: float = Field(default=0.01, ge=0, description="weight of the squared map (the map is identity + W): how far questions may move")
    steps: int = Field(default=300, ge=1, description="full-batch Adam steps")
    lr: float = Field(default=0.01, gt=0)
    eps: float = Field(default=1e-4, gt=0, description="Adam's epsilon; at torch's 1e-8, weights whose gradient is ~0 take full steps in the direction of rounding noise, and the fitted floor moved by 0.01 from one CPU to another (docs/knowledge.md)")
    scale: float = Field(default=20.0, gt=0, description="softmax temperature over article scores (cosine x scale)")


class RouterConfig(_Strict):
    enabled: bool = Field(default=True, description="learn, from questions/train.yaml against the intents' training examples, whether a message reads like a help-centre question; one that does is answered from the articles when one clears the floor, even if an intent is confident (docs/knowledge.md)")
    threshold: float = Field(default=0.5, gt=0, lt=1, description="the router's probability from which a message counts as a help-centre question")
    c: float = Field(default=1.0, gt=0, description="inverse L2 strength of the router's logistic regression")


class KnowledgeConfig(_Strict):
    articles: str | None = Field(default=None, description="folder of help-centre articles (*.md); null: the domain pack's knowledge/ when it has one")
    max_tokens: int = Field(default=64, ge=16, le=512, description="passage length limit in tokens, article title and heading included")
    wrong_answer_cost: float = Field(default=3.0, ge=0, description="what citing a wrong (or any, for an unanswerable question) article costs, in right answers, when fitting the retrieval floor")
    floor: float | None = Field(default=None, ge=-1, le=1, description="a fixed retrieval floor instead of fitting it on questions/validation.yaml")
    question_keys: bool = Field(default=True, description="questions/train.yaml's questions as extra retrieval keys of their article (through the question map, as messages): an article scores its best passage + key_weight x its best known question")
    key_weight: float = Field(default=0.5, ge=0, description="weight of an article's best known question in its score (chosen on the shop pack's validation questions, docs/knowledge.md)")
    fit_margin: bool = Field(default=True, description="also fit, on validation, the least lead over the runner-up article needed to answer (kept only when it raises the cross-validated utility)")
    sentence_weight: float = Field(default=0.5, ge=0, description="the best `rerank` articles add this x their best sentence's cosine with the (mapped) message; 0: no reranking (chosen on the shop pack's validation questions, docs/knowledge.md)")
    rerank: int = Field(default=3, ge=2, le=50, description="how many of the best articles the sentence score reranks")
    adapter: RetrievalAdapterConfig = RetrievalAdapterConfig()
    question_map: QuestionMapConfig = QuestionMapConfig()
    router: RouterConfig = RouterConfig()


class TrainConfig(_Strict):
    """Everything that decides a training run; stored in the bundle as it was used."""

    base: str = DEFAULT_BASE
    data: str = "pack:shop"
    eval_data: str | None = None
    strategy: str = Field(default="head", description="a registered training strategy (finetune/strategies.py): head, lora, full, ...")
    output: str = str(paths.DEFAULT_MODEL_DIR)  # where the CLI looks for the default model (bot.paths)
    seed: int = 42
    max_length: int = Field(default=64, ge=8, le=512)
    precision: Precision = Field(
        "fp32", description="encoder precision at inference: int8 serves about 2x faster on a CPU; "
        "the head (head strategy) and the calibration are fitted on the int8 model"
    )
    onnx: bool = Field(
        default=True, description="after training, export the ONNX serving graph behind the parity gate (finetune/export.py); "
        "without it, or when the gate fails, the bundle serves on PyTorch"
    )
    val_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    refit: bool = Field(
        default=False, description="after validation has chosen the epochs and fitted the thresholds, train once more from "
        "the base on train + validation for those epochs, and ship that model with the first run's calibration "
        "(twice the training time; the held-out examples are learned from too)"
    )
    few_shot: int | None = Field(default=None, ge=2, description="keep at most this many training examples per label")
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    head_lr: float | None = Field(default=None, gt=0, description="lora/full: learning rate of the head (default: 10x lr, 1e-2 at most)")
    weight_decay: float | None = Field(default=None, ge=0)
    patience: int | None = Field(default=None, ge=1, description="epochs without a better validation loss before stopping")
    warmup: float = Field(default=0.06, ge=0, lt=1, description="lora/full: share of steps with a linear warm-up")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    ema: float | None = Field(
        default=None, gt=0, lt=1, description="decay of an exponential moving average of the trainable weights, updated "
        "every step of each supervised phase; validation judges the average and the bundle keeps it (Polyak averaging); "
        "e.g. 0.997"
    )
    probe_head: bool = Field(
        default=False, description="lora/full: first fit the head alone on the frozen base's vectors, as `head` trains it, "
        "then train body and head together from there (linear probing, then fine-tuning: LP-FT)"
    )
    embed_batch_size: int = Field(default=64, ge=1)
    cache_dir: str | None = Field(default=None, description="embedding cache (head); default $SUPPORTBOT_DATA_DIR/cache")
    head: HeadConfig = HeadConfig()
    lora: LoraConfig = LoraConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    knowledge: KnowledgeConfig = KnowledgeConfig()

    @field_validator("strategy")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in strategies.names():
            raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(strategies.names())}")
        return name

    def resolved(self) -> TrainConfig:
        """A copy with the strategy's defaults filled into the unset fields."""
        strategy = strategies.training_strategy(self.strategy)
        out = self.model_copy(update={k: v for k, v in strategy.defaults.items() if getattr(self, k) is None})
        if out.head_lr is None:
            out = out.model_copy(update={"head_lr": strategy.head_lr(out)})
        return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe (or the defaults) and apply `key=value` overrides (dotted keys, YAML values)."""
    raw: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, error=ConfigError)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        raw = _relative_paths(loaded or {}, Path(path).parent)
    return _validated(_overridden(raw, overrides), path or "config")


def with_overrides(cfg: TrainConfig, overrides: list[str], *, where: str = "recipe") -> TrainConfig:
    """`cfg` with `key=value` overrides applied, as `load_config` applies them to a file."""
    return _validated(_overridden(cfg.model_dump(mode="json"), overrides), where)


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys of `key=value` overrides (a malformed one raises ConfigError)."""
    return [_split_override(item)[0] for item in overrides]


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value")
    return key.strip(), value


def _overridden(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        key, value = _split_override(item)
        parsed = parse_yaml(value, where=f"--set {key}", error=ConfigError) if value.strip() else None
        _assign(raw, key.split("."), parsed)
    return raw


def _validated(raw: dict[str, Any], where: str | Path) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_errors(exc)}") from None


def _assign(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {key} is not a section")
    tree[keys[-1]] = value


def _relative_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Data paths in a recipe are relative to the project root when they exist from there, else to the recipe."""
    for key in ("data", "eval_data"):
        value = raw.get(key)
        if isinstance(value, str) and not value.startswith(("hf:", "pack:")):
            plain = value.rsplit(":", 1)[0] if ":" in value else value
            if not Path(plain).exists() and (folder / plain).exists():
                raw[key] = str(folder / value)
    return raw


def recipe_of(bundle: Bundle) -> TrainConfig:
    """The training recipe stored in a bundle, which cross-validation, `retrain` and `knowledge` build from."""
    raw = bundle.manifest.training.config
    if raw is None:
        raise BundleError(f"bundle {bundle.path} has no training recipe (training.config) to build from")
    try:
        return TrainConfig.model_validate(raw)
    except ValueError as exc:
        raise BundleError(f"bundle {bundle.path}: its training recipe is not valid here ({str(exc).splitlines()[0]})") from None
