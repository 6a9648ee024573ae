"""Prometheus metrics of one reward server, exported on their own HTTP port.

Labels carry the client *name* (from the token file) or "anonymous" — never a token, a prompt or a
peer address — so cardinality stays bounded by the number of teams. Without auth the batcher's queues
are keyed by peer address or a self-declared name; those keys contain ':' (client names cannot), and
their queue depths are summed under "anonymous".
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DROP_REASONS = ("cancelled", "deadline")
REFUSAL_REASONS = ("quota", "queue_full", "memory")
ANONYMOUS = "anonymous"


class ServerMetrics:
    """Counters and histograms for requests, images, batches, queues and errors, plus the process's own
    (RSS, CPU seconds, open fds) and the Python platform.

    Every series an autoscaler or alert reads exists from the first scrape, at 0: the model-labelled
    histograms and counters, each drop and refusal reason, and ``reward_queue_images{client="anonymous"}``
    — a fresh or idle replica reports an empty queue instead of no metric (an HPA on a missing series
    fails with FailedGetPodsMetric).
    """

    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model = model
        labels = {"registry": self.registry}
        self.requests = Counter(
            "reward_requests", "Score RPCs by client and status code", ["model", "client", "code"], **labels
        )
        self.images = Counter("reward_images", "Images scored", ["model", "client"], **labels)
        self.latency = Histogram(
            "reward_request_latency_seconds",
            "Score RPC latency, receive to reply",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            **labels,
        )
        self.batch_images = Histogram(
            "reward_batch_images",
            "Images per executed model batch",
            ["model"],
            buckets=_BATCH_BUCKETS,
            **labels,
        )
        self.batch_jobs = Histogram(
            "reward_batch_jobs",
            "Jobs (request parts) merged per model batch",
            ["model"],
            buckets=_BATCH_BUCKETS,
            **labels,
        )
        self.batch_seconds = Histogram(
            "reward_batch_seconds", "Model time per batch", ["model"], buckets=_LATENCY_BUCKETS, **labels
        )
        self.queue_images = Gauge(
            "reward_queue_images", "Images waiting, per client", ["model", "client"], **labels
        )
        self.dropped_images = Counter(
            "reward_dropped_images", "Queued images dropped before the model", ["model", "reason"], **labels
        )
        self.errors = Counter(
            "reward_errors", "Failed Score RPCs by status code", ["model", "code"], **labels
        )
        self.refused_requests = Counter(
            "reward_refused_requests",
            "Score RPCs refused before the model, by reason (quota, queue_full, memory)",
            ["model", "reason"],
            **labels,
        )
        self._anonymous_depths: dict[str, int] = {}
        for metric in (self.latency, self.batch_images, self.batch_jobs, self.batch_seconds):
            metric.labels(model)
        for reason in DROP_REASONS:
            self.dropped_images.labels(model, reason)
        for reason in REFUSAL_REASONS:
            self.refused_requests.labels(model, reason)
        self.queue_images.labels(model, ANONYMOUS).set(0)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # BatcherObserver
    def batch_done(self, num_images: int, num_jobs: int, seconds: float) -> None:
        self.batch_images.labels(self.model).observe(num_images)
        self.batch_jobs.labels(self.model).observe(num_jobs)
        self.batch_seconds.labels(self.model).observe(seconds)

    def queue_depth(self, client: str, num_images: int) -> None:
        if ":" not in client:
            self.queue_images.labels(self.model, client).set(num_images)
            return
        if num_images:
            self._anonymous_depths[client] = num_images
        else:
            self._anonymous_depths.pop(client, None)
        self.queue_images.labels(self.model, ANONYMOUS).set(sum(self._anonymous_depths.values()))

    def dropped(self, reason: str, num_images: int) -> None:
        self.dropped_images.labels(self.model, reason).inc(num_images)

    # servicer
    def refused(self, reason: str) -> None:
        self.refused_requests.labels(self.model, reason).inc()

    def request_done(self, client: str, code: str, num_images: int, seconds: float) -> None:
        self.requests.labels(self.model, client, code).inc()
        self.latency.labels(self.model).observe(seconds)
        if code == "OK":
            self.images.labels(self.model, client).inc(num_images)
        else:
            self.errors.labels(self.model, code).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; return its port."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        self._httpd = httpd
        return int(httpd.server_port)

    def shutdown(self) -> None:
        httpd = getattr(self, "_httpd", None)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
