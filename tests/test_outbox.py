"""The durable outbox against a real (mock) Chatwoot on loopback: retries, order, restarts, failures."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from mock_chatwoot import MockChatwoot
from prometheus_client import CollectorRegistry

from serve.chatwoot import KIND_MESSAGE, KIND_OPEN, ChatwootClient, handoff_after, message_payload, open_payload
from serve.outbox import Accepted, Duplicate, NewAction, Outbox, OutboxMetrics, OutboxStore, RetryPolicy

FAST = RetryPolicy(max_attempts=5, backoff_base_s=0.05, backoff_cap_s=0.2, jitter=0.0)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def message(conversation_id: int, text: str, account_id: int = 1) -> NewAction:
    return NewAction(f"chatwoot:{account_id}:{conversation_id}", KIND_MESSAGE,
                     message_payload(account_id, conversation_id, text))


class Harness:
    """An outbox over `path`, sending to `chatwoot` with the real Chatwoot client."""

    def __init__(self, path: Path, chatwoot: MockChatwoot, policy: RetryPolicy = FAST, *, timeout: float = 2.0,
                 token: str | None = None):
        self.store = OutboxStore(path)
        self.registry = CollectorRegistry()
        self.metrics = OutboxMetrics(self.registry, self.store)
        self.http = httpx.AsyncClient(timeout=timeout)
        client = ChatwootClient(chatwoot.url, token or chatwoot.token, self.http)
        self.outbox = Outbox(self.store, client.senders(), policy, self.metrics)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        """Stop sending; the store stays open for the test to inspect."""
        await self.outbox.stop()
        await self.http.aclose()


def test_delivered_exactly_once_after_three_failures(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.fail_next(3, 500)
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot)
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(7, "Your order shipped.")])
            assert await until(lambda: h.store.actions("sent"))
            await asyncio.sleep(0.3)  # room for a wrong second send
            await h.close()
            attempts = chatwoot.received("messages", ok_only=False)
            assert [r.status for r in attempts] == [500, 500, 500, 200]
            assert chatwoot.replies(1, 7) == ["Your order shipped."]
            assert attempts[-1].path == "/api/v1/accounts/1/conversations/7/messages"
            assert attempts[-1].headers["api_access_token"] == chatwoot.token
            assert attempts[-1].json == {"content": "Your order shipped.", "message_type": "outgoing", "private": False}
            [row] = h.store.actions()
            assert row["state"] == "sent" and row["attempts"] == 4
            assert h.metric("supportbot_outbox_retried_total", kind=KIND_MESSAGE) == 3
            assert h.metric("supportbot_outbox_sent_total", kind=KIND_MESSAGE) == 1

    run(scenario())


def test_timeouts_429_and_dropped_connections_are_retried(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.hang_s = 0.6
            chatwoot.fail_next(1, 429)
            chatwoot.fail_next(1, "disconnect")
            chatwoot.fail_next(1, "hang")
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, timeout=0.3)
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(1, "hello")])
            assert await until(lambda: h.store.actions("sent"))
            await h.close()
            assert [r.status for r in chatwoot.received("messages", ok_only=False)] == [429, -1, -1, 200]
            assert chatwoot.replies() == ["hello"]

    run(scenario())


def test_client_errors_are_not_retried_and_the_failure_is_recorded(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.unknown.add((1, 404))
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot)
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(404, "to nowhere")])
            assert await until(lambda: h.store.actions("failed"))
            await asyncio.sleep(0.3)
            await h.close()
            assert [r.status for r in chatwoot.received(ok_only=False)] == [404]
            [row] = h.store.actions()
            assert row["state"] == "failed" and row["attempts"] == 1 and row["last_error"].startswith("HTTP 404")
            assert h.metric("supportbot_outbox_failed_total", kind=KIND_MESSAGE) == 1
            assert h.metric("supportbot_outbox_retried_total", kind=KIND_MESSAGE) == 0

    run(scenario())


def test_a_wrong_token_is_a_401_and_not_retried(tmp_path):
    async def scenario():
        with MockChatwoot(token="right") as chatwoot:
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, token="wrong")
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(1, "hi")])
            assert await until(lambda: h.store.actions("failed"))
            await h.close()
            assert [r.status for r in chatwoot.received(ok_only=False)] == [401]
            assert "wrong" not in h.store.actions()[0]["last_error"]

    run(scenario())


def test_gives_up_after_max_attempts(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.fail_next(10, 503)
            policy = RetryPolicy(max_attempts=3, backoff_base_s=0.02, backoff_cap_s=0.05, jitter=0.0)
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, policy)
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(1, "hi")])
            assert await until(lambda: h.store.actions("failed"))
            await asyncio.sleep(0.2)
            await h.close()
            assert [r.status for r in chatwoot.received(ok_only=False)] == [503, 503, 503]
            [row] = h.store.actions()
            assert row["attempts"] == 3 and "503" in row["last_error"]
            assert h.metric("supportbot_outbox_failed_total", kind=KIND_MESSAGE) == 1
            assert h.metric("supportbot_outbox_retried_total", kind=KIND_MESSAGE) == 2

    run(scenario())


def test_in_order_per_conversation_and_a_backing_off_head_blocks_only_its_own(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.fail_next(2, 500, path_contains="/conversations/1/")
            policy = RetryPolicy(max_attempts=5, backoff_base_s=0.4, backoff_cap_s=0.4, jitter=0.0)
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, policy)
            await h.outbox.submit(["a"], [message(1, "A1"), message(1, "A2")])
            await h.outbox.submit(["b"], [message(2, "B1"), message(2, "B2")])
            await h.outbox.submit(["c"], [message(1, "A3"), NewAction("chatwoot:1:1", KIND_OPEN, open_payload(1, 1))])
            await h.outbox.submit(["d"], [message(2, "B3")])
            h.outbox.start()
            assert await until(lambda: len(h.store.actions("sent")) == 7)
            await h.close()
            assert chatwoot.replies(1, 1) == ["A1", "A2", "A3"]
            assert chatwoot.replies(1, 2) == ["B1", "B2", "B3"]
            ok = chatwoot.received()
            order = [r.json.get("content", "open") for r in ok]
            assert order.index("B3") < order.index("A1"), "conversation 2 waited for conversation 1's backoff"
            assert order[-1] == "open" and ok[-1].json == {"status": "open"}
            assert ok[-1].path.endswith("/conversations/1/toggle_status")

    run(scenario())


def test_pending_actions_resume_after_a_restart(tmp_path):
    path = tmp_path / "outbox.sqlite3"

    async def first_life(chatwoot: MockChatwoot):
        chatwoot.hang_s = 0.5
        chatwoot.fail_next(1, "hang")
        h = Harness(path, chatwoot, timeout=5.0)
        h.outbox.start()
        await h.outbox.submit(["d1"], [message(1, "one"), message(1, "two")])
        assert await until(lambda: chatwoot.received(ok_only=False))
        await h.outbox.stop(grace_s=0.05)  # the in-flight send is cut off; both stay pending
        await h.http.aclose()
        assert [a["state"] for a in h.store.actions()] == ["pending", "pending"]
        h.store.close()

    async def second_life(chatwoot: MockChatwoot):
        h = Harness(path, chatwoot)
        assert (await h.outbox.submit(["d1"], [message(1, "one")])) == Duplicate("d1", None)
        h.outbox.start()
        assert await until(lambda: len(h.store.actions("sent")) == 2)
        await asyncio.sleep(0.3)
        await h.close()

    with MockChatwoot() as chatwoot:
        run(first_life(chatwoot))
        assert chatwoot.replies() == []
        run(second_life(chatwoot))
        assert chatwoot.replies() == ["one", "two"]


def test_dedupe_keys_are_durable_atomic_and_pruned(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    store = OutboxStore(path)
    first = store.commit(["delivery:1", "message:9"], [message(1, "x")], now=1000.0, result={"reply": "x"})
    assert isinstance(first, Accepted) and len(first.action_ids) == 1
    again = store.commit(["delivery:2", "message:9"], [message(1, "x")], now=1001.0)
    assert again == Duplicate("message:9", {"reply": "x"})
    assert store.seen(["delivery:2"]) is None, "a refused delivery records none of its keys"
    store.close()
    store = OutboxStore(path)
    assert store.seen(["delivery:1"]) == Duplicate("delivery:1", {"reply": "x"})
    assert len(store.actions()) == 1
    store.mark_sent(first.action_ids[0], now=1002.0)
    assert store.prune(now=1000.0 + 50, retention_s=100) == 0
    assert store.prune(now=1002.0 + 101, retention_s=100) == 3  # two keys and the sent action
    assert store.seen(["delivery:1", "message:9"]) is None and store.actions() == []
    store.close()


def test_queue_depth_and_oldest_age_metrics(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot)
            await h.outbox.submit(["a"], [message(1, "one"), message(2, "two")])
            await asyncio.sleep(0.2)
            assert h.metric("supportbot_outbox_queue_depth") == 2
            assert h.metric("supportbot_outbox_oldest_pending_age_seconds") >= 0.2
            h.outbox.start()
            assert await until(lambda: len(h.store.actions("sent")) == 2)
            assert h.metric("supportbot_outbox_queue_depth") == 0
            assert h.metric("supportbot_outbox_oldest_pending_age_seconds") == 0
            await h.close()

    run(scenario())


def test_unknown_kinds_are_refused_before_anything_is_stored(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot)
            with pytest.raises(ValueError, match="no sender"):
                await h.outbox.submit(["k"], [NewAction("c", "carrier.pigeon", {})])
            assert h.store.seen(["k"]) is None
            await h.close()

    run(scenario())


def test_backoff_is_exponential_capped_jittered_and_honours_retry_after():
    policy = RetryPolicy(backoff_base_s=1.0, backoff_cap_s=10.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(1, retry_after=7.0) == 7.0
    assert policy.delay(1, retry_after=3600.0) == 10.0
    jittered = RetryPolicy(backoff_base_s=1.0, backoff_cap_s=10.0, jitter=0.5)
    assert all(1.0 <= jittered.delay(2) <= 2.0 for _ in range(50))  # up to half of 2 s is random


class FlakyStore(OutboxStore):
    """A store whose first `failures` attempts to mark an action sent fail (a full disk, say)."""

    failures = 2

    def mark_sent(self, action_id: int, *, now: float, receipt: str | None = None) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().mark_sent(action_id, now=now, receipt=receipt)


def test_a_delivered_action_whose_sent_mark_fails_is_never_sent_again(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot)
            h.store = FlakyStore(tmp_path / "outbox.sqlite3")
            h.outbox.store = h.store
            h.outbox.checkers = ChatwootClient(chatwoot.url, chatwoot.token, h.http).checkers()
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(1, "once"), message(1, "then me")])
            assert await until(lambda: len(h.store.actions("sent")) == 2)
            await asyncio.sleep(0.3)
            await h.close()
            assert chatwoot.replies() == ["once", "then me"]
            ids = [m["id"] for m in chatwoot.messages[(1, 1)]]
            assert [r["receipt"] for r in h.store.actions()] == [str(i) for i in ids], "receipts kept through the wait"

    run(scenario())


def test_a_reply_chatwoot_took_after_the_timeout_is_not_posted_again(tmp_path):
    """Chatwoot answers after the send timeout (it did create the message): the retry first lists the
    conversation's latest messages, finds the reply and records it as sent instead of posting it twice."""

    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.delay_s = 0.6  # every answer comes after the client's 0.3 s timeout
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, timeout=0.3)
            client = ChatwootClient(chatwoot.url, chatwoot.token, h.http)
            h.outbox.checkers = client.checkers()
            h.outbox.uncertain_delay_s = 0.5  # the check waits for a late answer to land
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(3, "Your parcel left our warehouse.")])
            assert await until(lambda: h.store.actions("sent"), timeout=15)
            await asyncio.sleep(1.0)  # room for a wrong second post
            await h.close()
            posts = chatwoot.received("messages", ok_only=False)
            assert len(posts) == 1, "posted once; the retry found it instead of posting again"
            assert chatwoot.replies(1, 3) == ["Your parcel left our warehouse."]
            assert chatwoot.received("list"), "the retry asked Chatwoot first"
            assert h.metric("supportbot_outbox_recovered_total", kind=KIND_MESSAGE) == 1
            [row] = h.store.actions()
            assert row["state"] == "sent"

    run(scenario())


def test_an_identical_earlier_reply_is_not_taken_for_a_lost_one(tmp_path):
    """The bot says the same thing twice in a row, within one second, and the second post gets no
    answer (Chatwoot created nothing, but the timed-out send may have arrived). The check before the
    retry must not take the first reply, already there with the same text and second, for the second
    one: both arrive. Chatwoot's message ids, recorded as receipts, tell them apart."""

    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.hang_s = 0.4
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, timeout=0.2)
            h.outbox.checkers = ChatwootClient(chatwoot.url, chatwoot.token, h.http).checkers()
            h.outbox.start()
            while time.time() % 1.0 > 0.3:  # both posts inside one of Chatwoot's one-second timestamps
                await asyncio.sleep(0.01)
            await h.outbox.submit(["d1"], [message(9, "Happy to help!")])
            assert await until(lambda: len(h.store.actions("sent")) == 1)
            chatwoot.fail_next(1, "hang", path_contains="/messages")
            await h.outbox.submit(["d2"], [message(9, "Happy to help!")])
            assert await until(lambda: len(h.store.actions("sent")) == 2)
            await asyncio.sleep(0.3)  # room for a wrong extra post
            await h.close()
            assert chatwoot.replies(1, 9) == ["Happy to help!", "Happy to help!"]
            assert chatwoot.received("list"), "the retry asked Chatwoot first"
            assert h.metric("supportbot_outbox_recovered_total", kind=KIND_MESSAGE) == 0
            first, second = h.store.actions()
            assert first["receipt"] and second["receipt"] and int(second["receipt"]) > int(first["receipt"])

    run(scenario())


def test_a_reply_that_never_arrived_is_sent_after_the_check(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.hang_s = 0.6
            chatwoot.fail_next(1, "hang")  # no answer and no message: the check finds nothing
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, timeout=0.3)
            h.outbox.checkers = ChatwootClient(chatwoot.url, chatwoot.token, h.http).checkers()
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(4, "hello")])
            assert await until(lambda: h.store.actions("sent"), timeout=15)
            await h.close()
            assert chatwoot.replies(1, 4) == ["hello"] and len(chatwoot.received("list")) == 1

    run(scenario())


class LockedOnceStore(OutboxStore):
    """A store whose first read of a conversation's last receipt fails (SQLite busy past its timeout;
    on PostgreSQL, a dropped connection)."""

    failures = 1

    def last_receipt(self, action):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return super().last_receipt(action)


def test_a_store_error_before_the_check_of_an_uncertain_reply_delays_it_and_does_not_fail_it(tmp_path):
    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.hang_s = 0.6
            chatwoot.fail_next(1, "hang")  # the first send times out: the reply is uncertain
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, timeout=0.3)
            h.store = LockedOnceStore(tmp_path / "outbox.sqlite3")
            h.outbox.store = h.store
            h.outbox.checkers = ChatwootClient(chatwoot.url, chatwoot.token, h.http).checkers()
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(5, "hello")])
            assert await until(lambda: h.store.actions("sent"), timeout=15)
            await h.close()
            assert h.store.failures == 0, "the read failed once"
            assert [row["state"] for row in h.store.actions()] == ["sent"], "no failed reply, no handoff"
            assert chatwoot.replies(1, 5) == ["hello"]

    run(scenario())


def test_retries_continue_to_the_horizon_then_the_conversation_goes_to_humans(tmp_path):
    """No attempt limit: a platform failing for longer than the horizon gets the reply given up and
    the conversation opened to agents ahead of anything else queued for it; counted and logged."""

    async def scenario():
        with MockChatwoot() as chatwoot:
            chatwoot.fail_next(40, 503, path_contains="/messages")
            policy = RetryPolicy(backoff_base_s=0.02, backoff_cap_s=0.05, jitter=0.0, horizon_s=0.6)
            h = Harness(tmp_path / "outbox.sqlite3", chatwoot, policy)
            h.outbox.handoff = handoff_after
            h.outbox.start()
            await h.outbox.submit(["d1"], [message(5, "first"), message(5, "second")])
            assert await until(lambda: chatwoot.received("toggle_status"), timeout=15)
            await asyncio.sleep(0.3)
            await h.close()
            failed = [r.status for r in chatwoot.received("messages", ok_only=False)]
            assert len(failed) > 5 and set(failed) == {503}, "retried until the horizon, not a fixed count"
            order = [r.path.rsplit("/", 1)[1] for r in chatwoot.received(ok_only=False) if r.method == "POST"]
            assert order.index("toggle_status") < len(order) - 1 or order[-1] == "toggle_status"
            rows = h.store.actions()
            first = next(r for r in rows if r["payload"].get("content") == "first")
            assert first["state"] == "failed"
            opened = next(r for r in rows if r["kind"] == KIND_OPEN)
            assert opened["state"] == "sent" and opened["priority"] == 1
            assert h.metric("supportbot_outbox_handoffs_total", kind=KIND_MESSAGE) >= 1

    run(scenario())


def test_a_version_2_outbox_file_gains_receipts_in_place_and_keeps_its_queue(tmp_path):
    path = tmp_path / "outbox.sqlite3"
    store = OutboxStore(path)
    store.commit(["d1"], [message(1, "queued before the upgrade")], now=time.time())
    store.close()
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE actions DROP COLUMN receipt")
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()
    store = OutboxStore(path)
    try:
        [row] = store.actions()
        assert row["state"] == "pending" and row["receipt"] is None
        store.mark_sent(row["id"], now=time.time(), receipt="41")
        assert store.actions()[0]["receipt"] == "41"
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == 3
    finally:
        store.close()
