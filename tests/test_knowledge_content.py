"""The shop pack's help centre (bot/domains/shop/knowledge): articles and question sets.

Checks only the content and its format, with yaml and a small front-matter split, so the
test is instant and needs no model. The retrieval code reads the same files; these rules
are what it relies on: one article per file named after its slug, every question pointing
at one existing article (or null when no article answers it), enough questions per article
in each split, and no sentence shared between the splits, so that test.yaml stays held out.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bot.domains import pack_path

PACK = pack_path("shop")
KNOWLEDGE = PACK / "knowledge"
QUESTIONS = KNOWLEDGE / "questions"
ROOT = Path(__file__).resolve().parent.parent
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
URL_PREFIX = "https://help.northwind.example/articles/"

# split: (answerable at least, answerable per article at least, unanswerable at least)
SPLITS = {"train": (150, 3, 0), "validation": (100, 2, 20), "test": (120, 2, 25)}


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def split_front_matter(text: str) -> tuple[dict, str]:
    """(front matter, body) of a Markdown article that starts with a `---` YAML block."""
    lines = text.split("\n")
    assert lines[0] == "---", "an article starts with a --- line"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end])), "\n".join(lines[end + 1 :])


@pytest.fixture(scope="module")
def articles() -> dict[str, tuple[dict, str]]:
    return {p.stem: split_front_matter(p.read_text(encoding="utf-8")) for p in sorted(KNOWLEDGE.glob("*.md"))}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {
        name: yaml.safe_load((QUESTIONS / f"{name}.yaml").read_text(encoding="utf-8"))["questions"] for name in SPLITS
    }


def test_the_help_centre_has_at_least_40_articles_named_by_slug(articles):
    assert len(articles) >= 40
    assert [slug for slug in articles if not SLUG.match(slug)] == []


def test_every_article_has_title_url_tags_and_a_body_of_150_to_400_words(articles):
    problems = {}
    for slug, (meta, body) in articles.items():
        words = len(body.split())
        if not isinstance(meta.get("title"), str) or not meta["title"].strip():
            problems[slug] = "no title"
        elif meta.get("url") != URL_PREFIX + slug:
            problems[slug] = f"url {meta.get('url')!r}"
        elif not isinstance(meta.get("tags"), list) or not meta["tags"]:
            problems[slug] = "no tags"
        elif not 150 <= words <= 400:
            problems[slug] = f"{words} words"
    assert problems == {}


def test_every_article_is_organised_in_two_to_five_sections(articles):
    sections = {slug: len(re.findall(r"^## \S", body, flags=re.MULTILINE)) for slug, (_, body) in articles.items()}
    assert {slug: n for slug, n in sections.items() if not 2 <= n <= 5} == {}


def test_article_titles_are_unique(articles):
    titles = Counter(normalise(meta["title"]) for meta, _ in articles.values())
    assert {t: n for t, n in titles.items() if n > 1} == {}


def test_every_question_names_an_existing_article_or_null(articles, splits):
    unknown = {
        (name, q["text"]): q["article"]
        for name, questions in splits.items()
        for q in questions
        if q["article"] is not None and q["article"] not in articles
    }
    assert unknown == {}
    assert all(set(q) == {"text", "article"} and q["text"].strip() for qs in splits.values() for q in qs)


@pytest.mark.parametrize("name", list(SPLITS))
def test_each_split_has_enough_questions_for_every_article(name, articles, splits):
    total, per_article, unanswerable = SPLITS[name]
    counts = Counter(q["article"] for q in splits[name])
    assert sum(n for slug, n in counts.items() if slug is not None) >= total
    assert counts[None] >= unanswerable
    assert {slug: counts[slug] for slug in articles if counts[slug] < per_article} == {}


def test_no_question_repeats_within_or_across_the_splits(splits):
    sentences = Counter(normalise(q["text"]) for questions in splits.values() for q in questions)
    assert {s: n for s, n in sentences.items() if n > 1} == {}


def test_no_question_copies_an_intent_example_of_the_pack(splits):
    pack_sentences = set()
    for file in ("nlu.yaml", "test.yaml"):
        data = yaml.safe_load((PACK / file).read_text(encoding="utf-8"))
        pack_sentences |= {normalise(t) for body in data["intents"].values() for t in body["examples"]}
        pack_sentences |= {normalise(t) for t in data.get("out_of_scope") or []}
    copied = {q["text"] for qs in splits.values() for q in qs if normalise(q["text"]) in pack_sentences}
    assert copied == set()


def test_the_knowledge_files_are_declared_as_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["bot"]
    bot = ROOT / "bot"
    files = [*KNOWLEDGE.glob("*.md"), *QUESTIONS.glob("*.yaml")]
    unshipped = [str(f.relative_to(bot)) for f in files if not any(f.relative_to(bot).match(p) for p in patterns)]
    assert unshipped == []
