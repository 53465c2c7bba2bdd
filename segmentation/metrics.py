"""Every Prometheus metric of the product, on explicit registries (one per process or test).

Names are a contract: the Grafana dashboard, the alert rules and users' queries depend on them.
Base units, ``_total`` for counters, bounded labels (segment ids yes, customer ids never).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from segmentation.domain import (
    CHALLENGER_ACTIONS,
    CHANGE_CAUSES,
    GATE_CHECKS,
    LABEL_CHANGE_KINDS,
    READBACK_REASONS,
    READBACK_SOURCES,
    REDIS_OPERATIONS,
    RUN_RESULTS,
    TRAINER_REDIS_OPERATIONS,
)
from segmentation.events import REASONS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class BatchHistogram(Collector):
    """A Prometheus histogram observed a whole batch at a time (``observe_all``: one numpy pass
    instead of a client call per value), exposed through the client's public collector API.
    Buckets are upper bounds, inclusive (``le``), as the client's own ``Histogram``.

    >>> h = BatchHistogram("lag_seconds", "Lag", (1.0, 2.0), CollectorRegistry())
    >>> h.observe_all(np.array([0.5, 1.0, 1.5, 9.0]))
    >>> [(s.name, s.labels.get("le"), s.value) for s in next(iter(h.collect())).samples]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('lag_seconds_bucket', '1.0', 2.0), ('lag_seconds_bucket', '2.0', 3.0),
     ('lag_seconds_bucket', '+Inf', 4.0), ('lag_seconds_count', None, 4.0), ('lag_seconds_sum', None, 12.0)]
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(sorted(float(b) for b in buckets), dtype=np.float64)
        self._counts = np.zeros(self.bounds.shape[0] + 1, dtype=np.int64)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_all(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"),
                             minlength=self._counts.shape[0])
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts).astype(np.float64).tolist(), self._sum
        les = [repr(b) for b in self.bounds.tolist()] + ["+Inf"]  # as the client writes them
        yield HistogramMetricFamily(self.name, self.documentation,
                                    buckets=list(zip(les, cumulative, strict=True)), sum_value=total)

# Label values known up front are exported at 0 from the start, so that a series exists before
# the first occurrence: increase()/rate() then count that occurrence, and dashboards and alert
# rules see 0 instead of "no data". tests/test_monitoring.py checks these lists against the code.
OUTCOMES = ("scored", "dead_letter")


def _initialise(metric: Counter | Gauge, values: tuple[str, ...]) -> None:
    for value in values:
        metric.labels(value)


def remove_segments_except(metric: Counter | Gauge, keep: Iterable[int]) -> list[str]:
    """Remove the label sets of ``metric`` (labelled by ``segment_id`` alone) whose id is not in
    ``keep``: a retired segment's series ends instead of lingering for ever. Returns the ids
    removed.

    >>> c = Counter("c", "c", ["segment_id"], registry=CollectorRegistry())
    >>> for sid in ("1", "2", "3"):
    ...     c.labels(sid).inc()
    >>> remove_segments_except(c, [2, 9]), sorted({s.labels["segment_id"] for s in c.collect()[0].samples})
    (['1', '3'], ['2'])
    """
    kept = {str(sid) for sid in keep}
    present = {sample.labels["segment_id"] for family in metric.collect() for sample in family.samples}
    retired = sorted(present - kept)
    for sid in retired:
        with contextlib.suppress(KeyError):  # removed meanwhile (older clients raise then)
            metric.remove(sid)
    return retired


def readback_rejected(registry: CollectorRegistry) -> Counter:
    """The counter of refused read-back records, the same in the consumer and the trainer, with
    every (source, reason) exported at 0 from the start."""
    counter = Counter(
        "segment_readback_rejected",
        "Records read back from the service's own topics and Redis keys that were refused and "
        "skipped, by source and reason (counted at every read that meets them)",
        ["source", "reason"], registry=registry,
    )
    for source in READBACK_SOURCES:
        for reason in READBACK_REASONS:
            counter.labels(source, reason)
    return counter


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
        self.event_lag = BatchHistogram(
            "segment_event_lag_seconds", "Scored time minus event time", LATENCY_BUCKETS, r,
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
            "segment_silhouette_baseline",
            "Training silhouette of the last model the quality gate accepted (a forced publish "
            "does not move it)", registry=r,
        )
        self.silhouette_drift = Gauge(
            "segment_silhouette_drift", "Sampled silhouette minus the accepted baseline",
            registry=r,
        )
        self.centroid_drift = Gauge(
            "segment_centroid_drift", "Online vs published centroid distance (scaled units)",
            ["segment_id"], registry=r,
        )
        self.centroids_crossed = Gauge(
            "segment_centroids_crossed",
            "Online centroids nearer another segment's published centroid than their own",
            registry=r,
        )
        self.share = Gauge(
            "segment_share", "Share of recent events per segment", ["segment_id"], registry=r
        )
        self.share_psi = Gauge(
            "segment_share_psi", "PSI of recent segment shares vs training shares", registry=r
        )
        self.novelty_share = Gauge(
            "segment_novelty_share",
            "Share of recent events farther from their centroid than their segment's training "
            "99th percentile (NaN: no share yet, or a model without training radii)", registry=r,
        )
        self.novelty_share.set(float("nan"))
        self.novel_events = Counter(
            "segment_novel_events",
            "Events farther from their centroid than their segment's training 99th percentile, "
            "by stable segment id", ["segment_id"], registry=r,
        )
        self.outliers = Counter(
            "segment_outlier_events",
            "Events flagged outliers (beyond their segment's outlier radius or outside the "
            "training envelope): scored, never learned online; by stable segment id",
            ["segment_id"], registry=r,
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
        self.changes = Counter(
            "segment_changes",
            "Segment change records emitted, by cause (initial, behaviour, model, unknown)",
            ["cause"], registry=r,
        )
        self.change_late_events = Counter(
            "segment_change_late_events",
            "Events older than the newest seen for their customer: scored, never a change",
            registry=r,
        )
        self.change_restores = Counter(
            "segment_change_restores",
            "Rebuilds of partitions' recorded segments from the changes topic (done, failed)",
            ["result"], registry=r,
        )
        self.change_restore_duration = Histogram(
            "segment_change_restore_duration_seconds",
            "Wall time to rebuild partitions' recorded segments from the changes topic",
            registry=r, buckets=LATENCY_BUCKETS,
        )
        self.change_records_invalid = Counter(
            "segment_change_records_invalid",
            "Records of the changes topic that are not segment changes (skipped on rebuild)",
            registry=r,
        )
        self.change_state_customers = Gauge(
            "segment_change_state_customers",
            "Customers whose last segment this replica holds (its partitions)", registry=r,
        )
        self.challenger_version = Gauge(
            "segment_challenger_version", "Challenger model scored in the shadow (0: none)",
            registry=r,
        )
        self.challenger_migrations = Counter(
            "segment_challenger_migrations",
            "Events by the champion's segment and the challenger's segment for the same event",
            ["from_segment_id", "to_segment_id"], registry=r,
        )
        self.challenger_agreement = Gauge(
            "segment_challenger_agreement_ratio",
            "Share of events since the challenger appeared that it puts in the champion's segment",
            registry=r,
        )
        self.readback_rejected = readback_rejected(r)
        _initialise(self.events, OUTCOMES)
        _initialise(self.dead_letters, REASONS)
        _initialise(self.redis_errors, REDIS_OPERATIONS)
        _initialise(self.changes, CHANGE_CAUSES)
        _initialise(self.change_restores, ("done", "failed"))

    def keep_segments(self, segment_ids: Iterable[int]) -> list[str]:
        """End the series of every per-segment metric for ids not in ``segment_ids`` (the model
        in use: the only one whose ids are counted here; the shadow's migrations are reset with
        the challenger). Returns the ids removed."""
        keep = set(segment_ids)
        per_segment = (self.assignments, self.novel_events, self.outliers, self.share, self.centroid_drift)
        return sorted({sid for metric in per_segment for sid in remove_segments_except(metric, keep)})

    def _model_age(self) -> float:
        if not self.model_created_at:
            return 0.0
        return max(time.time() - self.model_created_at, 0.0)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.runs = Counter(
            "segment_trainer_runs",
            "Training runs by result (published, challenger, rejected, failed, skipped)",
            ["result"], registry=r,
        )
        self.challenger = Counter(
            "segment_trainer_challenger",
            "Challengers by what happened to them (published as challenger, promoted, discarded, "
            "stale: cleared because another model became current)", ["action"], registry=r,
        )
        self.gate_refusals = Counter(
            "segment_trainer_gate_refusals", "Quality-gate refusals by check", ["check"],
            registry=r,
        )
        self.gate_failing = Gauge(
            "segment_trainer_gate_failing",
            "1 for each check the last gated refit failed (refused, or forced past the gate)",
            ["check"], registry=r,
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
        self.published_silhouette = Gauge(
            "segment_trainer_published_silhouette",
            "Training silhouette of the current (published) model", registry=r,
        )
        self.baseline_silhouette = Gauge(
            "segment_trainer_baseline_silhouette",
            "Training silhouette of the last model the quality gate accepted (a forced publish "
            "does not move it)", registry=r,
        )
        self.label_changes = Counter(
            "segment_trainer_label_changes", "Segment ids matched / new / retired by publishes",
            ["kind"], registry=r,
        )
        self.last_publish = Gauge(
            "segment_trainer_last_publish_timestamp_seconds", "When a model was last published",
            registry=r,
        )
        self.rows = Gauge(
            "segment_trainer_window_rows",
            "Rows of the last window, by kind (read, invalid, used, outside_envelope)",
            ["kind"], registry=r,
        )
        self.up = Gauge("segment_trainer_up", "1 while the trainer runs", registry=r)
        self.redis_errors = Counter(
            "segment_redis_errors", "Redis calls that failed (logged; the run goes on)", ["operation"],
            registry=r,
        )
        self.readback_rejected = readback_rejected(r)
        _initialise(self.runs, RUN_RESULTS)
        _initialise(self.challenger, CHALLENGER_ACTIONS)
        _initialise(self.redis_errors, TRAINER_REDIS_OPERATIONS)
        _initialise(self.gate_refusals, GATE_CHECKS)
        _initialise(self.gate_failing, GATE_CHECKS)
        _initialise(self.label_changes, LABEL_CHANGE_KINDS)


# --- the /metrics, /healthz and /readyz server ------------------------------------------------
MAX_CONNECTIONS = 256  # sending their request at once; a new one beyond closes the oldest of them
REQUEST_TIMEOUT_S = 5.0  # to send the whole request (line and headers), however it trickles in
MAX_REQUEST_BYTES = 8192  # request line and headers
Answer = tuple[int, str, bytes]  # status, content type, body
_STATUS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}
HEALTHY: Answer = (200, "text/plain", b"ok\n")


def request_target(head: bytes) -> tuple[str, str]:
    """The method and path of a request head; ``ValueError`` if it is not an HTTP request line.

    >>> request_target(b"GET /metrics?x=1 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    ('GET', '/metrics')
    """
    method, target, version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1 request line: {version[:20]!r}")
    return method, target.split("?")[0]


def http_response(answer: Answer) -> bytes:
    """An ``Answer`` as the bytes of an HTTP/1.1 response that closes its connection.

    >>> http_response(HEALTHY).split(b"\\r\\n")  # doctest: +NORMALIZE_WHITESPACE
    [b'HTTP/1.1 200 OK', b'Content-Type: text/plain', b'Content-Length: 3', b'Connection: close',
     b'', b'ok\\n']
    """
    status, content_type, body = answer
    head = (f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class MetricsServer:
    """/metrics, /healthz (the process is alive) and /readyz (``ready()``) served by one asyncio
    event loop in a daemon thread (the standard library's; no dependency).

    A connection is a coroutine, not a thread, so slow clients cost a little memory and never a
    handler slot. Each must send its whole request within ``REQUEST_TIMEOUT_S`` (a deadline on the
    request, not on each read: one byte every few seconds does not keep it open), and when
    ``max_connections`` are still sending theirs, a new one closes the oldest of them. /healthz
    is answered on the loop itself; /metrics and /readyz, which call into the process, in a
    worker thread. One request per connection (``Connection: close``)."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool], host: str, port: int,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.registry = registry
        self.ready = ready
        self.max_connections = max_connections
        self._reading: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()  # oldest first
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES))
        self.server_address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def connections_reading(self) -> int:
        """Connections still sending their request."""
        return len(self._reading)

    def answer(self, path: str) -> Answer:
        """What a GET of ``path`` answers (in a worker thread: it calls into the process)."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/readyz":
            return (200, "text/plain", b"ready\n") if self.ready() else (503, "text/plain", b"not ready\n")
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            self._reading.pop(writer, None)
            writer.write(http_response(await self._respond(head)))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # too slow, gone, evicted, or a request too large: dropped
        finally:
            self._reading.pop(writer, None)
            writer.close()

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Count ``writer`` among those sending their request; beyond ``max_connections``, close
        the oldest of them (a slow client gives way to a probe)."""
        self._reading[writer] = None
        while len(self._reading) > self.max_connections:
            oldest, _ = self._reading.popitem(last=False)
            oldest.transport.abort()

    async def _respond(self, head: bytes) -> Answer:
        try:
            method, path = request_target(head)
        except ValueError:
            return 400, "text/plain", b"bad request\n"
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            return HEALTHY
        return await asyncio.to_thread(self.answer, path)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()

    def _stop(self) -> None:
        self._server.close()
        for writer in self._reading:
            writer.transport.abort()
        self._loop.stop()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop listening and close every connection (idempotent)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop)
            self._thread.join(timeout_s)


def serve(
    registry: CollectorRegistry, port: int, ready: Callable[[], bool] = lambda: True,
    host: str = "127.0.0.1",
) -> MetricsServer:
    """/metrics, /healthz (process alive) and /readyz (``ready()``) on host:port (loopback by
    default; the image sets SEG_METRICS_HOST=0.0.0.0), served in the background."""
    return MetricsServer(registry, ready, host, port)
