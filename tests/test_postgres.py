"""The PostgreSQL backend against a real PostgreSQL (tests/pg_cluster.py): migrations, sessions with
compare-and-set across replicas, the outbox's claims, leases and shared dedupe keys, promotion."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from mock_chatwoot import MockChatwoot
from pg_cluster import free_port
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from bot.bundle import BundleError
from bot.sessions import SessionConflict, SessionState, Turn
from serve.chatwoot import KIND_MESSAGE, ChatwootClient, message_payload
from serve.database import (
    SCHEMA_VERSION,
    DatabaseError,
    DatabaseUnavailable,
    connect,
    open_database,
    upgrade_schema,
)
from serve.fleet import FleetStore
from serve.outbox import Accepted, Duplicate, NewAction, Outbox, OutboxMetrics, RetryPolicy
from serve.postgres import PostgresOutboxStore, PostgresSessionStore
from supportbot.cli import main

FAST = RetryPolicy(backoff_base_s=0.05, backoff_cap_s=0.2, jitter=0.0, horizon_s=60)


def message(conversation: int, text_: str) -> NewAction:
    return NewAction(f"chatwoot:1:{conversation}", KIND_MESSAGE, message_payload(1, conversation, text_))


def turn(text_: str) -> Turn:
    return Turn(role="user", text=text_, intent=None, confidence=0.0, action="answer", model_version="t")


def test_migrations_run_once_and_a_newer_database_is_refused_in_one_line(pg_url):
    engine = open_database(pg_url)
    assert upgrade_schema(engine) == (SCHEMA_VERSION, SCHEMA_VERSION), "a second upgrade has nothing to do"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO supportbot_schema (version, description) VALUES (99, 'from the future')"))
    engine.dispose()
    with pytest.raises(DatabaseError) as caught:
        open_database(pg_url)
    message_ = str(caught.value)
    assert "schema version 99" in message_ and "newer" in message_ and "\n" not in message_
    assert "127.0.0.1" in message_


def test_an_unreachable_database_is_one_line_naming_the_host(capsys, monkeypatch, tmp_path):
    port = free_port()
    with pytest.raises(DatabaseError, match=rf"cannot reach the database at 127\.0\.0\.1:{port}/nowhere"):
        open_database(f"postgresql://someone:secret@127.0.0.1:{port}/nowhere")
    monkeypatch.setenv("SUPPORTBOT_DATABASE_URL", f"postgresql://someone:secret@127.0.0.1:{port}/nowhere")
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "secret" not in err


def test_db_upgrade_command_migrates_and_reports(pg_url, monkeypatch, capsys):
    monkeypatch.setenv("SUPPORTBOT_DATABASE_URL", pg_url)
    assert main(["db", "upgrade"]) == 0, capsys.readouterr().err
    assert "upgrade" in capsys.readouterr().out  # the summary table's title
    engine = open_database(pg_url, upgrade=False)  # check only: the command left nothing to do
    with engine.connect() as conn:
        versions = [row[0] for row in conn.execute(text("SELECT version FROM supportbot_schema ORDER BY version"))]
    engine.dispose()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert main(["db", "upgrade"]) == 0  # idempotent


def test_session_commits_from_two_replicas_at_once_keep_every_turn_in_commit_order(pg_url):
    engines = [open_database(pg_url), open_database(pg_url)]
    stores = [PostgresSessionStore(e) for e in engines]
    errors: list[BaseException] = []

    def writer(store: PostgresSessionStore, name: str, count: int) -> None:
        try:
            for i in range(count):
                while True:
                    state = store.load("shared")
                    new = SessionState(turns=state.turns + 1, rev=state.rev)
                    try:
                        store.commit("shared", new, [turn(f"{name}-{i}")])
                        break
                    except SessionConflict:
                        continue
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(stores[k % 2], f"w{k}", 15)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    state = stores[0].load("shared")
    assert state.rev == 90 and state.turns == 90, "no commit lost, none doubled"
    texts = [t["text"] for t in stores[1].transcript("shared")]
    assert len(texts) == 90 and len(set(texts)) == 90
    for k in range(6):  # each writer's turns appear in the order it committed them
        mine = [t for t in texts if t.startswith(f"w{k}-")]
        assert mine == [f"w{k}-{i}" for i in range(15)]
    with pytest.raises(SessionConflict):
        stores[0].commit("shared", SessionState(rev=3), [])
    for e in engines:
        e.dispose()


def test_dedupe_keys_are_shared_and_a_concurrent_repeat_is_a_duplicate(pg_url):
    engines = [open_database(pg_url), open_database(pg_url)]
    a, b = (PostgresOutboxStore(e) for e in engines)
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def deliver(store: PostgresOutboxStore) -> None:
        barrier.wait()
        outcomes.append(store.commit(["chatwoot:delivery:1"], [message(1, "hi")], now=time.time(),
                                     result={"r": 1}))

    threads = [threading.Thread(target=deliver, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(o).__name__ for o in outcomes) == ["Accepted", "Duplicate"]
    assert len(a.actions()) == 1
    assert b.seen(["chatwoot:delivery:1"]) == Duplicate("chatwoot:delivery:1", {"r": 1})
    for e in engines:
        e.dispose()


def test_claims_are_exclusive_heads_only_and_an_expired_lease_is_reclaimed_as_uncertain(pg_url):
    engines = [open_database(pg_url), open_database(pg_url)]
    a = PostgresOutboxStore(engines[0], owner="a", lease_s=0.5)
    b = PostgresOutboxStore(engines[1], owner="b", lease_s=0.5)
    now = time.time()
    for conversation in range(10):
        assert isinstance(a.commit([f"k{conversation}"], [message(conversation, "one"), message(conversation, "two")],
                                   now=now), Accepted)
    claimed: dict[str, list] = {}

    def claim(store: PostgresOutboxStore) -> None:
        claimed[store.owner] = store.heads(now=time.time(), limit=100)

    threads = [threading.Thread(target=claim, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [x.id for x in claimed["a"] + claimed["b"]]
    assert len(ids) == len(set(ids)) == 10, "each conversation's head is claimed by exactly one replica"
    assert {x.payload["content"] for x in claimed["a"] + claimed["b"]} == {"one"}, "only heads are claimed"
    assert a.heads(now=time.time()) == [] and b.heads(now=time.time()) == [], "leased heads block their queues"
    time.sleep(0.6)  # every lease expires, as after a SIGKILL
    again = b.heads(now=time.time())
    assert sorted(x.id for x in again) == sorted(ids) and all(x.uncertain for x in again)
    for e in engines:
        e.dispose()


def test_two_replica_workers_deliver_each_action_once_in_order(pg_url):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.fail_next(6, 500)
            chatwoot.fail_next(4, 429)
            engines = [open_database(pg_url), open_database(pg_url)]
            outboxes, clients = [], []
            for engine in engines:
                store = PostgresOutboxStore(engine, lease_s=5.0)
                http = httpx.AsyncClient(timeout=2.0)
                client = ChatwootClient(chatwoot.url, chatwoot.token, http)
                outboxes.append(Outbox(store, client.senders(), FAST, OutboxMetrics(CollectorRegistry(), store),
                                       poll_s=0.1))
                clients.append(http)
            for box in outboxes:
                box.start()
            for i in range(15):
                for conversation in range(8):
                    box = outboxes[(i + conversation) % 2]
                    await box.submit([f"d{conversation}-{i}"], [message(conversation, f"m{i}")])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(outboxes[0].store.actions("sent")) < 120:
                await asyncio.sleep(0.1)
            for box in outboxes:
                await box.stop()
            for http in clients:
                await http.aclose()
            for conversation in range(8):
                assert chatwoot.replies(1, conversation) == [f"m{i}" for i in range(15)]
            for engine in engines:
                engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_a_store_call_while_the_database_is_down_is_database_unavailable(postgres):
    url = postgres.create_database("outage_probe")
    engine = open_database(url)
    store = PostgresSessionStore(engine)
    store.commit("s", SessionState(), [turn("before")])
    postgres.pg_ctl("stop")
    try:
        with pytest.raises(DatabaseUnavailable):
            store.load("s")
    finally:
        postgres.pg_ctl("start")
    deadline = time.monotonic() + 20
    while True:  # the pool reconnects by itself
        try:
            assert store.transcript("s")[0]["text"] == "before"
            break
        except DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    engine.dispose()


def test_a_store_call_with_every_pooled_connection_busy_is_database_unavailable(postgres):
    """Pool exhaustion (every connection held past pool_timeout) is a 503 to retry, not a 500."""
    url = postgres.create_database("pool_exhausted")
    open_database(url).dispose()  # the schema
    engine = connect(url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    store = PostgresSessionStore(engine)
    with engine.connect(), pytest.raises(DatabaseUnavailable):  # the only connection, held
        store.load("s")
    assert store.load("s") is not None
    engine.dispose()


def test_promotion_records_a_verified_bundle_and_refuses_a_damaged_one(pg_url, shop_bundle, tmp_path):
    import shutil

    engine = open_database(pg_url)
    fleet = FleetStore(engine=engine)
    first = fleet.promote(shop_bundle)
    assert first.generation == 1 and fleet.get() == first
    damaged = tmp_path / "damaged"
    shutil.copytree(shop_bundle, damaged)
    victim = next(p for p in damaged.iterdir() if p.name != "bundle.json" and p.is_file())
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    with pytest.raises(BundleError, match="damaged"):
        fleet.promote(damaged)
    assert fleet.get() == first, "the fleet stays on its version"
    engine.dispose()


def test_conversation_lock_is_exclusive_across_replicas(pg_url):
    engines = [open_database(pg_url), open_database(pg_url)]
    a, b = (PostgresOutboxStore(e) for e in engines)
    held = a.try_lock("chatwoot:1:1")
    assert held is not None
    assert b.try_lock("chatwoot:1:1") is None
    other = b.try_lock("chatwoot:1:2")
    assert other is not None
    a.unlock(held)
    again = b.try_lock("chatwoot:1:1")
    assert again is not None
    b.unlock(again)
    b.unlock(other)
    for e in engines:
        e.dispose()


def test_a_handler_cancelled_while_its_conversation_lock_is_being_taken_leaves_no_lock_behind(pg_url):
    """The lock is taken in a thread; a handler cancelled meanwhile (client gone, shutdown) must not
    leave the advisory lock held by a connection nobody owns: the conversation would stay busy for good."""

    class SlowLock(PostgresOutboxStore):
        def try_lock(self, key):
            time.sleep(0.3)  # the database is slow to answer: the cancellation lands meanwhile
            return super().try_lock(key)

    engine = open_database(pg_url)
    store = SlowLock(engine)
    outbox = Outbox(store, {}, RetryPolicy())

    async def scenario():
        async def handler():
            async with outbox.conversation("chatwoot:1:9"):
                await asyncio.sleep(10)

        first = asyncio.create_task(handler())
        await asyncio.sleep(0.1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with outbox.conversation("chatwoot:1:9", timeout_s=3.0):
            pass

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        engine.dispose()


def test_serving_through_a_database_outage_answers_503_and_recovers_by_itself(postgres, shop_bundle, tmp_path):
    """The database goes away while serving: /readyz 503, chat 503 database_unavailable with Retry-After,
    a webhook delivery 429 (not acknowledged, so the platform delivers it again); all comes back alone."""
    from mock_chatwoot import deliver as deliver_to
    from mock_chatwoot import message_event
    from serve_helpers import live_server, make_settings

    url = postgres.create_database("outage_serving")
    with MockChatwoot("tok") as chatwoot, live_server(make_settings(
            shop_bundle, tmp_path, database_url=url, chatwoot_url=chatwoot.url, chatwoot_token="tok")) as server:
        hook = f"{server.url}/v1/webhooks/chatwoot"
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v1/chat", json={"session_id": "o1", "message": "do you ship abroad"}).status_code == 200
            postgres.pg_ctl("stop")
            try:
                deadline = time.monotonic() + 10
                while http.get("/readyz").status_code != 503 and time.monotonic() < deadline:
                    time.sleep(0.1)
                ready = http.get("/readyz")
                assert ready.status_code == 503 and "database" in ready.json()["detail"]
                chat = http.post("/v1/chat", json={"session_id": "o1", "message": "what are your opening hours"})
                assert chat.status_code == 503 and chat.json()["error"]["code"] == "database_unavailable"
                assert chat.headers["Retry-After"]
                held = deliver_to(hook, message_event("do you ship abroad", message_id=77, conversation_id=77),
                                  secret=None, delivery_id="outage-1")
                assert held.status_code == 429, held.text
            finally:
                postgres.pg_ctl("start")
            deadline = time.monotonic() + 30
            while http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert http.get("/readyz").status_code == 200
            assert http.post("/v1/chat", json={"session_id": "o1", "message": "thanks"}).status_code == 200
            again = deliver_to(hook, message_event("do you ship abroad", message_id=77, conversation_id=77),
                               secret=None, delivery_id="outage-1")
            assert again.status_code == 200 and again.json()["status"] == "accepted"
            assert chatwoot.wait_for(lambda: len(chatwoot.replies(1, 77)) == 1, timeout=20)


def test_a_metrics_scrape_while_the_database_hangs_does_not_stall_other_requests(postgres, shop_bundle, tmp_path):
    """The outbox gauges read the database at each scrape; a database that hangs (no refusal, no answer)
    must hold up the scrape alone, not the event loop every other request is answered on."""
    from serve_helpers import live_server, make_settings

    url = postgres.create_database("hung_scrape")
    with MockChatwoot("tok") as chatwoot, live_server(make_settings(
            shop_bundle, tmp_path, database_url=url, chatwoot_url=chatwoot.url, chatwoot_token="tok")) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        assert "supportbot_outbox_queue_depth" in http.get("/metrics").text
        scraped: list[int] = []
        with postgres.frozen():
            scrape = threading.Thread(target=lambda: scraped.append(http.get("/metrics").status_code), daemon=True)
            scrape.start()
            time.sleep(0.5)  # the scrape is waiting on the database
            assert not scraped, "the scrape did wait on the hung database"
            try:
                health = http.get("/healthz", timeout=5)
            except httpx.TimeoutException:
                pytest.fail("/healthz did not answer while a /metrics scrape waited on the database")
            assert health.status_code == 200
        scrape.join(60)
        assert scraped == [200]
