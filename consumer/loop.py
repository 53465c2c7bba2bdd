"""The consume loop: poll a batch, score it, deliver outputs, then store offsets; learn; report.

Thin on purpose: every stage is a named function elsewhere (``scoring.score_batch``,
``delivery.Delivery.deliver``, ``online.OnlineKMeans.learn``, ``quality.QualityTracker``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Histogram

from consumer.delivery import Delivery, DeliveryFailed, Sent, Source
from consumer.model import ActiveModel, ModelWatcher
from consumer.online import OnlineKMeans
from consumer.quality import QualityTracker, centroid_drift, crossed_centroids
from consumer.scoring import OutRecord, ScoredBatch, ScoringRules, coordinates, score_batch
from segmentation.metrics import ConsumerMetrics
from segmentation.settings import Settings
from segmentation.store import REDIS_ERRORS, CustomerStore, ModelStore, PartialWrite, ReplicaStates

log = logging.getLogger(__name__)

REPORT_EVERY_S = 5.0


@dataclass
class InFlight:
    """A scored batch handed to delivery and to the Redis writer, not yet finished (offsets
    stored, learned, counted)."""

    messages: list[Message]
    batch: ScoredBatch
    sent: Sent
    write: Future[None]  # the customers' Redis write
    started: float


class ConsumeLoop:
    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        delivery: Delivery,
        store: ModelStore,
        customers: CustomerStore,
        metrics: ConsumerMetrics,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.delivery = delivery
        self.store = store
        self.customers = customers
        self.metrics = metrics
        self.watcher = ModelWatcher(settings, store, metrics)
        self.online: OnlineKMeans | None = None
        self.quality: QualityTracker | None = None
        self.assigned: set[tuple[str, int]] = set()
        self.paused = False
        self._next_report = 0.0
        self.exactly_once = settings.delivery == "exactly-once"
        self.rules = ScoringRules.from_settings(settings)
        self.step_started: float | None = None  # monotonic start of the step in progress
        # sources whose records were acknowledged before their batch failed: a replay skips them
        self._acknowledged: set[Source] = set()
        # The batch sent, its acknowledgements and its Redis write pending
        self._inflight: InFlight | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="customer-writes")
        self._replay: list[Message] = []  # a batch that failed while partitions were revoked

    # --- group membership ----------------------------------------------------------------
    def subscribe(self) -> None:
        self.consumer.subscribe(
            [self.settings.events_topic],
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("partitions assigned", extra={"partitions": _names(partitions)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Finish the batches in flight first, so that what is committed is everything acknowledged.
        self._replay += self._finish()
        if not self.exactly_once:
            self._commit_stored()
        self._forget(partitions)
        log.info("partitions revoked", extra={"partitions": _names(partitions)})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Never commit on loss: another member may already own these partitions.
        self._forget(partitions)
        log.warning("partitions lost", extra={"partitions": _names(partitions)})

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self.assigned -= {(tp.topic, tp.partition) for tp in partitions}
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._acknowledged = {s for s in self._acknowledged if s[:2] not in gone}
        for tp in partitions:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(tp.partition))

    def _commit_stored(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("commit failed", extra={"error": str(exc)})

    @property
    def ready(self) -> bool:
        return self.watcher.active is not None and bool(self.assigned) and not self.paused

    # --- the loop --------------------------------------------------------------------------
    def run(self, stopping: Callable[[], bool]) -> None:
        self.subscribe()
        self.metrics.up.set(1)
        try:
            while not stopping():
                self.step()
        finally:
            self.metrics.up.set(0)

    def step(self) -> None:
        self.step_started = time.monotonic()
        try:
            if self.watcher.refresh():
                self._on_new_model()
            messages = self._take()
            model = self.watcher.active
            if model is None:
                self._hold(messages)
            elif messages:
                self._process(messages, model)
            self._report()
        finally:
            self.step_started = None

    def _take(self) -> list[Message]:
        """The next batch, sized by the load: whatever arrived while the last one was handled
        (at most ``batch_size``). Only when nothing is waiting does it finish the batch in flight
        (nothing to overlap it with) and wait up to ``batch_timeout_s`` for a first message."""
        size = self.settings.batch_size
        messages = self._consume(size, 0)
        if not messages:
            self._rewind(self._finish())
            messages = self._consume(1, self.settings.batch_timeout_s)
            if messages and size > 1:
                messages += self._consume(size - 1, 0)
        if self._replay:  # replayed together with whatever was fetched after it
            self._rewind(self._replay + messages)
            self._replay, messages = [], []
        return messages

    def _consume(self, size: int, timeout_s: float) -> list[Message]:
        return [m for m in self.consumer.consume(size, timeout_s) if not self._is_error(m)]

    def _hold(self, messages: list[Message]) -> None:
        """No model yet: put messages back, pause everything, commit nothing."""
        self._rewind(messages)
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)
            if not self.paused:
                log.info("no model yet: partitions paused until one is published")
            self.paused = True
        time.sleep(0.2)

    def _on_new_model(self) -> None:
        model = self.watcher.active
        if model is None:  # only called once refresh() has swapped a model in
            return
        self.online = OnlineKMeans(
            model.centroids, np.asarray(model.bundle.quality.shares),
            self.settings.half_life_events, self.settings.random_state,
        )
        self.quality = QualityTracker(model)
        # Per-segment gauges of the previous model must not linger (a retired id would keep
        # its last share and drift for ever); the next report fills in the new model's ids.
        self.metrics.share.clear()
        self.metrics.centroid_drift.clear()
        if self.paused:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False
            log.info("model available: partitions resumed")

    def _process(self, messages: list[Message], model: ActiveModel) -> None:
        """Score this batch while the one before is acknowledged and written to Redis, finish
        that one, then send this one: offsets are stored batch after batch, each once its
        outputs are acknowledged and its customers written."""
        started = time.monotonic()
        batch = score_batch(messages, model, self.rules)
        failed = self._finish()
        if failed:  # the batch before failed: replay it and this one
            self._rewind(failed + messages)
            return
        records = [r for r in batch.records if not self._written(r)] if self._acknowledged else batch.records
        try:
            sent = self.delivery.send(records, _next_offsets(messages), self.substitute)
        except DeliveryFailed as exc:  # exactly-once: the transaction did not commit
            self._rewind(self._failed(messages, exc))
            return
        # Off the critical path, but the batch's offsets wait for it: a crash before the write
        # replays the batch, and the replay writes again (idempotent: never older over newer).
        write = self._writer.submit(self._write_customers, batch)
        self._inflight = InFlight(messages, batch, sent, write, started)

    def _finish(self) -> list[Message]:
        """Finish the batch in flight: wait for its acknowledgements (retried as delivery's
        policy says) and its Redis write, store its offsets, learn and count. Returns the
        messages to replay when its delivery failed."""
        flight, self._inflight = self._inflight, None
        if flight is None:
            return []
        try:
            self.delivery.complete(flight.sent)
        except DeliveryFailed as exc:
            return self._failed(flight.messages, exc)
        finally:
            flight.write.result()  # never raises: write failures are counted and dropped
        self.delivery.store(flight.sent)
        if self._acknowledged:
            self._acknowledged -= {coordinates(m) for m in flight.messages}
        self._learn(flight.batch)
        self._count(flight.batch, flight.started)
        return []

    def _failed(self, messages: list[Message], exc: DeliveryFailed) -> list[Message]:
        self.metrics.delivery_failures.inc()
        log.error("batch not acknowledged; replaying it", extra={"error": str(exc)})
        self._acknowledged |= exc.acknowledged
        return messages

    def _written(self, record: OutRecord) -> bool:
        return record.source is not None and coordinates(record.source) in self._acknowledged

    def substitute(self, record: OutRecord, error: KafkaError) -> OutRecord | None:
        """Delivery's replacement for a record the broker refused for good (counted here)."""
        replacement = self.rules.replacement(record, error.str())
        if replacement is not None and record.topic != self.rules.dlq_topic:
            self.metrics.dead_letters.labels("output_rejected").inc()
        return replacement

    def _write_customers(self, batch: ScoredBatch) -> None:
        """Best effort: the output topic is the record of truth; Redis holds a hot copy that
        the next event of the customer refreshes."""
        if not batch.customers:
            return
        try:
            self.customers.write_latest(batch.customers)
        except redis.RedisError as exc:  # unreachable, but also full (OOM) or read-only
            self.metrics.redis_errors.labels("customer_write").inc()
            skipped = exc.failed if isinstance(exc, PartialWrite) else len(batch.customers)
            self.metrics.customer_writes_skipped.inc(skipped)
            if not isinstance(exc, REDIS_ERRORS):
                log.error("customer writes refused by Redis", extra={"error": str(exc)})

    def _learn(self, batch: ScoredBatch) -> None:
        if self.online is None or self.quality is None or batch.indices.shape[0] == 0:
            return
        outliers = self.online.learn(batch.encoded, batch.nearest)
        if outliers:  # scored and delivered like any event; only the online centres ignore them
            log.warning("outliers left out of online learning", extra={"rows": outliers})
        self.quality.update(batch.indices, batch.nearest, batch.second, batch.encoded)

    def _count(self, batch: ScoredBatch, started: float) -> None:
        m = self.metrics
        m.events.labels("scored").inc(len(batch.outputs))
        m.events.labels("dead_letter").inc(len(batch.dead_letters))
        for reason in batch.reasons:
            m.dead_letters.labels(reason).inc()
        if batch.unknown_categories:
            m.unknown_categories.inc(batch.unknown_categories)
        model = self.watcher.active
        if model is not None and batch.indices.shape[0]:
            counts = np.bincount(batch.indices, minlength=model.bundle.k)
            for i, n in enumerate(counts.tolist()):
                if n:
                    m.assignments.labels(str(model.bundle.segment_ids[i])).inc(n)
            observe_all(m.event_lag, np.maximum(time.time() - batch.event_ms / 1000.0, 0.0))
        m.batch_duration.observe(time.monotonic() - started)

    def _rewind(self, messages: list[Message]) -> None:
        """Seek each partition back to the first offset of ``messages`` (replayed later)."""
        first: dict[tuple[str, int], int] = {}
        for msg in messages:
            topic, partition, offset = coordinates(msg)
            first[(topic, partition)] = min(first.get((topic, partition), offset), offset)
        for (topic, partition), offset in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                log.warning("seek failed", extra={"partition": partition, "error": str(exc)})

    def _is_error(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer error", extra={"error": str(err)})
        return True

    # --- periodic reporting (off the per-event hot path) -------------------------------------
    def _report(self) -> None:
        now = time.monotonic()
        if now < self._next_report:
            return
        self._next_report = now + REPORT_EVERY_S
        self._report_lag()
        model, quality, online = self.watcher.active, self.quality, self.online
        if model is None or quality is None or online is None:
            return
        m = self.metrics
        simplified = quality.simplified()
        if simplified is not None:
            m.silhouette.labels("simplified").set(simplified)
            shares = quality.shares()
            for sid, share in zip(model.bundle.segment_ids, shares.tolist(), strict=True):
                m.share.labels(str(sid)).set(share)
            m.share_psi.set(quality.psi())
        sampled = quality.sampled_silhouette()
        drift = quality.drift()
        if sampled is not None and drift is not None:
            m.silhouette.labels("sampled").set(sampled)
            m.silhouette_drift.set(drift)
        distances = centroid_drift(model, online)
        for sid, d in zip(model.bundle.segment_ids, distances.tolist(), strict=True):
            m.centroid_drift.labels(str(sid)).set(d)
        m.centroids_crossed.set(crossed_centroids(online.centroids, model.centroids))
        self._publish_replica_state(model, online, simplified, sampled, drift)

    def _publish_replica_state(
        self, model: ActiveModel, online: OnlineKMeans, simplified: float | None,
        sampled: float | None, drift: float | None,
    ) -> None:
        state = {
            "replica": self.settings.replica_id, "model_version": model.version,
            "at": time.time(), "events_seen": online.events_seen,
            "online_centroids": online.centroids.tolist(), "counts": online.counts.tolist(),
            "segment_ids": model.bundle.segment_ids,
            "silhouette_simplified": simplified, "silhouette_sampled": sampled,
            "silhouette_drift": drift,
        }
        try:
            ReplicaStates.of(self.store).put(self.settings.replica_id, state, ttl_s=120)
        except redis.RedisError:
            self.metrics.redis_errors.labels("replica_state").inc()

    def _report_lag(self) -> None:
        assignment = [TopicPartition(t, p) for t, p in self.assigned]
        if not assignment:
            return
        try:
            positions = self.consumer.position(assignment)
        except KafkaException:
            return
        for tp in positions:
            try:
                # cached: from the last fetch response, no broker round trip on the loop's thread
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if tp.offset >= 0 and high >= 0:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(high - tp.offset, 0))

    def close(self) -> None:
        """Flush, commit what is acknowledged, leave the group. Never raises: a fenced or
        broken producer has nothing left to flush that could be committed."""
        try:
            self._finish()  # what fails is not stored: the next owner replays it
        except Exception as exc:  # noqa: BLE001 - closing goes on whatever the batch did
            log.warning("batch in flight not finished on close", extra={"error": str(exc)})
        self._writer.shutdown(wait=True)
        try:
            self.delivery.close(self.settings.shutdown_timeout_s)
        except KafkaException as exc:
            log.warning("producer flush on close failed", extra={"error": str(exc)})
        if not self.exactly_once:
            self._commit_stored()
        self.watcher.close()
        try:
            self.consumer.close()
        except KafkaException as exc:
            log.warning("consumer close failed", extra={"error": str(exc)})


def _next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """Per partition, the offset after the last message (what a commit means)."""
    last: dict[tuple[str, int], int] = {}
    for msg in messages:
        where = (str(msg.topic()), int(msg.partition() or 0))
        last[where] = max(last.get(where, -1), int(msg.offset() or 0))
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def observe_all(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe`` of every value, one bucket increment per bucket instead of per value.

    >>> from prometheus_client import CollectorRegistry
    >>> h = Histogram("h", "h", buckets=(1.0, 2.0), registry=CollectorRegistry())
    >>> observe_all(h, np.array([0.5, 1.0, 1.5, 9.0]))
    >>> [s.value for s in h.collect()[0].samples if s.name == "h_bucket"]
    [2.0, 3.0, 4.0]
    """
    if values.size == 0:
        return
    bounds = histogram._upper_bounds  # noqa: SLF001 - the client has no batch observe
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds))
    for i, n in enumerate(counts[: len(bounds)].tolist()):
        if n:
            histogram._buckets[i].inc(n)  # noqa: SLF001
    histogram._sum.inc(float(values.sum()))  # noqa: SLF001


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)

