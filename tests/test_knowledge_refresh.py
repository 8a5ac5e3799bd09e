"""`supportbot knowledge`: a bundle's help centre rebuilt from edited articles with the bundle's own body and
recipe, into a new bundle whose intents are the serving bundle's files, byte for byte (real encoder, real
bundles trained on the shop pack's intents with the small test help centre)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import KNOWLEDGE_ARTICLES, train_bundle

from bot import bundle as bundle_mod
from bot.chatbot import Chatbot, load_domain
from bot.classifier import IntentClassifier
from bot.knowledge import KNOWLEDGE_VECTORS, KnowledgeBase
from bot.policy import Action
from bot.sessions import SQLiteSessionStore
from finetune.config import ConfigError
from finetune.knowledge_refresh import refresh
from serve.fleet import FLEET_FILE, FleetStore
from supportbot.cli import main

COLLECT = """---
title: Click and collect
url: https://help.example.test/articles/click-and-collect
---
## Collecting an order in a store

Choose click and collect at checkout and pick your order up free of charge at any of our stores. We send a text
message when your parcel is ready, usually after two working days. Bring the text and a photo ID to the till.
"""
NEW_DRYER_RULE = "Wool may go in the tumble dryer only on the wool cycle, at the lowest heat, in a mesh bag."


@pytest.fixture
def edited_help_centre(tmp_path):
    """The test help centre with one article added (and questions about it) and one sentence of another changed."""
    folder = tmp_path / "help-centre"
    shutil.copytree(KNOWLEDGE_ARTICLES, folder)
    (folder / "click-and-collect.md").write_text(COLLECT)
    wool = folder / "wool-care.md"
    wool.write_text(wool.read_text().replace("Never put wool in the tumble dryer, because the heat shrinks it.", NEW_DRYER_RULE))
    for split, texts in {"train": ["can I collect my order from a shop", "is click and collect free",
                                   "how will I know my parcel is ready to pick up"],
                         "validation": ["can I pick my order up in store", "what do I bring to collect my parcel"]}.items():
        path = folder / "questions" / f"{split}.yaml"
        questions = yaml.safe_load(path.read_text())
        questions["questions"] += [{"text": text, "article": "click-and-collect"} for text in texts]
        path.write_text(yaml.safe_dump(questions, sort_keys=False))
    return folder


def sha(bundle_path, name: str) -> str:
    return bundle_mod.load(bundle_path).manifest.files[name]


def test_the_same_articles_rebuild_the_same_knowledge_and_the_intents_are_copied(knowledge_bundle, tmp_path):
    before = bundle_mod.load(knowledge_bundle)
    result = refresh(knowledge_bundle, tmp_path / "refreshed", progress=False, log=lambda _msg: None)
    after = result.bundle
    assert (result.changes.added, result.changes.removed, result.changes.changed) == ([], [], [])
    assert result.changes.unchanged == 3
    for name in before.manifest.files:  # every intent file byte for byte, and the same passage vectors
        if name != "knowledge.json":
            assert after.manifest.files[name] == before.manifest.files[name], name
    assert sha(after.path, KNOWLEDGE_VECTORS) == sha(knowledge_bundle, KNOWLEDGE_VECTORS)
    old, new = before.meta["knowledge"], after.meta["knowledge"]
    assert (new["floor"], new["margin"], new["passages"]) == (old["floor"], old["margin"], old["passages"])
    assert new["refreshed_from"] == before.version
    assert after.manifest.training.config == before.manifest.training.config  # no setting changed
    assert bundle_mod.load(knowledge_bundle).version == before.version  # the serving bundle is untouched


def test_an_added_article_is_cited_and_an_edited_one_is_quoted_as_edited(knowledge_bundle, edited_help_centre, tmp_path):
    result = refresh(knowledge_bundle, tmp_path / "refreshed", articles=edited_help_centre, progress=False,
                     log=lambda _msg: None)
    assert (result.changes.added, result.changes.removed, result.changes.changed) == (["click-and-collect"], [], ["wool-care"])
    assert result.bundle.version != bundle_mod.load(knowledge_bundle).version
    config = result.bundle.manifest.training.config
    assert config is not None and config["knowledge"]["articles"] == str(edited_help_centre.resolve())
    classifier = IntentClassifier.from_bundle(result.bundle.path)
    base = KnowledgeBase.from_bundle(classifier.bundle)
    assert base is not None
    embedding = classifier.predict(["can I collect my parcel at one of your shops?"])[0].embedding
    assert embedding is not None
    hit = base.best(embedding)
    assert hit is not None and hit.passage.article == "click-and-collect" and base.clears(hit)
    with SQLiteSessionStore(tmp_path / "sessions.sqlite3") as store:
        wool = Chatbot(classifier, store, load_domain(classifier.bundle), knowledge=base).respond(
            "w1", "can I put my wool jumper in the tumble dryer?")
    assert wool.action == Action.KNOWLEDGE and NEW_DRYER_RULE in wool.text and "shrinks" not in wool.text


def test_the_intents_of_the_new_bundle_answer_exactly_as_the_serving_ones(knowledge_bundle, edited_help_centre, tmp_path):
    result = refresh(knowledge_bundle, tmp_path / "refreshed", articles=edited_help_centre, progress=False,
                     log=lambda _msg: None)
    texts = ["where is my order", "I want my money back", "hello there", "the parcel arrived broken"]
    served = IntentClassifier.from_bundle(knowledge_bundle).predict(texts)
    rebuilt = IntentClassifier.from_bundle(result.bundle.path).predict(texts)
    assert rebuilt == served  # label, confidence, ranking, out of scope


def test_the_command_prints_the_changes_and_promotes_the_new_bundle(knowledge_bundle, edited_help_centre, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    output = tmp_path / "refreshed"
    code = main(["knowledge", "--model", str(knowledge_bundle), "--output", str(output), "--articles",
                 str(edited_help_centre), "--promote", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "articles added: click-and-collect" in err and "articles changed: wool-care" in err
    assert "knowledge summary" in out and "4 (1 added, 0 removed, 1 changed, 2 unchanged)" in out
    assert "yes (generation 1)" in out
    record = FleetStore(sqlite_path=tmp_path / "data" / FLEET_FILE).get()
    assert record is not None and record.path == str(output.resolve())


@pytest.mark.parametrize(("extra", "problem"), [
    (["--output", "{model}"], "is the serving bundle"),
    (["--output", "{tmp}/new", "--set", "epochs=3"], "only knowledge.* settings apply here"),
    (["--output", "{tmp}/new", "--articles", "{tmp}/nowhere"], "no such folder"),
    (["--output", "{tmp}/new", "--set", "knowledge.max_tokens=lots"], "max_tokens"),
])
def test_a_bad_request_is_one_line_and_writes_nothing(knowledge_bundle, tmp_path, capsys, extra, problem):
    args = [part.format(model=knowledge_bundle, tmp=tmp_path) for part in extra]
    code = main(["knowledge", "--model", str(knowledge_bundle), *args, "--quiet"])
    _out, err = capsys.readouterr()
    assert code == 2 and problem in err and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()


def test_a_bundle_without_a_recipe_is_refused_with_one_line(knowledge_bundle, tmp_path):
    copy = tmp_path / "no-recipe"
    shutil.copytree(knowledge_bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["training"]["config"] = None
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle_mod.BundleError, match="no training recipe"):
        refresh(copy, tmp_path / "new", progress=False, log=lambda _msg: None)
    with pytest.raises(ConfigError, match="is the serving bundle"):
        refresh(copy, copy, progress=False, log=lambda _msg: None)


def test_a_refit_bundle_is_rebuilt_from_the_examples_it_trained_on_without_a_changed_data_note(tmp_path):
    refitted = train_bundle(tmp_path / "refit", f"knowledge.articles={KNOWLEDGE_ARTICLES}", "few_shot=12", "refit=true")
    lines: list[str] = []
    result = refresh(refitted, tmp_path / "refreshed", progress=False, log=lines.append)
    assert not [line for line in lines if "has changed" in line], lines
    router = result.bundle.meta["knowledge"]["router"]
    assert router["messages"] == bundle_mod.load(refitted).meta["knowledge"]["router"]["messages"]  # train + validation
