"""Shared fixtures: real bundles trained once per test session on the real encoder.

Nothing here mocks the model: the default shop pack and small slices of ../shared/data are
trained with the packaged all-MiniLM-L6-v2 (the `head` strategy takes seconds).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BANKING77 = SHARED_DATA / "banking77"
CLINC150 = SHARED_DATA / "clinc150"


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_dir(tmp_path_factory):
    """Sessions, outboxes and the embedding cache of a test run live in a temporary folder."""
    data_dir = tmp_path_factory.mktemp("supportbot-data")
    old = os.environ.get("SUPPORTBOT_DATA_DIR")
    os.environ["SUPPORTBOT_DATA_DIR"] = str(data_dir)
    yield data_dir
    if old is None:
        os.environ.pop("SUPPORTBOT_DATA_DIR", None)
    else:
        os.environ["SUPPORTBOT_DATA_DIR"] = old


def write_slice(source: Path, out: Path, *, labels: int, per_label: int, skip: int = 0) -> Path:
    """A CSV with the first `labels` intents of a BANKING77-style CSV, `per_label` rows each (after `skip`)."""
    by_label: dict[str, list[str]] = defaultdict(list)
    with open(source, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            by_label[row["category"]].append(row["text"])
    chosen = sorted(by_label)[:labels]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for label in chosen:
            for text in by_label[label][skip : skip + per_label]:
                writer.writerow([text, label])
    return out


def train_bundle(output: Path, *overrides: str) -> Path:
    """Train a bundle; without the ONNX export (seconds each) unless `onnx=true` is among the overrides."""
    from finetune.config import load_config
    from finetune.train import train

    cfg = load_config(None, [f"output={output}", "onnx=false", *overrides])
    return train(cfg, progress=False, log=lambda _msg: None).bundle.path


@pytest.fixture(scope="session")
def banking_slice(tmp_path_factory) -> dict[str, Path]:
    """Train and test CSVs: 8 BANKING77 intents, 40 training and 15 test texts each."""
    folder = tmp_path_factory.mktemp("banking-slice")
    return {
        "train": write_slice(BANKING77 / "train.csv", folder / "train.csv", labels=8, per_label=40),
        "test": write_slice(BANKING77 / "test.csv", folder / "test.csv", labels=8, per_label=15),
    }


@pytest.fixture(scope="session")
def banking_head_bundle(tmp_path_factory, banking_slice) -> Path:
    """A `head` bundle on the BANKING77 slice."""
    return train_bundle(tmp_path_factory.mktemp("bundles") / "banking-head", f"data={banking_slice['train']}")


@pytest.fixture(scope="session")
def shop_bundle(tmp_path_factory) -> Path:
    """The default model: the shop domain pack, `head` strategy, default recipe (ONNX serving graph included)."""
    return train_bundle(tmp_path_factory.mktemp("bundles") / "shop", "onnx=true")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL cluster for the session (tests/pg_cluster.py): initdb'd in a temporary folder,
    on a free loopback port, removed afterwards. Missing binaries FAIL the test (never a skip)."""
    from pg_cluster import PostgresCluster

    try:
        cluster = PostgresCluster().start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start a test PostgreSQL: {exc}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(postgres, request) -> str:
    """A fresh, empty database in the session's cluster, named after the test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    return postgres.create_database(name)


KNOWLEDGE_ARTICLES = ROOT / "tests" / "data" / "knowledge"


@pytest.fixture(scope="session")
def knowledge_bundle(tmp_path_factory) -> Path:
    """The shop pack's intents (12 examples each, to train quickly) with the small test help centre
    (tests/data/knowledge) as its articles."""
    return train_bundle(tmp_path_factory.mktemp("bundles") / "shop-knowledge", f"knowledge.articles={KNOWLEDGE_ARTICLES}",
                        "few_shot=12")


CHROMIUM = "/usr/bin/chromium"  # Debian's chromium (.ci/run and `make browser` install it)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (playwright) per browser test module; a missing Chromium fails, never skips.

    Module scope, not session: playwright's sync API keeps an asyncio loop running in the main thread
    while it is open, so every later test that calls `asyncio.run` would fail with "cannot be called from
    a running event loop". Closing it at the end of each module gives the thread back."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
