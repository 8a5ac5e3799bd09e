"""The articles changed, the intents did not: `supportbot knowledge --model DIR --output NEW [--articles DIR]`.

A help centre is edited every week (a new returns window, a new article on gift cards); the intents are
not. Intercom and Dialogflow's knowledge connectors pick up an edited article without retraining the
intent model, and a team expects the same here. `supportbot train` would rebuild everything: minutes to
an hour for a `lora` or `full` bundle, and a new draw of the intent model besides (another CPU's rounding,
another floor), so an article edit would move intent answers nobody touched. This rebuilds the knowledge
base alone:

- The serving bundle's own body embeds the articles (`TorchBackend.from_bundle`: a LoRA adapter merged, the
  precision applied), so messages and passages stay in the one space, and through the one builder that
  `supportbot train` uses (finetune/knowledge_train.py `build`): passages, the question map, the known
  questions, the router, and the floor and margin fitted on `questions/validation.yaml`.
- The settings are the bundle's recipe (`training.config`), with `--set knowledge.KEY=VALUE` to change them.
  Only `knowledge.*` keys are taken: the intents are copied, so another setting would be recorded but not
  applied. The router learns against the intents' training examples, read again from the recipe's data
  (the same split by the same seed); when they differ from what the bundle was trained on (the data
  fingerprint), a line says so.
- Every other file is copied byte for byte (head, adapter, ONNX graph, responses): the intents answer as
  before, and their calibration is the same data. The new bundle has a new version id, and
  `knowledge.refreshed_from` names the version it was built from. The recipe records the articles folder
  used, so a later `retrain` builds from the same articles.
- The new bundle goes to another folder, never over the serving one (as `retrain`); it serves after
  `supportbot promote NEW` (or `--promote`) or a reload. Rebuilding a `head` bundle with the same articles
  and settings gives the same floor, margin and vectors, byte for byte (tests/test_knowledge_refresh.py); a
  `lora` bundle's, within float16 rounding (training embedded through the unmerged adapter, this through
  the merged one that serves).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import concatenate_datasets

from bot import bundle as bundle_mod
from bot.bundle import Bundle
from bot.classifier import TorchBackend, configure_threads
from bot.encoder import Encoder
from bot.knowledge import KNOWLEDGE_JSON, KNOWLEDGE_VECTORS, KnowledgeError

from . import data
from .config import ConfigError, TrainConfig, override_keys, recipe_of, with_overrides
from .knowledge_train import ADAPTER_FILE, build, knowledge_folder, serving_embedder
from .loop import prepare_data

KNOWLEDGE_FILES = (KNOWLEDGE_JSON, KNOWLEDGE_VECTORS, ADAPTER_FILE)


@dataclass
class ArticleChanges:
    """Articles by slug, against the serving bundle's: an article is changed when its passages' text is."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: int


@dataclass
class RefreshResult:
    bundle: Bundle
    changes: ArticleChanges
    summary: dict[str, Any]


def refresh(
    model: str | Path, output: str | Path, *, articles: str | Path | None = None, overrides: Sequence[str] = (),
    progress: bool = True, log: Callable[[str], None] = print,
) -> RefreshResult:
    """Build `model`'s knowledge base again from `articles` (default: the recipe's) into a new bundle at `output`."""
    serving_path, output = Path(model), Path(output)
    if output.resolve() == serving_path.resolve():
        raise ConfigError(f"--output {output} is the serving bundle: write the new one elsewhere")
    if articles is not None and not Path(articles).is_dir():
        raise ConfigError(f"--articles {articles}: no such folder")
    for key in override_keys(list(overrides)):
        if not key.startswith("knowledge."):
            raise ConfigError(f"--set {key}: only knowledge.* settings apply here (the intents are copied as they are; "
                              "`supportbot retrain` or `train` changes them)")
    configure_threads()
    serving = bundle_mod.load(serving_path)
    recipe = recipe_of(serving)
    if articles is not None:
        overrides = [*overrides, f"knowledge.articles={json.dumps(str(Path(articles).resolve()))}"]
    cfg = with_overrides(recipe, list(overrides), where=f"{serving_path} recipe")
    folder = knowledge_folder(cfg.data, cfg.knowledge.articles)
    if folder is None:
        raise KnowledgeError(f"{cfg.data}: the recipe's data has no knowledge/ folder; name the articles with --articles DIR")
    if not folder.is_dir():
        raise KnowledgeError(f"{folder}: the recipe's articles folder is not there; name it with --articles DIR")

    backend = TorchBackend.from_bundle(serving)  # the body as it serves: adapter merged, precision applied
    body = backend.encoder
    body.model.eval()
    adapter_body = None
    if cfg.knowledge.adapter.enabled and cfg.strategy == "head":  # trains on the fp32 frozen base, as in training
        fp32 = cfg.precision == "fp32"  # then the served body is that base already
        adapter_body = body.model if fp32 else Encoder.load(serving.manifest.base.id, max_length=body.max_length).model
    built = build(cfg.knowledge, folder, body, embed=serving_embedder(cfg, serving.manifest.base.sha256, progress=progress),
                  adapter_body=adapter_body, precision=cfg.precision, progress=progress, log=log,
                  messages=router_messages(cfg, serving, log) if cfg.knowledge.router.enabled else [])

    written = write_bundle(serving, output, cfg, built.writers, {**built.meta, "refreshed_from": serving.version})
    changes = article_changes(_knowledge_json(serving), _knowledge_json(written))
    summary = {
        "articles": f"{built.meta['articles']} ({len(changes.added)} added, {len(changes.removed)} removed, "
                    f"{len(changes.changed)} changed, {changes.unchanged} unchanged)",
        "passages": built.meta["passages"], "known questions": built.meta["keys"],
        "floor": _before_after(serving.meta.get("knowledge"), built.meta, "floor"),
        "margin": _before_after(serving.meta.get("knowledge"), built.meta, "margin"),
    }
    for key, value in (built.meta.get("validation") or {}).items():
        if key in ("recall_at_1", "answered_right", "answered_wrong", "unanswerable_abstained"):
            summary[f"validation {key.replace('_', ' ')}"] = value
    summary |= {"intents": "copied from the serving bundle", "built from": serving.version, "new version": written.version,
                "new bundle": str(written.path)}
    return RefreshResult(written, changes, summary)


def router_messages(cfg: TrainConfig, serving: Bundle, log: Callable[[str], None]) -> list[str]:
    """The intents' training examples, the router's negatives, as training read them (train, plus validation
    when the recipe refits on both)."""
    try:
        prepared = prepare_data(cfg)
    except (data.DataError, OSError) as exc:
        raise KnowledgeError(f"the router learns from the intents' examples, and the recipe's data {cfg.data} cannot be "
                             f"read ({exc}); point --set knowledge.router.enabled=false to build without it") from None
    # a refit trained (and fingerprinted) train + validation as its training split (finetune/train.py `refit`)
    trained_on = concatenate_datasets([prepared.train, prepared.val]) if cfg.refit else prepared.train
    if data.fingerprint(trained_on, prepared.val) != serving.manifest.training.data_fingerprint:
        log(f"note: {cfg.data} has changed since {serving.path.name} was trained: the router learns from today's "
            "examples, the intents keep what they learned (`supportbot retrain` updates both)")
    return list(trained_on["text"])


def _knowledge_json(bundle: Bundle) -> dict[str, Any] | None:
    """The bundle's knowledge.json (articles and passages), or None for a bundle without articles."""
    path = bundle.file(KNOWLEDGE_JSON)
    return json.loads(path.read_text()) if path is not None else None


def article_changes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> ArticleChanges:
    """Added, removed and changed articles (by slug, a change being any passage's text), against `before`."""
    old, new = _article_texts(before), _article_texts(after)
    both = sorted(old.keys() & new.keys())
    changed = [slug for slug in both if old[slug] != new[slug]]
    return ArticleChanges(sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys()), changed, len(both) - len(changed))


def _article_texts(meta: dict[str, Any] | None) -> dict[str, str]:
    """slug -> a digest of its title, url and passages' headings and sentences, from a knowledge.json."""
    if meta is None:
        return {}
    parts: dict[str, list[str]] = {a["slug"]: [a["title"], a["url"]] for a in meta.get("articles", [])}
    for passage in meta.get("passages", []):
        parts.setdefault(passage["article"], []).extend([passage.get("heading") or "", *passage["sentences"]])
    return {slug: hashlib.sha256("\n".join(texts).encode()).hexdigest() for slug, texts in parts.items()}


def _before_after(before: Any, after: dict[str, Any], key: str) -> str:
    old = before.get(key) if isinstance(before, dict) else None
    return f"{old:.4f} -> {after[key]:.4f}" if isinstance(old, (int, float)) else f"{after[key]:.4f}"


def write_bundle(serving: Bundle, output: Path, cfg: TrainConfig, writers: dict[str, Callable[[Path], None]],
                 knowledge: dict[str, Any]) -> Bundle:
    """A copy of `serving` at `output` with the knowledge files replaced and the recipe and `knowledge` section updated."""
    training = {**serving.meta.get("training", {}), "config": cfg.model_dump()}  # the recipe as train records it
    return bundle_mod.rewrite(serving, output, meta_update={"knowledge": knowledge, "training": training}, writers=writers,
                              drop=KNOWLEDGE_FILES)
