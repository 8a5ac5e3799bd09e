"""Replicas and PostgreSQL (issue 9): chat throughput by workers and backend, outbox deliveries per
second by replicas, failover time after a SIGKILL, and the outbox's crash window.

    python bench/bench_replicas.py                        # default model, everything
    python bench/bench_replicas.py --model DIR --requests 1500 --actions 2000 --no-record

All on loopback, with a throwaway PostgreSQL cluster (tests/pg_cluster.py: Debian's initdb/pg_ctl)
and `supportbot serve` processes:
  1. /v1/chat throughput and latency (bench_serve's load generator, in its own process) with
     `--workers 1` and `--workers 2`, each on SQLite (no database URL) and on PostgreSQL;
  2. outbox deliveries per second to a local receiver (tests/mock_chatwoot.py) with 1 and 2
     replicas sharing the database: `--actions` replies queued at once over 100 conversations,
     timed until the database records the last one sent;
  3. failover: two replicas deliver to a receiver that takes 0.2 s per reply; one replica is
     SIGKILLed while it holds leases; timed from the kill until every orphaned action is sent (the
     lease, `--lease` seconds, dominates; the check before a resend runs for each orphan);
  4. the crash window: how long after the receiver's 2xx the "sent" mark is committed (the only
     moment a crash can make a send repeat, for receivers that cannot be asked), per backend;
  5. the slow-platform window (issue 13.4): a receiver that creates each reply only after a delay
     past our send timeout; how many replies end up posted twice, by delay, with the check before
     a resend (it waits one send timeout, then lists the conversation's messages).
Prints one table per part and appends them to BENCHMARKS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.bench_serve import run_load  # noqa: E402
from bench.record import append_section, command_line  # noqa: E402

TOKEN = "bench-token"


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def chat_throughput(model: Path, url: str, work: Path, requests: int, concurrency: int) -> list[list[object]]:
    from replicas import Replica

    rows = []
    for backend, env in (("SQLite", {}), ("PostgreSQL", {"SUPPORTBOT_DATABASE_URL": url})):
        for workers in (1, 2):
            name = f"chat-{backend.lower()}-{workers}"
            replica = Replica(name, model, work / name, {**env, "SUPPORTBOT_WEB_PAGE": "false"}, workers=workers)
            replica.start().wait_ready(timeout=600)
            _all_workers_ready(replica.url)
            try:
                result = run_load(replica.url, requests, concurrency, work, name)
            finally:
                replica.stop()
            errors = ", ".join(f"{v} x {k}" for k, v in sorted(result["statuses"].items()) if k != "200") or "0"
            rows.append([backend, workers, f"{result['throughput']:.0f}", f"{result['p50_ms']:.1f}",
                         f"{result['p99_ms']:.1f}", errors])
            print(f"  chat {backend} workers={workers}: {result['throughput']:.0f} req/s", flush=True)
    return rows


def _all_workers_ready(url: str, in_a_row: int = 30) -> None:
    """/readyz answered 200 that many times in a row: every worker process behind the port is warm
    (one /readyz reaches one worker; a worker still loading answers 503 not_ready)."""
    import httpx

    ok, deadline = 0, time.monotonic() + 600
    while ok < in_a_row and time.monotonic() < deadline:
        ok = ok + 1 if httpx.get(f"{url}/readyz", timeout=10).status_code == 200 else 0
        time.sleep(0.05)


def _queue(url: str, actions: int, conversations: int, first: int) -> None:
    from serve.chatwoot import KIND_MESSAGE, message_payload
    from serve.database import open_database
    from serve.outbox import NewAction
    from serve.postgres import PostgresOutboxStore

    engine = open_database(url)
    store = PostgresOutboxStore(engine)
    batch = [NewAction(f"chatwoot:1:{first + i % conversations}", KIND_MESSAGE,
                       message_payload(1, first + i % conversations, f"reply {i}")) for i in range(actions)]
    store.commit([], batch, now=time.time())
    engine.dispose()


def _sent(url: str) -> int:
    from sqlalchemy import text

    from serve.database import open_database

    engine = open_database(url)
    with engine.connect() as conn:
        count = int(conn.execute(text("SELECT COUNT(*) FROM actions WHERE state = 'sent'")).scalar_one())
    engine.dispose()
    return count


def outbox_rate(model: Path, cluster, work: Path, actions: int) -> list[list[object]]:
    from mock_chatwoot import MockChatwoot
    from replicas import Replica

    rows = []
    for count in (1, 2):
        url = cluster.create_database(f"outbox_{count}")
        with MockChatwoot(TOKEN) as receiver:
            env = {"SUPPORTBOT_DATABASE_URL": url, "SUPPORTBOT_CHATWOOT_URL": receiver.url,
                   "SUPPORTBOT_CHATWOOT_TOKEN": TOKEN, "SUPPORTBOT_OUTBOX_CONCURRENCY": "32"}
            replicas = [Replica(f"outbox-{count}-{i}", model, work / f"outbox-{count}-{i}", env) for i in range(count)]
            for r in replicas:
                r.start()
            for r in replicas:
                r.wait_ready(timeout=600)
            started = time.perf_counter()
            _queue(url, actions, 100, 1)
            while len(receiver.received("messages")) < actions and time.perf_counter() - started < 600:
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            for r in replicas:
                r.stop()
            sent = _sent(url)
            doubled = len(receiver.received("messages")) - actions
        rows.append([count, actions, f"{elapsed:.1f}", f"{sent / elapsed:.0f}", doubled])
        print(f"  outbox replicas={count}: {sent / elapsed:.0f} deliveries/s", flush=True)
    return rows


def failover(model: Path, cluster, work: Path, lease: float) -> list[list[object]]:
    from mock_chatwoot import MockChatwoot
    from replicas import Replica

    url = cluster.create_database("failover")
    with MockChatwoot(TOKEN) as receiver:
        receiver.delay_s = 0.2
        env = {"SUPPORTBOT_DATABASE_URL": url, "SUPPORTBOT_CHATWOOT_URL": receiver.url,
               "SUPPORTBOT_CHATWOOT_TOKEN": TOKEN, "SUPPORTBOT_OUTBOX_LEASE_S": str(lease),
               "SUPPORTBOT_OUTBOX_SEND_TIMEOUT_S": str(min(2.0, lease / 2)), "SUPPORTBOT_OUTBOX_CONCURRENCY": "16"}
        replicas = [Replica(f"failover-{i}", model, work / f"failover-{i}", env) for i in range(2)]
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(timeout=600)
        total = 300
        _queue(url, total, 60, 9000)
        time.sleep(1.0)  # both replicas are sending, each holds leases
        from sqlalchemy import text

        from serve.database import open_database

        engine = open_database(url)
        with engine.connect() as conn:
            owners = dict(conn.execute(text(
                "SELECT lease_owner, COUNT(*) FROM actions WHERE state = 'pending' AND lease_owner IS NOT NULL "
                "GROUP BY lease_owner")).fetchall())
        victim = replicas[1].process
        assert victim is not None
        orphans = sum(n for owner, n in owners.items() if f":{victim.pid}:" in str(owner))
        killed_at = time.perf_counter()
        replicas[1].kill()
        while time.perf_counter() - killed_at < 300:
            with engine.connect() as conn:
                left = int(conn.execute(text("SELECT COUNT(*) FROM actions WHERE state = 'pending'")).scalar_one())
            if left == 0:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - killed_at
        engine.dispose()
        replicas[0].stop()
        posted = receiver.received("messages")
        doubled = len(posted) - len({r.json["content"] for r in posted})
    print(f"  failover: all delivered {elapsed:.1f} s after the SIGKILL (lease {lease:g} s)", flush=True)
    return [[f"{lease:g}", len(owners), orphans, f"{elapsed:.1f}", doubled]]


def crash_window(url: str, work: Path, samples: int = 400) -> list[list[object]]:
    from serve.chatwoot import KIND_MESSAGE, message_payload
    from serve.database import open_database
    from serve.outbox import NewAction, OutboxStore
    from serve.postgres import PostgresOutboxStore

    rows = []
    engine = open_database(url)
    for name, store in (("SQLite", OutboxStore(work / "window.sqlite3")), ("PostgreSQL", PostgresOutboxStore(engine))):
        accepted = store.commit([], [NewAction(f"c{i}", KIND_MESSAGE, message_payload(1, i, "x"))
                                     for i in range(samples)], now=time.time())
        durations = []
        for action_id in accepted.action_ids:
            started = time.perf_counter()
            store.mark_sent(action_id, now=time.time())
            durations.append(1000 * (time.perf_counter() - started))
        durations.sort()
        rows.append([name, samples, f"{statistics.median(durations):.2f}", f"{durations[int(0.99 * samples) - 1]:.2f}"])
        store.close()
    engine.dispose()
    return rows


def slow_platform(work: Path, timeout_s: float = 0.3, replies: int = 10) -> list[list[object]]:
    """Doubles by platform delay: the check waits `timeout_s` after a timed-out send, then looks."""
    import asyncio

    import httpx
    from mock_chatwoot import MockChatwoot

    from serve.chatwoot import KIND_MESSAGE, ChatwootClient, message_payload
    from serve.outbox import NewAction, Outbox, OutboxStore, RetryPolicy

    rows = []
    for factor in (0.5, 1.5, 2.0, 2.5, 3.0, 4.0):
        delay = factor * timeout_s

        async def scenario(delay: float = delay, factor: float = factor) -> int:
            with MockChatwoot(TOKEN) as receiver:
                receiver.delay_s = delay
                store = OutboxStore(work / f"slow-{factor}.sqlite3")
                async with httpx.AsyncClient(timeout=timeout_s) as http:
                    client = ChatwootClient(receiver.url, TOKEN, http)
                    box = Outbox(store, client.senders(), RetryPolicy(backoff_base_s=0.05, backoff_cap_s=0.2, jitter=0.0),
                                 checkers=client.checkers(), uncertain_delay_s=timeout_s, concurrency=replies)
                    box.start()
                    await box.submit([], [NewAction(f"c{i}", KIND_MESSAGE, message_payload(1, i, f"reply {i}"))
                                          for i in range(replies)])
                    deadline = time.monotonic() + 60
                    while len(store.actions("sent")) < replies and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(delay + 0.2)  # late posts land
                    await box.stop()
                store.close()
                return len(receiver.received("messages")) - replies

        doubled = asyncio.run(scenario())
        rows.append([f"{timeout_s:g}", f"{delay:.2f} ({factor:g}x)", replies, doubled])
        print(f"  slow platform delay {delay:.2f} s: {doubled} of {replies} posted twice", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory (default: the default shop model, trained if missing)")
    parser.add_argument("--requests", type=int, default=1500, help="chat requests per configuration")
    parser.add_argument("--concurrency", type=int, default=32, help="chat clients")
    parser.add_argument("--actions", type=int, default=2000, help="outbox actions per replica count")
    parser.add_argument("--lease", type=float, default=5.0, help="outbox lease seconds in the failover run")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    from pg_cluster import PostgresCluster

    from supportbot.cli import ensure_default_model

    model = ensure_default_model(args.model).resolve()
    with PostgresCluster() as cluster, tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        work = Path(tmp)
        chat_url = cluster.create_database("chat")
        print("chat throughput ...", flush=True)
        chat = chat_throughput(model, chat_url, work, args.requests, args.concurrency)
        print("outbox deliveries ...", flush=True)
        outbox = outbox_rate(model, cluster, work, args.actions)
        print("failover ...", flush=True)
        fail = failover(model, cluster, work, args.lease)
        window = crash_window(cluster.create_database("window"), work)
        slow = slow_platform(work)
    body = "\n\n".join([
        f"/v1/chat, {args.requests} requests, {args.concurrency} clients (closed loop), per backend and workers:\n\n"
        + table(["backend", "workers", "req/s", "p50 ms", "p99 ms", "errors"], chat),
        f"Outbox deliveries to a local receiver (mock Chatwoot on loopback), {args.actions} replies over 100 "
        "conversations, PostgreSQL:\n\n" + table(["replicas", "actions", "seconds", "deliveries/s", "doubled"], outbox),
        "Failover: 2 replicas, 300 replies over 60 conversations, receiver 0.2 s per reply, one replica SIGKILLed "
        "while sending; seconds from the kill until every action is sent:\n\n"
        + table(["lease s", "replicas holding leases", "orphaned (leased by the killed one)", "seconds to all sent", "doubled"], fail),
        "Crash window: milliseconds from the receiver's 2xx to the committed 'sent' mark (mark_sent):\n\n"
        + table(["backend", "samples", "p50 ms", "p99 ms"], window),
        "Slow platform (issue 13.4): the receiver creates each reply after a delay, answering after our send "
        "timeout; replies posted twice out of 10, with the check before a resend:\n\n"
        + table(["send timeout s", "platform delay s", "replies", "posted twice"], slow),
    ])
    print()
    print(body)
    if not args.no_record:
        append_section("Replicas and PostgreSQL (bench_replicas.py)", command_line("bench/bench_replicas.py"), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
