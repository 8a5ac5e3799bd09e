"""Prometheus metrics of one app, on the app's own registry (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Request, model and batching metrics. Other parts register theirs on `registry`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "supportbot_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "supportbot_http_request_duration_seconds", "time to answer an HTTP request", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.predictions = Counter(
            "supportbot_predictions", "chat replies by predicted intent and action", ["intent", "action"], registry=r
        )
        self.classified = Counter("supportbot_classified_texts", "texts classified through /v1/classify", registry=r)
        self.batch_size = Histogram(
            "supportbot_batch_size", "texts per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_latency = Histogram(
            "supportbot_model_seconds", "time of one batched forward pass (tokenise, encode, head)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "supportbot_queue_wait_seconds", "time a text waited before its forward pass started",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.model_info = Gauge(
            "supportbot_model_info", "the model version being served (value 1)", ["version"], registry=r
        )
        self.ready = Gauge("supportbot_ready", "1 when the model is loaded and warmed", registry=r)
        self.reloads = Counter("supportbot_reloads", "model reloads by result", ["result"], registry=r)
        self.rejected = Counter(
            "supportbot_rejected_requests", "requests refused by a protection (rate limit, size, key, overload)",
            ["reason"], registry=r,
        )
        self._version: str | None = None

    def set_model_version(self, version: str) -> None:
        """Exactly one version label is 1 at a time."""
        if self._version is not None and self._version != version:
            self.model_info.remove(self._version)
        self.model_info.labels(version=version).set(1)
        self._version = version

    def render(self) -> bytes:
        return generate_latest(self.registry)
