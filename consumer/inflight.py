"""A batch after scoring: in flight until its offsets may be stored (``InFlight``), or consumed
again when its delivery failed (``Replay``).

A batch's offsets are stored only once its outputs are acknowledged and its customers written,
batch after batch in order: a crash before that replays the batch, and the replay writes the
same outputs and customers again (customer writes are idempotent: never older over newer).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from confluent_kafka import Consumer, Message, TopicPartition

from consumer.delivery import Delivery, DeliveryFailed, Sent, Source
from consumer.partitions import rewind
from consumer.scoring import OutRecord, ScoredBatch, coordinates
from consumer.watcher import ActiveModel


@dataclass
class InFlight:
    """A scored batch handed to delivery and to the customer writer, not yet finished."""

    messages: list[Message]
    batch: ScoredBatch
    model: ActiveModel  # the model that scored it (another may be swapped in before it finishes)
    sent: Sent
    write: Future[None]  # the customers' Redis write
    started: float  # when its scoring began (monotonic)

    def finish(self, delivery: Delivery) -> None:
        """Wait for the acknowledgements (retried as delivery's policy says; ``DeliveryFailed``
        when they do not come) and for the Redis write, then store the offsets."""
        try:
            delivery.complete(self.sent)
        finally:
            self.write.result()  # never raises: write failures are counted and dropped
        delivery.store(self.sent)


class Replay:
    """What a failed batch leaves behind. Its partitions are rewound and it is scored again, but
    its records acknowledged before the failure (``DeliveryFailed.acknowledged``) are not sent a
    second time. A batch that fails while partitions are revoked waits in ``pending`` and is
    rewound at the next poll, together with whatever was fetched after it."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.pending: list[Message] = []
        self.acknowledged: set[Source] = set()

    def failed(self, messages: list[Message], exc: DeliveryFailed) -> list[Message]:
        """Remember what of ``messages`` was acknowledged; returns them, to rewind."""
        self.acknowledged |= exc.acknowledged
        return messages

    def unsent(self, records: list[OutRecord]) -> list[OutRecord]:
        """``records`` without those acknowledged before their batch failed."""
        if not self.acknowledged:
            return records
        return [r for r in records if r.source is None or coordinates(r.source) not in self.acknowledged]

    def finished(self, messages: list[Message]) -> None:
        """``messages`` are done: their offsets are stored."""
        if self.acknowledged:
            self.acknowledged -= {coordinates(m) for m in messages}

    def rewind_pending(self, messages: list[Message]) -> list[Message]:
        """Rewind the pending batch with ``messages``, fetched after it; returns what is left to
        process now (nothing when a batch was pending)."""
        if not self.pending:
            return messages
        rewind(self.consumer, self.pending + messages)
        self.pending = []
        return []

    def forget(self, partitions: list[TopicPartition]) -> None:
        """Partitions that left: their next owner replays from the committed offsets."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.acknowledged = {s for s in self.acknowledged if s[:2] not in gone}
