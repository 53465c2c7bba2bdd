"""Every Prometheus metric of the product, on explicit registries (one per process or test).

Names are a contract: the Grafana dashboard, the alert rules and users' queries depend on them.
Base units, ``_total`` for counters, bounded labels (segment ids yes, customer ids never).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from segmentation.events import REASONS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# Label values known up front are exported at 0 from the start, so that a series exists before
# the first occurrence: increase()/rate() then count that occurrence, and dashboards and alert
# rules see 0 instead of "no data". tests/test_monitoring.py checks these lists against the code.
OUTCOMES = ("scored", "dead_letter")
REDIS_OPERATIONS = ("model_poll", "model_load", "pubsub", "customer_write", "replica_state")
RUN_RESULTS = ("published", "rejected", "failed", "skipped")
GATE_CHECKS = ("finite", "min_share", "separation", "silhouette")
LABEL_CHANGE_KINDS = ("matched", "new", "retired")


def _initialise(counter: Counter, values: tuple[str, ...]) -> None:
    for value in values:
        counter.labels(value)


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "segment_events", "Events handled, by outcome (scored, dead_letter)", ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "segment_dead_letters", "Dead letters by reason code", ["reason"], registry=r
        )
        self.assignments = Counter(
            "segment_assignments", "Events assigned, by stable segment id", ["segment_id"],
            registry=r,
        )
        self.unknown_categories = Counter(
            "segment_unknown_category_values", "Category values encoded as 'other'", registry=r
        )
        self.batch_duration = Histogram(
            "segment_batch_duration_seconds", "Wall time to process one batch", registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.event_lag = Histogram(
            "segment_event_lag_seconds", "Scored time minus event time", registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.consumer_lag = Gauge(
            "segment_consumer_lag_messages", "High watermark minus position", ["partition"],
            registry=r,
        )
        self.silhouette = Gauge(
            "segment_silhouette", "Silhouette of recent events (simplified, sampled)", ["kind"],
            registry=r,
        )
        self.silhouette_baseline = Gauge(
            "segment_silhouette_baseline", "Silhouette of the model on its training window",
            registry=r,
        )
        self.silhouette_drift = Gauge(
            "segment_silhouette_drift", "Sampled silhouette minus the training baseline",
            registry=r,
        )
        self.centroid_drift = Gauge(
            "segment_centroid_drift", "Online vs published centroid distance (scaled units)",
            ["segment_id"], registry=r,
        )
        self.share = Gauge(
            "segment_share", "Share of recent events per segment", ["segment_id"], registry=r
        )
        self.share_psi = Gauge(
            "segment_share_psi", "PSI of recent segment shares vs training shares", registry=r
        )
        self.model_version = Gauge(
            "segment_model_version", "Model version scoring events", registry=r
        )
        self.model_created_at = 0.0
        self.model_age = Gauge(
            "segment_model_age_seconds", "Age of the model in use", registry=r
        )
        self.model_age.set_function(self._model_age)
        self.bundle_rejections = Counter(
            "segment_bundle_rejections", "Bundles refused on load (invalid, older, incompatible)",
            registry=r,
        )
        self.redis_errors = Counter(
            "segment_redis_errors", "Redis calls that failed after retries", ["operation"],
            registry=r,
        )
        self.customer_writes_skipped = Counter(
            "segment_customer_writes_skipped",
            "Per-customer writes dropped after retries (the output topic keeps the record)",
            registry=r,
        )
        self.delivery_failures = Counter(
            "segment_delivery_failures", "Batches whose outputs were not acknowledged (replayed)",
            registry=r,
        )
        self.up = Gauge("segment_consumer_up", "1 while the consumer loop runs", registry=r)
        _initialise(self.events, OUTCOMES)
        _initialise(self.dead_letters, REASONS)
        _initialise(self.redis_errors, REDIS_OPERATIONS)

    def _model_age(self) -> float:
        if not self.model_created_at:
            return 0.0
        return max(time.time() - self.model_created_at, 0.0)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.runs = Counter(
            "segment_trainer_runs", "Training runs by result (published, rejected, failed, skipped)",
            ["result"], registry=r,
        )
        self.gate_refusals = Counter(
            "segment_trainer_gate_refusals", "Quality-gate refusals by check", ["check"],
            registry=r,
        )
        self.duration = Histogram(
            "segment_trainer_duration_seconds", "Wall time of one training run", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )
        self.silhouette = Gauge(
            "segment_trainer_silhouette", "Sampled silhouette of the last fit", registry=r
        )
        self.davies_bouldin = Gauge(
            "segment_trainer_davies_bouldin", "Davies-Bouldin index of the last fit", registry=r
        )
        self.k = Gauge("segment_trainer_k", "K of the last fit", registry=r)
        self.label_changes = Counter(
            "segment_trainer_label_changes", "Segment ids matched / new / retired by publishes",
            ["kind"], registry=r,
        )
        self.last_publish = Gauge(
            "segment_trainer_last_publish_timestamp_seconds", "When a model was last published",
            registry=r,
        )
        self.rows = Gauge(
            "segment_trainer_window_rows", "Rows of the last window, by kind (read, invalid, used)",
            ["kind"], registry=r,
        )
        self.up = Gauge("segment_trainer_up", "1 while the trainer runs", registry=r)
        _initialise(self.runs, RUN_RESULTS)
        _initialise(self.gate_refusals, GATE_CHECKS)
        _initialise(self.label_changes, LABEL_CHANGE_KINDS)


def serve(
    registry: CollectorRegistry, port: int, ready: Callable[[], bool] = lambda: True
) -> ThreadingHTTPServer:
    """/metrics, /healthz (process alive) and /readyz (``ready()``) on 0.0.0.0:port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?")[0]
            if path == "/metrics":
                body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif path == "/healthz":
                body, status, ctype = b"ok\n", 200, "text/plain"
            elif path == "/readyz":
                ok = ready()
                body = b"ready\n" if ok else b"not ready\n"
                status, ctype = (200 if ok else 503), "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
