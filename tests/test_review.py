"""The review queue (bot/review.py, serve/review.py): built from real stored turns of a real server on the
real shop model, grouped on its encoder's vectors; the admin API's paging and errors; labelling into the
corrections file (pack format, atomic, nothing lost); `supportbot review` on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import yaml
from serve_helpers import live_server, make_settings

from bot.review import OUT_OF_SCOPE, Corrections, ReviewError, candidates, labelling_order, locked_corrections
from bot.sessions import Turn
from finetune import data
from serve.database import open_database
from serve.postgres import PostgresSessionStore
from supportbot.cli import main

ADMIN = "review-admin-token-7c1e"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Near-duplicates the shop model cannot place, a handoff request, and confident answers.
GIBBERISH = ["zorblax quintet vump", "zorblax quintet vump!", "Zorblax quintet vump please"]
OTHER = ["the purple elephant sings opera", "purple elephants singing opera"]
HANDOFF = "I want to talk to a human"
CONFIDENT = ["where is my order #48213", "I forgot my password"]


def turn(seq: int, session: str, role: str, text: str, action: str, *, intent: str | None = "x",
         reason: str | None = None, metadata: dict | None = None) -> dict:
    meta = dict(metadata or {})
    if role == "bot":
        meta["reason"] = reason
    return {"seq": seq, "session_id": session, "role": role, "text": text, "intent": intent, "confidence": 0.3,
            "action": action, "model_version": "v", "at": f"2026-01-01T00:00:{seq:02d}", "metadata": meta}


def test_candidates_queue_what_the_bot_did_not_understand_and_skip_replies_to_its_own_questions():
    turns = [
        turn(1, "a", "user", "blorp", "fallback"), turn(2, "a", "bot", "Sorry?", "fallback", reason="low_confidence"),
        turn(3, "a", "user", "the first one", "answer"), turn(4, "a", "bot", "ok", "answer", reason="chosen"),
        turn(5, "b", "user", "how do returns work", "knowledge"),
        turn(6, "b", "bot", "Our policy...", "knowledge", reason="knowledge"),
        turn(7, "b", "user", "no", "fallback", metadata={"feedback": {"helpful": False, "passage_id": "p#1"}}),
        turn(8, "b", "bot", "Sorry it did not help", "fallback", reason="not_helpful"),
        turn(9, "c", "user", "human please", "handoff"), turn(10, "c", "bot", "A person...", "handoff", reason="handoff_intent"),
        turn(11, "c", "user", "hello?", "handoff", intent=None),  # silent: a person answers it
        turn(12, "d", "user", "A or B", "clarify"), turn(13, "d", "bot", "Did you mean", "clarify", reason="ambiguous"),
        turn(14, "e", "user", "track my parcel", "answer"), turn(15, "e", "bot", "Here", "answer", reason="confident"),
    ]
    queued, answered = candidates(turns)
    assert {(i.text, i.reason) for i in queued} == {
        ("blorp", "fallback"), ("how do returns work", "not_helpful"), ("human please", "handoff"), ("A or B", "clarify")}
    assert [i.text for i in answered] == ["track my parcel"]  # queued only if its margin is low


def test_labelling_order_puts_the_least_certain_first_and_near_duplicates_of_listed_messages_last():
    vectors = np.array([[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    margins = np.array([0.05, 0.01, 0.6, 0.3])
    # 1 is least certain; 0 is nearly 1 and waits behind the distant, more certain 3 and 2.
    assert labelling_order(vectors, margins) == [1, 3, 2, 0]
    assert labelling_order(np.zeros((0, 3)), np.zeros(0)) == []


def test_corrections_keep_every_label_under_concurrent_writers(tmp_path):
    path = tmp_path / "corrections.yaml"

    def writer(worker: int) -> None:
        for i in range(10):
            with locked_corrections(path) as corrections:
                corrections.add([f"text {worker}-{i}"], "order_status" if i % 2 else OUT_OF_SCOPE)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    corrections = Corrections.read(path)
    assert corrections.count() == 40
    with locked_corrections(path) as again:
        assert again.add(["TEXT 0-1", "new one"], "cancel_order") == (1, 1)  # the first label of a text is kept
    rows = data.load(str(path))["train"]  # the pack format: training reads it as it is
    assert len(rows) == 41 and set(rows["label"]) == {"order_status", "oos", "cancel_order"}
    path.write_text("intents: [not, a, mapping]\n")
    with pytest.raises(ReviewError, match=r"corrections\.yaml"):
        Corrections.read(path)


@pytest.mark.parametrize(
    "content, entry",
    [
        ('intents: {track_order: {examples: ["", "where is it"]}}\n', "intent 'track_order' example 1: empty text"),
        ('intents: {track_order: {examples: [ok, "   "]}}\n', "intent 'track_order' example 2: empty text"),
        ('intents: {"": {examples: [hello there]}}\n', "intent 1 under 'intents': empty name"),
        ("intents: {track_order: {examples: [ok]}, null: {examples: [hi]}}\n", "intent 2 under 'intents': empty name"),
        ('out_of_scope: [fine, ""]\n', "out_of_scope text 2: empty text"),
    ],
)
def test_an_empty_text_or_intent_name_in_the_corrections_file_is_named_there(tmp_path, content, entry):
    path = tmp_path / "corrections.yaml"
    path.write_text(content)
    with pytest.raises(ReviewError) as caught:
        Corrections.read(path)
    assert str(caught.value) == f"{path}: {entry}"


@pytest.fixture(scope="module")
def served(shop_bundle, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("review")
    settings = make_settings(shop_bundle, data_dir, admin_token=ADMIN)
    with live_server(settings) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        for i, text in enumerate(GIBBERISH + OTHER + [HANDOFF] + CONFIDENT):
            assert http.post("/v1/chat", json={"session_id": f"s{i}", "message": text}).status_code == 200
        yield live, http, settings


def test_review_api_groups_near_duplicates_largest_first_and_pages(served):
    _live, http, _settings = served
    assert http.get("/v1/admin/review").status_code == 401
    body = http.get("/v1/admin/review", headers=AUTH).json()
    texts = [item["text"] for item in body["items"]]
    assert set(GIBBERISH + OTHER) <= set(texts) and HANDOFF in texts
    assert not set(CONFIDENT) & set(texts), "confident answers are not queued"
    first = body["items"][0]
    assert first["group"] == 0 and first["group_size"] == 3 and first["text"] in GIBBERISH
    assert {i["group"] for i in body["items"] if i["text"] in GIBBERISH} == {0}
    assert len({i["group"] for i in body["items"] if i["text"] in OTHER}) == 1
    assert {"text", "action", "intent", "confidence", "session_id", "at", "group"} <= set(first)
    assert body["total"] == len(texts) and "order_status" in body["intents"]
    page = http.get("/v1/admin/review", params={"offset": 1, "limit": 2}, headers=AUTH).json()
    assert [i["id"] for i in page["items"]] == [i["id"] for i in body["items"][1:3]]
    assert http.get("/v1/admin/review", params={"group": 0}, headers=AUTH).json()["total"] == 3
    to_label = http.get("/v1/admin/review", params={"order": "label"}, headers=AUTH).json()["items"]
    assert to_label[0]["margin"] == min(i["margin"] for i in body["items"]), "the least certain message first"
    assert to_label[1]["group"] != to_label[0]["group"], "the first message's near-duplicate waits"
    assert to_label[-1]["text"] == HANDOFF, "a message the model is sure of (margin 1) comes last"
    assert sorted(i["id"] for i in to_label) == sorted(i["id"] for i in body["items"])
    paged = http.get("/v1/admin/review", params={"order": "label", "offset": 2, "limit": 3}, headers=AUTH).json()
    assert [i["id"] for i in paged["items"]] == [i["id"] for i in to_label[2:5]], "pages of the same order"
    for params in ({"offset": -1}, {"limit": 0}, {"limit": 501}, {"limit": "many"}, {"reason": "bored"},
                   {"order": "sideways"}):
        refused = http.get("/v1/admin/review", params=params, headers=AUTH)
        assert refused.status_code == 422, params
        assert set(refused.json()["error"]) >= {"code", "message"}


def test_labelling_writes_the_corrections_file_and_labelled_items_leave_the_queue(served):
    _live, http, settings = served
    items = http.get("/v1/admin/review", headers=AUTH).json()["items"]
    gibberish = next(i for i in items if i["text"] in GIBBERISH)
    other = next(i for i in items if i["text"] in OTHER)
    handoff = next(i for i in items if i["text"] == HANDOFF)

    def label(**body):
        return http.post("/v1/admin/review/labels", json=body, headers=AUTH)

    for body, status, code in [
        ({"ids": [gibberish["id"]], "target": "intent", "intent": "no_such_intent"}, 422, "invalid_label"),
        ({"ids": [gibberish["id"]], "target": "new_intent", "intent": "Bad Name!"}, 422, "invalid_label"),
        ({"ids": [gibberish["id"]], "target": "new_intent", "intent": "order_status"}, 422, "invalid_label"),
        ({"ids": [gibberish["id"]], "target": "out_of_scope", "intent": "order_status"}, 422, "invalid_label"),
        ({"ids": [], "target": "out_of_scope"}, 422, "invalid_request"),
        ({"ids": [10**9], "target": "out_of_scope"}, 409, "not_in_queue"),
        ({"ids": [gibberish["id"]], "target": "sideways"}, 422, "invalid_request"),
    ]:
        refused = label(**body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (status, code), refused.text
    assert not settings.corrections_path.exists(), "a refused label writes nothing"
    assert http.post("/v1/admin/review/labels", json={"ids": [1], "target": "out_of_scope"}).status_code == 401

    done = label(ids=[gibberish["id"]], target="new_intent", intent="zorblax", whole_group=True)
    assert done.status_code == 200 and done.json() == {"label": "zorblax", "new_intent": True, "labelled": 3,
                                                       "already_labelled": 0, "corrections": 3}
    assert label(ids=[other["id"]], target="out_of_scope", whole_group=True).json()["labelled"] == 2
    assert label(ids=[handoff["id"]], target="intent", intent="talk_to_human").json()["corrections"] == 6
    again = label(ids=[handoff["id"]], target="intent", intent="talk_to_human")
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_in_queue"

    body = http.get("/v1/admin/review", headers=AUTH).json()
    left = {i["text"] for i in body["items"]}
    assert not left & set(GIBBERISH + OTHER + [HANDOFF]) and body["labelled"] == 6
    assert "zorblax" in body["intents"]  # a new intent can be chosen again as an existing one
    pack = yaml.safe_load(settings.corrections_path.read_text())
    assert sorted(pack["intents"]["zorblax"]["examples"]) == sorted(GIBBERISH) and pack["intents"]["zorblax"]["new"]
    assert sorted(pack["out_of_scope"]) == sorted(OTHER) and pack["intents"]["talk_to_human"]["examples"] == [HANDOFF]


def test_review_command_lists_the_queue_and_errors_in_one_line(served, monkeypatch, capsys):
    _live, http, settings = served
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("COLUMNS", "200")
    total = http.get("/v1/admin/review", headers=AUTH).json()["total"]
    assert main(["review", "--model", str(settings.model), "--limit", "50"]) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if "queued messages" in line)
    assert summary.split()[-2] == str(total), "the terminal shows the API's queue"
    assert not any(text in out for text in CONFIDENT)
    assert main(["review", "--model", str(settings.model), "--limit", "2", "--order", "label"]) == 0
    groups = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("│")][:2]
    assert len(set(groups)) == 2, "in the labelling order the first message's near-duplicate waits"
    assert main(["review", "--model", str(settings.model), "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit" in err
    assert main(["review", "--model", str(settings.data_dir)]) == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_review_reads_the_postgres_store(pg_url, shop_bundle, monkeypatch, capsys, tmp_path):
    from bot.chatbot import Chatbot

    engine = open_database(pg_url)
    try:
        bot = Chatbot.from_bundle(shop_bundle, PostgresSessionStore(engine))
        for i, text in enumerate(GIBBERISH + CONFIDENT):
            bot.respond(f"pg{i}", text)
        rows = PostgresSessionStore(engine).recent_turns(3)
        assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows) and rows[-1]["role"] == "bot"
    finally:
        engine.dispose()
    monkeypatch.setenv("SUPPORTBOT_DATABASE_URL", pg_url)
    monkeypatch.setenv("SUPPORTBOT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["review", "--model", str(shop_bundle)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert all(text in out for text in GIBBERISH) and not any(text in out for text in CONFIDENT)


def test_chatbot_turns_reach_the_queue_on_sqlite(tmp_path, shop_bundle):
    """The SQLite store's recent_turns: every session, oldest first, with seq and session_id."""
    from bot.sessions import SQLiteSessionStore

    with SQLiteSessionStore(tmp_path / "s.sqlite3") as store:
        store.commit("a", store.load("a"), [Turn("user", "one", None, 0.0, "answer", "v")])
        store.commit("b", store.load("b"), [Turn("user", "two", "x", 0.5, "fallback", "v")])
        rows = store.recent_turns(10)
    assert [(r["session_id"], r["text"], r["seq"]) for r in rows] == [("a", "one", 1), ("b", "two", 2)]
