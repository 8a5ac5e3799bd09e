"""The load half of each training strategy: how a bundle's weights go onto the base encoder.

A strategy (head, lora, full, ...) has two halves, kept on the two sides of the import rule
`serve -> bot <- finetune`: the training half in finetune/strategies.py (what trains, how, what
it writes) and this half, which bot/classifier.py runs when it opens a bundle. bot must never
import finetune, so the serving half cannot live next to the training half; instead each
training strategy names its `ServingStrategy` class, and registering the training half
registers this half too (finetune/strategies.py `register`). Adding a strategy is one class
here (or beside the training class, for one outside this package) and one class there.

The registry is keyed by the name written into bundle.json's `strategy` field, the way peft maps
a method name to its classes. A bundle naming a strategy nobody registered is refused with a
`BundleError` that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from safetensors.torch import load_file

from .bundle import Bundle, BundleError
from .encoder import Encoder


class ServingStrategy:
    """How a bundle of this strategy changes the base encoder before it serves (default: not at all).

    The head (head.safetensors) and the calibration are the same for every strategy and are
    loaded by `IntentClassifier.from_bundle`; a strategy only adds what it trained in the body.
    """

    name: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()  # the weight files its bundles carry besides head.safetensors

    def attach(self, bundle: Bundle, encoder: Encoder) -> None:
        """Put the bundle's body weights onto `encoder.model` (replace it or load into it)."""


S = TypeVar("S", bound=type[ServingStrategy])

_REGISTRY: dict[str, type[ServingStrategy]] = {}


def register(cls: S) -> S:
    """Class decorator: serve bundles whose `strategy` is `cls.name` with `cls`.

    Registering the same class twice is harmless (a test module imported twice); another
    class under a taken name is a programming error.
    """
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a serving strategy needs a name")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and taken is not cls and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"serving strategy {cls.name!r} is already registered ({taken.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget the strategy `name` (a strategy registered for a while, as tests do)."""
    _REGISTRY.pop(name, None)


def serving_strategy(bundle: Bundle) -> ServingStrategy:
    """The serving half named by `bundle`'s strategy field."""
    cls = _REGISTRY.get(bundle.strategy)
    if cls is None:
        raise BundleError(
            f"bundle {bundle.path}: unknown strategy {bundle.strategy!r} (this supportbot knows {', '.join(names())})"
        )
    return cls()


def names() -> list[str]:
    """Registered strategy names, in registration order (head, lora, full first)."""
    return list(_REGISTRY)


def lora_config(settings: Mapping[str, Any]) -> Any:
    """The peft LoraConfig for `settings` (r, alpha, dropout, target_modules); training and loading share it."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(settings["r"]),
        lora_alpha=int(settings["alpha"]),
        lora_dropout=float(settings["dropout"]),
        target_modules=list(settings["target_modules"]),
        bias="none",
    )


@register
class HeadServing(ServingStrategy):
    """`head`: the base is served as it is; everything trained is in head.safetensors."""

    name = "head"


@register
class LoraServing(ServingStrategy):
    """`lora`: a peft adapter (adapter.safetensors), merged into the base so inference costs nothing extra."""

    name = "lora"
    files = ("adapter.safetensors",)

    def attach(self, bundle: Bundle, encoder: Encoder) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        settings = bundle.manifest.lora
        if settings is None:
            raise BundleError(f"bundle {bundle.path}: a lora bundle needs its lora settings in bundle.json")
        peft_model = get_peft_model(encoder.model, lora_config(settings))
        set_peft_model_state_dict(peft_model, load_file(str(bundle.path / "adapter.safetensors")))
        encoder.model = peft_model.merge_and_unload().eval()


@register
class FullServing(ServingStrategy):
    """`full`: every encoder weight was trained; encoder.safetensors replaces the base's weights."""

    name = "full"
    files = ("encoder.safetensors",)

    def attach(self, bundle: Bundle, encoder: Encoder) -> None:
        state = load_file(str(bundle.path / "encoder.safetensors"))
        missing, unexpected = encoder.model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "position_ids" not in m]:
            raise BundleError(f"bundle {bundle.path}: encoder.safetensors does not fit the base ({missing or unexpected})")


@register
class ContrastiveServing(LoraServing):
    """`contrastive`: trained as LoRA adapters too (a contrastive phase, then the head), so it loads as `lora` does."""

    name = "contrastive"
