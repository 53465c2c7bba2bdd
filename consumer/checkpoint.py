"""The commit protocol: in one place, the order in which a batch is done with, in both delivery
modes, and the replay of a batch that failed.

For each batch, in this order:

1. **add**: its records (outputs, dead letters, segment changes) handed to the producer; in
   exactly-once mode this is the whole transaction, the input offsets included, committed before
   ``add`` returns. Then its customers handed to the Redis writer (a thread of its own).
2. **commit** (while the next batch is scored): every acknowledgement awaited, the records that
   failed retried as the delivery policy says (``consumer.delivery``); the customers' write
   awaited (best effort: a Redis failure is counted, never fails the batch); then its offsets
   stored (at-least-once: librdkafka commits stored offsets on its interval, and ``revoke`` and
   ``close`` commit them at once). Only then is it done (``on_done``: learned, counted).

Batches are added one at a time: batch n+1 is added only once batch n is committed, so every
offset stored is in order and stands for acknowledged records and written customers.

A batch whose delivery fails (``DeliveryFailed``) is replayed: its partitions are rewound
together with whatever was polled after it, ``on_failed`` drops what the loop derived from it
(the segment-change state of its partitions, rebuilt from the topic), and its records that were
acknowledged before the failure are not sent again. A batch that fails while partitions are
revoked waits (``pending``) and is rewound at the next ``begin``. ``DeliveryStopped`` (the
producer cannot write at all) is not caught: the consumer stops with the batch uncommitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter

from consumer.changes import Changes
from consumer.customer_writer import CustomerWriter
from consumer.delivery import Delivery, DeliveryFailed, Sent, Source
from consumer.model import ActiveModel
from consumer.partitions import commit_stored, next_offsets, rewind
from consumer.scoring import Message, OutRecord, ScoredBatch, coordinates
from consumer.shadow import ShadowScores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One polled batch with every stage's result (each a value of its own stage)."""

    messages: Sequence[Message]
    model: ActiveModel  # the model that scored it (another may be swapped in before it is done)
    scored: ScoredBatch
    changes: Changes = field(default_factory=Changes)
    shadow: ShadowScores | None = None  # the challenger's assignment, never emitted
    started: float = field(default_factory=time.monotonic)  # when its scoring began (monotonic)

    @property
    def records(self) -> list[OutRecord]:
        """Everything it writes to Kafka: outputs, dead letters, then segment changes."""
        return [*self.scored.records, *self.changes.records]


@dataclass(frozen=True)
class InFlight:
    """A batch added and not yet committed."""

    batch: Batch
    sent: Sent
    write: Future[None]  # its customers' Redis write (never raises)


class Checkpoint:
    """The loop asks it to ``begin`` with what it polled, ``add`` each scored batch and
    ``commit`` the one before; ``revoke``, ``forget`` and ``close`` follow the group."""

    def __init__(
        self, consumer: Consumer, delivery: Delivery, writer: CustomerWriter,
        substitute: Callable[[OutRecord, KafkaError], OutRecord | None],
        on_done: Callable[[Batch], None], on_failed: Callable[[Sequence[Message]], None],
        failures: Counter, exactly_once: bool,
    ) -> None:
        self.consumer = consumer
        self.delivery = delivery
        self.writer = writer
        self.substitute = substitute
        self.on_done = on_done
        self.on_failed = on_failed
        self.failures = failures
        self.exactly_once = exactly_once
        self.in_flight: InFlight | None = None
        self.pending: list[Message] = []  # a batch that failed during a revoke, rewound at ``begin``
        self.acknowledged: set[Source] = set()  # of failed batches: not sent again on replay

    def begin(self, polled: Sequence[Message]) -> list[Message]:
        """What to process of ``polled``: all of it, or nothing when a failed batch is pending
        (it is rewound together with ``polled``, which came after it)."""
        if not self.pending:
            return list(polled)
        rewind(self.consumer, [*self.pending, *polled])
        self.pending = []
        return []

    def add(self, batch: Batch) -> bool:
        """Send ``batch`` and hand its customers to the writer; False when its delivery failed
        at once (exactly-once: the transaction did not commit): it is rewound, to be replayed.
        Commit the batch before first."""
        if self.in_flight is not None:
            raise RuntimeError("add: the batch before is not committed")
        try:
            sent = self.delivery.send(self._unsent(batch.records), next_offsets(batch.messages),
                                      self.substitute)
        except DeliveryFailed as exc:
            rewind(self.consumer, self._failed(batch.messages, exc))
            return False
        # Off the critical path, but the batch's offsets wait for it: a crash before the write
        # replays the batch, and the replay writes again (idempotent: never older over newer).
        self.in_flight = InFlight(batch, sent, self.writer.submit(batch.scored.customers))
        return True

    def commit(self, polled: Sequence[Message] = ()) -> bool:
        """Commit the batch in flight (see the module's order); False when its delivery failed:
        it is rewound together with ``polled`` (fetched after it, not added), to be replayed."""
        failed = self._finish()
        if failed:
            rewind(self.consumer, [*failed, *polled])
        return not failed

    def revoke(self) -> None:
        """Partitions are being revoked: commit the batch in flight (one that fails waits in
        ``pending``), then, at-least-once, commit the stored offsets now, so that what the next
        owner starts from is everything acknowledged."""
        self.pending += self._finish()
        if not self.exactly_once:
            commit_stored(self.consumer)

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions that left: their next owner replays from the committed offsets."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.acknowledged = {s for s in self.acknowledged if s[:2] not in gone}

    def close(self, timeout_s: float) -> None:
        """Commit what is acknowledged: the batch in flight (what fails is not stored: the next
        owner replays it), the writes, the producer's queue, the stored offsets. Never raises."""
        try:
            self._finish()
        except Exception as exc:  # noqa: BLE001 - closing goes on whatever the batch did
            log.warning("batch in flight not finished on close", extra={"error": str(exc)})
        self.writer.close()
        try:
            self.delivery.close(timeout_s)
        except KafkaException as exc:
            log.warning("producer flush on close failed", extra={"error": str(exc)})
        if not self.exactly_once:
            commit_stored(self.consumer)

    # --- the steps ---------------------------------------------------------------------------
    def _finish(self) -> list[Message]:
        """Acknowledgements, then the customers' write, then the offsets; ``on_done``. Returns
        the messages to replay when the delivery failed."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return []
        try:
            self.delivery.complete(flight.sent)
        except DeliveryFailed as exc:
            return self._failed(flight.batch.messages, exc)
        finally:
            flight.write.result()
        self.delivery.store(flight.sent)
        if self.acknowledged:
            self.acknowledged -= {coordinates(m) for m in flight.batch.messages}
        self.on_done(flight.batch)
        return []

    def _failed(self, messages: Sequence[Message], exc: DeliveryFailed) -> list[Message]:
        self.failures.inc()
        self.acknowledged |= exc.acknowledged
        self.on_failed(messages)
        log.error("batch not acknowledged; replaying it", extra={"error": str(exc)})
        return list(messages)

    def _unsent(self, records: list[OutRecord]) -> list[OutRecord]:
        """``records`` without those acknowledged before their batch failed."""
        if not self.acknowledged:
            return records
        return [r for r in records if r.source is None or coordinates(r.source) not in self.acknowledged]
