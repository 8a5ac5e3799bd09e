"""Chat latency under bulk-classify load: does a customer wait behind /v1/classify? (issue 13, item 5)

    python bench/bench_fair_queue.py                       # default model, 60 s of chat per phase
    python bench/bench_fair_queue.py --model DIR --chats 300 --bulk-clients 3 --no-record

One `supportbot serve` on loopback (rate limits off), two phases:
  1. chat alone: one client sends short chat messages one after another (`--chats` of them);
  2. chat under load: the same chat client while `--bulk-clients` clients each send maximal
     /v1/classify requests back to back (texts of about 2,000 characters, as many as
     max_request_chars allows: 50 per request by default).
Reported per phase: chat p50/p95/p99/max latency, and for phase 2 the classify requests answered
and their mean latency. The server gives chat and webhook messages priority over classify
chunks (serve/batching.py); without it a chat waited for every queued classify request.
Prints the figures and appends a section to BENCHMARKS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serve import _quantile, shop_messages, start_server, stop  # noqa: E402

LONG_TEXT = ("Hello, I ordered a lamp and a set of plates three weeks ago and only the plates arrived; the "
             "tracking page has said 'in transit' for ten days and nobody answers the phone. ")


def bulk_texts(count: int, chars: int = 1990) -> list[str]:
    """`count` distinct texts of about `chars` characters (under the 2,000-character message limit)."""
    return [(f"Case {i}. " + LONG_TEXT * (chars // len(LONG_TEXT) + 1))[:chars] for i in range(count)]


async def chat_client(url: str, messages: list[str], count: int, stop_when: asyncio.Event | None) -> list[float]:
    import httpx

    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for i in range(count):
            started = time.perf_counter()
            response = await http.post("/v1/chat", json={"session_id": f"fair-{i // 5}", "message": messages[i % len(messages)]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
    if stop_when is not None:
        stop_when.set()
    return latencies


async def bulk_client(url: str, texts: list[str], done: asyncio.Event, index: int) -> list[float]:
    import httpx

    latencies: list[float] = []
    address = {"X-Forwarded-For": f"198.51.100.{index + 1}"}  # each its own client (the server trusts loopback here)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=address) as http:
        while not done.is_set():
            started = time.perf_counter()
            response = await http.post("/v1/classify", json={"texts": texts, "top_k": 1})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            elif response.status_code in (429, 503):  # this client's text budget or the queue is full
                await asyncio.sleep(0.1)
            else:
                response.raise_for_status()
    return latencies


async def phase(url: str, messages: list[str], chats: int, bulk_clients: int, texts: list[str]) -> dict:
    done = asyncio.Event()
    bulk = [asyncio.create_task(bulk_client(url, texts, done, i)) for i in range(bulk_clients)]
    if bulk:
        await asyncio.sleep(1.0)  # the classify requests are queued and running before the first chat
    chat = await chat_client(url, messages, chats, done)
    done.set()
    bulk_latencies = [latency for task in await asyncio.gather(*bulk) for latency in task]
    ordered = sorted(chat)
    return {
        "chats": len(chat), "p50": _quantile(ordered, 0.5), "p95": _quantile(ordered, 0.95),
        "p99": _quantile(ordered, 0.99), "max": ordered[-1], "classify_answered": len(bulk_latencies),
        "classify_mean": sum(bulk_latencies) / len(bulk_latencies) if bulk_latencies else None,
    }


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory (default: the default shop model, trained if missing)")
    parser.add_argument("--chats", type=int, default=200, help="chat messages per phase, sent one after another")
    parser.add_argument("--bulk-clients", type=int, default=3, help="clients sending maximal classify requests")
    parser.add_argument("--texts", type=int, default=50, help="texts of ~2,000 characters per classify request")
    parser.add_argument("--threads", type=int, help="torch threads of the server (default: every core)")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    from supportbot.cli import ensure_default_model

    model = ensure_default_model(args.model)
    settings = {"SUPPORTBOT_API_KEY_RATE_LIMIT_PER_MINUTE": "0", "SUPPORTBOT_TRUSTED_PROXIES": "127.0.0.1"}
    if args.threads:
        settings["SUPPORTBOT_THREADS"] = str(args.threads)
    messages, texts = shop_messages(), bulk_texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(model, Path(tmp), "fair", settings)
        try:
            alone = asyncio.run(phase(url, messages, args.chats, 0, texts))
            loaded = asyncio.run(phase(url, messages, args.chats, args.bulk_clients, texts))
        finally:
            stop(process)

    rows = [("chat alone", alone), (f"chat + {args.bulk_clients} bulk classify clients", loaded)]
    table = ["| phase | chats | p50 | p95 | p99 | max | classify answered | classify mean |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        table.append(f"| {name} | {r['chats']} | {ms(r['p50'])} | {ms(r['p95'])} | {ms(r['p99'])} | {ms(r['max'])} | "
                     f"{r['classify_answered']} | {ms(r['classify_mean'])} |")
    body = "\n".join(table) + (f"\n\n{args.texts} texts of ~2,000 characters per classify request; chat messages "
                               "from the shop pack's test set, one at a time.\n")
    print(body)
    if args.record:
        from bench.record import append_section, command_line

        append_section("Fair queues: chat p99 under bulk classify", command_line("bench/bench_fair_queue.py"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
