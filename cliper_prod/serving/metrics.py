"""The service's application metrics: one set of names and labels, two backends.

- ``cliper_requests``: requests by endpoint and HTTP status code (4xx and 500 included);
- ``cliper_request_latency_ms``: a histogram of the time in the serving process, by endpoint;
- ``cliper_topk_batch_requests``: how many /topk requests each ONNX run merged;
- ``cliper_items_embedded``: items /embed answered; ``cliper_item_errors``: its per-item
  problems by action, ``skipped`` (not embedded) or ``kept`` (embedded with a fallback, such
  as no image);
- ``cliper_queue_ms`` and ``cliper_compute_ms``: histograms of the time a request waited for
  its computation (the batcher's queue, a free thread) and of that computation (for a merged
  /topk batch, the batch's ONNX run), by endpoint and ``bundle`` (the id of the bundle that
  answered);
- ``cliper_bundle_loads``: bundles loaded by ``bundle`` id and ``result`` (``loaded``, or
  ``refused``: a new bundle that failed to load while the old one kept serving, named by the
  sha256 of its manifest.json file, first 12 hex digits, since its manifest may not be
  readable, or ``unreadable`` when there was no manifest to read).

:class:`RayMetrics` (``--engine ray``) records through Ray Serve's metrics API: Ray's metrics
agent exports them on each node's Prometheus endpoint as ``ray_cliper_*``, with the replica,
deployment and application tags Serve adds. :class:`PrometheusMetrics` (``--engine local``)
records through ``prometheus_client`` in its multiprocess mode, so the ``/metrics`` that any
worker answers sums every worker's counts; the series are ``cliper_*``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

LATENCY_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when imported


@dataclass(frozen=True)
class Metric:
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # a histogram's upper bounds; None: a counter


REQUESTS = Metric("cliper_requests", "requests by endpoint and status", ("endpoint", "status"))
LATENCY = Metric("cliper_request_latency_ms", "time in the serving process", ("endpoint",),
                 LATENCY_MS)
BATCH_REQUESTS = Metric("cliper_topk_batch_requests", "/topk requests merged into one ONNX run",
                        buckets=BATCH)
EMBEDDED = Metric("cliper_items_embedded", "items /embed answered")
ITEM_ERRORS = Metric("cliper_item_errors", "per-item problems of /embed", ("action",))
QUEUE = Metric("cliper_queue_ms", "time waiting for the computation", ("endpoint", "bundle"),
               LATENCY_MS)
COMPUTE = Metric("cliper_compute_ms", "time of the computation (a merged batch's run)",
                 ("endpoint", "bundle"), LATENCY_MS)
BUNDLE_LOADS = Metric("cliper_bundle_loads", "bundles loaded or refused", ("bundle", "result"))
METRICS = (REQUESTS, LATENCY, BATCH_REQUESTS, EMBEDDED, ITEM_ERRORS, QUEUE, COMPUTE,
           BUNDLE_LOADS)


class ServiceMetrics(ABC):
    """What the service records; a backend makes each instrument and adds to it."""

    def __init__(self) -> None:
        self.instruments = {metric: self.make(metric) for metric in METRICS}

    @abstractmethod
    def make(self, metric: Metric) -> object:
        """The backend's counter or histogram for ``metric``."""

    @abstractmethod
    def add(self, metric: Metric, value: float, labels: dict[str, str]) -> None:
        """Increment a counter by ``value``, or observe ``value`` in a histogram."""

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answer of ``endpoint`` (a route's path, or ``other``)."""
        self.add(REQUESTS, 1, {"endpoint": endpoint, "status": str(status)})
        self.add(LATENCY, seconds * 1e3, {"endpoint": endpoint})

    def timing(self, endpoint: str, bundle: str, queue_s: float, compute_s: float) -> None:
        """One request's wait for its computation and the computation's time."""
        labels = {"endpoint": endpoint, "bundle": bundle}
        self.add(QUEUE, queue_s * 1e3, labels)
        self.add(COMPUTE, compute_s * 1e3, labels)

    def bundle_loaded(self, bundle: str, result: str) -> None:
        self.add(BUNDLE_LOADS, 1, {"bundle": bundle, "result": result})

    def merged(self, requests: int) -> None:
        self.add(BATCH_REQUESTS, requests, {})

    def embed(self, answer: dict) -> None:
        if answer["items"]:
            self.add(EMBEDDED, len(answer["items"]), {})
        for problem in answer["errors"]:
            self.add(ITEM_ERRORS, 1, {"action": problem["action"]})


class RayMetrics(ServiceMetrics):
    """Ray Serve's metrics API (``--engine ray``)."""

    def make(self, metric: Metric) -> object:
        from ray.serve import metrics

        if metric.buckets is None:
            return metrics.Counter(metric.name, metric.doc, tag_keys=metric.labels)
        return metrics.Histogram(metric.name, metric.doc, boundaries=list(metric.buckets),
                                 tag_keys=metric.labels)

    def add(self, metric: Metric, value: float, labels: dict[str, str]) -> None:
        instrument = self.instruments[metric]
        record = instrument.inc if metric.buckets is None else instrument.observe
        record(value, tags=labels or None)


class PrometheusMetrics(ServiceMetrics):
    """``prometheus_client`` in multiprocess mode (``--engine local``): each worker writes its
    counts to files in :data:`MULTIPROC_DIR`, which must be set before prometheus_client is
    first imported, and :meth:`exposition` reads all of them."""

    def make(self, metric: Metric) -> object:
        from prometheus_client import Counter, Histogram

        if metric.buckets is None:
            return Counter(metric.name, metric.doc, metric.labels, registry=None)
        return Histogram(metric.name, metric.doc, metric.labels, buckets=metric.buckets,
                         registry=None)

    def add(self, metric: Metric, value: float, labels: dict[str, str]) -> None:
        instrument = self.instruments[metric]
        child = instrument.labels(**labels) if labels else instrument
        if metric.buckets is None:
            child.inc(value)
        else:
            child.observe(value)

    @staticmethod
    def exposition() -> tuple[bytes, str]:
        """The Prometheus text of every worker's metrics, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, os.environ[MULTIPROC_DIR])
        return generate_latest(registry), CONTENT_TYPE_LATEST
