"""Request batching: concurrent requests share one forward pass, which runs off the event loop.

Two queues, so a customer is never stuck behind a bulk job: chat and webhook messages
(interactive) go before `/v1/classify` texts (bulk) into every forward pass, and a bulk request
arrives here already cut into small chunks (`split_bulk`), so a chat message waits at most for
the one chunk whose pass is running, not for a whole 256-text request. `ClientBudget` bounds the
text one client may have waiting at once.

Requests queue `Job`s (one or more texts each). One worker task takes the first job, waits up
to `max_wait_ms` for more (or until `max_size` texts are gathered), then runs the model once on
all texts in the model thread. While that pass runs, the next batch gathers, so under load
batches fill without waiting. Each job's `finish(model, predictions)` (e.g. the dialogue step
that writes the session) runs afterwards in a second thread, in batch order, so the model
thread goes straight back to the next batch. The model for each batch is whatever `predict`
returns, so a hot reload never mixes two models inside one batch or one reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from bot.classifier import Prediction
from bot.errors import SupportbotError

from .metrics import Metrics

log = logging.getLogger("supportbot.serve")

T = TypeVar("T")

# predict(texts) -> (the model that ran, one prediction per text)
PredictFn = Callable[[list[str]], tuple[Any, list[Prediction]]]
# finish(model, predictions of this job's texts) -> the job's result
FinishFn = Callable[[Any, list[Prediction]], T]


class QueueFull(SupportbotError):
    """More texts are waiting than `max_queue`: the caller should answer 503 and retry later."""


class BatcherStopped(SupportbotError):
    """The batcher is shutting down and takes no more work."""


@dataclass
class Job(Generic[T]):
    texts: list[str]
    finish: FinishFn
    future: asyncio.Future
    bulk: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers jobs into forward passes of at most `max_size` texts (a larger single job runs alone)."""

    def __init__(self, predict: PredictFn, *, max_size: int, max_wait_ms: float, max_queue: int, metrics: Metrics):
        self._predict = predict
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._metrics = metrics
        self._jobs: deque[Job] = deque()  # interactive: chat and webhook messages
        self._bulk: deque[Job] = deque()  # bulk: chunks of classify requests, after every interactive job
        self._queued_texts = 0
        self._wakeup = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="supportbot-model")
        self._finish_thread = ThreadPoolExecutor(1, thread_name_prefix="supportbot-finish")
        self._worker: asyncio.Task | None = None
        self._inflight: list[Job] = []  # the batch whose forward pass is running
        self._finishing: set[asyncio.Task] = set()
        self._stopping = False

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="supportbot-batcher")

    async def submit(self, texts: Sequence[str], finish: FinishFn[T], *, bulk: bool = False) -> T:
        """Queue `texts`; returns `finish(model, predictions)` once their batch has run.
        `bulk` jobs wait until no interactive job is queued."""
        [result] = await self.submit_all([texts], finish, bulk=bulk)
        return result

    async def submit_all(self, chunks: Sequence[Sequence[str]], finish: FinishFn[T], *, bulk: bool = False) -> list[T]:
        """Queue every chunk as its own job, or none: QueueFull when they do not all fit. One request's
        chunks are admitted together, so a refused request leaves no chunk behind to run for nobody."""
        if self._stopping or self._worker is None:
            raise BatcherStopped("the server is shutting down")
        if self._queued_texts + sum(len(chunk) for chunk in chunks) > self.max_queue:
            raise QueueFull(f"{self._queued_texts} texts are waiting for the model")
        loop = asyncio.get_running_loop()
        jobs: list[Job[T]] = [Job(list(chunk), finish, loop.create_future(), bulk) for chunk in chunks]
        for job in jobs:  # no await between the check and here: nothing else is queued in between
            (self._bulk if bulk else self._jobs).append(job)
            self._queued_texts += len(job.texts)
        self._wakeup.set()
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._inflight = await self._gather(loop)
            texts = [text for job in batch for text in job.texts]
            started = time.perf_counter()
            for job in batch:
                self._metrics.queue_wait.observe(started - job.enqueued)
            try:
                model, predictions = await loop.run_in_executor(self._model_thread, self._predict, texts)
            except Exception as exc:  # the model failed: every job of this batch gets the error
                log.error("forward pass of %d texts failed: %s", len(texts), type(exc).__name__)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                self._inflight = []
                continue
            self._metrics.model_latency.observe(time.perf_counter() - started)
            self._metrics.batch_size.observe(len(texts))
            task = loop.create_task(self._finish(loop, batch, model, predictions))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
            self._inflight = []

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[Job]:
        """Wait for a first job, then for more until the batch is full or `max_wait` has passed.
        Interactive jobs are taken first, together; a bulk chunk runs alone, so the next
        interactive job waits for one chunk at most."""
        while not (self._jobs or self._bulk):
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._take()]
        if batch[0].bulk:
            return batch
        size = len(batch[0].texts)
        deadline = loop.time() + self.max_wait
        while size < self.max_size:
            queue = self._jobs
            if not queue:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
                continue
            if size + len(queue[0].texts) > self.max_size:
                break
            job = self._take()
            batch.append(job)
            size += len(job.texts)
        return batch

    def _take(self) -> Job:
        job = self._jobs.popleft() if self._jobs else self._bulk.popleft()  # interactive first
        self._queued_texts -= len(job.texts)
        return job

    async def _finish(self, loop: asyncio.AbstractEventLoop, batch: list[Job], model: Any, predictions: list[Prediction]) -> None:
        results = await loop.run_in_executor(self._finish_thread, _finish_all, batch, model, predictions)
        for job, (ok, value) in zip(batch, results):
            if job.future.done():  # the client went away; its reply was still recorded
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish queued work (up to `timeout` seconds), then stop the worker and both threads."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while (self._jobs or self._bulk or self._inflight or self._finishing) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for job in [*self._inflight, *self._jobs, *self._bulk]:  # only left over when the drain timed out
            if not job.future.done():
                job.future.set_exception(BatcherStopped("the server is shutting down"))
        self._jobs.clear()
        self._bulk.clear()
        self._model_thread.shutdown(wait=True)
        self._finish_thread.shutdown(wait=True)


def _finish_all(batch: list[Job], model: Any, predictions: list[Prediction]) -> list[tuple[bool, Any]]:
    """Each job's finish step on its own slice of predictions; one job's error stays with that job."""
    results: list[tuple[bool, Any]] = []
    offset = 0
    for job in batch:
        mine = predictions[offset : offset + len(job.texts)]
        offset += len(job.texts)
        try:
            results.append((True, job.finish(model, mine)))
        except Exception as exc:
            results.append((False, exc))
    return results


def split_bulk(texts: Sequence[str], *, max_texts: int, max_chars: int) -> list[list[str]]:
    """`texts` cut, in order, into chunks of at most `max_texts` texts and (a single longer text
    aside) `max_chars` characters: the unit a bulk request waits in line with."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    chars = 0
    for text in texts:
        if chunk and (len(chunk) >= max_texts or chars + len(text) > max_chars):
            chunks.append(chunk)
            chunk, chars = [], 0
        chunk.append(text)
        chars += len(text)
    if chunk:
        chunks.append(chunk)
    return chunks


class ClientBusy(Exception):
    """The client already has as much text waiting for the model as it may."""


class ClientBudget:
    """Characters each client has waiting for (or in) the model, at most `max_chars` each.

    `hold(client, chars)` reserves them for the duration of a `with` block, or raises ClientBusy.
    Clients without text in flight take no memory."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self._held: dict[str, int] = {}

    @contextmanager
    def hold(self, client: str, chars: int) -> Iterator[None]:
        held = self._held.get(client, 0)
        if held and held + chars > self.max_chars:
            raise ClientBusy(f"{held:,} characters of this client are already waiting for the model")
        self._held[client] = held + chars
        try:
            yield
        finally:
            left = self._held[client] - chars
            if left:
                self._held[client] = left
            else:
                del self._held[client]
