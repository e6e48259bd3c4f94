"""The service's application metrics, through Ray Serve's metrics API (exported by Ray's
metrics agent on the Prometheus endpoint of each node, ``--metrics-port``), with the replica,
deployment and application tags Serve adds.

- ``cliper_requests``: requests by endpoint and HTTP status code (4xx and 500 included);
- ``cliper_request_latency_ms``: a histogram of the time in the replica, by endpoint;
- ``cliper_topk_batch_requests``: how many /topk requests each ONNX run merged;
- ``cliper_items_embedded``: items /embed answered; ``cliper_item_errors``: its per-item
  problems by action, ``skipped`` (not embedded) or ``kept`` (embedded with a fallback, such
  as no image).
"""

from __future__ import annotations

ROUTES = ("/topk", "/embed", "/healthz", "/metadata")  # any other path counts as "other"
LATENCY_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServiceMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("cliper_requests", "requests by endpoint and status",
                                        tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram("cliper_request_latency_ms", "time in the replica",
                                         boundaries=LATENCY_MS, tag_keys=("endpoint",))
        self.batch = metrics.Histogram("cliper_topk_batch_requests",
                                       "/topk requests merged into one ONNX run", boundaries=BATCH)
        self.embedded = metrics.Counter("cliper_items_embedded", "items /embed answered")
        self.item_errors = metrics.Counter("cliper_item_errors", "per-item problems of /embed",
                                           tag_keys=("action",))

    def request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ROUTES else "other"
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(seconds * 1e3, tags={"endpoint": endpoint})

    def merged(self, requests: int) -> None:
        self.batch.observe(requests)

    def embed(self, answer: dict) -> None:
        if answer["items"]:
            self.embedded.inc(len(answer["items"]))
        for problem in answer["errors"]:
            self.item_errors.inc(tags={"action": problem["action"]})
