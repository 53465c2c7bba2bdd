"""The consume loop: poll a batch, score it (and in the shadow, with a challenger), commit the
batch before, record this one's segment changes, add it to the checkpoint; learn; report.

Thin on purpose: each stage is a named piece elsewhere, and returns a value (``scoring.score_batch``,
``shadow.shadow_score``, ``changes.SegmentChanges.record``); ``checkpoint.Checkpoint`` owns the
order of delivery, customer writes and offsets and the replay of failed batches; ``partitions``
keeps the group membership; ``learner.Learner``, ``shadow.Shadow`` and ``telemetry.Reporter``
take each finished batch. Batches overlap: one is scored while the one before is acknowledged
and written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.changes import SegmentChanges
from consumer.checkpoint import Batch, Checkpoint
from consumer.customer_writer import CustomerWriter
from consumer.delivery import Delivery
from consumer.learner import Learner
from consumer.model import ActiveModel
from consumer.partitions import Membership, consume, rewind
from consumer.scoring import Message, OutRecord, ScoringRules, score_batch
from consumer.shadow import Shadow, shadow_score
from consumer.telemetry import Reporter
from consumer.watcher import ModelWatcher
from segmentation.metrics import ConsumerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoopConfig:
    """What the loop itself reads of the settings."""

    events_topic: str
    batch_size: int
    batch_timeout_s: float
    exactly_once: bool
    shutdown_timeout_s: float


class ConsumeLoop:
    """Built with its stages by the composition root (``consumer.service.build_loop``)."""

    def __init__(
        self, config: LoopConfig, consumer: Consumer, delivery: Delivery, rules: ScoringRules,
        watcher: ModelWatcher, changes: SegmentChanges, learner: Learner, reporter: Reporter,
        writer: CustomerWriter, metrics: ConsumerMetrics,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.delivery = delivery
        self.rules = rules
        self.watcher = watcher
        self.changes = changes
        self.learner = learner
        self.reporter = reporter
        self.metrics = metrics
        self.shadow = Shadow(metrics)
        self.checkpoint = Checkpoint(
            consumer, delivery, writer, self.substitute, on_done=self._done,
            on_failed=changes.forget_messages, failures=metrics.delivery_failures,
            exactly_once=config.exactly_once,
        )
        self.membership = Membership(consumer, revoke=self.checkpoint.revoke, forget=self._forget)
        self.paused = False
        self.step_started: float | None = None  # monotonic start of the step in progress

    # --- group membership (partitions.Membership), told what the loop holds -------------------
    def subscribe(self) -> None:
        self.membership.subscribe(self.config.events_topic)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self.checkpoint.forget(partitions)
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
        size = self.config.batch_size
        messages = consume(self.consumer, size, 0)
        if not messages:
            self.checkpoint.commit()
            messages = consume(self.consumer, 1, self.config.batch_timeout_s)
            if messages and size > 1:
                messages += consume(self.consumer, size - 1, 0)
        return self.checkpoint.begin(messages)

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
        """Score this batch while the one before is acknowledged and written to Redis, commit
        that one, then record this one's changes and add it to the checkpoint."""
        started = time.monotonic()
        scored = score_batch(messages, model, self.rules)
        shadow = shadow_score(scored, self.watcher.challenger, model)
        if not self.checkpoint.commit(messages):  # the batch before failed: replayed with this one
            return
        changes = self.changes.record(messages, scored, model)
        if changes is None:
            rewind(self.consumer, messages)  # held until the changes topic can be read
            time.sleep(1.0)
            return
        self.checkpoint.add(Batch(messages, model, scored, changes, shadow, started))

    def _done(self, batch: Batch) -> None:
        """A batch committed: learn it, count it."""
        self.learner.learn(batch.scored, batch.model)
        self.shadow.count(batch.scored, batch.shadow, batch.model, self.watcher.challenger)
        self.reporter.count(batch.scored, batch.changes.causes, batch.model, batch.started)

    def substitute(self, record: OutRecord, error: KafkaError) -> OutRecord | None:
        """Delivery's replacement for a record the broker refused for good (counted here)."""
        replacement = self.rules.replacement(record, error.str())
        if replacement is not None and record.topic != self.rules.dlq_topic:
            self.metrics.dead_letters.labels("output_rejected").inc()
        return replacement

    def close(self) -> None:
        """Commit what is acknowledged, leave the group. Never raises: a fenced or broken
        producer has nothing left to flush that could be committed."""
        self.checkpoint.close(self.config.shutdown_timeout_s)
        self.watcher.close()
        self.changes.close()
        try:
            self.consumer.close()
        except KafkaException as exc:
            log.warning("consumer close failed", extra={"error": str(exc)})
