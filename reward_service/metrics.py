"""Prometheus metrics of one service instance (own registry, so several apps can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class ServiceMetrics:
    """Request, batching, latency and error metrics, exported at ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "reward_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "reward_request_seconds", "HTTP request latency.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.items_scored = Counter("reward_items_scored", "Items scored.", registry=r)
        self.batches = Counter("reward_batches", "Forward passes (micro-batches) run.", registry=r)
        self.batch_size = Histogram(
            "reward_batch_size", "Items per forward pass.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "reward_batch_tokens", "Padded tokens (items x longest) per forward pass.",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.padding_ratio = Histogram(
            "reward_padding_ratio", "Share of padding tokens in a forward pass.",
            buckets=_RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("reward_queue_depth", "Items waiting to be scored.", registry=r)
        self.queue_wait_seconds = Histogram(
            "reward_queue_wait_seconds", "Time from enqueue until a request's items are taken.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "reward_inference_seconds", "Forward pass duration.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.truncations = Counter(
            "reward_truncations", "Items cut to max_length.", ["side"], registry=r
        )
        self.errors = Counter("reward_errors", "Error responses by type.", ["type"], registry=r)
        self.client_disconnects = Counter(
            "reward_client_disconnects", "Requests whose client went away before the answer.",
            ["route"], registry=r,
        )  # fmt: skip

    def observe_batch(self, size: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        """Record one forward pass of ``size`` items, ``tokens`` real of ``padded_tokens``."""
        self.batches.inc()
        self.items_scored.inc(size)
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.padding_ratio.observe(1.0 - tokens / padded_tokens if padded_tokens else 0.0)
        self.inference_seconds.observe(seconds)

    def export(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
