"""The consume loop: poll a batch, score it (and in the shadow, with a challenger), record its
segment changes, deliver its outputs and changes and write its customers, store its offsets once
both are done; learn; report.

Thin on purpose: each stage is a named piece elsewhere (``scoring.score_batch``,
``shadow.shadow_score``, ``changes.SegmentChanges.record``, ``delivery``,
``customer_writer.CustomerWriter``, ``inflight.InFlight.finish``, ``learner.Learner``,
``shadow.Shadow``, ``reporting.Reporter``); ``partitions`` keeps the group membership and the
offsets, ``inflight`` the replay of failed batches. Batches overlap: one is scored while the one
before is acknowledged and written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.changes import SegmentChanges
from consumer.customer_writer import CustomerWriter
from consumer.delivery import Delivery, DeliveryFailed
from consumer.inflight import InFlight, Replay
from consumer.learner import Learner
from consumer.partitions import Membership, commit_stored, consume, next_offsets, rewind
from consumer.reporting import Reporter
from consumer.scoring import OutRecord, ScoringRules, score_batch
from consumer.shadow import Shadow, shadow_score
from consumer.watcher import ActiveModel, ModelWatcher
from segmentation.metrics import ConsumerMetrics
from segmentation.readback import Readback
from segmentation.settings import Settings
from segmentation.store import CustomerStore, ModelStore

log = logging.getLogger(__name__)


class ConsumeLoop:
    def __init__(
        self, settings: Settings, consumer: Consumer, delivery: Delivery, store: ModelStore,
        customers: CustomerStore, metrics: ConsumerMetrics,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.delivery = delivery
        self.metrics = metrics
        store.readback = Readback.of(settings, metrics.readback_rejected)  # refusals counted here
        self.rules = ScoringRules.from_settings(settings)
        self.watcher = ModelWatcher(settings, store, metrics)
        self.writer = CustomerWriter(customers, metrics)
        self.learner = Learner(settings, metrics)
        self.reporter = Reporter(settings, consumer, store, metrics)
        self.changes = SegmentChanges(settings, metrics, self.watcher.model_of)
        self.shadow = Shadow(metrics)
        self.membership = Membership(
            consumer, settings.exactly_once, finish=self._finish_before_revoke, forget=self._forget,
        )
        self.replay = Replay(consumer)
        self.paused = False
        self.step_started: float | None = None  # monotonic start of the step in progress
        self._inflight: InFlight | None = None

    # --- group membership (partitions.Membership), told what the loop holds -------------------
    def subscribe(self) -> None:
        self.membership.subscribe(self.settings.events_topic)

    def _finish_before_revoke(self) -> None:
        self.replay.pending += self._finish()  # a batch that failed is rewound at the next poll

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self.replay.forget(partitions)
        self.reporter.forget(partitions)
        self.changes.forget(tp.partition for tp in partitions)

    @property
    def ready(self) -> bool:
        return self.watcher.active is not None and bool(self.membership.assigned) and not self.paused

    # --- the loop ------------------------------------------------------------------------------
    def run(self, stopping: Callable[[], bool]) -> None:
        self.subscribe()
        self.metrics.up.set(1)
        try:
            while not stopping():
                self.step()
        finally:
            self.metrics.up.set(0)

    def step(self) -> None:
        """Poll a batch; score it; finish the one before (offsets stored, learned, counted);
        deliver this one and write its customers; report when due."""
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
            self.reporter.report(self.watcher.active, self.learner, self.membership.assigned,
                                 self.shadow.state())
        finally:
            self.step_started = None

    def _take(self) -> list[Message]:
        """The next batch, sized by the load: whatever arrived while the last one was handled
        (at most ``batch_size``). Only when nothing is waiting does it finish the batch in flight
        (nothing to overlap it with) and wait up to ``batch_timeout_s`` for a first message."""
        size = self.settings.batch_size
        messages = consume(self.consumer, size, 0)
        if not messages:
            rewind(self.consumer, self._finish())
            messages = consume(self.consumer, 1, self.settings.batch_timeout_s)
            if messages and size > 1:
                messages += consume(self.consumer, size - 1, 0)
        return self.replay.rewind_pending(messages)

    def _hold(self, messages: list[Message]) -> None:
        """No model yet: put messages back, pause everything, commit nothing."""
        rewind(self.consumer, messages)
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
        self.learner.reset(model)
        if self.paused:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False
            log.info("model available: partitions resumed")

    def _process(self, messages: list[Message], model: ActiveModel) -> None:
        """Score this batch while the one before is acknowledged and written to Redis, finish
        that one, then send this one and hand its customers to the writer."""
        started = time.monotonic()
        batch = score_batch(messages, model, self.rules)
        batch.shadow = shadow_score(batch, self.watcher.challenger, model)
        failed = self._finish()
        if failed:  # the batch before failed: replay it and this one
            rewind(self.consumer, failed + messages)
            return
        if not self.changes.record(messages, batch, model):
            rewind(self.consumer, messages)  # held until the changes topic can be read
            time.sleep(1.0)
            return
        try:
            sent = self.delivery.send(self.replay.unsent(batch.records), next_offsets(messages),
                                      self.substitute)
        except DeliveryFailed as exc:  # exactly-once: the transaction did not commit
            rewind(self.consumer, self._failed(messages, exc))
            return
        # Off the critical path, but the batch's offsets wait for it: a crash before the write
        # replays the batch, and the replay writes again (idempotent: never older over newer).
        self._inflight = InFlight(messages, batch, model, sent, self.writer.submit(batch), started)

    def _finish(self) -> list[Message]:
        """Finish the batch in flight: its offsets stored (``InFlight.finish``), learn and count.
        Returns the messages to replay when its delivery failed."""
        flight, self._inflight = self._inflight, None
        if flight is None:
            return []
        try:
            flight.finish(self.delivery)
        except DeliveryFailed as exc:
            return self._failed(flight.messages, exc)
        self.replay.finished(flight.messages)
        self.learner.learn(flight.batch, flight.model)
        self.shadow.count(flight.batch, flight.model, self.watcher.challenger)
        self.reporter.count(flight.batch, flight.model, flight.started)
        return []

    def _failed(self, messages: list[Message], exc: DeliveryFailed) -> list[Message]:
        self.metrics.delivery_failures.inc()
        self.changes.forget_messages(messages)  # rebuilt from what the topic acknowledged
        log.error("batch not acknowledged; replaying it", extra={"error": str(exc)})
        return self.replay.failed(messages, exc)

    def substitute(self, record: OutRecord, error: KafkaError) -> OutRecord | None:
        """Delivery's replacement for a record the broker refused for good (counted here)."""
        replacement = self.rules.replacement(record, error.str())
        if replacement is not None and record.topic != self.rules.dlq_topic:
            self.metrics.dead_letters.labels("output_rejected").inc()
        return replacement

    def close(self) -> None:
        """Flush, commit what is acknowledged, leave the group. Never raises: a fenced or
        broken producer has nothing left to flush that could be committed."""
        try:
            self._finish()  # what fails is not stored: the next owner replays it
        except Exception as exc:  # noqa: BLE001 - closing goes on whatever the batch did
            log.warning("batch in flight not finished on close", extra={"error": str(exc)})
        self.writer.close()
        try:
            self.delivery.close(self.settings.shutdown_timeout_s)
        except KafkaException as exc:
            log.warning("producer flush on close failed", extra={"error": str(exc)})
        if not self.settings.exactly_once:
            commit_stored(self.consumer)
        self.watcher.close()
        self.changes.close()
        try:
            self.consumer.close()
        except KafkaException as exc:
            log.warning("consumer close failed", extra={"error": str(exc)})
