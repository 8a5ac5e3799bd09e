"""Intent discovery on small real BANKING77 slices, with the packaged encoder (no mocks)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BANKING77, train_bundle, write_slice
from sklearn.metrics import normalized_mutual_info_score

from bot.encoder import DEFAULT_BASE, resolve_base
from supportbot.cli import main

K_RANGE = ["--k-min", "4", "--k-max", "16", "--k-step", "2"]


def norm(text: str) -> str:
    return " ".join(text.split())  # the data reader collapses runs of spaces


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def discovered(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """`supportbot discover` on 8 BANKING77 intents x 15 test messages, labels present but ignored."""
    folder = tmp_path_factory.mktemp("discover")
    source = write_slice(BANKING77 / "test.csv", folder / "messages.csv", labels=8, per_label=15)
    truth = {norm(row["text"]): row["label"] for row in read_rows(source)}
    assert main(["discover", "--data", str(source), "--output", str(folder / "out"), "--quiet", *K_RANGE]) == 0
    return folder / "out", truth


def test_discover_recovers_the_hidden_intents_and_estimates_their_number(discovered):
    out, truth = discovered
    rows = read_rows(out / "assignments.csv")
    assert sorted(norm(r["text"]) for r in rows) == sorted(truth)  # every message, once
    clusters = [int(r["cluster"]) for r in rows]
    info = yaml.safe_load((out / "clusters.json").read_text())
    assert 6 <= info["k"] <= 16  # 8 hidden intents, estimated without being told (it over-splits: 14 measured)
    nmi = normalized_mutual_info_score([truth[norm(r["text"])] for r in rows], clusters)
    assert nmi > 0.6, nmi
    for cluster in info["clusters"]:
        assert cluster["terms"] and cluster["representative"]
        assert cluster["size"] == clusters.count(cluster["cluster"])
    assert info["method"] == "neighbour-mean+ward+silhouette-persistent-peak" and info["base"] == DEFAULT_BASE
    assert info["neighbours"] == 5  # 120 messages: the rule's least (one per 100 messages, 5 to 20)
    picture = (out / "discovery.png").read_bytes()
    assert picture[:8] == b"\x89PNG\r\n\x1a\n" and len(picture) > 10_000  # a drawn picture, not an empty file
    assert not list(out.glob(".*.tmp*"))  # drawn beside its place, then renamed


def test_the_base_given_is_the_one_that_clusters_and_clusters_json_names_it(discovered, tmp_path):
    out, truth = discovered
    folder = resolve_base(DEFAULT_BASE)  # the packaged model's folder: the same weights, named by path
    source = tmp_path / "messages.txt"
    source.write_text("\n".join(truth) + "\n", encoding="utf-8")
    assert main(["discover", "--data", str(source), "--output", str(tmp_path / "o"), "--base", folder, "--quiet", *K_RANGE]) == 0
    info = yaml.safe_load((tmp_path / "o" / "clusters.json").read_text())
    assert info["base"] == folder
    assert info["k"] == yaml.safe_load((out / "clusters.json").read_text())["k"]  # same vectors, same tree, same cut


def test_draft_pack_trains_as_it_is(discovered, tmp_path):
    out, _ = discovered
    pack = yaml.safe_load((out / "pack" / "nlu.yaml").read_text())
    assert len(pack["intents"]) >= 4
    bundle = train_bundle(tmp_path / "draft", f"data={out / 'pack'}", "epochs=40")
    assert (bundle / "bundle.json").is_file()


def test_known_model_sets_aside_the_intents_it_already_answers(tmp_path, banking_head_bundle):
    # the bundle knows the first 8 intents; the messages also hold 4 intents it has never seen
    source = write_slice(BANKING77 / "test.csv", tmp_path / "messages.csv", labels=12, per_label=15)
    truth = {norm(row["text"]): row["label"] for row in read_rows(source)}
    known_labels = sorted(set(truth.values()))[:8]
    out = tmp_path / "out"
    assert main(["discover", "--data", str(source), "--output", str(out), "--known", str(banking_head_bundle),
                 "--quiet", *K_RANGE]) == 0
    set_aside = Counter(truth[norm(r["text"])] in known_labels for r in read_rows(out / "known.csv"))
    kept = Counter(truth[norm(r["text"])] in known_labels for r in read_rows(out / "assignments.csv"))
    assert set_aside[True] >= 0.9 * 8 * 15  # nearly every message of a known intent is set aside...
    assert kept[False] >= 0.8 * sum(kept.values())  # ...so what is proposed is mostly new intents
    # measured: the head, trained without out-of-scope examples, also answers ~40% of the new messages
    assert kept[False] >= 0.3 * 4 * 15


def test_discover_errors_are_one_line(tmp_path, capsys):
    assert main(["discover", "--data", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o")]) == 2
    assert main(["discover", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--known", str(tmp_path)]) == 2
    few = tmp_path / "few.txt"
    few.write_text("hello\nwhere is my card\n", encoding="utf-8")
    assert main(["discover", "--data", str(few), "--output", str(tmp_path / "o")]) == 2
    enough = tmp_path / "enough.txt"
    enough.write_text("".join(f"message {n} about my card\n" for n in range(12)), encoding="utf-8")
    assert main(["discover", "--data", str(enough), "--output", str(tmp_path / "o"), "--base", str(tmp_path / "no-such-base")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("supportbot discover: error: ") for line in errors)


def test_a_chat_log_with_a_text_column_and_no_labels_is_read_but_training_still_needs_labels(tmp_path, capsys):
    from finetune.discover import read_texts

    texts = [f"where is my parcel number {i}" for i in range(12)] + ["where is my parcel number 0"]
    log = tmp_path / "chats.csv"
    with open(log, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    lines = tmp_path / "chats.jsonl"
    lines.write_text("".join(f'{{"content": "{t}", "message_type": "incoming"}}\n' for t in texts), encoding="utf-8")
    blank = tmp_path / "half-labelled.csv"
    blank.write_text("text,label\n" + "".join(f"{t},{'track' if i % 2 else ''}\n" for i, t in enumerate(texts)), encoding="utf-8")
    unique = list(dict.fromkeys(texts))
    assert read_texts(str(log)) == unique and read_texts(str(lines)) == unique and read_texts(str(blank)) == unique
    assert main(["train", "--data", str(log), "--output", str(tmp_path / "m")]) == 2
    assert "chats.csv: no label column" in capsys.readouterr().err


def test_a_silhouette_dip_between_the_first_cuts_does_not_stop_the_search_for_k():
    from finetune.discover import persistent_peak

    # the shape that stopped the old first-peak rule at k_min on two BANKING77 draws of five: one dip, then a rise
    curve = [0.141, 0.137, 0.164, 0.168, 0.190, 0.195, 0.201, 0.202, 0.200, 0.199, 0.210]
    assert persistent_peak(curve, complete=True) == 7
    assert persistent_peak(curve[:8], complete=False) is None  # 0.202's successors are not scored yet
    assert persistent_peak([0.1, 0.2, 0.3], complete=True) == 2  # a curve that only rises: its last cut


def test_each_vector_is_averaged_with_its_nearest_other_messages_and_paraphrases_draw_together(tmp_path):
    from finetune.discover import DiscoverConfig, embed, neighbour_mean, neighbours_for

    rows = read_rows(write_slice(BANKING77 / "test.csv", tmp_path / "nm.csv", labels=6, per_label=12))
    texts, labels = [norm(r["text"]) for r in rows], [r["label"] for r in rows]
    raw = embed(texts, DiscoverConfig())
    smoothed = neighbour_mean(raw, 5, block=7)  # blocks smaller than the input: the same as one block
    for i in (0, 17, len(texts) - 1):  # brute force, the message itself left out of its neighbours
        others = np.delete(np.arange(len(texts)), i)
        nearest = others[np.argsort(-(raw[others] @ raw[i]), kind="stable")[:5]]
        expected = raw[i] + raw[nearest].mean(axis=0)
        np.testing.assert_allclose(smoothed[i], expected / np.linalg.norm(expected), atol=1e-5)
    assert neighbour_mean(raw, 0) is raw
    same = np.array(labels)[:, None] == np.array(labels)[None, :]
    np.fill_diagonal(same, False)
    gap = lambda v: (v @ v.T)[same].mean() - (v @ v.T)[~same & ~np.eye(len(v), dtype=bool)].mean()  # noqa: E731
    assert gap(smoothed) > gap(raw) + 0.05  # messages of one intent are closer to each other than to the rest
    assert [neighbours_for(n, DiscoverConfig()) for n in (3, 120, 1_000, 3_080, 15_000)] == [2, 5, 10, 20, 20]
    assert neighbours_for(3_080, DiscoverConfig(neighbours=0)) == 0 and neighbours_for(4, DiscoverConfig(neighbours=9)) == 3
