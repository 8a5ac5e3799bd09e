"""Serving throughput and latency of POST /v1/chat, with and without request batching (issue 4).

    python bench/bench_serve.py                       # default model, 2,000 requests, 32 clients
    python bench/bench_serve.py --model DIR --requests 4000 --concurrency 64
    python bench/bench_serve.py --no-profile --no-record

In one run, on loopback:
  1. the batched server (`supportbot serve`, batch_max_size 32, batch_max_wait_ms 2) and
  2. a baseline server, the same code with batch_max_size 1: one forward pass per request,
each get the same load from a generator in another process (a bounded asyncio httpx client:
`--concurrency` clients in a closed loop, `--requests` chat messages from the shop pack's
test.yaml, five messages per conversation). Reported: throughput, p50/p95/p99 latency, errors,
mean texts per forward pass, and the throughput ratio batched / baseline.
  3. single-request model latency: IntentClassifier.predict([text]) one message at a time, p50/p95,
     with the servers stopped;
  4. a profile (pyinstrument) of a third, batched server under the same load: CPU seconds by
     thread (event loop, model thread, dialogue thread, torch's intra-op pool) and the event
     loop's call tree, plus a pyinstrument profile of one 32-text forward pass.
Prints the figures and appends a section to BENCHMARKS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As `supportbot serve` does, before torch loads OpenMP: how idle intra-op threads wait, here (the
# single-request latency) and in the profiled server child.
from supportbot.cli import set_serving_openmp  # noqa: E402

set_serving_openmp()

PYTHON = sys.executable


def omp_settings() -> str:
    """How idle OpenMP threads wait, as the environment set it when torch loaded."""
    return (f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset (active)')}, "
            f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")

WARMUP_REQUESTS = 100
MESSAGES_PER_SESSION = 5


# ---------------------------------------------------------------------------- messages


def shop_messages() -> list[str]:
    """Realistic customer messages: every example of the shop pack's held-out test set."""
    import yaml

    from bot.domains import pack_path

    pack = yaml.safe_load((pack_path("shop") / "test.yaml").read_text(encoding="utf-8"))
    texts = [text for spec in pack["intents"].values() for text in spec["examples"]]
    texts += list(pack.get("out_of_scope") or [])
    return [str(t) for t in texts]


# ---------------------------------------------------------------------------- load generator (child process)


async def _load(url: str, requests: int, concurrency: int, messages: list[str], tag: str) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        for n in counter:  # a shared iterator bounds the total
            text = messages[n % len(messages)]
            session = f"{tag}-{worker}-{n // MESSAGES_PER_SESSION}"
            started = time.perf_counter()
            try:
                response = await http.post("/v1/chat", json={"session_id": session, "message": text})
                key = str(response.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            latencies.append(time.perf_counter() - started)
            statuses[key] = statuses.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(w, http) for w in range(concurrency)])
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "throughput": len(latencies) / elapsed,
        "p50_ms": 1000 * _quantile(latencies, 0.50),
        "p95_ms": 1000 * _quantile(latencies, 0.95),
        "p99_ms": 1000 * _quantile(latencies, 0.99),
        "statuses": statuses,
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation in anyone's favour)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


def load_main(args: argparse.Namespace) -> int:
    messages = shop_messages()
    asyncio.run(_load(args.load, WARMUP_REQUESTS, args.concurrency, messages, "warm"))
    result = asyncio.run(_load(args.load, args.requests, args.concurrency, messages, f"run{os.getpid()}"))
    Path(args.out).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------- profiled server (child process)


def profiled_server_main(args: argparse.Namespace) -> int:
    """A batched server whose event loop runs under pyinstrument; on SIGINT it writes the profile
    and the CPU seconds each thread used."""
    import uvicorn
    from pyinstrument import Profiler

    from serve.app import create_app
    from serve.settings import load_settings

    settings = load_settings(None, model=args.model, port=args.port, data_dir=args.data_dir,
                             rate_limit_per_minute=0, max_queue=100_000)
    app = create_app(settings)
    marks: dict[str, dict[str, float]] = {}
    tasks: list[asyncio.Task] = []

    async def mark_when_ready(runtime) -> None:  # CPU from here on is serving, not loading
        async def wait() -> None:
            await runtime.wait_ready(timeout=600)
            marks["ready"] = _thread_cpu()

        tasks.append(asyncio.get_running_loop().create_task(wait()))

    async def mark_at_shutdown(_runtime) -> None:  # on_shutdown runs before the batcher's threads end
        marks["end"] = _thread_cpu()

    app.state.runtime.on_startup(mark_when_ready)
    app.state.runtime.on_shutdown(mark_at_shutdown)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                           access_log=False, log_config=None))
    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on, once it has shut down
        pass
    session = profiler.stop()
    Path(args.out).write_text(json.dumps({
        "tree": profiler.output_text(color=False, show_all=False),
        "tree_all": profiler.output_text(color=False, show_all=True),
        "event_loop": _by_component(session.root_frame()),
        "threads": {k: v - marks["ready"].get(k, 0.0) for k, v in marks["end"].items()
                    if v - marks["ready"].get(k, 0.0) > 0.005},
    }))
    return 0


# Where the event loop's samples fall, by the library that holds the frame (first match wins).
COMPONENTS = (
    ("asyncio/runners.py", "waiting for I/O (the uvloop loop itself)"),
    ("uvloop", "waiting for I/O (the uvloop loop itself)"),
    ("uvicorn", "uvicorn + httptools (HTTP parsing, protocol)"),
    ("starlette", "starlette (routing, middleware, responses)"),
    ("fastapi", "fastapi (dependencies, request parsing, serialisation)"),
    ("pydantic", "pydantic (validation)"),
    ("/serve/", "supportbot serve/ (routes, batcher, logs, protections)"),
    ("prometheus_client", "prometheus_client (metrics)"),
    ("logging", "logging"),
    ("json", "json"),
    ("asyncio", "asyncio"),
    ("concurrent", "thread hand-off (concurrent.futures)"),
)


def _by_component(root) -> dict[str, float]:
    """Seconds of self time per component over the whole frame tree."""
    totals: dict[str, float] = {}
    stack = [(root, "")] if root is not None else []
    while stack:
        frame, parent_path = stack.pop()
        # pyinstrument's synthetic "[self]"/"[await]" leaves have no file: their time is the parent's
        path = f"{frame.file_path} {frame.function}" if frame.file_path and not frame.is_synthetic else parent_path
        own = frame.time - sum(child.time for child in frame.children)
        label = next((name for key, name in COMPONENTS if key in path), "other (python stdlib, h11, ...)")
        totals[label] = totals.get(label, 0.0) + max(own, 0.0)
        stack.extend((child, path) for child in frame.children)
    return totals


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process, by Python thread name where known."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        name = names.get(int(task.name), "")
        if name == "MainThread":
            label = "event loop (HTTP, validation, JSON, logging)"
        elif name.startswith("supportbot-model"):
            label = "model thread (tokenise, encoder, head)"
        elif name.startswith("supportbot-finish"):
            label = "dialogue thread (policy, responses, SQLite)"
        elif name:
            label = f"other Python threads ({name})"
        else:
            label = "torch intra-op pool and other native threads"
        totals[label] = totals.get(label, 0.0) + seconds
    return totals


# ---------------------------------------------------------------------------- orchestration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server at {url} exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} was not ready after {timeout:.0f} s")


def start_server(model: Path, workdir: Path, name: str, env_settings: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "SUPPORTBOT_DATA_DIR": str(workdir / name), "SUPPORTBOT_RATE_LIMIT_PER_MINUTE": "0",
           "SUPPORTBOT_MAX_QUEUE": "100000", **env_settings}
    log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 (the server process writes to it for its whole life)
    process = subprocess.Popen(
        [str(Path(PYTHON).parent / "supportbot"), "serve", "--model", str(model), "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    return process, url


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_load(url: str, requests: int, concurrency: int, workdir: Path, name: str) -> dict:
    out = workdir / f"{name}-load.json"
    subprocess.run([PYTHON, __file__, "--load", url, "--requests", str(requests), "--concurrency", str(concurrency),
                    "--out", str(out)], check=True, cwd=ROOT)
    return json.loads(out.read_text())


def batch_stats(url: str) -> float:
    """Mean texts per forward pass so far, from the server's own /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        for key in ("supportbot_batch_size_sum", "supportbot_batch_size_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[1])
    return values["supportbot_batch_size_sum"] / max(values["supportbot_batch_size_count"], 1.0)


def measure_server(model: Path, workdir: Path, name: str, settings: dict[str, str], requests: int,
                   concurrency: int) -> dict:
    process, url = start_server(model, workdir, name, settings)
    try:
        result = run_load(url, requests, concurrency, workdir, name)
        result["mean_batch"] = batch_stats(url)
    finally:
        stop(process)
    return result


def model_latency(model: Path, threads: int | None, n: int = 300) -> dict:
    """IntentClassifier.predict([text]) one message at a time (after 20 warm-up calls), on the servers' threads."""
    import torch

    from bot.classifier import IntentClassifier

    classifier = IntentClassifier.from_bundle(model, num_threads=threads)
    messages = shop_messages()
    for text in messages[:20]:
        classifier.predict([text])
    timings = []
    for text in (messages * (n // len(messages) + 1))[:n]:
        started = time.perf_counter()
        classifier.predict([text])
        timings.append(time.perf_counter() - started)
    batch = messages[:32]
    batch_timings = []
    for _ in range(20):
        started = time.perf_counter()
        classifier.predict(batch)
        batch_timings.append(time.perf_counter() - started)
    timings.sort()
    return {"p50_ms": 1000 * _quantile(timings, 0.5), "p95_ms": 1000 * _quantile(timings, 0.95),
            "batch32_per_text_ms": 1000 * statistics.median(batch_timings) / len(batch), "classifier": classifier,
            "threads": torch.get_num_threads()}


def profile_forward_pass(classifier) -> str:
    from pyinstrument import Profiler

    batch = shop_messages()[:32]
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for _ in range(20):
        classifier.predict(batch)
    profiler.stop()
    return profiler.output_text(color=False, show_all=False)


def profile_server(model: Path, workdir: Path, requests: int, concurrency: int) -> dict:
    port = free_port()
    out = workdir / "profile.json"
    log = open(workdir / "profiled.log", "w")  # noqa: SIM115 (the server process writes to it for its whole life)
    process = subprocess.Popen(
        [PYTHON, __file__, "--serve-profiled", "--model", str(model), "--port", str(port), "--out", str(out),
         "--data-dir", str(workdir / "profiled")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        load = run_load(url, requests, concurrency, workdir, "profiled")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    profile = json.loads(out.read_text())
    profile["load"] = load
    return profile


def trim_tree(tree: str, lines: int = 45) -> str:
    body = [line for line in tree.splitlines() if line.strip()]
    return "\n".join(body[:lines])


def orchestrate(args: argparse.Namespace) -> int:
    from supportbot.cli import ensure_default_model

    model = ensure_default_model(args.model).resolve()
    precision = json.loads((model / "bundle.json").read_text())["encoder"].get("precision", "fp32")
    load_before = os.getloadavg()[0]
    batched_settings = {"SUPPORTBOT_BATCH_MAX_SIZE": str(args.batch_size),
                        "SUPPORTBOT_BATCH_MAX_WAIT_MS": str(args.max_wait_ms)}
    baseline_settings = {"SUPPORTBOT_BATCH_MAX_SIZE": "1", "SUPPORTBOT_BATCH_MAX_WAIT_MS": "0"}
    if args.threads:
        for settings in (batched_settings, baseline_settings):
            settings["SUPPORTBOT_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        print(f"model {model}; {args.requests} requests, {args.concurrency} concurrent clients", file=sys.stderr)
        print("baseline server (one forward pass per request)...", file=sys.stderr)
        baseline = measure_server(model, workdir, "baseline", baseline_settings, args.requests, args.concurrency)
        print(f"  {baseline['throughput']:.1f} req/s", file=sys.stderr)
        print("batched server...", file=sys.stderr)
        batched = measure_server(model, workdir, "batched", batched_settings, args.requests, args.concurrency)
        print(f"  {batched['throughput']:.1f} req/s", file=sys.stderr)
        print("single-request model latency...", file=sys.stderr)
        single = model_latency(model, args.threads)
        forward_tree = profile_forward_pass(single.pop("classifier")) if args.profile else None
        profile = None
        if args.profile:
            print("profiled batched server...", file=sys.stderr)
            profile = profile_server(model, workdir, args.requests, args.concurrency)

    ratio = batched["throughput"] / baseline["throughput"]
    load_after = os.getloadavg()[0]
    rows = [
        ("batched (max 32, wait 2 ms)" if (args.batch_size, args.max_wait_ms) == (32, 2.0)
         else f"batched (max {args.batch_size}, wait {args.max_wait_ms:g} ms)", batched),
        ("baseline (1 text per pass)", baseline),
    ]
    table = ["| server | req/s | p50 ms | p95 ms | p99 ms | texts per pass | non-200 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        errors = sum(v for k, v in r["statuses"].items() if k != "200")
        table.append(f"| {label} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} "
                     f"| {r['mean_batch']:.1f} | {errors} |")
    lines = [
        f"Model `{model.name}` ({precision}). "
        f"`POST /v1/chat`, {args.requests:,} requests after {WARMUP_REQUESTS} warm-up, {args.concurrency} concurrent "
        f"clients (bounded asyncio httpx, another process), messages from the shop pack's test.yaml, "
        f"{MESSAGES_PER_SESSION} per session; servers run `supportbot serve` (access log on, rate limit off), "
        f"torch threads {args.threads or 'default (every core)'}, {omp_settings()}. The machine is shared: "
        f"1-minute load average "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end (2 cores; other jobs included).",
        "",
        *table,
        "",
        f"- throughput ratio batched / baseline: **{ratio:.2f}x** (target >= 5x)",
        f"- single-request model latency (IntentClassifier.predict, one text, {single['threads']} torch thread(s)): "
        f"p50 **{single['p50_ms']:.2f} ms**, "
        f"p95 {single['p95_ms']:.2f} ms (target p50 <= 5 ms); in a batch of 32: {single['batch32_per_text_ms']:.2f} ms "
        "per text",
    ]
    if profile is not None:
        threads = profile["threads"]
        total = sum(threads.values())
        lines += ["", f"Profile: a third batched server under the same load ({profile['load']['throughput']:.1f} req/s "
                  "with pyinstrument sampling its event loop). CPU seconds by thread:", "",
                  "| thread | CPU s | share |", "|---|---:|---:|"]
        for label, seconds in sorted(threads.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {label} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
        loop = profile["event_loop"]
        idle = next((v for k, v in loop.items() if k.startswith("waiting")), 0.0)
        busy = sum(loop.values()) - idle
        lines += ["", f"Event loop thread, by component (pyinstrument self time; {busy:.1f} s busy, {idle:.1f} s "
                  "waiting):", "", "| component | s | share of busy |", "|---|---:|---:|"]
        for label, seconds in sorted(loop.items(), key=lambda kv: -kv[1]):
            if not label.startswith("waiting"):
                lines.append(f"| {label} | {seconds:.2f} | {100 * seconds / max(busy, 1e-9):.0f}% |")
        lines += ["", "One 32-text forward pass (pyinstrument, 20 passes):", "", "```",
                  trim_tree(forward_tree or "", 30), "```"]
    body = "\n".join(lines)
    print(body)
    if args.record:
        from bench.record import append_section, command_line

        append_section("Serving: batched vs unbatched /v1/chat", command_line("bench/bench_serve.py"), body)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory (default: the default shop model, trained if missing)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="batch_max_size of the batched server")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="batch_max_wait_ms of the batched server")
    parser.add_argument("--threads", type=int, help="torch threads of the servers (SUPPORTBOT_THREADS; default: every core)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not append to BENCHMARKS.md")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # child: load generator
    parser.add_argument("--serve-profiled", action="store_true", help=argparse.SUPPRESS)  # child: profiled server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return load_main(args)
    if args.serve_profiled:
        return profiled_server_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
