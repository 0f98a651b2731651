"""Prometheus metrics of one app, in a registry of its own (never the process-global one)."""

from __future__ import annotations

from typing import Any

from ._deps import require

__all__ = ["Metrics"]


class Metrics:
    """Counters and histograms of the service (``GET /metrics``).

    - ``anomalyclip_requests_total{route, status}``: answered requests;
    - ``anomalyclip_errors_total{kind}``: answers >= 400 by error kind;
    - ``anomalyclip_request_seconds{route}``: latency histogram;
    - ``anomalyclip_batch_size``: images per forward pass (histogram);
    - ``anomalyclip_batch_seconds``: forward-pass time per batch (histogram);
    - ``anomalyclip_queue_depth``: requests waiting for a batch (gauge).
    """

    def __init__(self) -> None:
        prometheus = require("prometheus_client")
        self.registry = prometheus.CollectorRegistry(auto_describe=True)
        self._prometheus = prometheus
        self.requests = prometheus.Counter(
            "anomalyclip_requests", "Answered requests", ["route", "status"], registry=self.registry
        )
        self.errors = prometheus.Counter("anomalyclip_errors", "Error answers by kind", ["kind"], registry=self.registry)
        self.latency = prometheus.Histogram(
            "anomalyclip_request_seconds",
            "Request latency in seconds",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = prometheus.Histogram(
            "anomalyclip_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry
        )
        self.batch_seconds = prometheus.Histogram(
            "anomalyclip_batch_seconds",
            "Forward-pass time per batch in seconds",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.queue_depth = prometheus.Gauge("anomalyclip_queue_depth", "Requests waiting for a batch", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        return self._prometheus.generate_latest(self.registry), self._prometheus.CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, Any] | None = None) -> float | None:
        """One sample's value (e.g. ``"anomalyclip_batch_size_sum"``), or None: for tests and the page."""
        return self.registry.get_sample_value(name, labels or {})
