"""What the consume loop reports, off the per-event hot path.

* Per finished batch (``Reporter.count``): events scored and dead-lettered (with reasons),
  unknown category values, assignments, outliers and novel events per segment, event lag, batch
  duration.
* Once per model swapped in (``Reporter.report``): the per-segment series of ids the model does
  not have are removed (``ConsumerMetrics.keep_segments``).
* At most every ``REPORT_EVERY_S`` (``Reporter.report``, called once per step): consumer lag per
  partition; the quality figures (silhouettes, shares and their PSI, the novelty share, centroid
  drift, crossed centroids); this replica's online state in Redis, for the trainer and for
  operators.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Counter

from consumer.drift import DriftTracker, centroid_drift, crossed_centroids
from consumer.learner import Learner
from consumer.model import ActiveModel
from consumer.online import OnlineKMeans
from consumer.scoring import ScoredBatch
from segmentation.domain import ChangeCause
from segmentation.metrics import ConsumerMetrics
from segmentation.store import ModelStore, ReplicaStates, best_effort

log = logging.getLogger(__name__)

REPORT_EVERY_S = 5.0


class Reporter:
    """The loop's metrics and replica state; ``report`` paces itself (cheap to call every step)."""

    def __init__(
        self, replica_id: str, consumer: Consumer, store: ModelStore, metrics: ConsumerMetrics,
    ) -> None:
        self.replica_id = replica_id
        self.consumer = consumer
        self.store = store
        self.metrics = metrics
        self._next_report = 0.0
        self._segments_of: int | None = None  # the version whose segment ids the metrics hold

    def count(self, batch: ScoredBatch, causes: Sequence[ChangeCause], model: ActiveModel | None,
              started: float) -> None:
        """Count a finished batch and its changes' ``causes`` (``started``: when its scoring
        began, monotonic)."""
        m = self.metrics
        m.events.labels("scored").inc(len(batch.outputs))
        m.events.labels("dead_letter").inc(len(batch.dead_letters))
        for reason in batch.reasons:
            m.dead_letters.labels(reason).inc()
        if batch.unknown_categories:
            m.unknown_categories.inc(batch.unknown_categories)
        if model is not None and batch.indices.shape[0]:
            ids = model.bundle.segment_ids
            count_by_segment(m.assignments, ids, batch.indices)
            count_by_segment(m.outliers, ids, batch.indices[batch.outliers])
            count_by_segment(m.novel_events, ids, batch.indices[batch.novel])
            m.event_lag.observe_all(np.maximum(time.time() - batch.event_ms / 1000.0, 0.0))
        for cause in causes:
            m.changes.labels(cause).inc()
        m.batch_duration.observe(time.monotonic() - started)

    def report(
        self, model: ActiveModel | None, learner: Learner, assigned: set[tuple[str, int]],
        challenger: dict[str, Any] | None = None, force: bool = False,
    ) -> None:
        """Lag, quality and replica state, when ``REPORT_EVERY_S`` has passed (or ``force``)."""
        self._retire_segments(model)
        now = time.monotonic()
        if now < self._next_report and not force:
            return
        self._next_report = now + REPORT_EVERY_S
        self._report_lag(assigned)
        quality, online = learner.quality, learner.online
        if model is None or quality is None or online is None:
            return
        simplified, sampled, drift = self._report_quality(model, quality)
        novelty = quality.novelty_share()
        self.metrics.novelty_share.set(float("nan") if novelty is None else novelty)
        self._report_centroids(model, online)
        self._publish_replica_state(model, online, simplified, sampled, drift, novelty, challenger)

    def _retire_segments(self, model: ActiveModel | None) -> None:
        """Once per model swapped in, end the per-segment series of ids it does not have. Called
        from ``report``, after the step has counted the last batch the previous model scored."""
        if model is None or model.version == self._segments_of:
            return
        self._segments_of = model.version
        retired = self.metrics.keep_segments(model.bundle.segment_ids)
        if retired:
            log.info("per-segment series of retired ids removed",
                     extra={"model_version": model.version, "segment_ids": retired})

    def forget(self, partitions: list[TopicPartition]) -> None:
        """Partitions this replica no longer owns: their lag is another member's to report."""
        for tp in partitions:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(tp.partition))

    def _report_quality(
        self, model: ActiveModel, quality: DriftTracker,
    ) -> tuple[float | None, float | None, float | None]:
        """Silhouettes, shares and PSI; returns (simplified, sampled, drift) for the replica state."""
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
        return simplified, sampled, drift

    def _report_centroids(self, model: ActiveModel, online: OnlineKMeans) -> None:
        distances = centroid_drift(model, online)
        for sid, d in zip(model.bundle.segment_ids, distances.tolist(), strict=True):
            self.metrics.centroid_drift.labels(str(sid)).set(d)
        self.metrics.centroids_crossed.set(crossed_centroids(online.centroids, model.centroids))

    def _publish_replica_state(
        self, model: ActiveModel, online: OnlineKMeans, simplified: float | None,
        sampled: float | None, drift: float | None, novelty: float | None,
        challenger: dict[str, Any] | None,
    ) -> None:
        state = {
            "replica": self.replica_id, "model_version": model.version,
            "at": time.time(), "events_seen": online.events_seen,
            "online_centroids": online.centroids.tolist(), "counts": online.counts.tolist(),
            "segment_ids": model.bundle.segment_ids,
            "silhouette_simplified": simplified, "silhouette_sampled": sampled,
            "silhouette_drift": drift, "novelty_share": novelty, "challenger": challenger,
        }
        replicas = ReplicaStates.of(self.store, self.metrics.redis_errors)
        best_effort("replica_state", lambda: replicas.put(self.replica_id, state, ttl_s=120), None,
                    self.metrics.redis_errors)

    def _report_lag(self, assigned: set[tuple[str, int]]) -> None:
        assignment = [TopicPartition(t, p) for t, p in assigned]
        if not assignment:
            return
        try:
            positions = self.consumer.position(assignment)
        except KafkaException as exc:  # partitions moving: the next report tries again
            log.debug("consumer lag not reported", extra={"error": str(exc)})
            return
        for tp in positions:
            try:
                # cached: from the last fetch response, no broker round trip on the loop's thread
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if tp.offset >= 0 and high >= 0:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(high - tp.offset, 0))


def count_by_segment(counter: Counter, segment_ids: list[int], indices: np.ndarray) -> None:
    """Add each segment's number of ``indices`` (segment indices) to ``counter``, labelled by
    stable segment id.

    >>> from prometheus_client import CollectorRegistry
    >>> c = Counter("c", "c", ["segment_id"], registry=CollectorRegistry())
    >>> count_by_segment(c, [4, 7, 9], np.array([0, 2, 2]))
    >>> [(s.labels["segment_id"], s.value) for s in c.collect()[0].samples if s.name == "c_total"]
    [('4', 1.0), ('9', 2.0)]
    """
    if indices.shape[0] == 0:
        return
    for i, n in enumerate(np.bincount(indices, minlength=len(segment_ids)).tolist()):
        if n:
            counter.labels(str(segment_ids[i])).inc(n)
